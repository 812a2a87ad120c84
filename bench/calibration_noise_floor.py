"""How far apart two greedy schedules land when only the calibration batch changes: the noise floor
under calibration_cost.py's "within 1 dB of greedy" target.

    python bench/calibration_noise_floor.py [--workloads digits shapes] [--quick] [--out PATH]

calibration_cost.py compares the proxy schedule with the greedy one, each calibrated on one small
batch (digits 20 samples, shapes 5), on the held-out test samples (digits 30, shapes 15). Part of any difference is the
search, part is which batch each search happened to see. This script measures the second part:
per workload, sampler and K, the greedy AND the proxy search on batch A (calibration_cost.py's:
classes 0-4, seeds 1-2; shapes seed 1) and on a disjoint batch B (classes 0-4, seeds 8-9; shapes
seed 8; neither validation nor test), all four schedules on the same test split (classes 5-9,
seeds 0, 3, 4) against the 50-step output and the ODE truth.

Read: greedy(B) - greedy(A) is what the target's criterion moves by when nothing but the
calibration batch changes; proxy - greedy on batch B is a second, independent sample of the
comparison calibration_cost.py reports on batch A.
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
from calibration_cost import KS, N, RESULTS, calibration_latents  # noqa: E402  (batch A is calibration_cost's by construction)

from adaptive_sampling import calibrate  # noqa: E402
from adaptive_sampling.calibration import calibration_path  # noqa: E402
from adaptive_sampling.evaluation import psnr  # noqa: E402
from adaptive_sampling.progress import Bar  # noqa: E402

CAL_B = {"classes": (0, 1, 2, 3, 4), "seeds": (8, 9)}  # disjoint from CAL, the validation seeds (5-7) and TEST


def run(wl, sampler: str, quick: bool, bar) -> list[dict]:
    case = Case(wl, TEST, sampler, N)
    rows = []
    for name, split in (("A", CAL), ("B", CAL_B)):
        x_cal, y = calibration_latents(wl, case, split, quick)
        path = calibration_path(wl.model, sampler, case.sigmas, x_cal, {"y": y}, min_calls=min(KS), method="greedy", disable=True)
        bar.update(1)
        for k in KS:
            proxy = calibrate(wl.model, sampler, case.sigmas, x_cal, {"y": y}, nfe=k, method="proxy", disable=True)
            for method, policy in (("greedy", path.policy(k)), ("proxy", proxy)):
                out, rep = case.run(policy)
                assert (rep.nfe == k).all(), (method, rep.nfe)
                rows.append({"workload": wl.name, "sampler": sampler, "k": k, "batch": name, "method": method,
                             "calibration_samples": int(x_cal.shape[0]), "test_samples": int(case.x.shape[0]),
                             "psnr": float(np.median(psnr(out, case.ref))), "truth": float(np.median(psnr(out, case.truth)))})  # fmt: skip
            bar.update(1)
    return rows


def samples(rows: list[dict], key: str) -> str:
    """'digits 30, shapes 15': the per-workload count ``key`` of the rows."""
    return ", ".join(f"{w} {n}" for w, n in dict.fromkeys((r["workload"], r[key]) for r in rows))


def report(rows: list[dict], meta: dict) -> str:
    lines = ["# The noise floor of calibration_cost.py's target: the same search on another calibration batch", "",
             f"`{meta['command']}`, {meta['date']}, {meta['machine']} CPU, {meta['threads']} torch threads, torch {meta['torch']},"
             f" commit {meta['commit']}; {meta['minutes']} min in all.", "",
             "Median PSNR over the held-out test samples (classes 5-9, seeds 0, 3, 4; " + samples(rows, "test_samples")
             + "), vs the 50-step output / vs the ODE truth. Batch A: calibration_cost.py's calibration batch (classes 0-4, seeds 1-2; shapes seed 1); batch B: classes"
             " 0-4, seeds 8-9 (shapes seed 8), disjoint from A, validation and test; calibration samples per batch: " + samples(rows, "calibration_samples") + ".", "",
             "| workload | sampler | K | greedy A | greedy B | greedy B - A | proxy A - greedy A | proxy B - greedy B |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    keys = sorted({(r["workload"], r["sampler"], r["k"]) for r in rows})
    floor_miss, proxy_miss, diffs = 0, {"A": 0, "B": 0}, {"greedy B - A": [], "proxy - greedy": []}
    for key in keys:
        got = {(r["batch"], r["method"]): r for r in rows if (r["workload"], r["sampler"], r["k"]) == key}
        ga, gb, pa, pb = got["A", "greedy"], got["B", "greedy"], got["A", "proxy"], got["B", "proxy"]

        def d(a, b):
            return a["psnr"] - b["psnr"], a["truth"] - b["truth"]

        dg, da, db = d(gb, ga), d(pa, ga), d(pb, gb)
        floor_miss += min(dg) < -1.0
        proxy_miss["A"] += min(da) < -1.0
        proxy_miss["B"] += min(db) < -1.0
        diffs["greedy B - A"] += list(dg)
        diffs["proxy - greedy"] += list(da) + list(db)
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {ga['psnr']:.1f} / {ga['truth']:.1f} | {gb['psnr']:.1f} / {gb['truth']:.1f} |"
                     f" {dg[0]:+.1f} / {dg[1]:+.1f} | {da[0]:+.1f} / {da[1]:+.1f} | {db[0]:+.1f} / {db[1]:+.1f} |")  # fmt: skip
    n = len(keys)
    gb, pg = np.array(diffs["greedy B - A"]), np.array(diffs["proxy - greedy"])
    lines += ["", f"More than 1 dB below against either reference: greedy on batch B vs greedy on batch A in {floor_miss} of {n} cells;"
              f" the proxy vs greedy on batch A in {proxy_miss['A']} of {n}, on batch B in {proxy_miss['B']} of {n}.", "",
              "Differences in dB, both references pooled (mean, median, standard deviation, median |difference|):"
              f" greedy B - greedy A ({len(gb)} pairs) {gb.mean():+.2f}, {np.median(gb):+.2f}, {gb.std():.2f}, {np.median(np.abs(gb)):.2f};"
              f" proxy - greedy on the same batch ({len(pg)} pairs) {pg.mean():+.2f}, {np.median(pg):+.2f}, {pg.std():.2f},"
              f" {np.median(np.abs(pg)):.2f}."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", nargs="+", default=["digits", "shapes"])
    p.add_argument("--quick", action="store_true", help="tiny sizes, for the test of this script")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS / "calibration_noise_floor.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    started = time.perf_counter()
    rows: list[dict] = []
    wls = workloads(args.workloads, args.quick)
    samplers = {name: ("euler", "dpmpp_2m") if name != "flow" else ("flow_euler", "flow_dpmpp_2m") for name in wls}
    with Bar(sum(len(s) for s in samplers.values()) * 2 * (1 + len(KS)), "noise floor") as bar:
        for name, wl in wls.items():
            for sampler in samplers[name]:
                rows += run(wl, sampler, args.quick, bar)
                text = write_results(args.out, run_meta(args.threads, started), rows, report)  # after every sampler
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
