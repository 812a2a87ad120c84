"""Image-quality metrics against a reference output, per sample: PSNR, SSIM, max-abs error.

All take tensors shaped [B, ...] (images [B, C, H, W] for SSIM) and return float64 numpy
arrays of length B. ``data_range`` is the width of the value range (2 for data in [-1, 1]).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["psnr", "ssim", "max_abs_error"]


def _flat(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return a.detach().double().reshape(a.shape[0], -1), b.detach().double().reshape(b.shape[0], -1)


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0, max_db: float = 100.0) -> np.ndarray:
    """10 log10(range^2 / MSE) per sample, capped at ``max_db`` (identical outputs give the cap,
    so means over samples stay finite)."""
    x, y = _flat(a, b)
    mse = ((x - y) ** 2).mean(dim=1).cpu().numpy()
    with np.errstate(divide="ignore"):
        return np.minimum(10 * np.log10(data_range**2 / mse), max_db)


def max_abs_error(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    x, y = _flat(a, b)
    return (x - y).abs().amax(dim=1).cpu().numpy()


def _gaussian_window(size: int, sigma: float, dtype, device) -> torch.Tensor:
    r = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(
    a: torch.Tensor,
    b: torch.Tensor,
    data_range: float = 2.0,
    win_size: int = 7,
    sigma: float | None = 1.5,
) -> np.ndarray:
    """Mean structural similarity (Wang et al. 2004) per sample, channels averaged.

    A win_size x win_size window, Gaussian-weighted (``sigma``) or uniform (``sigma=None``),
    K1 = 0.01, K2 = 0.03, population covariances, "valid" window positions only. With
    ``sigma=None`` this is scikit-image's ``structural_similarity(win_size=..., gaussian_weights=False,
    use_sample_covariance=False)``. Images smaller than the window use the largest odd window
    that fits (8x8 digits: 7x7, i.e. 2x2 window positions).
    """
    if a.ndim != 4 or a.shape != b.shape:
        raise ValueError(f"ssim needs two [B, C, H, W] tensors of one shape, got {tuple(a.shape)}, {tuple(b.shape)}")
    B, C, H, W = a.shape
    win = min(win_size, H - (1 - H % 2), W - (1 - W % 2))
    if win < 3:
        raise ValueError(f"images of {H}x{W} are too small for SSIM")
    x = a.detach().double().reshape(B * C, 1, H, W)
    y = b.detach().double().reshape(B * C, 1, H, W)
    if sigma is None:
        k = torch.full((1, 1, win, win), 1.0 / win**2, dtype=x.dtype, device=x.device)
    else:
        k = _gaussian_window(win, sigma, x.dtype, x.device)[None, None]

    def blur(t):
        return F.conv2d(t, k)

    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx * mx
    syy = blur(y * y) - my * my
    sxy = blur(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return s.reshape(B, C, -1).mean(dim=(1, 2)).cpu().numpy()
