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
proxy weighs an error entering the latent at sigma by the gain c / sqrt(c^2 + sigma^2) (exact, with
c the data's std, for Gaussian data; c = inf: every error arrives whole) and does not guess c: it
runs the proxy's greedy once per candidate scale (``GAIN_SCALES`` times the full-step output's std)
on the full run's table and observes each resulting mask, whose output, against the full run's, is
the mask's TRUE cost. Then ``iterations`` refinement rounds re-run the greedy of the best mask so far
on that mask's own table (the eps along a trajectory that skips; observed as well), and the best
mask observed is kept. A mask observed already is not run again. Cost: the full run and at most
``len(GAIN_SCALES) + iterations`` observations, each a full run's worth of calls: at most
``proxy_runs(iterations)`` = 9 runs by default, fewer when candidates coincide.
Why several scales (bench/results/calibration_cost.md): on the shapes UNet the Gaussian gain
(c = the data's std) underrated high-sigma errors some 20-fold and chose masks 3 to 6 dB worse than
the greedy search's; on the digits MLP, c = inf chose far worse ones. No one scale suited every
model; measuring which one does costs one run per scale.
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

__all__ = ["proxy_path", "observe", "proxy_runs", "GAIN_SCALES"]

# Candidate gain scales c, in units of the full-step output's std (module docstring); inf: gain 1.
GAIN_SCALES = (0.5, 1.0, 2.0, 5.0, 20.0, math.inf)


def proxy_runs(iterations: int, scales: tuple = GAIN_SCALES) -> int:
    """The most sampling runs of the calibration batch the proxy search costs: the full run, one
    observation per gain scale, one per refinement round."""
    return 1 + len(scales) + iterations


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
    squared norm of the SUM of the skipped steps' local error vectors (errors of opposite sign may
    cancel, as they do in the output), summed over the samples."""

    def __init__(self, table: torch.Tensor, sigmas_ve: np.ndarray, linear: bool, scale: float) -> None:
        self.table = table  # [N, B, D]
        with np.errstate(divide="ignore"):
            self.t = np.log(sigmas_ve[:-1])
        # the step's error enters the latent at sigma_{k+1} and reaches the output scaled by
        # c / sqrt(c^2 + sigma_{k+1}^2) (exact for Gaussian data of std c); c = inf: whole
        if math.isinf(scale):
            gain = np.ones(len(sigmas_ve) - 1)
        else:
            with np.errstate(invalid="ignore"):
                gain = np.nan_to_num(scale / np.sqrt(scale**2 + sigmas_ve[1:] ** 2))
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
               iterations: int = 2, scales: tuple = GAIN_SCALES, progress: Callable[[int], None] | None = None,
               seconds: float | None = None) -> tuple[GreedyPath, torch.Tensor, dict]:  # fmt: skip
    """The proxy search (module docstring). Returns (the removal order of the best mask observed as a
    ``GreedyPath``, the full-step output of the calibration latents, a dict with the chosen gain
    ``scale`` (in units of the output's std) and the masks ``observed``). ``seconds``: once spent, no
    further observation starts (the full run and the first observation always run). ``progress``
    gets one tick per planned observation (``len(scales) + iterations``), run or not."""
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
    observed: list[dict] = []  # per mask run: its true cost, removal order, own table, gain scale

    def try_mask(table: torch.Tensor, scale: float) -> bool:
        """Greedy on the proxy of ``table`` at ``scale``; observe the mask unless seen. False: seen."""
        nonlocal spent
        order = _Proxy(table, sigmas_ve, linear, std * scale).greedy(n, min_calls, warmup)
        mask = np.ones(n, dtype=bool)
        mask[order[: n - min_calls]] = False
        if any((o["mask"] == mask).all() for o in observed):
            return False
        if observed and seconds is not None and time.perf_counter() - started > seconds:
            return False
        own, used, out = observe(sample, model, x, sigmas, extra_args, mask, r, conv)
        spent += used
        cost = float(((out - reference).double() ** 2).sum())
        observed.append({"cost": cost, "order": order, "mask": mask, "table": own, "scale": scale})
        return True

    for scale in scales:
        try_mask(full_table, scale)
        if progress is not None:
            progress(1)
    for i in range(iterations):
        best = min(observed, key=lambda o: o["cost"])
        new = try_mask(best["table"], best["scale"])
        if progress is not None:
            progress(1 if new else iterations - i)
        if not new:  # the same table and scale give the same mask again: nothing left to refine
            break
    best = min(observed, key=lambda o: o["cost"])
    path = GreedyPath(n, [best["order"]], [0], spent, True, time.perf_counter() - started)
    info = {"scale": best["scale"], "observed": len(observed)}
    return path, reference, info
