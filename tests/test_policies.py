"""The open policy interface, reuse strategies, LocalError, Budget and DPM-Solver++ merge mode."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from adaptive_sampling import (
    Budget,
    Extrapolate,
    FixedMask,
    LocalError,
    ThirdOrder,
    get_sigmas_karras,
    sample_ddim,
    sample_dpmpp_2m,
    sample_euler,
)
from adaptive_sampling.policies import Controller, SkipPolicy, make_reuse
from adaptive_sampling.policies.reuse import ExtrapolateState

from .helpers import CountingModel, LinearEps, MLPDenoiser, assert_merge_mode_is_the_sub_grid_run, gaussian

SAMPLERS = {"ddim": sample_ddim, "euler": sample_euler, "dpmpp_2m": sample_dpmpp_2m}


# --- the docstring's example policy (adaptive_sampling/policies/base.py), verbatim -------------


class EveryOther(SkipPolicy):
    """Skip every second call after a warm-up of 4 calls."""

    def __init__(self, reuse="copy"):
        self.reuse = make_reuse(reuse)

    def start(self, x, num_steps, sampler, sigmas=None):
        return EveryOtherController(x, num_steps, self.reuse)


class EveryOtherController(Controller):
    def decide(self, step, x, sigma):
        return np.full(x.shape[0], step < 4 or step % 2 == 0)


def _every_other_mask(n):
    return np.array([k < 4 or k % 2 == 0 for k in range(n)])


def test_example_policy_through_sample_euler():
    model = MLPDenoiser(dim=72, seed=1)
    sigmas = get_sigmas_karras(12, 0.03, 14.6)
    x = gaussian().noise(2, 14.6)
    out, rep = sample_euler(model, x, sigmas, disable=True, skip=EveryOther())
    mask = _every_other_mask(12)
    assert rep.computed.tolist() == [mask.tolist()] * 2 and rep.nfe.tolist() == [mask.sum()] * 2
    want, _ = sample_euler(model, x, sigmas, disable=True, skip=FixedMask(mask))
    assert torch.equal(out, want)
    assert np.isnan(rep.scores).all() and not rep.capped.any() and rep.signals == {}


def test_example_policy_through_the_k_diffusion_wrapper(kdiff):
    from adaptive_sampling.integrations.k_diffusion import adaptive

    model = MLPDenoiser(dim=72, seed=1)
    sigmas = get_sigmas_karras(12, 0.03, 14.6)
    x = gaussian().noise(2, 14.6)
    counting = CountingModel(model, 2)
    out, rep = adaptive(kdiff.sample_lms, EveryOther()).with_report(
        counting, x, sigmas, extra_args={"ids": torch.arange(2)}, disable=True
    )
    mask = _every_other_mask(12)
    assert rep.computed.tolist() == [mask.tolist()] * 2 and counting.rows.tolist() == [mask.sum()] * 2
    want, _ = adaptive(kdiff.sample_lms, FixedMask(mask)).with_report(model, x, sigmas, disable=True)
    assert torch.equal(out, want)


class _Broken(Controller):
    def __init__(self, x, n, answer):
        super().__init__(x, n)
        self.answer = answer

    def decide(self, step, x, sigma):
        return self.answer(step, x)


@pytest.mark.parametrize(
    "answer, error",
    [
        (lambda k, x: [True] * x.shape[0], "numpy bool array of shape"),
        (lambda k, x: np.ones(x.shape[0] + 1, bool), "numpy bool array of shape"),
        (lambda k, x: np.zeros(x.shape[0], bool), "skipped call 0"),
    ],
)
def test_the_runner_checks_a_controllers_answer(answer, error):
    class Policy(SkipPolicy):
        def start(self, x, n, sampler, sigmas=None):
            return _Broken(x, n, answer)

    with pytest.raises((TypeError, ValueError), match=error):
        sample_euler(MLPDenoiser(dim=72), gaussian().noise(2, 14.6), get_sigmas_karras(6, 0.03, 14.6), disable=True, skip=Policy())


def test_signals_reach_the_report():
    class Signalling(EveryOtherController):
        def signals(self):
            return {"my_signal": np.arange(self.num_steps)[None].repeat(self.batch, 0)}

    class Policy(EveryOther):
        def start(self, x, num_steps, sampler, sigmas=None):
            return Signalling(x, num_steps, self.reuse)

    _, rep = sample_euler(MLPDenoiser(dim=72), gaussian().noise(2, 14.6), get_sigmas_karras(8, 0.03, 14.6), disable=True, skip=Policy())
    assert rep.signals["my_signal"].tolist() == [list(range(8))] * 2


# --- reuse strategies -------------------------------------------------------------------------


class PolynomialEps:
    """A denoiser whose eps is a polynomial in t (log sigma or sigma), the same for every x."""

    def __init__(self, coeffs, variable):
        self.coeffs, self.variable = coeffs, variable  # coeffs[j]: [dim] tensor of t^j

    def eps(self, sigma):
        t = sigma.log() if self.variable == "log_sigma" else sigma
        return sum(c[None] * t[:, None] ** j for j, c in enumerate(self.coeffs))

    def __call__(self, x, sigma, **kw):
        return x - sigma[:, None] * self.eps(sigma)


@given(
    order=st.sampled_from([1, 2]),
    variable=st.sampled_from(["log_sigma", "sigma"]),
    name=st.sampled_from(list(SAMPLERS)),
    steps=st.integers(6, 20),
    seed=st.integers(0, 10_000),
)
def test_extrapolation_is_exact_for_polynomial_eps(order, variable, name, steps, seed):
    """eps affine (order 1) or quadratic (order 2) in the variable, independent of x: any skip
    mask whose first order + 1 calls compute reproduces the no-skip output to round-off."""
    g = torch.Generator().manual_seed(seed)
    model = PolynomialEps([torch.randn(16, generator=g, dtype=torch.float64) for _ in range(order + 1)], variable)
    sigmas = get_sigmas_karras(steps, 0.05, 10.0).double()
    rng = np.random.default_rng(seed)
    mask = rng.random((3, steps)) < 0.4
    mask[:, : order + 1] = True
    x = torch.randn(3, 16, generator=g, dtype=torch.float64) * 10.0
    want, _ = SAMPLERS[name](model, x, sigmas, disable=True)
    got, rep = SAMPLERS[name](model, x, sigmas, disable=True, skip=FixedMask(mask, reuse=Extrapolate(order, variable)))
    assert rep.computed.tolist() == mask.tolist()
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9 * float(want.abs().max()))
    # and copying is measurably wrong on the same problem (the test can fail)
    if (~mask).any():
        copied, _ = SAMPLERS[name](model, x, sigmas, disable=True, skip=FixedMask(mask))
        assert (copied - want).abs().max() > 1e-6 * float(want.abs().max())


@pytest.mark.parametrize("order", [1, 2])
def test_forecasts_are_made_from_computed_calls_only(order):
    """At every skipped call the eps handed to the solver is the Lagrange extrapolation (in log
    sigma) through the last order + 1 COMPUTED calls' eps; a forecast is never a node."""
    model = MLPDenoiser(dim=72, seed=4)
    sigmas = get_sigmas_karras(16, 0.03, 14.6).double()
    mask = np.array([1, 1, 1, 0, 0, 1, 0, 0, 0, 1, 1, 0, 1, 0, 0, 1], bool)
    infos = []
    x = gaussian().noise(2, 14.6)
    sample_euler(model, x, sigmas, callback=infos.append, disable=True, skip=FixedMask(mask, reuse=Extrapolate(order)))
    nodes = []  # (log sigma, eps) of computed calls, newest last
    for k, info in enumerate(infos):
        eps = (info["x"] - info["denoised"]) / sigmas[k]
        if mask[k]:
            nodes.append((float(sigmas[k].log()), eps))
            continue
        pts = nodes[-(order + 1):]
        t = float(sigmas[k].log())
        want = sum(
            e * np.prod([(t - tj) / (ti - tj) for j, (tj, _) in enumerate(pts) if j != i])
            for i, (ti, e) in enumerate(pts)
        )
        torch.testing.assert_close(eps, want, rtol=1e-10, atol=1e-10)


def test_extrapolation_falls_back_to_lower_order():
    state = Extrapolate(2).start(torch.zeros(1, 3), 5)
    e0, e1 = torch.full((1, 3), 1.0, dtype=torch.float64), torch.full((1, 3), 3.0, dtype=torch.float64)
    state.record(0, torch.tensor([1.0]), e0, None)
    assert torch.equal(state.predict(1, torch.tensor([0.5])), e0)  # one node: copy
    state.record(1, torch.tensor([float(np.exp(-1))]), e1, None)  # t = -1
    torch.testing.assert_close(state.predict(2, torch.tensor([float(np.exp(-2))])), torch.full((1, 3), 5.0, dtype=torch.float64))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: Extrapolate(3), "order must be 1 or 2"),
        (lambda: Extrapolate(0), "order must be 1 or 2"),
        (lambda: Extrapolate(1, "t"), "variable must be"),
        (lambda: ThirdOrder(reuse="last"), "reuse must be"),
        (lambda: FixedMask([1, 0], reuse=3), "reuse must be"),
        (lambda: LocalError(tol=-1.0), "tol must be"),
        (lambda: LocalError(tol=float("nan")), "tol must be"),
        (lambda: LocalError(warmup=1), "warmup must be"),
        (lambda: LocalError(max_skips=-1), "max_skips must be"),
        (lambda: LocalError(reuse="forecast"), "reuse must be"),
        (lambda: LocalError(variable="t"), "variable must be"),
        (lambda: Budget(3), "nfe must be an int >= 4"),
        (lambda: Budget(10.0), "nfe must be an int"),
        (lambda: Budget(10, rule=FixedMask([1, 0])), "rule must be"),
        (lambda: Budget(10, window=0), "window must be"),
    ],
)
def test_bad_policy_arguments_name_the_argument(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_budget_larger_than_the_steps_is_refused():
    with pytest.raises(ValueError, match=r"nfe must be in \[4, 8\]"):
        sample_euler(MLPDenoiser(dim=72), gaussian().noise(1, 14.6), get_sigmas_karras(8, 0.03, 14.6), disable=True, skip=Budget(9))


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("kind", ["list", "numpy"])
def test_sigmas_as_list_or_numpy(name, kind):
    model = MLPDenoiser(dim=72, seed=3)
    sigmas = get_sigmas_karras(8, 0.03, 14.6).double()
    x = gaussian().noise(2, 14.6)
    given_ = sigmas.tolist() if kind == "list" else sigmas.numpy()
    want, _ = SAMPLERS[name](model, x, sigmas, disable=True, skip=ThirdOrder())
    got, _ = SAMPLERS[name](model, x, given_, disable=True, skip=ThirdOrder())
    assert torch.equal(got, want)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_sigmas_of_another_type_is_a_type_error(name):
    with pytest.raises(TypeError, match="sigmas must be a 1-D tensor"):
        SAMPLERS[name](MLPDenoiser(dim=72), gaussian().noise(1, 14.6), "0.5,0.1", disable=True)


# --- LocalError ---------------------------------------------------------------------------------


@given(
    lipschitz=st.floats(0.0, 0.5),
    steps=st.integers(6, 24),
    sigma_max=st.floats(1.0, 20.0),
    seed=st.integers(0, 10_000),
)
def test_local_error_estimate_brackets_the_one_step_error_on_linear_models(lipschitz, steps, sigma_max, seed):
    """eps = A x + b sigma + c, Euler steps, all calls computed (tol = 0): at every decided call the
    actual one-step error of copying, |dsigma| rms(eps_k - eps_{k-1}) / rms(x_k), lies within
    [1 - h L, 1 + h L] times the estimate (h: the previous step's length, L = ||A||_2)."""
    g = torch.Generator().manual_seed(seed)
    d = 12
    A = torch.randn(d, d, generator=g, dtype=torch.float64)
    A = A / torch.linalg.matrix_norm(A, ord=2) * lipschitz
    model = LinearEps(A, torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64))
    sigmas = get_sigmas_karras(steps, 0.05, sigma_max).double()
    x = torch.randn(2, d, generator=g, dtype=torch.float64) * sigma_max
    infos = []
    _, rep = sample_euler(model, x, sigmas, callback=infos.append, disable=True,
                          skip=LocalError(tol=0.0, reuse="copy", variable="sigma"))  # fmt: skip
    assert rep.computed.all()
    eps = [(i["x"] - i["denoised"]) / sigmas[k] for k, i in enumerate(infos)]
    for k in range(4, steps):
        rms = lambda v: v.pow(2).mean(dim=1).sqrt()  # noqa: E731
        actual = (sigmas[k + 1] - sigmas[k]).abs() * rms(eps[k] - eps[k - 1]) / rms(infos[k]["x"])
        est = torch.from_numpy(rep.scores[:, k])
        h = float((sigmas[k - 1] - sigmas[k - 2]).abs())
        lo, hi = (1 - h * lipschitz) * est, (1 + h * lipschitz) * est
        slack = 1e-9 * est + 1e-300
        assert (actual >= lo - slack).all() and (actual <= hi + slack).all(), (k, actual, est, h * lipschitz)


def test_local_error_skips_where_its_estimate_is_small_and_keeps_its_guards():
    model = MLPDenoiser(dim=72, seed=5)
    sigmas = get_sigmas_karras(30, 0.03, 14.6)
    x = gaussian().noise(3, 14.6)
    policy = LocalError(tol=0.02, max_skips=2)
    _, rep = sample_dpmpp_2m(model, x, sigmas, disable=True, skip=policy)
    decided = rep.computed[:, 4:]
    assert rep.computed[:, :4].all() and np.isnan(rep.scores[:, :4]).all()
    assert (~decided).any() and decided.any()
    # a skip happens exactly where the estimate is below tol and the cap does not force the call
    assert (~decided == ((rep.scores[:, 4:] < 0.02) & ~rep.capped[:, 4:])).all()
    for row in rep.computed:
        runs = "".join("s" if not c else "c" for c in row).split("c")
        assert max(len(r) for r in runs) <= 2
    never, _ = sample_dpmpp_2m(model, x, sigmas, disable=True, skip=LocalError(tol=0.0))
    assert never.shape == x.shape


def test_local_error_nfe_falls_as_tol_rises():
    model = MLPDenoiser(dim=72, seed=5)
    sigmas = get_sigmas_karras(30, 0.03, 14.6)
    x = gaussian().noise(4, 14.6)
    nfe = [sample_euler(model, x, sigmas, disable=True, skip=LocalError(tol=t, max_skips=30))[1].nfe.mean()
           for t in (0.0, 0.005, 0.02, 0.1, 1.0)]  # fmt: skip
    assert nfe[0] == 30 and all(a >= b for a, b in zip(nfe, nfe[1:])) and nfe[-1] < 10


def test_local_error_per_sample_false_takes_one_decision():
    model = MLPDenoiser(dim=72, seed=5)
    x = gaussian().noise(4, 14.6)
    _, rep = sample_euler(model, x, get_sigmas_karras(20, 0.03, 14.6), disable=True, skip=LocalError(tol=0.03, per_sample=False))
    assert (rep.computed == rep.computed[:1]).all() and (~rep.computed).any()


def test_local_error_needs_the_grid():
    with pytest.raises(ValueError, match="needs the sigma grid"):
        LocalError().start(torch.zeros(2, 3), 5, "euler")


# --- Budget ----------------------------------------------------------------------------------


@given(
    name=st.sampled_from(list(SAMPLERS)),
    steps=st.integers(6, 24),
    data=st.data(),
    rule=st.sampled_from([LocalError(tol=0.02), LocalError(tol=0.1, reuse="copy", max_skips=2), ThirdOrder(backend="torch")]),
    seed=st.integers(0, 100),
)
def test_budget_spends_exactly_nfe_calls_per_sample(name, steps, data, rule, seed):
    nfe = data.draw(st.integers(rule.warmup, steps), label="nfe")
    model = CountingModel(MLPDenoiser(dim=72, seed=seed), 3)
    x = gaussian().noise(3, 14.6, seed=seed)
    _, rep = SAMPLERS[name](model, x, get_sigmas_karras(steps, 0.03, 14.6), {"ids": torch.arange(3)}, disable=True,
                            skip=Budget(nfe, rule=rule))  # fmt: skip
    assert rep.nfe.tolist() == [nfe] * 3 and model.rows.tolist() == [nfe] * 3
    assert rep.computed[:, : rule.warmup].all()


@pytest.mark.parametrize("rule", [LocalError(tol=0.02), ThirdOrder(backend="torch")], ids=["local_error", "third_order"])
def test_budget_identical_rows_follow_the_batch_one_path(rule):
    model = MLPDenoiser(dim=72, seed=6)
    sigmas = get_sigmas_karras(20, 0.03, 14.6)
    a, b = gaussian().noise(2, 14.6, seed=1)
    x = torch.stack([a, b, a])
    out, rep = sample_dpmpp_2m(model, x, sigmas, disable=True, skip=Budget(11, rule=rule))
    one, rep1 = sample_dpmpp_2m(model, a[None], sigmas, disable=True, skip=Budget(11, rule=rule))
    assert rep.computed[0].tolist() == rep.computed[2].tolist() == rep1.computed[0].tolist()
    torch.testing.assert_close(out[0], one[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[2], one[0], rtol=1e-12, atol=1e-12)
    assert "forced" in rep.signals


# --- DPM-Solver++(2M) merge mode ---------------------------------------------------------------


@given(steps=st.integers(5, 24), seed=st.integers(0, 10_000), batch=st.integers(1, 3))
def test_merged_dpmpp_2m_is_dpmpp_2m_on_the_sub_grid(steps, seed, batch):
    """A mask with K calls in merge mode is exactly DPM-Solver++(2M) on the K-point sub-grid of the
    computed sigmas plus the final one; per row when rows have their own masks."""
    model = MLPDenoiser(dim=72, seed=seed % 7)
    sigmas = get_sigmas_karras(steps, 0.03, 14.6).double()
    rng = np.random.default_rng(seed)
    mask = rng.random((batch, steps)) < 0.5
    mask[:, 0] = True
    x = gaussian().noise(batch, 14.6, seed=seed)
    assert_merge_mode_is_the_sub_grid_run(sample_dpmpp_2m, model, x, sigmas, mask)


def test_merged_dpmpp_2m_matches_k_diffusion_on_the_sub_grid(kdiff):
    model = MLPDenoiser(dim=72, seed=2)
    sigmas = get_sigmas_karras(16, 0.03, 14.6).double()
    mask = np.array([1, 1, 0, 1, 0, 0, 1, 1, 0, 1, 1, 0, 0, 0, 1, 0], bool)
    x = gaussian().noise(2, 14.6)
    out, _ = sample_dpmpp_2m(model, x, sigmas, disable=True, skip=FixedMask(mask), merge_skipped=True)
    sub = torch.cat([sigmas[:-1][torch.from_numpy(mask)], sigmas[-1:]])
    assert torch.equal(out, kdiff.sample_dpmpp_2m(model, x, sub, disable=True))
    stale, _ = sample_dpmpp_2m(model, x, sigmas, disable=True, skip=FixedMask(mask))
    assert not torch.allclose(stale, out)  # the default mode is a different method


def test_merge_without_skipping_is_plain_dpmpp_2m():
    model = MLPDenoiser(dim=72, seed=2)
    sigmas = get_sigmas_karras(12, 0.03, 14.6)
    x = gaussian().noise(2, 14.6)
    assert torch.equal(sample_dpmpp_2m(model, x, sigmas, disable=True, merge_skipped=True)[0],
                       sample_dpmpp_2m(model, x, sigmas, disable=True)[0])  # fmt: skip
    with pytest.raises(ValueError, match="merge_skipped must be a bool"):
        sample_dpmpp_2m(model, x, sigmas, disable=True, merge_skipped="yes")


def test_extrapolate_state_keeps_per_row_histories():
    s = ExtrapolateState(1, "sigma")
    e = torch.arange(6, dtype=torch.float64).reshape(2, 3)
    s.record(0, torch.tensor([2.0, 2.0]), e, None)
    s.record(1, torch.tensor([1.0]), e[1:] + 10, torch.tensor([1]))
    assert s.count.tolist() == [1, 2]
    p = s.predict(2, torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(p[0], e[0])  # one node: copy
    torch.testing.assert_close(p[1], e[1] + 15)  # line through (2, e) and (1, e + 10) at 0.5


@pytest.mark.skipif(
    __import__("os").environ.get("ADAPTIVE_SAMPLING_TEST_DEVICE", "cpu") != "cuda",
    reason="counts CUDA synchronisations (ADAPTIVE_SAMPLING_TEST_DEVICE=cuda)",
)
@pytest.mark.parametrize("policy", [LocalError(), Budget(8), Budget(8, rule=ThirdOrder())], ids=["local_error", "budget", "budget_third_order"])
def test_one_device_to_host_read_per_decided_step(policy):
    """decide + record + reuse of one step synchronise with the host at most once (the decision)."""
    import warnings

    dev, steps, batch = torch.device("cuda"), 12, 2
    sigmas = get_sigmas_karras(steps, 0.03, 14.6).double()
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(batch, 4, 32, 32, generator=g).to(dev) * float(sigmas[k]) for k in range(steps)]
    eps = [torch.randn(batch, 4, 32, 32, generator=g).to(dev) for k in range(steps)]
    sig = [torch.full((batch,), float(sigmas[k]), device=dev) for k in range(steps)]
    c = policy.start(xs[0], steps, "ddim", sigmas=sigmas)
    counts = []
    previous = torch.cuda.get_sync_debug_mode()
    try:
        torch.cuda.set_sync_debug_mode("warn")
        for k in range(steps):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                compute = c.decide(k, xs[k], sig[k])
                c.record(k, sig[k], eps[k], None) if compute.all() else c.reuse(k, sig[k])
            counts.append(sum("synchroniz" in str(w.message) for w in caught))
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert max(counts) <= 1 and counts[5:] == [1] * (steps - 5), counts
