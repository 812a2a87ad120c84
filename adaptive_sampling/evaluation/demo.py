"""The main demo: is skipping worth it on a real (small) learned model?

    python -m adaptive_sampling demo [--workload digits|shapes|flow] [--steps N] [--batch B] [--threads T] [--out DIR]

``digits`` (default; the EDM MLP on 8x8 digits, 50 Karras steps) and ``shapes`` (the diffusers UNet
with eps prediction on SD's DDPM schedule, 50 steps on the leading-spacing grid as Stable Diffusion
samples) run the library's samplers (DDIM, Euler, DPM-Solver++(2M)) with guidance and one sample per
class: the recommended ``default_policy()`` (exactly half the calls), the shipped calibrated
schedule at 60% of the calls (calibrated on other seeds), the paper's rule ``ThirdOrder()`` (and its
paper criterion), ``LocalError()``, ``Budget(K)`` and uniform stride with a forecast, each against
every baseline at the same calls per sample: fewer steps, uniform stride, DPM-Solver++(2M) with as
many steps on the model's grid and on the shipped calibrated grid, a random mask, and the greedy
optimal path (digits only by default: slow on the UNet). ``flow`` runs the shipped flow transformer
through diffusers' ``FluxPipeline`` next to diffusers' caches and cache-dit (``demo_flow``).

It prints a short summary (what was compared, the takeaway, a table in calls, speedup and quality
against the full run and the ODE solution) and writes to ``--out``:

* ``table.md``: every row (all policies, every baseline at each policy's calls);
* ``grid.png``: DPM-Solver++(2M) samples of the full run, the recommended options and the baselines,
  with their differences to the full run, amplified (the gain is in the picture);
* ``nfe_vs_psnr.png``: quality against calls for every option over its knob, per sampler;
* ``masks.png``: which steps each sample computed, per policy.

Everything is offline and seeded; the pictures need matplotlib (``--no-plots`` skips them).
"""

from __future__ import annotations

import argparse
import os
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
SAMPLER_NAMES = {"ddim": "DDIM", "euler": "Euler", "dpmpp_2m": "DPM-Solver++(2M)"}
IDENTICAL_DB = 99.99  # psnr() caps identical outputs at 100 dB

# the policies, by the names the README and the docs use
DEFAULT = "default_policy()"
PAPER = "ThirdOrder() (the paper)"
PAPER_CRITERION = "ThirdOrder(criterion='paper')"
LOCAL_ERROR = "LocalError()"


def calibrated_name(k: int) -> str:
    return f"calibrated schedule ({k} calls)"


def budget_name(k: int) -> str:
    return f"Budget({k})"


def uniform_name(k: int) -> str:
    return f"uniform stride + forecast ({k} calls)"


@dataclass
class Workload:
    name: str
    model: Callable
    shape: tuple
    schedule: Callable[[int], torch.Tensor]
    describe: str


def load_workload(name: str, cond_scale: float) -> Workload:
    """The model, latent shape and grid of a shipped learned workload (digits or shapes)."""
    if name == "digits":
        from .workloads.learned import RECOMMENDED_SIGMA_MAX, RECOMMENDED_SIGMA_MIN, cfg_denoiser, load_pretrained

        schedule = partial(get_sigmas_karras, sigma_min=RECOMMENDED_SIGMA_MIN, sigma_max=RECOMMENDED_SIGMA_MAX)
        return Workload(name, cfg_denoiser(load_pretrained(), cond_scale), (1, 8, 8), schedule,
                        f"the shipped digits model (EDM MLP, 8x8), Karras steps sigma {RECOMMENDED_SIGMA_MAX:g} -> {RECOMMENDED_SIGMA_MIN:g}")  # fmt: skip
    from .workloads import shapes

    return Workload(name, shapes.denoiser(cond_scale), shapes.IMAGE_SHAPE, partial(shapes.sigmas, spacing="leading"),
                    "the shipped shapes UNet (diffusers, eps prediction, SD's DDPM schedule), leading-spacing grid")  # fmt: skip


def demo_policies(steps: int, workload: str = "digits") -> dict:
    """The options the demo compares, by their README names."""
    from .workloads import calibrated

    k = max(5, round(0.6 * steps))
    shipped = BySampler({s: calibrated.load(workload, s, 30).with_nfe(k) for s in SAMPLERS})
    return {
        DEFAULT: default_policy(),
        calibrated_name(k): shipped,
        PAPER: ThirdOrder(),
        PAPER_CRITERION: ThirdOrder(criterion="paper"),
        LOCAL_ERROR: LocalError(),
        budget_name(k): Budget(k),
        uniform_name(k): FixedMask(uniform_mask(steps, k), reuse=Extrapolate(1)),
    }


def calibrated_grid(wl: Workload, steps: int) -> Callable[[int], torch.Tensor]:
    """K -> the shipped calibrated DPM-Solver++ grid with K steps, placed on the workload's ``steps``-step grid."""
    from .workloads import calibrated

    sigmas = wl.schedule(steps)
    return lambda k: calibrated.grid(wl.name, int(k), sigmas=sigmas)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m adaptive_sampling demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", choices=("digits", "shapes", "flow"), default="digits",
                   help="the learned model (default digits; flow: the Flux-shaped transformer with the peer caches)")  # fmt: skip
    p.add_argument("--steps", type=int, default=None, help="solver steps (default 50; flow 28)")
    p.add_argument("--batch", type=int, default=None, help="samples, one class each (default 10; flow 5)")
    p.add_argument("--cond-scale", type=float, default=None, help="classifier-free guidance scale (default 2; flow 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: every core)")
    p.add_argument("--out", type=Path, default=Path("demo_output"), help="output folder (default ./demo_output)")
    p.add_argument("--greedy", action=argparse.BooleanOptionalAction, default=None,
                   help="run the greedy oracle (default: on for digits, off for shapes, where it takes long)")  # fmt: skip
    p.add_argument("--no-plots", action="store_true", help="no pictures (no matplotlib needed)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    flow = args.workload == "flow"
    args.steps = args.steps if args.steps is not None else (28 if flow else 50)
    args.batch = args.batch if args.batch is not None else (5 if flow else 10)
    args.cond_scale = args.cond_scale if args.cond_scale is not None else (4.0 if flow else 2.0)
    if args.steps < 6:
        p.error(f"--steps must be >= 6, got {args.steps}")
    if args.batch < 1:
        p.error(f"--batch must be >= 1, got {args.batch}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    if args.greedy is None:
        args.greedy = args.workload == "digits"
    return args


def set_threads(threads: int | None) -> str:
    """Set torch's CPU threads (default: every core) and say what is used."""
    cores = os.cpu_count() or 1
    torch.set_num_threads(threads or cores)
    return f"torch threads: {torch.get_num_threads()} (of {cores} cores)"


def quality(db: float) -> str:
    """A PSNR for people: 'identical' for bit-identical outputs."""
    return "identical" if db >= IDENTICAL_DB else f"{db:.1f} dB"


def summary_table(rows: list[dict], columns: tuple[str, ...] = ("calls", "speedup", "vs full run", "vs ODE solution")) -> str:
    """A small markdown table of ``rows`` (dicts with "method" and the columns)."""
    lines = ["| method | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for r in rows:
        lines.append(f"| {r['method']} | " + " | ".join(str(r.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.no_plots:
        from .demo_plots import MissingPlotting, require_matplotlib

        try:
            require_matplotlib()
        except MissingPlotting as e:
            print(f"error: {e}")
            return 2
    threads = set_threads(args.threads)
    if args.workload == "flow":
        from .demo_flow import run_flow_demo

        return run_flow_demo(args, threads)
    return run_sampler_demo(args, threads)


def run_sampler_demo(args, threads: str) -> int:
    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    wl = load_workload(args.workload, args.cond_scale)
    labels = torch.arange(args.batch) % 10
    wl.model(torch.zeros(2, *wl.shape), torch.ones(2), torch.zeros(2, dtype=torch.long))  # warm-up: first-call costs stay out of the timings
    noise = torch.randn(args.batch, *wl.shape, generator=torch.Generator().manual_seed(args.seed))
    extra = {"y": labels}
    policies = demo_policies(args.steps, args.workload)
    print(f"adaptive_sampling demo: {wl.describe}; {args.batch} samples (classes {labels.tolist()}), {args.steps} steps,"
          f" guidance {args.cond_scale:g}; {threads}.")  # fmt: skip
    print("Compared: ways to spend fewer model calls than the full run (skip policies, and the baselines with the same calls),"
          " scored by PSNR against the full run from the same noise and against the ODE solution.\n", flush=True)  # fmt: skip
    baselines = ("uniform", "fewer_steps", "dpmpp_2m_steps", "dpmpp_2m_grid", "random") + (("greedy",) if args.greedy else ())
    ev = evaluate(wl.model, noise, wl.schedule, policies, steps=args.steps, extra_args=extra, baselines=baselines,
                  greedy_for=[PAPER], truth_steps=TRUTH_STEPS, disable=args.quiet,
                  grid_for=calibrated_grid(wl, args.steps))  # fmt: skip
    curves = None if args.no_plots else _sweep(wl, noise, extra, ev, args.steps, args.quiet)

    args.out.mkdir(parents=True, exist_ok=True)
    k = max(5, round(0.6 * args.steps))
    short, takeaway = _summary(ev, args.steps, k)
    command = (f"python -m adaptive_sampling demo --workload {args.workload} --steps {args.steps} --batch {args.batch} "
               f"--cond-scale {args.cond_scale:g} --seed {args.seed}{'' if args.greedy else ' --no-greedy'}")  # fmt: skip
    (args.out / "table.md").write_text(
        f"# adaptive_sampling demo\n\n`{command}` ({threads})\n\n{wl.describe}. Every policy, and every baseline at each"
        f" policy's calls per sample ('at the calls of'). PSNR/SSIM against the full-step output from the same noise (data range 2;"
        f" 100 dB = identical), PSNR against the ODE solution ({TRUTH_STEPS}-step DPM-Solver++); NFE = model calls per sample,"
        f" averaged; speedup = steps / NFE; seconds = wall clock of that run.\n\n## Summary\n\n{takeaway}\n\n{short}\n\n"
        f"## Every row\n\n{ev.table()}\n"
    )
    if not args.no_plots:
        _pictures(ev, curves, args.out, args.steps, k)
    print(takeaway + "\n")
    print(short)
    print("\nQuality: PSNR in dB, higher is closer ('identical' = the full run's output bit for bit; above about 40 dB the"
          " difference is invisible).")  # fmt: skip
    print(f"Every policy and baseline: {args.out / 'table.md'}; pictures: "
          + ("none (--no-plots)" if args.no_plots else ", ".join(p.name for p in sorted(args.out.glob("*.png")))) + f" in {args.out.resolve()}")
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


def _row(ev, sampler: str, method: str, policy: str, name: str, steps: int) -> dict | None:
    found = ev.select(sampler, method, policy)
    if not found:
        return None
    r = found[0]
    nfe = float(np.mean(r.nfe))
    truth = "-" if r.psnr_truth is None else f"{np.mean(r.psnr_truth):.1f} dB"
    return {"method": name, "calls": f"{nfe:.1f}".rstrip("0").rstrip("."), "speedup": f"{steps / nfe:.2f}x",
            "vs full run": quality(float(np.mean(r.psnr))), "vs ODE solution": truth, "_psnr": float(np.mean(r.psnr)),
            "_truth": None if r.psnr_truth is None else float(np.mean(r.psnr_truth)), "_nfe": nfe}  # fmt: skip


def _summary(ev, steps: int, k: int) -> tuple[str, str]:
    """The short per-sampler table and the one-line takeaway per sampler."""
    blocks, lines = [], []
    for sampler in ev.references:
        name = SAMPLER_NAMES.get(sampler, sampler)
        wanted = {
            "full": ("full", "", f"full run ({steps} steps)"),
            "default": ("adaptive", DEFAULT, DEFAULT),
            "default_fewer": ("fewer_steps", DEFAULT, "  fewer steps, same calls"),
            "default_uniform": ("uniform", DEFAULT, "  uniform stride, same calls"),
            "default_dpm": ("dpmpp_2m_steps", DEFAULT, "  DPM-Solver++(2M) with that many steps"),
            "calibrated": ("adaptive", calibrated_name(k), calibrated_name(k)),
            "paper": ("adaptive", PAPER, PAPER),
            "paper_fewer": ("fewer_steps", PAPER, "  fewer steps, same calls"),
        }
        rows = {key: _row(ev, sampler, *spec, steps) for key, spec in wanted.items()}
        if sampler == "dpmpp_2m":  # fewer steps of DPM-Solver++ IS DPM-Solver++ with that many steps
            rows.pop("default_dpm")
        rows = {key: r for key, r in rows.items() if r is not None}
        blocks.append(f"**{name}**\n\n" + summary_table(list(rows.values())))
        d, few = rows["default"], rows["default_fewer"]
        gain = d["_psnr"] - few["_psnr"]
        text = (f"{name}: {DEFAULT} runs {d['calls']} of {steps} calls ({d['speedup']}) at {d['vs full run']} from the full run,"
                f" {abs(gain):.1f} dB {'closer than' if gain >= 0 else 'further than'} fewer steps with the same calls")  # fmt: skip
        if "paper" in rows and rows["paper"]["_nfe"] >= steps:
            text += f"; the paper's rule skipped nothing ({rows['paper']['calls']} of {steps} calls)"
        elif "paper" in rows and "paper_fewer" in rows:
            pg = rows["paper"]["_psnr"] - rows["paper_fewer"]["_psnr"]
            text += f"; the paper's rule: {rows['paper']['calls']} calls, {abs(pg):.1f} dB {'better' if pg >= 0 else 'worse'} than fewer steps"
        lines.append(text + ".")
    return "\n\n".join(blocks), "Takeaway:\n" + "\n".join(f"* {t}" for t in lines)


def _pictures(ev, curves, out: Path, steps: int, k: int) -> None:
    from . import demo_plots

    sampler = "dpmpp_2m" if "dpmpp_2m" in ev.references else next(iter(ev.references))
    name = SAMPLER_NAMES.get(sampler, sampler)
    rows = [(f"full run ({steps} steps)", ev.references[sampler])]
    for method, policy, label in (("adaptive", DEFAULT, DEFAULT), ("adaptive", calibrated_name(k), calibrated_name(k)),
                                  ("adaptive", PAPER, PAPER), ("fewer_steps", DEFAULT, "fewer steps (default's calls)"),
                                  ("uniform", DEFAULT, "uniform stride (default's calls)")):  # fmt: skip
        found = ev.select(sampler, method, policy)
        if found:
            r = found[0]
            rows.append((f"{label}: {np.mean(r.nfe):.0f} calls, {quality(float(np.mean(r.psnr)))}", r.output))
    demo_plots.image_grid(rows, ev.references[sampler], out / "grid.png", f"{name}, {steps} steps: samples and their differences")
    panels = {f"{SAMPLER_NAMES.get(s, s)}, {steps} steps": {n: pts for (ss, n), pts in curves.items() if ss == s} for s in ev.references}
    demo_plots.curves(panels, out / "nfe_vs_psnr.png", "model calls per sample", "PSNR vs the full run (dB)",
                      highlight=("default_policy(nfe=K) (K sweep)", "calibrated schedule (K sweep)"))  # fmt: skip
    mask_panels = []
    for s in ev.references:
        for method, policy, label in (("adaptive", DEFAULT, DEFAULT), ("adaptive", calibrated_name(k), calibrated_name(k)),
                                      ("adaptive", PAPER, PAPER), ("greedy", PAPER, "greedy oracle (the paper rule's calls)")):  # fmt: skip
            found = ev.select(s, method, policy)
            if found and found[0].mask is not None:
                mask_panels.append((f"{SAMPLER_NAMES.get(s, s)}: {label}, {np.mean(found[0].nfe):.1f} calls", found[0].mask))
    demo_plots.masks(mask_panels, out / "masks.png", columns=4 if any("greedy" in t for t, _ in mask_panels) else 3)


def _sweep(wl: Workload, noise, extra, ev, steps, quiet) -> dict:
    """(sampler, name) -> [(mean calls, mean PSNR vs the full run)] for every option over its knob, and
    uniform stride / fewer steps / DPM-Solver++ on the calibrated grid over K."""
    from ..samplers import sample_dpmpp_2m
    from .workloads import calibrated

    ks = sorted({max(5, round(steps * f)) for f in FRACTIONS})
    sigmas = wl.schedule(steps)
    shipped_ks = calibrated.available(wl.name)["euler"]
    families = {
        "default_policy(nfe=K) (K sweep)": [default_policy(nfe=k) for k in ks if k >= -(-steps // 5)],
        "calibrated schedule (K sweep)": [BySampler({s: calibrated.load(wl.name, s, k).with_nfe(max(1, round(k * steps / CALIBRATED_STEPS)))
                                                     for s in SAMPLERS}) for k in shipped_ks],  # fmt: skip
        "ThirdOrder() (delta sweep)": [ThirdOrder(delta=d) for d in DELTAS["reference"]],
        "ThirdOrder(criterion='paper') (delta sweep)": [ThirdOrder(delta=d, criterion="paper") for d in DELTAS["paper"]],
        "LocalError() (tol sweep)": [LocalError(tol=t) for t in TOLS],
        "Budget(K) (K sweep)": [Budget(max(k, 4)) for k in ks],
        "uniform stride + forecast (K sweep)": [FixedMask(uniform_mask(steps, k), reuse=Extrapolate(1)) for k in ks],
    }
    grid_for = calibrated_grid(wl, steps)
    total = len(ev.references) * (sum(len(v) for v in families.values()) + 3 * len(ks))
    curves: dict = {}
    with Bar(total, "quality vs calls", quiet) as bar:
        for name in ev.references:
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
            curves[(name, "uniform stride, copied eps (K sweep)")] = uni
            curves[(name, "fewer steps (K sweep)")] = few
            curves[(name, "DPM-Solver++ on the calibrated grid (K sweep)")] = cal
    return curves


if __name__ == "__main__":
    raise SystemExit(main())
