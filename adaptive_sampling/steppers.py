"""Pure solver updates in k-diffusion's variance-exploding convention.

Each function maps the current latent ``x`` at noise level ``sigma`` and the denoiser's output
``denoised`` (an x0 estimate) to the latent at ``sigma_next``. Nothing is stored between calls:
a multistep solver takes its history as an explicit ``state`` argument and returns the new one
(diffrax's ``step(state) -> (y, state)`` shape). ``sigma`` and ``sigma_next`` are 0-dim tensors
or floats; ``sigma > 0`` always, ``sigma_next`` may be 0 on the last step.

The skip wrapper never changes these functions: a skipped model call hands them
``denoised = x - sigma * eps_prev`` (see ``runner.py``), so every latent update still runs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["euler_step", "ddim_step", "DPMSolverState", "dpmpp_2m_step", "ancestral_split"]


def _eps(x: torch.Tensor, sigma, denoised: torch.Tensor) -> torch.Tensor:
    """The noise estimate (= the probability-flow ODE derivative dx/dsigma) of a denoiser output."""
    return (x - denoised) / sigma


def euler_step(x: torch.Tensor, sigma, sigma_next, denoised: torch.Tensor) -> torch.Tensor:
    """One Euler step of dx/dsigma = (x - denoised) / sigma (Karras et al. 2022, Algorithm 2 without churn)."""
    return x + _eps(x, sigma, denoised) * (sigma_next - sigma)


def ancestral_split(sigma, sigma_next, eta: float):
    """Split a step sigma -> sigma_next into a deterministic part down to ``sigma_down`` and fresh
    noise of std ``sigma_up`` (sigma_down^2 + sigma_up^2 = sigma_next^2).

    With ``eta = 1`` this is DDPM's posterior variance; in VP terms it is DDIM's
    sigma_t(eta) / sqrt(alphabar_prev).
    """
    if eta == 0:
        return sigma_next, sigma_next * 0
    up = eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
    up = torch.minimum(torch.as_tensor(sigma_next), torch.as_tensor(up))
    down = (sigma_next**2 - up**2) ** 0.5
    return down, up


def ddim_step(
    x: torch.Tensor,
    sigma,
    sigma_next,
    denoised: torch.Tensor,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One DDIM step (Song et al. 2021) written in VE coordinates: x' = x0 + sigma_down * eps + sigma_up * noise.

    With ``eta = 0`` this is deterministic DDIM (mathematically an Euler step in VE coordinates).
    With ``eta > 0`` the caller supplies ``noise`` (standard normal, shaped like x), so runs are
    reproducible and the caller owns the random stream.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta!r}")
    eps = _eps(x, sigma, denoised)
    if eta == 0:
        return denoised + eps * sigma_next
    if noise is None:
        raise ValueError("noise is required when eta > 0 (pass a standard-normal tensor shaped like x)")
    if noise.shape != x.shape:
        raise ValueError(f"noise must have the shape of x {tuple(x.shape)}, got {tuple(noise.shape)}")
    sigma_down, sigma_up = ancestral_split(sigma, sigma_next, eta)
    return denoised + eps * sigma_down + noise * sigma_up


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
    """One DPM-Solver++(2M) step (Lu et al. 2022) in k-diffusion's form.

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
