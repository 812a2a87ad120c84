"""``Paced``: exactly K model calls per sample on any grid, the speed knob of ``default_policy``.

K is absolute (``nfe``) or relative (``speedup`` = steps / calls: K = round(N / speedup), halves
rounding up). Each row follows a plan and changes it once, online, from its own error estimate:

* the plan: K calls at a uniform stride over the N steps (``uniform_mask``), every skipped call
  getting a linear eps forecast in log sigma (``Extrapolate(1)``): the pattern that beat fewer
  steps and every online rule we tried on the digits model (docs/budget.md);
* the one online decision, ``lead`` steps before the end: if the row's ``LocalError`` estimate
  (what reusing the forecast would cost, relative to the latent; tracked at every step) has not
  fallen over the last ``window`` steps (mean over them >= ``ratio`` times the mean over the
  ``window`` before), the row's remaining calls are re-planned: uniform over the steps left but
  the last ``tail``, and those ``tail`` steps computed. A rising estimate near the end is what
  the shapes UNet (SD's DDPM grid) shows, where the last steps decide the image (+10 dB there);
  on the digits model it falls, and the row keeps the uniform plan.

So every row spends exactly K calls (the plan has K, the re-plan spends what is left), skip runs
stay as short as the budget allows, and where the calls go follows the row's own estimate.

**Batches** (``align``): per-row decisions save model ROWS, but a step where any row computes still
runs the model (on a GPU a sub-batch costs about a full batch). With ``align=True`` (default) the
batch takes the re-plan decision together (the majority of its rows), so every row follows one
mask and the model runs exactly K times per batch; ``align=False`` lets each row decide alone
(forwards per batch up to K plus the tail window). The report's ``signals["replanned"]`` [B] says
which rows took the tail.

Cost: one ``LocalError`` estimate per step (a few elementwise passes, one host read), the rest on
the host. ``docs/budget.md`` has the designs tried and the measurements behind each choice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..checks import check_int, check_number
from .base import Controller, NonFiniteLatent, SkipPolicy
from .local_error import LocalError, LocalErrorController
from .reuse import Extrapolate, Reuse, make_reuse

__all__ = ["Paced", "budget_for", "stride_mask"]


def budget_for(num_steps: int, nfe: int | None, speedup: float | None) -> int:
    """K for an N-step grid: ``nfe`` itself, or round(N / speedup) with halves rounding up (at
    least 1); a ValueError naming the argument when it does not fit the grid."""
    if nfe is not None:
        if nfe > num_steps:
            raise ValueError(f"nfe={nfe} calls do not fit a grid of {num_steps} steps (nfe must be <= the steps)")
        return nfe
    return max(1, int(math.floor(num_steps / speedup + 0.5)))


def stride_mask(n: int, k: int, tail: int = 0) -> np.ndarray:
    """[n] bool: the last ``tail`` steps, and k - tail calls at a uniform stride over the others
    (step 0 first; ``evaluation.baselines.uniform_mask``'s placement)."""
    mask = np.zeros(n, dtype=bool)
    tail = max(0, min(tail, k, n))
    if tail:
        mask[n - tail :] = True
    rest, calls = n - tail, k - tail
    if calls > 0:
        mask[np.floor(np.arange(calls) * rest / calls).astype(int)] = True
    return mask


@dataclass(frozen=True)
class Paced(SkipPolicy):
    """Exactly ``nfe`` calls per sample (or ``round(N / speedup)``); see the module docstring.

    nfe / speedup: the budget, exactly one of them (speedup >= 1).
    tail: steps computed at the end when a row re-plans (>= 0).
    lead: how many steps before the end the re-plan decision is taken (>= 1).
    window: the steps whose mean estimate is compared with the mean of the ``window`` before (>= 1).
    ratio: re-plan when recent >= ratio * before (the estimate has not fallen by more than that);
        0: always re-plan (a fixed tail), ``math.inf``: never (uniform stride with the forecast).
    reuse: what a skipped call gets (default ``Extrapolate(1)``).
    align: the batch decides the re-plan together (majority), so all rows share one mask.
    max_speedup: refuse budgets below N / max_speedup calls (None: any budget >= 1).
    """

    nfe: int | None = None
    speedup: float | None = None
    tail: int = 2
    lead: int = 10
    window: int = 5
    ratio: float = 0.8
    reuse: Reuse | str = field(default_factory=lambda: Extrapolate(1))
    align: bool = True
    max_speedup: float | None = None

    shardable = True

    def __post_init__(self) -> None:
        if self.nfe is None and self.speedup is None:
            raise ValueError("give a budget: nfe (calls per sample) or speedup (steps / calls)")
        if self.nfe is not None and self.speedup is not None:
            raise ValueError(f"give nfe or speedup, not both (got nfe={self.nfe!r}, speedup={self.speedup!r})")
        if self.nfe is not None:
            check_int("nfe", self.nfe, 1)
        else:
            check_number("speedup", self.speedup, 1.0)
        check_int("tail", self.tail, 0)
        check_int("lead", self.lead, 1)
        check_int("window", self.window, 1)
        if not (isinstance(self.ratio, (int, float)) and not isinstance(self.ratio, bool) and self.ratio == math.inf):
            check_number("ratio", self.ratio, 0.0)
        make_reuse(self.reuse)
        if not isinstance(self.align, bool):
            raise ValueError(f"align must be a bool, got {self.align!r}")
        if self.max_speedup is not None:
            check_number("max_speedup", self.max_speedup, 1.0)
            if self.speedup is not None and self.speedup > self.max_speedup:
                raise ValueError(f"speedup must be <= {self.max_speedup:g}, got {self.speedup!r}")

    @property
    def warmup(self) -> int:  # type: ignore[override]
        return 1

    @property
    def per_sample(self) -> bool:  # type: ignore[override]
        """False with ``align``: the re-plan is one decision for the batch (``distributed.data_parallel``
        then pools the vote over every process's rows)."""
        return not self.align

    def calls_for(self, num_steps: int) -> int:
        """K on a grid of ``num_steps`` steps."""
        k = budget_for(num_steps, self.nfe, self.speedup)
        if self.max_speedup is not None and k < math.ceil(num_steps / self.max_speedup):
            low = math.ceil(num_steps / self.max_speedup)
            raise ValueError(f"nfe={k} is below the {low} calls (N / {self.max_speedup:g}) this policy takes on {num_steps} steps")
        return k

    def start(self, x: torch.Tensor, num_steps: int, sampler, sigmas: torch.Tensor | None = None) -> "PacedController":
        k = self.calls_for(num_steps)
        rule = LocalError(tol=1.0, max_skips=num_steps, warmup=2, reuse=self.reuse)
        return PacedController(self, LocalErrorController(rule, x, num_steps, sigmas), x, num_steps, k)

    def __repr__(self) -> str:
        budget = f"nfe={self.nfe}" if self.nfe is not None else f"speedup={self.speedup:g}"
        extra = "" if self.align else ", align=False"
        return f"Paced({budget}{extra})"


class PacedController(Controller):
    """Per-call state of ``Paced``: each row's plan (cumulative calls), its estimates, the re-plan."""

    def __init__(self, policy: Paced, scorer: LocalErrorController, x: torch.Tensor, num_steps: int, k: int) -> None:
        B = x.shape[0]
        self.batch, self.num_steps, self.k = B, num_steps, k
        self.policy, self.scorer = policy, scorer
        self.space = scorer.space
        self.plan = np.tile(np.concatenate([[0], np.cumsum(stride_mask(num_steps, k))]), (B, 1))  # calls before step j
        self.used = np.zeros(B, dtype=np.int64)
        self.estimates = np.full((B, num_steps), np.nan)
        self.replanned = np.zeros(B, dtype=bool)
        self.decision_step = num_steps - policy.tail - policy.lead
        self.collective, self.device = None, x.device

    def use_collective(self, collective) -> None:
        self.collective = collective
        self.scorer.use_collective(collective)

    def reuse(self, step: int, sigma: torch.Tensor) -> torch.Tensor:
        return self.scorer.reuse(step, sigma)

    def record(self, step, sigma, eps, rows) -> None:
        self.scorer.record(step, sigma, eps, rows)

    def decide(self, step: int, x: torch.Tensor, sigma: torch.Tensor) -> np.ndarray:
        if step >= 2 and bool((self.scorer.computed_calls >= 2).all()):
            est, bad = self.scorer.estimate(step, x, sigma)
            if bad.any():
                raise NonFiniteLatent(step, np.flatnonzero(bad))
            self.estimates[:, step] = est
        if step == self.decision_step:
            self._replan(step)
        compute = self.used < self.plan[:, step + 1]
        self.used += compute
        self.scorer.note(compute)
        return compute

    def _replan(self, step: int) -> None:
        """The one online decision (module docstring): rows whose estimate has not fallen take a tail."""
        w = self.policy.window
        if step + 1 < 2 * w + 2:
            return
        with np.errstate(invalid="ignore"):
            recent = np.nanmean(self.estimates[:, step - w + 1 : step + 1], axis=1)
            before = np.nanmean(self.estimates[:, step - 2 * w + 1 : step - w + 1], axis=1)
        rising = ~(recent < self.policy.ratio * before)  # NaN (no estimate): keep the safe tail
        if self.policy.align:  # the majority of the batch: of every process's rows under data_parallel
            votes = torch.tensor(np.stack([rising, np.ones(self.batch, dtype=bool)]), dtype=torch.float64, device=self.device)
            if self.collective is not None:
                (up, rows), _ = self.collective.batch_sums(votes, step)
            else:
                up, rows = votes.sum(dim=1)
            rising = np.full(self.batch, float(up) >= 0.5 * float(rows))
        now = self.used + (self.used < self.plan[:, step + 1])  # calls after this step's planned decision
        for b in np.flatnonzero(rising):
            left = self.k - int(now[b])
            mask = stride_mask(self.num_steps - step - 1, left, self.policy.tail)
            self.plan[b, step + 2 :] = now[b] + np.cumsum(mask)
        self.replanned = rising

    def signals(self) -> dict[str, np.ndarray]:
        return {"scores": self.estimates.copy(), "budget": np.full(self.batch, self.k), "replanned": self.replanned.copy()}
