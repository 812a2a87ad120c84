"""Calibration: search a skip schedule (or a shorter grid) offline on a few samples, then fix it.

    from adaptive_sampling import calibrate, sample_dpmpp_2m
    policy = calibrate(model, "dpmpp_2m", sigmas, x_cal, extra_args={"y": y_cal}, nfe=25)
    policy.save("dpmpp_25.json")                      # Calibrated.load("dpmpp_25.json") later
    x, report = sample_dpmpp_2m(model, x_new, sigmas, extra_args={"y": y_new}, skip=policy)

The greedy oracle path (``calibration.greedy.greedy_path``: drop, one call at a time, the call whose
removal moves the final output least) needs the full-step output of the very sample, so it is an
oracle. Its schedules follow the sigma grid far more than the sample, which makes a schedule
searched on a few calibration samples a good fixed schedule for others (the idea behind
BudCache, LeMiCa, Align Your Steps, GITS and cache-dit's step masks). Two ways to turn the
calibration samples into ONE schedule (``aggregate``):

* ``"mean_error"``: one shared greedy path, each round dropping the call whose removal least
  increases the squared error summed over the calibration samples;
* ``"frequency"``: each sample's own greedy path; the schedule keeps the K steps kept by the
  most samples at K calls (ties: the step the samples dropped later on average).

``calibration_path`` runs the search once and serves every K down to its ``min_calls`` (the
mean-error path is nested); ``calibrate`` is the one-K shortcut.

``as_grid=True`` returns the K-point sub-grid instead of a policy: DPM-Solver++(2M) or Euler /
DDIM run on it WITHOUT skipping (an optimised step schedule, like Align Your Steps). It is
searched as skipping with the reuse that makes a skip path exactly the sub-grid: a copied eps for
Euler and DDIM (a skipped call there is one step of double length) and the merge mode for
DPM-Solver++ (``merge_skipped=True``: the mask is exactly DPM-Solver++ on its sub-grid).
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..checks import check_int, check_latent, check_sigmas
from ..conventions import get_convention
from ..policies.calibrated import Calibrated
from ..policies.reuse import Copy, Extrapolate, Reuse, make_reuse, reuse_to_dict
from ..progress import Bar
from ..samplers.registry import get_sampler
from .greedy import GreedyPath, greedy_path
from .proxy import proxy_path, proxy_runs

__all__ = ["calibrate", "calibration_path", "CalibrationPath", "AGGREGATES", "METHODS", "DEFAULT_REUSE"]

AGGREGATES = ("mean_error", "frequency")
# What skipped calls get in a calibrated schedule unless told otherwise: the linear eps forecast,
# which won over the copied eps in the calibration study (bench/results/calibration.md).
DEFAULT_REUSE = Extrapolate(1)


@dataclass
class CalibrationPath:
    """The result of one calibration search: schedules for every K in ``[min_calls, N]``.

    ``policy(k)`` the ``Calibrated`` policy at k calls, ``mask(k)`` its [N] mask, ``grid(k)`` the
    k-point sub-grid (k computed sigmas and the final one) for sampling without skipping.
    """

    sigmas: torch.Tensor
    sampler: str
    reuse: Reuse | str
    merge_skipped: bool
    aggregate: str
    greedy: GreedyPath
    provenance: dict

    @property
    def min_calls(self) -> int:
        return max(self.greedy.min_calls(b) for b in range(len(self.greedy.order)))

    def mask(self, k: int) -> np.ndarray:
        n = len(self.sigmas) - 1
        check_int("k", k, self.min_calls, n)
        if self.aggregate == "mean_error":
            return self.greedy.mask(k)
        kept = self.greedy.masks(k)  # [B, N] each calibration sample's own path at k calls
        rank = np.full(kept.shape, len(self.sigmas), dtype=np.float64)  # a never-dropped step ranks last
        for b, order in enumerate(self.greedy.order):
            rank[b, order] = np.arange(len(order))
        score = kept.sum(axis=0) + rank.mean(axis=0) / (len(self.sigmas) + 1)  # count, then later-dropped first
        mask = np.zeros(n, dtype=bool)
        mask[np.argsort(-score, kind="stable")[:k]] = True
        mask[0] = True  # always kept by every sample, so always among the top k
        return mask

    def policy(self, k: int) -> Calibrated:
        prov = {**self.provenance, "calls": k}
        sigmas = get_convention(get_sampler(self.sampler).convention).ve_sigmas(self.sigmas.detach().cpu())
        return Calibrated(sigmas, self.mask(k), self.sampler, self.reuse, self.merge_skipped, provenance=prov)

    def grid(self, k: int) -> torch.Tensor:
        """The k computed sigmas of ``mask(k)`` and the grid's final sigma: a (k + 1)-point grid."""
        keep = torch.from_numpy(np.append(self.mask(k), True))
        return self.sigmas[keep.to(self.sigmas.device)]


@torch.no_grad()
def calibration_path(
    model: Callable[..., torch.Tensor],
    sampler: str,
    sigmas: torch.Tensor,
    x: torch.Tensor,
    extra_args: dict | None = None,
    *,
    min_calls: int,
    reuse: Reuse | str = DEFAULT_REUSE,
    merge_skipped: bool = False,
    aggregate: str = "mean_error",
    warmup: int = 4,
    seconds: float | None = None,
    disable: bool | None = None,
    method: str | None = None,
    iterations: int = 1,
) -> CalibrationPath:
    """Run the calibration search once, down to ``min_calls`` calls per sample (see ``calibrate``)."""
    entry = get_sampler(sampler, runnable=True)
    sampler = entry.name
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
    if not isinstance(merge_skipped, bool) or (merge_skipped and not entry.multistep):
        raise ValueError("merge_skipped must be a bool, and True only for a multistep sampler such as 'dpmpp_2m'")
    if merge_skipped and "merge_skipped" not in inspect.signature(entry.sample).parameters:
        raise ValueError(f"merge_skipped=True needs a loop that takes merge_skipped; {sampler!r}'s does not")
    check_latent(x)
    host = check_sigmas(sigmas)
    n = len(host) - 1
    check_int("warmup", warmup, 1, n)
    check_int("min_calls", min_calls, warmup, n)
    method = _method(method, merge_skipped, aggregate, make_reuse(reuse))
    check_int("iterations", iterations, 0)
    if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0):
        raise ValueError(f"seconds must be > 0 or None, got {seconds!r}")
    sample = entry.sample
    kwargs = {"merge_skipped": True} if merge_skipped else {}
    started = time.perf_counter()
    notes = {}
    if method == "proxy":
        with Bar(proxy_runs(iterations) - 1, f"calibrate {sampler} (proxy)", disable) as bar:  # after the full run
            path, _, info = proxy_path(sample, model, x, sigmas, min_calls, extra_args, warmup=warmup, reuse=reuse,
                                       convention=entry.convention, iterations=iterations, progress=bar.update,
                                       seconds=seconds)  # fmt: skip
        notes = {"proxy_gain": info["gain"], "proxy_masks_observed": info["observed"]}
    else:
        reference, _ = sample(model, x, sigmas, extra_args, disable=True)
        with Bar(n - min_calls, f"calibrate {sampler} (greedy)", disable) as bar:
            path = greedy_path(sample, model, x, sigmas, reference, min_calls, extra_args, warmup=warmup,
                               shared=aggregate == "mean_error", reuse=reuse, sampler_kwargs=kwargs,
                               seconds=seconds, progress=bar.update)  # fmt: skip
        path.evaluations += int(x.shape[0]) * n  # the reference run
    provenance = {
        "sampler": sampler,
        "method": method,
        "aggregate": aggregate,
        "calibration_samples": int(x.shape[0]),
        "steps": n,
        "warmup": warmup,
        "reuse": reuse_to_dict(reuse),
        "merge_skipped": merge_skipped,
        "model_row_evaluations": int(path.evaluations),
        "full_run_equivalents": round(path.evaluations / (int(x.shape[0]) * n), 2),
        "seconds": round(time.perf_counter() - started, 3),
        "exact_rounds": int(min(path.exact)),
        **notes,
    }
    return CalibrationPath(torch.as_tensor(sigmas), sampler, reuse, merge_skipped, aggregate, path, provenance)


METHODS = ("proxy", "greedy")


def _method(method: str | None, merge_skipped: bool, aggregate: str, r: Reuse) -> str:
    """The search: ``proxy`` (a few runs) where it models the setting, else ``greedy``."""
    proxy_ok = (not merge_skipped and aggregate == "mean_error"
                and (isinstance(r, Copy) or (isinstance(r, Extrapolate) and r.order == 1 and r.variable == "log_sigma")))  # fmt: skip
    if method is None:
        return "proxy" if proxy_ok else "greedy"
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS} or None, got {method!r}")
    if method == "proxy" and not proxy_ok:
        raise ValueError(
            "method='proxy' models the mean-error aggregate with reuse='copy' or Extrapolate(1) in log sigma, without "
            "merge_skipped; use method='greedy' for this setting"
        )
    return method


def calibrate(
    model: Callable[..., torch.Tensor],
    sampler: str,
    sigmas: torch.Tensor,
    x: torch.Tensor,
    extra_args: dict | None = None,
    *,
    nfe: int,
    reuse: Reuse | str | None = None,
    merge_skipped: bool = False,
    aggregate: str = "mean_error",
    as_grid: bool = False,
    warmup: int = 4,
    seconds: float | None = None,
    disable: bool | None = None,
    method: str | None = None,
    iterations: int = 1,
) -> Calibrated | torch.Tensor:
    """A skip schedule with ``nfe`` calls per sample, searched on the calibration latents ``x``.

    model: k-diffusion-convention denoiser. sampler: the name of a sampler with a library loop
    (``"ddim"``, ``"euler"``, ``"dpmpp_2m"``, or one registered with ``register_sampler``).
    sigmas: the grid (N steps). x: initial latents of a few calibration samples, already scaled
    by ``sigmas[0]`` as the samplers take them; extra_args: their conditioning (batch-leading
    tensors are sliced per row). nfe: calls per sample, warm-up included (``warmup <= nfe <= N``).
    reuse: what skipped calls get, during the search and in the returned policy (default
        ``Extrapolate(1)``, the linear eps forecast the calibration study found best; a grid search,
        ``as_grid=True``, has no reuse).
    merge_skipped: DPM-Solver++ only, search and replay in the solver-consistent merge mode.
    aggregate: ``"mean_error"`` or ``"frequency"`` (module docstring).
    as_grid: return the ``nfe``-point sub-grid (a tensor of nfe + 1 sigmas) for sampling with no
        skipping (Euler / DDIM: searched with copied eps; DPM-Solver++: with ``merge_skipped``).
    warmup: the first calls, never dropped. seconds: a wall-clock budget. Greedy: once spent, the
        remaining calls are dropped in the order of the last round's costs (the provenance's
        ``exact_rounds`` says how many rounds ran in full). Proxy: no observation run starts after
        it (the full run and the first observation always run: 2 sampling runs).
    method: ``"proxy"`` (``calibration/proxy.py``: greedy on a measured error proxy, at most
        ``proxy_runs(iterations)`` sampling runs of the calibration batch, 10 by default; the
        provenance records the gain that chose its schedule), ``"greedy"`` (the exact greedy search,
        hundreds of runs), or None: proxy wherever it applies (the mean-error aggregate, copy or
        Extrapolate(1) reuse, no merge mode), greedy otherwise (a DPM-Solver++ grid,
        ``aggregate="frequency"``).

    iterations: the proxy's refinement rounds after its observations per gain scale and gain fit.

    Cost: proxy, at most ``proxy_runs(iterations)`` sampling runs' worth of calls (10 by
    default, whatever N and nfe; fewer where candidate masks coincide). Greedy: the full-step run
    of the calibration samples, then one batched sampler call per round (N - nfe rounds), each
    running every candidate drop of every sample with trajectory prefixes shared: about
    ``B N (N - nfe) (N + nfe - 2 warmup) / 4`` model row-evaluations for B samples, about 23,000
    per sample for N = 50, nfe = 20 (460 runs' worth). The provenance records the calls spent
    (``full_run_equivalents``).
    Returns a ``Calibrated`` policy (``policy.save(path)``) or, with ``as_grid``, the grid.
    """
    if not isinstance(as_grid, bool):
        raise ValueError(f"as_grid must be a bool, got {as_grid!r}")
    entry = get_sampler(sampler, runnable=True)
    n = len(check_sigmas(sigmas)) - 1
    check_int("warmup", warmup, 1, n)
    if not isinstance(nfe, (int, np.integer)) or isinstance(nfe, bool) or not warmup <= nfe <= n:
        raise ValueError(f"nfe must be an int in [{warmup}, {n}] (warmup to the {n} steps of sigmas), got {nfe!r}")
    if as_grid:
        if reuse is not None and not isinstance(make_reuse(reuse), Copy):
            raise ValueError("as_grid=True searches a sub-grid, which has no reuse: leave reuse unset")
        if entry.multistep and "merge_skipped" not in inspect.signature(entry.sample).parameters:
            raise ValueError(
                f"as_grid=True for the multistep sampler {entry.name!r} searches in the merge mode (a skip path is then "
                f"exactly the sub-grid), which needs a loop that takes merge_skipped; {entry.name!r}'s does not"
            )
        reuse, merge_skipped = "copy", entry.multistep
    elif reuse is None:
        reuse = DEFAULT_REUSE
    path = calibration_path(model, sampler, sigmas, x, extra_args, min_calls=nfe, reuse=reuse, merge_skipped=merge_skipped,
                            aggregate=aggregate, warmup=warmup, seconds=seconds, disable=disable, method=method,
                            iterations=iterations)  # fmt: skip
    return path.grid(nfe) if as_grid else path.policy(nfe)
