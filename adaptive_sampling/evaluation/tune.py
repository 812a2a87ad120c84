"""Judge and tune skipping on YOUR model: calibrate a schedule on some prompts, compare every option on
others, write the verdict. The function behind ``python -m adaptive_sampling tune`` (``tune_cli``),
for research repos that hold a k-diffusion-convention model themselves::

    from adaptive_sampling.evaluation.tune import tune
    result = tune(model, "dpmpp_2m", sigmas, schedule, cal_noise, test_noise, nfe=25,
                  cal_args={"y": cal_labels}, test_args={"y": test_labels})
    result.write("tune_out")          # schedule.json, report.md, grid.png, curves.png, masks.png
    print(result.verdict)

Steps: (1) ``calibrate`` a schedule with ``nfe`` calls on the calibration latents (the proxy
search: at most 10 sampling runs of them); (2) ``evaluate`` on the test latents, at the calls each
option spends: ``default_policy(nfe=...)`` (the online knob), the calibrated schedule, the paper's
rule (``ThirdOrder()``, which decides its own calls), and the baselines at the same calls (uniform
stride, fewer steps, DPM-Solver++ with as many steps), against the full-step output of the same
noise; (3) quality-vs-calls curves for the knob, the schedule, uniform stride and fewer steps;
(4) the verdict: what to use at this budget, and where skipping is not worth it on this model.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..calibration import calibrate
from ..calibration.proxy import proxy_runs
from ..policies import Calibrated, FixedMask, ThirdOrder, default_policy
from ..progress import Bar
from ..samplers.registry import get_sampler
from .baselines import fewer_steps, uniform_mask
from .metrics import psnr
from .suite import Evaluation, evaluate

__all__ = ["tune", "TuneResult", "plan_calls", "CURVE_FRACTIONS"]

CURVE_FRACTIONS = (0.3, 0.5, 0.7)  # calls / steps of the extra points on the quality-vs-calls curves
METHODS = {  # evaluate's (method, policy) -> the name the report uses
    ("adaptive", "default"): "default_policy(nfe=K) (online)",
    ("adaptive", "calibrated"): "calibrated schedule",
    ("adaptive", "paper"): "the paper's rule, ThirdOrder()",
    ("uniform", "default"): "uniform stride",
    ("fewer_steps", "default"): "fewer steps",
    ("dpmpp_2m_steps", "default"): "DPM-Solver++(2M) with K steps",
}


def plan_calls(steps: int, nfe: int, n_cal: int, n_test: int, iterations: int = 1, curves: bool = True) -> dict:
    """Model calls (denoiser rows; a guided row is one call) each stage will make, at most: for ``--dry-run``.
    ``iterations=None``: no calibration (a resumed run)."""
    calibration = 0 if iterations is None else n_cal * steps * proxy_runs(iterations)
    # evaluate: the full run; per policy its run and three baselines at its calls (the paper's rule at most N)
    per_policy = 4 * nfe
    evaluation = n_test * (steps + 2 * per_policy + 4 * steps)
    points = [max(1, round(f * steps)) for f in CURVE_FRACTIONS] if curves else []
    curve = n_test * sum(4 * k for k in points)
    return {"calibration": calibration, "evaluation": evaluation, "curves": curve, "total": calibration + evaluation + curve}


@dataclass
class TuneResult:
    """What ``tune`` found. ``rows``: one dict per method (name, calls, PSNR, SSIM, seconds per image);
    ``schedule``: the calibrated schedule; ``verdict``: the plain-words recommendation."""

    sampler: str
    steps: int
    nfe: int
    schedule: Calibrated
    evaluation: Evaluation
    rows: list[dict]
    curves: dict[str, list[tuple[float, float]]]
    verdict: str
    calibration_seconds: float
    evaluation_seconds: float
    notes: dict = field(default_factory=dict)

    def table(self) -> str:
        lines = ["| method | calls per image (of %d) | PSNR vs full (dB) | SSIM | seconds per image |" % self.steps,
                 "|---|---:|---:|---:|---:|"]  # fmt: skip
        for r in self.rows:
            ssim = "-" if r["ssim"] is None else f"{r['ssim']:.4f}"
            lines.append(f"| {r['name']} | {r['calls']:.1f} | {r['psnr']:.2f} | {ssim} | {r['seconds']:.3f} |")
        return "\n".join(lines)

    def write(self, out: str | Path, *, decode: Callable[[torch.Tensor], torch.Tensor] | None = None, header: str = "",
              prompts: dict | None = None) -> list[Path]:  # fmt: skip
        """Write ``schedule.json``, ``report.md`` and the pictures (``grid.png``, ``curves.png``,
        ``masks.png``; pictures need matplotlib) to ``out``; returns the files written.
        ``decode``: latents -> images in [-1, 1] for the grid (default: the first 3 channels)."""
        from .tune_report import write_report

        return write_report(self, Path(out), decode=decode, header=header, prompts=prompts or {})


def _row(ev: Evaluation, sampler: str, method: str, policy: str, name: str, batch: int) -> dict:
    r = ev.select(sampler, method, policy)[0]
    return {"name": name, "method": method, "policy": policy, "calls": float(np.mean(r.nfe)),
            "psnr": float(np.mean(r.psnr)), "ssim": None if r.ssim is None else float(np.mean(r.ssim)),
            "seconds": r.seconds / batch, "psnr_per_image": [float(v) for v in r.psnr]}  # fmt: skip


def _verdict(rows: list[dict], nfe: int, steps: int) -> str:
    by = {r["name"]: r for r in rows}
    base = max((by["uniform stride"], by["fewer steps"], by["DPM-Solver++(2M) with K steps"]), key=lambda r: r["psnr"])
    knob, cal = by["default_policy(nfe=K) (online)"], by["calibrated schedule"]
    best = max((knob, cal), key=lambda r: r["psnr"])
    lines = []
    margin = best["psnr"] - base["psnr"]
    if margin >= 1.0:
        lines.append(
            f"At {nfe} of {steps} calls ({steps / nfe:.2f}x), use the {best['name']}: {best['psnr']:.1f} dB against the "
            f"full run, {margin:+.1f} dB over the best baseline at the same calls ({base['name']}, {base['psnr']:.1f} dB)."
        )
        other = cal if best is knob else knob
        lines.append(f"The {other['name']} gives {other['psnr']:.1f} dB ({other['psnr'] - base['psnr']:+.1f} dB).")
    else:
        lines.append(
            f"At {nfe} of {steps} calls skipping is NOT worth it on this model: the best skip ({best['name']}, "
            f"{best['psnr']:.1f} dB) is {margin:+.1f} dB from {base['name']} ({base['psnr']:.1f} dB), which needs no "
            "skipping; use that instead."
        )
    paper = by["the paper's rule, ThirdOrder()"]
    lines.append(f"The paper's rule spent {paper['calls']:.1f} calls for {paper['psnr']:.1f} dB.")
    return " ".join(lines)


def tune(
    model: Callable,
    sampler: str,
    sigmas: torch.Tensor,
    schedule: Callable[[int], torch.Tensor],
    cal_noise: torch.Tensor,
    test_noise: torch.Tensor,
    *,
    nfe: int,
    cal_args: dict | None = None,
    test_args: dict | None = None,
    iterations: int = 1,
    method: str | None = None,
    curves: bool = True,
    seconds: float | None = None,
    data_range: float | None = None,
    schedule_in: Calibrated | None = None,
    disable: bool | None = None,
    stop_after: float | None = None,
    checkpoint: Callable[[Calibrated], None] | None = None,
) -> TuneResult:
    """Calibrate on ``cal_noise`` / ``cal_args``, judge on ``test_noise`` / ``test_args``; see the module docstring.

    model: k-diffusion-convention denoiser. sampler: a registered sampler with a library loop.
    sigmas: the N-step grid; schedule: n -> the n-step grid of the same kind (fewer steps, curves).
    cal_noise / test_noise: unit noise [B, ...] (each run starts from ``noise * sigmas[0]``, or the
    noise itself for flow samplers). nfe: the calls per image to tune for.
    method / iterations / seconds: ``calibrate``'s search (proxy by default). data_range: for PSNR
    (default: the width of the full-step outputs' value range). schedule_in: reuse a schedule
    (``--resume``): no calibration. checkpoint(schedule): called once the schedule exists (the
    command writes it to disk then). stop_after: a ``time.perf_counter()`` deadline, checked between
    the stages; past it a ``TimeoutError`` says which stages are done.
    """
    entry = get_sampler(sampler, runnable=True)
    n = len(sigmas) - 1
    low = math.ceil(n / 5)
    if not isinstance(nfe, int) or isinstance(nfe, bool) or not low <= nfe <= n:
        raise ValueError(f"nfe must be an int in [{low}, {n}] (N / 5 to the N steps of sigmas), got {nfe!r}")
    start = (lambda z: z) if entry.convention == "flow" else (lambda z: z * sigmas[0])
    t0 = time.perf_counter()
    if schedule_in is None:
        cal = calibrate(model, entry.name, sigmas, start(cal_noise), cal_args, nfe=nfe, method=method,
                        iterations=iterations, seconds=seconds, disable=disable)  # fmt: skip
    else:
        cal = schedule_in
    if checkpoint is not None:
        checkpoint(cal)
    t1 = time.perf_counter()
    if stop_after is not None and t1 > stop_after:
        raise TimeoutError("the calibration is done, the comparison is not")
    test_args = test_args or {}
    if data_range is None:
        full, _ = entry.sample(model, start(test_noise), sigmas, test_args, disable=True)
        data_range = float(full.max() - full.min()) or 1.0
    policies = {"default": default_policy(nfe=nfe), "calibrated": cal, "paper": ThirdOrder()}
    ev = evaluate(model, test_noise, schedule, policies, steps=n, samplers=(entry.name,), extra_args=test_args,
                  baselines=("uniform", "fewer_steps", "dpmpp_2m_steps"), data_range=data_range, disable=disable)  # fmt: skip
    batch = len(test_noise)
    rows = [_row(ev, entry.name, "full", "", f"full {n} steps", batch)]
    rows += [_row(ev, entry.name, m, p, name, batch) for (m, p), name in METHODS.items()]
    if stop_after is not None and curves and time.perf_counter() > stop_after:
        curves = False  # the table is done; the curves are extra: skipped, and the report says so
    curve = _curves(model, entry, sigmas, schedule, test_noise, test_args, cal, ev.references[entry.name], data_range,
                    disable) if curves else {}  # fmt: skip
    t2 = time.perf_counter()
    return TuneResult(entry.name, n, nfe, cal, ev, rows, curve, _verdict(rows, nfe, n), t1 - t0, t2 - t1,
                      {"data_range": data_range})  # fmt: skip


def _curves(model, entry, sigmas, schedule, noise, args, cal: Calibrated, ref, data_range, disable) -> dict:
    """PSNR against the full run over a few budgets: the knob, the schedule (by log sigma), uniform stride, fewer steps."""
    n = len(sigmas) - 1
    ks = sorted({max(math.ceil(n / 5), round(f * n)) for f in CURVE_FRACTIONS} | {cal.calls})
    x = noise if entry.convention == "flow" else noise * sigmas[0]
    out: dict[str, list[tuple[float, float]]] = {"default_policy (online)": [], "calibrated schedule": [], "uniform stride": [],
                                                 "fewer steps": []}  # fmt: skip
    with Bar(4 * len(ks), "curves", disable) as bar:
        for k in ks:
            for name, policy in (("default_policy (online)", default_policy(nfe=k)), ("calibrated schedule", cal.with_nfe(k)),
                                 ("uniform stride", FixedMask(uniform_mask(n, k)))):  # fmt: skip
                y, rep = entry.sample(model, x, sigmas, args, disable=True, skip=policy)
                out[name].append((float(rep.nfe.mean()), float(psnr(y, ref, data_range).mean())))
                bar.update()
            y = fewer_steps(entry.sample, model, noise, schedule, [k] * len(noise), args)
            out["fewer steps"].append((float(k), float(psnr(y, ref, data_range).mean())))
            bar.update()
    return out

