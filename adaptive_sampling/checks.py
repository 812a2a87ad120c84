"""Argument checks shared by the public entry points: each failure names the argument and what was expected."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["check_int", "check_number", "check_latent", "as_sigmas", "check_sigmas"]


def check_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum or (
        maximum is not None and value > maximum
    ):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be an int {bound}, got {value!r}")


def check_number(name: str, value: Any, minimum: float = 0.0, strict: bool = False) -> None:
    ok = isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)
    if not ok or not np.isfinite(value) or value < minimum or (strict and value == minimum):
        bound = f"> {minimum}" if strict else f">= {minimum}"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")


def check_latent(x: Any, name: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = f"a {x.dtype} tensor" if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"{name} must be a floating-point torch.Tensor, got {got}")
    if x.ndim < 2 or x.shape[0] < 1 or x.numel() == 0:
        raise ValueError(f"{name} must be shaped [batch, ...] with at least one data dimension, got {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} holds NaN or Inf")
    return x


def as_sigmas(sigmas: Any, name: str = "sigmas") -> torch.Tensor:
    """A sigma schedule as a tensor: tensors pass unchanged, lists / tuples / numpy arrays of
    numbers become float64 CPU tensors; anything else is a TypeError naming the argument."""
    if isinstance(sigmas, torch.Tensor):
        return sigmas
    if isinstance(sigmas, (list, tuple, np.ndarray)):
        try:
            return torch.as_tensor(np.asarray(sigmas, dtype=np.float64))
        except (TypeError, ValueError) as e:
            raise TypeError(f"{name} must be a 1-D tensor (or list / numpy array) of noise levels") from e
    raise TypeError(f"{name} must be a 1-D tensor (or list / numpy array) of noise levels, got {type(sigmas).__name__}")


def check_sigmas(sigmas: Any, name: str = "sigmas") -> torch.Tensor:
    """Validate a sigma schedule; returns a float64 CPU copy (one read at the start of a call)."""
    sigmas = as_sigmas(sigmas, name)
    if sigmas.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(sigmas.shape)}")
    if len(sigmas) < 2:
        raise ValueError(f"{name} needs at least 2 entries (one step), got {len(sigmas)}")
    host = sigmas.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(host).all()):
        raise ValueError(f"{name} holds NaN or Inf")
    if not bool((host[1:] < host[:-1]).all()):
        raise ValueError(f"{name} must be strictly decreasing")
    if not bool((host[:-1] > 0).all()) or host[-1] < 0:
        raise ValueError(f"{name} must be positive (only the last may be 0)")
    return host
