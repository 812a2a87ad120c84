"""``ThirdOrder``: the AdaptiveDiffusion skip rule (Ye et al., NeurIPS 2024), both as the authors'
code implements it ("reference") and as the paper writes it ("paper"). See docs/method.md."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch

from ..checks import check_int
from .base import SkipPolicy, resolve
from .kernel_controller import KernelController
from .reuse import Reuse, make_reuse

__all__ = ["ThirdOrder", "Space"]

Space = Literal["vp", "ve", "flow"]


@dataclass(frozen=True)
class ThirdOrder(SkipPolicy):
    """The AdaptiveDiffusion skip rule (Ye et al., NeurIPS 2024).

    After the latent x_i is produced (i >= warmup - 1), the next model call is skipped when the
    trajectory is locally smooth:

    * ``criterion="reference"`` (the authors' code): skip iff
      ``|(d_i + d_{i-2}) / 2 - d_{i-1}| <= delta * d_{i-1}``, with ``d_k = mean|x_k - x_{k-1}|``;
    * ``criterion="paper"`` (the paper's formula): skip iff
      ``||x_i - 3x_{i-1} + 3x_{i-2} - x_{i-3}|| < delta * ||x_i - x_{i-1}||``.

    Guards: the first ``warmup`` calls always run (at least 4: the rule spans four latents);
    after ``max_skips`` consecutive skips the next call is forced; a NaN/Inf latent never skips.

    per_sample: each batch row decides for itself (default); ``False`` reproduces the
        reference's single decision for the whole batch (sums pooled over all rows).
    space: ``"vp"`` measures on x / sqrt(1 + sigma^2), ``"ve"`` on x itself, ``"flow"`` on the
        rectified-flow latent x / (1 + sigma); ``None`` takes the
        sampler's registry entry (``Sampler.space``: what the reference measured, VP for DDIM and
        DPM-Solver++, VE for Euler; the latent the scheduler holds under the diffusers hook).
    reference_cap_bug: reproduce the reference code's off-by-one in ``max_skip_steps`` (the cap
        is only checked once more than 4 decisions exist, so the first skip run can reach 5
        whatever ``max_skips`` is). Off by default: the cap holds from the first run. Use it only
        to compare masks bit for bit with the authors' code.
    backend: ``"auto" | "torch" | "triton"`` for the kernel (``None``: ``$ADAPTIVE_SAMPLING_BACKEND``,
        else auto).
    reuse: what a skipped call gets: ``"copy"`` (the paper's method: the last eps as is) or a
        strategy such as ``Extrapolate(order=1)``.

    Decision arithmetic runs in float32 (float64 for float64 latents).
    """

    delta: float = 0.01
    max_skips: int = 4
    warmup: int = 4
    criterion: Literal["reference", "paper"] = "reference"
    per_sample: bool = True
    space: Space | None = None
    reference_cap_bug: bool = False
    backend: str | None = None
    reuse: Reuse | str = "copy"

    shardable = True
    scored = True

    def __post_init__(self) -> None:
        if not isinstance(self.delta, (int, float)) or isinstance(self.delta, bool) or not math.isfinite(self.delta):
            raise ValueError(f"delta must be a finite number, got {self.delta!r}")
        if self.delta < 0:
            raise ValueError(f"delta must be >= 0, got {self.delta!r}")
        check_int("max_skips", self.max_skips, 0)
        check_int("warmup", self.warmup, 4)
        if self.criterion not in ("reference", "paper"):
            raise ValueError(f"criterion must be 'reference' or 'paper', got {self.criterion!r}")
        if self.space not in (None, "vp", "ve", "flow"):
            raise ValueError(f"space must be 'vp', 've' or None, or 'flow' (the rectified-flow latent), got {self.space!r}")
        if self.backend not in (None, "auto", "torch", "triton"):
            raise ValueError(f"backend must be 'auto', 'torch', 'triton' or None, got {self.backend!r}")
        make_reuse(self.reuse)

    def measured_space(self, sampler) -> str:
        """The latent this rule measures under ``sampler`` (a name or registry entry)."""
        return self.space or resolve(sampler).space

    def kernel_rule(self, sampler, max_skips: int | None = None):
        """The kernel's static parameters for ``sampler`` (``max_skips`` overridable, for ``Budget``)."""
        from ..kernels import skip_stats as ks

        return ks.SkipRule(
            criterion=ks.REFERENCE if self.criterion == "reference" else ks.PAPER,
            delta=float(self.delta),
            max_skips=int(self.max_skips if max_skips is None else max_skips),
            warmup=int(self.warmup),
            per_sample=self.per_sample,
            vp=self.measured_space(sampler) == "vp",
            flow=self.measured_space(sampler) == "flow",
            reference_cap_bug=self.reference_cap_bug,
        )

    def start(self, x: torch.Tensor, num_steps: int, sampler, sigmas: torch.Tensor | None = None) -> KernelController:
        return KernelController(x, num_steps, self.kernel_rule(sampler), self.measured_space(sampler), self.backend,
                                reuse=self.reuse)  # fmt: skip

    def scorer(self, x: torch.Tensor, num_steps: int, sampler, sigmas: torch.Tensor | None = None) -> "ThirdOrderScorer":
        """The kernel-backed rule as a scorer: score = criterion value / delta, the kernel's own cap
        off (the composite applies the guards); flags and score in one read."""
        return ThirdOrderScorer(self, x, num_steps, sampler)

    def with_reuse(self, reuse: Reuse | str) -> "ThirdOrder":
        return replace(self, reuse=reuse)


class ThirdOrderScorer(KernelController):
    """``ThirdOrder.scorer``: the kernel controller with the cap disabled, scoring each step."""

    def __init__(self, rule: ThirdOrder, x: torch.Tensor, num_steps: int, sampler) -> None:
        super().__init__(x, num_steps, rule.kernel_rule(sampler, max_skips=num_steps), rule.measured_space(sampler),
                         rule.backend, reuse=rule.reuse)  # fmt: skip
        self.delta = float(rule.delta)

    def score(self, step: int, x: torch.Tensor, sigma: torch.Tensor) -> np.ndarray:
        _, score = self._observe(step, x, sigma, with_score=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            return score / self.delta if self.delta > 0 else np.full(x.shape[0], np.inf)

    def observe(self, step: int, x: torch.Tensor, sigma: torch.Tensor) -> None:
        """Warm-up steps: the kernel still needs the latent for its difference history."""
        if step > 0:
            self._observe(step, x, sigma)
