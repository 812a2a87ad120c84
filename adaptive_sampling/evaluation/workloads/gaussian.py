"""Gaussian data N(mu_y, s^2 I): the exact denoiser and the exact probability-flow ODE solution.

For x = x0 + sigma * n with x0 ~ N(mu, s^2 I), the optimal denoiser is
``D(x, sigma) = mu + s^2 / (s^2 + sigma^2) * (x - mu)`` and the ODE dx/dsigma = (x - D) / sigma
moves ``x - mu`` proportionally to sqrt(s^2 + sigma^2). Class-conditional: row b uses
``mu[y[b]]`` where ``y`` comes in ``extra_args`` (a batch-leading tensor, so the samplers'
row slicing is exercised).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["GaussianWorkload"]


@dataclass
class GaussianWorkload:
    """``means``: [K, *shape] class means; ``std``: the data's standard deviation s."""

    means: torch.Tensor
    std: float = 0.5

    @classmethod
    def make(cls, num_classes: int = 3, shape=(4, 8, 8), std: float = 0.5, seed: int = 0, dtype=torch.float64):
        g = torch.Generator().manual_seed(seed)
        return cls(torch.randn((num_classes, *shape), generator=g, dtype=dtype), std)

    def _mu(self, y: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        means = self.means.to(device=x.device, dtype=x.dtype)
        return means[0].expand_as(x) if y is None else means[y.to(means.device)]

    def denoiser(self, x: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The exact denoiser (k-diffusion convention)."""
        s2 = self.std**2
        sig = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        mu = self._mu(y, x)
        return mu + s2 / (s2 + sig * sig) * (x - mu)

    def ode_solution(self, x: torch.Tensor, sigma_from: float, sigma_to: float, y: torch.Tensor | None = None):
        """Exact solution of the probability-flow ODE from ``sigma_from`` to ``sigma_to``."""
        s2 = self.std**2
        mu = self._mu(y, x)
        return mu + ((s2 + sigma_to**2) / (s2 + sigma_from**2)) ** 0.5 * (x - mu)

    def noise(self, batch: int, sigma_max: float, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        shape = (batch, *self.means.shape[1:])
        return torch.randn(shape, generator=g, dtype=self.means.dtype) * sigma_max
