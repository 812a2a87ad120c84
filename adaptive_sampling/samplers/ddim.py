"""DDIM (Song et al. 2021) in VE coordinates: stepper, loop, registry entry."""

from __future__ import annotations

from typing import Callable

import torch

from ..progress import steps
from ..report import SkipReport
from ..runner import Callback, SkipRun
from .euler import to_eps
from .registry import Sampler, register_sampler

__all__ = ["ddim_step", "ancestral_split", "sample_ddim"]


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
    """One DDIM step written in VE coordinates: x' = x0 + sigma_down * eps + sigma_up * noise.

    With ``eta = 0`` this is deterministic DDIM (mathematically an Euler step in VE coordinates).
    With ``eta > 0`` the caller supplies ``noise`` (standard normal, shaped like x), so runs are
    reproducible and the caller owns the random stream.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta!r}")
    eps = to_eps(x, sigma, denoised)
    if eta == 0:
        return denoised + eps * sigma_next
    if noise is None:
        raise ValueError("noise is required when eta > 0 (pass a standard-normal tensor shaped like x)")
    if noise.shape != x.shape:
        raise ValueError(f"noise must have the shape of x {tuple(x.shape)}, got {tuple(noise.shape)}")
    sigma_down, sigma_up = ancestral_split(sigma, sigma_next, eta)
    return denoised + eps * sigma_down + noise * sigma_up


@torch.no_grad()
def sample_ddim(
    model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict | None = None,
    callback: Callback | None = None,
    disable: bool | None = None,
    *,
    skip=None,
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
    run = SkipRun(model, x, sigmas, extra_args, skip, DDIM)
    if eta > 0 and noise_sampler is None:
        noise_sampler = lambda sigma, sigma_next: torch.randn_like(x)  # noqa: E731
    sigmas, s = run.given, run.schedule
    for i in steps(run.num_steps, disable):
        denoised = run.denoise(i, x, run.sigma_rows(i, x))
        run.notify(callback, i, x, denoised)
        noise = noise_sampler(sigmas[i], sigmas[i + 1]) if eta > 0 and s[i + 1] > 0 else None
        x = ddim_step(x, s[i], s[i + 1], denoised, eta if noise is not None else 0.0, noise)
    return x, run.finish(x, run.sigma_rows(-1, x))


DDIM = register_sampler(Sampler("ddim", "vp", sample_ddim, schedulers=("DDIMScheduler",)))
