"""The speed knob, measured: ``default_policy(nfe=K)`` (``Paced``) against every baseline, on every learned model.

    python bench/budget_study.py [--workloads digits shapes flow] [--phases designs test batch] [--quick]

Protocol (``bench/results/budget.md``, ``budget.png``), the calibration study's splits:

* DESIGNS (the choice): on the VALIDATION split (classes 0-4, seed 5) of the digits MLP and the
  shapes UNet, 50 steps, K in 15..35, the online designs tried for the knob: ``Budget`` (quantile
  pacing of ``LocalError`` scores), a ``LocalError`` threshold paced to a uniform plan with a stride
  guard (``PacedThreshold`` below), uniform stride with a forecast (Paced that never re-plans),
  uniform stride with a fixed 2-step tail (Paced that always re-plans), and ``Paced`` (the one
  online decision). Score: median over models x samplers x K of the margin over the better of
  fewer steps and uniform stride (copied eps), against the 50-step output. The winner ships.
* TEST (the report): classes 5-9, seeds 0, 3, 4, never used to choose anything. Every workload:
  digits (Karras), shapes (SD's leading DDPM grid), the flow transformer (its FluxPipeline grid);
  every sampler; N = 30, 50, 100 steps; K = 0.3, 0.4, 0.5, 0.6, 0.7 of N. Against the N-step output
  AND the ODE truth (DPM-Solver++(2M) of the model's convention on the N-step grid with every
  interval split in 5). Baselines at the same K: fewer steps, uniform stride, DPM-Solver++ with K
  steps, and the calibrated schedule (digits / shapes: the shipped 50-step schedules, mapped to K
  by log sigma; flow: ``calibrate`` with the proxy search on the calibration split).
* BATCH (wall-clock): the shapes UNet as a diffusers pipeline under the hook, and the library
  sampler, at batch 1, 4, 8, 50 steps, speedup 2: calls per sample, model forwards per run, rows
  per forward, and the CPU wall-clock speedup against the full run (interleaved repeats, median),
  with the batch aligned (the default) and with free per-row decisions.
"""

from __future__ import annotations

import argparse
import json
import math
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

from adaptive_sampling import Budget, Extrapolate, FixedMask, LocalError, Paced, calibrate, default_policy, get_sampler  # noqa: E402
from adaptive_sampling.evaluation import psnr, uniform_mask  # noqa: E402
from adaptive_sampling.evaluation.baselines import fewer_steps  # noqa: E402
from adaptive_sampling.policies.base import Controller, SkipPolicy  # noqa: E402
from adaptive_sampling.policies.local_error import LocalErrorController  # noqa: E402
from adaptive_sampling.progress import Bar  # noqa: E402
from calibration_study import refine_grid  # noqa: E402  (bench/ is on the path when run as a script)

VAL = {"classes": (0, 1, 2, 3, 4), "seeds": (5,)}
TEST = {"classes": (5, 6, 7, 8, 9), "seeds": (0, 3, 4)}
CAL = {"classes": (0, 1, 2, 3, 4), "seeds": (1, 2)}
FRACTIONS = (0.3, 0.4, 0.5, 0.6, 0.7)
STEPS = (30, 50, 100)
DESIGN_KS = (15, 20, 25, 30, 35)
RESULTS = ROOT / "bench" / "results"


@dataclass
class Workload:
    name: str
    model: Callable
    shape: tuple
    schedule: Callable[[int], torch.Tensor]
    samplers: tuple
    per_seed: int
    calibrated: Callable[[str, int, torch.Tensor], object] | None  # (sampler, K, sigmas) -> a schedule at K calls

    def noise(self, split: dict) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for s in split["seeds"]:
            xs.append(torch.randn(self.per_seed, *self.shape, generator=torch.Generator().manual_seed(s)))
            start = len(ys) * self.per_seed
            ys.append(torch.tensor([split["classes"][(start + j) % len(split["classes"])] for j in range(self.per_seed)]))
        return torch.cat(xs), torch.cat(ys)


def workloads(names, quick: bool) -> dict[str, Workload]:
    out = {}
    if "digits" in names:
        from adaptive_sampling import get_sigmas_karras
        from adaptive_sampling.evaluation.workloads import calibrated
        from adaptive_sampling.evaluation.workloads.learned import RECOMMENDED_SIGMA_MAX, RECOMMENDED_SIGMA_MIN, cfg_denoiser, load_pretrained

        sched = partial(get_sigmas_karras, sigma_min=RECOMMENDED_SIGMA_MIN, sigma_max=RECOMMENDED_SIGMA_MAX)
        out["digits"] = Workload("digits", cfg_denoiser(load_pretrained(), 2.0), (1, 8, 8), sched, ("ddim", "euler", "dpmpp_2m"),
                                 5 if quick else 10, lambda s, k, sig: _shipped(calibrated, "digits", s, k, sig))  # fmt: skip
    if "shapes" in names:
        from adaptive_sampling.evaluation.workloads import calibrated, shapes

        out["shapes"] = Workload("shapes", shapes.denoiser(2.0), shapes.IMAGE_SHAPE, partial(shapes.sigmas, spacing="leading"),
                                 ("ddim", "euler", "dpmpp_2m"), 2 if quick else 5,
                                 lambda s, k, sig: _shipped(calibrated, "shapes", s, k, sig))  # fmt: skip
    if "flow" in names:
        from adaptive_sampling.evaluation.workloads import flow

        wl = Workload("flow", flow.denoiser(flow.RECOMMENDED_GUIDANCE), (3, 32, 32), flow.sigmas, ("flow_euler", "flow_dpmpp_2m"), 2 if quick else 5, None)
        wl.calibrated = _flow_calibrated(wl)
        out["flow"] = wl
    return out


def _shipped(calibrated, workload: str, sampler: str, k: int, sigmas):
    """The shipped 50-step schedule nearest in calls, carried to K calls on ``sigmas`` by log sigma."""
    ks = calibrated.available(workload)[sampler]
    base = min(ks, key=lambda c: abs(c * (len(sigmas) - 1) / 50 - k))
    return calibrated.load(workload, sampler, base).with_nfe(k)


def _flow_calibrated(wl: Workload):
    cache = {}

    def get(sampler, k, sigmas):
        n = len(sigmas) - 1
        key = (sampler, k, n)
        if key not in cache:
            noise, y = wl.noise({**CAL, "seeds": CAL["seeds"][:1]})
            cache[key] = calibrate(wl.model, sampler, sigmas, noise, {"y": y}, nfe=k, disable=True)
        return cache[key]

    return get


# --- the designs compared on the validation split ------------------------------------------------------------


class PacedThreshold(SkipPolicy):
    """Design: LocalError's estimate against a threshold moved by the row's lead over a uniform plan
    (tol * exp(gain * (spent - planned))), the fewest consecutive skips the budget allows, the reserve."""

    def __init__(self, nfe: int, tol: float = 2e-2, gain: float = 0.0) -> None:
        self.nfe, self.tol, self.gain = nfe, tol, gain

    def start(self, x, num_steps, sampler, sigmas=None):
        return _PacedThresholdController(self, x, num_steps, sigmas)


class _PacedThresholdController(Controller):
    def __init__(self, p, x, n, sigmas):
        self.batch, self.num_steps, self.p = x.shape[0], n, p
        self.scorer = LocalErrorController(LocalError(tol=1.0, max_skips=n, warmup=4), x, n, sigmas)
        self.used = np.zeros(x.shape[0], int)
        self.run = np.zeros(x.shape[0], int)
        self.m = 1
        while 4 + math.ceil((n - 4) / (self.m + 1)) > p.nfe:
            self.m += 1

    def reuse(self, step, sigma):
        return self.scorer.reuse(step, sigma)

    def record(self, *a):
        self.scorer.record(*a)

    def decide(self, step, x, sigma):
        if step < 4:
            c = np.ones(self.batch, bool)
        else:
            est, _ = self.scorer.estimate(step, x, sigma)
            planned = 4 + (self.p.nfe - 4) * (step - 4) / (self.num_steps - 4)
            tol = self.p.tol * np.exp(self.p.gain * (self.used - planned))
            left, steps_left = self.p.nfe - self.used, self.num_steps - step
            c = (~(est / tol < 1) | (self.run >= self.m) | (left >= steps_left)) & (left > 0)
        self.used += c
        self.run = np.where(c, 0, self.run + 1)
        self.scorer.note(c)
        return c


def designs(k: int) -> dict[str, SkipPolicy]:
    return {
        "Budget (quantile pacing of LocalError)": Budget(k, rule=LocalError(reuse=Extrapolate(1))),
        "LocalError threshold paced to a plan": PacedThreshold(k, tol=2e-2, gain=0.0),
        "uniform stride + forecast": Paced(nfe=k, ratio=math.inf),
        "uniform stride + fixed 2-step tail": Paced(nfe=k, ratio=0.0),
        "Paced (online tail decision)": Paced(nfe=k),
    }


# --- one measurement ------------------------------------------------------------------------------------------


class Case:
    """A workload x split x sampler x N: the noise, the N-step output, the ODE truth, the baselines' cache."""

    def __init__(self, wl: Workload, split: dict, sampler: str, steps: int, truth: bool = True) -> None:
        self.wl, self.sampler, self.steps = wl, sampler, steps
        self.entry = get_sampler(sampler)
        self.flow = self.entry.convention == "flow"
        self.noise, labels = wl.noise(split)
        self.extra = {"y": labels}
        self.sigmas = wl.schedule(steps)
        self.x = self.noise if self.flow else self.noise * self.sigmas[0]
        self.ref, _ = self.entry.sample(wl.model, self.x, self.sigmas, self.extra, disable=True)
        self.dpm = get_sampler("flow_dpmpp_2m" if self.flow else "dpmpp_2m").sample
        self.truth = None
        if truth:
            fine = refine_grid(self.sigmas, 5) if not self.flow else _refine_flow(self.sigmas, 5)
            self.truth, _ = self.dpm(wl.model, self.noise if self.flow else self.noise * fine[0], fine, self.extra, disable=True)
        self.per_seed = wl.per_seed

    def seeds(self):
        return [slice(i, i + self.per_seed) for i in range(0, len(self.noise), self.per_seed)]

    def score(self, out) -> list[tuple[float, float]]:
        p = psnr(out, self.ref)
        t = psnr(out, self.truth) if self.truth is not None else p * np.nan
        return [(float(p[s].mean()), float(t[s].mean())) for s in self.seeds()]

    def run(self, policy):
        out, rep = self.entry.sample(self.wl.model, self.x, self.sigmas, self.extra, disable=True, skip=policy)
        return out, rep

    def fewer(self, k: int, dpm: bool = False):
        return fewer_steps(self.dpm if dpm else self.entry.sample, self.wl.model, self.noise, self.wl.schedule, [k] * len(self.noise), self.extra)


def _refine_flow(sigmas: torch.Tensor, factor: int) -> torch.Tensor:
    """Every interval of a flow grid split in ``factor`` steps, uniform in lambda = log((1 - s) / s) (the first, from
    s = 1, uniform in s)."""
    s = sigmas.double()
    parts = []
    for a, b in zip(s[:-2], s[1:-1]):
        if a >= 1.0:
            parts.append(torch.linspace(float(a), float(b), factor + 1, dtype=torch.float64)[:-1])
        else:
            la, lb = math.log((1 - a) / a), math.log((1 - b) / b)
            lam = torch.linspace(la, lb, factor + 1, dtype=torch.float64)[:-1]
            parts.append(1 / (1 + lam.exp()))
    return torch.cat(parts + [s[-2:]]).to(sigmas.dtype)


def measure(case: Case, k: int, methods: dict, rows: list, extra: dict) -> None:
    """Every method at K calls on ``case``; one row per method and seed."""
    n = case.steps
    base = {
        "fewer steps": case.fewer(k),
        "uniform stride": case.run(FixedMask(uniform_mask(n, k)))[0],
        "DPM-Solver++ with K steps": case.fewer(k, dpm=True),
    }
    for name, out in base.items():
        for seed, (p, t) in enumerate(case.score(out)):
            rows.append({**extra, "method": name, "k": k, "seed": seed, "psnr": p, "truth": t, "calls": float(k)})
    for name, policy in methods.items():
        out, rep = case.run(policy)
        if not (rep.nfe == k).all():
            raise AssertionError(f"{name} spent {rep.nfe.tolist()} calls, not {k}")
        for seed, (p, t) in enumerate(case.score(out)):
            rows.append({**extra, "method": name, "k": k, "seed": seed, "psnr": p, "truth": t, "calls": float(rep.nfe.mean())})


def phase_designs(wls: dict, quick: bool) -> list:
    rows = []
    todo = [(wl, s) for name, wl in wls.items() if name in ("digits", "shapes") for s in ("euler", "dpmpp_2m")]
    with Bar(len(todo) * len(DESIGN_KS), "designs (validation)") as bar:
        for wl, sampler in todo:
            case = Case(wl, VAL, sampler, 50, truth=False)
            for k in DESIGN_KS:
                measure(case, k, designs(k), rows, {"phase": "designs", "workload": wl.name, "sampler": sampler, "steps": 50})
                bar.update()
    return rows


def phase_test(wls: dict, quick: bool) -> list:
    rows = []
    steps = (50,) if quick else STEPS
    todo = [(wl, s, n) for wl in wls.values() for s in wl.samplers for n in steps]
    with Bar(len(todo) * len(FRACTIONS), "test") as bar:
        for wl, sampler, n in todo:
            case = Case(wl, TEST, sampler, n)
            for f in FRACTIONS:
                k = round(f * n)
                methods = {"default_policy(nfe=K)": default_policy(nfe=k), "calibrated schedule": wl.calibrated(sampler, k, case.sigmas)}
                measure(case, k, methods, rows, {"phase": "test", "workload": wl.name, "sampler": sampler, "steps": n})
                bar.update()
    return rows


def phase_batch(quick: bool, repeats: int) -> list:
    """Through the hook (ShapesPipeline) and the library sampler: calls, forwards, rows, wall-clock."""
    import adaptive_sampling.integrations.diffusers as asd
    from adaptive_sampling import sample_ddim
    from adaptive_sampling.evaluation.workloads import shapes

    pipe = shapes.pipeline()
    model = shapes.denoiser(2.0, pipe.unet)
    rows = []
    for batch in (1, 4, 8):
        labels = torch.arange(batch) % 10 + (0 if batch == 1 else 0)
        labels = (labels % 5) + 5  # test classes
        gen = torch.Generator().manual_seed(0)
        noise = torch.randn(batch, 12, 16, 16, generator=gen)
        configs = {"full": None, "aligned (default)": default_policy(speedup=2), "free per-row": Paced(speedup=2, align=False, max_speedup=5)}
        times: dict[str, list[float]] = {c: [] for c in configs}
        info: dict[str, dict] = {}
        for _ in range(repeats):  # interleaved: every config once per repeat
            for name, policy in configs.items():
                t0 = time.perf_counter()
                if policy is None:
                    pipe(labels, num_inference_steps=50, guidance_scale=2.0, latents=noise * pipe.scheduler.init_noise_sigma)
                    info[name] = {"calls": 50.0, "forwards": 50, "rows": float(2 * batch)}
                else:
                    with asd.apply(pipe, skip=policy) as h:
                        pipe(labels, num_inference_steps=50, guidance_scale=2.0, latents=noise * pipe.scheduler.init_noise_sigma)
                    rep = h.report
                    info[name] = {"calls": float(rep.nfe.mean()), "forwards": rep.model_calls,
                                  "rows": float(np.mean(h.batch_sizes))}  # fmt: skip
                times[name].append(time.perf_counter() - t0)
        full = float(np.median(times["full"]))
        for name in configs:
            med = float(np.median(times[name]))
            rows.append({"phase": "batch", "path": "hook (ShapesPipeline)", "batch": batch, "config": name, **info[name],
                         "seconds": med, "speedup": full / med, "ideal": 50.0 / info[name]["calls"]})  # fmt: skip
        # the library sampler on the same model (k-diffusion convention)
        sig = shapes.sigmas(50)
        x = shapes.from_latent(noise) * sig[0]
        lib_times: dict[str, list[float]] = {c: [] for c in configs}
        lib_info: dict[str, dict] = {}
        for _ in range(repeats):
            for name, policy in configs.items():
                t0 = time.perf_counter()
                _, rep = sample_ddim(model, x, sig, {"y": labels}, disable=True, skip=policy)
                lib_times[name].append(time.perf_counter() - t0)
                lib_info[name] = {"calls": float(rep.nfe.mean()), "forwards": rep.model_calls, "rows": float(rep.nfe.sum() / rep.model_calls * 2)}
        full = float(np.median(lib_times["full"]))
        for name in configs:
            med = float(np.median(lib_times[name]))
            rows.append({"phase": "batch", "path": "library sample_ddim", "batch": batch, "config": name, **lib_info[name],
                         "seconds": med, "speedup": full / med, "ideal": 50.0 / lib_info[name]["calls"]})  # fmt: skip
    return rows


def run_meta(threads: int, started: float) -> dict:
    """What a results file records about its run: the command as typed, machine, threads, versions,
    commit, date and minutes since ``started`` (``time.perf_counter()``)."""
    return {"command": "python " + " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "machine": platform.machine(),
            "threads": threads, "python": platform.python_version(), "torch": torch.__version__, "commit": _commit(),
            "date": str(date.today()), "minutes": round((time.perf_counter() - started) / 60, 1)}  # fmt: skip


def write_results(out: Path, meta: dict, rows: list[dict], report) -> str:
    """Write ``out`` (the markdown ``report(rows, meta)``) and its ``.jsonl`` twin (the meta, then one row per
    line); return the markdown. Called after every finished part, so a stopped run keeps what it finished."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".jsonl").write_text("\n".join(json.dumps(r) for r in [{"meta": meta}] + rows) + "\n")
    text = report(rows, meta)
    out.write_text(text)
    return text


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "adaptive_sampling"], cwd=ROOT, capture_output=True, text=True).stdout
        return out + (" + uncommitted library changes" if dirty.strip() else "")
    except Exception:  # noqa: BLE001
        return "unknown"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", nargs="+", default=["digits", "shapes", "flow"])
    p.add_argument("--phases", nargs="+", default=["designs", "test", "batch"])
    p.add_argument("--quick", action="store_true", help="fewer samples, 50 steps only (a smoke run)")
    p.add_argument("--repeats", type=int, default=5, help="wall-clock repeats per configuration (batch phase)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS / "budget.jsonl")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    started = time.perf_counter()
    wls = workloads(args.workloads, args.quick)
    rows = []
    if "designs" in args.phases:
        rows += phase_designs(wls, args.quick)
    if "test" in args.phases:
        rows += phase_test(wls, args.quick)
    if "batch" in args.phases:
        rows += phase_batch(args.quick, args.repeats)
    meta = run_meta(args.threads, started)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    mode = "a" if args.out.exists() else "w"
    with args.out.open(mode) as f:
        f.write(json.dumps({"meta": meta, "workloads": args.workloads, "phases": args.phases}) + "\n")
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"wrote {len(rows)} rows to {args.out} ({meta['minutes']} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
