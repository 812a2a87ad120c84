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

import torch

from . import steppers
from .criteria import SkipPolicy
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
    s = sigmas.detach().cpu()
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
    s = sigmas.detach().cpu()
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
) -> tuple[torch.Tensor, SkipReport]:
    """DPM-Solver++(2M) (Lu et al. 2022), k-diffusion's ``sample_dpmpp_2m``.

    A skipped call's reused eps becomes an x0 estimate at the current x and sigma and enters
    the solver history exactly as a model output would.
    """
    run = SkipRun(model, x, sigmas, extra_args, skip, "dpmpp_2m")
    s = sigmas.detach().cpu()
    state = None
    for i in steps(run.num_steps, disable):
        denoised = run.denoise(i, x, run.sigma_rows(i, x))
        _notify(callback, run, i, x, sigmas[i], denoised)
        x, state = steppers.dpmpp_2m_step(x, s[i], s[i + 1], denoised, state)
    return x, run.finish(x, run.sigma_rows(-1, x))
