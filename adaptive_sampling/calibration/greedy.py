"""The greedy optimal skip path (the paper's oracle; its code was not released) and its nested order.

Start from the full mask; repeatedly drop the one computed call (at or after ``warmup``) whose
removal moves the final output least (squared error to the full-step output), until the target
number of calls. All candidates of all samples run in one batched sampler call per round,
sharing trajectory prefixes (``_SharedPrefixModel``). ``calibrate`` builds on it (a shared path
over calibration samples); the evaluation suite uses the per-sample path as the oracle baseline.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from ..policies import FixedMask
from ..policies.reuse import Reuse
from ..runner import slice_rows

__all__ = ["greedy_masks", "greedy_path", "GreedyPath"]


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
    *,
    reuse: Reuse | str = "copy",
    sampler_kwargs: dict | None = None,
) -> tuple[np.ndarray, int]:
    """The greedy optimal skip path per sample (the paper's oracle; its code was not released).

    Start from the full mask; repeatedly drop the one computed call (at or after ``warmup``)
    whose removal moves the final output least (squared error to ``reference``, the full-step
    output), until the sample has ``targets[b]`` calls. All candidates of all samples run in one
    batched sampler call per round, sharing trajectory prefixes (``_SharedPrefixModel``).

    sample: a library sampler (``sample_euler``, ...); noise: [B, ...] initial latents (VE scale).
    reuse / sampler_kwargs: what skipped calls get and extra sampler arguments (e.g.
    ``merge_skipped=True``), the same for every candidate.
    Returns (masks [B, N] bool, model row-evaluations spent).
    """
    targets = np.broadcast_to(np.asarray(targets), (noise.shape[0],))
    path = greedy_path(sample, model, noise, sigmas, reference, targets, extra_args, warmup=warmup,
                       progress=progress, reuse=reuse, sampler_kwargs=sampler_kwargs)  # fmt: skip
    return np.stack([path.mask(int(k), row=b) for b, k in enumerate(targets)]), path.evaluations


@dataclass
class GreedyPath:
    """The order in which a greedy search dropped calls: ``order[b]`` lists the dropped steps of
    row b, first dropped first (``shared``: one order, the same for every row). The mask at K
    calls is the full mask minus the first N - K dropped steps, so one search serves every K down
    to the smallest it reached (the greedy path is nested).

    ``exact[b]``: how many of row b's drops were chosen by a full greedy round; the rest (after a
    ``seconds`` budget ran out) were taken in the order of the last round's costs.
    """

    num_steps: int
    order: list[list[int]]
    exact: list[int]
    evaluations: int
    shared: bool
    seconds: float

    def min_calls(self, row: int = 0) -> int:
        return self.num_steps - len(self.order[row])

    def mask(self, k: int, row: int = 0) -> np.ndarray:
        """[N] bool: row ``row``'s path at ``k`` calls (``min_calls(row) <= k <= N``)."""
        if not self.min_calls(row) <= k <= self.num_steps:
            raise ValueError(f"k must be in [{self.min_calls(row)}, {self.num_steps}] for this path, got {k}")
        m = np.ones(self.num_steps, dtype=bool)
        m[self.order[row][: self.num_steps - k]] = False
        return m

    def masks(self, k: int) -> np.ndarray:
        """[B, N] bool: every row's path at ``k`` calls."""
        return np.stack([self.mask(k, b) for b in range(len(self.order))])


def _drop_costs(sample, model, noise, sigmas, masks, active, reference, extra_args, warmup, reuse, sampler_kwargs):
    """One greedy round: for each active row b and each of its droppable steps k, the squared error
    to ``reference[b]`` of row b's path with step k dropped. Returns (costs [B, N], inf where not a
    candidate; model row-evaluations)."""
    B, n = masks.shape
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
    out, _ = sample(proxy, noise[idx.to(noise.device)], sigmas, extra, disable=True,
                    skip=FixedMask(np.stack(rows_mask), reuse=reuse), **sampler_kwargs)  # fmt: skip
    err = ((out - reference[idx.to(reference.device)]).double() ** 2).flatten(1).sum(1).cpu().numpy()
    costs = np.full((B, n), np.inf)
    for r, (b, k) in enumerate(zip(rows_sample, branch)):
        if k < n:
            costs[b, k] = err[r]
    return costs, proxy.evaluated_rows


@torch.no_grad()
def greedy_path(
    sample: Callable,
    model: Callable,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    reference: torch.Tensor,
    min_calls: int | Sequence[int],
    extra_args: dict | None = None,
    *,
    warmup: int = 4,
    shared: bool = False,
    reuse: Reuse | str = "copy",
    sampler_kwargs: dict | None = None,
    seconds: float | None = None,
    progress: Callable[[int], None] | None = None,
) -> GreedyPath:
    """Greedy elimination of model calls down to ``min_calls`` per row (see ``greedy_masks``).

    shared=False: each row its own path (the per-image oracle). shared=True: ONE path for all rows,
    each round dropping the step whose removal least increases the error summed over the rows
    (greedy on the mean error of a calibration set). seconds: a wall-clock budget; once it is
    spent, the remaining drops follow the last round's costs (``GreedyPath.exact`` says how many
    were exact). progress(n) is called once per round.
    """
    B, n = noise.shape[0], len(sigmas) - 1
    if warmup < 1:
        raise ValueError(f"warmup must be >= 1 (step 0 always calls the model), got {warmup}")
    targets = np.broadcast_to(np.asarray(min_calls), (B,)).astype(int)
    if np.any(targets < min(warmup, n)) or np.any(targets > n):
        raise ValueError(f"targets (min_calls) must lie in [{min(warmup, n)}, {n}], got {np.asarray(min_calls).tolist()}")
    if shared and len(set(targets.tolist())) != 1:
        raise ValueError("a shared path needs one min_calls for every row")
    if seconds is not None and not seconds > 0:
        raise ValueError(f"seconds must be > 0 or None, got {seconds!r}")
    extra_args, sampler_kwargs = extra_args or {}, sampler_kwargs or {}
    masks = np.ones((B, n), dtype=bool)
    order: list[list[int]] = [[] for _ in range(B)]
    exact = [0] * B
    spent, started, costs = 0, time.perf_counter(), None
    while True:
        active = [b for b in range(B) if masks[b].sum() > targets[b]]
        if not active:
            break
        if seconds is not None and costs is not None and time.perf_counter() - started > seconds:
            _finish_from(costs, masks, order, targets, shared)
            break
        costs, evaluated = _drop_costs(sample, model, noise, sigmas, masks, active, reference, extra_args, warmup,
                                       reuse, sampler_kwargs)  # fmt: skip
        spent += evaluated
        if shared:
            k = int(np.argmin(costs.sum(axis=0)))
            drops = [(b, k) for b in range(B)]
        else:
            drops = [(b, int(np.argmin(costs[b]))) for b in active]
        for b, k in drops:
            masks[b, k] = False
            order[b].append(k)
            exact[b] += 1
            costs[b, k] = np.inf
        if progress is not None:
            progress(1)
    order_out = [order[0]] if shared else order
    return GreedyPath(n, order_out, [exact[0]] if shared else exact, spent, shared, time.perf_counter() - started)


def _finish_from(costs, masks, order, targets, shared) -> None:
    """Drop the remaining calls in the order of the last round's costs (the budget ran out)."""
    if shared:
        ranked = [int(k) for k in np.argsort(costs.sum(axis=0), kind="stable") if np.isfinite(costs[:, k]).all()]
        ranked = ranked[: int(masks[0].sum() - targets[0])]
        for b in range(masks.shape[0]):
            masks[b, ranked] = False
            order[b].extend(ranked)
        return
    for b in range(masks.shape[0]):
        left = int(masks[b].sum() - targets[b])
        ranked = [int(k) for k in np.argsort(costs[b], kind="stable") if np.isfinite(costs[b, k])][:left]
        masks[b, ranked] = False
        order[b].extend(ranked)
