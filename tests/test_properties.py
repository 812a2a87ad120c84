"""Property tests of the skip machinery: guards, NFE accounting, per-sample independence,
exactness for constant eps, the a-priori error bound for Lipschitz models, determinism."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from adaptive_sampling import FixedMask, ThirdOrder, get_sigmas_karras, sample_ddim, sample_dpmpp_2m, sample_euler

from .helpers import CountingModel, LinearEps, MLPDenoiser, gaussian

SAMPLERS = {"ddim": sample_ddim, "euler": sample_euler, "dpmpp_2m": sample_dpmpp_2m}

policies = st.builds(
    ThirdOrder,
    delta=st.sampled_from([0.0, 0.005, 0.01, 0.05, 0.2, 1.0, 5.0]),
    max_skips=st.integers(0, 6),
    warmup=st.integers(4, 7),
    criterion=st.sampled_from(["reference", "paper"]),
    per_sample=st.booleans(),
    space=st.sampled_from([None, "vp", "ve"]),
    backend=st.just("torch"),
)
steps_st = st.integers(5, 30)
samplers = st.sampled_from(list(SAMPLERS))


def _workload(seed, batch, steps, dtype=torch.float64):
    g = gaussian(seed=seed, dtype=dtype)
    sigmas = get_sigmas_karras(steps, 0.02, 20.0)
    x = g.noise(batch, 20.0, seed=seed).to(dtype)
    return g, sigmas, x


def _runs(computed_row):
    out, cur = [], 0
    for c in computed_row:
        if c:
            if cur:
                out.append(cur)
            cur = 0
        else:
            cur += 1
    return out + ([cur] if cur else [])


@given(policy=policies, name=samplers, steps=steps_st, seed=st.integers(0, 5), batch=st.integers(1, 4))
def test_guards_and_nfe_accounting(policy, name, steps, seed, batch):
    g, sigmas, x = _workload(seed, batch, steps)
    y = torch.arange(batch) % 3
    model = CountingModel(lambda x, s, y: g.denoiser(x, s, y), batch)
    _, rep = SAMPLERS[name](model, x, sigmas, {"ids": torch.arange(batch), "y": y}, disable=True, skip=policy)
    # warm-up calls always compute
    assert rep.computed[:, : policy.warmup].all()
    # no run of skips longer than max_skips
    for row in rep.computed:
        assert all(r <= policy.max_skips for r in _runs(row))
    # the NFE in the report is what the model really evaluated, per sample
    assert rep.nfe.tolist() == model.rows.tolist()
    assert rep.model_calls == model.calls == int(rep.computed.any(axis=0).sum())
    if not policy.per_sample:
        assert (rep.computed == rep.computed[:1]).all()


@given(policy=policies, name=samplers, steps=steps_st, seed=st.integers(0, 5))
def test_identical_rows_follow_the_batch1_path(policy, name, steps, seed):
    g, sigmas, x = _workload(seed, 1, steps)
    x1, r1 = SAMPLERS[name](g.denoiser, x, sigmas, disable=True, skip=policy)
    x3, r3 = SAMPLERS[name](g.denoiser, x.expand(3, *x.shape[1:]).clone(), sigmas, disable=True, skip=policy)
    assert (r3.computed == r1.computed).all()
    torch.testing.assert_close(x3, x1.expand_as(x3), rtol=1e-12, atol=1e-12)


@given(name=samplers, steps=steps_st, seed=st.integers(0, 100), data=st.data())
def test_constant_eps_makes_every_mask_exact(name, steps, seed, data):
    gen = torch.Generator().manual_seed(seed)
    c = torch.randn(2, 5, dtype=torch.float64, generator=gen)
    model = lambda x, s: x - s[:, None] * c  # noqa: E731  (eps = c everywhere)
    sigmas = get_sigmas_karras(steps, 0.02, 20.0)
    x = torch.randn(2, 5, dtype=torch.float64, generator=gen) * 20
    mask = [True] + data.draw(st.lists(st.booleans(), min_size=steps - 1, max_size=steps - 1))
    full, _ = SAMPLERS[name](model, x, sigmas, disable=True)
    skipped, rep = SAMPLERS[name](model, x, sigmas, disable=True, skip=FixedMask(mask))
    assert rep.nfe.tolist() == [sum(mask)] * 2
    torch.testing.assert_close(skipped, full, rtol=1e-12, atol=1e-12)
    exact = x + (sigmas[-1] - sigmas[0]) * c
    torch.testing.assert_close(full, exact, rtol=1e-10, atol=1e-10)


def _linear_model(seed, dim):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(dim, dim, dtype=torch.float64, generator=gen) / dim**0.5 * 0.3
    b = torch.randn(dim, dtype=torch.float64, generator=gen) * 0.1
    c = torch.randn(dim, dtype=torch.float64, generator=gen)
    return LinearEps(A, b, c)


@given(
    name=st.sampled_from(["euler", "ddim"]),
    steps=st.integers(5, 25),
    seed=st.integers(0, 1000),
    use_rule=st.booleans(),
    data=st.data(),
)
def test_a_priori_error_bound_for_lipschitz_models(name, steps, seed, use_rule, data):
    """e_{k+1} <= (1 + |h_k| L_x) e_k + |h_k| (L_x ||x~_k - x~_j|| + L_sigma |sigma_k - sigma_j|),
    j = the last computed step, for any skip path (random masks and the rule's own)."""
    dim, batch = 6, 3
    model = _linear_model(seed, dim)
    Lx, Ls = model.lipschitz
    sigmas = get_sigmas_karras(steps, 0.05, 5.0)
    x = torch.randn(batch, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * 5
    if use_rule:
        policy = ThirdOrder(delta=data.draw(st.sampled_from([0.05, 0.5, 2.0])), max_skips=3)
    else:
        policy = FixedMask([True] + data.draw(st.lists(st.booleans(), min_size=steps - 1, max_size=steps - 1)))
    full, _ = SAMPLERS[name](model, x, sigmas, disable=True)
    path = []
    skipped, rep = SAMPLERS[name](model, x, sigmas, disable=True, skip=policy,
                                  callback=lambda info: path.append(info["x"].clone()))
    bound = torch.zeros(batch, dtype=torch.float64)
    for b in range(batch):
        e, j = 0.0, 0
        for k in range(steps):
            if rep.computed[b, k]:
                j = k
            h = abs(float(sigmas[k + 1] - sigmas[k]))
            drift = (path[k][b] - path[j][b]).norm().item()
            e = (1 + h * Lx) * e + h * (Lx * drift + Ls * abs(float(sigmas[k] - sigmas[j])))
        bound[b] = e
    err = (skipped - full).norm(dim=1)
    assert (err <= bound * (1 + 1e-9) + 1e-10).all(), (err, bound)


@given(policy=policies, name=samplers, steps=steps_st, seed=st.integers(0, 5))
def test_same_inputs_same_masks(policy, name, steps, seed):
    g, sigmas, x = _workload(seed, 3, steps)
    a = SAMPLERS[name](g.denoiser, x, sigmas, disable=True, skip=policy)
    b = SAMPLERS[name](g.denoiser, x.clone(), sigmas.clone(), disable=True, skip=policy)
    assert (a[1].computed == b[1].computed).all()
    assert torch.equal(a[0], b[0])


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_per_sample_rows_take_their_own_paths(name):
    """Rows with different conditioning decide separately, the model sees only the rows that
    compute, and each row equals its own batch-1 run."""
    model = MLPDenoiser(dim=72, seed=1)
    g = gaussian()
    sigmas = get_sigmas_karras(30, 0.03, 14.6)
    x = g.noise(4, float(sigmas[0]), seed=7)
    x[1:] = x[1:] * torch.tensor([0.2, 1.0, 3.0], dtype=x.dtype).reshape(3, 1, 1, 1)
    seen_batches = []

    def spy(x, s, ids):
        seen_batches.append(ids.tolist())
        return model(x, s)

    policy = ThirdOrder(delta=0.05)
    out, rep = SAMPLERS[name](spy, x, sigmas, {"ids": torch.arange(4)}, disable=True, skip=policy)
    assert len({tuple(r) for r in rep.computed.astype(int)}) > 1, "rows should follow different masks"
    for k, ids in zip(np.flatnonzero(rep.computed.any(0)), seen_batches):
        assert ids == np.flatnonzero(rep.computed[:, k]).tolist()
    for b in range(4):
        alone, rb = SAMPLERS[name](model, x[b : b + 1], sigmas, disable=True, skip=policy)
        assert (rb.computed[0] == rep.computed[b]).all()
        torch.testing.assert_close(out[b : b + 1], alone, rtol=1e-10, atol=1e-10)
