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

Errors are weighted by how a perturbation at sigma reaches the output for data of the output's
scale s (s / sqrt(s^2 + sigma^2), exact for Gaussian data). The proxy still reads eps off a
trajectory that drifts as calls are dropped, so the search iterates: the greedy's mask is
observed (its table feeds the next greedy; its output, against the full run's, is the mask's TRUE
cost) and the best mask observed is kept. The full run plus ``iterations + 1`` observations cost
``iterations + 2`` runs' worth of model calls (5 by default).
Measured against the greedy search on held-out prompts in ``docs/tune.md`` / ``bench/results/calibration_cost.md``.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

from ..conventions import get_convention
from ..policies import FixedMask
from ..policies.reuse import Copy, Extrapolate, make_reuse
from ..runner import slice_rows
from .greedy import GreedyPath

__all__ = ["proxy_path", "observe"]


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

    def __init__(self, table: torch.Tensor, sigmas_ve: np.ndarray, linear: bool, data_std: float) -> None:
        self.table = table  # [N, B, D]
        with np.errstate(divide="ignore"):
            self.t = np.log(sigmas_ve[:-1])
        # the step's error enters the latent at sigma_{k+1}; for data of std s it reaches the output
        # scaled by s / sqrt(s^2 + sigma_{k+1}^2) (the exact factor for Gaussian data)
        with np.errstate(invalid="ignore"):
            gain = data_std / np.sqrt(data_std**2 + sigmas_ve[1:] ** 2)
        self.h = np.abs(np.diff(sigmas_ve)) * np.nan_to_num(gain)
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
               iterations: int = 3, progress: Callable[[int], None] | None = None,
               seconds: float | None = None) -> tuple[GreedyPath, torch.Tensor]:  # fmt: skip
    """The proxy search (module docstring). Returns (the shared removal order as a ``GreedyPath``,
    the full-step output of the calibration latents: the first observation run). ``seconds``: once
    spent, no further refinement round starts (the first one always runs)."""
    r = make_reuse(reuse)
    if not isinstance(r, (Copy, Extrapolate)) or (isinstance(r, Extrapolate) and (r.order != 1 or r.variable != "log_sigma")):
        raise ValueError(f"the proxy search models reuse='copy' and Extrapolate(1) in log sigma, got {reuse!r}; use method='greedy'")
    conv = get_convention(convention)
    host = torch.as_tensor(sigmas).detach().to("cpu", torch.float64)
    sigmas_ve = conv.ve_sigmas(host).numpy()
    n = len(host) - 1
    started = time.perf_counter()
    linear = isinstance(r, Extrapolate)
    table, spent, reference = observe(sample, model, x, sigmas, extra_args, np.ones(n, dtype=bool), r, conv)  # the full run
    data_std = float(reference.double().std())
    target = np.ones(n, dtype=bool)
    best: tuple[float, list[int]] | None = None
    for i in range(iterations + 1):
        if i > 0 and seconds is not None and time.perf_counter() - started > seconds:
            break
        order = _Proxy(table, sigmas_ve, linear, data_std).greedy(n, min_calls, warmup)
        target = np.ones(n, dtype=bool)
        target[order[: n - min_calls]] = False
        # observe the new mask's trajectory: its table feeds the next greedy, its output says what
        # the mask really costs (the best of the masks observed is kept)
        table, used, out = observe(sample, model, x, sigmas, extra_args, target, r, conv)
        spent += used
        actual = float(((out - reference).double() ** 2).sum())
        if best is None or actual < best[0]:
            best = (actual, order)
        if progress is not None:
            progress(1)
    order = best[1]
    path = GreedyPath(n, [order], [0], spent, True, time.perf_counter() - started)
    return path, reference
