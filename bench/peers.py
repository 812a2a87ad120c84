"""The library against every cache a Flux user can pick, at matched compute, on held-out prompts.

    PYTHONPATH=. python bench/peers.py                     # ~21 min alone on 2 CPU cores; writes results/peers.{md,jsonl,png}
    PYTHONPATH=. python bench/peers.py --quick --steps 12 --nfe 4 6 --truth-steps 20   # a smoke run (~2 min)

The model: the flow workload (``adaptive_sampling.evaluation.workloads.flow``), a FluxTransformer2DModel
trained here on the procedural shapes, run through diffusers' real ``FluxPipeline`` with FLUX.1's
scheduler (``FlowMatchEulerDiscreteScheduler``, dynamic shift) and true CFG (two transformer calls per
step, ``cache_context("cond" / "uncond")``), N = ``--steps`` steps. None of the methods was tuned on it.

Methods (``adaptive_sampling.evaluation.peers``), each at several settings from nearly lossless to
aggressive: diffusers' FirstBlockCache, MagCache (ratios calibrated on the calibration prompts, the
documented way), TaylorSeer, Pyramid Attention Broadcast, FasterCache; cache-dit's DBCache (F1B0, with
and without its TaylorSeer calibrator, and its static step masks); the library's ``default_policy(nfe=K)``,
calibrated schedules (proxy search on the calibration prompts), uniform stride and the paper's rule
``ThirdOrder()`` through ``adaptive_sampling.integrations.diffusers.apply``; and what a user gets with no
cache: the same scheduler with K steps, DPM-Solver++(2M) with K steps.

Data (the calibration study's splits): calibration prompts = classes 0-4, seeds 1-2 (MagCache's ratios
come from one pipeline call on seed 1's batch, the calibrated schedules from both); test prompts =
classes 5-9 cycled to batches of 8, seeds 0, 3, 4 (24 images, never used to choose anything).

Measured per setting, on the test prompts:
* compute: FLOPs of the whole pipeline call (``torch.utils.flop_counter``, attention through the math
  SDPA backend so it is counted; elementwise cache bookkeeping is not counted by torch and favours the
  caches slightly), as a fraction of the N-step uncached call; transformer forwards and rows;
* quality: PSNR of the decoded images against (a) the ODE solution (DPM-Solver++(2M), ``--truth-steps``
  steps; its distance to twice as many steps is printed) and (b) the N-step uncached output of the same
  noise (what a cache tries to keep); median, 10th and 90th percentile over the images (the spread of
  batch-wide decisions, the peers', against per-prompt ones, ours, at batch 8); the shapes
  classifier's accuracy on the outputs;
* wall clock: one test batch per setting, ``--repeats`` interleaved rounds in a shuffled order, median,
  as a ratio to the uncached N-step call timed in the same rounds (default SDPA backend, ``--threads``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adaptive_sampling.calibration import calibrate  # noqa: E402
from adaptive_sampling.evaluation import peers  # noqa: E402
from adaptive_sampling.evaluation.metrics import psnr  # noqa: E402
from adaptive_sampling.evaluation.workloads import flow, shapes  # noqa: E402
from adaptive_sampling.progress import Bar  # noqa: E402

torch.set_grad_enabled(False)

CAL_CLASSES, CAL_SEEDS = (0, 1, 2, 3, 4), (1, 2)
TEST_CLASSES, TEST_SEEDS = (5, 6, 7, 8, 9, 5, 6, 7), (0, 3, 4)  # batches of 8: classes 5-9 cycled
FRACTIONS = (0.35, 0.5, 0.7)  # compute fractions the summary compares the fronts at


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=50, help="N, the pipeline's steps")
    p.add_argument("--nfe", type=int, nargs="+", default=[12, 18, 25, 35], help="call budgets K for the library and baselines")
    p.add_argument("--guidance", type=float, default=None, help="true_cfg_scale (default: the checkpoint's recommended)")
    p.add_argument("--truth-steps", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="2 test prompts, 1 calibration prompt, 1 timing round")
    p.add_argument("--no-cache-dit", action="store_true")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "peers.md")
    p.add_argument("--replot", action="store_true", help="only redraw the .md and .png from the .jsonl of --out (no run)")
    return p.parse_args(argv)


def noise(classes, seed: int) -> torch.Tensor:
    """Packed pipeline noise [len(classes), 64, 48], one generator per (position in the batch, seed)."""
    shape = (flow.image_seq_len(), flow.LATENT_SHAPE[0] * 4)
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1000 + i)) for i in range(len(classes))])


class Batches:
    """The prompts of one split as pipeline calls: one batch per seed, one image per class."""

    def __init__(self, pipe, classes, seeds, guidance: float):
        self.pipe, self.guidance = pipe, guidance  # the pipeline calls run on (set per setting)
        self.labels = [torch.tensor(list(classes)) for _ in seeds]
        self.noise = [noise(classes, s) for s in seeds]
        self.kwargs = [flow.prompt_kwargs(lab, pipe.conditioning) for lab in self.labels]

    def __len__(self) -> int:
        return len(self.labels)

    def call(self, i: int, steps: int) -> torch.Tensor:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self.pipe(**self.kwargs[i], latents=self.noise[i].clone(), true_cfg_scale=self.guidance, num_inference_steps=steps,
                             height=flow.HEIGHT, width=flow.WIDTH, output_type="latent").images  # fmt: skip

    def run_all(self, steps: int) -> torch.Tensor:
        return torch.cat([self.call(i, steps) for i in range(len(self))])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.replot:
        lines = [json.loads(line) for line in args.out.with_suffix(".jsonl").read_text().splitlines()]
        meta, rows = lines[0]["meta"], lines[1:]
        args.out.write_text(report(rows, meta))
        plot(rows, args.out.with_suffix(".png"), meta)
        return 0
    torch.set_num_threads(args.threads)
    started = time.time()
    pipe = flow.pipeline()
    # cache-dit patches the transformer for good (same outputs, but diffusers' block hooks then miss it): its own copy
    pipe_cache_dit = flow.pipeline()
    guidance = args.guidance if args.guidance is not None else flow.RECOMMENDED_GUIDANCE
    test_seeds, cal_seeds = (TEST_SEEDS[:1], CAL_SEEDS[:1]) if args.quick else (TEST_SEEDS, CAL_SEEDS)
    test = Batches(pipe, TEST_CLASSES if not args.quick else (5, 6), test_seeds, guidance)
    cal = Batches(pipe, CAL_CLASSES, cal_seeds, guidance)
    N = args.steps
    nfe = tuple(k for k in args.nfe if k < N)

    def calibration():
        return cal.call(0, N)

    def use(setting):
        """Point both splits at the pipeline this setting runs on."""
        test.pipe = cal.pipe = pipe_cache_dit if setting.library == "cache-dit" else pipe

    print(f"flow workload, FluxPipeline, N={N}, true_cfg_scale={guidance:g}, test images {sum(len(l) for l in test.labels)}", flush=True)
    # --- truth, reference
    old = pipe.scheduler
    pipe.scheduler = peers.dpmpp_flow_scheduler(old)
    truth = test.run_all(args.truth_steps)
    truth2 = test.run_all(2 * args.truth_steps)
    pipe.scheduler = old
    truth_err = float(np.median(psnr(flow.decode(truth), flow.decode(truth2))))
    print(f"truth: DPM-Solver++(2M) {args.truth_steps} steps; PSNR to {2 * args.truth_steps} steps {truth_err:.1f} dB", flush=True)

    # --- calibrated schedules for the library (proxy search on the calibration prompts)
    model = flow.denoiser(guidance, pipe.transformer, pipe.conditioning)
    cal_x = torch.cat([flow.decode(z) for z in cal.noise])  # image-space noise: decode is a permutation
    cal_y = torch.cat(cal.labels)
    sig = flow.sigmas(N)
    t0 = time.time()
    schedules = {k: calibrate(model, "flow_euler", sig, cal_x, {"y": cal_y}, nfe=k, method="proxy", disable=True) for k in nfe}
    cal_seconds = time.time() - t0
    print(f"calibrated schedules for K={list(nfe)} in {cal_seconds:.0f} s", flush=True)

    settings = [peers.no_cache("no cache (N steps)")]
    settings += peers.library_settings(nfe, schedules=schedules)
    settings += peers.baseline_settings(nfe)
    settings += peers.peer_settings(N, cache_dit=not args.no_cache_dit)

    reference, rows = None, []
    classifier = shapes.load_classifier()
    labels = torch.cat(test.labels)
    with Bar(total=len(settings), desc="quality and FLOPs") as bar:
        for s in settings:
            row = {"name": s.name, "family": s.family, "library": s.library, "knob": s.knob}
            use(s)
            try:
                out, counts = peers.measure(s, test.pipe, test.run_all, N, calibration)
            except Exception as e:  # a peer that fails on this model is a result, reported as such
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                rows.append(row)
                bar.update(1)
                continue
            if reference is None:
                reference, base = out, counts
            img = flow.decode(out)
            p_truth = psnr(img, flow.decode(truth))
            p_ref = psnr(img, flow.decode(reference))
            acc = float((classifier(img.clamp(-1, 1)).argmax(1) == labels).float().mean())
            row.update(counts, flops_frac=counts["flops"] / base["flops"], calls_per_image=counts["rows"] / len(labels) / 2,
                       psnr_truth=float(np.median(p_truth)), psnr_truth_p10=float(np.percentile(p_truth, 10)),
                       psnr_truth_p90=float(np.percentile(p_truth, 90)), psnr_ref=float(np.median(p_ref)),
                       psnr_ref_p10=float(np.percentile(p_ref, 10)), psnr_ref_p90=float(np.percentile(p_ref, 90)), accuracy=acc,
                       finite=bool(torch.isfinite(out).all()))  # fmt: skip
            rows.append(row)
            bar.update(1)

    timed = [s for s, r in zip(settings, rows) if "error" not in r]
    seconds = {s.name: [] for s in timed}
    rounds = 1 if args.quick else args.repeats
    order = list(range(len(timed)))
    with Bar(total=rounds * len(timed), desc="wall clock") as bar:
        for r in range(rounds):
            random.Random(r).shuffle(order)
            for i in order:
                s = timed[i]
                use(s)
                with s.applied(test.pipe, N, calibration) as n:
                    t = time.perf_counter()
                    test.call(0, n)
                    seconds[s.name].append(time.perf_counter() - t)
                bar.update(1)
    base_s = statistics.median(seconds["no cache (N steps)"])
    for row in rows:
        if row["name"] in seconds:
            row["seconds"] = statistics.median(seconds[row["name"]])
            row["speedup"] = base_s / row["seconds"]

    meta = {"date": datetime.date.today().isoformat(), "commit": _commit(), "machine": f"{platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores, torch threads {args.threads}", "python": platform.python_version(), "torch": torch.__version__,
            "diffusers": _version("diffusers"), "cache_dit": _version("cache_dit"), "steps": N, "nfe": list(nfe), "guidance": guidance,
            "truth_steps": args.truth_steps, "truth_psnr_to_double": truth_err, "test_images": len(labels),
            "calibration_seconds": cal_seconds, "repeats": rounds, "wall_minutes": (time.time() - started) / 60,
            "command": "PYTHONPATH=. python bench/peers.py " + " ".join(sys.argv[1:] if argv is None else argv)}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out.with_suffix(".jsonl"), "w") as f:
        f.write(json.dumps({"meta": meta}) + "\n")
        for row in rows:
            f.write(json.dumps(row) + "\n")
    args.out.write_text(report(rows, meta))
    plot(rows, args.out.with_suffix(".png"), meta)
    print(report(rows, meta))
    return 0


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def _version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name.replace("_", "-"))
    except Exception:
        return "not installed"


def report(rows: list[dict], meta: dict) -> str:
    ok = [r for r in rows if "error" not in r]
    lines = [
        "# The library against the peer caches on a flow transformer",
        "",
        f"Measured {meta['date']} on {meta['machine']} (CPU; commit {meta['commit']}), Python {meta['python']}, torch {meta['torch']},"
        f" diffusers {meta['diffusers']}, cache-dit {meta['cache_dit']}; `{meta['command']}` ({meta['wall_minutes']:.0f} min).",
        "",
        f"The flow workload (a FluxTransformer2DModel trained here, 3.4M parameters) through diffusers' FluxPipeline, N = {meta['steps']}"
        f" steps of FlowMatchEulerDiscreteScheduler, true CFG {meta['guidance']:g}, {meta['test_images']} held-out images (classes 5-9,"
        f" seeds 0, 3, 4, batches of 8). Truth: DPM-Solver++(2M) with {meta['truth_steps']} steps (PSNR to twice as many steps:"
        f" {meta['truth_psnr_to_double']:.1f} dB). Calibrated schedules: proxy search on the calibration prompts (classes 0-4,"
        f" seeds 1-2), {meta['calibration_seconds']:.0f} s for all budgets. Compute: FLOPs of the whole pipeline call as a share of"
        " the uncached N-step call (the same count for every method).",
        "",
        "## Who is best at a given compute",
        "",
        "Each family's best median PSNR among its settings with FLOPs <= the fraction (its front); '-' = none of its settings is"
        " that cheap.",
        "",
    ]
    families = []
    for r in ok:
        if r["family"] not in families and r["family"] != "no cache":
            families.append(r["family"])
    for ref, key in (("the ODE truth", "psnr_truth"), (f"the uncached {meta['steps']}-step output", "psnr_ref")):
        lines += [f"Against {ref}:", "", "| family | library | " + " | ".join(f"<= {f:.0%}" for f in FRACTIONS) + " |",
                  "|---|---|" + "---:|" * len(FRACTIONS)]  # fmt: skip
        best = {f: max(((peers.front([(r["flops_frac"], r[key]) for r in ok if r["family"] == fam], f) or -1e9), fam)
                       for fam in families) for f in FRACTIONS}  # fmt: skip
        for fam in families:
            lib = next(r["library"] for r in ok if r["family"] == fam)
            cells = []
            for f in FRACTIONS:
                v = peers.front([(r["flops_frac"], r[key]) for r in ok if r["family"] == fam], f)
                cells.append("-" if v is None else (f"**{min(v, 100):.1f}**" if best[f][1] == fam else f"{min(v, 100):.1f}"))
            lines.append(f"| {fam} | {lib} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "## Every setting",
        "",
        "| method | library | FLOPs | calls/image | wall-clock speed-up | PSNR vs truth (median / p10 / p90) | PSNR vs N-step (median / p10 / p90) | accuracy |",
        "|---|---|---:|---:|---:|---|---|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['library']} | fails: `{r['error']}` | | | | | |")
            continue
        ref = "identical" if r["psnr_ref"] >= 100 else f"{r['psnr_ref']:.1f} / {r['psnr_ref_p10']:.1f} / {r['psnr_ref_p90']:.1f}"
        lines.append(f"| {r['name']} | {r['library']} | {r['flops_frac']:.0%} | {r['calls_per_image']:.1f} | {r.get('speedup', float('nan')):.2f}x |"
                     f" {r['psnr_truth']:.1f} / {r['psnr_truth_p10']:.1f} / {r['psnr_truth_p90']:.1f} | {ref} | {r['accuracy']:.0%} |")  # fmt: skip
    lines += ["", "calls/image: transformer forwards that ran per image and CFG branch (a block cache that runs only its first"
              " blocks still counts the call; its saving is in the FLOPs). p10 / p90: 10th / 90th percentile over the images."
              f" Wall clock: one batch of 8 per setting, {meta['repeats']} interleaved rounds in shuffled order, median, ratio to the"
              " uncached call timed in the same rounds, default SDPA backend. accuracy: the shapes classifier on the outputs."]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, meta: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), sharex=True)
    families = []
    for r in rows:
        if "error" not in r and r["family"] not in families:
            families.append(r["family"])
    markers = "os^vD<>pP*Xhd"
    colours = plt.get_cmap("tab20").colors  # one colour per family (tab10 repeats after ten)
    for j, fam in enumerate(families):
        pts = sorted((r["flops_frac"], r["psnr_truth"], r["psnr_ref"], r["library"]) for r in rows if r.get("family") == fam and "error" not in r)
        lib = pts[0][3]
        style = dict(marker=markers[j % len(markers)], lw=2.2 if lib == "adaptive_sampling" else 1.2,
                     ls="-" if lib == "adaptive_sampling" else ("--" if lib == "baseline" else ":"), label=f"{fam} ({lib})",
                     color=colours[(2 * j) % 20 if j < 10 else (2 * j + 1) % 20])  # fmt: skip
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], **style)
        axes[1].plot([p[0] for p in pts], [min(p[2], 60) for p in pts], **style)
    axes[0].set_title("quality vs the ODE solution")
    axes[1].set_title(f"closeness to the uncached {meta['steps']}-step output (capped at 60 dB)")
    for ax in axes:
        for f in FRACTIONS:
            ax.axvline(f, color="0.8", lw=0.8, zorder=0)
        ax.set_xlabel("FLOPs, share of the uncached N-step call")
        ax.set_ylabel("median PSNR (dB)")
        ax.grid(alpha=0.3)
    axes[1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    fig.suptitle(f"flow workload (FluxPipeline, N={meta['steps']}, true CFG {meta['guidance']:g}), held-out prompts; {meta['date']}, {meta['machine']}",
                 fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
