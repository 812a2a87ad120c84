"""Calibrated schedules: the search, the aggregation, the file, the log-sigma mapping, the sub-grid."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from adaptive_sampling import (
    Calibrated,
    Extrapolate,
    FixedMask,
    LocalError,
    calibrate,
    get_sigmas_karras,
    sample_ddim,
    sample_dpmpp_2m,
    sample_euler,
)
from adaptive_sampling.evaluation.baselines import uniform_mask
from adaptive_sampling.calibration import calibration_path
from adaptive_sampling.calibration.proxy import GAIN_SCALES, _hat_basis, _Proxy, fit_gain, proxy_path, proxy_runs
from adaptive_sampling.policies.calibrated import map_schedule
from adaptive_sampling.evaluation.workloads.digits import DigitsOptimalDenoiser

from .helpers import CountingModel, MLPDenoiser, gaussian

SAMPLE = {"ddim": sample_ddim, "euler": sample_euler, "dpmpp_2m": sample_dpmpp_2m}


def _gaussian_case(batch=4, steps=16, seed=0):
    w = gaussian(shape=(2, 4, 4))
    sigmas = get_sigmas_karras(steps, 0.02, 20.0)
    y = torch.arange(batch) % 3
    return w.denoiser, sigmas, w.noise(batch, float(sigmas[0]), seed=seed), {"y": y}


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m"])
@pytest.mark.parametrize("workload", ["gaussian", "digits"])
def test_calibrate_gives_exactly_k_calls_per_sample(sampler, workload):
    if workload == "gaussian":
        model, sigmas, x, extra = _gaussian_case()
    else:
        model = DigitsOptimalDenoiser()
        sigmas = get_sigmas_karras(14, 0.05, 20.0)
        x = torch.randn(3, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 20.0
        extra = {"y": torch.tensor([1, 4, 7])}
    for k in (5, 9):
        policy = calibrate(model, sampler, sigmas, x, extra, nfe=k, disable=True)
        assert isinstance(policy, Calibrated) and policy.calls == k and policy.mask[:4].all()
        counting = CountingModel(model, batch=5)
        x_new = x[:1].expand(5, *x.shape[1:]) * torch.linspace(0.8, 1.2, 5, dtype=x.dtype).reshape(-1, 1, 1, 1)
        y_new = extra["y"][:1].expand(5)
        _, report = SAMPLE[sampler](counting, x_new, sigmas, {"y": y_new, "ids": torch.arange(5)}, disable=True, skip=policy)
        assert report.nfe.tolist() == [k] * 5 and counting.rows.tolist() == [k] * 5
        assert (report.computed == policy.mask).all()


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
@pytest.mark.parametrize("aggregate", ["mean_error", "frequency"])
def test_aggregated_schedule_against_exhaustive_search(sampler, aggregate):
    """N = 10 steps, warm-up 4, K = 7: all C(6, 3) = 20 schedules can be tried. The calibrated
    schedule is no worse than uniform stride on the calibration samples, and the mean-error
    greedy is close to the exhaustive optimum."""
    model = MLPDenoiser(dim=32, seed=5)
    sigmas = get_sigmas_karras(10, 0.03, 14.6)
    x = torch.randn(4, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 14.6
    sample = SAMPLE[sampler]
    ref, _ = sample(model, x, sigmas, disable=True)

    def error(mask):
        out, _ = sample(model, x, sigmas, disable=True, skip=FixedMask(mask))
        return float(((out - ref) ** 2).sum())

    errors = {}
    for keep in itertools.combinations(range(4, 10), 3):
        m = np.zeros(10, bool)
        m[:4] = True
        m[list(keep)] = True
        errors[keep] = error(m)
    policy = calibrate(model, sampler, sigmas, x, nfe=7, aggregate=aggregate, disable=True)
    assert policy.calls == 7
    ours = error(policy.mask)
    assert ours <= error(uniform_mask(10, 7))
    if aggregate == "mean_error":
        assert ours <= 1.5 * min(errors.values())


def test_frequency_keeps_the_steps_most_samples_keep():
    model, sigmas, x, extra = _gaussian_case(batch=5)
    path = calibration_path(model, "euler", sigmas, x, extra, min_calls=6, aggregate="frequency", disable=True)
    for k in (6, 9, 12):
        kept = path.greedy.masks(k).sum(axis=0)
        mask = path.mask(k)
        assert mask.sum() == k and mask[0]
        assert kept[mask].min() >= kept[~mask].max()  # no dropped step is kept by more samples


def test_the_mean_error_path_is_nested_and_matches_calibrate():
    model, sigmas, x, extra = _gaussian_case()
    path = calibration_path(model, "dpmpp_2m", sigmas, x, extra, min_calls=6, disable=True, method="greedy")
    masks = [path.mask(k) for k in range(6, 17)]
    for small, big in zip(masks, masks[1:]):
        assert (big | small == big).all() and big.sum() == small.sum() + 1
    direct = calibrate(model, "dpmpp_2m", sigmas, x, extra, nfe=9, disable=True, method="greedy")
    assert (direct.mask == path.mask(9)).all()


@pytest.mark.parametrize("sampler", ["euler", "ddim", "dpmpp_2m"])
def test_calibrated_grid_is_the_skip_path_without_skipping(sampler):
    model = MLPDenoiser(dim=32, seed=1)
    sigmas = get_sigmas_karras(14, 0.03, 14.6)
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 14.6
    grid = calibrate(model, sampler, sigmas, x, nfe=8, as_grid=True, disable=True)
    assert len(grid) == 9 and grid[0] == sigmas[0] and grid[-1] == sigmas[-1] and bool((grid[1:] < grid[:-1]).all())
    mask = torch.isin(sigmas[:-1], grid).numpy()
    on_grid, report = SAMPLE[sampler](model, x, grid, disable=True)
    kwargs = {"merge_skipped": True} if sampler == "dpmpp_2m" else {}
    masked, _ = SAMPLE[sampler](model, x, sigmas, disable=True, skip=FixedMask(mask), **kwargs)
    assert report.nfe.tolist() == [8] * 3
    torch.testing.assert_close(on_grid, masked, rtol=1e-12, atol=1e-12)


def test_save_load_round_trips_bit_for_bit(tmp_path):
    model, sigmas, x, extra = _gaussian_case()
    sigmas = sigmas * (1 + 1e-13 * torch.arange(len(sigmas), dtype=sigmas.dtype))  # digits a sloppy writer would lose
    policy = calibrate(model, "dpmpp_2m", sigmas, x, extra, nfe=9, reuse=Extrapolate(1, "sigma"), merge_skipped=True, disable=True)
    path = tmp_path / "schedule.json"
    policy.save(path)
    loaded = Calibrated.load(path)
    assert loaded.sigmas.tobytes() == policy.sigmas.tobytes() and (loaded.mask == policy.mask).all()
    assert loaded.reuse == Extrapolate(1, "sigma") and loaded.merge_skipped and loaded.sampler == "dpmpp_2m"
    assert loaded.provenance == policy.provenance and loaded.to_dict() == policy.to_dict()
    refined = policy.with_refinement(LocalError(tol=2e-3, max_skips=2, reuse="copy")).with_nfe(7)
    refined.save(path)
    again = Calibrated.load(path)
    assert again.refine == refined.refine and again.nfe == 7
    doc = json.loads(path.read_text())
    assert doc["format"] == "adaptive_sampling.Calibrated" and doc["calls"] == 9 and len(doc["log_sigmas"]) == 9
    out_a, _ = sample_dpmpp_2m(model, x, sigmas, extra, disable=True, skip=policy, merge_skipped=True)
    out_b, _ = sample_dpmpp_2m(model, x, sigmas, extra, disable=True, skip=Calibrated.load(tmp_path / "schedule.json").with_nfe(None).with_refinement(None), merge_skipped=True)
    assert torch.equal(out_a, out_b)


def test_a_bad_file_is_refused(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"format": "something else", "version": 1}))
    with pytest.raises(ValueError, match="not a adaptive_sampling.Calibrated"):
        Calibrated.load(path)


def _random_schedule(data, n):
    mask = np.array([True] + data.draw(st.lists(st.booleans(), min_size=n - 1, max_size=n - 1)), dtype=bool)
    return mask


@given(data=st.data(), n=st.integers(2, 60), n_new=st.integers(1, 120), rho=st.floats(1.0, 9.0))
def test_log_sigma_mapping_gives_exactly_k_calls(data, n, n_new, rho):
    mask = _random_schedule(data, n)
    sigmas = get_sigmas_karras(n, 0.002, 80.0)
    new = get_sigmas_karras(n_new, data.draw(st.floats(0.001, 1.0)), data.draw(st.floats(2.0, 200.0)), rho)
    k = data.draw(st.integers(1, n_new))
    out = map_schedule(mask, sigmas, new, k)
    assert out.shape == (n_new,) and out.sum() == k and out[0]
    assert (map_schedule(mask, sigmas, sigmas, int(mask.sum())) == mask).all()  # the calibration grid: the mask itself


@given(data=st.data(), n=st.integers(4, 40), factor=st.sampled_from([2, 3]))
def test_log_sigma_mapping_on_a_refined_grid_keeps_the_calls_in_place(data, n, factor):
    """On a grid with every interval split (in log sigma) into ``factor`` steps and ``factor`` x K
    calls, the calls of each calibrated interval stay on that interval's sub-steps: the number of
    calls at or above each calibrated sigma scales by ``factor`` to within one call."""
    mask = _random_schedule(data, n)
    sigmas = get_sigmas_karras(n, 0.01, 50.0)
    logs = np.log(sigmas[:-1].numpy())
    fine = np.exp(np.concatenate([np.linspace(a, b, factor, endpoint=False) for a, b in zip(logs[:-1], logs[1:])] + [logs[-1:]]))
    fine = np.append(fine, 0.0)
    k = factor * int(mask.sum())
    if k > len(fine) - 1:
        k = len(fine) - 1
    out = map_schedule(mask, sigmas, fine, k)
    assert out.sum() == k
    for j in range(n):  # calls at or above sigma_j: calibrated C(j), mapped count on the fine grid
        above = out[: factor * j + 1].sum()
        assert abs(above - k / mask.sum() * mask[: j + 1].sum()) <= factor + 1


def test_calibrated_on_another_grid_keeps_the_fraction_or_the_given_nfe():
    model, sigmas, x, extra = _gaussian_case(steps=20)
    policy = calibrate(model, "euler", sigmas, x, extra, nfe=12, disable=True)
    for steps, want in ((20, 12), (30, 18), (10, 6), (100, 60)):
        grid = get_sigmas_karras(steps, 0.02, 20.0)
        _, report = sample_euler(model, x, grid, extra, disable=True, skip=policy)
        assert report.nfe.tolist() == [want] * len(x)
        _, report = sample_euler(model, x, grid, extra, disable=True, skip=policy.with_nfe(7))
        assert report.nfe.tolist() == [7] * len(x)


@given(seed=st.integers(0, 1000), k=st.integers(5, 14), tol=st.floats(1e-5, 1e-1))
def test_refinement_keeps_exactly_the_calibrated_calls_per_sample(seed, k, tol):
    model = MLPDenoiser(dim=32, seed=seed % 7)
    sigmas = get_sigmas_karras(16, 0.03, 14.6)
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * 14.6
    mask = np.zeros(16, bool)
    mask[:4] = True
    mask[np.random.default_rng(seed).choice(np.arange(4, 16), k - 4, replace=False)] = True
    policy = Calibrated(sigmas, mask, "euler", refine=LocalError(tol=tol, max_skips=2, reuse="copy"))
    _, report = sample_euler(model, x, sigmas, disable=True, skip=policy)
    assert report.nfe.tolist() == [k] * 3
    runs = [len(r) for row in report.computed for r in "".join("1" if c else "0" for c in row).split("1") if r]
    assert max(runs, default=0) <= max(2, max(len(r) for r in "".join("1" if c else "0" for c in mask).split("1")))


def test_refinement_with_zero_tolerance_is_the_schedule():
    """tol = 0: every estimate says "do not skip", so no scheduled call is ever deferred."""
    model, sigmas, x, extra = _gaussian_case()
    policy = calibrate(model, "euler", sigmas, x, extra, nfe=9, disable=True)
    _, plain = sample_euler(model, x, sigmas, extra, disable=True, skip=policy)
    _, refined = sample_euler(model, x, sigmas, extra, disable=True, skip=policy.with_refinement(LocalError(tol=0.0, max_skips=16)))
    assert (refined.computed == plain.computed).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sampler": "heun"}, "sampler must be one of"),
        ({"nfe": 2}, "nfe must be an int in"),
        ({"nfe": 99}, "nfe must be an int in"),
        ({"aggregate": "median"}, "aggregate must be one of"),
        ({"merge_skipped": True, "sampler": "euler"}, "merge_skipped"),
        ({"as_grid": True, "reuse": Extrapolate(1)}, "as_grid=True"),
        ({"reuse": "forecast"}, "reuse must be"),
        ({"seconds": 0.0}, "seconds must be > 0"),
    ],
)
def test_bad_calibration_arguments_name_the_argument(kwargs, match):
    model, sigmas, x, extra = _gaussian_case()
    args = {"sampler": "euler", "nfe": 8, **kwargs}
    sampler = args.pop("sampler")
    with pytest.raises(ValueError, match=match):
        calibrate(model, sampler, sigmas, x, extra, disable=True, **args)


def test_a_seconds_budget_still_gives_k_calls():
    model, sigmas, x, extra = _gaussian_case()
    policy = calibrate(model, "euler", sigmas, x, extra, nfe=6, seconds=1e-9, disable=True, method="greedy")
    assert policy.calls == 6 and policy.provenance["exact_rounds"] == 1
    full = calibrate(model, "euler", sigmas, x, extra, nfe=6, disable=True, method="proxy")
    short = calibrate(model, "euler", sigmas, x, extra, nfe=6, seconds=1e-9, disable=True, method="proxy")
    assert short.calls == full.calls == 6
    # the seconds-bound search: the full run and one observation
    assert short.provenance["full_run_equivalents"] == 2.0 < full.provenance["full_run_equivalents"] <= proxy_runs(1)


def test_the_proxy_keeps_the_best_mask_it_observed_and_counts_its_runs():
    """The proxy observes one mask per gain scale (then fits the gain, then refines): the mask it returns
    costs no more, on the calibration latents, than the one any single scale finds, and its
    row-evaluations are the full run plus one run per mask observed, at most proxy_runs(iterations)."""
    model = DigitsOptimalDenoiser()
    sigmas = get_sigmas_karras(20, 0.05, 20.0)
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 20.0
    y = {"y": torch.tensor([0, 3, 7])}
    reference, _ = sample_euler(model, x, sigmas, y, disable=True)

    def cost(path):
        out, report = sample_euler(model, x, sigmas, y, disable=True, skip=FixedMask(path.mask(8), reuse=Extrapolate(1)))
        assert (report.nfe == 8).all()
        return float(((out - reference) ** 2).sum())

    path, ref, info = proxy_path(sample_euler, model, x, sigmas, 8, y, reuse=Extrapolate(1))
    assert torch.equal(ref, reference)
    assert path.evaluations == (1 + info["observed"]) * 3 * 20
    assert 1 <= info["observed"] <= proxy_runs(1) - 1 and (info["gain"] in GAIN_SCALES or info["gain"] == "fitted")
    best = cost(path)
    for scale in GAIN_SCALES:
        single, _, one = proxy_path(sample_euler, model, x, sigmas, 8, y, reuse=Extrapolate(1), scales=(scale,), fits=0, iterations=0)
        assert one["observed"] == 1
        assert best <= cost(single) * (1 + 1e-9), scale


def _fit_case(seed: int, steps: int, skip_from: int):
    """Random eps tables of 3 masks skipping alternate steps from ``skip_from`` on, and the hat basis."""
    g = torch.Generator().manual_seed(seed)
    sigmas = get_sigmas_karras(steps, 0.02, 20.0).double().numpy()
    masks = []
    for phase in range(3):
        mask = np.ones(steps, dtype=bool)
        mask[skip_from + phase :: 3] = False
        mask[0] = True
        masks.append(mask)
    tables = [torch.randn(steps, 2, 5, dtype=torch.float64, generator=g) for _ in masks]
    return sigmas, masks, tables, _hat_basis(sigmas, 4)


def _observations(sigmas, masks, tables, gain, reference):
    """Each mask's output as the proxy models it exactly: reference + sum_k gain_k * (-|dsigma| (eps_hat - E))."""
    observed = []
    for mask, table in zip(masks, tables):
        proxy = _Proxy(table, sigmas, True, gain)
        out = reference - proxy.errors(mask, range(len(mask)))
        observed.append({"mask": mask, "table": table, "out": out})
    return observed


@given(st.integers(0, 2**31 - 1), st.integers(12, 30), st.lists(st.floats(0.05, 2.0), min_size=4, max_size=4))
def test_the_fitted_gain_recovers_a_gain_the_observations_follow(seed, steps, knot_gains):
    """Outputs made exactly as the proxy models them, with a gain piecewise linear in log sigma on the
    fit's own knots: the fit returns that gain (within 0.01: the ridge pulls weakly informed knots toward the prior)."""
    sigmas, masks, tables, phi = _fit_case(seed, steps, skip_from=1)
    true_gain = phi @ np.array(knot_gains)
    reference = torch.randn(2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    observed = _observations(sigmas, masks, tables, true_gain, reference)
    fitted = fit_gain(observed, sigmas, True, reference, prior=np.ones(steps), knots=4)
    np.testing.assert_allclose(fitted, true_gain, rtol=0, atol=0.01)


def test_the_fitted_gain_keeps_the_prior_where_no_skip_informs_it():
    """Masks that never skip the first half of the grid say nothing of the gain at high sigma: there the
    fit keeps the prior (the best mask's gain) instead of an arbitrary value, and is >= 1e-3."""
    steps = 24
    sigmas, masks, tables, phi = _fit_case(3, steps, skip_from=steps * 3 // 4)
    informed = phi[[k for m in masks for k in np.flatnonzero(~m)]].sum(0) > 0
    assert not informed.all() and informed.any()
    reference = torch.zeros(2, 5, dtype=torch.float64)
    observed = _observations(sigmas, masks, tables, np.full(steps, 0.3), reference)
    prior = np.full(steps, 0.8)
    fitted = fit_gain(observed, sigmas, True, reference, prior=prior, knots=4)
    pure = phi[:, ~informed].sum(1) > 1 - 1e-12  # steps whose sigma lies only on uninformed knots
    assert pure.any()
    np.testing.assert_allclose(fitted[pure], 0.8, rtol=1e-3)
    assert (fitted >= 1e-3).all()


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda s: Calibrated(s, np.zeros(16, bool)), "mask\\[0\\] must be True"),
        (lambda s: Calibrated(s, np.ones(15, bool)), "mask must be shaped"),
        (lambda s: Calibrated(s, np.ones(16, bool), sampler="heun"), "sampler must be one of"),
        (lambda s: Calibrated(s, np.ones(16, bool), sampler="euler", merge_skipped=True), "merge_skipped"),
        (lambda s: Calibrated(s, np.ones(16, bool), nfe=0), "nfe must be an int"),
        (lambda s: Calibrated(s.flip(0), np.ones(16, bool)), "strictly decreasing"),
        (lambda s: Calibrated(s, np.ones(16, bool), refine=FixedMask([1])), "refine must be a LocalError"),
    ],
)
def test_bad_calibrated_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make(get_sigmas_karras(16, 0.03, 14.6))


def test_nfe_larger_than_the_grid_is_refused():
    policy = Calibrated(get_sigmas_karras(16, 0.03, 14.6), np.ones(16, bool), nfe=12)
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="nfe=12 calls do not fit a grid of 8 steps"):
        sample_euler(lambda x, s: x * 0, x, get_sigmas_karras(8, 0.03, 14.6), disable=True, skip=policy)
