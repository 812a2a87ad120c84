"""``Calibrated``: a skip schedule searched offline on a few calibration samples, replayed on new ones.

``adaptive_sampling.calibrate`` makes one (greedy search on calibration samples, see
``calibration.py``); this module holds what it returns: the schedule as a policy and a file.

**Keyed by log sigma.** The schedule remembers the grid it was calibrated on and which of its
steps call the model. On that grid it replays the mask exactly. On another grid of the same
model (30 or 100 steps, another spacing) it places K' calls where the calibrated schedule has its
calls, measured in log sigma:

* F(u): the calibrated schedule's cumulative call fraction, ``C(k) / K`` at ``u = log sigma_k``
  (C(k) = calls among steps 0..k), linear in u between steps, ``1 / K`` above the first sigma
  and 1 below the last one;
* on the new grid (step sigmas t_0 > ... > t_{N'-1}), ``G_j = K' F(log t_j)``; call c = 1..K' goes
  to the first step j with ``G_j >= c - 1/2`` (call 1 to step 0); a call whose step is taken
  moves to the next free step (the previous free one at the end of the grid).

So exactly K' calls run, step 0 always computes, and on the calibration grid with K' = K the
mask is reproduced (G_j is then C(j), an integer). K' is ``nfe`` when given, else the calibrated
fraction of calls, ``round(K N' / N)`` (at least 1).

**Per-sample refinement** (``refine=LocalError(...)``, or any policy that declares ``scored``):
each row keeps exactly K' calls but may move them. At a scheduled call whose score is below 1
(the rule's estimate under its threshold) the row defers the call (skips, one call in hand); at
an unscheduled step it spends a call in hand when the score is at or above 1; calls in hand are
always spent by the end (the reserve: a row computes when its calls left equal its steps left).
``refine.max_skips`` caps skip runs; the refinement scores with the schedule's reuse
(``refine.with_reuse``).

**Which sampler.** A schedule is replayed only under the sampler it was calibrated for: ``start``
refuses another one with a ValueError. Why refuse rather than warn: a schedule's calls sit where
that solver's error is large, and a skip means something else to another solver (a longer Euler
step, a stale point in DPM-Solver++'s history); the study measured schedules used under the wrong
sampler losing to fewer steps. To use one anyway, say so: ``schedule.for_sampler(name)``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checks import check_int
from .base import Controller, SkipPolicy, check_policy, resolve
from .kernel_controller import KernelController
from .local_error import LocalError
from .reuse import Reuse, make_reuse, reuse_from_dict, reuse_to_dict

__all__ = ["Calibrated", "map_schedule"]

FORMAT = "adaptive_sampling.Calibrated"
VERSION = 1


def _grid(sigmas: Any, name: str = "sigmas") -> np.ndarray:
    """A VE sigma grid as float64; the first entry may be +inf (a flow grid starting at s = 1)."""
    g = np.asarray(sigmas.detach().cpu().double() if isinstance(sigmas, torch.Tensor) else sigmas, dtype=np.float64)
    if (g.ndim != 1 or len(g) < 2 or not np.all(np.isfinite(g[1:])) or np.isnan(g[0]) or not np.all(g[1:] < g[:-1])
            or not np.all(g[:-1] > 0)):  # fmt: skip
        raise ValueError(f"{name} must be a strictly decreasing 1-D grid of >= 2 noise levels, positive but the last")
    return g


def map_schedule(mask: np.ndarray, sigmas: Any, new_sigmas: Any, k: int) -> np.ndarray:
    """The calibrated ``mask`` ([N] bool on the grid ``sigmas``, N + 1 values) carried to
    ``new_sigmas`` (N' + 1 values) with exactly ``k`` calls, by its cumulative call fraction in
    log sigma (module docstring). Returns [N'] bool."""
    mask = np.asarray(mask, dtype=bool)
    src, dst = _grid(sigmas), _grid(new_sigmas, "new_sigmas")
    n_new = len(dst) - 1
    check_int("k", k, 1, n_new)
    if len(src) - 1 != len(mask) or not mask[0]:
        raise ValueError("mask must have one entry per step of sigmas and compute at step 0")
    if len(src) == len(dst) and np.allclose(src, dst, rtol=1e-12, atol=0) and k == mask.sum():
        return mask.copy()
    u_src = np.log(src[:-1])[::-1]  # ascending for np.interp
    frac = (np.cumsum(mask) / mask.sum())[::-1]
    g = k * np.interp(np.log(dst[:-1]), u_src, frac, left=1.0, right=1.0 / mask.sum())
    out = np.zeros(n_new, dtype=bool)
    out[0] = True
    for c in range(2, k + 1):
        j = int(np.argmax(g >= c - 0.5)) if np.any(g >= c - 0.5) else n_new - 1
        free = np.flatnonzero(~out[j:])
        j = j + int(free[0]) if len(free) else int(np.flatnonzero(~out)[-1])
        out[j] = True
    return out


@dataclass(frozen=True, eq=False)
class Calibrated(SkipPolicy):
    """A calibrated skip schedule (usually made by ``adaptive_sampling.calibrate``).

    sigmas: the grid it was calibrated on, in VE sigma (N + 1 noise levels, the last may be 0; a
        flow grid as s / (1 - s), whose first entry may be inf): the sigmas policies see.
    mask: [N] bool, which of its steps call the model (K = ``mask.sum()`` calls, step 0 included).
    sampler: the sampler it was calibrated for (a sampler with a library loop, e.g. ``"euler"``); ``start``
        refuses any other (module docstring).
    reuse: what skipped calls get (``"copy"`` or ``Extrapolate(...)``), as in the calibration.
    merge_skipped: calibrated for ``sample_dpmpp_2m(..., merge_skipped=True)`` (or
        ``sample_flow_dpmpp_2m``); pass the same flag when sampling (a policy cannot set it).
    nfe: calls per sample on a grid other than the calibration grid (None: the calibrated
        fraction K / N; see the module docstring). On the calibration grid None means K.
    refine: a scored policy (``LocalError(...)``) for per-sample online refinement within the same
        call budget.
    provenance: free-form facts about the calibration (model, samples, seconds, ...).
    """

    sigmas: np.ndarray = field(repr=False)
    mask: np.ndarray = field(repr=False)
    sampler: str = "euler"
    reuse: Reuse | str = "copy"
    merge_skipped: bool = False
    nfe: int | None = None
    refine: SkipPolicy | None = None
    provenance: dict = field(default_factory=dict, repr=False)

    shardable = True

    def __post_init__(self) -> None:
        grid = _grid(self.sigmas)
        mask = np.asarray(self.mask)
        if mask.dtype != bool:
            if not np.all((mask == 0) | (mask == 1)):
                raise ValueError("mask must be boolean (or 0/1)")
            mask = mask.astype(bool)
        if mask.ndim != 1 or len(mask) != len(grid) - 1:
            raise ValueError(f"mask must be shaped [N] = [{len(grid) - 1}] (one entry per step of sigmas), got {mask.shape}")
        if not mask[0]:
            raise ValueError("mask[0] must be True: the first call has no prediction to reuse")
        from ..samplers.registry import get_sampler

        entry = get_sampler(self.sampler, runnable=True)
        make_reuse(self.reuse)
        if not isinstance(self.merge_skipped, bool) or (self.merge_skipped and not entry.multistep):
            raise ValueError("merge_skipped must be a bool, and True only for a multistep sampler such as 'dpmpp_2m'")
        if self.nfe is not None:
            check_int("nfe", self.nfe, 1)
        if self.refine is not None:
            check_policy(self.refine, "refine")
            if not self.refine.scored:
                raise ValueError(f"refine must be a LocalError or another scored policy (or None), got {self.refine!r}")
        object.__setattr__(self, "sampler", entry.name)
        object.__setattr__(self, "sigmas", grid)
        object.__setattr__(self, "mask", mask.copy())

    @property
    def calls(self) -> int:
        """K: model calls per sample on the calibration grid."""
        return int(self.mask.sum())

    @property
    def log_sigmas(self) -> np.ndarray:
        """log sigma of the computed steps: the schedule's key."""
        return np.log(self.sigmas[:-1][self.mask])

    def calls_for(self, num_steps: int) -> int:
        """K' for a grid of ``num_steps`` steps (``nfe``, or the calibrated fraction of calls)."""
        k = self.nfe if self.nfe is not None else max(1, round(self.calls * num_steps / len(self.mask)))
        if k > num_steps:
            raise ValueError(f"nfe={k} calls do not fit a grid of {num_steps} steps")
        return k

    def mask_for(self, sigmas: Any) -> np.ndarray:
        """[N'] bool: the schedule on the grid ``sigmas`` (N' + 1 noise levels)."""
        n = len(_grid(sigmas)) - 1
        return map_schedule(self.mask, self.sigmas, sigmas, self.calls_for(n))

    def with_nfe(self, nfe: int | None) -> "Calibrated":
        return replace(self, nfe=nfe)

    def with_refinement(self, refine: SkipPolicy | None) -> "Calibrated":
        return replace(self, refine=refine)

    def for_sampler(self, sampler: str) -> "Calibrated":
        """The same schedule, to be replayed under ``sampler`` (on purpose: see the module docstring)."""
        return replace(self, sampler=sampler)

    def start(self, x: torch.Tensor, num_steps: int, sampler, sigmas: torch.Tensor | None = None) -> Controller:
        if sigmas is None:
            raise ValueError("Calibrated needs the sigma grid: start(x, num_steps, sampler, sigmas=...)")
        name = resolve(sampler).name
        if name != self.sampler:
            raise ValueError(
                f"this schedule was calibrated for sampler {self.sampler!r}, not {name!r}: calibrate one for {name!r}, "
                f"use BySampler to pick a schedule per sampler, or .for_sampler({name!r}) to replay it anyway"
            )
        mask = self.mask_for(sigmas)
        if len(mask) != num_steps:
            raise ValueError(f"sigmas give {len(mask)} steps, num_steps is {num_steps}")
        if self.refine is None:
            return KernelController(x, num_steps, None, None, None, fixed=np.broadcast_to(mask, (x.shape[0], num_steps)),
                                    reuse=self.reuse)  # fmt: skip
        scorer = self.refine.with_reuse(self.reuse).scorer(x, num_steps, sampler, sigmas=sigmas)
        return RefinedController(self.refine, scorer, mask, x, num_steps)

    # --- the file ----------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "sampler": self.sampler,
            "sigmas": [float(s) for s in self.sigmas],
            "mask": [int(m) for m in self.mask],
            "calls": self.calls,
            "log_sigmas": [float(u) for u in self.log_sigmas],
            "reuse": reuse_to_dict(self.reuse),
            "merge_skipped": self.merge_skipped,
            "nfe": self.nfe,
            "refine": None if self.refine is None else _refine_to_dict(self.refine),
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Calibrated":
        if d.get("format") != FORMAT or d.get("version") != VERSION:
            raise ValueError(f"not a {FORMAT} version {VERSION} schedule (format={d.get('format')!r}, version={d.get('version')!r})")
        r = d.get("refine")
        refine = None if r is None else LocalError(tol=r["tol"], max_skips=r["max_skips"], warmup=r["warmup"],
                                                   reuse=reuse_from_dict(r["reuse"]), variable=r["variable"])  # fmt: skip
        return cls(np.array(d["sigmas"], dtype=np.float64), np.array(d["mask"], dtype=bool), d["sampler"],
                   reuse_from_dict(d["reuse"]), bool(d["merge_skipped"]), d.get("nfe"), refine, dict(d.get("provenance", {})))  # fmt: skip

    def save(self, path: str | Path) -> None:
        """Write the schedule as JSON (floats written exactly: a load gives back the same bits)."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Calibrated":
        """Read a schedule written by ``save``; a file that is not one is a ValueError naming the path."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except OSError as e:
            raise ValueError(f"cannot read a calibrated schedule from {str(path)!r}: {e.strerror or e}") from e
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{str(path)!r} is not a calibrated schedule file (not valid JSON: {e})") from e
        if not isinstance(data, dict):
            raise ValueError(f"{str(path)!r} is not a calibrated schedule file (expected a JSON object)")
        try:
            return cls.from_dict(data)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{str(path)!r} is not a valid calibrated schedule: {e}") from e

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in (("nfe", self.nfe), ("refine", self.refine)) if v is not None)
        merge = ", merge_skipped=True" if self.merge_skipped else ""
        return f"Calibrated({self.sampler}, K={self.calls} of {len(self.mask)}, reuse={self.reuse!r}{merge}{extra})"


def _refine_to_dict(refine: SkipPolicy) -> dict:
    if not isinstance(refine, LocalError):
        raise ValueError(f"only a LocalError refinement can be saved in a schedule file, got {refine!r}")
    return {"tol": refine.tol, "max_skips": refine.max_skips, "warmup": refine.warmup,
            "reuse": reuse_to_dict(refine.reuse), "variable": refine.variable}  # fmt: skip


class RefinedController(Controller):
    """Per-row refinement of a calibrated mask by a scored rule, with exactly the mask's number of
    calls per row (module docstring). The rule's controller (``scorer``) gives the scores and the
    reuse; this one applies the schedule, the guards and the reserve."""

    def __init__(self, rule: SkipPolicy, scorer: Controller, mask: np.ndarray, x: torch.Tensor, num_steps: int) -> None:
        self.batch, self.num_steps = x.shape[0], num_steps
        self.rule, self.scorer = rule, scorer
        self.space = scorer.space
        self.schedule = mask
        self.calls = int(mask.sum())
        B = x.shape[0]
        self.max_skips = num_steps if rule.max_skips is None else rule.max_skips
        self.run = np.zeros(B, dtype=np.int64)  # consecutive skips so far, per row
        self.computed_calls = np.zeros(B, dtype=np.int64)
        self.in_hand = np.zeros(B, dtype=np.int64)  # scheduled calls deferred, not yet spent
        self.capped = np.zeros((B, num_steps), dtype=bool)

    def use_collective(self, collective) -> None:
        self.scorer.use_collective(collective)

    def reuse(self, step: int, sigma: torch.Tensor) -> torch.Tensor:
        return self.scorer.reuse(step, sigma)

    def record(self, step, sigma, eps, rows) -> None:
        self.scorer.record(step, sigma, eps, rows)

    def decide(self, step: int, x: torch.Tensor, sigma: torch.Tensor) -> np.ndarray:
        B = x.shape[0]
        scheduled = bool(self.schedule[step])
        if step < self.rule.warmup:
            self.scorer.observe(step, x, sigma)
            want = np.full(B, scheduled)
        else:
            capped = self.run >= self.max_skips
            self.capped[:, step] = capped
            urgent = ~(self.scorer.score(step, x, sigma) < 1) | capped
            want = (urgent | (self.computed_calls < 2)) if scheduled else (urgent & (self.in_hand > 0))
        left, steps_left = self.calls - self.computed_calls, self.num_steps - step
        compute = ((want | (left >= steps_left)) & (left > 0)) | (step == 0)
        self.in_hand += (scheduled & ~compute).astype(np.int64) - (~scheduled & compute).astype(np.int64)
        self.run = np.where(compute, 0, self.run + 1)
        self.computed_calls += compute
        self.scorer.note(compute)
        return compute

    def finish(self, x: torch.Tensor, sigma: torch.Tensor) -> None:
        self.scorer.finish(x, sigma)

    def signals(self) -> dict[str, np.ndarray]:
        signals = dict(self.scorer.signals())
        signals["capped"] = self.capped.copy()
        return signals
