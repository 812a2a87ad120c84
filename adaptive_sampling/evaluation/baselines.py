"""Baselines at a given number of model calls K (per sample): uniform stride, random, fewer steps.

"Fewer steps" is not a mask but a shorter grid of the same kind: ``fewer_steps``. The greedy
optimal path (the paper's oracle) lives with calibration (``calibration.greedy``), which needs it.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from ..runner import slice_rows

__all__ = ["uniform_mask", "random_mask", "fewer_steps"]


def _check_k(k: int, n: int) -> None:
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= K <= N, got K={k}, N={n}")


def uniform_mask(n: int, k: int) -> np.ndarray:
    """K computed calls spread evenly over N steps (uniform-stride reuse), always including step 0."""
    _check_k(k, n)
    mask = np.zeros(n, dtype=bool)
    mask[np.floor(np.arange(k) * n / k).astype(int)] = True
    return mask


def random_mask(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Step 0 plus K - 1 further calls drawn uniformly without replacement."""
    _check_k(k, n)
    mask = np.zeros(n, dtype=bool)
    mask[0] = True
    mask[1 + rng.choice(n - 1, size=k - 1, replace=False)] = True
    return mask


def fewer_steps(
    sample: Callable,
    model: Callable,
    noise: torch.Tensor,
    schedule: Callable[[int], torch.Tensor],
    steps: Sequence[int],
    extra_args: dict | None = None,
) -> torch.Tensor:
    """Sample row b on a ``steps[b]``-step grid ``schedule(steps[b])``, every step computed, from
    ``noise[b] * sigma_max`` of that grid (a flow grid starts at s = 1: the noise itself): the
    "fewer steps" baseline at a per-sample NFE. Rows with the same K run as one batch."""
    steps = np.asarray(steps)
    extra_args = extra_args or {}
    out = None
    for k in np.unique(steps):
        rows = torch.from_numpy(np.flatnonzero(steps == k))
        grid = schedule(int(k))
        part, _ = sample(model, noise[rows] * grid[0], grid, slice_rows(extra_args, rows, len(steps)), disable=True)  # s0 = 1: noise
        out = part.new_empty((len(steps), *part.shape[1:])) if out is None else out
        out[rows.to(out.device)] = part
    return out
