"""Euler on the probability-flow ODE (k-diffusion's ``sample_euler`` without churn): stepper, loop, registry entry."""

from __future__ import annotations

import torch

from ..progress import steps
from ..report import SkipReport
from ..runner import Callback, SkipRun
from .registry import Sampler, register_sampler

__all__ = ["euler_step", "sample_euler"]


def to_eps(x: torch.Tensor, sigma, denoised: torch.Tensor) -> torch.Tensor:
    """The noise estimate (= the probability-flow ODE derivative dx/dsigma) of a denoiser output."""
    return (x - denoised) / sigma


def euler_step(x: torch.Tensor, sigma, sigma_next, denoised: torch.Tensor) -> torch.Tensor:
    """One Euler step of dx/dsigma = (x - denoised) / sigma (Karras et al. 2022, Algorithm 2 without churn)."""
    return x + to_eps(x, sigma, denoised) * (sigma_next - sigma)


@torch.no_grad()
def sample_euler(
    model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict | None = None,
    callback: Callback | None = None,
    disable: bool | None = None,
    *,
    skip=None,
) -> tuple[torch.Tensor, SkipReport]:
    """Euler steps on the probability-flow ODE (k-diffusion's ``sample_euler`` without churn)."""
    run = SkipRun(model, x, sigmas, extra_args, skip, EULER)
    s = run.schedule
    for i in steps(run.num_steps, disable):
        denoised = run.denoise(i, x, run.sigma_rows(i, x))
        run.notify(callback, i, x, denoised)
        x = euler_step(x, s[i], s[i + 1], denoised)
    return x, run.finish(x, run.sigma_rows(-1, x))


EULER = register_sampler(Sampler("euler", "ve", sample_euler, schedulers=("EulerDiscreteScheduler",)))
