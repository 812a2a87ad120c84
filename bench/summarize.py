"""Turn the skip-kernel benchmark JSON (pytest-benchmark) and the junit XML of the runs into a
markdown summary: device, versions, date, raw numbers per group, speedups, the issue's targets.

    python bench/summarize.py --bench-json OUT/bench.json --bench-jsonl OUT/bench_rows.jsonl \
        --junit OUT/tests_junit.xml --junit OUT/bench_junit.xml --env OUT/env.txt --out OUT/summary.md

Only reads files; every figure comes from the JSON (see bench/bench_skip_kernel.py for what each
variant and field measures).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

VARIANT_ORDER = ["fused", "controller", "triton", "compiled", "unfused"]
TARGET_SPEEDUP, TARGET_PEAK = 3.0, 70.0


def fmt(value, digits=1):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def variant_key(name: str):
    base = name.split("-")[0]
    return (VARIANT_ORDER.index(base) if base in VARIANT_ORDER else len(VARIANT_ORDER), name)


def read_results(bench_json: Path | None, bench_jsonl: Path | None):
    """pytest-benchmark's JSON when it exists; else the per-benchmark JSON lines the benchmarks
    append as they finish (BENCH_JSONL), which survive a run cut short by a timeout."""
    if bench_json is not None and bench_json.exists():
        return json.loads(bench_json.read_text()), "pytest-benchmark JSON"
    if bench_jsonl is not None and bench_jsonl.exists():
        rows = [json.loads(line) for line in bench_jsonl.read_text().splitlines() if line.strip()]
        return {"benchmarks": rows}, "BENCH_JSONL lines (no pytest-benchmark JSON: the run was cut short?)"
    return None, "no results"


def load_benchmarks(data: dict):
    groups = defaultdict(dict)
    for b in data.get("benchmarks", []):
        info = b.get("extra_info", {})
        st = b["stats"]
        row = dict(info)
        row.update(
            median_us=st["median"] * 1e6,
            min_us=st["min"] * 1e6,
            mean_us=st["mean"] * 1e6,
            stddev_us=st["stddev"] * 1e6,
            iqr_us=st["iqr"] * 1e6,
            rounds=st["rounds"],
            iterations=st.get("iterations"),
            test=b["name"],
        )
        groups[b.get("group") or info.get("group", "?")][info.get("variant", b["name"])] = row
    return data, groups


def junit_outcomes(paths):
    """(file, counts, problems): problems = [(test, kind, message)] for failures, errors, skips."""
    out = []
    for p in paths:
        path = Path(p)
        if not path.exists():
            out.append((p, None, [("-", "missing", "no junit file (the run did not finish?)")]))
            continue
        root = ET.parse(path).getroot()
        counts = defaultdict(int)
        problems = []
        for case in root.iter("testcase"):
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            kind = "passed"
            for child in case:
                if child.tag in ("failure", "error", "skipped"):
                    kind = child.tag
                    message = (child.get("message") or child.text or "").strip().splitlines()
                    problems.append((name, kind, message[0][:300] if message else ""))
            counts[kind] += 1
        out.append((p, dict(counts), problems))
    return out


def summarize(bench_json: Path | None, junits, env_text: str | None, bench_jsonl: Path | None = None) -> str:
    lines = ["# Skip kernel: GPU/CPU check and benchmarks", ""]
    data, source = read_results(bench_json, bench_jsonl)
    data, groups = (None, {}) if data is None else load_benchmarks(data)
    machine = (data or {}).get("machine_info", {})
    ours = machine.get("adaptive_sampling", {})
    lines += [
        f"- date: {(data or {}).get('datetime', '-')}",
        f"- device: {ours.get('gpu') or machine.get('cpu', {}).get('brand_raw', '-')}"
        + (f" (capability {ours['gpu_capability']}, {ours['gpu_sms']} SMs)" if ours.get("gpu") else " (CPU)"),
        f"- torch {ours.get('torch', '-')}, triton {ours.get('triton', '-')}, CUDA runtime {ours.get('cuda_runtime', '-')}, "
        f"python {ours.get('python', machine.get('python_version', '-'))}, torch CPU threads {ours.get('torch_threads', '-')}",
        f"- commit: {(data or {}).get('commit_info', {}).get('id', '-')}"
        + (" (dirty)" if (data or {}).get("commit_info", {}).get("dirty") else ""),
    ]
    lines.append(f"- benchmark numbers from: {source}")
    peak_sources = {r.get("peak_source") for g in groups.values() for r in g.values() if r.get("peak_source")}
    if peak_sources:
        peaks = {r.get("peak_gbps") for g in groups.values() for r in g.values() if r.get("peak_gbps")}
        lines.append(f"- peak memory bandwidth: {', '.join(fmt(p, 0) for p in sorted(peaks))} GB/s ({'; '.join(sorted(peak_sources))})")
    lines.append("")

    lines += ["## Test and benchmark runs", ""]
    for path, counts, problems in junit_outcomes(junits):
        lines.append(f"- `{path}`: " + (", ".join(f"{v} {k}" for k, v in sorted(counts.items())) if counts else "missing"))
        for name, kind, message in problems:
            if kind != "skipped" or "budget" in message:
                lines.append(f"  - **{kind}** `{name}`: {message}")
        skipped = [m for _, k, m in problems if k == "skipped" and "budget" not in m]
        if skipped:
            reasons = defaultdict(int)
            for m in skipped:
                reasons[m] += 1
            lines += [f"  - skipped x{n}: {m}" for m, n in reasons.items()]
    lines.append("")

    if not groups:
        lines += ["No benchmark results.", ""]
    else:
        lines += [
            "## Results per group",
            "",
            "Wall: pytest-benchmark median per step (host clock; includes the host read or a synchronize). "
            "Device: CUDA-event median per step with the L2 cache flushed before each (includes the step's host "
            "synchronisation). Stream: kernel-only steps launched back to back (the kernels' throughput). GB/s: "
            "bytes of latents the criterion reads per step / time. Speedup: unfused wall / this wall.",
            "",
        ]
        for group in sorted(groups, key=lambda g: (g.startswith("large"), g)):
            rows = groups[group]
            any_row = next(iter(rows.values()))
            unfused = rows.get("unfused", {}).get("median_us")
            lines += [
                f"### {group}",
                "",
                f"shape {any_row.get('shape')} {any_row.get('dtype')}, {any_row.get('bytes_per_step', 0) / 1e6:,.2f} MB read per step",
                "",
                "| variant | wall median us | min us | IQR us | rounds | wall GB/s | device us | device GB/s | % peak | stream us | stream GB/s | stream % peak | D2H syncs/step | speedup vs unfused |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
            ]
            for name in sorted(rows, key=variant_key):
                r = rows[name]
                speedup = unfused / r["median_us"] if unfused else None
                lines.append(
                    f"| {name} | {fmt(r['median_us'])} | {fmt(r['min_us'])} | {fmt(r['iqr_us'])} | {r['rounds']} | "
                    f"{fmt(r.get('wall_gbps'))} | {fmt(r.get('device_us'))} | {fmt(r.get('device_gbps'))} | "
                    f"{fmt(r.get('pct_peak'))} | {fmt(r.get('stream_us'))} | {fmt(r.get('stream_gbps'))} | "
                    f"{fmt(r.get('stream_pct_peak'))} | {fmt(r.get('syncs_per_step'), 2)} | {fmt(speedup, 2)} |"
                )
            compile_s = rows.get("compiled", {}).get("compile_s")
            if compile_s is not None:
                lines.append(f"\ntorch.compile time for this group: {compile_s:.1f} s")
            lines.append("")

        lines += ["## Speedup of the fused step over the unfused torch ops (wall time)", ""]
        lines += ["| group | fused | controller | compiled | triton (no host read) |", "|---|---|---|---|---|"]
        for group in sorted(groups, key=lambda g: (g.startswith("large"), g)):
            rows = groups[group]
            unfused = rows.get("unfused", {}).get("median_us")
            cells = []
            for v in ("fused", "controller", "compiled", "triton"):
                t = rows.get(v, {}).get("median_us")
                cells.append(f"{unfused / t:.2f}x" if (unfused and t) else "-")
            lines.append(f"| {group} | " + " | ".join(cells) + " |")
        lines.append("")

        lines += targets(groups)
    if env_text:
        lines += ["## Environment", "", "```", env_text.strip(), "```", ""]
    return "\n".join(lines)


def targets(groups) -> list[str]:
    """The issue's benchmark targets, stated as measured facts (GPU only)."""
    on_gpu = any(r.get("device_us") is not None for g in groups.values() for r in g.values())
    out = ["## Targets (issue 3; figures, not tests)", ""]
    if not on_gpu:
        return out + ["CPU run: the targets concern a GPU (H100/H200); nothing to compare here.", ""]
    for group in sorted(g for g in groups if g.startswith(("sd15", "sdxl"))):
        rows = groups[group]
        f, u = rows.get("fused", {}).get("median_us"), rows.get("unfused", {}).get("median_us")
        if f and u:
            ok = u / f >= TARGET_SPEEDUP
            out.append(f"- {group}: fused is {u / f:.2f}x faster than unfused (target >= {TARGET_SPEEDUP:g}x): {'met' if ok else 'NOT met'}")
    large = groups.get("large-268MB-paper", {})
    best = max(((r.get("stream_pct_peak") or 0.0, n) for n, r in large.items() if n.startswith("triton")), default=None)
    if best:
        default = large.get("triton", {}).get("stream_pct_peak")
        per_step = large.get("triton", {}).get("pct_peak")
        out.append(
            f"- large history (268 MB): the default Triton launch streams at {fmt(default)}% of peak bandwidth "
            f"(back-to-back steps; {fmt(per_step)}% for one isolated step with its synchronisation); best variant "
            f"{best[1]} {best[0]:.1f}% (target >= {TARGET_PEAK:g}%): {'met' if (default or 0) >= TARGET_PEAK else 'NOT met'} with the default"
        )
    syncs = sorted({(g, v, r.get("syncs_per_step")) for g, rows in groups.items() for v, r in rows.items() if v in ("fused", "controller")})
    if syncs:
        counts = {s for _, _, s in syncs}
        out.append(f"- device-to-host syncs per step, fused/controller: {sorted(counts)} (target: exactly 1): {'met' if counts == {1.0} else 'NOT met'}")
    out.append("")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench-json", type=Path)
    ap.add_argument("--bench-jsonl", type=Path, help="fallback: the BENCH_JSONL file of the benchmarks")
    ap.add_argument("--junit", action="append", default=[])
    ap.add_argument("--env", type=Path, help="a text file with the environment report to append")
    ap.add_argument("--out", type=Path, help="write the markdown here (default: stdout only)")
    args = ap.parse_args(argv)
    env_text = args.env.read_text() if args.env and args.env.exists() else None
    text = summarize(args.bench_json, args.junit, env_text, args.bench_jsonl)
    if args.out:
        args.out.write_text(text + "\n")
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
