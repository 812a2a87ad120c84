"""``python -m adaptive_sampling demo --workload flow``: the library next to the peer caches on a flow transformer.

The shipped flow transformer (``workloads.flow``: a ``FluxTransformer2DModel`` trained here) runs
through diffusers' real ``FluxPipeline`` with true CFG. Compared at the pipeline's own steps, on one
batch (one image per class), each method at its documented default where it has one:

* the library through its diffusers hook: ``default_policy()`` (half the calls), a schedule
  calibrated on other prompts (the proxy search, seconds), the paper's rule ``ThirdOrder()``;
* what a user gets without a cache at the same calls: fewer steps, DPM-Solver++(2M) with that many;
* diffusers' FirstBlockCache, MagCache (calibrated on the calibration prompts), TaylorSeer, Pyramid
  Attention Broadcast, FasterCache, and cache-dit's DBCache with and without its TaylorSeer
  calibrator (when cache-dit is installed).

Compute is counted the same way for every method (``peers.measure``: FLOPs of everything that ran),
quality is PSNR of the decoded images against the uncached run and against the ODE solution. The
held-out, multi-setting comparison is ``bench/peers.py`` (``docs/peers.md``).
"""

from __future__ import annotations

import os
import time
import warnings

import numpy as np
import torch

from . import peers
from .demo import quality, summary_table
from .metrics import psnr
from .workloads import flow

TRUTH_STEPS = 100
PEER_DEFAULTS = ("FirstBlockCache(threshold=0.05)", "MagCache(threshold=0.06)", "TaylorSeer(cache_interval=5)", "PAB(skip_range=2)",
                 "FasterCache(distilled)", "DBCache F1B0(threshold=0.08)", "DBCache F1B0 + TaylorSeer(threshold=0.08)")  # fmt: skip


def _settings(steps: int, k: int, schedule) -> list:
    from ..policies import ThirdOrder, default_policy

    try:
        import cache_dit  # noqa: F401

        has_cache_dit = True
    except ImportError:
        has_cache_dit = False
    by_name = {s.name: s for s in peers.peer_settings(steps, cache_dit=has_cache_dit)}
    return [
        peers.no_cache(f"full run ({steps} steps)"),
        peers.library_setting("default_policy()", default_policy()),
        peers.library_setting(f"calibrated schedule ({k} calls)", schedule),
        peers.library_setting("ThirdOrder() (the paper)", ThirdOrder()),
        *peers.baseline_settings((k,)),
        *[by_name[n] for n in PEER_DEFAULTS if n in by_name],
    ]


def run_flow_demo(args, threads: str) -> int:
    from ..calibration import calibrate

    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    warnings.filterwarnings("ignore", category=FutureWarning)
    # cache-dit logs each enable / disable (and re-patching its own copy) as warnings: routine here.
    # Read at its import; a user's own setting wins.
    os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")
    N, B, g = args.steps, args.batch, args.cond_scale
    k = N // 2
    pipe = flow.pipeline()
    pipe_cache_dit = flow.pipeline()  # cache-dit patches the transformer for good: its own copy (docs/peers.md)
    labels = torch.arange(B) % 10
    noise = torch.randn(B, flow.image_seq_len(), 48, generator=torch.Generator().manual_seed(args.seed))
    cal_labels = torch.arange(5)
    cal_noise = torch.randn(5, flow.image_seq_len(), 48, generator=torch.Generator().manual_seed(args.seed + 1000))

    def call(p, n: int, lab=labels, z=noise) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return p(**flow.prompt_kwargs(lab, p.conditioning), latents=z.clone(), true_cfg_scale=g, num_inference_steps=n,
                     height=flow.HEIGHT, width=flow.WIDTH, output_type="latent").images  # fmt: skip

    print(f"adaptive_sampling demo: the shipped flow transformer (FluxTransformer2DModel, 3.4M parameters) in diffusers'"
          f" FluxPipeline; {B} samples (classes {labels.tolist()}), {N} steps, true CFG {g:g}; {threads}.")  # fmt: skip
    print("Compared: the library's skipping, the plain baselines and the peer caches (diffusers, cache-dit) at their defaults,"
          " with compute counted the same way for all (FLOPs), quality by PSNR against the full run and the ODE solution.\n",
          flush=True)  # fmt: skip
    model = flow.denoiser(g, pipe.transformer, pipe.conditioning)
    schedule = calibrate(model, "flow_euler", flow.sigmas(N), flow.decode(cal_noise), {"y": cal_labels}, nfe=k, disable=args.quiet)
    old = pipe.scheduler
    pipe.scheduler = peers.dpmpp_flow_scheduler(old)
    truth = flow.decode(call(pipe, TRUTH_STEPS))
    pipe.scheduler = old

    rows, outputs, masks = [], {}, []
    settings = _settings(N, k, schedule)
    base_flops = full = base_seconds = None
    for s in settings:
        p = pipe_cache_dit if s.library == "cache-dit" else pipe
        try:
            out, counts = peers.measure(s, p, lambda n, p=p: call(p, n), N, calibration=lambda p=p: call(p, N, cal_labels, cal_noise))
            with s.applied(p, N, lambda p=p: call(p, N, cal_labels, cal_noise)) as n:
                started = time.perf_counter()
                call(p, n)
                seconds = time.perf_counter() - started
        except Exception as e:  # noqa: BLE001  (a peer that cannot run here is a result)
            rows.append({"method": s.name, "library": s.library, "compute": f"fails: {type(e).__name__}: {str(e).splitlines()[0][:80]}"})
            continue
        img = flow.decode(out)
        if full is None:
            full, base_flops, base_seconds = img, counts["flops"], seconds
        if s.report is not None:
            masks.append((f"{s.name}: {float(np.mean(s.report.nfe)):.1f} calls", s.report.computed))
        ref_db = float(np.mean(psnr(img, full)))
        rows.append({"method": s.name, "library": s.library, "compute": f"{counts['flops'] / base_flops:.0%}",
                     "calls": f"{counts['rows'] / B / 2:.1f}", "speedup": f"{base_seconds / seconds:.2f}x",
                     "vs full run": quality(ref_db), "vs ODE solution": f"{float(np.mean(psnr(img, truth))):.1f} dB",
                     "_flops": counts["flops"] / base_flops, "_psnr": ref_db, "_truth": float(np.mean(psnr(img, truth)))})  # fmt: skip
        outputs[s.name] = img
    columns = ("library", "compute", "calls", "speedup", "vs full run", "vs ODE solution")
    table = summary_table(rows, columns)
    takeaway = _takeaway(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(
        f"# adaptive_sampling demo, flow workload\n\n`python -m adaptive_sampling demo --workload flow --steps {N} --batch {B}"
        f" --cond-scale {g:g} --seed {args.seed}` ({threads})\n\ncompute: FLOPs of the pipeline call as a share of the full run's;"
        f" calls: transformer calls that ran per image and CFG branch (a block cache runs its first blocks on every call);"
        f" speedup: wall clock of one run against the full run's (one run each, this machine); PSNR of the decoded images against"
        f" the full run and against the ODE solution (DPM-Solver++(2M), {TRUTH_STEPS} steps).\n\n{takeaway}\n\n{table}\n"
    )
    if not args.no_plots:
        from . import demo_plots

        order = ["default_policy()", f"calibrated schedule ({k} calls)", "ThirdOrder() (the paper)", f"fewer steps (K={k})"]
        best_peer = max((r for r in rows if r.get("library") in ("diffusers", "cache-dit") and "_psnr" in r),
                        key=lambda r: r["_psnr"], default=None)  # fmt: skip
        if best_peer is not None:
            order.append(best_peer["method"])
        shown = [(f"full run ({N} steps)", full)] + [
            (f"{n}: {r['compute']} compute, {r['vs full run']}", outputs[n]) for n in order for r in rows if r["method"] == n and n in outputs
        ]
        demo_plots.image_grid(shown, full, args.out / "grid.png", f"FluxPipeline, {N} steps, true CFG {g:g}: samples and their differences")
        # one point per method (its settings differ in kind, so no line joins them)
        points = {f"{r['method']} ({r['library']})": [(r["_flops"], r["_truth"])] for r in rows if "_flops" in r}
        ours = tuple(f"{r['method']} ({r['library']})" for r in rows if r.get("library") == "adaptive_sampling")
        demo_plots.curves({"against the ODE solution": points}, args.out / "quality_vs_compute.png",
                          "FLOPs, share of the full run", "PSNR (dB)", highlight=ours)  # fmt: skip
        if masks:
            demo_plots.masks(masks, args.out / "masks.png")
    print(takeaway + "\n")
    print(table)
    print("\nQuality: PSNR in dB, higher is closer ('identical' = the full run's output bit for bit).")
    print(f"The table with its notes: {args.out / 'table.md'}; pictures: "
          + ("none (--no-plots)" if args.no_plots else ", ".join(p.name for p in sorted(args.out.glob("*.png")))) + f" in {args.out.resolve()}")
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


def _takeaway(rows: list[dict]) -> str:
    ours = [r for r in rows if r.get("library") == "adaptive_sampling" and "_flops" in r]
    peer = [r for r in rows if r.get("library") in ("diffusers", "cache-dit") and "_flops" in r]
    if not ours:
        return "Takeaway: none of the library's settings ran."
    d = next((r for r in ours if r["method"] == "default_policy()"), ours[0])
    text = f"Takeaway: {d['method']} spends {d['compute']} of the compute at {d['vs full run']} from the full run ({d['vs ODE solution']} from the ODE solution)"
    cheaper = [r for r in peer if r["_flops"] <= d["_flops"] + 0.05]
    if cheaper:
        best = max(cheaper, key=lambda r: r["_truth"])
        better = best["_truth"] > d["_truth"]
        text += (f"; the best peer at that compute or less is {best['method']} ({best['compute']}, {best['vs ODE solution']} from the"
                 f" ODE solution): {'better' if better else 'worse'} by {abs(best['_truth'] - d['_truth']):.1f} dB")  # fmt: skip
    else:
        lightest = min(peer, key=lambda r: r["_flops"], default=None)
        if lightest is not None:
            text += f"; no peer at its default gets that cheap (the cheapest, {lightest['method']}, spends {lightest['compute']})"
    return text + ". One batch, one seed: bench/peers.py compares every setting on held-out prompts (docs/peers.md)."
