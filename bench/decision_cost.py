"""Per-step cost of each policy's decision (and of its reuse) at Stable Diffusion 1.5 latent size.

    python bench/decision_cost.py [--device cpu] [--out bench/results/decision_cost_cpu.md]

One step of a policy is what the runner asks of its controller per model call: ``decide`` (the
rule, its guards and the one device-to-host read), ``record`` of the computed eps and, for a
skipped call, ``reuse`` (the eps a skipped row gets). Latents are SD-1.5's [B, 4, 64, 64] at
batch 1 and 8 in float32 and float16, on a smooth synthetic trajectory. Median of repeated
steps, in microseconds; ``FixedMask`` (the kernel's NaN check only) is the floor every policy
pays. LocalError and Budget(LocalError) decide in torch (no kernel): this measures what that costs.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from adaptive_sampling import Budget, Extrapolate, FixedMask, LocalError, ThirdOrder, get_sigmas_karras

STEPS = 50
STEP = 20  # a decided step well after warm-up


def policies():
    return {
        "FixedMask (NaN check only)": FixedMask(np.ones(STEPS, bool)),
        "ThirdOrder reference": ThirdOrder(backend="auto"),
        "ThirdOrder paper": ThirdOrder(criterion="paper", backend="auto"),
        "LocalError, copy": LocalError(reuse="copy"),
        "LocalError, Extrapolate(1)": LocalError(),
        "Budget(30, LocalError)": Budget(30),
        "Budget(30, ThirdOrder)": Budget(30, rule=ThirdOrder(backend="auto")),
    }


def measure(policy, batch: int, dtype: torch.dtype, device: str, repeats: int) -> tuple[float, float]:
    """(median us of decide + record, median us of reuse) at a decided step."""
    g = torch.Generator().manual_seed(0)
    sigmas = get_sigmas_karras(STEPS, 0.03, 14.6, device="cpu").double()
    base = torch.randn(batch, 4, 64, 64, generator=g)
    drift = torch.randn(batch, 4, 64, 64, generator=g)
    xs = [(base + drift * (k / STEPS)).to(device, dtype) for k in range(STEPS)]
    eps = [(drift * (1 + k / STEPS)).to(device, dtype) for k in range(STEPS)]
    sig = [torch.full((batch,), float(sigmas[k]), device=device, dtype=dtype) for k in range(STEPS)]
    decide, reuse = [], []
    for _ in range(repeats):
        c = policy.start(xs[0], STEPS, "ddim", sigmas=sigmas)
        for k in range(STEP + 1):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            c.decide(k, xs[k], sig[k])
            c.record(k, sig[k], eps[k], None)
            t1 = time.perf_counter()
            out = c.reuse(k, sig[k])
            if device == "cuda":
                torch.cuda.synchronize()
            t2 = time.perf_counter()
            del out
            if k == STEP:
                decide.append(t1 - t0)
                reuse.append(t2 - t1)
    return float(np.median(decide) * 1e6), float(np.median(reuse) * 1e6)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    rows = []
    for batch in (1, 8):
        for dtype in (torch.float32, torch.float16):
            for name, policy in policies().items():
                d, r = measure(policy, batch, dtype, args.device, args.repeats)
                rows.append((batch, str(dtype).replace("torch.", ""), name, d, r))
                print(f"batch {batch} {dtype}: {name}: decide+record {d:.0f} us, reuse {r:.0f} us", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dev = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    lines = [
        "# Per-step decision cost at SD-1.5 latent size ([B, 4, 64, 64])",
        "",
        f"Command: `python bench/decision_cost.py --device {args.device}`  ",
        f"Device: {dev}; torch {torch.__version__}; Python {platform.python_version()}; commit {commit}; {date.today()}.",
        "",
        __doc__.split("\n\n")[2].replace("\n", " "),
        "",
        "| batch | dtype | policy | decide + record (us) | reuse (us) |",
        "|---:|---|---|---:|---:|",
    ]
    lines += [f"| {b} | {dt} | {n} | {d:.0f} | {r:.0f} |" for b, dt, n, d, r in rows]
    text = "\n".join(lines) + "\n"
    out = args.out or Path(__file__).resolve().parent / "results" / f"decision_cost_{args.device}_{date.today()}.md"
    out.write_text(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
