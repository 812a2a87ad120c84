"""Sampling loops with adaptive skipping: DDIM, Euler and DPM-Solver++(2M).

Same calling convention as k-diffusion's samplers, plus a keyword-only ``skip`` policy, and a
``(x, report)`` return value::

    x, report = sample_euler(model, x, sigmas, skip=ThirdOrder())

``model(x, sigma, **extra_args) -> denoised`` with x in VE scale and sigma shaped [B].
``skip=None`` calls the model at every step. Each step asks the per-call ``SkipRun`` for the
denoiser output (real or reused) and then ALWAYS performs the solver update, so a skipped call
changes the prediction the update uses, never the number of updates.

The callback receives k-diffusion's keys (``x, i, sigma, sigma_hat, denoised``) plus
``computed``: a [B] bool tensor, which rows called the model at this step.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from . import steppers
from .policies import SkipPolicy
from .progress import steps
from .report import SkipReport
from .runner import SkipRun

__all__ = ["sample_ddim", "sample_euler", "sample_dpmpp_2m"]

Callback = Callable[[dict], None]


def _notify(callback, run: SkipRun, i: int, x, sigma, denoised) -> None:
    if callback is not None:
        computed = torch.from_numpy(run.last_computed.copy())
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised, "computed": computed})


@torch.no_grad()
def sample_euler(
    model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict | None = None,
    callback: Callback | None = None,
    disable: bool | None = None,
    *,
    skip: SkipPolicy | None = None,
) -> tuple[torch.Tensor, SkipReport]:
    """Euler steps on the probability-flow ODE (k-diffusion's ``sample_euler`` without churn)."""
    run = SkipRun(model, x, sigmas, extra_args, skip, "euler")
    sigmas, s = run.given, run.schedule
    for i in steps(run.num_steps, disable):
        denoised = run.denoise(i, x, run.sigma_rows(i, x))
        _notify(callback, run, i, x, sigmas[i], denoised)
        x = steppers.euler_step(x, s[i], s[i + 1], denoised)
    return x, run.finish(x, run.sigma_rows(-1, x))


@torch.no_grad()
def sample_ddim(
    model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict | None = None,
    callback: Callback | None = None,
    disable: bool | None = None,
    *,
    skip: SkipPolicy | None = None,
    eta: float = 0.0,
    noise_sampler: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, SkipReport]:
    """DDIM (Song et al. 2021) in VE coordinates.

    ``eta = 0`` is deterministic. With ``eta > 0``, ``noise_sampler(sigma, sigma_next)`` supplies
    the standard-normal noise of each step (k-diffusion's convention); without one,
    ``torch.randn_like`` is used.
    """
    if not isinstance(eta, (int, float)) or eta < 0:
        raise ValueError(f"eta must be a number >= 0, got {eta!r}")
    run = SkipRun(model, x, sigmas, extra_args, skip, "ddim")
    if eta > 0 and noise_sampler is None:
        noise_sampler = lambda sigma, sigma_next: torch.randn_like(x)  # noqa: E731
    sigmas, s = run.given, run.schedule
    for i in steps(run.num_steps, disable):
        denoised = run.denoise(i, x, run.sigma_rows(i, x))
        _notify(callback, run, i, x, sigmas[i], denoised)
        noise = noise_sampler(sigmas[i], sigmas[i + 1]) if eta > 0 and s[i + 1] > 0 else None
        x = steppers.ddim_step(x, s[i], s[i + 1], denoised, eta if noise is not None else 0.0, noise)
    return x, run.finish(x, run.sigma_rows(-1, x))


@torch.no_grad()
def sample_dpmpp_2m(
    model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict | None = None,
    callback: Callback | None = None,
    disable: bool | None = None,
    *,
    skip: SkipPolicy | None = None,
    merge_skipped: bool = False,
) -> tuple[torch.Tensor, SkipReport]:
    """DPM-Solver++(2M) (Lu et al. 2022), k-diffusion's ``sample_dpmpp_2m``.

    Default (``merge_skipped=False``, the paper's method): a skipped call's reused eps becomes an
    x0 estimate at the current x and sigma and enters the solver history exactly as a model
    output would (a stale point in a multistep history).

    ``merge_skipped=True`` (solver-consistent): a skipped step is merged into one longer 2M step
    over the computed sigmas. Each row keeps the latent, sigma and x0 estimate of its last
    computed call (the anchor) and the x0 estimate before it; every latent, also after a skipped
    call, is the 2M step from the anchor to the next sigma. A mask with K calls is then exactly
    DPM-Solver++(2M) on the K-point sub-grid of the computed sigmas (plus the final sigma); the
    latents at skipped sigmas are that long step's interpolants, which the skip rule observes.
    The reuse strategy is not used for the update in this mode.
    """
    if not isinstance(merge_skipped, bool):
        raise ValueError(f"merge_skipped must be a bool, got {merge_skipped!r}")
    run = SkipRun(model, x, sigmas, extra_args, skip, "dpmpp_2m")
    sigmas, s = run.given, run.schedule
    if merge_skipped:
        return _dpmpp_2m_merged(run, x, sigmas, s, callback, disable)
    state = None
    for i in steps(run.num_steps, disable):
        denoised = run.denoise(i, x, run.sigma_rows(i, x))
        _notify(callback, run, i, x, sigmas[i], denoised)
        x, state = steppers.dpmpp_2m_step(x, s[i], s[i + 1], denoised, state)
    return x, run.finish(x, run.sigma_rows(-1, x))


def _dpmpp_2m_merged(run: SkipRun, x, sigmas, s, callback, disable):
    """The ``merge_skipped=True`` loop of ``sample_dpmpp_2m``: per-row anchors, and one
    ``dpmpp_2m_step`` per group of rows that share their anchor's and history's sigmas (so the
    arithmetic is k-diffusion's, operation for operation, for every row)."""
    B = x.shape[0]
    anchor_x, anchor_d = x.clone(), torch.zeros_like(x)
    prev_d = torch.zeros_like(x)
    anchor_i = np.full(B, -1)  # step of each row's last computed call
    prev_i = np.full(B, -1)  # step of the computed call before it (-1: none, first order)
    for i in steps(run.num_steps, disable):
        denoised = run.denoise(i, x, run.sigma_rows(i, x))
        computed = run.last_computed
        _notify(callback, run, i, x, sigmas[i], denoised)
        rows = torch.from_numpy(np.flatnonzero(computed)).to(x.device)
        prev_d.index_copy_(0, rows, anchor_d.index_select(0, rows))
        anchor_x.index_copy_(0, rows, x.index_select(0, rows))
        anchor_d.index_copy_(0, rows, denoised.index_select(0, rows))
        prev_i = np.where(computed, anchor_i, prev_i)
        anchor_i = np.where(computed, i, anchor_i)
        x_next = torch.empty_like(x)
        for a, p in sorted(set(zip(anchor_i.tolist(), prev_i.tolist()))):
            group = torch.from_numpy(np.flatnonzero((anchor_i == a) & (prev_i == p))).to(x.device)
            state = None if p < 0 else steppers.DPMSolverState(prev_d.index_select(0, group), s[p])
            out, _ = steppers.dpmpp_2m_step(
                anchor_x.index_select(0, group), s[a], s[i + 1], anchor_d.index_select(0, group), state
            )
            x_next.index_copy_(0, group, out)
        x = x_next
    return x, run.finish(x, run.sigma_rows(-1, x))
