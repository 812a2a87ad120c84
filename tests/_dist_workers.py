"""The processes behind tests/test_distributed.py (gloo, CPU), and the workloads both sides share.

Each spawned process runs every scenario of ``scenarios(world)`` in order and saves what it saw
(masks, scores, its outputs, timings, errors) to ``out_dir/rank{r}.pt``; the test compares that
with single-process runs of the same workloads. The last scenario makes one process fail
mid-loop, so each process ends with ``os._exit`` (a broken group must not be torn down politely).
Kept out of ``test_*.py`` so that the children import no pytest.
"""

from __future__ import annotations

import os
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

import numpy as np
import torch

from adaptive_sampling import Budget, FixedMask, LocalError, Paced, ThirdOrder, get_sigmas_karras, sample_dpmpp_2m, sample_euler
from adaptive_sampling.evaluation.workloads.gaussian import GaussianWorkload

from ._third_party import RelativeChange

SIGMAS = get_sigmas_karras(16, 0.03, 14.6)
BATCH = 5  # splits unevenly over 2 (3 + 2) and 3 (2 + 2 + 1) processes
SHAPE = (2, 5, 7)  # sharded along the last dimension: 4 + 3 and 3 + 2 + 2 elements per row of pixels
SCALES = (1.0, 0.2, 3.0, 1.0, 0.5)  # rows at different scales, so that per-sample masks differ
GROUP_TIMEOUT_S = 60  # the main group: generous, the machine is shared
FAIL_TIMEOUT_S = 4  # the group of the failure scenarios: how long a stalled peer is waited for
FAIL_STEP = 7  # the call at which one process fails


def workload(dtype: torch.dtype):
    """(denoiser, x [B, 2, 5, 7], extra_args): the exact denoiser of Gaussian data (elementwise, so
    a call on any subset of rows or elements gives the same bits)."""
    g = GaussianWorkload.make(num_classes=3, shape=SHAPE, std=0.5, seed=0, dtype=dtype)
    x = g.noise(BATCH, float(SIGMAS[0]), seed=7) * torch.tensor(SCALES, dtype=dtype).reshape(-1, 1, 1, 1)
    return g.denoiser, x, {"y": torch.tensor([0, 1, 2, 0, 1])}


def _kdiff_dpmpp_2m(model, x, sigmas, extra_args, skip):
    from adaptive_sampling.integrations.k_diffusion import adaptive
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from k_diffusion.sampling import sample_dpmpp_2m as k_dpmpp_2m
    return adaptive(k_dpmpp_2m, skip=skip).with_report(model, x, sigmas, extra_args=extra_args, disable=True)


SAMPLERS: dict[str, Callable] = {
    "euler": lambda model, x, sigmas, extra_args, skip: sample_euler(model, x, sigmas, extra_args, disable=True, skip=skip),
    "dpmpp_2m": lambda model, x, sigmas, extra_args, skip: sample_dpmpp_2m(model, x, sigmas, extra_args, disable=True, skip=skip),
    "k_dpmpp_2m": _kdiff_dpmpp_2m,
}

FIXED = np.array([True] * 4 + [False, True] * 6, dtype=bool)


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # "shard" or "dp"
    sampler: str
    policy: Callable[[], object]
    dtype: torch.dtype = torch.float64
    permuted: bool = False  # shard: rank r holds shard world - 1 - r
    steps: int = 16  # sampling steps (fewer for the interpreted Triton cases)

    @property
    def sigmas(self) -> torch.Tensor:
        return (SIGMAS if self.steps == 16 else get_sigmas_karras(self.steps, 0.03, 14.6)).to(self.dtype)


def cases(world: int) -> list[Case]:
    """The scenarios of a ``world``-process run. Triton (interpreted on the CPU: about 0.1 s per
    step and process, 3x that with 3 processes on a 2-core machine) runs in the 2-process run only,
    with 10 steps, in two cases; the all-reduce it feeds is the same [4, B] tensor on either
    backend, and its batch-wide (``POOLED``) decide path is checked in-process against the fused
    kernel (tests/test_distributed.py::test_stages_apart_equal_skip_update)."""
    f32 = torch.float32
    ref = dict(delta=0.05, max_skips=3)
    paper = dict(delta=0.3, criterion="paper", max_skips=3)
    ref10 = dict(delta=0.2, max_skips=3)  # skips on the 10-step grid too
    out = [
        # sharded latents
        Case("shard-ref-torch", "shard", "euler", lambda: ThirdOrder(**ref, backend="torch")),
        Case("shard-paper-torch", "shard", "dpmpp_2m", lambda: ThirdOrder(**paper, backend="torch")),
        Case("shard-batch-torch", "shard", "euler", lambda: ThirdOrder(**ref, per_sample=False, backend="torch"), f32),
        Case("shard-localerror", "shard", "dpmpp_2m", lambda: LocalError(tol=0.01)),
        Case("shard-localerror-batch", "shard", "euler", lambda: LocalError(tol=0.01, per_sample=False), f32),
        Case("shard-budget-localerror", "shard", "euler", lambda: Budget(nfe=9, rule=LocalError()), f32),
        Case("shard-budget-thirdorder", "shard", "dpmpp_2m", lambda: Budget(nfe=9, rule=ThirdOrder(backend="torch")), f32),
        Case("shard-fixed", "shard", "euler", lambda: FixedMask(FIXED)),
        # a rule written outside the package (tests/_third_party.py), on its own and inside Budget
        Case("shard-thirdparty", "shard", "euler", lambda: RelativeChange(tol=0.2)),
        Case("shard-budget-thirdparty", "shard", "dpmpp_2m", lambda: Budget(nfe=9, rule=RelativeChange())),
        Case("shard-permuted-f32", "shard", "euler", lambda: ThirdOrder(**ref, backend="torch"), f32, True),
        # data parallel
        Case("dp-ref", "dp", "dpmpp_2m", lambda: ThirdOrder(**ref, backend="torch")),  # rows differ (VP space)
        Case("dp-localerror", "dp", "dpmpp_2m", lambda: LocalError(tol=0.01), f32),
        Case("dp-budget", "dp", "euler", lambda: Budget(nfe=9, rule=LocalError()), f32),
        Case("dp-batch-ref-torch", "dp", "dpmpp_2m", lambda: ThirdOrder(**ref, per_sample=False, backend="torch")),
        Case("dp-batch-paper-torch", "dp", "dpmpp_2m", lambda: ThirdOrder(**paper, per_sample=False, backend="torch"), f32),
        Case("dp-batch-localerror", "dp", "euler", lambda: LocalError(tol=0.01, per_sample=False), f32),
        # the default policy: its aligned re-plan is one vote of the whole batch, pooled over the group
        Case("dp-paced", "dp", "euler", lambda: Paced(nfe=9, lead=4, window=3), f32),
        Case("shard-paced", "shard", "dpmpp_2m", lambda: Paced(nfe=9, lead=4, window=3), f32),
    ]
    if world == 2:  # Triton's other paths, and the k-diffusion wrapper (its import is slow: once)
        out += [
            Case("shard-paper-triton", "shard", "dpmpp_2m", lambda: ThirdOrder(**paper, backend="triton"), f32, steps=10),
            Case("shard-permuted-triton", "shard", "dpmpp_2m", lambda: ThirdOrder(**ref10, backend="triton"), f32, True, 10),
            Case("shard-kdiff", "shard", "k_dpmpp_2m", lambda: ThirdOrder(**paper, backend="torch")),
            Case("dp-batch-kdiff", "dp", "k_dpmpp_2m", lambda: ThirdOrder(**paper, per_sample=False, backend="torch")),
        ]
    return out


def shard_sizes(world: int) -> list[int]:
    return [len(t) for t in torch.arange(SHAPE[-1]).tensor_split(world)]


def shard_of(x: torch.Tensor, index: int, world: int) -> torch.Tensor:
    return x.tensor_split(world, dim=-1)[index].contiguous()


class ShardedModel:
    """Test harness, not model parallelism: all-gather the shards of x (last dimension), run the
    whole-latent model, keep this process's shard. Its all-gather is the model collective that
    would hang if the processes disagreed on which rows call the model."""

    def __init__(self, model, world: int, rank: int, order: list[int]) -> None:
        import torch.distributed as dist

        self.dist, self.model, self.world, self.rank, self.order = dist, model, world, rank, order
        self.sizes = shard_sizes(world)

    def __call__(self, x, sigma, **extra):
        wide = max(self.sizes)
        padded = torch.nn.functional.pad(x, (0, wide - x.shape[-1]))
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        self.dist.all_gather(parts, padded.contiguous())
        # rank r holds shard order[r]: put the shards back in their own order
        by_shard = {self.order[r]: parts[r][..., : self.sizes[self.order[r]]] for r in range(self.world)}
        full = torch.cat([by_shard[i] for i in range(self.world)], dim=-1)
        out = self.model(full, sigma, **extra)
        mine = self.order[self.rank]
        start = sum(self.sizes[:mine])
        return out[..., start : start + self.sizes[mine]].contiguous()


def run_single(case: Case):
    """The single-process reference: the whole batch, the whole latent."""
    model, x, extra = workload(case.dtype)
    return SAMPLERS[case.sampler](model, x, case.sigmas, extra, case.policy())


def _record_sums(store: list):
    """Wrap Collective.sample_sums so every completed [q, B] sum is recorded (for the order test)."""
    from adaptive_sampling.integrations import distributed as asd

    original = asd.Collective.sample_sums

    def recording(self, sums, step):
        out = original(self, sums, step)
        store.append(out.detach().clone())
        return out

    asd.Collective.sample_sums = recording
    return lambda: setattr(asd.Collective, "sample_sums", original)


def run_case(case: Case, rank: int, world: int) -> dict:
    from adaptive_sampling.integrations import distributed as asd

    model, x, extra = workload(case.dtype)
    sigmas = case.sigmas
    t0 = time.perf_counter()
    sums: list = []
    if case.kind == "shard":
        order = list(range(world))[::-1] if case.permuted else list(range(world))
        x_local = shard_of(x, order[rank], world)
        restore = _record_sums(sums)
        try:
            out, rep = SAMPLERS[case.sampler](ShardedModel(model, world, rank, order), x_local, sigmas, extra, asd.shard(case.policy()))
        finally:
            restore()
        agree = asd.decisions_agree(rep)
        result = dict(out=out, shard=order[rank], agree=agree, computed=rep.computed, scores=rep.scores, stats=rep.stats,
                      model_calls=rep.model_calls, policy=rep.policy)  # fmt: skip
        if sums:
            result["sums"] = torch.stack(sums)
    else:
        rows = asd.local_rows(BATCH)
        x_local, extra_local = asd.split(x, BATCH), asd.split(extra, BATCH)
        assert torch.equal(x_local, x[rows])
        out, rep = SAMPLERS[case.sampler](model, x_local, sigmas, extra_local, asd.data_parallel(case.policy()))
        whole, report = asd.gather(out), asd.gather_report(rep)
        result = dict(out=whole, local_rows=(rows.start, rows.stop), local_nfe=rep.nfe, computed=report.computed,
                      scores=report.scores, stats=report.stats, model_calls=report.model_calls, policy=report.policy)  # fmt: skip
    result["seconds"] = time.perf_counter() - t0
    return result


def fail_case(rank: int, world: int, how: str, out_dir: str) -> dict:
    """One process fails at model call FAIL_STEP of a sharded run on a group with a short timeout:
    ``exit`` (the process dies: its peers see the closed connection) or ``stall`` (it stays alive
    and stops calling: its peers wait for the group's timeout). The others must raise
    DistributedSkipError within a bounded time."""
    import torch.distributed as dist

    from adaptive_sampling.integrations import distributed as asd

    group = dist.new_group(list(range(world)), timeout=timedelta(seconds=FAIL_TIMEOUT_S))
    dist.barrier(group)
    g = GaussianWorkload.make(num_classes=3, shape=SHAPE, std=0.5, seed=0, dtype=torch.float64)
    _, x, extra = workload(torch.float64)
    sizes = shard_sizes(world)
    start = sum(sizes[:rank])
    # the denoiser is elementwise: cut its class means to this shard, so the model needs no
    # collective and the skip sums' all-reduce is the first to notice the missing process
    local = GaussianWorkload(g.means[..., start : start + sizes[rank]].contiguous(), g.std)
    failing = world - 1
    calls = {"n": 0}

    def model(xs, sigma, **kw):
        calls["n"] += 1
        if rank == failing and calls["n"] == FAIL_STEP:
            if how == "exit":
                os._exit(3)
            # alive, holding its connections, not calling, until the others have failed (each
            # leaves a marker file), so that they see the timeout, not a closed connection
            deadline = time.monotonic() + FAIL_TIMEOUT_S + 60
            while time.monotonic() < deadline and not all(
                os.path.exists(os.path.join(out_dir, f"failed{r}")) for r in range(world) if r != rank
            ):
                time.sleep(0.1)
            os._exit(4)
        return local.denoiser(xs, sigma, **kw)

    t0 = time.perf_counter()
    try:
        policy = asd.shard(ThirdOrder(delta=0.05, backend="torch"), group)
        sample_euler(model, shard_of(x, rank, world), SIGMAS, extra, disable=True, skip=policy)
        result = dict(error=None, seconds=time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001 - what the test checks
        result = dict(error=type(e).__name__, message=str(e), seconds=time.perf_counter() - t0, calls=calls["n"])
    open(os.path.join(out_dir, f"failed{rank}"), "w").close()
    return result


def main(rank: int, world: int, init_file: str, out_dir: str, fail: str) -> None:
    torch.set_num_threads(1)
    results: dict = {"rank": rank, "world": world, "t_main": time.time()}
    path = os.path.join(out_dir, f"rank{rank}.pt")
    try:
        import torch.distributed as dist

        t0 = time.perf_counter()
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=GROUP_TIMEOUT_S)
        )
        results["init_seconds"] = time.perf_counter() - t0
        for case in cases(world):
            results[case.name] = run_case(case, rank, world)
        dist.barrier()
        results["fail"] = None
        torch.save(results, path)  # saved before the failure scenario (a failing process exits in it)
        results["fail"] = fail_case(rank, world, fail, out_dir)
    except Exception:  # noqa: BLE001 - reported to the test
        results["traceback"] = traceback.format_exc()
    torch.save(results, path)
    os._exit(0)
