"""Skipping beyond one process: data parallel and sharded latents, with identical decisions on every rank.

torch.distributed only (gloo on CPUs, nccl on GPUs); this module never opens a transport of its
own. It is not imported by ``import adaptive_sampling``; import it as
``from adaptive_sampling.integrations import distributed``. Every function takes ``group`` (a process group;
``None``: the default group) and needs an initialised process group.

Data parallel (each process samples its own prompts)
----------------------------------------------------
Per-sample decisions need no communication: a row's path depends on that row only, so each
process runs the ordinary policy on its rows::

    from adaptive_sampling import ThirdOrder, sample_dpmpp_2m
    from adaptive_sampling.integrations import distributed as asd

    noise = torch.randn(B, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 20  # same on every rank
    x, y = asd.split(noise, B), asd.split(labels, B)                    # this rank's rows
    policy = asd.data_parallel(ThirdOrder())                             # per sample: returned as is
    out, report = sample_dpmpp_2m(model, x, sigmas, extra_args={"y": y}, skip=policy)
    out_all = asd.gather(out)                                            # every rank's rows, in rank order
    report_all = asd.gather_report(report)                               # one SkipReport for the whole batch

The batch-wide mode (``per_sample=False``, the reference code's single decision) pools its sums:
``data_parallel(ThirdOrder(per_sample=False))`` sums each process's rows, all-reduces those
totals over the group, and decides from the pooled sums, so every process takes the decision one
process would take on the whole batch (the same masks; the pooled sum may differ from one
process's sum in the last bits, see "Ties" below).

Sharded latents (sequence / tensor parallelism of one image)
------------------------------------------------------------
Each process holds a shard of every sample's latent (the same rows, different elements).
``shard(policy)`` makes the policy's per-sample partial sums over elements (the skip kernel's
stage 1, ``kernels.skip_stats.skip_partials``, either backend; ``LocalError``'s sums) all-reduced
over the group before the rule is applied (stage 2, ``skip_decide``), so every process decides
identically, and still reads the device once per step (the flag bytes). ``shard()`` accepts any
policy that declares ``shardable = True`` (``policies.base``): its controllers implement
``use_collective`` and pass every [q, B] tensor of per-sample sums through
``collective.sample_sums(sums, step)`` and, in batch mode, ``collective.batch_sums(sums, step)``.
The built-in ones do: ``ThirdOrder`` (both criteria, both backends, per sample or batch-wide),
``LocalError``, ``Budget`` over either, ``Calibrated`` and ``FixedMask`` (whose only sum is the
NaN/Inf count: a NaN in one shard stops every process). Any other policy raises a ``ValueError``
at ``shard()``, never silently deciding per shard.

Ties: the all-reduced sum of the shards' partial sums is a sum in another order than one
process's sum over the whole latent, so it may differ in the last bits, and a decision exactly at
the threshold may then differ from the single-process one. Every process receives the same bits
from the all-reduce (gloo's ring and NCCL's ring/tree algorithms finish each element's reduction
on one rank and send that result unchanged to all; NCCL's maintainers state that all ranks get the
same value: github.com/NVIDIA/nccl/issues/855), and ``skip_decide`` is deterministic, so the
processes always agree with each other, whichever shard arrives first; agreement with a
single-process run is exact except at such a tie.

Failure: every collective here is a blocking torch.distributed call on the caller's group, so its
timeout is the group's (``init_process_group(..., timeout=timedelta(seconds=...))`` or
``new_group(..., timeout=...)``; torch's default is 10 minutes for nccl and 30 for gloo). With gloo,
a process that stops (raises, crashes, or stops calling) makes the others' next collective raise
``DistributedSkipError`` (the peer's closed connection at once, or the timeout), naming the step.
With nccl the collectives are asynchronous: a missing peer is detected by torch's NCCL watchdog at
the group's timeout, which by default tears the process down (``TORCH_NCCL_ASYNC_ERROR_HANDLING``)
rather than raising in Python. Collectives at ``start`` (once per sampling call): one all-gather
of the sizes (to check that the processes agree on batch and step counts and to count elements).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..policies.base import SkipPolicy
from ..report import SkipReport

__all__ = [
    "DistributedSkipError",
    "shard",
    "data_parallel",
    "Sharded",
    "Pooled",
    "local_rows",
    "split",
    "gather",
    "gather_report",
    "decisions_agree",
]


class DistributedSkipError(RuntimeError):
    """A collective of the skip machinery failed: another process of the group stopped (it raised,
    crashed, or took a different path), or the group's timeout passed."""


def _dist():
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("adaptive_sampling.integrations.distributed needs torch.distributed, which this torch build lacks")
    if not dist.is_initialized():
        raise RuntimeError(
            "adaptive_sampling.integrations.distributed needs an initialised process group "
            "(torch.distributed.init_process_group, e.g. under torchrun)"
        )
    return dist


def _call(fn, what: str, group, *args, **kwargs):
    """Run a collective; a failure becomes a ``DistributedSkipError`` that says what and where."""
    dist = _dist()
    try:
        return fn(*args, group=group, **kwargs)
    except RuntimeError as e:  # gloo/nccl errors (DistBackendError is a RuntimeError)
        rank, world = dist.get_rank(), dist.get_world_size(group)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DistributedSkipError(
            f"{what} failed on rank {rank} (a group of {world} processes): another process of the group "
            f"stopped sampling (it raised, crashed, or took a different path), or the group's timeout passed. "
            f"Cause: {type(e).__name__}: {first}"
        ) from e


# --------------------------------------------------------------------------------------------
# The collective a controller completes its sums with
# --------------------------------------------------------------------------------------------


class Collective:
    """What ``shard`` / ``data_parallel`` hand a controller (``use_collective``) for one sampling call.

    numel: elements of one whole sample (over every shard).
    sample_sums(sums [q, B], step): the per-sample sums completed over the shards (all-reduced
        in place when sharded; returned as is otherwise).
    batch_sums(sums [q, B], step) -> (totals [q], elements): batch mode; the sums over every row of
        the whole batch (this process's rows summed, then all-reduced over a data-parallel group)
        and the whole batch's element count.
    """

    def __init__(self, x: torch.Tensor, num_steps: int, group, sharded: bool, pooled: bool) -> None:
        dist = _dist()
        self.group, self.sharded, self.pooled = group, sharded, pooled
        B, n = x.shape[0], x[0].numel()
        mine = torch.tensor([n, B, num_steps], dtype=torch.int64, device=x.device)
        sizes = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
        _call(dist.all_gather, "the all-gather of the sizes at the start of sampling", group, sizes, mine)
        sizes = torch.stack(sizes).cpu()
        if not bool((sizes[:, 2] == num_steps).all()):
            raise ValueError(f"the processes sample different numbers of steps: {sizes[:, 2].tolist()}")
        if sharded:
            if not bool((sizes[:, 1] == B).all()):
                raise ValueError(
                    f"shard(): every process must hold a shard of the SAME samples, but the batch sizes are "
                    f"{sizes[:, 1].tolist()}"
                )
            self.numel = int(sizes[:, 0].sum())
            self.elements = self.numel * B
        else:
            self.numel = n
            self.elements = int((sizes[:, 0] * sizes[:, 1]).sum())
        self.rank = dist.get_rank()

    def sample_sums(self, sums: torch.Tensor, step: int) -> torch.Tensor:
        if self.sharded:
            dist = _dist()
            _call(dist.all_reduce, f"the all-reduce of the per-sample skip sums at step {step}", self.group, sums)
        return sums

    def batch_sums(self, sums: torch.Tensor, step: int) -> tuple[torch.Tensor, int]:
        totals = torch.stack([row.sum() for row in sums])
        if self.pooled:
            dist = _dist()
            _call(dist.all_reduce, f"the all-reduce of the batch-wide skip sums at step {step}", self.group, totals)
        return totals, self.elements


# --------------------------------------------------------------------------------------------
# Policy wrappers
# --------------------------------------------------------------------------------------------


def _attach(controller, policy, what: str, x, num_steps: int, group, sharded: bool, pooled: bool):
    """Hand ``controller`` its ``Collective`` (``Controller.use_collective`` raises for a controller
    that cannot take one, on every process, before any collective runs)."""
    from ..policies.base import Controller

    if type(controller).use_collective is Controller.use_collective:  # checked before any collective runs
        try:
            controller.use_collective(None)
        except ValueError as e:
            raise ValueError(f"{what}: the controller of {policy!r}: {e}") from None
    controller.use_collective(Collective(x, num_steps, group, sharded=sharded, pooled=pooled))
    return controller


@dataclass(frozen=True, eq=False)
class Sharded(SkipPolicy):
    """``shard(policy, group)``: each process holds a shard of every sample's latent (see the module docstring)."""

    policy: Any
    group: Any = None

    def start(self, x: torch.Tensor, num_steps: int, sampler: str, sigmas: torch.Tensor | None = None):
        controller = self.policy.start(x, num_steps, sampler, sigmas=sigmas)
        return _attach(controller, self.policy, "shard()", x, num_steps, self.group, sharded=True, pooled=False)

    def __repr__(self) -> str:
        return f"shard({self.policy!r})"


@dataclass(frozen=True, eq=False)
class Pooled(SkipPolicy):
    """``data_parallel(policy, group)`` for a batch-wide policy: sums pooled over the group's rows."""

    policy: Any
    group: Any = None

    def start(self, x: torch.Tensor, num_steps: int, sampler: str, sigmas: torch.Tensor | None = None):
        controller = self.policy.start(x, num_steps, sampler, sigmas=sigmas)
        return _attach(controller, self.policy, "data_parallel()", x, num_steps, self.group, sharded=False, pooled=True)

    def __repr__(self) -> str:
        return f"data_parallel({self.policy!r})"


def shard(policy, group=None) -> Sharded:
    """The policy for a latent sharded over ``group`` (``None``: the default group).

    Every process of the group must hold the same samples (rows) and a part of each sample's
    elements (any split: along channels, tokens, rows of pixels, even uneven), call the sampler
    with the same sigmas and arguments, and run its model on the rows the decision gives (the
    same rows on every process). Any policy that declares ``shardable = True`` (the built-in ones
    do); anything else raises a ``ValueError`` here.
    """
    if isinstance(policy, (Sharded, Pooled)):
        raise NotImplementedError(
            f"{policy!r} is already distributed; sharding combined with data parallelism (2-D groups) is not supported"
        )
    if not isinstance(policy, SkipPolicy):
        raise TypeError(f"shard() needs a skip policy (default_policy(), ThirdOrder(), ...), got {policy!r}")
    if not policy.shardable:
        raise ValueError(
            f"{policy!r} cannot be sharded: it does not declare that its decision depends on the latent only through "
            "per-sample sums over its elements (which shard() all-reduces). Deciding on each shard alone would let "
            "the processes disagree and hang in the model's collectives. A policy opts in with `shardable = True` "
            "and controllers that implement use_collective() (see adaptive_sampling.integrations.distributed)."
        )
    return Sharded(policy, group)


def data_parallel(policy, group=None):
    """The policy for data-parallel sampling over ``group`` (each process samples its own rows).

    A per-sample policy (``per_sample``, the default of every policy) is returned unchanged: it
    needs no communication. A batch-wide one (``per_sample=False``; ``Budget`` over such a rule) is
    wrapped so that its sums are pooled over every row of every process before deciding; its
    controllers must implement ``use_collective`` (checked when sampling starts).
    """
    if isinstance(policy, (Sharded, Pooled)):
        raise NotImplementedError(f"{policy!r} is already distributed; 2-D groups are not supported")
    if not isinstance(policy, SkipPolicy):
        raise TypeError(f"data_parallel() needs a skip policy (default_policy(), ThirdOrder(), ...), got {policy!r}")
    return policy if policy.per_sample else Pooled(policy, group)


# --------------------------------------------------------------------------------------------
# Data-parallel helpers: split the batch, gather outputs and reports
# --------------------------------------------------------------------------------------------


def _rank_world(group) -> tuple[int, int]:
    dist = _dist()
    return dist.get_rank(group), dist.get_world_size(group)


def local_rows(batch_size: int, group=None) -> slice:
    """This process's rows of a batch of ``batch_size``: contiguous blocks in rank order, the first
    ``batch_size % world`` processes one row more (``torch.tensor_split``'s sizes). A process may get
    no rows when the batch is smaller than the group; the samplers need at least one."""
    if not isinstance(batch_size, int) or batch_size < 0:
        raise ValueError(f"batch_size must be an int >= 0, got {batch_size!r}")
    return _block(batch_size, *_rank_world(group))


def _block(batch_size: int, rank: int, world: int) -> slice:
    base, extra = divmod(batch_size, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def split(value, batch_size: int | None = None, group=None):
    """This process's rows of ``value`` (``local_rows``): tensors and numpy arrays whose first
    dimension is ``batch_size`` are sliced, dicts / lists / tuples are walked recursively, and a
    list or tuple of ``batch_size`` plain items (e.g. prompt strings) is sliced itself; anything
    else passes unchanged. ``batch_size`` defaults to ``len(value)`` for a tensor, array or list."""
    if batch_size is None:
        if isinstance(value, (torch.Tensor, np.ndarray, list, tuple)):
            batch_size = len(value)
        else:
            raise ValueError("split() needs batch_size for a dict or other container")
    rows = local_rows(batch_size, group)

    def walk(v):
        if isinstance(v, (torch.Tensor, np.ndarray)):
            return v[rows] if v.ndim and v.shape[0] == batch_size else v
        if isinstance(v, dict):
            return {k: walk(u) for k, u in v.items()}
        if isinstance(v, (list, tuple)):
            plain = len(v) == batch_size and not any(isinstance(u, (torch.Tensor, np.ndarray, dict, list, tuple)) for u in v)
            items = list(v[rows]) if plain else [walk(u) for u in v]
            return type(v)(*items) if hasattr(v, "_fields") else type(v)(items)
        return v

    return walk(value)


def gather(x: torch.Tensor, group=None) -> torch.Tensor:
    """Every process's rows of ``x`` (first dimension), concatenated in rank order, on every
    process: the whole batch again after ``split``. Row counts may differ between processes."""
    dist = _dist()
    world = dist.get_world_size(group)
    count = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
    counts = [torch.empty_like(count) for _ in range(world)]
    _call(dist.all_gather, "gather(): the all-gather of the row counts", group, counts, count)
    counts = [int(c) for c in counts]
    most = max(counts)
    padded = x.new_zeros((most, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    _call(dist.all_gather, "gather(): the all-gather of the rows", group, parts, padded.contiguous())
    return torch.cat([p[:c] for p, c in zip(parts, counts)])


def gather_report(report: SkipReport, group=None) -> SkipReport:
    """One ``SkipReport`` for the whole data-parallel batch, on every process: masks and every
    batch-leading signal concatenated in rank order (as ``gather`` orders the rows), ``model_calls``
    summed over the processes; other signals become a list of the processes' values. With nccl,
    set the current CUDA device first (``all_gather_object`` uses it)."""
    dist = _dist()
    world = dist.get_world_size(group)
    mine = dict(
        computed=report.computed, signals=report.signals, model_calls=report.model_calls,
        extra_evaluations=report.extra_evaluations, sampler=report.sampler, policy=report.policy, space=report.space,
    )  # fmt: skip
    every: list = [None] * world
    _call(dist.all_gather_object, "gather_report(): the all-gather of the reports", group, every, mine)
    if len({r["extra_evaluations"] for r in every}) != 1 or len({r["sampler"] for r in every}) != 1:
        raise ValueError("gather_report(): the processes ran different samplers")
    signals = {}
    for key in every[0]["signals"]:
        values = [r["signals"].get(key) for r in every]
        leading = all(isinstance(v, np.ndarray) and v.ndim and len(v) == len(r["computed"]) for v, r in zip(values, every))
        signals[key] = np.concatenate(values) if leading else values
    return SkipReport.build(
        computed=np.concatenate([r["computed"] for r in every]),
        signals=signals,
        model_calls=sum(r["model_calls"] for r in every),
        extra_evaluations=every[0]["extra_evaluations"],
        sampler=every[0]["sampler"],
        policy=every[0]["policy"],
        space=every[0]["space"],
    )


def decisions_agree(report: SkipReport, group=None) -> bool:
    """Whether every process of ``group`` took the same decisions (``report.computed`` equal):
    a check for sharded runs, where each process's report covers the same samples."""
    dist = _dist()
    every: list = [None] * dist.get_world_size(group)
    _call(dist.all_gather_object, "decisions_agree(): the all-gather of the masks", group, every, report.computed)
    return all(np.array_equal(every[0], m) for m in every[1:])
