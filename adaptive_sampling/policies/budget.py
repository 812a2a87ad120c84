"""``Budget``: exactly ``nfe`` model calls per sample, allocated online by a ranking rule.

The rule (``LocalError`` by default, ``ThirdOrder``, or any policy that declares ``scored``:
its controllers give each decided step a score in units of the rule's own threshold, larger:
riskier to skip). Per row, at call k with ``r`` calls left and ``S`` steps left (k included):

* ``r == 0``: skip (the budget is spent);
* ``r >= S``: compute (the reserve: every remaining step must compute to spend the budget);
* ``max_skips`` consecutive skips (the rule's own guard, if it declares one): compute;
* otherwise compute iff the score ranks in the top ``r / S`` of the row's last ``window``
  scores (the current one included): a quantile threshold that paces the spending to the
  remaining budget and follows the scores' drift along the schedule.

Warm-up calls (the rule's ``warmup``) count towards the budget. So NFE per sample is exactly
``nfe`` for every ``nfe`` in ``[warmup, N]``, and identical rows take identical paths (all
arithmetic is per row). One device-to-host read per step (the rule's score and NaN flag).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..checks import check_int
from .base import Controller, SkipPolicy, check_policy
from .local_error import LocalError

__all__ = ["Budget", "BudgetController"]


@dataclass(frozen=True)
class Budget(SkipPolicy):
    """Exactly ``nfe`` model calls per sample (warm-up included), placed by ``rule``'s scores.

    nfe: calls per sample, ``rule.warmup <= nfe <= N`` (N checked when sampling starts).
    rule: a scored policy, ``LocalError(...)`` (default) or ``ThirdOrder(...)`` or a third-party
        one; its ``warmup``, ``max_skips``, ``reuse`` and ``per_sample`` apply, its threshold only
        scales the scores.
    window: how many recent scores the quantile threshold looks at (>= 1).
    """

    nfe: int
    rule: SkipPolicy = field(default_factory=LocalError)
    window: int = 8

    def __post_init__(self) -> None:
        check_policy(self.rule, "rule")
        if not self.rule.scored:
            raise ValueError(
                f"rule must be a scored policy (one whose controllers rank steps: LocalError, ThirdOrder, or a "
                f"policy declaring scored = True), got {self.rule!r}"
            )
        check_int("nfe", self.nfe, self.rule.warmup)
        check_int("window", self.window, 1)

    @property
    def warmup(self) -> int:  # type: ignore[override]
        return self.rule.warmup

    @property
    def per_sample(self) -> bool:  # type: ignore[override]
        return self.rule.per_sample

    @property
    def shardable(self) -> bool:  # type: ignore[override]
        return self.rule.shardable

    def start(self, x: torch.Tensor, num_steps: int, sampler, sigmas: torch.Tensor | None = None):
        if self.nfe > num_steps:
            raise ValueError(f"nfe must be in [{self.rule.warmup}, {num_steps}] for {num_steps} steps, got {self.nfe}")
        return BudgetController(self, self.rule.scorer(x, num_steps, sampler, sigmas=sigmas), x, num_steps)


class BudgetController(Controller):
    def __init__(self, policy: Budget, scorer: Controller, x: torch.Tensor, num_steps: int) -> None:
        self.batch, self.num_steps = x.shape[0], num_steps
        self.policy, self.scorer = policy, scorer
        self.rule = policy.rule
        self.space = scorer.space
        B = x.shape[0]
        self.max_skips = num_steps if self.rule.max_skips is None else self.rule.max_skips
        self.used = np.zeros(B, dtype=np.int64)
        self.run = np.zeros(B, dtype=np.int64)
        self.recent = np.full((B, policy.window), np.nan)
        self.scores = np.full((B, num_steps), np.nan)
        self.forced = np.zeros((B, num_steps), dtype=np.int8)  # 1 reserve, 2 spent, 3 max_skips

    def use_collective(self, collective) -> None:
        """Across processes: the scorer's sums go through ``collective``; the budget logic itself
        runs on the host from the (then identical) scores."""
        self.scorer.use_collective(collective)

    def reuse(self, step: int, sigma: torch.Tensor) -> torch.Tensor:
        return self.scorer.reuse(step, sigma)

    def record(self, step, sigma, eps, rows) -> None:
        self.scorer.record(step, sigma, eps, rows)

    def decide(self, step: int, x: torch.Tensor, sigma: torch.Tensor) -> np.ndarray:
        B = x.shape[0]
        if step < self.rule.warmup:
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
            capped = self.run >= self.max_skips
            compute |= capped
            reserve, spent = left >= steps_left, left <= 0
            compute = (compute | reserve) & ~spent
            self.forced[:, step] = np.select([spent, reserve, capped], [2, 1, 3], 0)
        self.used += compute
        self.run = np.where(compute, 0, self.run + 1)
        self.scorer.note(compute)
        return compute

    def finish(self, x: torch.Tensor, sigma: torch.Tensor) -> None:
        self.scorer.finish(x, sigma)

    def signals(self) -> dict[str, np.ndarray]:
        return {"scores": self.scores.copy(), "capped": self.forced == 3, "forced": self.forced.copy()}
