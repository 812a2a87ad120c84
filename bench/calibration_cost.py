"""What a calibrated schedule costs and what it is worth: the proxy search (the default) against the greedy search.

    python bench/calibration_cost.py [--workloads digits shapes flow] [--samplers ...] [--no-validation] [--quick] [--out PATH]

Measured alone at two threads on this project's 2-core CPU: digits + shapes 13.8 min; flow 10-11 min per
sampler (results/calibration_cost.md, calibration_cost_flow.md, calibration_cost_flow_dpmpp.md).

Per learned workload (digits MLP, Karras grid; shapes UNet, SD's leading DDPM grid; the flow transformer,
its FluxPipeline grid) and sampler, 50 steps, guidance as in bench/budget_study.py:

* calibrate on the calibration split (classes 0-4, seeds 1-2; shapes and flow: seed 1 only, 5 samples)
  with ``method="proxy"`` once per K (K = 15, 20, 25, 30) and with ``method="greedy"`` once for every K
  (``calibration_path``: the greedy path is nested, one search serves all K); model row-evaluations,
  full-run equivalents (row-evaluations / (samples x N)) and seconds of each;
* evaluate both schedules on the held-out test split (classes 5-9, seeds 0, 3, 4): PSNR against the
  50-step output and against the ODE truth (DPM-Solver++ of the model's convention, every interval
  split in 5), and the better of fewer steps / uniform stride at the same K for scale;
* the design choice, on the VALIDATION split (classes 0-4, seeds 5-7; neither calibration nor test):
  the proxy as shipped (one observation per gain scale, ``GAIN_SCALES``, then two of a fitted gain
  curve and one refinement) against its earlier versions (``DESIGNS``: the gain scales without the
  fit; the single Gaussian gain with 3 refinement rounds), all against the greedy schedule, vs the
  50-step output. The default was chosen on these figures, never on the test split's.

Target (issue 21): the proxy schedule within 1 dB of the greedy one at <= 10 full-run equivalents.
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

from adaptive_sampling import FixedMask, calibrate  # noqa: E402
from adaptive_sampling.calibration import calibration_path  # noqa: E402
from adaptive_sampling.evaluation import psnr, uniform_mask  # noqa: E402

KS = (15, 20, 25, 30)
VALIDATION = {"classes": (0, 1, 2, 3, 4), "seeds": (5, 6, 7)}  # for the design rows: neither calibration nor test
N = 50
RESULTS = ROOT / "bench" / "results"


# The design rows: the proxy as shipped and the proxy as it was before each of its parts (proxy_path's keywords).
DESIGNS = {
    "proxy, gain scales only": {"fits": 0, "iterations": 2},  # before the fitted gain curve
    "proxy, Gaussian gain only": {"scales": (1.0,), "fits": 0, "iterations": 3},  # before the gain scales
}


def validation(wl, sampler: str, x_cal, y, path) -> list[dict]:
    """The design rows: the shipped proxy and its earlier versions (``DESIGNS``) against greedy, on VALIDATION."""
    case = Case(wl, VALIDATION, sampler, N, truth=False)
    rows = []
    for k in KS:
        designs = {"greedy": path.policy(k),
                   "proxy": calibrate(wl.model, sampler, case.sigmas, x_cal, {"y": y}, nfe=k, method="proxy", disable=True)}  # fmt: skip
        designs.update({name: _proxy_variant(wl, sampler, case.sigmas, x_cal, y, k, kw) for name, kw in DESIGNS.items()})
        for method, policy in designs.items():
            out, rep = case.run(policy)
            assert (rep.nfe == k).all(), (method, rep.nfe)
            rows.append({"phase": "validation", "workload": wl.name, "sampler": sampler, "k": k, "method": method,
                         "psnr": float(np.median(psnr(out, case.ref))),
                         "full_run_equivalents": policy.provenance["full_run_equivalents"]})  # fmt: skip
        print(
            f"validation {wl.name} {sampler} K={k}: " + ", ".join(f"{r['method']} {r['psnr']:.1f}" for r in rows[-len(designs) :]),
            flush=True,
        )
    return rows


def _proxy_variant(wl, sampler: str, sigmas, x_cal, y, k: int, kwargs: dict):
    """The proxy search with ``proxy_path`` keywords other than the shipped defaults (``DESIGNS``)."""
    from adaptive_sampling.calibration import CalibrationPath
    from adaptive_sampling.calibration.proxy import proxy_path
    from adaptive_sampling.calibration.search import DEFAULT_REUSE
    from adaptive_sampling.samplers.registry import get_sampler

    entry = get_sampler(sampler)
    path, _, _ = proxy_path(entry.sample, wl.model, x_cal, sigmas, k, {"y": y}, reuse=DEFAULT_REUSE, convention=entry.convention, **kwargs)
    prov = {"full_run_equivalents": round(path.evaluations / (x_cal.shape[0] * N), 2)}
    return CalibrationPath(sigmas, sampler, DEFAULT_REUSE, False, "mean_error", path, prov).policy(k)


def calibration_latents(wl, case: Case, split: dict, quick: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The calibration batch of ``split`` (digits: every seed; shapes, flow and ``quick``: the first seed
    only): its initial latents as ``case``'s sampler takes them, and its labels."""
    if wl.name != "digits" or quick:
        split = {**split, "seeds": split["seeds"][:1]}
    x_noise, y = wl.noise(split)
    return (x_noise if case.flow else x_noise * case.sigmas[0]), y


def run(wl, sampler: str, quick: bool, validate: bool) -> list[dict]:
    case = Case(wl, TEST, sampler, N)
    x_cal, y = calibration_latents(wl, case, CAL, quick)
    rows = []
    t0 = time.perf_counter()
    path = calibration_path(wl.model, sampler, case.sigmas, x_cal, {"y": y}, min_calls=min(KS), method="greedy", disable=True)
    greedy_s = time.perf_counter() - t0
    if validate:
        rows += validation(wl, sampler, x_cal, y, path)
    for k in KS:
        t0 = time.perf_counter()
        proxy = calibrate(wl.model, sampler, case.sigmas, x_cal, {"y": y}, nfe=k, method="proxy", disable=True)
        proxy_s = time.perf_counter() - t0
        outs = {"proxy": (proxy, proxy_s, proxy.provenance), "greedy": (path.policy(k), greedy_s, path.provenance)}
        base = {"fewer steps": case.fewer(k), "uniform stride": case.run(FixedMask(uniform_mask(N, k)))[0]}
        best_p = max(float(np.median(psnr(o, case.ref))) for o in base.values())
        best_t = max(float(np.median(psnr(o, case.truth))) for o in base.values())
        for method, (policy, seconds, prov) in outs.items():
            out, rep = case.run(policy)
            assert (rep.nfe == k).all(), (method, rep.nfe)
            rows.append({"phase": "test", "workload": wl.name, "sampler": sampler, "k": k, "method": method,
                         "calibration_samples": int(x_cal.shape[0]), "row_evaluations": prov["model_row_evaluations"],
                         "full_run_equivalents": prov["full_run_equivalents"], "seconds": seconds,
                         "psnr": float(np.median(psnr(out, case.ref))), "truth": float(np.median(psnr(out, case.truth))),
                         "baseline_psnr": best_p, "baseline_truth": best_t, "per_k": method == "proxy"})  # fmt: skip
        print(f"{wl.name} {sampler} K={k}: proxy {rows[-2]['psnr']:.1f} dB ({rows[-2]['full_run_equivalents']} runs, {proxy_s:.0f} s)"
              f" greedy {rows[-1]['psnr']:.1f} dB ({rows[-1]['full_run_equivalents']} runs for all K, {greedy_s:.0f} s)", flush=True)  # fmt: skip
    return rows


def report(rows: list[dict], meta: dict) -> str:
    lines = ["# Calibration cost: the proxy search against the greedy search", "",
             f"`{meta['command']}`, {meta['date']}, {meta['machine']} CPU, {meta['threads']} torch threads, torch {meta['torch']},"
             f" commit {meta['commit']}; {meta['minutes']} min in all.", "",
             "Cost: model row-evaluations of the search / (calibration samples x 50) = full sampling runs of the calibration batch;"
             " the proxy runs once per K, the greedy search once for every K (its path is nested). Quality: median PSNR over the"
             " held-out test samples (classes 5-9, seeds 0, 3, 4: 30 on digits, 15 on shapes and flow) against the 50-step output"
             " / the ODE truth; 'baseline' = the"
             " better of fewer steps and uniform stride at K.", "",
             "| workload | sampler | K | proxy: runs, s | greedy (all K): runs, s | proxy vs 50-step | greedy vs 50-step |"
             " proxy vs truth | greedy vs truth | baseline vs 50-step / truth | proxy - greedy (50-step / truth) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    within, total, cheap = 0, 0, True
    design = [r for r in rows if r.get("phase") == "validation"]
    rows = [r for r in rows if r.get("phase", "test") == "test"]
    keys = sorted({(r["workload"], r["sampler"], r["k"]) for r in rows})
    for key in keys:
        p = next(r for r in rows if (r["workload"], r["sampler"], r["k"]) == key and r["method"] == "proxy")
        g = next(r for r in rows if (r["workload"], r["sampler"], r["k"]) == key and r["method"] == "greedy")
        dp, dt = p["psnr"] - g["psnr"], p["truth"] - g["truth"]
        total += 1
        within += dp >= -1.0 and dt >= -1.0
        cheap &= p["full_run_equivalents"] <= 10
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {p['full_run_equivalents']:.1f}, {p['seconds']:.0f} |"
                     f" {g['full_run_equivalents']:.0f}, {g['seconds']:.0f} | {p['psnr']:.1f} | {g['psnr']:.1f} | {p['truth']:.1f} |"
                     f" {g['truth']:.1f} | {p['baseline_psnr']:.1f} / {p['baseline_truth']:.1f} | {dp:+.1f} / {dt:+.1f} |")  # fmt: skip
    lines += ["", f"Target (within 1 dB of greedy against both references, at <= 10 full-run equivalents): within 1 dB in {within} of"
              f" {total} cells; the proxy's cost is {'<=' if cheap else 'NOT always <='} 10 runs in every cell."]  # fmt: skip
    if design:
        lines += ["", "## The design choice, on the validation split", "",
                  "Median PSNR vs the 50-step output over the validation samples (classes 0-4, seeds 5-7), the schedules"
                  " calibrated as above; in brackets the difference to greedy and the full-run equivalents.", "",
                  "| workload | sampler | K | greedy | proxy (shipped: gain scales and fitted gain) | "
                  + " | ".join(DESIGNS) + " |", "|---|---|---:|---:|---:|" + "---:|" * len(DESIGNS)]  # fmt: skip
        diffs: dict[str, list[float]] = {"proxy": [], **{name: [] for name in DESIGNS}}  # method - greedy, per cell
        for key in sorted({(r["workload"], r["sampler"], r["k"]) for r in design}):
            got = {r["method"]: r for r in design if (r["workload"], r["sampler"], r["k"]) == key}
            g = got["greedy"]["psnr"]
            cells = []
            for m in diffs:
                if m not in got:  # rows written before this design existed
                    cells.append("")
                    continue
                diffs[m].append(got[m]["psnr"] - g)
                cells.append(f"{got[m]['psnr']:.1f} ({got[m]['psnr'] - g:+.1f}; {got[m]['full_run_equivalents']:.0f} runs)")
            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {g:.1f} | " + " | ".join(cells) + " |")
        summary = [f"{m} {sum(d >= -1.0 for d in ds)} of {len(ds)} cells ({np.mean(ds):+.2f} dB)" for m, ds in diffs.items() if ds]
        lines += ["", "Within 1 dB of greedy on validation (mean difference to greedy): " + "; ".join(summary) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", nargs="+", default=["digits", "shapes", "flow"])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-validation", action="store_true", help="skip the design rows on the validation split")
    p.add_argument("--samplers", nargs="+", default=None, help="only these samplers (default: euler and dpmpp_2m, flow_* on flow)")
    p.add_argument("--out", type=Path, default=RESULTS / "calibration_cost.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    started = time.perf_counter()
    rows = []
    for name, wl in workloads(args.workloads, args.quick).items():
        for sampler in ("euler", "dpmpp_2m") if name != "flow" else ("flow_euler", "flow_dpmpp_2m"):
            if args.samplers and sampler not in args.samplers:
                continue
            rows += run(wl, sampler, args.quick, not args.no_validation)
            text = write(args, rows, started)  # after every sampler: a stopped run keeps what it finished
    print(text)
    return 0


def write(args, rows: list[dict], started: float) -> str:
    return write_results(args.out, run_meta(args.threads, started), rows, report)


if __name__ == "__main__":
    raise SystemExit(main())
