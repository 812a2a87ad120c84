"""The main demo: is adaptive skipping worth it on a real (small) learned model?

    python -m adaptive_sampling.demo [--steps 50] [--batch 10] [--out demo_output]

On the shipped class-conditional digits denoiser (classifier-free guidance, one sample per
class), for DDIM, DPM-Solver++(2M) and Euler with a 50-step Karras grid, it runs the paper's
rule (``ThirdOrder``, reference and paper criteria), the newer families (``LocalError`` with an
eps forecast, ``Budget`` at 60% of the calls, a uniform-stride mask with an eps forecast), and
every baseline at the same number of model calls per sample: uniform stride, fewer steps, a
random mask and the greedy optimal path (for the reference rule).
It prints one table (NFE, speedup = steps / NFE, PSNR and SSIM against the full-step output, and
PSNR against the ODE truth: a 250-step DPM-Solver++ solve from the same noise)
and writes to the output folder:

* ``grid.png``: full / adaptive / uniform / fewer steps, per sampler;
* ``nfe_vs_psnr.png``: quality against calls for every family over its threshold or budget,
  with the uniform-stride and fewer-steps curves and the greedy oracle;
* ``masks.png``: which steps each sample computed (adaptive and greedy);
* ``table.md``: the printed table.

Everything is offline and seeded; it needs matplotlib for the plots.
"""

from __future__ import annotations

import argparse
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from .baselines import uniform_mask
from .policies import Budget, Extrapolate, FixedMask, LocalError, ThirdOrder
from .evaluate import SAMPLERS, evaluate
from .metrics import psnr
from .progress import Bar
from .schedules import get_sigmas_karras

DELTAS = {"reference": [0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5], "paper": [0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 1.2]}
TRUTH_STEPS = 250  # the ODE truth: DPM-Solver++(2M) with this many Karras steps
TOLS = [1e-4, 3e-4, 6e-4, 1e-3, 2e-3, 4e-3, 1e-2, 3e-2]
FRACTIONS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def demo_policies(steps: int) -> dict:
    """The families the demo compares: the paper's rule (both criteria) and the newer ones."""
    k = max(5, round(0.6 * steps))
    return {
        "reference": ThirdOrder(),
        "paper": ThirdOrder(criterion="paper"),
        "local_error": LocalError(),
        f"budget({k})": Budget(k),
        f"uniform({k})+forecast": FixedMask(uniform_mask(steps, k), reuse=Extrapolate(1)),
    }


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m adaptive_sampling.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=50, help="solver steps (default 50)")
    p.add_argument("--batch", type=int, default=10, help="samples, one class each (default 10: the digits 0-9)")
    p.add_argument("--cond-scale", type=float, default=2.0, help="classifier-free guidance scale (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("demo_output"), help="folder for the PNGs (default ./demo_output)")
    p.add_argument("--no-greedy", action="store_true", help="skip the greedy oracle (the slowest part)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.steps < 6 or args.batch < 1:
        p.error("need --steps >= 6 and --batch >= 1")
    return args


def main(argv=None) -> int:
    args = _parse(argv)
    import matplotlib

    matplotlib.use("Agg")
    from .workloads.learned import RECOMMENDED_SIGMA_MAX, RECOMMENDED_SIGMA_MIN, cfg_denoiser, load_pretrained

    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    model = cfg_denoiser(load_pretrained(), args.cond_scale)
    model(torch.zeros(2, 1, 8, 8), torch.ones(2), torch.zeros(2, dtype=torch.long))  # warm-up: first-call costs stay out of the timings
    labels = torch.arange(args.batch) % 10
    noise = torch.randn(args.batch, 1, 8, 8, generator=torch.Generator().manual_seed(args.seed))
    schedule = partial(get_sigmas_karras, sigma_min=RECOMMENDED_SIGMA_MIN, sigma_max=RECOMMENDED_SIGMA_MAX)
    extra = {"y": labels}
    policies = demo_policies(args.steps)
    print(f"digits denoiser, {args.batch} samples (classes {labels.tolist()}), {args.steps} Karras steps "
          f"sigma {RECOMMENDED_SIGMA_MAX:g} -> {RECOMMENDED_SIGMA_MIN:g}, guidance {args.cond_scale:g}")  # fmt: skip
    baselines = ("uniform", "fewer_steps", "dpmpp_2m_steps", "random") + (() if args.no_greedy else ("greedy",))
    ev = evaluate(model, noise, schedule, policies, steps=args.steps, extra_args=extra, baselines=baselines,
                  greedy_for=["reference"], truth_steps=TRUTH_STEPS, disable=args.quiet)  # fmt: skip
    curves = _sweep(model, noise, schedule, extra, ev, args.steps, args.quiet)

    args.out.mkdir(parents=True, exist_ok=True)
    table = ev.table()
    (args.out / "table.md").write_text(
        f"# adaptive_sampling demo\n\n`python -m adaptive_sampling.demo --steps {args.steps} --batch {args.batch} "
        f"--cond-scale {args.cond_scale:g} --seed {args.seed}`\n\nPSNR/SSIM against the full-step output from the same "
        f"noise (data range 2), and PSNR against the ODE truth ({TRUTH_STEPS}-step DPM-Solver++); NFE per sample averaged; "
        f"speedup = steps / NFE.\n\n{table}\n"
    )
    _plot_grid(ev, args.out / "grid.png")
    _plot_curves(ev, curves, args.out / "nfe_vs_psnr.png")
    _plot_masks(ev, args.out / "masks.png")
    print()
    print(table)
    print(f"\nwrote {', '.join(p.name for p in sorted(args.out.glob('*')))} to {args.out.resolve()}")
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


def _sweep(model, noise, schedule, extra, ev, steps, quiet):
    """Mean NFE and PSNR per sampler for every family over its threshold (or budget), and for
    uniform / fewer steps over K."""
    ks = sorted({max(4, round(steps * f)) for f in FRACTIONS})
    sigmas = schedule(steps)
    families = {
        **{c: [ThirdOrder(delta=d, criterion=c) for d in deltas] for c, deltas in DELTAS.items()},
        "local_error": [LocalError(tol=t) for t in TOLS],
        "budget": [Budget(max(k, 4)) for k in ks],
        "uniform+forecast": [FixedMask(uniform_mask(steps, k), reuse=Extrapolate(1)) for k in ks],
    }
    total = len(SAMPLERS) * (sum(len(v) for v in families.values()) + 2 * len(ks))
    curves = {}
    with Bar(total, "families sweep", quiet) as bar:
        for name, sample in SAMPLERS.items():
            ref = ev.references[name]
            x = noise * sigmas[0]

            def point(out, nfe):
                return float(np.mean(nfe)), float(np.mean(psnr(out, ref)))

            for family, policies in families.items():
                pts = []
                for policy in policies:
                    out, rep = sample(model, x, sigmas, extra, disable=True, skip=policy)
                    pts.append(point(out, rep.nfe))
                    bar.update()
                curves[(name, family)] = pts
            uni, few = [], []
            for k in ks:
                out, rep = sample(model, x, sigmas, extra, disable=True, skip=FixedMask(uniform_mask(steps, k)))
                uni.append(point(out, rep.nfe))
                grid = schedule(k)
                out, rep = sample(model, noise * grid[0], grid, extra, disable=True)
                few.append(point(out, rep.nfe))
                bar.update(2)
            curves[(name, "uniform")], curves[(name, "fewer_steps")] = uni, few
    return curves


def _images(t: torch.Tensor) -> np.ndarray:
    """[B, 1, H, W] in [-1, 1] -> one row image [H, B * (W + 1)] in [0, 1]."""
    imgs = ((t[:, 0].float().clamp(-1, 1) + 1) / 2).cpu().numpy()
    H, W = imgs.shape[1:]
    row = np.ones((H, imgs.shape[0] * (W + 1)))
    for i, im in enumerate(imgs):
        row[:, i * (W + 1) : i * (W + 1) + W] = im
    return row


def _plot_grid(ev, path):
    import matplotlib.pyplot as plt

    methods = [("full", ""), ("adaptive", "reference"), ("uniform", "reference"), ("fewer_steps", "reference")]
    samplers = list(ev.references)
    batch = ev.references[samplers[0]].shape[0]
    fig, axes = plt.subplots(len(samplers), 1, figsize=(2.2 + 0.55 * batch, 2.3 * len(samplers)), squeeze=False)
    for ax, name in zip(axes[:, 0], samplers):
        rows, labels = [], []
        for method, pol in methods:
            r = ev.select(name, method, pol or None)[0]
            rows.append(_images(r.output))
            extra = "" if method == "full" else f", {np.mean(r.psnr):.1f} dB"
            labels.append(f"{method.replace('_', ' ')} (NFE {np.mean(r.nfe):.0f}{extra})")
        ax.imshow(np.concatenate([np.vstack([r, np.ones((1, r.shape[1]))]) for r in rows]), cmap="gray", vmin=0, vmax=1)
        ax.set_yticks([(i + 0.5) * (rows[0].shape[0] + 1) for i in range(len(rows))], labels, fontsize=7)
        ax.set_xticks([])
        ax.set_title(name, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def _plot_curves(ev, curves, path):
    import matplotlib.pyplot as plt

    samplers = list(ev.references)
    fig, axes = plt.subplots(1, len(samplers), figsize=(4.6 * len(samplers), 4.0), squeeze=False)
    style = {"reference": "o-", "paper": "s-", "local_error": "D-", "budget": "P-", "uniform+forecast": "X-",
             "uniform": "^--", "fewer_steps": "v--"}  # fmt: skip
    sweep = {"reference": " (delta sweep)", "paper": " (delta sweep)", "local_error": " (tol sweep)", "budget": " (nfe sweep)"}
    for ax, name in zip(axes[0], samplers):
        for key, fmt in style.items():
            pts = np.array(curves[(name, key)])
            ax.plot(pts[:, 0], pts[:, 1], fmt, ms=4, label=key.replace("_", " ") + sweep.get(key, ""))
        for i, r in enumerate(ev.select(name, "greedy")):
            ax.plot(np.mean(r.nfe), np.mean(r.psnr), "k*", ms=10, label="greedy oracle" if i == 0 else None)
        ax.set_title(f"{name}, {ev.steps} steps", fontsize=9)
        ax.set_xlabel("model calls per sample (NFE)")
        ax.set_ylabel("PSNR vs full run (dB)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def _plot_masks(ev, path):
    import matplotlib.pyplot as plt

    samplers = list(ev.references)
    kinds = [k for k in ("adaptive", "greedy") if ev.select(method=k, policy="reference")]
    fig, axes = plt.subplots(len(samplers), len(kinds), figsize=(5 * len(kinds), 1.2 + 0.25 * len(samplers) * 4), squeeze=False)
    for i, name in enumerate(samplers):
        for j, kind in enumerate(kinds):
            r = ev.select(name, kind, "reference")[0]
            ax = axes[i][j]
            ax.imshow(r.mask, aspect="auto", cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(f"{name}: {kind} (dark = model called), NFE {np.mean(r.nfe):.1f}", fontsize=8)
            ax.set_ylabel("sample", fontsize=7)
            ax.set_xlabel("step", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
