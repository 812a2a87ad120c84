"""``FixedMask``: replay a given compute mask (baselines, oracles, calibrated schedules)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .base import SkipPolicy
from .kernel_controller import KernelController
from .reuse import Reuse, make_reuse

__all__ = ["FixedMask"]


@dataclass(frozen=True, eq=False)
class FixedMask(SkipPolicy):
    """Replay a given compute mask: ``mask[k]`` (or ``mask[b, k]``) says whether call k runs.

    For baselines (uniform stride) and oracles (the greedy optimal path). Shape [N] applies to
    every row; [B, N] gives each row its own path. Call 0 must compute (there is nothing to reuse).
    ``reuse``: what skipped calls get (``"copy"`` or e.g. ``Extrapolate(order=1)``).
    """

    mask: torch.Tensor | np.ndarray | list = field(repr=False)
    reuse: Reuse | str = "copy"

    shardable = True  # its only sum is the NaN/Inf count: a NaN in one shard stops every process

    def __post_init__(self) -> None:
        m = torch.as_tensor(np.asarray(self.mask))
        if m.dtype != torch.bool:
            if not torch.all((m == 0) | (m == 1)):
                raise ValueError("mask must be boolean (or 0/1)")
            m = m.bool()
        if m.ndim not in (1, 2) or m.shape[-1] < 1:
            raise ValueError(f"mask must be shaped [N] or [B, N], got {tuple(m.shape)}")
        if not bool(m[..., 0].all()):
            raise ValueError("mask[..., 0] must be True: the first call has no prediction to reuse")
        object.__setattr__(self, "mask", m.cpu())
        make_reuse(self.reuse)

    def start(self, x: torch.Tensor, num_steps: int, sampler, sigmas: torch.Tensor | None = None) -> KernelController:
        B = x.shape[0]
        if self.mask.shape[-1] != num_steps:
            raise ValueError(f"mask has {self.mask.shape[-1]} steps, the sigmas give {num_steps}")
        if self.mask.ndim == 2 and self.mask.shape[0] not in (1, B):
            raise ValueError(f"mask has {self.mask.shape[0]} rows, x has batch size {B}")
        fixed = self.mask.expand(B, num_steps).numpy()
        return KernelController(x, num_steps, None, None, None, fixed=fixed, reuse=self.reuse)
