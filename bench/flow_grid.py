"""DPM-Solver++ on a calibrated grid, on the flow transformer: the one baseline the flow study lacked.

    python bench/flow_grid.py [--quick] [--threads 2]      # results/flow_grid.{md,jsonl}

The shipped flow transformer (``adaptive_sampling.evaluation.workloads.flow``) at N = 50 steps of its
FluxPipeline grid, true CFG 4, with the splits of ``calibration_cost.py``: calibrate on classes 0-4,
seed 1 (5 samples), report on classes 5-9, seeds 0, 3, 4 (15 samples, never used to choose anything).
At K = 15, 20, 25, 30 calls:

* flow DPM-Solver++(2M) with K steps on the pipeline's K-step grid (the strongest no-cache baseline on
  this model, docs/peers.md);
* flow DPM-Solver++(2M) on the CALIBRATED K-point grid: the greedy search in the solver's merge mode
  (``calibration_path(..., merge_skipped=True, method="greedy")``, one search for every K), whose
  K-call mask is exactly DPM-Solver++ on the sub-grid of its computed levels;
* for scale, the skipping options at K calls: the calibrated schedule (the proxy search) and
  ``default_policy(nfe=K)`` on flow DPM-Solver++ and on flow Euler, and flow Euler with K steps.

Quality: median PSNR over the test samples against the ODE truth (flow DPM-Solver++ on the 50-step grid
with every interval split in 5) and against the 50-step output of the same solver (flow DPM-Solver++
for the DPM-Solver++ rows, flow Euler for the Euler rows).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from budget_study import CAL, TEST, Case, run_meta, workloads, write_results  # noqa: E402

from adaptive_sampling import calibrate, default_policy  # noqa: E402
from adaptive_sampling.calibration import calibration_path  # noqa: E402
from adaptive_sampling.evaluation import psnr  # noqa: E402

KS = (15, 20, 25, 30)
N = 50
RESULTS = ROOT / "bench" / "results"


def median_psnr(out: torch.Tensor, case: Case) -> tuple[float, float]:
    """(vs the case's N-step output, vs the ODE truth), medians over the test samples."""
    return float(np.median(psnr(out, case.ref))), float(np.median(psnr(out, case.truth)))


def run(quick: bool) -> tuple[list[dict], dict]:
    wl = workloads(["flow"], quick)["flow"]
    cal = {**CAL, "seeds": CAL["seeds"][:1]}
    x_cal, y_cal = wl.noise(cal)  # flow: the noise is the start latent (s = 1)
    ks = KS[:2] if quick else KS
    dpm = Case(wl, TEST, "flow_dpmpp_2m", N)
    euler = Case(wl, TEST, "flow_euler", N, truth=False)
    euler.truth = dpm.truth  # one ODE truth for both samplers
    rows, info = [], {"steps": N, "test_samples": int(dpm.x.shape[0])}

    t0 = time.perf_counter()
    path = calibration_path(wl.model, "flow_dpmpp_2m", dpm.sigmas, x_cal, {"y": y_cal}, min_calls=min(ks),
                            merge_skipped=True, method="greedy", disable=True)  # fmt: skip
    info["grid_search_seconds"] = round(time.perf_counter() - t0, 1)
    info["grid_search_runs"] = path.provenance["full_run_equivalents"]
    print(f"calibrated-grid search: {info['grid_search_seconds']} s, {info['grid_search_runs']} runs", flush=True)

    def add(method: str, sampler: str, k: int, out: torch.Tensor, case: Case, nfe=None) -> None:
        if nfe is not None and not (nfe == k).all():
            raise AssertionError(f"{method} spent {nfe.tolist()} calls, not {k}")
        p, t = median_psnr(out, case)
        rows.append({"method": method, "sampler": sampler, "k": k, "psnr": p, "truth": t})

    for k in ks:
        add("DPM-Solver++ with K steps", "flow_dpmpp_2m", k, dpm.fewer(k, dpm=True), dpm)
        grid = path.grid(k)
        out, _ = dpm.entry.sample(wl.model, dpm.x, grid, dpm.extra, disable=True)
        add("DPM-Solver++ on the calibrated grid", "flow_dpmpp_2m", k, out, dpm)
        add("Euler with K steps", "flow_euler", k, euler.fewer(k), euler)
        for case, sampler in ((dpm, "flow_dpmpp_2m"), (euler, "flow_euler")):
            schedule = calibrate(wl.model, sampler, case.sigmas, x_cal, {"y": y_cal}, nfe=k, method="proxy", disable=True)
            for method, policy in (("calibrated schedule (proxy)", schedule), ("default_policy(nfe=K)", default_policy(nfe=k))):
                out, rep = case.run(policy)
                add(method, sampler, k, out, case, rep.nfe)
        print(f"K={k}: " + ", ".join(f"{r['method']} [{r['sampler']}] {r['truth']:.1f}" for r in rows if r["k"] == k), flush=True)
    return rows, info


def report(rows: list[dict], meta: dict) -> str:
    ks = sorted({r["k"] for r in rows})
    methods = list(dict.fromkeys((r["method"], r["sampler"]) for r in rows))
    get = {(r["method"], r["sampler"], r["k"]): r for r in rows}
    lines = ["# DPM-Solver++ on a calibrated grid, on the flow transformer", "",
             f"`{meta['command']}`, {meta['date']}, {meta['machine']} CPU, {meta['threads']} torch threads, torch {meta['torch']},"
             f" commit {meta['commit']}; {meta['minutes']} min in all. The calibrated-grid search (greedy, merge mode, every K):"
             f" {meta['grid_search_seconds']} s, {meta['grid_search_runs']} full runs of the 5 calibration samples.", "",
             f"The flow workload at N = {meta['steps']} (FluxPipeline grid, true CFG 4); calibration: classes 0-4, seed 1; test:"
             f" classes 5-9, seeds 0, 3, 4 ({meta['test_samples']} samples). Median PSNR (dB) against the ODE truth / against the"
             f" {meta['steps']}-step output of the same sampler. Bold: the best against the truth at that K.", "",
             "| method | sampler | " + " | ".join(f"K = {k}" for k in ks) + " |",
             "|---|---|" + "---:|" * len(ks)]  # fmt: skip
    best = {k: max(r["truth"] for r in rows if r["k"] == k) for k in ks}
    for m, s in methods:
        cells = []
        for k in ks:
            r = get[(m, s, k)]
            t = f"**{r['truth']:.1f}**" if r["truth"] == best[k] else f"{r['truth']:.1f}"
            cells.append(f"{t} / {r['psnr']:.1f}")
        lines.append(f"| {m} | {s} | " + " | ".join(cells) + " |")
    gain = [get[("DPM-Solver++ on the calibrated grid", "flow_dpmpp_2m", k)]["truth"]
            - get[("DPM-Solver++ with K steps", "flow_dpmpp_2m", k)]["truth"] for k in ks]  # fmt: skip
    lines += ["", "The calibrated grid minus the pipeline's K-step grid, both DPM-Solver++, against the truth: "
              + ", ".join(f"{g:+.1f}" for g in gain) + f" dB at K = {', '.join(map(str, ks))}."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="K = 15, 20 only and the workload's quick settings")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS / "flow_grid.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    started = time.perf_counter()
    rows, info = run(args.quick)
    meta = {**run_meta(args.threads, started), **info}
    text = write_results(args.out, meta, rows, report)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
