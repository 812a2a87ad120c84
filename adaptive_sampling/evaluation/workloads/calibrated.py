"""Calibrated skip schedules and grids shipped with the learned workloads (``bench/calibration_study.py``).

For each learned model (``"digits"``, ``"shapes"``), calibrated on classes 0-4 with seeds 1 and 2,
50 steps on the model's default grid (digits: Karras, sigma 20 -> 0.002; shapes: the
leading-spacing DDPM grid):

* ``load(workload, sampler, nfe)``: per sampler, the skip schedule of the variant that won on the
  study's validation split, at K = 20, 25, 30 and 35 calls (a ``Calibrated`` policy; on another
  grid it maps by log sigma);
* ``grid(workload, nfe, sigmas=None)``: the calibrated ``nfe``-point grid for DPM-Solver++(2M)
  without skipping (the greedy merge-mode path, nfe from 10 (digits) or 20 (shapes) to 50; with ``sigmas``, mapped
  onto that grid by log sigma).

    from adaptive_sampling.evaluation.workloads.calibrated import load
    policy = load("digits", "dpmpp_2m", nfe=25)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ...policies.calibrated import Calibrated, map_schedule

__all__ = ["load", "grid", "available"]

_DATA = Path(__file__).resolve().parent / "data"


def available(workload: str) -> dict[str, list[int]]:
    """sampler -> the calls (K) a schedule ships for."""
    return {s: sorted(int(k) for k in v) for s, v in _read(workload)["schedules"].items()}


def load(workload: str, sampler: str, nfe: int) -> Calibrated:
    """The shipped schedule of ``workload`` for ``sampler`` with ``nfe`` calls of 50 steps."""
    table = _read(workload)["schedules"]
    if sampler not in table:
        raise ValueError(f"sampler must be one of {sorted(table)}, got {sampler!r}")
    if str(nfe) not in table[sampler]:
        raise ValueError(f"nfe must be one of {sorted(int(k) for k in table[sampler])} for {workload}/{sampler}, got {nfe!r}")
    return Calibrated.from_dict(table[sampler][str(nfe)])


def grid(workload: str, nfe: int, sigmas: torch.Tensor | None = None) -> torch.Tensor:
    """The calibrated grid with ``nfe`` steps (nfe + 1 sigmas, float64), for sampling without skipping.

    Without ``sigmas``: the calibrated sub-grid of the 50-step calibration grid (nfe from the
    search's lowest, 10 for digits and 20 for shapes, to 50).
    With ``sigmas`` (another grid of the model, N' steps, nfe <= N'): the calibrated sub-grid with
    the same fraction of calls, round(nfe * 50 / N') clamped to the shipped range, placed on
    ``sigmas`` by log sigma with exactly nfe steps (``map_schedule``)."""
    g = _read(workload)["grid"]
    base = np.asarray(g["sigmas"], dtype=np.float64)
    n, order = len(base) - 1, g["order"]
    lowest = n - len(order)
    target = None if sigmas is None else torch.as_tensor(np.asarray(sigmas.detach().cpu() if isinstance(sigmas, torch.Tensor) else sigmas, dtype=np.float64))
    steps = n if target is None else len(target) - 1
    if not isinstance(nfe, int) or not (lowest if target is None else 1) <= nfe <= steps:
        raise ValueError(f"nfe must be an int in [{lowest if target is None else 1}, {steps}], got {nfe!r}")
    k = nfe if target is None else min(n, max(lowest, round(nfe * n / steps)))
    mask = np.ones(n, dtype=bool)
    mask[order[: n - k]] = False
    if target is None:
        return torch.from_numpy(base[np.append(mask, True)])
    keep = map_schedule(mask, base, target.numpy(), nfe)
    return target[torch.from_numpy(np.append(keep, True))]


def _read(workload: str) -> dict:
    path = _DATA / f"calibrated_{workload}.json"
    if workload not in ("digits", "shapes") or not path.is_file():
        raise ValueError(f"workload must be 'digits' or 'shapes' (a shipped schedule file), got {workload!r}")
    return json.loads(path.read_text())
