"""NFE and quality of every supported k-diffusion sampler wrapped with the paper's rule, `ThirdOrder()`.

    python bench/k_diffusion_nfe.py [--steps 50] [--batch 10] [--out bench/results/k_diffusion_nfe.md]

Workload: the shipped digits denoiser with guidance 2 (one sample per class), a Karras grid from
sigma 20 to 0.002. For each sampler in ``adaptive_sampling.integrations.k_diffusion.SUPPORTED_SAMPLERS``
(and Euler with churn), the wrapped sampler runs with ``ThirdOrder()`` and the unwrapped one from
the same seed; the table gives NFE per sample (mean, min, max), the unwrapped NFE, and the PSNR of
the wrapped output against the unwrapped one (data range 2). Stochastic samplers use the same seed
for both runs, so their noise draws coincide.
"""

from __future__ import annotations

import argparse
import platform
import time
import warnings
from datetime import date
from pathlib import Path

import numpy as np
import torch

from adaptive_sampling import ThirdOrder, get_sigmas_karras
from adaptive_sampling.integrations.k_diffusion import SUPPORTED_SAMPLERS, TWO_CALL, adaptive
from adaptive_sampling.evaluation.metrics import psnr
from adaptive_sampling.evaluation.workloads.learned import RECOMMENDED_SIGMA_MAX, RECOMMENDED_SIGMA_MIN, cfg_denoiser, load_pretrained

STOCHASTIC = {"sample_euler_ancestral", "sample_dpm_2_ancestral", "sample_dpmpp_2s_ancestral", "sample_dpmpp_sde",
              "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde", "sample_euler (s_churn=1)"}  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "k_diffusion_nfe.md")
    args = p.parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from k_diffusion import sampling as K
    torch.set_grad_enabled(False)
    model = cfg_denoiser(load_pretrained(), 2.0)
    sigmas = get_sigmas_karras(args.steps, RECOMMENDED_SIGMA_MIN, RECOMMENDED_SIGMA_MAX, dtype=torch.float32)
    x = torch.randn(args.batch, 1, 8, 8, generator=torch.Generator().manual_seed(args.seed)) * sigmas[0]
    extra = {"y": torch.arange(args.batch) % 10}
    cases = [(name, getattr(K, name), {}) for name in SUPPORTED_SAMPLERS]
    cases.insert(1, ("sample_euler (s_churn=1)", K.sample_euler, {"s_churn": 1.0}))
    t0 = time.perf_counter()
    lines = [
        "# k-diffusion samplers wrapped with the paper's rule, ThirdOrder()",
        "",
        f"Command: `python bench/k_diffusion_nfe.py --steps {args.steps} --batch {args.batch} --seed {args.seed}`  ",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, Python {platform.python_version()}, "
        f"torch {torch.__version__}; {date.today()}.",
        "",
        f"Workload: shipped digits denoiser, guidance 2, {args.batch} samples (one per class), {args.steps} Karras steps "
        f"sigma {RECOMMENDED_SIGMA_MAX:g} -> {RECOMMENDED_SIGMA_MIN:g}. Policy: `ThirdOrder()` (reference criterion, "
        "delta 0.01, max_skips 4, per sample; space: the sampler's default). PSNR: wrapped vs unwrapped output, same seed.",
        "",
        "| sampler | kind | space | NFE unwrapped | NFE wrapped (mean, min-max) | calls saved | PSNR vs unwrapped (dB) |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for name, fn, kw in cases:
        torch.manual_seed(args.seed)
        want = fn(model, x, sigmas, extra, disable=True, **kw)
        torch.manual_seed(args.seed)
        got, rep = adaptive(fn, ThirdOrder()).with_report(model, x, sigmas, extra, disable=True, **kw)
        base = args.steps + (rep.extra_evaluations if name in TWO_CALL else 0)
        kind = ("two calls/step" if name in TWO_CALL else "one call/step") + (", stochastic" if name in STOCHASTIC else "")
        lines.append(
            f"| {name} | {kind} | {rep.space} | {base} | {rep.nfe.mean():.1f} ({rep.nfe.min()}-{rep.nfe.max()}) | "
            f"{100 * (1 - rep.nfe.mean() / base):.0f}% | {np.mean(psnr(got, want)):.1f} |"
        )
        print(lines[-1])
    lines += ["", f"Total {time.perf_counter() - t0:.0f} s."]
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
