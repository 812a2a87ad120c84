"""Euler on a rectified-flow model (diffusers' ``FlowMatchEulerDiscreteScheduler``): stepper, loop, registry entry.

The flow convention (``conventions.FLOW``): x = (1 - s) x0 + s * eps with s in [0, 1], the model
returns x0 for (x, s). The ODE is dx/ds = v = (x - x0) / s = eps - x0, and one Euler step is
x' = x + (s' - s) v. It is DDIM in these coordinates (x' = (1 - s') x0 + s' eps), which is why
the registry has one flow Euler, not a separate flow DDIM. Exact from s = 1 (pure noise: v = x - x0).
"""

from __future__ import annotations

import torch

from ..progress import steps
from ..report import SkipReport
from ..runner import Callback, SkipRun
from .registry import Sampler, register_sampler

__all__ = ["flow_euler_step", "sample_flow_euler"]


def flow_euler_step(x: torch.Tensor, s, s_next, denoised: torch.Tensor) -> torch.Tensor:
    """One Euler step of dx/ds = (x - denoised) / s (the velocity), from s to s_next."""
    return x + (x - denoised) / s * (s_next - s)


@torch.no_grad()
def sample_flow_euler(
    model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict | None = None,
    callback: Callback | None = None,
    disable: bool | None = None,
    *,
    skip=None,
) -> tuple[torch.Tensor, SkipReport]:
    """Euler on a flow model ``model(x, s, **extra_args) -> x0`` over the grid ``sigmas`` (s from at
    most 1 down to 0, e.g. ``get_sigmas_flow``); x starts as the noise itself when sigmas[0] = 1."""
    run = SkipRun(model, x, sigmas, extra_args, skip, FLOW_EULER)
    s = run.schedule
    for i in steps(run.num_steps, disable):
        denoised = run.denoise(i, x, run.sigma_rows(i, x))
        run.notify(callback, i, x, denoised)
        x = flow_euler_step(x, s[i], s[i + 1], denoised)
    return x, run.finish(x, run.sigma_rows(-1, x))


FLOW_EULER = register_sampler(
    Sampler("flow_euler", "flow", sample_flow_euler, convention="flow", schedulers=("FlowMatchEulerDiscreteScheduler",))
)
