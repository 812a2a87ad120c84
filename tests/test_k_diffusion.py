"""The k-diffusion drop-in wrapper, against real k-diffusion samplers."""

import inspect
import threading

import numpy as np
import pytest
import torch

from adaptive_sampling import FixedMask, ThirdOrder, get_sigmas_karras, sample_dpmpp_2m, sample_euler
from adaptive_sampling.integrations.k_diffusion import SUPPORTED_SAMPLERS, TWO_CALL, adaptive

from .helpers import CountingModel, MLPDenoiser, gaussian

SIGMAS = get_sigmas_karras(20, 0.03, 14.6)
KWARGS = {"sample_euler_churn": dict(s_churn=1.0)}  # Euler with churn is checked too
CASES = list(SUPPORTED_SAMPLERS) + ["sample_euler_churn"]


def _sampler(kdiff, case):
    return getattr(kdiff, case.replace("_churn", "")), KWARGS.get(case, {})


def _x(batch=3, seed=0):
    return gaussian().noise(batch, float(SIGMAS[0]), seed=seed)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("policy", [ThirdOrder(max_skips=0), FixedMask(np.ones(20, bool))], ids=["cap0", "ones"])
def test_never_skipping_is_bit_identical(kdiff, case, policy):
    fn, kw = _sampler(kdiff, case)
    model = MLPDenoiser(dim=72, seed=4)
    x = _x()
    torch.manual_seed(123)
    want = fn(model, x, SIGMAS, disable=True, **kw)
    torch.manual_seed(123)
    got, rep = adaptive(fn, policy).with_report(model, x, SIGMAS, disable=True, **kw)
    assert torch.equal(got, want)
    assert rep.computed.all()


@pytest.mark.parametrize("ours, theirs", [(sample_euler, "sample_euler"), (sample_dpmpp_2m, "sample_dpmpp_2m")])
@pytest.mark.parametrize("policy", [ThirdOrder(delta=0.05), ThirdOrder(delta=0.2, criterion="paper", max_skips=2),
                                    ThirdOrder(delta=0.05, per_sample=False)])
def test_wrapped_equals_the_library_sampler(kdiff, ours, theirs, policy):
    model = MLPDenoiser(dim=72, seed=1)
    x = _x(4)
    x[1:] *= torch.tensor([0.3, 1.0, 2.0], dtype=x.dtype).reshape(3, 1, 1, 1)
    want, want_rep = ours(model, x, SIGMAS, disable=True, skip=policy)
    got, rep = adaptive(getattr(kdiff, theirs), policy).with_report(model, x, SIGMAS, disable=True)
    assert (rep.computed == want_rep.computed).all()
    assert (~rep.computed).any(), "the policy should skip something here"
    assert torch.equal(got, want)
    np.testing.assert_array_equal(rep.scores, want_rep.scores)


@pytest.mark.parametrize("case", CASES)
def test_nfe_equals_counted_model_evaluations(kdiff, case):
    fn, kw = _sampler(kdiff, case)
    x = _x(3, seed=2)
    x[0] *= 0.5
    model = CountingModel(MLPDenoiser(dim=72, seed=2), 3)
    torch.manual_seed(0)
    _, rep = adaptive(fn, ThirdOrder(delta=0.1)).with_report(model, x, SIGMAS, {"ids": torch.arange(3)}, disable=True, **kw)
    assert rep.nfe.tolist() == model.rows.tolist()
    assert rep.model_calls == model.calls
    assert rep.extra_evaluations == (19 if case in TWO_CALL else 0)  # no second call on the step to sigma=0


def test_two_call_samplers_reuse_the_latest_evaluation(kdiff):
    """A skipped Heun step reuses the eps of the previous step's second (corrector) call."""
    seen = []
    model = MLPDenoiser(dim=72, seed=5)

    def spy(x, sigma):
        out = model(x, sigma)
        seen.append(((x - out) / sigma.reshape(-1, 1, 1, 1)))
        return out

    mask = np.ones(20, bool)
    mask[[6, 7, 12]] = False
    infos = []
    adaptive(kdiff.sample_heun, FixedMask(mask))(spy, _x(2), SIGMAS, callback=infos.append, disable=True)
    for k in (6, 7, 12):
        info = infos[k]
        eps_latest = seen[_calls_before(mask, k) - 1]
        torch.testing.assert_close(info["denoised"], info["x"] - SIGMAS[k] * eps_latest, rtol=1e-13, atol=1e-13)
        assert not info["computed"].any()


def _calls_before(mask, k):
    """Heun model calls made before step k's first call: its computed first calls plus one second call per step."""
    return int(mask[:k].sum()) + k


def _cfg_model():
    """One CFG model function: conditional and unconditional branches in one batched call."""
    nets = [MLPDenoiser(dim=72, seed=10 + c) for c in range(4)]  # 3 classes + unconditional (index 3)

    def inner(x, sigma, y):
        out = torch.empty_like(x)
        for c in range(4):
            rows = y == c
            if rows.any():
                out[rows] = nets[c](x[rows], sigma[rows])
        return out

    def cfg(x, sigma, cond, cond_scale):
        both = inner(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([cond, torch.full_like(cond, 3)]))
        c, u = both.chunk(2)
        return u + (c - u) * cond_scale

    return cfg


@pytest.mark.parametrize("sampler", ["sample_euler", "sample_dpmpp_2m", "sample_heun"])
def test_cfg_rows_follow_their_own_masks(kdiff, sampler):
    fn = getattr(kdiff, sampler)
    cfg = _cfg_model()
    x = _x(3, seed=3)
    cond = torch.tensor([0, 1, 2])
    extra = {"cond": cond, "cond_scale": 2.0}
    policy = ThirdOrder(delta=0.03)  # a setting where the three classes' trajectories part ways
    out, rep = adaptive(fn, policy).with_report(cfg, x, SIGMAS, extra, disable=True)
    assert len({tuple(r) for r in rep.computed.astype(int)}) == 3, rep.computed.astype(int)
    for b in range(3):
        alone, rb = adaptive(fn, policy).with_report(cfg, x[b : b + 1], SIGMAS, {"cond": cond[b : b + 1], "cond_scale": 2.0}, disable=True)
        assert (rb.computed[0] == rep.computed[b]).all()
        torch.testing.assert_close(out[b : b + 1], alone, rtol=1e-12, atol=1e-12)


def test_signature_and_return_value_are_the_samplers(kdiff):
    wrapped = adaptive(kdiff.sample_lms)
    assert inspect.signature(wrapped) == inspect.signature(kdiff.sample_lms)
    assert wrapped.__name__ == "sample_lms" and wrapped.__doc__ == kdiff.sample_lms.__doc__
    g = gaussian()
    out = wrapped(g.denoiser, _x(), SIGMAS, disable=True, order=3)
    assert isinstance(out, torch.Tensor) and out.shape == _x().shape


@pytest.mark.parametrize("name", ["sample_dpm_fast", "sample_dpm_adaptive"])
def test_variable_nfe_samplers_are_refused(kdiff, name):
    with pytest.raises(ValueError, match="variable number of model calls per step"):
        adaptive(getattr(kdiff, name))


def test_unknown_samplers_need_generic(kdiff):
    def sample_custom(model, x, sigmas, extra_args=None, callback=None, disable=None):
        for i in range(len(sigmas) - 1):
            d = model(x, sigmas[i] * x.new_ones(x.shape[0]), **(extra_args or {}))
            if callback is not None:
                callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": d})
            x = x + (x - d) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
        return x

    with pytest.raises(ValueError, match="unknown sampler 'sample_custom'"):
        adaptive(sample_custom)
    model = MLPDenoiser(dim=72, seed=1)
    policy = ThirdOrder(delta=0.05)
    got, rep = adaptive(sample_custom, policy, generic=True).with_report(model, _x(), SIGMAS)
    want, want_rep = sample_euler(model, _x(), SIGMAS, disable=True, skip=policy)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert (rep.computed == want_rep.computed).all()


def test_generic_mode_stops_a_sampler_with_two_calls_per_step(kdiff):
    with pytest.raises(RuntimeError, match="do not follow the step structure"):
        adaptive(_renamed(kdiff.sample_heun), generic=True)(
            MLPDenoiser(dim=72), _x(), SIGMAS, disable=True
        )


def _renamed(fn):
    def sample_my_heun(*args, **kwargs):
        return fn(*args, **kwargs)

    sample_my_heun.__signature__ = inspect.signature(fn)
    return sample_my_heun


def test_bad_skip_argument(kdiff):
    with pytest.raises(TypeError, match="skip must be a skip policy"):
        adaptive(kdiff.sample_euler, skip="fast")


def test_wrapped_samplers_run_in_threads(kdiff):
    model = MLPDenoiser(dim=72, seed=1)
    jobs = [(kdiff.sample_euler, ThirdOrder(delta=0.05)), (kdiff.sample_dpmpp_2m, ThirdOrder(delta=0.2)),
            (kdiff.sample_heun, ThirdOrder(delta=0.1)), (kdiff.sample_lms, ThirdOrder(delta=0.01))]
    xs = [_x(2, seed=s) for s in range(len(jobs))]
    want = [adaptive(fn, p).with_report(model, x, SIGMAS, disable=True) for (fn, p), x in zip(jobs, xs)]
    got = [None] * len(jobs)

    def work(i):
        fn, p = jobs[i]
        for _ in range(3):
            got[i] = adaptive(fn, p).with_report(model, xs[i], SIGMAS, disable=True)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    for (gx, gr), (wx, wr) in zip(got, want):
        assert torch.equal(gx, wx) and (gr.computed == wr.computed).all()
