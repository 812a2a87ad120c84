"""DPM-Solver++(2M) (Lu et al. 2022), k-diffusion's ``sample_dpmpp_2m``: stepper, loops, registry entry."""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
import torch

from ..progress import steps
from ..report import SkipReport
from ..runner import Callback, SkipRun
from .registry import Sampler, register_sampler

__all__ = ["DPMSolverState", "dpmpp_2m_step", "sample_dpmpp_2m", "merged_loop"]


class DPMSolverState(NamedTuple):
    """History of DPM-Solver++(2M): the previous x0 estimate and the sigma it was made at."""

    denoised: torch.Tensor
    sigma: torch.Tensor


def dpmpp_2m_step(
    x: torch.Tensor,
    sigma,
    sigma_next,
    denoised: torch.Tensor,
    state: DPMSolverState | None = None,
) -> tuple[torch.Tensor, DPMSolverState]:
    """One DPM-Solver++(2M) step in k-diffusion's form.

    Works in t = -log(sigma). The first step (``state is None``) and the step to sigma = 0 are
    first order; the others extrapolate the x0 estimate linearly from the previous one. The
    arithmetic follows k-diffusion's ``sample_dpmpp_2m`` operation for operation, so results
    agree to the last bits.
    """
    sigma_t = torch.as_tensor(sigma)
    sigma_next_t = torch.as_tensor(sigma_next)
    t, t_next = -sigma_t.log(), -sigma_next_t.log()
    h = t_next - t
    ratio = (-t_next).exp() / (-t).exp()
    if state is None or sigma_next_t == 0:
        x_next = ratio * x - (-h).expm1() * denoised
    else:
        r = (t - (-state.sigma.log())) / h
        extrapolated = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * state.denoised
        x_next = ratio * x - (-h).expm1() * extrapolated
    return x_next, DPMSolverState(denoised, sigma_t)


@torch.no_grad()
def sample_dpmpp_2m(
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
    run = SkipRun(model, x, sigmas, extra_args, skip, DPMPP_2M, merge_skipped)
    s = run.schedule
    if merge_skipped:
        return merged_loop(run, x, s, callback, disable, dpmpp_2m_step, DPMSolverState)
    state = None
    for i in steps(run.num_steps, disable):
        denoised = run.denoise(i, x, run.sigma_rows(i, x))
        run.notify(callback, i, x, denoised)
        x, state = dpmpp_2m_step(x, s[i], s[i + 1], denoised, state)
    return x, run.finish(x, run.sigma_rows(-1, x))


def merged_loop(run: SkipRun, x, s, callback, disable, step: Callable, history: Callable):
    """The ``merge_skipped=True`` loop of a 2M solver: per-row anchors, and one ``step`` per group
    of rows that share their anchor's and history's sigmas (so the arithmetic is the plain solver's,
    operation for operation, for every row). ``step(x, sigma, sigma_next, denoised, state)`` is the
    solver's stepper; ``history(denoised, sigma)`` its state for an x0 estimate made at sigma."""
    B = x.shape[0]
    anchor_x, anchor_d = x.clone(), torch.zeros_like(x)
    prev_d = torch.zeros_like(x)
    anchor_i = np.full(B, -1)  # step of each row's last computed call
    prev_i = np.full(B, -1)  # step of the computed call before it (-1: none, first order)
    for i in steps(run.num_steps, disable):
        denoised = run.denoise(i, x, run.sigma_rows(i, x))
        computed = run.last_computed
        run.notify(callback, i, x, denoised)
        rows = torch.from_numpy(np.flatnonzero(computed)).to(x.device)
        prev_d.index_copy_(0, rows, anchor_d.index_select(0, rows))
        anchor_x.index_copy_(0, rows, x.index_select(0, rows))
        anchor_d.index_copy_(0, rows, denoised.index_select(0, rows))
        prev_i = np.where(computed, anchor_i, prev_i)
        anchor_i = np.where(computed, i, anchor_i)
        x_next = torch.empty_like(x)
        for a, p in sorted(set(zip(anchor_i.tolist(), prev_i.tolist()))):
            group = torch.from_numpy(np.flatnonzero((anchor_i == a) & (prev_i == p))).to(x.device)
            state = None if p < 0 else history(prev_d.index_select(0, group), s[p])
            out, _ = step(anchor_x.index_select(0, group), s[a], s[i + 1], anchor_d.index_select(0, group), state)
            x_next.index_copy_(0, group, out)
        x = x_next
    return x, run.finish(x, run.sigma_rows(-1, x))


DPMPP_2M = register_sampler(Sampler("dpmpp_2m", "vp", sample_dpmpp_2m, multistep=True, schedulers=("DPMSolverMultistepScheduler",)))
