"""Baseline skip paths at a given number of model calls K (per sample): uniform stride, random,
and the greedy optimal path of the paper's evaluation.

"Fewer steps" is not a mask but a shorter grid of the same kind: ``fewer_steps``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from .policies import FixedMask
from .runner import slice_rows

__all__ = ["uniform_mask", "random_mask", "fewer_steps", "greedy_masks"]


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
    ``noise[b] * sigma_max`` of that grid: the "fewer steps" baseline at a per-sample NFE. Rows
    with the same K run as one batch."""
    steps = np.asarray(steps)
    extra_args = extra_args or {}
    out = None
    for k in np.unique(steps):
        rows = torch.from_numpy(np.flatnonzero(steps == k))
        grid = schedule(int(k))
        part, _ = sample(model, noise[rows] * grid[0], grid, slice_rows(extra_args, rows, len(steps)), disable=True)
        out = part.new_empty((len(steps), *part.shape[1:])) if out is None else out
        out[rows.to(out.device)] = part
    return out


class _SharedPrefixModel:
    """Evaluates each distinct trajectory once.

    Candidate rows are copies of a trunk row (the current path of their sample) until the step
    they drop. At step s a row whose dropped step lies after s is bit-identical to its trunk, so
    the model runs on the trunks and the rows that have already branched, and the other rows get
    their trunk's output. This is the prefix reuse that makes the greedy search affordable.
    """

    def __init__(self, model: Callable, sigmas: torch.Tensor, trunk: np.ndarray, branch: np.ndarray):
        self.model = model
        self.sigmas = sigmas.double().cpu()
        self.trunk = torch.from_numpy(trunk)  # row -> its trunk row
        self.branch = torch.from_numpy(branch)  # row -> step it drops (n for trunk rows)
        self.evaluated_rows = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, ids: torch.Tensor, **extra_args) -> torch.Tensor:
        step = int(torch.argmin((self.sigmas - float(sigma[0])).abs()))
        rows = ids.tolist()
        distinct = [bool(self.branch[r] <= step or self.trunk[r] == r) for r in rows]
        own = [i for i, d in enumerate(distinct) if d]
        slot = {rows[i]: j for j, i in enumerate(own)}  # row id -> position in the model's output
        source = [slot[r if d else int(self.trunk[r])] for r, d in zip(rows, distinct)]
        own_t = torch.tensor(own, device=x.device)
        out = self.model(x.index_select(0, own_t), sigma.index_select(0, own_t), **slice_rows(extra_args, own_t, len(rows)))
        self.evaluated_rows += len(own)
        return out.index_select(0, torch.tensor(source, device=x.device))


def greedy_masks(
    sample: Callable,
    model: Callable,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    targets: Sequence[int],
    reference: torch.Tensor,
    extra_args: dict | None = None,
    warmup: int = 4,
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, int]:
    """The greedy optimal skip path per sample (the paper's oracle; its code was not released).

    Start from the full mask; repeatedly drop the one computed call (at or after ``warmup``)
    whose removal moves the final output least (squared error to ``reference``, the full-step
    output), until the sample has ``targets[b]`` calls. All candidates of all samples run in one
    batched sampler call per round, sharing trajectory prefixes (``_SharedPrefixModel``).

    sample: a library sampler (``sample_euler``, ...); noise: [B, ...] initial latents (VE scale).
    Returns (masks [B, N] bool, model row-evaluations spent).
    """
    B, n = noise.shape[0], len(sigmas) - 1
    masks = np.ones((B, n), dtype=bool)
    targets = np.asarray(targets)
    if warmup < 1:
        raise ValueError(f"warmup must be >= 1 (step 0 always calls the model), got {warmup}")
    if np.any(targets < min(warmup, n)) or np.any(targets > n):
        raise ValueError(f"targets must lie in [{min(warmup, n)}, {n}], got {targets.tolist()}")
    extra_args = extra_args or {}
    spent = 0
    while True:
        active = [b for b in range(B) if masks[b].sum() > targets[b]]
        if not active:
            return masks, spent
        rows_sample, rows_mask, trunk, branch = [], [], [], []
        for b in active:
            t = len(rows_sample)
            rows_sample.append(b), rows_mask.append(masks[b]), trunk.append(t), branch.append(n)
            for k in np.flatnonzero(masks[b][warmup:]) + warmup:
                m = masks[b].copy()
                m[k] = False
                rows_sample.append(b), rows_mask.append(m), trunk.append(t), branch.append(k)
        idx = torch.tensor(rows_sample)
        proxy = _SharedPrefixModel(model, sigmas, np.array(trunk), np.array(branch))
        extra = {**slice_rows(extra_args, idx, B), "ids": torch.arange(len(idx))}
        out, _ = sample(proxy, noise[idx], sigmas, extra, disable=True, skip=FixedMask(np.stack(rows_mask)))
        spent += proxy.evaluated_rows
        err = ((out - reference[idx]) ** 2).flatten(1).sum(1).cpu().numpy()
        for b in active:
            cand = [r for r in range(len(rows_sample)) if rows_sample[r] == b and branch[r] < n]
            best = cand[int(np.argmin(err[cand]))]
            masks[b, branch[best]] = False
        if progress is not None:
            progress(1)
