"""Quality evaluation: skip policies against the full-step output and against baselines at matched NFE.

    from functools import partial
    from adaptive_sampling import default_policy, get_sigmas_karras
    from adaptive_sampling.evaluation import evaluate

    ev = evaluate(model, noise, partial(get_sigmas_karras, sigma_min=0.002, sigma_max=80.0),
                  {"default": default_policy()}, steps=50, extra_args={"y": labels})
    print(ev.table())

``samplers`` are registry names (any sampler with a library loop, including one registered by
the user with ``register_sampler``).

For every sampler, the full-step run from the same noise is the reference. Each policy's run
gives K = its NFE per sample, and each baseline is run at exactly that K per sample:

* ``uniform``: K calls at a uniform stride (``FixedMask``);
* ``fewer_steps``: a K-step grid of the same kind (``schedule(K)``), every step computed. For
  DDPM-discrete grids pass a trailing-spacing schedule: leading spacing moves the start;
* ``dpmpp_2m_steps``: DPM-Solver++(2M) on a K-step grid of the same kind, the fast solver a
  user would pick instead of skipping (for the ``dpmpp_2m`` sampler it equals ``fewer_steps``);
* ``dpmpp_2m_grid``: DPM-Solver++(2M) on a calibrated K-point grid (``grid_for(K)``, e.g. from
  ``calibrate(..., as_grid=True)``): the fast solver on the best grid we can make;
* ``random``: step 0 plus K - 1 random calls;
* ``greedy``: the greedy optimal path (``calibration.greedy_masks``), the paper's oracle.

With ``truth_steps``, every output is also scored against a fine ODE solve (DPM-Solver++(2M) on
``schedule(truth_steps)`` from the same noise, e.g. 250 steps): ``Result.psnr_truth``. Being
close to the N-step run includes that run's own discretisation error; the truth does not.

Metrics per sample: PSNR (capped at 100 dB; ``data_range`` is the width of the data's value
range), SSIM (images only), max-abs error, NFE; wall-clock seconds per run on this machine.
With ``greedy``, a chi-square test of association (scipy) between the policy's mask and the
greedy mask over the decided steps tells whether the estimator picks the oracle's steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from ..calibration.greedy import greedy_masks
from ..policies import FixedMask, SkipPolicy, check_policy
from ..progress import Bar
from ..samplers.registry import get_sampler, registered, sampler_names
from .baselines import fewer_steps, random_mask, uniform_mask
from .metrics import max_abs_error, psnr, ssim

__all__ = ["evaluate", "Evaluation", "Result", "Association", "SAMPLERS", "BASELINES"]

SAMPLERS = ("ddim", "dpmpp_2m", "euler")  # the default samplers: the library's three VE loops
BASELINES = ("uniform", "fewer_steps", "dpmpp_2m_steps", "dpmpp_2m_grid", "random", "greedy")


@dataclass
class Result:
    """One method's run on one sampler (per-sample arrays have length B)."""

    sampler: str
    method: str  # "full", "adaptive", or a baseline name
    policy: str  # the policy whose NFE this row matches ("" for the full run)
    nfe: np.ndarray
    psnr: np.ndarray
    ssim: np.ndarray | None
    max_abs: np.ndarray
    seconds: float
    output: torch.Tensor = field(repr=False)
    mask: np.ndarray | None = field(default=None, repr=False)  # [B, N] for mask-based methods
    psnr_truth: np.ndarray | None = None  # against the fine ODE solve (``truth_steps``)


@dataclass
class Association:
    """Chi-square test of association between a policy's mask and the greedy mask (decided steps)."""

    table: np.ndarray  # [[both compute, policy computes / greedy skips], [policy skips / greedy computes, both skip]]
    statistic: float
    p_value: float


@dataclass
class Evaluation:
    steps: int
    results: list[Result]
    references: dict[str, torch.Tensor]
    associations: dict[tuple[str, str], Association]
    greedy_evaluations: int = 0

    def select(self, sampler: str | None = None, method: str | None = None, policy: str | None = None) -> list[Result]:
        return [
            r
            for r in self.results
            if (sampler is None or r.sampler == sampler)
            and (method is None or r.method == method)
            and (policy is None or r.policy == policy)
        ]

    def table(self) -> str:
        """One markdown table: mean NFE, speedup = steps / mean NFE, mean PSNR / SSIM, worst max-abs, seconds."""
        truth = any(r.psnr_truth is not None for r in self.results)
        head = "| sampler | method | at the calls of | NFE | speedup | PSNR (dB) | SSIM | max abs err | seconds |"
        lines = [head + (" PSNR vs ODE truth (dB) |" if truth else ""), "|---|---|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if truth else "")]
        for r in self.results:
            s = "-" if r.ssim is None else f"{np.mean(r.ssim):.4f}"
            t = (f" {np.mean(r.psnr_truth):.2f} |" if r.psnr_truth is not None else " - |") if truth else ""
            lines.append(
                f"| {r.sampler} | {r.method} | {r.policy or '-'} | {np.mean(r.nfe):.1f} | "
                f"{self.steps / np.mean(r.nfe):.2f}x | {np.mean(r.psnr):.2f} | {s} | {np.max(r.max_abs):.3g} | {r.seconds:.2f} |{t}"
            )
        if self.associations:
            lines += ["", "| sampler | policy | chi-square | p-value | table [[cc, cs], [sc, ss]] (policy, greedy) |",
                      "|---|---|---:|---:|---|"]  # fmt: skip
            for (sampler, pol), a in self.associations.items():
                lines.append(f"| {sampler} | {pol} | {a.statistic:.2f} | {a.p_value:.3g} | {a.table.tolist()} |")
        return "\n".join(lines)


def _start(noise: torch.Tensor, sigmas: torch.Tensor, conventions: set) -> torch.Tensor:
    """The starting latent from unit noise: noise * sigma_max (VE), the noise itself (flow)."""
    return noise if conventions == {"flow"} else noise * sigmas[0]


def _association(policy_mask: np.ndarray, greedy: np.ndarray, warmup: int) -> Association:
    from scipy.stats import chi2_contingency

    p, g = policy_mask[:, warmup:].ravel(), greedy[:, warmup:].ravel()
    table = np.array([[np.sum(p & g), np.sum(p & ~g)], [np.sum(~p & g), np.sum(~p & ~g)]])
    if (table.sum(axis=0) == 0).any() or (table.sum(axis=1) == 0).any():
        return Association(table, float("nan"), float("nan"))  # one mask is constant: no test possible
    stat, pvalue, _, _ = chi2_contingency(table)
    return Association(table, float(stat), float(pvalue))


def evaluate(
    model: Callable,
    noise: torch.Tensor,
    schedule: Callable[[int], torch.Tensor],
    policies: dict[str, SkipPolicy],
    *,
    steps: int = 50,
    samplers: Sequence[str] = SAMPLERS,
    extra_args: dict | None = None,
    baselines: Sequence[str] = BASELINES,
    greedy_for: Sequence[str] | None = None,
    data_range: float = 2.0,
    seed: int = 0,
    disable: bool | None = None,
    truth_steps: int | None = None,
    grid_for: Callable[[int], torch.Tensor] | None = None,
) -> Evaluation:
    """Run every policy and baseline on every sampler; see the module docstring.

    model: k-diffusion-convention denoiser. noise: [B, ...] standard-normal initial noise (each
    run starts from ``noise * sigmas[0]`` of its own grid). schedule: n -> sigmas (n steps).
    policies: name -> policy. greedy_for: policy names to run the (costly) greedy search for
    (default: all). disable: hide the progress bar. truth_steps: also score against a
    DPM-Solver++(2M) solve with this many steps (``Result.psnr_truth``). grid_for: K -> a
    calibrated K-point grid, for the ``dpmpp_2m_grid`` baseline (skipped without it).
    """
    runnable = registered()
    unknown = [s for s in samplers if not (isinstance(s, str) and s.removeprefix("sample_") in runnable
                                           and runnable[s.removeprefix("sample_")].runnable)]  # fmt: skip
    if unknown:
        raise ValueError(f"unknown samplers {unknown}; choose from {sampler_names(runnable=True)} (samplers with a library loop)")
    entries = {name: get_sampler(name, runnable=True) for name in samplers}
    conventions = {e.convention for e in entries.values()}
    if len(conventions) > 1:
        raise ValueError(f"samplers mix model conventions ({sorted(conventions)}): one model has one convention")
    # the fast solver of the model's convention: the DPM-Solver++(2M) baselines and the ODE truth
    dpm = get_sampler("flow_dpmpp_2m" if conventions == {"flow"} else "dpmpp_2m").sample
    bad = [b for b in baselines if b not in BASELINES]
    if bad:
        raise ValueError(f"unknown baselines {bad}; choose from {list(BASELINES)}")
    if not policies:
        raise ValueError("policies must name at least one policy")
    for pname, policy in policies.items():
        check_policy(policy, f"policies[{pname!r}]")
    if truth_steps is not None and (not isinstance(truth_steps, int) or truth_steps < 1):
        raise ValueError(f"truth_steps must be a positive int or None, got {truth_steps!r}")
    greedy_for = list(policies) if greedy_for is None else list(greedy_for)
    extra_args = extra_args or {}
    images = noise.ndim == 4 and min(noise.shape[-2:]) >= 3
    rng = np.random.default_rng(seed)
    sigmas = schedule(steps)
    if grid_for is None:
        baselines = [b for b in baselines if b != "dpmpp_2m_grid"]
    per_policy = 1 + sum(b != "greedy" for b in baselines)
    tasks = len(samplers) * (1 + len(policies) * per_policy + ("greedy" in baselines) * len(greedy_for))
    results: list[Result] = []
    references: dict[str, torch.Tensor] = {}
    associations: dict[tuple[str, str], Association] = {}
    greedy_cost = 0
    truth = None
    if truth_steps is not None:
        fine = schedule(truth_steps)
        truth, _ = dpm(model, _start(noise, fine, conventions), fine, extra_args, disable=True)

    with Bar(tasks, "evaluate", disable) as bar:

        def measure(sampler, method, policy, nfe, out, seconds, mask=None):
            ref = references[sampler]
            results.append(Result(
                sampler, method, policy, np.asarray(nfe), psnr(out, ref, data_range),
                ssim(out, ref, data_range) if images else None, max_abs_error(out, ref), seconds, out, mask,
                None if truth is None else psnr(out, truth, data_range),
            ))  # fmt: skip

        def timed(fn, *args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            return out, time.perf_counter() - t0

        for name in samplers:
            sample = entries[name].sample
            bar.set_description(f"evaluate {name}")
            x = _start(noise, sigmas, conventions)
            (ref, rep), sec = timed(sample, model, x, sigmas, extra_args, disable=True)
            references[name] = ref
            measure(name, "full", "", rep.nfe, ref, sec)
            bar.update()
            for pname, policy in policies.items():
                (out, rep), sec = timed(sample, model, x, sigmas, extra_args, disable=True, skip=policy)
                measure(name, "adaptive", pname, rep.nfe, out, sec, rep.computed)
                bar.update()
                k = rep.nfe

                def replay(method, mask):
                    (out, _), sec = timed(sample, model, x, sigmas, extra_args, disable=True, skip=FixedMask(mask))
                    measure(name, method, pname, k, out, sec, mask)
                    bar.update()

                if "uniform" in baselines:
                    replay("uniform", np.stack([uniform_mask(steps, int(kb)) for kb in k]))
                if "fewer_steps" in baselines:
                    out, sec = timed(fewer_steps, sample, model, noise, schedule, k, extra_args)
                    measure(name, "fewer_steps", pname, k, out, sec)
                    bar.update()
                if "dpmpp_2m_steps" in baselines:
                    out, sec = timed(fewer_steps, dpm, model, noise, schedule, k, extra_args)
                    measure(name, "dpmpp_2m_steps", pname, k, out, sec)
                    bar.update()
                if "dpmpp_2m_grid" in baselines:
                    out, sec = timed(fewer_steps, dpm, model, noise, grid_for, k, extra_args)
                    measure(name, "dpmpp_2m_grid", pname, k, out, sec)
                    bar.update()
                if "random" in baselines:
                    replay("random", np.stack([random_mask(steps, int(kb), rng) for kb in k]))
                if "greedy" in baselines and pname in greedy_for:
                    warmup = policy.warmup if policy.warmup > 1 else 4  # at least the rule's warm-up
                    t0 = time.perf_counter()
                    gmask, spent = greedy_masks(sample, model, x, sigmas, np.maximum(k, warmup), ref, extra_args, warmup)
                    greedy_cost += spent
                    (out, _), _ = timed(sample, model, x, sigmas, extra_args, disable=True, skip=FixedMask(gmask))
                    measure(name, "greedy", pname, gmask.sum(1), out, time.perf_counter() - t0, gmask)
                    associations[(name, pname)] = _association(rep.computed, gmask, warmup)
                    bar.update()
    return Evaluation(steps, results, references, associations, greedy_cost)
