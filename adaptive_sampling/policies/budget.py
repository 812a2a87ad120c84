"""``Budget``: exactly ``nfe`` model calls per sample, allocated online by a ranking rule.

The rule (``LocalError`` by default, or ``ThirdOrder``) gives each decided step a score in units
of its own threshold (larger: riskier to skip). Per row, at call k with ``r`` calls left and
``S`` steps left (k included):

* ``r == 0``: skip (the budget is spent);
* ``r >= S``: compute (the reserve: every remaining step must compute to spend the budget);
* ``max_skips`` consecutive skips: compute (the rule's own guard);
* otherwise compute iff the score ranks in the top ``r / S`` of the row's last ``window``
  scores (the current one included): a quantile threshold that paces the spending to the
  remaining budget and follows the scores' drift along the schedule.

Warm-up calls count towards the budget. So NFE per sample is exactly ``nfe`` for every
``nfe`` in ``[warmup, N]``, and identical rows take identical paths (all arithmetic is per row).
One device-to-host read per step (the rule's score and NaN flag).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .base import Controller, check_int
from .kernel_controller import KernelController
from .local_error import LocalError, LocalErrorController
from .third_order import ThirdOrder, default_space

__all__ = ["Budget"]


@dataclass(frozen=True)
class Budget:
    """Exactly ``nfe`` model calls per sample (warm-up included), placed by ``rule``'s scores.

    nfe: calls per sample, ``rule.warmup <= nfe <= N`` (N checked when sampling starts).
    rule: ``LocalError(...)`` (default) or ``ThirdOrder(...)``; its ``warmup``, ``max_skips``,
        ``reuse`` and ``per_sample`` apply, its threshold only scales the scores.
    window: how many recent scores the quantile threshold looks at (>= 1).
    """

    nfe: int
    rule: LocalError | ThirdOrder = field(default_factory=LocalError)
    window: int = 8

    def __post_init__(self) -> None:
        if not isinstance(self.rule, (LocalError, ThirdOrder)):
            raise ValueError(f"rule must be a LocalError or ThirdOrder policy, got {self.rule!r}")
        check_int("nfe", self.nfe, self.rule.warmup)
        check_int("window", self.window, 1)

    def start(self, x: torch.Tensor, num_steps: int, sampler: str, sigmas: torch.Tensor | None = None):
        if self.nfe > num_steps:
            raise ValueError(f"nfe must be in [{self.rule.warmup}, {num_steps}] for {num_steps} steps, got {self.nfe}")
        if isinstance(self.rule, LocalError):
            scorer = LocalErrorController(self.rule, x, num_steps, sigmas)
        else:
            scorer = _ThirdOrderScorer(self.rule, x, num_steps, sampler)
        return BudgetController(self, scorer, x, num_steps)


class _ThirdOrderScorer(KernelController):
    """The kernel-backed third-order rule as a scorer: score = criterion value / delta, with the
    kernel's own cap disabled (the budget applies the guards). Flags and score in one read."""

    def __init__(self, rule: ThirdOrder, x: torch.Tensor, num_steps: int, sampler: str) -> None:
        space = rule.space or default_space(sampler)
        super().__init__(x, num_steps, rule.kernel_rule(sampler, max_skips=num_steps), space, rule.backend, reuse=rule.reuse)
        self.delta = float(rule.delta)

    def score(self, step: int, x: torch.Tensor, sigma: torch.Tensor) -> np.ndarray:
        _, score = self._observe(step, x, sigma, with_score=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            return score / self.delta if self.delta > 0 else np.full(x.shape[0], np.inf)

    def observe(self, step: int, x: torch.Tensor, sigma: torch.Tensor) -> None:
        """Warm-up steps: the kernel still needs the latent for its difference history."""
        if step > 0:
            self._observe(step, x, sigma)


class BudgetController(Controller):
    def __init__(self, policy: Budget, scorer, x: torch.Tensor, num_steps: int) -> None:
        self.batch, self.num_steps = x.shape[0], num_steps
        self.policy, self.scorer = policy, scorer
        self.rule = policy.rule
        self.space = getattr(scorer, "space", None)
        B = x.shape[0]
        self.used = np.zeros(B, dtype=np.int64)
        self.run = np.zeros(B, dtype=np.int64)
        self.recent = np.full((B, policy.window), np.nan)
        self.scores = np.full((B, num_steps), np.nan)
        self.forced = np.zeros((B, num_steps), dtype=np.int8)  # 1 reserve, 2 spent, 3 max_skips

    def use_collective(self, collective) -> None:
        """Across processes (``adaptive_sampling.distributed``): the scorer's sums go through
        ``collective``; the budget logic itself runs on the host from the (then identical) scores."""
        self.scorer.use_collective(collective)

    def reuse(self, step: int, sigma: torch.Tensor) -> torch.Tensor:
        return self.scorer.reuse(step, sigma)

    def record(self, step, sigma, eps, rows) -> None:
        self.scorer.record(step, sigma, eps, rows)

    def decide(self, step: int, x: torch.Tensor, sigma: torch.Tensor) -> np.ndarray:
        B = x.shape[0]
        if step < self.rule.warmup:
            if isinstance(self.scorer, _ThirdOrderScorer):
                self.scorer.observe(step, x, sigma)
            compute = np.ones(B, dtype=bool)
        else:
            s = self.scorer.score(step, x, sigma)
            self.scores[:, step] = s
            self.recent = np.concatenate([self.recent[:, 1:], s[:, None]], axis=1)
            left, steps_left = self.policy.nfe - self.used, self.num_steps - step
            rate = left / steps_left
            valid = ~np.isnan(self.recent)
            below = (valid & (self.recent < s[:, None])).sum(axis=1)
            rank = below / np.maximum(valid.sum(axis=1), 1)  # fraction of recent scores below this one
            rank = np.where(np.isnan(s), 1.0, rank)  # an undefined score never argues for skipping
            compute = rank >= 1 - rate
            capped = self.run >= self.rule.max_skips
            compute |= capped
            reserve, spent = left >= steps_left, left <= 0
            compute = (compute | reserve) & ~spent
            self.forced[:, step] = np.select([spent, reserve, capped], [2, 1, 3], 0)
        self.used += compute
        self.run = np.where(compute, 0, self.run + 1)
        if hasattr(self.scorer, "note"):
            self.scorer.note(compute)
        return compute

    def finish(self, x: torch.Tensor, sigma: torch.Tensor) -> None:
        if isinstance(self.scorer, _ThirdOrderScorer):
            self.scorer.finish(x, sigma)

    def signals(self) -> dict[str, np.ndarray]:
        return {"scores": self.scores.copy(), "capped": self.forced == 3, "forced": self.forced.copy()}
