"""The controller behind ``ThirdOrder`` and ``FixedMask``: a bounded latent history driven
through the fused skip kernel (``kernels.skip_stats``), whose flag bytes are the one
device-to-host read per step (decision + NaN/Inf check of the latent).

All arithmetic of the third-order rule lives in the kernel module (one dispatch, torch or
Triton); this module only wires parameters, history and bookkeeping.

Across processes (``adaptive_sampling.integrations.distributed``): ``use_collective`` makes every update run
the kernel's two stages apart, ``skip_partials`` (per-sample sums of this process's elements),
the collective (all-reduce over the shards of a sharded latent; pooling over a data-parallel
group in batch mode), then ``skip_decide`` on the completed sums: every process then decides from
the same bits. Without a collective (one process) the fused ``skip_update`` runs, unchanged.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import Controller, NonFiniteLatent
from .reuse import Reuse

__all__ = ["KernelController"]


class KernelController(Controller):
    """The decision state of one sampling call (made by a policy's ``start``; never shared).

    ``decide(k, x, sigma)`` observes the latent x entering call k (at noise level ``sigma``, [B])
    and returns a host bool array: which rows call the model. That costs exactly one
    device-to-host read (the flag bytes) per step; everything else stays on the device.
    ``rule=None`` runs the kernel for its NaN check only; ``fixed`` [B, N] then replays a mask.
    """

    def __init__(
        self,
        x: torch.Tensor,
        num_steps: int,
        rule,
        space: str | None,
        backend: str | None,
        fixed: np.ndarray | None = None,
        reuse: Reuse | str = "copy",
    ) -> None:
        from ..kernels import skip_stats as ks

        super().__init__(x, num_steps, reuse)
        self._ks = ks
        self.rule = rule if rule is not None else ks.SkipRule(criterion=ks.NONE)
        self.space = space
        self.fixed = fixed
        self.backend = ks.resolve_backend(x.device, backend)
        B = x.shape[0]
        self.state = ks.SkipState.new(x, num_steps, self.rule.delta)
        self.computed = np.zeros((B, num_steps), dtype=bool)
        self.capped = np.zeros((B, num_steps), dtype=bool)
        self._run = np.zeros(B, dtype=np.int64)  # host copy of the skip counter, for `capped`
        self._history: list[tuple[torch.Tensor, torch.Tensor]] = []  # newest first, bounded

    collective = None  # set by integrations.distributed; None: this process decides alone

    def use_collective(self, collective) -> None:
        """Complete the per-sample sums through ``collective`` before deciding (see the module docstring)."""
        self.collective = collective

    def _update(self, latents, sigmas, step: int) -> torch.Tensor:
        """One kernel update of the state; returns the flag bytes (on the latents' device)."""
        ks, c = self._ks, self.collective
        if c is None:
            return ks.skip_update(latents, sigmas, self.state, step, self.rule, self.backend)
        sums = c.sample_sums(ks.skip_partials(latents, sigmas, self.state, self.rule, self.backend), step)
        pooled = None if self.rule.per_sample else c.batch_sums(sums, step)
        return ks.skip_decide(sums, self.state, step, self.rule, len(latents), c.numel, pooled, self.backend)

    @property
    def can_skip(self) -> bool:  # type: ignore[override]
        return self.fixed is not None or self.rule.criterion != self._ks.NONE

    @torch.no_grad()
    def _observe(self, step: int, x: torch.Tensor, sigma: torch.Tensor, with_score: bool = False):
        """Push x into the bounded history and run the kernel; returns the host flag bytes (and,
        with ``with_score``, the criterion value of this step, read in the same transfer).
        Raises ``NonFiniteLatent`` when x holds NaN/Inf."""
        self._history.insert(0, (x, sigma))
        del self._history[self.rule.history :]
        latents, sigmas = zip(*self._history)
        flags = self._update(latents, sigmas, step)
        if with_score:
            packed = torch.stack([flags.to(self.state.scores.dtype), self.state.scores[step]]).cpu().numpy()
            flags, score = packed[0].astype(np.int64), packed[1].astype(np.float64)
        else:
            flags = flags.cpu().numpy()
        bad = flags & self._ks.FLAG_NONFINITE
        if bad.any():
            raise NonFiniteLatent(step, np.flatnonzero(bad))
        return (flags, score) if with_score else flags

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

    def signals(self) -> dict[str, np.ndarray]:
        return {
            "scores": self.state.scores.T.cpu().numpy(),
            "capped": self.capped.copy(),
            "stats": self.state.stats.transpose(0, 1).cpu().numpy(),
        }
