"""Write ``bench/results/calibration.md`` and its plot from the rows of ``bench/calibration_study.py``.

    python bench/summarize_calibration.py [bench/results/calibration.md]   # from the .jsonl and .meta.json beside it
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import numpy as np

KS = (20, 25, 30, 35)
SAMPLERS = ("ddim", "euler", "dpmpp_2m")
TARGET_CALLS, TARGET_DB = 30, 3.0


def margin(r, truth=False) -> float:
    """PSNR minus the better of fewer steps and uniform stride at the same calls."""
    s = "_truth" if truth else ""
    return r["truth" if truth else "psnr"] - max(r["fewer" + s], r["uniform" + s])


def med(values) -> str:
    v = np.asarray(list(values), dtype=float)
    return f"{np.median(v):+.1f} [{v.min():+.1f}, {v.max():+.1f}]" if len(v) else "-"


def select(rows, **kw):
    return [r for r in rows if all(r.get(k) == v for k, v in kw.items())]


def best_method(rows, workload, sampler, calibrated: bool) -> str | None:
    """The best method of a kind by median margin vs the N-step output on the VALIDATION split."""
    scores = {}
    for r in select(rows, workload=workload, split="validation", sampler=sampler):
        m = r["method"]
        if m.startswith("[") or m.startswith("calibrated") != calibrated:
            continue
        scores.setdefault(m, []).append(margin(r))
    return _best(scores)


def _best(scores: dict) -> str | None:
    """The method with the best median among those measured as often as the most measured one
    (the paper's rule runs at one K only: it has its own NFE)."""
    most = max((len(v) for v in scores.values()), default=0)
    scores = {m: np.median(v) for m, v in scores.items() if len(v) == most}
    return max(scores, key=scores.get) if scores else None


def best_online_family(rows, sampler) -> str | None:
    """One online family per sampler for BOTH models: the best median validation margin, pooled."""
    scores = {}
    for r in select(rows, split="validation", sampler=sampler):
        m = r["method"]
        if not m.startswith("[") and not m.startswith("calibrated") and r["k"] <= TARGET_CALLS:
            scores.setdefault(m, []).append(margin(r))
    return _best(scores)


def default_table(rows, workloads) -> list[str]:
    lines = ["| model | sampler | calls (of 50) | margin vs 50-step | margin vs ODE truth | vs fewer steps (truth) | vs DPM-Solver++ same calls (truth) | targets met |",
             "|---|---|---|---:|---:|---:|---:|---|"]  # fmt: skip
    for wl, sampler in itertools.product(workloads, SAMPLERS):
        g = select(rows, workload=wl, split="default", sampler=sampler)
        if not g:
            continue
        m50, vs_fewer = np.median([margin(r) for r in g]), np.median([r["truth"] - r["fewer_truth"] for r in g])
        met = "yes" if m50 >= TARGET_DB and vs_fewer >= 0 and max(r["nfe"] for r in g) <= TARGET_CALLS else "no"
        lines.append(f"| {wl} | {sampler} | {min(r['nfe'] for r in g):.1f}-{max(r['nfe'] for r in g):.1f} | {med(margin(r) for r in g)} | "
                     f"{med(margin(r, True) for r in g)} | {med(r['truth'] - r['fewer_truth'] for r in g)} | "
                     f"{med(r['truth'] - r['dpm_truth'] for r in g)} | {met} |")  # fmt: skip
    return lines


def headline(rows, workloads) -> list[str]:
    lines = ["| model | sampler | method | calls (of 50) | margin vs 50-step | margin vs ODE truth | vs DPM-Solver++ K steps (truth) | vs DPM-Solver++ calibrated grid (truth) |",
             "|---|---|---|---|---:|---:|---:|---:|"]  # fmt: skip
    for wl, sampler in itertools.product(workloads, SAMPLERS):
        test = select(rows, workload=wl, split="test", sampler=sampler)
        if not test:
            continue
        picks = [("best calibrated: " + str(best_method(rows, wl, sampler, True)), best_method(rows, wl, sampler, True)),
                 ("default online: " + str(best_online_family(rows, sampler)), best_online_family(rows, sampler))]  # fmt: skip
        for label, m in picks:
            g = [r for r in test if r["method"] == m and r["k"] <= TARGET_CALLS]
            if not g:
                continue
            lines.append(f"| {wl} | {sampler} | {label} | {min(r['nfe'] for r in g):.0f}-{max(r['nfe'] for r in g):.0f} | "
                         f"{med(margin(r) for r in g)} | {med(margin(r, True) for r in g)} | "
                         f"{med(r['truth'] - r['dpm_truth'] for r in g)} | {med(r['truth'] - r['dpm_cal_truth'] for r in g)} |")  # fmt: skip
        for b, label in (("fewer", "fewer steps"), ("uniform", "uniform stride"), ("dpm", "DPM-Solver++(2M), K steps"),
                         ("dpm_cal", "DPM-Solver++(2M), calibrated K-point grid"), ("greedy oracle", "per-image greedy oracle")):  # fmt: skip
            g = [r for r in test if r["method"] == f"[{b}]" and r["k"] <= TARGET_CALLS]
            if not g:
                continue
            ref = {(r["k"], r["seed"]): r for r in test if r["method"] == best_method(rows, wl, sampler, True)}
            pairs = [(r, ref.get((r["k"], r["seed"]))) for r in g]
            pairs = [(r, c) for r, c in pairs if c is not None]
            lines.append(f"| {wl} | {sampler} | {label} | {min(r['k'] for r in g)}-{max(r['k'] for r in g)} | "
                         f"{med(r['psnr'] - max(c['fewer'], c['uniform']) for r, c in pairs)} | "
                         f"{med(r['truth'] - max(c['fewer_truth'], c['uniform_truth']) for r, c in pairs)} | "
                         f"{med(r['truth'] - c['dpm_truth'] for r, c in pairs)} | {med(r['truth'] - c['dpm_cal_truth'] for r, c in pairs)} |")  # fmt: skip
    return lines


def targets(rows, workloads) -> list[str]:
    lines = ["| model | sampler | policy | K <= 30: median margin vs 50-step (>= +3 dB?) | vs ODE truth, margin over fewer steps (>= 0?) | met |",
             "|---|---|---|---:|---:|---|"]  # fmt: skip
    for wl, sampler in itertools.product(workloads, SAMPLERS):
        for kind, m in (("calibrated", best_method(rows, wl, sampler, True)), ("default online", best_online_family(rows, sampler))):
            g = [r for r in select(rows, workload=wl, split="test", sampler=sampler, method=m) if r["k"] <= TARGET_CALLS]
            if not g:
                continue
            m50 = float(np.median([margin(r) for r in g]))
            mtr = float(np.median([r["truth"] - r["fewer_truth"] for r in g]))
            met = "yes" if m50 >= TARGET_DB and mtr >= 0 else "no"
            lines.append(f"| {wl} | {sampler} | {kind}: {m} | {m50:+.1f} | {mtr:+.1f} | {met} |")
    return lines


def every_method(rows, wl) -> list[str]:
    lines = ["| sampler | method | margin vs 50-step | margin vs ODE truth | vs DPM-Solver++ K steps (truth) | beats fewer steps (vs 50-step) |",
             "|---|---|---:|---:|---:|---:|"]  # fmt: skip
    test = [r for r in select(rows, workload=wl, split="test") if not r["method"].startswith("[")]
    key = lambda r: (r["sampler"], r["method"])  # noqa: E731
    for (sampler, m), g in itertools.groupby(sorted(test, key=key), key=key):
        g = list(g)
        lines.append(f"| {sampler} | {m} | {med(margin(r) for r in g)} | {med(margin(r, True) for r in g)} | "
                     f"{med(r['truth'] - r['dpm_truth'] for r in g)} | {sum(r['psnr'] > r['fewer'] for r in g)} of {len(g)} |")  # fmt: skip
    return lines


def per_k(rows, wl) -> list[str]:
    lines = ["| sampler | method | " + " | ".join(f"K={k}" for k in KS) + " |", "|---|---|" + "---:|" * len(KS)]
    test = select(rows, workload=wl, split="test")
    key = lambda r: (r["sampler"], r["method"])  # noqa: E731
    for (sampler, m), g in itertools.groupby(sorted(test, key=key), key=key):
        g = list(g)
        cells = []
        for k in KS:
            gk = [r for r in g if r["k"] == k] or [r for r in g if r["method"] == "[full 50 steps]"]
            cells.append(f"{np.median([r['psnr'] for r in gk]):.1f} / {np.median([r['truth'] for r in gk]):.1f}" if gk else "-")
        lines.append(f"| {sampler} | {m} | " + " | ".join(cells) + " |")
    return lines


def transfer_table(rows, workloads) -> list[str]:
    lines = ["| model | sampler | schedule | used at | calls | margin vs N-step | margin vs ODE truth | vs DPM-Solver++ K' steps (truth) |",
             "|---|---|---|---|---|---:|---:|---:|"]  # fmt: skip
    for wl, sampler in itertools.product(workloads, SAMPLERS):
        tr = select(rows, workload=wl, split="transfer", sampler=sampler)
        if not tr:
            continue
        conds = list(dict.fromkeys(r["condition"] for r in tr))
        for c in conds:
            g = [r for r in tr if r["condition"] == c]
            lines.append(f"| {wl} | {sampler} | {g[0]['method']} | {c} | {min(r['nfe'] for r in g):.0f}-{max(r['nfe'] for r in g):.0f} | "
                         f"{med(margin(r) for r in g)} | {med(margin(r, True) for r in g)} | {med(r['truth'] - r['dpm_truth'] for r in g)} |")  # fmt: skip
    return lines


def aggregates(rows, workloads) -> list[str]:
    lines = ["| model | sampler | reuse | mean-error greedy | K most often kept | (margin vs 50-step; vs ODE truth) |", "|---|---|---|---:|---:|---|"]
    for wl, sampler in itertools.product(workloads, SAMPLERS):
        g = select(rows, workload=wl, split="test", sampler=sampler)
        a, b = [r for r in g if r["method"] == "calibrated mean/copy"], [r for r in g if r["method"] == "calibrated freq/copy"]
        if a and b:
            lines.append(f"| {wl} | {sampler} | copy | {med(margin(r) for r in a)}; {med(margin(r, True) for r in a)} | "
                         f"{med(margin(r) for r in b)}; {med(margin(r, True) for r in b)} | |")  # fmt: skip
    return lines


def plot(rows, workloads, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2 * len(workloads), 3, figsize=(15, 4.2 * 2 * len(workloads)), squeeze=False)
    styles = {"[fewer]": ("k", "--", "v", "fewer steps"), "[uniform]": ("0.55", "--", "s", "uniform stride"),
              "[dpm]": ("k", ":", "^", "DPM-Solver++(2M), K steps"), "[dpm_cal]": ("tab:brown", ":", "^", "DPM-Solver++(2M), calibrated grid"),
              "[greedy oracle]": ("k", "none", "*", "per-image greedy oracle")}  # fmt: skip
    for w, wl in enumerate(workloads):
        for col, sampler in enumerate(SAMPLERS):
            test = select(rows, workload=wl, split="test", sampler=sampler)
            cal, onl = best_method(rows, wl, sampler, True), best_online_family(rows, sampler)
            shown = {**styles, cal: ("tab:red", "-", "o", f"best calibrated ({cal})"), onl: ("tab:blue", "-", "D", f"default online ({onl})")}
            for row, metric in enumerate(("psnr", "truth")):
                ax = axes[2 * w + row, col]
                for m, (color, ls, marker, label) in shown.items():
                    g = [r for r in test if r["method"] == m]
                    if not g:
                        continue
                    ks = sorted({r["k"] for r in g})
                    ax.plot([np.median([r["nfe"] for r in g if r["k"] == k]) for k in ks],
                            [np.median([r[metric] for r in g if r["k"] == k]) for k in ks],
                            color=color, ls=ls, marker=marker, ms=8 if marker == "*" else 5, label=label)  # fmt: skip
                full = [r[metric] for r in test if r["method"] == "[full 50 steps]"]
                if metric == "truth" and full:
                    ax.axhline(np.median(full), color="0.3", lw=0.8, label="full 50 steps")
                ax.set_title(f"{wl}, {sampler}: PSNR vs {'50-step output' if metric == 'psnr' else 'ODE truth'}", fontsize=9)
                ax.set_xlabel("model calls per sample")
                ax.grid(alpha=0.3)
                ax.legend(fontsize=6)
    fig.suptitle("Held-out test split (classes 5-9, seeds 0, 3, 4): medians over seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(out: Path, rows: list[dict], metas: dict[str, dict]) -> None:
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    doc = (Path(__file__).with_name("calibration_study.py").read_text().split('"""')[1]).split("Protocol (the numbers in ``bench/results/calibration.md``):")[1]
    lines = [
        "# Calibrated skip schedules and the default online policy, on held-out prompts",
        "",
        *[f"- {name}: `{m['command']}` on {m['machine']}; commit {m['commit']}; {m['date']}; {m['minutes']} min." for name, m in metas.items()],
        "",
        doc.strip(),
        "",
        "Margins are dB, median over K x test seeds [min, max]. `margin` = PSNR minus the better of fewer steps and",
        "uniform stride at the same calls; `vs ODE truth` scores against the 250-step solve instead of the 50-step output.",
        "",
        "## What to use (test split, K <= 30 of 50 calls)",
        "",
        *headline(rows, workloads),
        "",
        "Baseline rows give the baseline's own margin over the better of fewer steps and uniform stride, at the calls of the",
        "best calibrated policy (so they are <= 0 for those two).",
        "",
        "## Targets",
        "",
        *targets(rows, workloads),
        "",
        "## `default_policy()` as shipped (test split, one tolerance for both models)",
        "",
        "The rows above use each model's own tuned tolerance per K; the shipped default has one tolerance (the",
        "geometric mean of the two models' tolerances for 30 of 50 calls), run here on each model's test split.",
        "Median over test seeds [min, max]; `targets met`: <= 30 calls, >= +3 dB vs 50-step, >= 0 vs fewer steps (truth).",
        "",
        *default_table(rows, workloads),
        "",
        "## Which aggregation transfers better (copy reuse, test split, K = 20-35; searched on digits only)",
        "",
        *aggregates(rows, workloads),
        "",
        "## Transfer of the best calibrated schedule (test split, K = 20-35 (digits) or 20 and 30 (shapes) at 50 steps, K' = K N / 50)",
        "",
        *transfer_table(rows, workloads),
        "",
    ]
    for wl in workloads:
        lines += [f"## {wl}: every method on the test split (K = 20-35)", "", *every_method(rows, wl), "",
                  f"### {wl}: PSNR per K (median over test seeds; vs 50-step / vs ODE truth)", "", *per_k(rows, wl), ""]  # fmt: skip
    lines += ["## Thresholds tuned on the calibration split (threshold, mean NFE there)", "", "| key | threshold | NFE |", "|---|---:|---:|"]
    for m in metas.values():
        for k, (th, n) in m["tuned"].items():
            lines.append(f"| {k} | {th:.3g} | {n:.1f} |")
    lines += ["", "## Calibration searches (calibration split)", "", "| search | samples | model row-evaluations | seconds |", "|---|---:|---:|---:|"]
    for k, p in ((k, p) for m in metas.values() for k, p in m["calibration"].items()):
        lines.append(f"| {k} | {p['calibration_samples']} | {p['model_row_evaluations']:,} | {p['seconds']:.0f} |")
    lines += ["", f"![calibration study]({out.with_suffix('.png').name})", ""]
    out.write_text("\n".join(lines) + "\n")
    plot(rows, workloads, out.with_suffix(".png"))


def main(out: Path) -> None:
    """Merge the rows and meta files beside ``out`` (``calibration_<workload>.jsonl`` / ``.meta.json``,
    ``calibration_cross.jsonl``) into ``out`` and its plot."""
    stem = out.with_suffix("")
    rows, metas = [], {}
    for f in sorted(out.parent.glob(f"{stem.name}_*.jsonl")):
        rows += [json.loads(line) for line in f.read_text().splitlines() if line]
        meta = f.with_suffix(".meta.json")
        if meta.exists():
            metas[f.stem.removeprefix(stem.name + "_")] = json.loads(meta.read_text())
    write_report(out, rows, metas)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "results" / "calibration.md")
