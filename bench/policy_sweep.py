"""Every skip policy family (decision rule x reuse) against the matched-NFE baselines, tuned on
some seeds and reported on others.

    python bench/policy_sweep.py [--workloads learned digits-exact gaussian] [--batch 16]

Protocol (the numbers in ``bench/results/policies.md``):

* 50 Karras steps per workload; K (model calls per sample) targets 20, 25, 30, 35, 40.
* Threshold rules (``ThirdOrder`` reference / paper, ``LocalError``) get their threshold tuned by
  bisection so that the mean NFE on the TUNING seeds (1, 2) is K; ``Budget`` and uniform-stride
  masks hit K by construction. Everything is then run on the TEST seeds (0, 3, 4), never used
  for tuning; each test run's per-sample NFE sets the baselines' K per sample.
* Baselines at the same per-sample K from the same noise: fewer steps (the same sampler on a
  K-step Karras grid), uniform stride (eps copied), DPM-Solver++(2M) with K Karras steps, and the
  greedy oracle path (learned model, K = 20, 30, 40).
* Scores: PSNR (data range 2) against the 50-step output of the same sampler AND against a fine
  ODE solve (DPM-Solver++(2M), 250 Karras steps), mean over the batch. The margin of a policy is
  its PSNR minus the better of fewer steps and uniform stride at the same calls.
* The best family per sampler is chosen on the tuning seeds (median margin over K) and its test
  margins are reported; the other families' test margins are listed for completeness.

Families: third_order (reference criterion, VP/VE as the reference code), paper (the paper's
criterion), local_error, budget (Budget over LocalError or ThirdOrder), uniform masks with a
forecast; each with reuse ``copy``, ``ex1`` (Extrapolate(1, log sigma)), ``ex1s`` (in sigma) or
``ex2``; for DPM-Solver++ also ``+merge`` (merge_skipped=True: the consistent sub-grid mode).
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from datetime import date
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality_sweep import workloads  # noqa: E402

from adaptive_sampling import Budget, Extrapolate, FixedMask, LocalError, ThirdOrder, sample_dpmpp_2m  # noqa: E402
from adaptive_sampling.calibration import greedy_masks  # noqa: E402
from adaptive_sampling.evaluation.baselines import fewer_steps, uniform_mask  # noqa: E402
from adaptive_sampling.evaluation.suite import SAMPLERS as SAMPLER_NAMES  # noqa: E402
from adaptive_sampling.samplers import get_sampler  # noqa: E402
from adaptive_sampling.evaluation.metrics import psnr  # noqa: E402
from adaptive_sampling.progress import Bar  # noqa: E402

SAMPLERS = {name: get_sampler(name).sample for name in SAMPLER_NAMES}  # the library's three VE samplers

STEPS = 50
KS = (20, 25, 30, 35, 40)
GREEDY_KS = (20, 30, 40)
TUNE_SEEDS = (1, 2)
TEST_SEEDS = (0, 3, 4)
TRUTH_STEPS = 250
REUSES = {"copy": "copy", "ex1": Extrapolate(1), "ex1s": Extrapolate(1, "sigma"), "ex2": Extrapolate(2)}

# name -> (kind, factory, threshold range for bisection (log10), sampler kwargs)
# kind "threshold": factory(th) -> policy; kind "budget": factory(K) -> policy.
FAMILIES: dict[str, tuple] = {}
for r in ("copy", "ex1"):
    FAMILIES[f"third_order/{r}"] = ("threshold", lambda th, r=r: ThirdOrder(delta=th, reuse=REUSES[r]), (-4, 1), {})
    FAMILIES[f"paper/{r}"] = ("threshold", lambda th, r=r: ThirdOrder(delta=th, criterion="paper", reuse=REUSES[r]), (-3, 2), {})
for r in ("copy", "ex1", "ex1s", "ex2"):
    FAMILIES[f"local_error/{r}"] = ("threshold", lambda th, r=r: LocalError(tol=th, reuse=REUSES[r]), (-5, 1), {})
for r in ("copy", "ex1"):
    FAMILIES[f"budget/{r}"] = ("budget", lambda k, r=r: Budget(k, rule=LocalError(reuse=REUSES[r])), None, {})
FAMILIES["budget_third_order/copy"] = ("budget", lambda k: Budget(k, rule=ThirdOrder()), None, {})
FAMILIES["local_error/ex1 C=1"] = ("threshold", lambda th: LocalError(tol=th, max_skips=1), (-5, 1), {})
for r in ("ex1", "ex1s", "ex2"):
    FAMILIES[f"uniform/{r}"] = ("budget", lambda k, r=r: FixedMask(uniform_mask(STEPS, k), reuse=REUSES[r]), None, {})
MERGE_FAMILIES = {  # DPM-Solver++ only
    "third_order/copy+merge": ("threshold", lambda th: ThirdOrder(delta=th), (-4, 1), {"merge_skipped": True}),
    "local_error/copy+merge": ("threshold", lambda th: LocalError(tol=th, reuse="copy"), (-5, 1), {"merge_skipped": True}),
    "budget/copy+merge": ("budget", lambda k: Budget(k, rule=LocalError(reuse="copy")), None, {"merge_skipped": True}),
    "uniform/copy+merge": ("budget", lambda k: FixedMask(uniform_mask(STEPS, k)), None, {"merge_skipped": True}),
}


def families_for(sampler: str) -> dict:
    return {**FAMILIES, **(MERGE_FAMILIES if sampler == "dpmpp_2m" else {})}


def noise_for(seeds, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    xs = [torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(s)) for s in seeds]
    return torch.cat(xs), torch.cat([torch.arange(batch) % 10 for _ in seeds])


class Case:
    """One workload x sampler x seed set: noise, references, and a runner for policies."""

    def __init__(self, model, schedule, sampler, noise, labels):
        self.model, self.schedule, self.name = model, schedule, sampler
        self.sample = SAMPLERS[sampler]
        self.noise, self.extra = noise, {"y": labels}
        self.sigmas = schedule(STEPS)
        self.x = noise * self.sigmas[0]
        self.ref, _ = self.sample(model, self.x, self.sigmas, self.extra, disable=True)
        fine = schedule(TRUTH_STEPS)
        self.truth, _ = sample_dpmpp_2m(model, noise * fine[0], fine, self.extra, disable=True)

    def run(self, policy, kwargs):
        out, rep = self.sample(self.model, self.x, self.sigmas, self.extra, disable=True, skip=policy, **kwargs)
        return out, rep.nfe

    def score(self, out) -> tuple[float, float]:
        return float(psnr(out, self.ref).mean()), float(psnr(out, self.truth).mean())

    def baselines(self, k: np.ndarray) -> dict[str, torch.Tensor]:
        uni, _ = self.sample(self.model, self.x, self.sigmas, self.extra, disable=True,
                             skip=FixedMask(np.stack([uniform_mask(STEPS, int(v)) for v in k])))  # fmt: skip
        return {
            "fewer_steps": fewer_steps(self.sample, self.model, self.noise, self.schedule, k, self.extra),
            "uniform": uni,
            "dpmpp_2m_karras": fewer_steps(sample_dpmpp_2m, self.model, self.noise, self.schedule, k, self.extra),
        }


def tune(case: Case, factory, bounds, kwargs, target: float) -> tuple[float, float]:
    """Bisection on log10(threshold) for mean NFE == target on the tuning case; (threshold, NFE)."""
    lo, hi = bounds
    best = None
    for _ in range(16):
        mid = (lo + hi) / 2
        _, nfe = case.run(factory(10**mid), kwargs)
        m = float(nfe.mean())
        if best is None or abs(m - target) < abs(best[1] - target):
            best = (10**mid, m)
        if abs(m - target) < 0.25:
            break
        lo, hi = (mid, hi) if m > target else (lo, mid)  # a larger threshold skips more
    return best


def sweep_workload(name, model, schedule, batch, bar, greedy: bool):
    rows = []  # one per (sampler, family or baseline, K, seed)
    tuned = {}
    for sampler in SAMPLERS:
        tune_case = Case(model, schedule, sampler, *noise_for(TUNE_SEEDS, batch))
        tests = {s: Case(model, schedule, sampler, *noise_for((s,), batch)) for s in TEST_SEEDS}
        fams = families_for(sampler)
        for seed, case in tests.items():
            rows.append(dict(workload=name, sampler=sampler, method="[full 50 steps]", k=STEPS, seed=seed, nfe=float(STEPS),
                             psnr=100.0, truth=case.score(case.ref)[1]))  # fmt: skip
        for k in KS:
            for fam, (kind, factory, bounds, kwargs) in fams.items():
                if kind == "threshold":
                    th, tune_nfe = tune(tune_case, factory, bounds, kwargs, k)
                    policy = factory(th)
                    tuned[(sampler, fam, k)] = (th, tune_nfe)
                else:
                    policy = factory(k)
                # the tuning seeds' own score, for choosing the best family without the test seeds
                out, nfe = tune_case.run(policy, kwargs)
                base = tune_case.baselines(nfe)
                p50, ptr = tune_case.score(out)
                rows.append(dict(workload=name, sampler=sampler, method=fam, k=k, seed="tune", nfe=float(nfe.mean()),
                                 psnr=p50, truth=ptr, best_base=max(tune_case.score(base["fewer_steps"])[0], tune_case.score(base["uniform"])[0]),
                                 best_base_truth=max(tune_case.score(base["fewer_steps"])[1], tune_case.score(base["uniform"])[1])))  # fmt: skip
                for seed, case in tests.items():
                    out, nfe = case.run(policy, kwargs)
                    base = case.baselines(nfe)
                    p50, ptr = case.score(out)
                    scores = {b: case.score(v) for b, v in base.items()}
                    rows.append(dict(workload=name, sampler=sampler, method=fam, k=k, seed=seed, nfe=float(nfe.mean()),
                                     psnr=p50, truth=ptr, **{f"{b}_psnr": s[0] for b, s in scores.items()},
                                     **{f"{b}_truth": s[1] for b, s in scores.items()},
                                     best_base=max(scores["fewer_steps"][0], scores["uniform"][0]),
                                     best_base_truth=max(scores["fewer_steps"][1], scores["uniform"][1])))  # fmt: skip
                bar.update()
            for seed, case in tests.items():  # the baselines themselves at exactly K
                kk = np.full(batch, k)
                for b, v in case.baselines(kk).items():
                    p50, ptr = case.score(v)
                    rows.append(dict(workload=name, sampler=sampler, method=f"[{b}]", k=k, seed=seed, nfe=float(k), psnr=p50, truth=ptr))
                if greedy and k in GREEDY_KS:
                    masks, _ = greedy_masks(case.sample, model, case.x, case.sigmas, kk, case.ref, case.extra)
                    out, _ = case.run(FixedMask(masks), {})
                    p50, ptr = case.score(out)
                    rows.append(dict(workload=name, sampler=sampler, method="[greedy oracle]", k=k, seed=seed, nfe=float(k), psnr=p50, truth=ptr))
    return rows, tuned


def _med(values) -> str:
    v = np.asarray(values, dtype=float)
    return f"{np.median(v):+.2f} [{v.min():+.1f}, {v.max():+.1f}]" if len(v) else "-"


def report(rows, tuned, args, seconds, commit) -> tuple[str, dict]:
    import itertools

    test = [r for r in rows if r["seed"] != "tune" and not r["method"].startswith("[")]
    tune_rows = [r for r in rows if r["seed"] == "tune"]
    lines = [
        "# Skip policies at matched NFE: every family, tuned on seeds 1-2, reported on seeds 0, 3, 4",
        "",
        f"Command: `python bench/policy_sweep.py --batch {args.batch} --workloads {' '.join(args.workloads)}"
        f"{'' if tuple(args.ks) == (20, 25, 30, 35, 40) else ' --ks ' + ' '.join(map(str, args.ks))}`  ",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch thread(s), Python {platform.python_version()}, "
        f"torch {torch.__version__}; commit {commit}; {date.today()}; {seconds / 60:.1f} min.",
        "",
        __doc__.split("Protocol (the numbers in ``bench/results/policies.md``):")[1].split("Families:")[0].strip(),
        "",
        "Margins are dB: the policy's mean PSNR minus the better of fewer steps and uniform stride at the",
        "same per-sample calls; `vs 50-step` scores against the 50-step output, `vs ODE truth` against the",
        "250-step DPM-Solver++ solve. Cells: median over K x test seeds [min, max].",
        "",
    ]
    best = {}
    for wl in args.workloads:
        lines += [f"## {wl}: the best family per sampler (chosen on the tuning seeds)", "",
                  "| sampler | best family (tune) | tune margin vs 50-step | TEST margin vs 50-step | TEST margin vs ODE truth | test NFE range |",
                  "|---|---|---:|---:|---:|---|"]  # fmt: skip
        for sampler in SAMPLERS:
            fams = sorted({r["method"] for r in tune_rows if r["workload"] == wl and r["sampler"] == sampler})
            tmed = {f: np.median([r["psnr"] - r["best_base"] for r in tune_rows if r["workload"] == wl and r["sampler"] == sampler and r["method"] == f]) for f in fams}
            if not tmed:
                continue
            f = max(tmed, key=tmed.get)
            sel = [r for r in test if r["workload"] == wl and r["sampler"] == sampler and r["method"] == f]
            m50 = [r["psnr"] - r["best_base"] for r in sel]
            mtr = [r["truth"] - r["best_base_truth"] for r in sel]
            best[(wl, sampler)] = (f, np.median(m50), np.median(mtr))
            lines.append(f"| {sampler} | {f} | {tmed[f]:+.2f} | {_med(m50)} | {_med(mtr)} | "
                         f"{min(r['nfe'] for r in sel):.1f}-{max(r['nfe'] for r in sel):.1f} |")  # fmt: skip
        lines += ["", f"### {wl}: every family on the test seeds", "",
                  "| sampler | family | margin vs 50-step | margin vs ODE truth | beats fewer steps (vs 50-step) | vs DPM-Solver++(2M) K Karras steps (vs truth) |",
                  "|---|---|---:|---:|---:|---:|"]  # fmt: skip
        key = lambda r: (r["sampler"], r["method"])  # noqa: E731
        sel = sorted((r for r in test if r["workload"] == wl), key=key)
        for (sampler, fam), group in itertools.groupby(sel, key=key):
            g = list(group)
            beats = sum(r["psnr"] > r["fewer_steps_psnr"] for r in g)
            lines.append(f"| {sampler} | {fam} | {_med([r['psnr'] - r['best_base'] for r in g])} | "
                         f"{_med([r['truth'] - r['best_base_truth'] for r in g])} | {beats} of {len(g)} | "
                         f"{_med([r['truth'] - r['dpmpp_2m_karras_truth'] for r in g])} |")  # fmt: skip
        lines += ["", f"### {wl}: PSNR per K (median over test seeds; vs 50-step / vs ODE truth)", "",
                  "| sampler | method | " + " | ".join(f"K={k}" for k in KS) + " |", "|---|---|" + "---:|" * len(KS)]
        allrows = [r for r in rows if r["workload"] == wl and r["seed"] != "tune"]
        for (sampler, fam), group in itertools.groupby(sorted(allrows, key=key), key=key):
            g = list(group)
            cells = []
            for k in KS:
                gk = [r for r in g if r["k"] == k]
                gk = gk or [r for r in g if r["k"] == STEPS]  # the full run, the same in every column
                cells.append(f"{np.median([r['psnr'] for r in gk]):.1f} / {np.median([r['truth'] for r in gk]):.1f}" if gk else "-")
            lines.append(f"| {sampler} | {fam} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Tuned thresholds (mean NFE on the tuning seeds)", "", "| workload | sampler | family | K | threshold | tune NFE |", "|---|---|---|---:|---:|---:|"]
    for (wl, sampler, fam, k), (th, n) in sorted(tuned.items()):
        lines.append(f"| {wl} | {sampler} | {fam} | {k} | {th:.3g} | {n:.1f} |")
    return "\n".join(lines) + "\n", best


def plot(rows, path: Path, workload: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(16, 9), sharex=True)
    test = [r for r in rows if r["workload"] == workload and r["seed"] != "tune"]
    methods = sorted({r["method"] for r in test})
    rule_colors = {"third_order": "tab:red", "paper": "tab:orange", "local_error": "tab:blue",
                   "budget": "tab:green", "budget_third_order": "tab:olive", "uniform": "tab:purple"}  # fmt: skip
    reuse_markers = {"copy": "o", "ex1": "s", "ex1s": "^", "ex2": "D"}
    baseline_style = {"[fewer_steps]": ("k", "--", "v"), "[uniform]": ("0.55", "--", "s"),
                      "[dpmpp_2m_karras]": ("k", ":", "^"), "[greedy oracle]": ("k", "", "*"),
                      "[full 50 steps]": ("k", "", "X")}  # fmt: skip
    for col, sampler in enumerate(SAMPLERS):
        for row, metric in enumerate(("psnr", "truth")):
            ax = axes[row, col]
            for m in methods:
                g = [r for r in test if r["sampler"] == sampler and r["method"] == m]
                if not g or (m == "[full 50 steps]" and metric == "psnr"):
                    continue
                ks = sorted({r["k"] for r in g})
                nfe = [np.median([r["nfe"] for r in g if r["k"] == k]) for k in ks]
                val = [np.median([r[metric] for r in g if r["k"] == k]) for k in ks]
                if m in baseline_style:
                    color, ls, marker = baseline_style[m]
                    ax.plot(nfe, val, color=color, ls=ls or "none", marker=marker, ms=9 if ls == "" else 5, lw=2.2, label=m)
                    continue
                rule, reuse = m.split("/")
                ls = ":" if "+merge" in reuse else "-"
                marker = "P" if "C=1" in reuse else reuse_markers.get(reuse.split("+")[0].split(" ")[0], "o")
                ax.plot(nfe, val, color=rule_colors.get(rule, "tab:gray"), ls=ls, marker=marker, ms=4, lw=1.0, label=m)
            ax.set_title(f"{sampler}: PSNR vs {'50-step output' if metric == 'psnr' else 'ODE truth (250-step DPM++)'}", fontsize=9)
            ax.grid(alpha=0.3)
            if row == 1:
                ax.set_xlabel("model calls per sample (NFE)")
    axes[0, 0].set_ylabel("PSNR (dB)")
    axes[1, 0].set_ylabel("PSNR (dB)")
    handles, labels = axes[1, 1].get_legend_handles_labels()  # the DPM-Solver++ truth panel has every method
    fig.legend(handles, labels, loc="center right", fontsize=7)
    fig.suptitle(f"{workload} model, 50 Karras steps, median over test seeds 0, 3, 4 (black and grey: baselines; colour: decision rule; marker: reuse; dotted: merge mode)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.83, 0.97))
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    global KS
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--workloads", nargs="*", default=["learned", "digits-exact", "gaussian"])
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "policies.md")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--replot", action="store_true", help="only redraw the plot from the .jsonl next to --out")
    p.add_argument("--ks", type=int, nargs="*", default=[20, 25, 30, 35, 40], help="K targets (a subset for a quick look)")
    args = p.parse_args(argv)
    KS = tuple(args.ks)
    if args.replot:
        import json

        rows = [json.loads(line) for line in args.out.with_suffix(".jsonl").read_text().splitlines()]
        plot(rows, args.out.with_name("policies_nfe_psnr.png"), "learned")
        return 0
    torch.set_grad_enabled(False)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    if subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "adaptive_sampling"]).returncode:
        commit += " + uncommitted library changes"
    loads = workloads(args.batch, 0)
    n = sum(len(KS) * len(families_for(s)) for s in SAMPLERS) * len(args.workloads)
    rows, tuned = [], {}
    with Bar(n, "policy sweep") as bar:
        for wl in args.workloads:
            model, _, _, schedule = loads[wl]
            r, t = sweep_workload(wl, model, schedule, args.batch, bar, greedy=wl == "learned")
            rows += r
            tuned.update({(wl, *k): v for k, v in t.items()})
    text, best = report(rows, tuned, args, time.perf_counter() - t0, commit)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    import json

    args.out.with_suffix(".jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    if "learned" in args.workloads:
        plot(rows, args.out.with_name("policies_nfe_psnr.png"), "learned")
    print(f"wrote {args.out}")
    for (wl, sampler), (f, m50, mtr) in best.items():
        print(f"{wl} {sampler}: best {f}: test margin {m50:+.2f} dB vs 50-step, {mtr:+.2f} dB vs ODE truth")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
