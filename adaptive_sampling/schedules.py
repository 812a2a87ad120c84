"""Noise-level (sigma) schedules in k-diffusion's variance-exploding convention.

Every function returns a 1-D tensor of strictly decreasing sigmas ending in the final sigma
(0 unless asked otherwise): ``len(sigmas) - 1`` solver steps. The Karras and exponential grids
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
