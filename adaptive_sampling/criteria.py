"""Skip policies: when may a sampler reuse the previous noise prediction instead of calling the model?

A policy is an immutable description (``ThirdOrder``, ``FixedMask``). ``policy.start(...)``
makes a ``SkipController`` holding the state of ONE sampling call; the controller sees the
latent entering each step and answers which batch rows call the model. All arithmetic of the
third-order rule lives in ``kernels.skip_stats`` (one dispatch, torch or Triton); this module
only wires parameters, history and bookkeeping.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np
import torch


__all__ = ["SkipPolicy", "ThirdOrder", "FixedMask", "SkipController", "default_space"]

Space = Literal["vp", "ve"]

# Which latent the reference pipelines measured (SPEC.md): diffusers' DDIM and multistep/singlestep
# DPM-Solver schedulers hold the variance-preserving latent; its Euler, Heun, LMS, KDPM2 and
# DPM-Solver SDE (k-diffusion ports) hold the variance-exploding one. k-diffusion sampler names
# map to the diffusers scheduler of the same solver.
_VP_SAMPLERS = {"ddim", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde", "dpmpp_2s_ancestral"}


def default_space(sampler: str) -> Space:
    """The space the reference code measured latents in for ``sampler`` (``sample_`` prefix optional)."""
    name = sampler.removeprefix("sample_")
    return "vp" if name in _VP_SAMPLERS else "ve"


class SkipPolicy(Protocol):
    """Anything with ``start`` can be passed as ``skip=`` to the samplers."""

    def start(self, x: torch.Tensor, num_steps: int, sampler: str) -> "SkipController": ...


def _check_int(name: str, value, minimum: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class ThirdOrder:
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
    space: ``"vp"`` measures on x / sqrt(1 + sigma^2), ``"ve"`` on x itself; ``None`` takes
        what the reference measured for that sampler (VP for DDIM and DPM-Solver++, VE for Euler).
    reference_cap_bug: reproduce the reference code's off-by-one in ``max_skip_steps`` (the cap
        is only checked once more than 4 decisions exist, so the first skip run can reach 5
        whatever ``max_skips`` is). Off by default: the cap holds from the first run. Use it only
        to compare masks bit for bit with the authors' code.
    backend: ``"auto" | "torch" | "triton"`` for the kernel (``None``: ``$ADAPTIVE_SAMPLING_BACKEND``,
        else auto).

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

    def __post_init__(self) -> None:
        if not isinstance(self.delta, (int, float)) or isinstance(self.delta, bool) or not math.isfinite(self.delta):
            raise ValueError(f"delta must be a finite number, got {self.delta!r}")
        if self.delta < 0:
            raise ValueError(f"delta must be >= 0, got {self.delta!r}")
        _check_int("max_skips", self.max_skips, 0)
        _check_int("warmup", self.warmup, 4)
        if self.criterion not in ("reference", "paper"):
            raise ValueError(f"criterion must be 'reference' or 'paper', got {self.criterion!r}")
        if self.space not in (None, "vp", "ve"):
            raise ValueError(f"space must be 'vp', 've' or None, got {self.space!r}")
        if self.backend not in (None, "auto", "torch", "triton"):
            raise ValueError(f"backend must be 'auto', 'torch', 'triton' or None, got {self.backend!r}")

    def start(self, x: torch.Tensor, num_steps: int, sampler: str) -> "SkipController":
        from .kernels import skip_stats as ks

        space = self.space or default_space(sampler)
        rule = ks.SkipRule(
            criterion=ks.REFERENCE if self.criterion == "reference" else ks.PAPER,
            delta=float(self.delta),
            max_skips=int(self.max_skips),
            warmup=int(self.warmup),
            per_sample=self.per_sample,
            vp=space == "vp",
            reference_cap_bug=self.reference_cap_bug,
        )
        return SkipController(x, num_steps, rule, space, self.backend)


@dataclass(frozen=True, eq=False)
class FixedMask:
    """Replay a given compute mask: ``mask[k]`` (or ``mask[b, k]``) says whether call k runs.

    For baselines (uniform stride) and oracles (the greedy optimal path). Shape [N] applies to
    every row; [B, N] gives each row its own path. Call 0 must compute (there is nothing to reuse).
    """

    mask: torch.Tensor | np.ndarray | list = field(repr=False)

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

    def start(self, x: torch.Tensor, num_steps: int, sampler: str) -> "SkipController":
        B = x.shape[0]
        if self.mask.shape[-1] != num_steps:
            raise ValueError(f"mask has {self.mask.shape[-1]} steps, the sigmas give {num_steps}")
        if self.mask.ndim == 2 and self.mask.shape[0] not in (1, B):
            raise ValueError(f"mask has {self.mask.shape[0]} rows, x has batch size {B}")
        return SkipController(x, num_steps, None, None, None, fixed=self.mask.expand(B, num_steps).numpy())


class SkipController:
    """The decision state of one sampling call (made by a policy's ``start``; never shared).

    ``decide(k, x, sigma)`` observes the latent x entering call k (at noise level ``sigma``, [B])
    and returns a host bool array: which rows call the model. That costs exactly one
    device-to-host read (the flag bytes) per step; everything else stays on the device.
    """

    def __init__(
        self,
        x: torch.Tensor,
        num_steps: int,
        rule,
        space: Space | None,
        backend: str | None,
        fixed: np.ndarray | None = None,
    ) -> None:
        from .kernels import skip_stats as ks

        self._ks = ks
        self.rule = rule if rule is not None else ks.SkipRule(criterion=ks.NONE)
        self.space = space
        self.fixed = fixed
        self.backend = ks.resolve_backend(x.device, backend)
        self.num_steps = num_steps
        B = x.shape[0]
        self.state = ks.SkipState.new(x, num_steps, self.rule.delta)
        self.computed = np.zeros((B, num_steps), dtype=bool)
        self.capped = np.zeros((B, num_steps), dtype=bool)
        self._run = np.zeros(B, dtype=np.int64)  # host copy of the skip counter, for `capped`
        self._history: list[tuple[torch.Tensor, torch.Tensor]] = []  # newest first, bounded

    @property
    def can_skip(self) -> bool:
        return self.fixed is not None or self.rule.criterion != self._ks.NONE

    @torch.no_grad()
    def _observe(self, step: int, x: torch.Tensor, sigma: torch.Tensor) -> np.ndarray:
        """Push x into the bounded history and run the kernel; returns the host flag bytes.
        Raises ``NonFiniteLatent`` when x holds NaN/Inf."""
        self._history.insert(0, (x, sigma))
        del self._history[self.rule.history :]
        latents, sigmas = zip(*self._history)
        flags = self._ks.skip_update(latents, sigmas, self.state, step, self.rule, self.backend).cpu().numpy()
        bad = flags & self._ks.FLAG_NONFINITE
        if bad.any():
            raise NonFiniteLatent(step, np.flatnonzero(bad))
        return flags

    def decide(self, step: int, x: torch.Tensor, sigma: torch.Tensor) -> np.ndarray:
        """Rows that call the model at call ``step``. Raises ``NonFiniteLatent`` on NaN/Inf in x."""
        if step == 0:  # the initial noise is not part of the history (checked by the caller)
            compute = np.ones(x.shape[0], dtype=bool)
        else:
            flags = self._observe(step, x, sigma)
            compute = (flags & self._ks.FLAG_COMPUTE).astype(bool)
            if self.fixed is not None:
                compute = self.fixed[:, step].copy()
            elif self.rule.criterion != self._ks.NONE and step >= self.rule.warmup:
                window, active = self._ks.cap_window(step, self.rule)
                self.capped[:, step] = active & (self._run >= window)
        self._run = np.where(compute, 0, self._run + 1)
        self.computed[:, step] = compute
        return compute

    def finish(self, x: torch.Tensor, sigma: torch.Tensor) -> None:
        """Observe the final latent (stats and NaN check; no decision)."""
        self._observe(self.num_steps, x, sigma)


class NonFiniteLatent(FloatingPointError):
    """The latent entering call ``step`` (produced by step ``step - 1``) holds NaN or Inf."""

    def __init__(self, step: int, rows: np.ndarray) -> None:
        self.step, self.rows = step, rows
        super().__init__(f"latent produced by step {step - 1} holds NaN/Inf in batch rows {rows.tolist()}")
