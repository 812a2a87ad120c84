"""sklearn's ``load_digits`` (1797 8x8 images, 10 classes) and its exact, optimal denoiser.

For data that is a finite set {x_n} (equal weights), the MMSE denoiser of x = x_n + sigma * noise
is the posterior-weighted mean of the points:

    D(x, sigma) = sum_n w_n x_n,   w = softmax_n(-||x - x_n||^2 / (2 sigma^2))

Conditioning on a class restricts the sum to that class's images. The denoiser is exact for the
set, so it checks sampler mechanics without training; but it memorises (at the end of sampling it
returns one of the training images), so it cannot rank skip policies by quality (docs/method.md,
"Exact workloads memorise"): use ``workloads.learned`` for that.

sklearn is imported only inside :func:`load_digits_data`.
"""

from __future__ import annotations

import torch

__all__ = ["NUM_CLASSES", "NULL_CLASS", "load_digits_data", "DigitsOptimalDenoiser"]

NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # a label of 10 means "no class" (unconditional), as in workloads.learned


def load_digits_data(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits: images [1797, 1, 8, 8] scaled to [-1, 1] (pixel / 8 - 1) and labels [1797] long."""
    from sklearn.datasets import load_digits  # lazy: sklearn is heavy and optional

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float64).div(8.0).sub(1.0)
    labels = torch.as_tensor(digits.target, dtype=torch.long)
    return images.unsqueeze(1).to(dtype), labels


class DigitsOptimalDenoiser:
    """The exact denoiser of the digits set, class-conditional, with classifier-free guidance.

    ``denoiser(x, sigma, y=None, cond_scale=1.0)`` follows k-diffusion's convention: x [B, 1, 8, 8]
    in VE scale, sigma [B] (or a scalar), ``y`` a [B] long tensor of classes (row b uses only class
    y[b]'s images; a label of ``NULL_CLASS`` or ``y=None`` uses every image). With guidance the
    result is ``D_uncond + cond_scale * (D_cond - D_uncond)``, both branches from one distance
    matrix; ``cond_scale == 1`` returns the conditional denoiser exactly.

    Distances, log-sum-exp weights and the weighted mean are computed in float64 whatever the
    input dtype (the logits are huge at small sigma), and the result is cast back to x's dtype.
    """

    def __init__(self, images: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> None:
        if images is None or labels is None:
            images, labels = load_digits_data(torch.float64)
        self.shape = tuple(images.shape[1:])
        self.points = images.reshape(images.shape[0], -1).to(torch.float64)  # [N, D]
        self.labels = labels.to(torch.long)
        self.sq_norms = self.points.pow(2).sum(1)  # [N]

    def to(self, device: torch.device | str) -> "DigitsOptimalDenoiser":
        """Move the data set to ``device`` (returns self)."""
        self.points, self.labels, self.sq_norms = (t.to(device) for t in (self.points, self.labels, self.sq_norms))
        return self

    def _sq_dists(self, flat: torch.Tensor) -> torch.Tensor:
        """||x_b - x_n||^2 [B, N], clamped at 0 against cancellation (float64)."""
        d = flat.pow(2).sum(1, keepdim=True) - 2.0 * flat @ self.points.T + self.sq_norms
        return d.clamp_min_(0.0)

    def _posterior_mean(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits, dim=1) @ self.points

    def __call__(
        self, x: torch.Tensor, sigma: torch.Tensor | float, y: torch.Tensor | None = None, cond_scale: float = 1.0
    ) -> torch.Tensor:
        batch = x.shape[0]
        flat = x.reshape(batch, -1).to(self.points.dtype)
        if flat.shape[1] != self.points.shape[1]:
            raise ValueError(f"x must be shaped [B, {', '.join(map(str, self.shape))}], got {tuple(x.shape)}")
        sig = torch.as_tensor(sigma, dtype=torch.float64, device=flat.device).reshape(-1)
        sig = sig.expand(batch) if sig.numel() == 1 else sig
        logits = self._sq_dists(flat) / (-2.0 * sig * sig)[:, None]  # [B, N]
        if y is None:
            out = self._posterior_mean(logits)
        else:
            y = y.to(device=flat.device, dtype=torch.long).reshape(-1)
            if y.shape[0] != batch:
                raise ValueError(f"y must hold one label per row ({batch}), got shape {tuple(y.shape)}")
            unconditional = y == NULL_CLASS
            keep = (self.labels[None, :] == y[:, None]) | unconditional[:, None]  # [B, N]
            cond = self._posterior_mean(logits.masked_fill(~keep, float("-inf")))
            if cond_scale == 1.0:
                out = cond
            else:
                uncond = self._posterior_mean(logits)
                out = uncond + cond_scale * (cond - uncond)
        return out.reshape(x.shape).to(x.dtype)
