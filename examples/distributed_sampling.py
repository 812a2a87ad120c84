"""Adaptive skipping under torch.distributed: data parallel and a sharded latent, on the shipped workload.

    torchrun --nproc_per_node 2 examples/distributed_sampling.py      # CPU: gloo; GPUs: nccl

(with the package installed, or ``PYTHONPATH=.`` from the repository root). Every process also
runs the single-process reference (the whole batch in one process) and the script prints, per
policy, each rank's NFE and whether the distributed outputs and masks equal the reference's.

Workload: the learned digits denoiser with classifier-free guidance 2.0, 50 Karras steps
(sigma 0.002..20), DPM-Solver++(2M), a batch of 8 latents [1, 8, 8], labels 0..7.

* data parallel: each process samples its rows (``distributed.split``); per-sample policies need
  no communication, the batch-wide one is pooled over the group (``distributed.data_parallel``);
  outputs and reports are gathered (``distributed.gather`` / ``gather_report``);
* sharded latent: every process holds rows 4r..4r+3 of the 8 pixel rows of every sample and
  decides through ``distributed.shard(policy)``. The model needs the whole latent, so
  ``GatherModel`` all-gathers the shards, runs the model and keeps this process's shard: a test
  harness for the decision logic (every process runs the whole model), NOT model parallelism.
  Its all-gather is the model collective that would hang if the processes disagreed.
"""

from __future__ import annotations

import os
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from adaptive_sampling import LocalError, ThirdOrder, get_sigmas_karras, sample_dpmpp_2m
from adaptive_sampling.integrations import distributed as asd
from adaptive_sampling.evaluation.workloads.learned import cfg_denoiser, load_pretrained

BATCH, STEPS = 8, 50
SHARD_DIM = -2  # rows of pixels


class GatherModel:
    """Test harness (see the module docstring): all-gather the shards along ``dim``, run the
    whole-latent model, return this process's shard of its output."""

    def __init__(self, model, dim: int = SHARD_DIM, group=None) -> None:
        self.model, self.dim, self.group = model, dim, group

    def __call__(self, x, sigma, **extra):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(self.group))]  # equal shards here
        dist.all_gather(parts, x.contiguous(), group=self.group)
        out = self.model(torch.cat(parts, dim=self.dim), sigma, **extra)
        return out.tensor_split(len(parts), dim=self.dim)[dist.get_rank(self.group)].contiguous()


def compare(got: torch.Tensor, want: torch.Tensor) -> str:
    if torch.equal(got, want):
        return "bit-identical"
    return f"max |diff| {float((got - want).abs().max()):.2e}"


def main() -> None:
    torch.set_num_threads(1)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if (8 % world) != 0:
        raise SystemExit("the sharded part splits the 8 pixel rows evenly: use 1, 2, 4 or 8 processes")

    model = cfg_denoiser(load_pretrained(device), 2.0)
    sigmas = get_sigmas_karras(STEPS, 0.002, 20.0, device=device)
    noise = torch.randn(BATCH, 1, 8, 8, generator=torch.Generator().manual_seed(0)).to(device) * 20
    labels = torch.arange(BATCH, device=device) % 10

    def sample(x, skip, y=labels, net=model):
        return sample_dpmpp_2m(net, x, sigmas, extra_args={"y": y}, disable=True, skip=skip)

    lines = []
    policies = {
        "ThirdOrder()": ThirdOrder(),
        "LocalError()": LocalError(),
        "ThirdOrder(per_sample=False)": ThirdOrder(per_sample=False),
    }
    for name, policy in policies.items():
        ref_out, ref = sample(noise, policy)  # the single-process run (whole batch, whole latent)
        # data parallel
        rows = asd.local_rows(BATCH)
        out, rep = sample(asd.split(noise), asd.data_parallel(policy), y=asd.split(labels))
        whole, report = asd.gather(out), asd.gather_report(rep)
        lines.append(
            f"data parallel  {name:29s} rank {rank}: rows {rows.start}-{rows.stop - 1}, NFE {rep.nfe.tolist()}; "
            f"whole batch: masks {'equal' if np.array_equal(report.computed, ref.computed) else 'DIFFER'}, "
            f"outputs {compare(whole, ref_out)} vs one process (mean NFE {ref.nfe.mean():.1f})"
        )
        # sharded latent
        x_shard = noise.tensor_split(world, dim=SHARD_DIM)[rank].contiguous()
        out, rep = sample(x_shard, asd.shard(policy), net=GatherModel(model))
        agree = asd.decisions_agree(rep)
        full = torch.cat([p for p in _all_gather(out)], dim=SHARD_DIM)
        lines.append(
            f"sharded        {name:29s} rank {rank}: NFE {rep.nfe.tolist()}; ranks agree: {agree}; "
            f"masks {'equal' if np.array_equal(rep.computed, ref.computed) else 'DIFFER'}, "
            f"outputs {compare(full, ref_out)} vs one process"
        )
    every: list = [None] * world
    dist.all_gather_object(every, lines)
    if rank == 0:
        print(f"{world} processes ({backend}), {BATCH} samples, {STEPS} steps, DPM-Solver++(2M), digits model, CFG 2.0")
        for i in range(len(lines)):
            for r in range(world):
                print(every[r][i])
    dist.barrier()
    dist.destroy_process_group()


def _all_gather(x: torch.Tensor) -> list[torch.Tensor]:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return parts


if __name__ == "__main__":
    main()
