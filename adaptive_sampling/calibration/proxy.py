"""A calibration search that costs a few sampling runs instead of hundreds: greedy on an error proxy.

The greedy path (``greedy.py``) re-runs the tail of the trajectory for every candidate drop of
every round: about N / 2 full runs of the calibration batch per round, hundreds in all. This
search measures instead. One *observation run* follows a mask and also evaluates the model at the
skipped steps (a full run's worth of calls), which gives the true eps E_k at every step of that
trajectory. From that table alone the local error of skipping step k is known for any mask:

    LE_k(mask) = |sigma_{k+1} - sigma_k| * || eps_hat_k(mask) - E_k ||

where ``eps_hat_k`` is what the reuse would give at k (the last computed eps, or the linear
forecast in log sigma through the last two computed ones, exactly as ``Extrapolate(1)`` forms it);
every solver here moves the latent by ``(sigma_next - sigma) * eps`` to first order, so LE_k is the
step's error. The proxy cost of a mask is, per calibration sample, the squared norm of the sum of
its skipped steps' error vectors (errors of opposite sign cancel in the output as they do here),
summed over the samples, and a greedy elimination on it (drop the call whose removal least
increases the cost; a drop changes the forecasts of the next skipped steps too) needs no model
call at all.

How much of a step's error reaches the output is the one thing the table does not say. The
proxy weighs an error entering the latent at sigma by a gain g(sigma) and measures it, in two ways:

1. *Gain scales.* g = c / sqrt(c^2 + sigma^2) (exact, with c the data's std, for Gaussian data;
   c = inf: every error arrives whole), once per candidate ``GAIN_SCALES`` (times the full-step
   output's std): the proxy greedy on the full run's table, each resulting mask observed; its
   output, against the full run's, is the mask's TRUE cost.
2. *A fitted gain curve* (``fit_gain``, ``fits`` rounds). Every observed mask also says how its
   local errors added up: to first order its output error is sum_k J_k e_k, the local error e_k
   of each skipped step carried to the output by the full-step sampler's Jacobian J_k, which the
   proxy models as g(sigma_{k+1}) times the identity. A least-squares fit of that sum to the
   measured output errors of every mask observed so far (g piecewise linear in log sigma,
   ``GAIN_KNOTS`` knots; no model call) gives the curve; the greedy on the best mask's own table
   with it is observed.

Then ``iterations`` refinement rounds re-run the greedy of the best mask so far with its own gain
on that mask's own table (the eps along a trajectory that skips; observed as well), and the best
mask observed is kept. A mask observed already is not run again. Cost: the full run and at most
``len(GAIN_SCALES) + fits + iterations`` observations, each a full run's worth of calls: at most
``proxy_runs(iterations)`` = 10 runs by default, fewer when candidates coincide.
Why (validation split; bench/results/calibration_cost.md): on the shapes UNet the Gaussian gain
(c = the data's std) underrated high-sigma errors some 20-fold and chose masks 3 to 6 dB worse than
the greedy search's; on the digits MLP, c = inf chose far worse ones. No one scale suited every
model, hence the scales; the one-parameter family still missed the greedy schedule by 1 to 3.7 dB
at K = 20-30 of 50 with DPM-Solver++ on both models; with the fitted curve 14 of 16 validation
cells are within 1 dB of greedy (11 of 16 with the scales alone).
Measured against the greedy search on held-out prompts in ``docs/calibration.md`` / ``bench/results/calibration_cost.md``.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
import torch

from ..conventions import get_convention
from ..policies import FixedMask
from ..policies.reuse import Copy, Extrapolate, make_reuse
from ..runner import slice_rows
from .greedy import GreedyPath

__all__ = ["proxy_path", "observe", "proxy_runs", "fit_gain", "GAIN_SCALES", "GAIN_KNOTS", "FIT_ROUNDS"]

# Candidate gain scales c, in units of the full-step output's std (module docstring); inf: gain 1.
GAIN_SCALES = (0.5, 1.0, 2.0, 5.0, 20.0, math.inf)
GAIN_KNOTS = 10  # knots of the fitted gain curve, evenly spaced in log sigma over the grid
RIDGE = 1e-6  # of the fit's mean diagonal, toward the best mask's gain: fills knots no observed skip informs
FIT_ROUNDS = 2  # observations of masks chosen with the fitted gain curve


def proxy_runs(iterations: int, scales: tuple = GAIN_SCALES, fits: int = FIT_ROUNDS) -> int:
    """The most sampling runs of the calibration batch the proxy search costs: the full run, one
    observation per gain scale, one per gain fit, one per refinement round."""
    return 1 + len(scales) + fits + iterations


def gaussian_gain(sigmas_ve: np.ndarray, c: float) -> np.ndarray:
    """[N] gain of an error entering at sigma_{k+1}: c / sqrt(c^2 + sigma^2) (1 where c = inf)."""
    if math.isinf(c):
        return np.ones(len(sigmas_ve) - 1)
    with np.errstate(invalid="ignore"):
        return np.nan_to_num(c / np.sqrt(c**2 + sigmas_ve[1:] ** 2))


def _hat_basis(sigmas_ve: np.ndarray, knots: int) -> np.ndarray:
    """[N, knots] piecewise-linear hat functions of log sigma_{k+1} (sigma = 0 taken as the smallest
    positive sigma of the grid), knots evenly spaced over the grid: rows sum to 1."""
    s = sigmas_ve[1:]
    with np.errstate(divide="ignore"):
        u = np.log(np.where(s > 0, s, s[s > 0].min()))
    u = np.clip(u, None, u[np.isfinite(u)].max())
    grid = np.linspace(u.min(), u.max(), knots)
    if knots == 1 or grid[-1] == grid[0]:
        return np.ones((len(u), 1))
    pos = np.clip((u - grid[0]) / (grid[1] - grid[0]), 0, knots - 1)
    lo = np.minimum(pos.astype(int), knots - 2)
    frac = pos - lo
    phi = np.zeros((len(u), knots))
    phi[np.arange(len(u)), lo] = 1 - frac
    phi[np.arange(len(u)), lo + 1] += frac
    return phi


def fit_gain(observed: list[dict], sigmas_ve: np.ndarray, linear: bool, reference: torch.Tensor,
             prior: np.ndarray, knots: int = GAIN_KNOTS) -> np.ndarray:  # fmt: skip
    """[N] gain curve fitted to the observed masks (module docstring, 2.).

    ``observed``: dicts with the mask, its own ``table`` and its ``out``put. Least squares of
    ``out - reference`` (every sample and value of every mask) on the masks' local errors summed
    per knot of the hat basis. The latent moves by (sigma_{k+1} - sigma_k) eps, so an error enters
    as ``-|dsigma| (eps_hat - E)``. A ridge (``RIDGE`` of the mean diagonal) pulls coefficients that no
    observed skip informs toward ``prior`` (the best mask's gain); the gain is kept >= 1e-3."""
    phi = _hat_basis(sigmas_ve, knots)
    gram = np.zeros((knots, knots))
    rhs = np.zeros(knots)
    for o in observed:
        proxy = _Proxy(o["table"], sigmas_ve, linear, np.ones(len(phi)))
        computed = np.flatnonzero(o["mask"])
        features = torch.zeros(knots, *o["table"].shape[1:], dtype=torch.float64)  # [knots, B, D]
        for k in np.flatnonzero(~o["mask"]):
            before = computed[computed < k]
            e = -proxy.error(int(k), int(before[-1]), int(before[-2]) if len(before) > 1 else None)
            for j in np.flatnonzero(phi[k]):
                features[j] += phi[k, j] * e
        a = features.reshape(knots, -1)
        gram += (a @ a.T).numpy()
        rhs += (a @ (o["out"] - reference).double().reshape(-1)).numpy()
    prior_knots = np.linalg.lstsq(phi, prior, rcond=None)[0]
    ridge = RIDGE * max(float(np.trace(gram)) / knots, 1e-300)
    coef = np.linalg.solve(gram + ridge * np.eye(knots), rhs + ridge * prior_knots)
    return np.clip(phi @ coef, 1e-3, None)


@torch.no_grad()
def observe(sample: Callable, model: Callable, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None,
            mask: np.ndarray, reuse, convention) -> tuple[torch.Tensor, int, torch.Tensor]:  # fmt: skip
    """The true eps [N, B, D] (float64) at every step of the trajectory that ``mask`` (with ``reuse``)
    produces, the model row-evaluations spent (the computed rows' own calls plus one extra call at
    each skipped step on the rows that skip it) and the trajectory's output."""
    extra_args = extra_args or {}
    B, n = x.shape[0], len(sigmas) - 1
    table = torch.zeros(n, B, x[0].numel(), dtype=torch.float64)
    spent = [0]

    def callback(info: dict) -> None:
        i, xi, den = info["i"], info["x"], info["denoised"]
        sigma = xi.new_full((B,), float(info["sigma"]))
        den = den.clone()
        skipped = torch.from_numpy(~info["computed"].numpy()).nonzero().reshape(-1)
        if len(skipped):
            rows = skipped.to(xi.device)
            den[rows] = model(xi[rows], sigma[rows], **slice_rows(extra_args, rows, B))
        spent[0] += B
        table[i] = convention.to_eps(xi, sigma, den).reshape(B, -1).double().cpu()

    out, _ = sample(model, x, sigmas, extra_args, callback, True, skip=FixedMask(mask, reuse=reuse))
    return table, spent[0], out


def _forecast_weights(t: np.ndarray, k: int, a: int, b: int | None, linear: bool) -> tuple[float, float]:
    """(w_a, w_b) with eps_hat_k = w_a E_a + w_b E_b: the copy, or the line through (t_a, E_a), (t_b, E_b)."""
    if not linear or b is None or not np.isfinite(t[b]) or not np.isfinite(t[a]):
        return 1.0, 0.0
    w = (t[k] - t[a]) / (t[a] - t[b])
    return 1.0 + w, -w


class _Proxy:
    """The proxy cost of masks on one observed table (module docstring): per calibration sample, the
    squared norm of the SUM of the skipped steps' local error vectors, each weighted by the gain
    ``gain[k]`` with which an error entering at sigma_{k+1} reaches the output (errors of opposite
    sign may cancel, as they do in the output), summed over the samples."""

    def __init__(self, table: torch.Tensor, sigmas_ve: np.ndarray, linear: bool, gain: np.ndarray) -> None:
        self.table = table  # [N, B, D]
        with np.errstate(divide="ignore"):
            self.t = np.log(sigmas_ve[:-1])
        with np.errstate(invalid="ignore"):
            self.h = np.abs(np.diff(sigmas_ve)) * gain
        self.linear = linear
        self._cache: dict[tuple, torch.Tensor] = {}

    def error(self, k: int, a: int, b: int | None) -> torch.Tensor:
        """[B, D] local error vector of skipping k with computed nodes a (and b)."""
        key = (k, a, b)
        if key not in self._cache:
            wa, wb = _forecast_weights(self.t, k, a, b, self.linear)
            eps_hat = wa * self.table[a] + (wb * self.table[b] if wb else 0.0)
            self._cache[key] = self.h[k] * (eps_hat - self.table[k])
        return self._cache[key]

    def errors(self, mask: np.ndarray, steps) -> torch.Tensor:
        """[B, D] summed local errors of the skipped steps of ``mask`` among ``steps``."""
        total = torch.zeros_like(self.table[0])
        computed = np.flatnonzero(mask)
        for k in steps:
            if mask[k]:
                continue
            before = computed[computed < k]
            total = total + self.error(k, int(before[-1]), int(before[-2]) if len(before) > 1 else None)
        return total

    def greedy(self, n: int, min_calls: int, warmup: int) -> list[int]:
        """The removal order from the full mask down to ``min_calls`` calls."""
        mask = np.ones(n, dtype=bool)
        order: list[int] = []
        current = torch.zeros_like(self.table[0])  # [B, D] summed error of the current mask
        while mask.sum() > min_calls:
            best, best_cost, best_sum = None, np.inf, None
            computed = np.flatnonzero(mask)
            for c in computed[computed >= warmup]:
                later = computed[computed > c]
                stop = int(later[1]) if len(later) > 1 else n  # forecasts up to the second computed step after c change
                span = range(int(c), stop)
                trial = mask.copy()
                trial[c] = False
                new_sum = current - self.errors(mask, span) + self.errors(trial, span)
                cost = float((new_sum * new_sum).sum())
                if cost < best_cost:
                    best, best_cost, best_sum = int(c), cost, new_sum
            if best is None:
                break
            mask[best] = False
            order.append(best)
            current = best_sum
        return order


def proxy_path(sample: Callable, model: Callable, x: torch.Tensor, sigmas: torch.Tensor, min_calls: int,
               extra_args: dict | None = None, *, warmup: int = 4, reuse="copy", convention: str = "ve",
               iterations: int = 1, scales: tuple = GAIN_SCALES, fits: int = FIT_ROUNDS,
               progress: Callable[[int], None] | None = None, seconds: float | None = None,
               ) -> tuple[GreedyPath, torch.Tensor, dict]:  # fmt: skip
    """The proxy search (module docstring). Returns (the removal order of the best mask observed as a
    ``GreedyPath``, the full-step output of the calibration latents, a dict with the ``gain`` that chose
    the best mask (a scale, in units of the output's std, or ``"fitted"``) and the number of masks
    ``observed``). ``seconds``: once spent, no further observation starts (the full run and the first
    observation always run). ``progress`` gets one tick per planned observation
    (``len(scales) + fits + iterations``), run or not."""
    r = make_reuse(reuse)
    if not isinstance(r, (Copy, Extrapolate)) or (isinstance(r, Extrapolate) and (r.order != 1 or r.variable != "log_sigma")):
        raise ValueError(f"the proxy search models reuse='copy' and Extrapolate(1) in log sigma, got {reuse!r}; use method='greedy'")
    conv = get_convention(convention)
    host = torch.as_tensor(sigmas).detach().to("cpu", torch.float64)
    sigmas_ve = conv.ve_sigmas(host).numpy()
    n = len(host) - 1
    started = time.perf_counter()
    linear = isinstance(r, Extrapolate)
    full_table, spent, reference = observe(sample, model, x, sigmas, extra_args, np.ones(n, dtype=bool), r, conv)  # the full run
    std = float(reference.double().std())
    observed: list[dict] = []  # per mask run: its true cost, removal order, own table and output, gain, label

    def try_mask(table: torch.Tensor, gain: np.ndarray, label) -> bool:
        """Greedy on the proxy of ``table`` with ``gain``; observe the mask unless seen. False: not run."""
        nonlocal spent
        order = _Proxy(table, sigmas_ve, linear, gain).greedy(n, min_calls, warmup)
        mask = np.ones(n, dtype=bool)
        mask[order[: n - min_calls]] = False
        if any((o["mask"] == mask).all() for o in observed):
            return False
        if observed and seconds is not None and time.perf_counter() - started > seconds:
            return False
        own, used, out = observe(sample, model, x, sigmas, extra_args, mask, r, conv)
        spent += used
        cost = float(((out - reference).double() ** 2).sum())
        observed.append({"cost": cost, "order": order, "mask": mask, "table": own, "out": out, "gain": gain, "label": label})
        return True

    def tick(planned: int) -> None:
        if progress is not None:
            progress(planned)

    for scale in scales:
        try_mask(full_table, gaussian_gain(sigmas_ve, std * scale), scale)
        tick(1)
    for i in range(fits):
        best = min(observed, key=lambda o: o["cost"])
        gain = fit_gain(observed, sigmas_ve, linear, reference, best["gain"])
        if not try_mask(best["table"], gain, "fitted") and not try_mask(full_table, gain, "fitted"):
            tick(fits - i)  # the fit reproduces masks already seen: more data will not come
            break
        tick(1)
    for i in range(iterations):
        best = min(observed, key=lambda o: o["cost"])
        new = try_mask(best["table"], best["gain"], best["label"])
        tick(1 if new else iterations - i)
        if not new:  # the same table and gain give the same mask again: nothing left to refine
            break
    best = min(observed, key=lambda o: o["cost"])
    path = GreedyPath(n, [best["order"]], [0], spent, True, time.perf_counter() - started)
    return path, reference, {"gain": best["label"], "observed": len(observed)}
