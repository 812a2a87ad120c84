"""Summarise bench/results/budget.jsonl (written by bench/budget_study.py) into budget.md and budget.png.

    python bench/summarize_budget.py [--jsonl bench/results/budget.jsonl] [--out bench/results/budget.md]

Margins are per (workload, sampler, N, K, seed): the method's PSNR minus the better of fewer steps and
uniform stride (copied eps) at the same K, against the N-step output ("vs N-step") and against the ODE
truth ("vs truth"); tables give the median [min, max] over seeds (and over K where K is pooled).
The targets are the issue's (20), checked row by row and stated plainly.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
BASELINES = ("fewer steps", "uniform stride")


def load(path: Path) -> tuple[list[dict], list[dict]]:
    metas, rows = [], []
    for line in path.read_text().splitlines():
        r = json.loads(line)
        (metas if "meta" in r else rows).append(r)
    return metas, rows


def index(rows: list[dict], phase: str) -> dict:
    """(workload, sampler, steps, k, seed) -> {method: row}."""
    out: dict = defaultdict(dict)
    for r in rows:
        if r.get("phase") == phase:
            out[(r["workload"], r["sampler"], r["steps"], r["k"], r["seed"])][r["method"]] = r
    return out


def margins(idx: dict, method: str, against: str = "best") -> dict:
    """key -> (margin vs N-step, margin vs truth); ``against``: "best" of fewer steps / uniform stride, or a method name."""
    out = {}
    for key, m in idx.items():
        if method not in m:
            continue
        if against == "best":
            if not all(b in m for b in BASELINES):
                continue
            ref_p = max(m[b]["psnr"] for b in BASELINES)
            ref_t = max(m[b]["truth"] for b in BASELINES)
        else:
            if against not in m:
                continue
            ref_p, ref_t = m[against]["psnr"], m[against]["truth"]
        out[key] = (m[method]["psnr"] - ref_p, m[method]["truth"] - ref_t)
    return out


def fmt(values) -> str:
    v = np.asarray([x for x in values if x == x], float)
    if not len(v):
        return "-"
    return f"{np.median(v):+.1f} [{v.min():+.1f}, {v.max():+.1f}]"


def designs_section(rows: list[dict]) -> list[str]:
    idx = index(rows, "designs")
    if not idx:
        return []
    names = sorted({meth for m in idx.values() for meth in m} - set(BASELINES) - {"DPM-Solver++ with K steps"})
    lines = ["## Designs (validation split: classes 0-4, seed 5; 50 steps; K = 15..35)", "",
             "Margin over the better of fewer steps and uniform stride (copied eps), against the 50-step output, median [min, max]"
             " over K (and seeds); the choice is the best overall median.", "",
             "| design | overall | " + " | ".join(f"{w} {s}" for w, s in _ws(idx)) + " |",
             "|---|---:|" + "---:|" * len(_ws(idx))]  # fmt: skip
    scores = {}
    for name in names:
        mg = margins(idx, name)
        overall = [v[0] for v in mg.values()]
        scores[name] = float(np.median(overall)) if overall else -np.inf
        cells = [fmt(v[0] for k, v in mg.items() if (k[0], k[1]) == ws) for ws in _ws(idx)]
        lines.append(f"| {name} | {fmt(overall)} | " + " | ".join(cells) + " |")
    best = max(scores, key=scores.get)
    lines += ["", f"Best on validation: **{best}** (median {scores[best]:+.1f} dB).", ""]
    return lines


def _ws(idx: dict) -> list[tuple[str, str]]:
    return sorted({(k[0], k[1]) for k in idx})


def test_section(rows: list[dict]) -> tuple[list[str], dict]:
    idx = index(rows, "test")
    if not idx:
        return [], {}
    lines = ["## Test (held out: classes 5-9, seeds 0, 3, 4)", "",
             "Per workload, sampler, N and K: `default_policy(nfe=K)`'s margin over the better of fewer steps and uniform stride"
             " against the N-step output and against the ODE truth; its PSNR minus the calibrated schedule's (how much of the"
             " calibrated gain it keeps; negative = below the schedule) and minus DPM-Solver++ with K steps (both against the"
             " truth). Median [min, max] over the 3 seeds.", "",
             "| workload | sampler | N | K | vs N-step | vs truth | vs calibrated (truth) | vs DPM++ K steps (truth) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    dp = "default_policy(nfe=K)"
    best = margins(idx, dp)
    cal = margins(idx, dp, "calibrated schedule")
    dpm = margins(idx, dp, "DPM-Solver++ with K steps")
    groups = sorted({k[:4] for k in best})
    checks = {"t1": [], "t2": []}
    for g in groups:
        b = [v for k, v in best.items() if k[:4] == g]
        c = [v for k, v in cal.items() if k[:4] == g]
        d = [v for k, v in dpm.items() if k[:4] == g]
        w, s, n, k = g
        lines.append(f"| {w} | {s} | {n} | {k} | {fmt(x[0] for x in b)} | {fmt(x[1] for x in b)} | {fmt(x[1] for x in c)} | {fmt(x[1] for x in d)} |")
        med_p, med_t = float(np.median([x[0] for x in b])), float(np.median([x[1] for x in b]))
        frac = k / n
        if frac <= 0.6 + 1e-9:  # K <= 30 of 50 and the same fractions
            checks["t1"].append((g, med_p >= 3.0 and med_t >= 0.0, med_p, med_t))
        if abs(frac - 0.3) < 1e-9:
            checks["t2"].append((g, med_p >= 0.0 and med_t >= 0.0, med_p, med_t))
    return lines + [""], checks


def batch_section(rows: list[dict]) -> tuple[list[str], list]:
    b = [r for r in rows if r.get("phase") == "batch"]
    if not b:
        return [], []
    lines = ["## Calls that save wall-clock in a batch (shapes UNet, 50 steps, speedup 2)", "",
             "| path | batch | policy | calls / sample | model forwards / run | rows / forward | wall-clock speedup | steps / calls |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    checks = []
    for r in b:
        lines.append(f"| {r['path']} | {r['batch']} | {r['config']} | {r['calls']:.1f} | {r['forwards']} | {r['rows']:.1f} |"
                     f" {r['speedup']:.2f}x | {r['ideal']:.2f}x |")  # fmt: skip
        if r["batch"] == 8 and r["config"].startswith("aligned") and r["path"].startswith("hook"):
            checks.append((r["forwards"] <= 1.15 * r["calls"], r["speedup"] >= 0.85 * r["ideal"], r))
    return lines + [""], checks


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    idx = index(rows, "test")
    panels = sorted({(k[0], k[1]) for k in idx if k[2] == 50})
    if not panels:
        return
    cols = min(4, len(panels))
    nrows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    methods = ["default_policy(nfe=K)", "calibrated schedule", "uniform stride", "fewer steps", "DPM-Solver++ with K steps"]
    for ax, (w, s) in zip(axes.flat, panels):
        for meth in methods:
            pts = defaultdict(list)
            for key, m in idx.items():
                if key[:2] == (w, s) and key[2] == 50 and meth in m:
                    pts[key[3]].append(m[meth]["truth"])
            ks = sorted(pts)
            if ks:
                ax.plot(ks, [np.median(pts[k]) for k in ks], marker="o", lw=2.2 if meth.startswith("default") else 1.2, label=meth)
        ax.set_title(f"{w}, {s}, N = 50", fontsize=9)
        ax.set_xlabel("model calls per sample (K)")
        ax.set_ylabel("PSNR vs ODE truth (dB)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(methods), fontsize=8, bbox_to_anchor=(0.5, -0.02))
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jsonl", type=Path, default=RESULTS / "budget.jsonl")
    p.add_argument("--out", type=Path, default=RESULTS / "budget.md")
    args = p.parse_args(argv)
    metas, rows = load(args.jsonl)
    lines = ["# The speed knob: `default_policy(nfe=K)` measured", ""]
    for m in metas:
        meta = m["meta"]
        lines.append(f"- `{meta['command']}`: phases {', '.join(m['phases'])} on {', '.join(m['workloads'])}; {meta['date']},"
                     f" {meta['machine']} CPU, {meta['threads']} torch threads, Python {meta['python']}, torch {meta['torch']},"
                     f" commit {meta['commit']}; {meta['minutes']} min.")  # fmt: skip
    lines.append("")
    lines += designs_section(rows)
    test_lines, checks = test_section(rows)
    lines += test_lines
    batch_lines, bchecks = batch_section(rows)
    lines += batch_lines
    lines += ["## Targets", ""]
    if checks:
        t1 = checks["t1"]
        miss = [c for c in t1 if not c[1]]
        lines.append(f"- K <= 0.6 N (<= 30 of 50): >= +3 dB vs N-step and >= 0 vs truth (medians): met in {len(t1) - len(miss)} of {len(t1)}"
                     " workload x sampler x N x K cells" + ("." if not miss else "; missed in: " + "; ".join(
                         f"{g[0]} {g[1]} N={g[2]} K={g[3]} ({p:+.1f} / {t:+.1f})" for g, _, p, t in miss) + "."))  # fmt: skip
        t2 = checks["t2"]
        miss2 = [c for c in t2 if not c[1]]
        lines.append(f"- K = 0.3 N (15 of 50): >= 0 against both: met in {len(t2) - len(miss2)} of {len(t2)}" + ("." if not miss2 else
                     "; missed in: " + "; ".join(f"{g[0]} {g[1]} N={g[2]} ({p:+.1f} / {t:+.1f})" for g, _, p, t in miss2) + "."))  # fmt: skip
    for fwd_ok, speed_ok, r in bchecks:
        lines.append(f"- Batch of 8 through the hook: forwards {r['forwards']} vs 1.15 x budget = {1.15 * r['calls']:.1f}:"
                     f" {'met' if fwd_ok else 'MISSED'}; wall-clock speedup {r['speedup']:.2f}x vs 0.85 x {r['ideal']:.2f} ="
                     f" {0.85 * r['ideal']:.2f}x: {'met' if speed_ok else 'MISSED'}.")  # fmt: skip
    lines.append("- Exactly K calls per sample: asserted for every run of the study (bench/budget_study.py `measure`) and"
                 " property-tested in tests/test_paced.py.")  # fmt: skip
    args.out.write_text("\n".join(lines) + "\n")
    plot(rows, args.out.with_suffix(".png"))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
