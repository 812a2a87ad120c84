"""The main demo: is adaptive skipping worth it on a real (small) learned model?

    python -m adaptive_sampling demo [--workload digits|shapes] [--steps 50] [--batch 10] [--out demo_output]

On a shipped class-conditional model (``digits``: the EDM MLP on 8x8 digits, 50 Karras steps;
``shapes``: the diffusers UNet with eps prediction on SD's DDPM schedule, 50 steps on the
leading-spacing grid as Stable Diffusion samples), with classifier-free guidance and one sample
per class, for DDIM, DPM-Solver++(2M) and Euler, it runs the library's default online policy
(``default_policy()``), the shipped calibrated schedule at 60% of the calls
(``workloads.calibrated``: calibrated on other seeds), the paper's rule (``ThirdOrder``,
reference and paper criteria), the other families (``LocalError`` with an eps forecast,
``Budget`` at 60% of the calls, a uniform-stride mask with an eps forecast), and every baseline at
the same number of model calls per sample: uniform stride, fewer steps, DPM-Solver++(2M) with
as many steps on the model's grid and on the shipped calibrated grid, a random mask and the
greedy optimal path (for the reference rule; digits only by default, it is slow on the UNet).
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
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..policies import Budget, BySampler, Extrapolate, FixedMask, LocalError, ThirdOrder, default_policy
from ..progress import Bar
from ..samplers.registry import get_sampler
from ..schedules import get_sigmas_karras
from .baselines import uniform_mask
from .metrics import psnr
from .suite import SAMPLERS, evaluate

DELTAS = {"reference": [0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5], "paper": [0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 1.2]}
TRUTH_STEPS = 250  # the ODE truth: DPM-Solver++(2M) with this many steps of the workload's grid
TOLS = [1e-4, 3e-4, 6e-4, 1e-3, 2e-3, 4e-3, 1e-2, 3e-2]
FRACTIONS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
CALIBRATED_STEPS = 50  # the shipped schedules were calibrated at 50 steps


@dataclass
class Workload:
    name: str
    model: Callable
    shape: tuple
    schedule: Callable[[int], torch.Tensor]
    describe: str


def load_workload(name: str, cond_scale: float) -> Workload:
    """The model, latent shape and grid of a shipped learned workload."""
    if name == "digits":
        from .workloads.learned import RECOMMENDED_SIGMA_MAX, RECOMMENDED_SIGMA_MIN, cfg_denoiser, load_pretrained

        schedule = partial(get_sigmas_karras, sigma_min=RECOMMENDED_SIGMA_MIN, sigma_max=RECOMMENDED_SIGMA_MAX)
        return Workload(name, cfg_denoiser(load_pretrained(), cond_scale), (1, 8, 8), schedule,
                        f"digits denoiser, Karras steps sigma {RECOMMENDED_SIGMA_MAX:g} -> {RECOMMENDED_SIGMA_MIN:g}")  # fmt: skip
    from .workloads import shapes

    return Workload(name, shapes.denoiser(cond_scale), shapes.IMAGE_SHAPE, partial(shapes.sigmas, spacing="leading"),
                    "shapes UNet (diffusers, eps, SD's DDPM schedule), DDPM grid with leading spacing")  # fmt: skip


def demo_policies(steps: int, workload: str = "digits") -> dict:
    """The families the demo compares: the default online policy, the shipped calibrated schedule,
    the paper's rule (both criteria) and the other families."""
    from .workloads import calibrated

    k = max(5, round(0.6 * steps))
    shipped = BySampler({s: calibrated.load(workload, s, 30).with_nfe(k) for s in SAMPLERS})
    return {
        "default": default_policy(),
        f"calibrated({k})": shipped,
        "reference": ThirdOrder(),
        "paper": ThirdOrder(criterion="paper"),
        "local_error": LocalError(),
        f"budget({k})": Budget(k),
        f"uniform({k})+forecast": FixedMask(uniform_mask(steps, k), reuse=Extrapolate(1)),
    }


def calibrated_grid(wl: Workload, steps: int) -> Callable[[int], torch.Tensor]:
    """K -> the shipped calibrated DPM-Solver++ grid with K steps, placed on the workload's ``steps``-step grid."""
    from .workloads import calibrated

    sigmas = wl.schedule(steps)
    return lambda k: calibrated.grid(wl.name, int(k), sigmas=sigmas)


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m adaptive_sampling demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", choices=("digits", "shapes"), default="digits", help="the learned model (default digits)")
    p.add_argument("--steps", type=int, default=50, help="solver steps (default 50)")
    p.add_argument("--batch", type=int, default=10, help="samples, one class each (default 10: classes 0-9)")
    p.add_argument("--cond-scale", type=float, default=2.0, help="classifier-free guidance scale (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("demo_output"), help="folder for the PNGs (default ./demo_output)")
    p.add_argument("--greedy", action=argparse.BooleanOptionalAction, default=None,
                   help="run the greedy oracle (default: on for digits, off for shapes, where it takes long)")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.steps < 6 or args.batch < 1:
        p.error("need --steps >= 6 and --batch >= 1")
    if args.greedy is None:
        args.greedy = args.workload == "digits"
    return args


def main(argv=None) -> int:
    args = _parse(argv)
    import matplotlib

    matplotlib.use("Agg")

    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    wl = load_workload(args.workload, args.cond_scale)
    labels = torch.arange(args.batch) % 10
    wl.model(torch.zeros(2, *wl.shape), torch.ones(2), torch.zeros(2, dtype=torch.long))  # warm-up: first-call costs stay out of the timings
    noise = torch.randn(args.batch, *wl.shape, generator=torch.Generator().manual_seed(args.seed))
    extra = {"y": labels}
    policies = demo_policies(args.steps, args.workload)
    print(f"{wl.describe}: {args.batch} samples (classes {labels.tolist()}), {args.steps} steps, guidance {args.cond_scale:g}")
    baselines = ("uniform", "fewer_steps", "dpmpp_2m_steps", "dpmpp_2m_grid", "random") + (("greedy",) if args.greedy else ())
    ev = evaluate(wl.model, noise, wl.schedule, policies, steps=args.steps, extra_args=extra, baselines=baselines,
                  greedy_for=["reference"], truth_steps=TRUTH_STEPS, disable=args.quiet,
                  grid_for=calibrated_grid(wl, args.steps))  # fmt: skip
    curves = _sweep(wl, noise, extra, ev, args.steps, args.quiet)

    args.out.mkdir(parents=True, exist_ok=True)
    table = ev.table()
    command = (f"python -m adaptive_sampling demo --workload {args.workload} --steps {args.steps} --batch {args.batch} "
               f"--cond-scale {args.cond_scale:g} --seed {args.seed}{'' if args.greedy else ' --no-greedy'}")  # fmt: skip
    (args.out / "table.md").write_text(
        f"# adaptive_sampling demo\n\n`{command}`\n\n{wl.describe}. PSNR/SSIM against the full-step output from the same "
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


def _sweep(wl: Workload, noise, extra, ev, steps, quiet):
    """Mean NFE and PSNR per sampler for every family over its threshold (or budget), and for
    uniform / fewer steps / DPM-Solver++ on the calibrated grid over K."""
    from ..samplers import sample_dpmpp_2m
    from .workloads import calibrated

    ks = sorted({max(4, round(steps * f)) for f in FRACTIONS})
    sigmas = wl.schedule(steps)
    shipped_ks = calibrated.available(wl.name)["euler"]
    families = {
        **{c: [ThirdOrder(delta=d, criterion=c) for d in deltas] for c, deltas in DELTAS.items()},
        "local_error": [LocalError(tol=t) for t in TOLS],
        "budget": [Budget(max(k, 4)) for k in ks],
        "uniform+forecast": [FixedMask(uniform_mask(steps, k), reuse=Extrapolate(1)) for k in ks],
        "calibrated": [BySampler({s: calibrated.load(wl.name, s, k).with_nfe(max(1, round(k * steps / CALIBRATED_STEPS)))
                                  for s in SAMPLERS}) for k in shipped_ks],  # fmt: skip
        "default": [default_policy()],
    }
    grid_for = calibrated_grid(wl, steps)
    total = len(SAMPLERS) * (sum(len(v) for v in families.values()) + 3 * len(ks))
    curves = {}
    with Bar(total, "families sweep", quiet) as bar:
        for name in SAMPLERS:
            sample = get_sampler(name).sample
            ref = ev.references[name]
            x = noise * sigmas[0]

            def point(out, nfe):
                return float(np.mean(nfe)), float(np.mean(psnr(out, ref)))

            for family, policies in families.items():
                pts = []
                for policy in policies:
                    out, rep = sample(wl.model, x, sigmas, extra, disable=True, skip=policy)
                    pts.append(point(out, rep.nfe))
                    bar.update()
                curves[(name, family)] = pts
            uni, few, cal = [], [], []
            for k in ks:
                out, rep = sample(wl.model, x, sigmas, extra, disable=True, skip=FixedMask(uniform_mask(steps, k)))
                uni.append(point(out, rep.nfe))
                grid = wl.schedule(k)
                out, rep = sample(wl.model, noise * grid[0], grid, extra, disable=True)
                few.append(point(out, rep.nfe))
                grid = grid_for(k)
                out, rep = sample_dpmpp_2m(wl.model, noise * grid[0], grid, extra, disable=True)
                cal.append(point(out, rep.nfe))
                bar.update(3)
            curves[(name, "uniform")], curves[(name, "fewer_steps")] = uni, few
            curves[(name, "dpmpp_2m on calibrated grid")] = cal
    return curves


def _images(t: torch.Tensor) -> np.ndarray:
    """[B, C, H, W] in [-1, 1] (C = 1 or 3) -> one row image [H, B * (W + 1), 3] in [0, 1]."""
    imgs = ((t.float().clamp(-1, 1) + 1) / 2).expand(-1, 3, -1, -1).permute(0, 2, 3, 1).cpu().numpy()
    H, W = imgs.shape[1:3]
    row = np.ones((H, imgs.shape[0] * (W + 1), 3))
    for i, im in enumerate(imgs):
        row[:, i * (W + 1) : i * (W + 1) + W] = im
    return row


def _plot_grid(ev, path):
    import matplotlib.pyplot as plt

    methods = [("full", ""), ("adaptive", "default"), ("adaptive", "reference"), ("fewer_steps", "reference"), ("uniform", "reference")]
    samplers = list(ev.references)
    batch = ev.references[samplers[0]].shape[0]
    fig, axes = plt.subplots(len(samplers), 1, figsize=(2.2 + 0.55 * batch, 2.3 * len(samplers)), squeeze=False)
    for ax, name in zip(axes[:, 0], samplers):
        rows, labels = [], []
        for method, pol in methods:
            r = ev.select(name, method, pol or None)[0]
            rows.append(_images(r.output))
            extra = "" if method == "full" else f", {np.mean(r.psnr):.1f} dB"
            what = {"adaptive": pol}.get(method, method.replace("_", " "))
            labels.append(f"{what} (NFE {np.mean(r.nfe):.0f}{extra})")
        ax.imshow(np.concatenate([np.vstack([r, np.ones((1, *r.shape[1:]))]) for r in rows]), vmin=0, vmax=1)
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
    style = {"default": "r*", "calibrated": "C9o-", "reference": "o-", "paper": "s-", "local_error": "D-", "budget": "P-",
             "uniform+forecast": "X-", "uniform": "^--", "fewer_steps": "v--", "dpmpp_2m on calibrated grid": "k:"}  # fmt: skip
    sweep = {"reference": " (delta sweep)", "paper": " (delta sweep)", "local_error": " (tol sweep)", "budget": " (nfe sweep)",
             "calibrated": " (shipped, K sweep)", "default": " (default_policy())"}  # fmt: skip
    for ax, name in zip(axes[0], samplers):
        for key, fmt in style.items():
            pts = np.array(curves[(name, key)])
            ax.plot(pts[:, 0], pts[:, 1], fmt, ms=9 if key == "default" else 4, label=key.replace("_", " ") + sweep.get(key, ""))
        greedy = ev.select(name, "greedy", "reference")
        if greedy:
            ax.plot(np.mean(greedy[0].nfe), np.mean(greedy[0].psnr), "k*", ms=10, label="greedy oracle (at the paper rule's NFE)")
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
