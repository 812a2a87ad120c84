"""DPM-Solver++(2M) on a rectified-flow model (diffusers' ``DPMSolverMultistepScheduler(use_flow_sigmas=True,
prediction_type="flow_prediction")``): stepper, loop, registry entry.

The data-prediction multistep solver with alpha = 1 - s and sigma = s, in the log-SNR
lambda = log((1 - s) / s): x' = (s' / s) x - (1 - s') (e^-h - 1) D with h = lambda' - lambda and
D the x0 estimate, extrapolated linearly from the previous one (2M) except on the first step and
the step to s = 0. This is what diffusers computes; a version in -log(s) (ComfyUI's
``sample_dpmpp_2m`` on flow models) is a different solver. Exact from s = 1 (lambda = -inf: the
first step is x' = s' x + (1 - s') D, and the second step's ratio r is infinite, so it is first
order too).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..progress import steps
from ..report import SkipReport
from ..runner import Callback, SkipRun
from .dpmpp_2m import merged_loop
from .registry import Sampler, register_sampler

__all__ = ["FlowDPMSolverState", "flow_dpmpp_2m_step", "sample_flow_dpmpp_2m"]


class FlowDPMSolverState(NamedTuple):
    """History of flow DPM-Solver++(2M): the previous x0 estimate and the lambda it was made at."""

    denoised: torch.Tensor
    lam: torch.Tensor


def _lambda(s: torch.Tensor) -> torch.Tensor:
    return (1 - s).log() - s.log()


def flow_dpmpp_2m_step(
    x: torch.Tensor, s, s_next, denoised: torch.Tensor, state: FlowDPMSolverState | None = None
) -> tuple[torch.Tensor, FlowDPMSolverState]:
    """One DPM-Solver++(2M) step from flow level s to s_next (0-dim tensors or floats)."""
    s_t, s_next_t = torch.as_tensor(s, dtype=torch.float64), torch.as_tensor(s_next, dtype=torch.float64)
    lam, lam_next = _lambda(s_t), _lambda(s_next_t)
    h = lam_next - lam
    if state is None or s_next_t == 0:
        d = denoised
    else:
        r = (lam - state.lam) / h
        d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * state.denoised
    x_next = (s_next_t / s_t) * x - ((1 - s_next_t) * (-h).expm1()) * d
    return x_next, FlowDPMSolverState(denoised, lam)


def _history(denoised: torch.Tensor, s) -> FlowDPMSolverState:
    """The solver state for an x0 estimate made at level s (as ``flow_dpmpp_2m_step`` records it)."""
    return FlowDPMSolverState(denoised, _lambda(torch.as_tensor(s, dtype=torch.float64)))


@torch.no_grad()
def sample_flow_dpmpp_2m(
    model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict | None = None,
    callback: Callback | None = None,
    disable: bool | None = None,
    *,
    skip=None,
    merge_skipped: bool = False,
) -> tuple[torch.Tensor, SkipReport]:
    """DPM-Solver++(2M) on a flow model ``model(x, s, **extra_args) -> x0`` over the grid ``sigmas``
    (s from at most 1 down to 0). A skipped call's reused eps becomes an x0 estimate at the current
    latent and s and enters the history as a model output would. ``merge_skipped=True``: as in
    ``sample_dpmpp_2m``, a mask with K calls is exactly this solver on the K-point sub-grid of the
    computed levels (what ``calibrate(..., as_grid=True)`` searches)."""
    if not isinstance(merge_skipped, bool):
        raise ValueError(f"merge_skipped must be a bool, got {merge_skipped!r}")
    run = SkipRun(model, x, sigmas, extra_args, skip, FLOW_DPMPP_2M, merge_skipped)
    s = run.schedule
    if merge_skipped:
        return merged_loop(run, x, s, callback, disable, flow_dpmpp_2m_step, _history)
    state = None
    for i in steps(run.num_steps, disable):
        denoised = run.denoise(i, x, run.sigma_rows(i, x))
        run.notify(callback, i, x, denoised)
        x, state = flow_dpmpp_2m_step(x, s[i], s[i + 1], denoised, state)
    return x, run.finish(x, run.sigma_rows(-1, x))


FLOW_DPMPP_2M = register_sampler(Sampler("flow_dpmpp_2m", "flow", sample_flow_dpmpp_2m, multistep=True, convention="flow"))
