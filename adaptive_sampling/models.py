"""Adapters that turn eps-, v- and x0-prediction networks into the library's denoiser convention.

The library's samplers call ``model(x, sigma, **extra_args) -> denoised`` with x in VE scale
(x = x0 + sigma * noise) and ``sigma`` shaped [B]. Networks trained as DDPMs see the
variance-preserving input x_vp = x / sqrt(1 + sigma^2) and predict eps, v or x0; these
adapters do the conversion (k-diffusion's ``DiscreteEpsDDPMDenoiser`` / ``DiscreteVDDPMDenoiser``
scalings with sigma_data = 1). The wrapped network receives ``(x_vp, sigma, **extra_args)``;
mapping sigma to a timestep, if the network needs one, is the wrapped function's business
(``schedules.ddpm_timesteps`` lists the timesteps of a grid).

Rectified-flow networks (SD3, Flux, Wan: x = (1 - s) x0 + s eps, s in [0, 1]) keep the flow
latent and s: ``denoiser_from_flow`` (velocity v = eps - x0, what these transformers predict),
``denoiser_from_flow_x0`` and ``denoiser_from_flow_eps`` give ``model(x, s) -> x0`` in the flow
convention, for the flow samplers (``sample_flow_euler``, ``sample_flow_dpmpp_2m``) and the
k-diffusion wrapper with ``convention="flow"`` (ComfyUI's "CONST" models).
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

__all__ = [
    "Denoiser",
    "denoiser_from_eps",
    "denoiser_from_v",
    "denoiser_from_x0",
    "denoiser_from_flow",
    "denoiser_from_flow_x0",
    "denoiser_from_flow_eps",
]


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


def denoiser_from_flow(network: Network) -> Denoiser:
    """Wrap a velocity network ``network(x, s, **kw) -> v`` (v = eps - x0, rectified flow) as a
    flow-convention denoiser: x0 = x - s * v. Exact at s = 1."""

    def denoise(x: torch.Tensor, sigma: torch.Tensor, **extra_args) -> torch.Tensor:
        return x - _per_row(sigma, x) * network(x, sigma, **extra_args)

    return denoise


def denoiser_from_flow_x0(network: Network) -> Denoiser:
    """Wrap ``network(x, s, **kw) -> x0`` (a flow model predicting the clean sample) as a denoiser."""

    def denoise(x: torch.Tensor, sigma: torch.Tensor, **extra_args) -> torch.Tensor:
        return network(x, sigma, **extra_args)

    return denoise


def denoiser_from_flow_eps(network: Network) -> Denoiser:
    """Wrap ``network(x, s, **kw) -> eps`` (a flow model predicting the noise) as a denoiser:
    x0 = (x - s eps) / (1 - s). At s = 1 the latent IS the noise and an eps prediction says nothing
    about x0, so a grid starting at s = 1 is refused (start below 1)."""

    def denoise(x: torch.Tensor, sigma: torch.Tensor, **extra_args) -> torch.Tensor:
        if bool((sigma >= 1).any()):
            raise ValueError("denoiser_from_flow_eps: at s = 1 an eps prediction gives no x0; start the grid below s = 1")
        s = _per_row(sigma, x)
        return (x - s * network(x, sigma, **extra_args)) / (1 - s)

    return denoise
