"""Calibrated skip schedules on held-out prompts, and the choice of the default online policy.

    python bench/calibration_study.py [--workloads digits shapes] [--quick]

Protocol (the numbers in ``bench/results/calibration.md``):

* Two learned models: ``digits`` (the 1M-parameter EDM MLP, 50 Karras steps sigma 20 -> 0.002,
  guidance 2) and ``shapes`` (the diffusers UNet with eps prediction, SD's DDPM schedule, 50 steps
  on the leading-spacing grid as Stable Diffusion samples, guidance 2).
* Splits (prompts = class labels, seeds = initial noise): CALIBRATION classes 0-4, seeds 1 and 2
  (the greedy searches run here; the online rules' thresholds are tuned here); VALIDATION classes
  0-4, seed 5 (the best calibrated variant and the default online policy are chosen here); TEST
  classes 5-9, seeds 0, 3 and 4 (reported; never used to choose anything).
* K (calls per sample) in 20, 25, 30, 35 of 50. Every method is scored per test seed against the
  50-step output of the same sampler AND against the ODE truth (DPM-Solver++(2M) on the 50-step
  grid with every interval split in 5 in log sigma: same start, same end, 250 steps).
* Baselines at the same calls: fewer steps (the same sampler on a K-step grid of the same kind),
  uniform stride (eps copied), DPM-Solver++(2M) with K steps on that grid, DPM-Solver++(2M) on the
  CALIBRATED K-point grid (``calibrate(..., as_grid=True)``), and the per-image greedy oracle
  (which needs each test image's own 50-step output).
* The margin of a method is its PSNR minus the better of fewer steps and uniform stride at the same
  calls (the issue's target), reported as the median over K x test seeds [min, max].
* Transfer: the calibrated schedules (made at 50 steps, guidance 2, on the default grid) are used
  unchanged at 30 and 100 steps (K' = K N' / 50 calls, by the log-sigma mapping), at guidance 1
  and 4, on the other grids of the shapes model (trailing spacing, Karras), and across models
  (digits' schedule on the shapes grid and back).

Calibrated variants: ``mean``/``freq`` (greedy on the summed error / the K most often kept steps
of per-sample greedy paths) x reuse ``copy``/``ex1`` (Extrapolate(1) in log sigma); for
DPM-Solver++ also ``merge`` (the solver-consistent merge mode) and ``+refine`` (per-sample
LocalError refinement within the schedule's budget). Online candidates: the paper's rule
(``ThirdOrder()``, its defaults), ``LocalError`` and ``LocalError(max_skips=1)`` with
Extrapolate(1) (tol tuned to K on the calibration split), ``Budget(K)``, and uniform stride with
Extrapolate(1) (no calibration, no data).
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import date
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adaptive_sampling import (  # noqa: E402
    Budget,
    Extrapolate,
    FixedMask,
    LocalError,
    ThirdOrder,
    get_sigmas_karras,
    sample_dpmpp_2m,
)
from adaptive_sampling.calibration import greedy_path  # noqa: E402
from adaptive_sampling.evaluation.baselines import fewer_steps, uniform_mask  # noqa: E402
from adaptive_sampling.calibration import calibration_path  # noqa: E402
from adaptive_sampling.evaluation.suite import SAMPLERS as SAMPLER_NAMES  # noqa: E402
from adaptive_sampling.samplers import get_sampler  # noqa: E402
from adaptive_sampling.evaluation.metrics import psnr  # noqa: E402
from adaptive_sampling.progress import Bar  # noqa: E402

SAMPLERS = {name: get_sampler(name).sample for name in SAMPLER_NAMES}  # the library's three VE samplers

STEPS = 50
KS = (20, 25, 30, 35)
CAL = {"classes": (0, 1, 2, 3, 4), "seeds": (1, 2)}
VAL = {"classes": (0, 1, 2, 3, 4), "seeds": (5,)}
TEST = {"classes": (5, 6, 7, 8, 9), "seeds": (0, 3, 4)}
GUIDANCE = 2.0
TRUTH_SPLIT = 5
# calibrated variants: name -> (aggregate, reuse, merge_skipped); "merge" is DPM-Solver++ only
VARIANTS = {"mean/copy": ("mean_error", "copy", False), "mean/ex1": ("mean_error", Extrapolate(1), False),
            "freq/copy": ("frequency", "copy", False), "merge": ("mean_error", "copy", True)}  # fmt: skip
EX1 = Extrapolate(1)


def refine_grid(sigmas: torch.Tensor, factor: int) -> torch.Tensor:
    """Split every interval of ``sigmas`` into ``factor`` steps, uniform in log sigma (the last
    interval, to 0, stays one step)."""
    s = sigmas.double()
    logs = s[:-1].log()
    parts = [torch.exp(torch.linspace(float(a), float(b), factor + 1, dtype=torch.float64)[:-1]) for a, b in zip(logs[:-1], logs[1:])]
    return torch.cat(parts + [s[-2:]]).to(sigmas.dtype)


@dataclass
class Workload:
    name: str
    make_model: Callable[[float], Callable]
    shape: tuple
    grids: dict  # grid name -> (n -> sigmas)
    default_grid: str
    per_seed: int  # samples per seed (classes repeated)
    share_ddim: bool  # DDIM uses Euler's calibration and oracle (identical in exact arithmetic; saves time)
    variants: tuple  # calibrated variants searched (names of VARIANTS)
    grid_min_calls: int  # how far down the DPM-Solver++ merge search (the calibrated grid) goes
    greedy_seeds: tuple  # test seeds that get the per-image greedy oracle
    cal_per_seed: int  # samples per seed on the calibration split (the searches' cost is linear in it)
    transfer_ks: tuple  # the K at which the transfer conditions run

    def noise(self, split: dict) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.cal_per_seed if split is CAL else self.per_seed
        xs, ys = [], []
        for s in split["seeds"]:
            xs.append(torch.randn(n, *self.shape, generator=torch.Generator().manual_seed(s)))
            # classes rotate across seeds, so a small per-seed batch still covers every class of the split
            start = len(ys) * n
            ys.append(torch.tensor([split["classes"][(start + j) % len(split["classes"])] for j in range(n)]))
        return torch.cat(xs), torch.cat(ys)


def workloads(names, quick: bool) -> dict[str, Workload]:
    out = {}
    if "digits" in names:
        from adaptive_sampling.evaluation.workloads.learned import RECOMMENDED_SIGMA_MAX, RECOMMENDED_SIGMA_MIN, cfg_denoiser, load_pretrained

        net = load_pretrained()
        karras = partial(get_sigmas_karras, sigma_min=RECOMMENDED_SIGMA_MIN, sigma_max=RECOMMENDED_SIGMA_MAX)
        out["digits"] = Workload("digits", lambda g: cfg_denoiser(net, g), (1, 8, 8), {"karras": karras}, "karras",
                                 10 if not quick else 5, False, tuple(VARIANTS), 10, TEST["seeds"], 10 if not quick else 5, KS)  # fmt: skip
    if "shapes" in names:
        from adaptive_sampling.evaluation.workloads import shapes

        unet = shapes.load_pretrained()[0]
        grids = {"leading": partial(shapes.sigmas, spacing="leading"), "trailing": partial(shapes.sigmas, spacing="trailing"),
                 "karras": shapes.karras_sigmas}  # fmt: skip
        # the UNet costs 3.7 ms per row here (7.4 per guided sample) and one greedy search on 6 samples ~12 min:
        # the aggregation and reuse comparisons and the per-image oracle are left to the digits model; shapes
        # searches the variant that won there (mean/ex1) and the merge mode (which is also the calibrated grid)
        out["shapes"] = Workload("shapes", lambda g: shapes.denoiser(g, unet), shapes.IMAGE_SHAPE, grids, "leading",
                                 3 if not quick else 2, True, ("mean/ex1", "merge"), 20, (), 2, (KS[0], KS[2]) if not quick else KS)  # fmt: skip
    return out


class Case:
    """One workload x split x sampler x grid x steps x guidance: noise, the N-step reference, the truth."""

    def __init__(self, wl: Workload, split: dict, sampler: str, grid: str | None = None, steps: int | None = None, guidance: float = GUIDANCE):
        self.wl, self.sampler, self.steps = wl, sampler, steps or STEPS
        self.grid = grid or wl.default_grid
        self.schedule = wl.grids[self.grid]
        self.model = wl.make_model(guidance)
        self.sample = SAMPLERS[sampler]
        self.noise, labels = wl.noise(split)
        self.per_seed = len(self.noise) // len(split["seeds"])
        self.extra = {"y": labels}
        self.sigmas = self.schedule(self.steps)
        self.x = self.noise * self.sigmas[0]
        self.ref, _ = self.sample(self.model, self.x, self.sigmas, self.extra, disable=True)
        fine = refine_grid(self.sigmas, TRUTH_SPLIT)
        self.truth, _ = sample_dpmpp_2m(self.model, self.noise * fine[0], fine, self.extra, disable=True)

    def seeds(self) -> list[slice]:
        n = self.per_seed
        return [slice(i, i + n) for i in range(0, len(self.noise), n)]

    def run(self, policy, **kwargs) -> tuple[torch.Tensor, np.ndarray]:
        out, rep = self.sample(self.model, self.x, self.sigmas, self.extra, disable=True, skip=policy, **kwargs)
        return out, rep.nfe

    def on_grid(self, grid: torch.Tensor, sampler: str | None = None) -> torch.Tensor:
        sample = SAMPLERS[sampler or self.sampler]
        out, _ = sample(self.model, self.noise * grid[0], grid, self.extra, disable=True)
        return out

    def scores(self, out: torch.Tensor) -> list[tuple[float, float]]:
        """(PSNR vs N-step, PSNR vs truth) per seed (mean over the seed's samples)."""
        p, t = psnr(out, self.ref), psnr(out, self.truth)
        return [(float(p[s].mean()), float(t[s].mean())) for s in self.seeds()]


def tune(case: Case, factory, target: float, bounds=(-5.0, 1.0), **kwargs) -> tuple[float, float]:
    """Bisection on log10(threshold) for mean NFE == target on ``case``; (threshold, NFE)."""
    lo, hi = bounds
    best = None
    for _ in range(14):
        mid = (lo + hi) / 2
        _, nfe = case.run(factory(10**mid), **kwargs)
        m = float(nfe.mean())
        if best is None or abs(m - target) < abs(best[1] - target):
            best = (10**mid, m)
        if abs(m - target) < 0.25:
            break
        lo, hi = (mid, hi) if m > target else (lo, mid)
    return best


def calibrations(wl: Workload, sampler: str, bar) -> dict[str, object]:
    """The calibration searches of one sampler on the calibration split: name -> CalibrationPath."""
    case = Case(wl, CAL, sampler)
    args = (case.model, sampler, case.sigmas, case.x, case.extra)
    out = {}
    for name in wl.variants:
        aggregate, reuse, merge = VARIANTS[name]
        if merge and sampler != "dpmpp_2m":
            continue
        lowest = min(wl.grid_min_calls, min(KS)) if merge else min(KS)  # the merge search is also the calibrated grid (shipped)
        out[name] = calibration_path(*args, min_calls=lowest, reuse=reuse, merge_skipped=merge, aggregate=aggregate, disable=True)
        bar.update()
    return out


def evaluate_split(wl: Workload, split: dict, sampler: str, paths: dict, grid_paths: dict, online: dict, rows: list,
                   split_name: str, greedy: bool, bar) -> None:
    """Every method at every K on one split (the default grid, 50 steps, guidance 2)."""
    case = Case(wl, split, sampler)

    def add(method, k, out, nfe):
        base = baselines[k]
        for i, ((p, t), (fp, ft), (up, ut), (dp, dt), (gp, gt)) in enumerate(zip(
                case.scores(out), base["fewer"], base["uniform"], base["dpm"], base["dpm_cal"])):  # fmt: skip
            rows.append(dict(workload=wl.name, split=split_name, sampler=sampler, method=method, k=k, seed=split["seeds"][i],
                             nfe=float(np.mean(nfe[case.seeds()[i]])), psnr=p, truth=t, fewer=fp, fewer_truth=ft, uniform=up,
                             uniform_truth=ut, dpm=dp, dpm_truth=dt, dpm_cal=gp, dpm_cal_truth=gt))  # fmt: skip

    baselines = {}
    for k in KS:
        kk = np.full(len(case.noise), k)
        uni, _ = case.run(FixedMask(uniform_mask(STEPS, k)))
        baselines[k] = {
            "fewer": case.scores(fewer_steps(case.sample, case.model, case.noise, case.schedule, kk, case.extra)),
            "uniform": case.scores(uni),
            "dpm": case.scores(fewer_steps(sample_dpmpp_2m, case.model, case.noise, case.schedule, kk, case.extra)),
            "dpm_cal": case.scores(case.on_grid(grid_paths[k], "dpmpp_2m")),
        }
        for name, path in paths.items():
            kwargs = {"merge_skipped": True} if name == "merge" else {}
            out, nfe = case.run(path.policy(k), **kwargs)
            add(f"calibrated {name}", k, out, nfe)
            if name in ("mean/copy", "mean/ex1"):
                out, nfe = case.run(path.policy(k).with_refinement(LocalError()), **kwargs)
                add(f"calibrated {name}+refine", k, out, nfe)
        for name, make in online.items():
            policy = make(k)
            if policy is None:
                continue
            out, nfe = case.run(policy)
            add(name, k, out, nfe)
        for name in ("fewer", "uniform", "dpm", "dpm_cal"):
            for i, (p, t) in enumerate(baselines[k][name]):
                rows.append(dict(workload=wl.name, split=split_name, sampler=sampler, method=f"[{name}]", k=k,
                                 seed=split["seeds"][i], nfe=float(k), psnr=p, truth=t))  # fmt: skip
        bar.update()
    if greedy and wl.greedy_seeds:
        which = [i for i, seed in enumerate(split["seeds"]) if seed in wl.greedy_seeds]
        rows_idx = torch.cat([torch.arange(len(case.noise))[case.seeds()[i]] for i in which])
        searched = "euler" if sampler == "ddim" and wl.share_ddim else sampler  # DDIM is Euler in VE coordinates
        key = (wl.name, searched)
        if key not in _ORACLE:
            _ORACLE[key] = greedy_path(SAMPLERS[searched], case.model, case.x[rows_idx], case.sigmas, case.ref[rows_idx],
                                       min(KS), {"y": case.extra["y"][rows_idx]})  # fmt: skip
        for k in KS:
            masks = np.ones((len(case.noise), STEPS), dtype=bool)
            masks[rows_idx.numpy()] = _ORACLE[key].masks(k)
            out, nfe = case.run(FixedMask(masks))
            scores = case.scores(out)
            for i in which:
                p, t = scores[i]
                rows.append(dict(workload=wl.name, split=split_name, sampler=sampler, method="[greedy oracle]", k=k,
                                 seed=split["seeds"][i], nfe=float(k), psnr=p, truth=t))  # fmt: skip
    for i, (p, t) in enumerate(case.scores(case.ref)):
        rows.append(dict(workload=wl.name, split=split_name, sampler=sampler, method="[full 50 steps]", k=STEPS,
                         seed=split["seeds"][i], nfe=float(STEPS), psnr=p, truth=t))  # fmt: skip


def online_candidates(wl: Workload, sampler: str, tuned: dict) -> dict:
    """Online policies (no calibration): thresholds tuned to K on the calibration split."""
    case = Case(wl, CAL, sampler)
    families = {
        "local_error C=1": lambda th: LocalError(tol=th, max_skips=1),
        "local_error": lambda th: LocalError(tol=th),
    }
    out = {"paper rule ThirdOrder()": lambda k: ThirdOrder() if k == KS[0] else None,
           "budget(K)": lambda k: Budget(k), "uniform+ex1": lambda k: FixedMask(uniform_mask(STEPS, k), reuse=EX1)}  # fmt: skip
    for name, factory in families.items():
        ths = {}
        for k in KS:
            th, nfe = tune(case, factory, k)
            tuned[(wl.name, sampler, name, k)] = (th, nfe)
            ths[k] = th
        out[name] = lambda k, f=factory, ths=ths: f(ths[k])
    return out


def transfer(wl: Workload, sampler: str, best: str, paths: dict, rows: list, bar) -> None:
    """The best calibrated variant (chosen on validation) used off its calibration conditions."""
    name = best.removesuffix("+refine")
    conditions = [("steps 30", {"steps": 30}), ("steps 100", {"steps": 100}), ("guidance 1", {"guidance": 1.0}),
                  ("guidance 4", {"guidance": 4.0})]  # fmt: skip
    conditions += [(f"grid {g}", {"grid": g}) for g in wl.grids if g != wl.default_grid]
    for label, cond in conditions:
        case = Case(wl, TEST, sampler, **cond)
        for k in wl.transfer_ks:
            policy = paths[name].policy(k)
            transfer_rows(case, policy.with_refinement(LocalError()) if best.endswith("+refine") else policy, label, k, rows)
        bar.update()


def transfer_rows(case: Case, policy, label: str, k: int, rows: list, split: str = "transfer", method: str | None = None) -> None:
    """Run ``policy`` on ``case`` and the baselines at its per-sample calls; append the rows."""
    out, nfe = case.run(policy, merge_skipped=True) if getattr(policy, "merge_skipped", False) else case.run(policy)
    uni, _ = case.run(FixedMask(np.stack([uniform_mask(case.steps, int(v)) for v in nfe])))
    base = {"fewer": case.scores(fewer_steps(case.sample, case.model, case.noise, case.schedule, nfe, case.extra)),
            "uniform": case.scores(uni),
            "dpm": case.scores(fewer_steps(sample_dpmpp_2m, case.model, case.noise, case.schedule, nfe, case.extra))}  # fmt: skip
    for i, (p, t) in enumerate(case.scores(out)):
        method = method or f"calibrated {policy.provenance.get('variant', '')}"
        rows.append(dict(workload=case.wl.name, split=split, condition=label, sampler=case.sampler, method=method,
                         k=k, seed=TEST["seeds"][i], nfe=float(np.mean(nfe[case.seeds()[i]])), psnr=p, truth=t,
                         **{b: v[i][0] for b, v in base.items()}, **{f"{b}_truth": v[i][1] for b, v in base.items()}))  # fmt: skip


# --- the report ------------------------------------------------------------------------------------


def margin(r, truth=False) -> float:
    s = "_truth" if truth else ""
    return r["truth" if truth else "psnr"] - max(r["fewer" + s], r["uniform" + s])


def _med(values) -> str:
    v = np.asarray(values, dtype=float)
    return f"{np.median(v):+.1f} [{v.min():+.1f}, {v.max():+.1f}]" if len(v) else "-"


def choose(rows, wl: str, sampler: str, online: bool) -> str | None:
    """The method with the best median margin vs the N-step output on the VALIDATION split."""
    cand = {}
    for r in rows:
        if r["workload"] != wl or r["split"] != "validation" or r["sampler"] != sampler or r["method"].startswith("["):
            continue
        is_cal = r["method"].startswith("calibrated")
        if (online and is_cal) or (not online and not is_cal):
            continue
        cand.setdefault(r["method"], []).append(margin(r))
    cand = {m: np.median(v) for m, v in cand.items() if len(v) >= len(KS)}
    return max(cand, key=cand.get) if cand else None


def run_workload(wl: Workload, args, commit: str) -> tuple[list, dict]:
    """Calibrate, evaluate (validation and test) and transfer on one workload; (rows, meta)."""
    t0 = time.perf_counter()
    rows, tuned, paths = [], {}, {}
    per_sampler = len([v for v in wl.variants if v != "merge"])
    searches = (2 if wl.share_ddim else 3) * per_sampler + ("merge" in wl.variants) + 3 * 2 * len(KS) + 3 * (3 + len(wl.grids))
    with Bar(searches, f"calibration study: {wl.name}") as bar:
        for sampler in ("euler", "ddim", "dpmpp_2m"):
            shared = sampler == "ddim" and wl.share_ddim
            paths[sampler] = paths["euler"] if shared else calibrations(wl, sampler, bar)
        grid_paths = {k: paths["dpmpp_2m"]["merge"].grid(k) for k in KS}
        for sampler in SAMPLER_ORDER:
            online = online_candidates(wl, sampler, tuned)
            for split_name, split in (("validation", VAL), ("test", TEST)):
                evaluate_split(wl, split, sampler, paths[sampler], grid_paths, online, rows, split_name,
                               greedy=split_name == "test" and not args.no_greedy, bar=bar)  # fmt: skip
        schedules = {}
        for sampler in SAMPLER_ORDER:
            best = choose(rows, wl.name, sampler, online=False).removeprefix("calibrated ")
            for path in paths[sampler].values():
                path.provenance["variant"] = best
            transfer(wl, sampler, best, paths[sampler], rows, bar)
            refine = LocalError() if best.endswith("+refine") else None
            schedules[sampler] = {str(k): paths[sampler][best.removesuffix("+refine")].policy(k).with_refinement(refine).to_dict() for k in KS}
            if sampler == "ddim" and wl.share_ddim:  # searched with Euler (DDIM is Euler in VE coordinates)
                for d in schedules[sampler].values():
                    d["sampler"], d["provenance"] = "ddim", {**d["provenance"], "searched_with": "euler"}
    meta = {"command": "python " + " ".join(["bench/calibration_study.py"] + (args.argv or [])),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, Python {platform.python_version()}, torch {torch.__version__}",
            "commit": commit, "date": str(date.today()), "minutes": round((time.perf_counter() - t0) / 60, 1),
            "tuned": {" / ".join(map(str, k)): v for k, v in tuned.items()},
            "calibration": {f"{wl.name} {s} {n}": p.provenance for s, ps in paths.items() for n, p in ps.items() if not (s == "ddim" and wl.share_ddim)},
            "schedules": schedules,
            "grid": {"sigmas": [float(v) for v in paths["dpmpp_2m"]["merge"].sigmas], "order": paths["dpmpp_2m"]["merge"].greedy.order[0],
                     "provenance": paths["dpmpp_2m"]["merge"].provenance}}  # fmt: skip
    return rows, meta


def cross_model(wls: dict[str, Workload], metas: dict[str, dict]) -> list:
    """Each workload's best calibrated schedules (from its meta file) on the other workload's default grid."""
    from adaptive_sampling import Calibrated

    rows = []
    for src, dst in itertools.permutations(wls, 2):
        for sampler in SAMPLER_ORDER:
            case = Case(wls[dst], TEST, sampler)
            for k in KS:
                policy = Calibrated.from_dict(metas[src]["schedules"][sampler][str(k)])
                transfer_rows(case, policy, f"schedule of the {src} model", k, rows)
    return rows


def default_check(wls: dict[str, Workload]) -> list:
    """``default_policy()`` exactly as shipped (one tolerance for both models) on each test split."""
    from adaptive_sampling import default_policy
    from adaptive_sampling.policies.default import DEFAULT_TOL

    rows = []
    for wl, sampler in itertools.product(wls.values(), SAMPLER_ORDER):
        transfer_rows(Case(wl, TEST, sampler), default_policy(sampler), "as shipped", 0, rows, split="default",
                      method=f"default_policy() (LocalError tol {DEFAULT_TOL:g}, max_skips 1, Extrapolate(1))")  # fmt: skip
    return rows


SAMPLER_ORDER = ("ddim", "euler", "dpmpp_2m")
_ORACLE: dict = {}  # (workload, sampler searched) -> the per-image greedy path on the greedy seeds of the test split
SHIPPED = ROOT / "adaptive_sampling" / "evaluation" / "workloads" / "data" / "calibrated_{}.json"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", nargs="*", default=["digits", "shapes"], help="workloads to run (each writes its own rows)")
    p.add_argument("--cross-model", action="store_true", help="then run every workload's schedules on the others (needs their meta files)")
    p.add_argument("--default-check", action="store_true", help="then run default_policy() as shipped on every test split")
    p.add_argument("--quick", action="store_true", help="tiny batches (a smoke test, not a result)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-greedy", action="store_true", help="skip the per-image greedy oracle on the test split")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "calibration.md")
    args = p.parse_args(argv)
    if args.quick:  # a smoke test of the whole pipeline: 12 steps, K = 6 and 8
        global STEPS, KS
        STEPS, KS = 12, (6, 8)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    torch.set_grad_enabled(False)
    torch.set_num_threads(args.threads)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    if subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "adaptive_sampling"], cwd=ROOT).returncode:
        commit += " + uncommitted library changes"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    stem = args.out.with_suffix("")
    for name, wl in workloads(args.workloads, args.quick).items():
        rows, meta = run_workload(wl, args, commit)
        Path(f"{stem}_{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        Path(f"{stem}_{name}.meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        if not args.quick:  # the schedules the demo and users load: adaptive_sampling.evaluation.workloads.calibrated
            SHIPPED.parent.mkdir(parents=True, exist_ok=True)
            shipped = {"schedules": meta["schedules"], "grid": meta["grid"]}
            Path(str(SHIPPED).format(name)).write_text(json.dumps(shipped, indent=1) + "\n")
    if args.cross_model:
        names = ("digits", "shapes")
        metas = {n: json.loads(Path(f"{stem}_{n}.meta.json").read_text()) for n in names}
        rows = cross_model(workloads(names, args.quick), metas)
        Path(f"{stem}_cross.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    if args.default_check:
        rows = default_check(workloads(("digits", "shapes"), args.quick))
        Path(f"{stem}_default.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    from summarize_calibration import main as summarize  # noqa: E402

    summarize(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
