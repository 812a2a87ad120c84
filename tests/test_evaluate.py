"""Evaluation suite: metrics, baseline masks, the greedy oracle, the evaluate() API."""

from functools import partial

import numpy as np
import pytest
import torch

from adaptive_sampling import Budget, FixedMask, ThirdOrder, get_sigmas_karras, sample_dpmpp_2m, sample_euler
from adaptive_sampling.calibration import greedy_masks
from adaptive_sampling.evaluation.baselines import random_mask, uniform_mask
from adaptive_sampling.evaluation import evaluate
from adaptive_sampling.evaluation.metrics import max_abs_error, psnr, ssim

from .helpers import MLPDenoiser

SIGMAS = get_sigmas_karras(16, 0.03, 14.6)


def test_ssim_matches_scikit_image():
    from skimage.metrics import structural_similarity

    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 2, 16, 12, generator=g, dtype=torch.float64) * 2 - 1
    b = (a + 0.3 * torch.randn(a.shape, generator=g, dtype=torch.float64)).clamp(-1, 1)
    ours = ssim(a, b, data_range=2.0, sigma=None)
    for i in range(3):
        want = structural_similarity(a[i].numpy(), b[i].numpy(), win_size=7, gaussian_weights=False,
                                     use_sample_covariance=False, data_range=2.0, channel_axis=0)
        assert ours[i] == pytest.approx(want, abs=1e-12)
    assert np.allclose(ssim(a, a), 1.0)


def test_psnr_and_max_abs():
    a = torch.zeros(2, 1, 4, 4)
    b = a.clone()
    b[0] += 0.2
    np.testing.assert_allclose(psnr(b, a, data_range=2.0), [10 * np.log10(4 / 0.04), 100.0])
    np.testing.assert_allclose(max_abs_error(b, a), [0.2, 0.0], rtol=1e-6)
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(a, a[:1])


@pytest.mark.parametrize("n, k", [(10, 1), (10, 3), (50, 27), (7, 7)])
def test_uniform_and_random_masks(n, k):
    u = uniform_mask(n, k)
    assert u.sum() == k and u[0]
    gaps = np.diff(np.flatnonzero(u))
    assert gaps.size == 0 or gaps.max() - gaps.min() <= 1
    r = random_mask(n, k, np.random.default_rng(0))
    assert r.sum() == k and r[0]
    with pytest.raises(ValueError):
        uniform_mask(n, n + 1)


def _brute_greedy(sample, model, x, sigmas, target, reference, warmup=4):
    """The greedy search written plainly, one candidate run at a time (no batching, no prefix reuse)."""
    mask = np.ones(len(sigmas) - 1, bool)
    while mask.sum() > target:
        best, best_err = None, np.inf
        for k in np.flatnonzero(mask[warmup:]) + warmup:
            m = mask.copy()
            m[k] = False
            out, _ = sample(model, x, sigmas, disable=True, skip=FixedMask(m))
            err = float(((out - reference) ** 2).sum())
            if err < best_err:
                best, best_err = k, err
        mask[best] = False
    return mask


@pytest.mark.parametrize("sample", [sample_euler, sample_dpmpp_2m])
def test_greedy_is_exact_and_beats_uniform(sample):
    model = MLPDenoiser(dim=72, seed=3)
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 14.6
    ref, _ = sample(model, x, SIGMAS, disable=True)
    targets = [9, 12]
    masks, spent = greedy_masks(sample, model, x, SIGMAS, targets, ref)
    assert masks.sum(1).tolist() == targets and masks[:, :4].all()
    for b in range(2):
        want = _brute_greedy(sample, model, x[b : b + 1], SIGMAS, targets[b], ref[b : b + 1])
        assert (masks[b] == want).all()
    out, _ = sample(model, x, SIGMAS, disable=True, skip=FixedMask(masks))
    uni = np.stack([uniform_mask(16, k) for k in targets])
    out_u, _ = sample(model, x, SIGMAS, disable=True, skip=FixedMask(uni))
    err = ((out - ref) ** 2).flatten(1).sum(1)
    err_u = ((out_u - ref) ** 2).flatten(1).sum(1)
    assert (err <= err_u).all()
    rounds = 16 - min(targets)
    assert spent < 2 * 16 * 16 * rounds  # prefix reuse keeps it below candidates x steps x rounds


def test_evaluate_runs_every_baseline_at_matched_nfe():
    model = MLPDenoiser(dim=64, seed=1)
    noise = torch.randn(3, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    schedule = partial(get_sigmas_karras, sigma_min=0.03, sigma_max=14.6)
    policies = {"default": ThirdOrder(delta=0.05), "paper": ThirdOrder(criterion="paper", delta=0.3)}
    ev = evaluate(model, noise, schedule, policies, steps=16, samplers=("euler", "dpmpp_2m"), disable=True)
    for sampler in ("euler", "dpmpp_2m"):
        full = ev.select(sampler, "full")[0]
        assert full.nfe.tolist() == [16] * 3 and np.all(full.psnr == 100.0)
        for pname in policies:
            k = ev.select(sampler, "adaptive", pname)[0].nfe
            for method in ("uniform", "fewer_steps", "random", "greedy"):
                r = ev.select(sampler, method, pname)[0]
                assert r.nfe.tolist() == k.tolist(), method
                assert r.ssim is not None and r.psnr.shape == (3,)
            greedy = ev.select(sampler, "greedy", pname)[0]
            assert greedy.psnr.mean() >= ev.select(sampler, "uniform", pname)[0].psnr.mean()
            a = ev.associations[(sampler, pname)]
            assert a.table.sum() == 3 * (16 - 4)
            assert np.isnan(a.p_value) or 0 <= a.p_value <= 1
    table = ev.table()
    assert table.count("\n") > 20 and "greedy" in table and "p-value" in table


def test_evaluate_rejects_unknown_names():
    noise = torch.randn(1, 1, 8, 8)
    with pytest.raises(ValueError, match="unknown samplers"):
        evaluate(lambda x, s: x, noise, get_sigmas_karras, {"a": ThirdOrder()}, samplers=("heun",))
    with pytest.raises(ValueError, match="unknown baselines"):
        evaluate(lambda x, s: x, noise, get_sigmas_karras, {"a": ThirdOrder()}, baselines=("oracle",))


def test_evaluate_dpmpp_baseline_and_ode_truth():
    """dpmpp_2m_steps is DPM-Solver++(2M) on a K-step grid at the policy's per-sample K, and with
    truth_steps every result is also scored against the fine DPM-Solver++ solve."""
    model = MLPDenoiser(dim=64, seed=1)
    noise = torch.randn(3, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    schedule = partial(get_sigmas_karras, sigma_min=0.03, sigma_max=14.6)
    ev = evaluate(model, noise, schedule, {"b": Budget(10)}, steps=16, samplers=("euler",), disable=True,
                  baselines=("fewer_steps", "dpmpp_2m_steps"), truth_steps=64)  # fmt: skip
    fine = schedule(64)
    truth, _ = sample_dpmpp_2m(model, noise * fine[0], fine, disable=True)
    dpm = ev.select("euler", "dpmpp_2m_steps", "b")[0]
    assert dpm.nfe.tolist() == [10] * 3
    grid = schedule(10)
    want, _ = sample_dpmpp_2m(model, noise * grid[0], grid, disable=True)
    assert torch.equal(dpm.output, want)
    for r in ev.results:
        np.testing.assert_array_equal(r.psnr_truth, psnr(r.output, truth))
    assert "PSNR vs ODE truth" in ev.table()
    with pytest.raises(ValueError, match="truth_steps must be"):
        evaluate(model, noise, schedule, {"b": Budget(10)}, steps=16, truth_steps=0)


def test_evaluate_calibrated_grid_baseline():
    """dpmpp_2m_grid runs DPM-Solver++(2M) on grid_for(K) at the policy's per-sample K; it is left
    out without grid_for."""
    model = MLPDenoiser(dim=64, seed=1)
    noise = torch.randn(3, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    schedule = partial(get_sigmas_karras, sigma_min=0.03, sigma_max=14.6)

    def grid_for(k):  # a different grid than the schedule's own, so the baseline is not dpmpp_2m_steps
        return get_sigmas_karras(k, 0.03, 14.6, rho=3.0)

    ev = evaluate(model, noise, schedule, {"b": Budget(9)}, steps=16, samplers=("euler",), disable=True,
                  baselines=("dpmpp_2m_steps", "dpmpp_2m_grid"), grid_for=grid_for)  # fmt: skip
    r = ev.select("euler", "dpmpp_2m_grid", "b")[0]
    assert r.nfe.tolist() == [9] * 3
    want, _ = sample_dpmpp_2m(model, noise * grid_for(9)[0], grid_for(9), disable=True)
    assert torch.equal(r.output, want)
    assert not torch.equal(r.output, ev.select("euler", "dpmpp_2m_steps", "b")[0].output)
    ev = evaluate(model, noise, schedule, {"b": Budget(9)}, steps=16, samplers=("euler",), disable=True,
                  baselines=("dpmpp_2m_grid",))  # fmt: skip
    assert not ev.select("euler", "dpmpp_2m_grid", "b")
