"""The reference rule on the shapes model: NFE and PSNR against fewer steps and uniform stride at matched NFE.

    python bench/shapes_eval.py [--steps 50] [--batch 20] [--seeds 0 1 2] [--cond-scale 3]

For each grid (SD's DDPM-discrete grid with leading and with trailing spacing, and a Karras grid
over the model's training sigmas) and each sampler (DDIM, DPM-Solver++ 2M, Euler), on the shipped
shapes UNet with classifier-free guidance, it runs ``adaptive_sampling.evaluation.evaluate`` with the
reference rule at its defaults (``ThirdOrder()``: delta 0.01, C_max 4, per sample, the reference
latent space) and the matched-NFE baselines uniform stride and fewer steps (a K-step grid of the
same kind: with leading spacing that grid also starts lower, as in diffusers). PSNR is against
the 50-step output from the same noise (data range 2). Each seed is one batch of ``--batch``
samples (labels 0..9 repeated) and its own noise; the tables give the median over seeds of the
per-seed mean, and min..max over seeds.

Writes ``--out`` (markdown) and ``--figure`` (sample grid: full, adaptive, fewer steps, uniform,
per sampler, on the leading grid, first seed).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from datetime import date
from functools import partial
from pathlib import Path

os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adaptive_sampling import ThirdOrder  # noqa: E402
from adaptive_sampling.evaluation import evaluate  # noqa: E402
from adaptive_sampling.evaluation.workloads import shapes  # noqa: E402

SAMPLERS = ("ddim", "dpmpp_2m", "euler")
METHODS = ("full", "adaptive", "uniform", "fewer_steps")


def grids():
    return {
        "ddpm-leading": partial(shapes.sigmas, spacing="leading"),
        "ddpm-trailing": partial(shapes.sigmas, spacing="trailing"),
        "karras": shapes.karras_sigmas,
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=20)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--cond-scale", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "shapes_eval.md")
    p.add_argument("--figure", type=Path, default=ROOT / "docs" / "shapes_grid.png")
    p.add_argument("--figure-only", action="store_true", help="only the figure (first seed, leading grid); the report is left as is")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    unet, _ = shapes.load_pretrained()
    model = shapes.denoiser(args.cond_scale, unet)
    classifier = shapes.load_classifier()
    labels = torch.arange(args.batch) % 10
    rows = {}  # (grid, sampler, method) -> list over seeds of (mean NFE, mean PSNR)
    accuracy = {}  # (grid, sampler, method) -> list over seeds of classifier accuracy
    first = None
    if args.figure_only:
        noise = torch.randn(args.batch, *shapes.IMAGE_SHAPE, generator=torch.Generator().manual_seed(args.seeds[0]))
        ev = evaluate(model, noise, grids()["ddpm-leading"], {"reference": ThirdOrder()}, steps=args.steps, samplers=SAMPLERS,
                      extra_args={"y": labels}, baselines=("uniform", "fewer_steps"), disable=True)  # fmt: skip
        plot(ev, args.figure, args.cond_scale)
        return 0
    for seed in args.seeds:
        noise = torch.randn(args.batch, *shapes.IMAGE_SHAPE, generator=torch.Generator().manual_seed(seed))
        for gname, schedule in grids().items():
            ev = evaluate(model, noise, schedule, {"reference": ThirdOrder()}, steps=args.steps, samplers=SAMPLERS,
                          extra_args={"y": labels}, baselines=("uniform", "fewer_steps"), disable=True)  # fmt: skip
            for r in ev.results:
                key = (gname, r.sampler, r.method)
                rows.setdefault(key, []).append((float(np.mean(r.nfe)), float(np.mean(r.psnr))))
                pred = classifier(r.output.float().clamp(-1, 1)).argmax(1)
                accuracy.setdefault(key, []).append((pred == labels).float().mean().item())
            if first is None and gname == "ddpm-leading":
                first = ev
            print(f"seed {seed} {gname}: {time.perf_counter() - t0:.0f} s", flush=True)
    write(args, rows, accuracy, time.perf_counter() - t0)
    plot(first, args.figure, args.cond_scale)
    print(args.out.read_text())
    return 0


def _stat(values):
    v = np.asarray(values)
    return np.median(v), v.min(), v.max()


def write(args, rows, accuracy, seconds):
    command = "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])
    lines = [
        "# Shapes model: the reference rule against matched-NFE baselines",
        "",
        f"`{command}` ({date.today()}, {seconds / 60:.1f} min on {platform.machine()},"
        f" torch {torch.__version__}, {torch.get_num_threads()} thread(s))",
        "",
        f"Shipped shapes UNet, guidance {args.cond_scale:g}, {args.steps} steps, {len(args.seeds)} seeds"
        f" ({', '.join(map(str, args.seeds))}) x {args.batch} samples (labels 0..9 repeated). Policy: `ThirdOrder()`"
        " (delta 0.01, C_max 4, per sample, VP latent for DDIM/DPM-Solver++, VE for Euler). Baselines at the"
        " adaptive run's NFE per sample: uniform-stride eps reuse on the same grid, and fewer steps (a K-step"
        " grid of the same kind from the same noise). PSNR in dB against the full 50-step output"
        " (data range 2); each cell is the median over seeds of the per-seed mean, with min..max over seeds."
        " Margin = adaptive PSNR minus the better baseline, per seed, then median (min..max). Accuracy: the"
        " shipped classifier on the outputs (median over seeds).",
        "",
        "| grid | sampler | NFE (adaptive) | speedup | adaptive PSNR | uniform PSNR | fewer-steps PSNR | margin (dB) |"
        " accuracy full / adaptive / fewer |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for gname in grids():
        for s in SAMPLERS:
            nfe = _stat([n for n, _ in rows[(gname, s, "adaptive")]])
            cells = {m: _stat([p for _, p in rows[(gname, s, m)]]) for m in ("adaptive", "uniform", "fewer_steps")}
            margin = _stat([a - max(u, f) for (_, a), (_, u), (_, f) in zip(
                rows[(gname, s, "adaptive")], rows[(gname, s, "uniform")], rows[(gname, s, "fewer_steps")])])  # fmt: skip
            acc = [np.median(accuracy[(gname, s, m)]) for m in ("full", "adaptive", "fewer_steps")]
            fmt = lambda c: f"{c[0]:.2f} ({c[1]:.2f}..{c[2]:.2f})"  # noqa: E731
            lines.append(
                f"| {gname} | {s} | {nfe[0]:.1f} ({nfe[1]:.1f}..{nfe[2]:.1f}) | {args.steps / nfe[0]:.2f}x | "
                f"{fmt(cells['adaptive'])} | {fmt(cells['uniform'])} | {fmt(cells['fewer_steps'])} | "
                f"{margin[0]:+.2f} ({margin[1]:+.2f}..{margin[2]:+.2f}) | "
                + " / ".join(f"{a:.2f}" for a in acc) + " |"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")


def plot(ev, path: Path, cond_scale: float, columns: int = 10) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def strip(t):
        imgs = ((t[:columns].float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
        pad = np.ones((32, 1, 3))
        return np.concatenate([np.concatenate([im, pad], axis=1) for im in imgs], axis=1)

    fig, axes = plt.subplots(len(SAMPLERS), 1, figsize=(1.6 + 0.62 * columns, 2.9 * len(SAMPLERS)), squeeze=False)
    for ax, name in zip(axes[:, 0], SAMPLERS):
        rows, ticks = [], []
        for method in METHODS:
            r = ev.select(name, method)[0]
            rows.append(strip(r.output))
            extra = "" if method == "full" else f", {np.mean(r.psnr):.1f} dB"
            label = "adaptive ThirdOrder()" if method == "adaptive" else method.replace("_", " ")
            ticks.append(f"{label} (NFE {np.mean(r.nfe):.1f}{extra})")
        gap = np.ones((1, rows[0].shape[1], 3))
        ax.imshow(np.concatenate([np.concatenate([r, gap]) for r in rows]), interpolation="nearest")
        ax.set_yticks([(i + 0.5) * 33 for i in range(len(rows))], ticks, fontsize=7)
        ax.set_xticks([])
        ax.set_title(f"{name}, DDPM leading grid, {ev.steps} steps, guidance {cond_scale:g}", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
