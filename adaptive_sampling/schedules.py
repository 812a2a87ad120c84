"""Noise-level (sigma) schedules: k-diffusion's variance-exploding convention, and rectified flow.

Every function returns a 1-D tensor of strictly decreasing sigmas ending in the final sigma
(0 unless asked otherwise): ``len(sigmas) - 1`` solver steps. ``get_sigmas_flow`` gives flow
levels s in [0, 1] (starting at 1, pure noise) for the flow samplers. The Karras and exponential grids
use k-diffusion's formulas; the DDPM-discrete grids reproduce what diffusers' schedulers compute
(float32 ``alphas_cumprod``, then the timestep grid of the named scheduler), so a sampler run
here on those sigmas takes the same steps as the diffusers pipeline.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch

__all__ = [
    "get_sigmas_karras",
    "get_sigmas_exponential",
    "ddpm_alphas_cumprod",
    "ddpm_timesteps",
    "get_sigmas_ddpm",
    "get_sigmas_flow",
    "flow_shift",
    "vp_scale",
]

BetaSchedule = Literal["linear", "scaled_linear"]
Spacing = Literal["leading", "linspace", "trailing"]
Grid = Literal["ddim", "euler", "dpmsolver"]


def _check_steps(n: int) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n (number of steps) must be a positive int, got {n!r}")


def _check_sigma_range(sigma_min: float, sigma_max: float) -> None:
    if not (0 < sigma_min < sigma_max < math.inf):
        raise ValueError(
            f"need 0 < sigma_min < sigma_max < inf, got sigma_min={sigma_min!r}, sigma_max={sigma_max!r}"
        )


def get_sigmas_karras(
    n: int, sigma_min: float, sigma_max: float, rho: float = 7.0, *, dtype=torch.float64, device="cpu"
) -> torch.Tensor:
    """The schedule of Karras et al. (2022): n sigmas evenly spaced in sigma^(1/rho), then 0."""
    _check_steps(n)
    _check_sigma_range(sigma_min, sigma_max)
    ramp = torch.linspace(0, 1, n, dtype=dtype)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(device)


def get_sigmas_exponential(
    n: int, sigma_min: float, sigma_max: float, *, dtype=torch.float64, device="cpu"
) -> torch.Tensor:
    """n sigmas evenly spaced in log(sigma), then 0."""
    _check_steps(n)
    _check_sigma_range(sigma_min, sigma_max)
    sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=dtype).exp()
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(device)


def ddpm_alphas_cumprod(
    beta_schedule: BetaSchedule = "scaled_linear",
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    num_train_timesteps: int = 1000,
) -> torch.Tensor:
    """Cumulative products of (1 - beta) for a DDPM training schedule, in float32 as diffusers has them.

    The defaults are Stable Diffusion's.
    """
    if beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    else:
        raise ValueError(f"beta_schedule must be 'linear' or 'scaled_linear', got {beta_schedule!r}")
    return torch.cumprod(1.0 - betas, dim=0)


def ddpm_timesteps(
    n: int,
    num_train_timesteps: int = 1000,
    timestep_spacing: Spacing = "leading",
    steps_offset: int = 0,
    grid: Grid = "ddim",
) -> np.ndarray:
    """The inference timesteps (descending) that diffusers' scheduler ``grid`` picks for n steps.

    ``grid`` names the scheduler family, because their grids differ:
    ``"ddim"`` (DDIM, DDPM, PNDM: integer timesteps), ``"euler"`` (Euler, Heun, LMS: float
    timesteps, ``linspace`` is not rounded) and ``"dpmsolver"`` (DPM-Solver multistep, UniPC:
    ``linspace`` and ``leading`` lay out n + 1 points and drop the last).
    """
    _check_steps(n)
    if n > num_train_timesteps:
        raise ValueError(f"n={n} steps cannot exceed num_train_timesteps={num_train_timesteps}")
    if grid not in ("ddim", "euler", "dpmsolver"):
        raise ValueError(f"grid must be 'ddim', 'euler' or 'dpmsolver', got {grid!r}")
    T = num_train_timesteps
    if timestep_spacing == "linspace":
        if grid == "dpmsolver":
            t = np.linspace(0, T - 1, n + 1).round()[::-1][:-1]
        elif grid == "euler":
            t = np.linspace(0, T - 1, n, dtype=np.float32)[::-1]
        else:
            t = np.linspace(0, T - 1, n).round()[::-1]
    elif timestep_spacing == "leading":
        if grid == "dpmsolver":
            t = (np.arange(0, n + 1) * (T // (n + 1))).round()[::-1][:-1]
        else:
            t = (np.arange(0, n) * (T // n)).round()[::-1]
        t = t + steps_offset
    elif timestep_spacing == "trailing":
        t = np.arange(T, 0, -T / n).round() - 1
    else:
        raise ValueError(f"timestep_spacing must be 'leading', 'linspace' or 'trailing', got {timestep_spacing!r}")
    return np.ascontiguousarray(t, dtype=np.float32 if grid == "euler" else np.int64)


def get_sigmas_ddpm(
    n: int,
    *,
    beta_schedule: BetaSchedule = "scaled_linear",
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    num_train_timesteps: int = 1000,
    timestep_spacing: Spacing = "leading",
    steps_offset: int = 0,
    grid: Grid = "ddim",
    final_sigma: Literal["zero", "sigma_min"] = "zero",
    dtype=torch.float64,
    device="cpu",
) -> torch.Tensor:
    """Sigmas of a DDPM-discrete model at the timesteps diffusers' ``grid`` scheduler would use.

    sigma_t = sqrt((1 - alphabar_t) / alphabar_t), evaluated (and, for fractional timesteps,
    linearly interpolated) exactly as diffusers does, rounded to float32 like diffusers' sigmas,
    then returned in ``dtype``. ``final_sigma="sigma_min"`` ends at sigma(alphabar_0) instead of 0
    (diffusers' ``final_sigmas_type="sigma_min"``, or DDIM with ``set_alpha_to_one=False``).

    Note: with ``timestep_spacing="linspace"`` diffusers' DDIM steps from t to t - T // n, which is
    not always the next grid point; this grid (like diffusers' Euler) always steps to the next one.
    """
    ac = ddpm_alphas_cumprod(beta_schedule, beta_start, beta_end, num_train_timesteps)
    train_sigmas = (((1 - ac) / ac) ** 0.5).numpy()
    t = ddpm_timesteps(n, num_train_timesteps, timestep_spacing, steps_offset, grid)
    if t.min() < 0 or t.max() > num_train_timesteps - 1:
        raise ValueError(
            f"timesteps fall outside [0, {num_train_timesteps - 1}] (steps_offset={steps_offset} too large?)"
        )
    sigmas = np.interp(t, np.arange(len(train_sigmas)), train_sigmas)
    if final_sigma == "zero":
        last = 0.0
    elif final_sigma == "sigma_min":
        last = float(train_sigmas[0])
    else:
        raise ValueError(f"final_sigma must be 'zero' or 'sigma_min', got {final_sigma!r}")
    sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
    return torch.from_numpy(sigmas).to(dtype=dtype, device=device)


def vp_scale(sigma: torch.Tensor) -> torch.Tensor:
    """1 / sqrt(1 + sigma^2): multiplies a VE latent into the variance-preserving one (x_vp = x_ve * scale).

    Written with a correctly rounded division and square root (not rsqrt), so the Triton skip
    kernel, which computes the same expression, agrees bit for bit."""
    return 1 / torch.sqrt(1 + sigma * sigma)


FlowSpacing = Literal["pipeline", "scheduler", "dpmsolver"]


def flow_shift(s: np.ndarray, shift: float | None = None, mu: float | None = None, time_shift: str = "exponential") -> np.ndarray:
    """diffusers' time shift of flow levels: static ``shift`` (s' = shift s / (1 + (shift - 1) s),
    SD3's 3.0) or, with ``mu`` (resolution-dependent, Flux), exponential
    (s' = e^mu / (e^mu + 1 / s - 1)) or linear (s' = mu / (mu + 1 / s - 1)); in s's dtype."""
    if mu is not None:
        if time_shift == "exponential":
            return math.exp(mu) / (math.exp(mu) + (1 / s - 1) ** 1.0)
        if time_shift == "linear":
            return mu / (mu + (1 / s - 1) ** 1.0)
        raise ValueError(f"time_shift must be 'exponential' or 'linear', got {time_shift!r}")
    shift = 1.0 if shift is None else shift
    return shift * s / (1 + (shift - 1) * s)


def get_sigmas_flow(
    n: int,
    *,
    shift: float = 1.0,
    mu: float | None = None,
    shift_terminal: float | None = None,
    time_shift: str = "exponential",
    spacing: FlowSpacing = "pipeline",
    num_train_timesteps: int = 1000,
    dtype=torch.float64,
    device="cpu",
) -> torch.Tensor:
    """Flow levels s (n of them, then 0) as diffusers' flow schedulers lay them out, to the float32 bit.

    spacing:
    * ``"pipeline"``: ``FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=linspace(1, 1/n, n), mu=...)``,
      what the Flux, Wan, HunyuanVideo and most flow pipelines pass; starts at s = 1;
    * ``"scheduler"``: the scheduler's own default (``set_timesteps(n)``, what SD3's pipeline uses):
      linspace between its shifted sigma_max (1) and sigma_min in timesteps, shifted again;
    * ``"dpmsolver"``: ``DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=shift)``;
      starts just below 1 (1 - 1/T before the shift).

    shift: the static shift (``shift`` / ``flow_shift``; SD3 3.0); mu: dynamic shifting
    (``use_dynamic_shifting=True``; the Flux pipeline computes mu from the image sequence length)
    with ``time_shift`` "exponential" (default) or "linear"; shift_terminal: stretch the grid so it
    ends at that s (LTX-Video) before the final 0.
    """
    _check_steps(n)
    T = num_train_timesteps
    if spacing == "dpmsolver":
        if mu is not None or shift_terminal is not None:
            raise ValueError("spacing='dpmsolver' takes a static shift only (DPMSolverMultistepScheduler's flow_shift)")
        alphas = np.linspace(1, 1 / T, n + 1)
        s = np.flip(flow_shift(1.0 - alphas, shift))[:-1].copy()
    elif spacing in ("pipeline", "scheduler"):
        if spacing == "pipeline":
            s = np.linspace(1.0, 1 / n, n).astype(np.float32)
        else:
            train = np.linspace(1, T, T, dtype=np.float32)[::-1].copy() / T
            if mu is None:
                train = flow_shift(train, shift)
            s_max, s_min = float(train[0]), float(train[-1])
            s = np.linspace(s_max * T, s_min * T, n) / T
        s = flow_shift(s, shift, mu, time_shift)
        if shift_terminal:
            one_minus = 1 - s
            s = 1 - one_minus / (one_minus[-1] / (1 - shift_terminal))
    else:
        raise ValueError(f"spacing must be 'pipeline', 'scheduler' or 'dpmsolver', got {spacing!r}")
    sigmas = torch.cat([torch.from_numpy(np.asarray(s)).to(torch.float32), torch.zeros(1)])
    return sigmas.to(dtype=dtype, device=device)
