"""Adapters that turn eps-, v- and x0-prediction networks into k-diffusion's denoiser convention.

The library's samplers call ``model(x, sigma, **extra_args) -> denoised`` with x in VE scale
(x = x0 + sigma * noise) and ``sigma`` shaped [B]. Networks trained as DDPMs see the
variance-preserving input x_vp = x / sqrt(1 + sigma^2) and predict eps, v or x0; these
adapters do the conversion (k-diffusion's ``DiscreteEpsDDPMDenoiser`` / ``DiscreteVDDPMDenoiser``
scalings with sigma_data = 1). The wrapped network receives ``(x_vp, sigma, **extra_args)``;
mapping sigma to a timestep, if the network needs one, is the wrapped function's business
(``schedules.ddpm_timesteps`` lists the timesteps of a grid).
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

__all__ = ["Denoiser", "denoiser_from_eps", "denoiser_from_v", "denoiser_from_x0"]


class Denoiser(Protocol):
    """k-diffusion's model convention: returns the x0 estimate for a VE latent x at noise level sigma [B]."""

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **extra_args) -> torch.Tensor: ...


Network = Callable[..., torch.Tensor]


def _per_row(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return sigma.reshape(-1, *([1] * (x.ndim - 1)))


def denoiser_from_eps(network: Network) -> Denoiser:
    """Wrap ``network(x_vp, sigma, **kw) -> eps`` as a denoiser: denoised = x - sigma * eps."""

    def denoise(x: torch.Tensor, sigma: torch.Tensor, **extra_args) -> torch.Tensor:
        s = _per_row(sigma, x)
        eps = network(x * torch.rsqrt(1 + s * s), sigma, **extra_args)
        return x - s * eps

    return denoise


def denoiser_from_v(network: Network) -> Denoiser:
    """Wrap ``network(x_vp, sigma, **kw) -> v`` (v = sqrt(ab) eps - sqrt(1 - ab) x0) as a denoiser."""

    def denoise(x: torch.Tensor, sigma: torch.Tensor, **extra_args) -> torch.Tensor:
        s = _per_row(sigma, x)
        c_in = torch.rsqrt(1 + s * s)
        v = network(x * c_in, sigma, **extra_args)
        return x * (c_in * c_in) - v * (s * c_in)

    return denoise


def denoiser_from_x0(network: Network) -> Denoiser:
    """Wrap ``network(x_vp, sigma, **kw) -> x0`` as a denoiser."""

    def denoise(x: torch.Tensor, sigma: torch.Tensor, **extra_args) -> torch.Tensor:
        s = _per_row(sigma, x)
        return network(x * torch.rsqrt(1 + s * s), sigma, **extra_args)

    return denoise
