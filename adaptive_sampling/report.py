"""What a sampling call did: per-sample compute masks, NFE and the criterion's signal."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["SkipReport"]


@dataclass(frozen=True)
class SkipReport:
    """The record of one sampling call with N steps over a batch of B samples.

    computed:    [B, N] bool, whether sample b's step k called the model.
    nfe:         [B] int, model evaluations per sample: computed.sum(1) + extra_evaluations.
    model_calls: number of times the model function was invoked (a call may carry a subset of rows).
    extra_evaluations: evaluations per sample that are never skipped (the second call of each
                 step of a two-call sampler such as Heun; 0 for one-call samplers).
    scores:      [B, N] the criterion value that decided call k (NaN where nothing was decided:
                 warm-up, fixed masks). ThirdOrder: skip iff score <= delta (reference) or < delta
                 (paper); LocalError: the error estimate, skip iff < tol; Budget: the rule's score
                 in units of its threshold.
    capped:      [B, N] bool, call k computed because ``max_skips`` consecutive skips were reached.
    stats:       [B, N, 3] of latent x_i (the output of step i), in the measured space:
                 mean|x_i - x_{i-1}|, ||x_i - x_{i-1}||_2, ||x_i - 3x_{i-1} + 3x_{i-2} - x_{i-3}||_2
                 (NaN where the history does not reach or the criterion does not need it).
    signals:     every signal the policy's controller reported (``scores``, ``capped``, ``stats``
                 and any others, e.g. Budget's ``forced``), by name.
    sampler, policy, space: what produced it.

    ``SkipReport.build`` fills ``scores`` / ``capped`` / ``stats`` from the signals, with NaN /
    False where a policy reports none.
    """

    computed: np.ndarray
    model_calls: int
    scores: np.ndarray
    capped: np.ndarray
    stats: np.ndarray
    sampler: str
    policy: str
    space: str | None
    extra_evaluations: int = 0
    signals: dict = field(default_factory=dict, repr=False, compare=False)
    nfe: np.ndarray = field(init=False)

    @classmethod
    def build(cls, computed: np.ndarray, signals: dict, **fields) -> "SkipReport":
        B, N = computed.shape
        scores = signals.get("scores", np.full((B, N), np.nan, dtype=np.float32))
        capped = signals.get("capped", np.zeros((B, N), dtype=bool))
        stats = signals.get("stats", np.full((B, N, 3), np.nan, dtype=np.float32))
        return cls(computed=computed, scores=scores, capped=capped, stats=stats, signals=signals, **fields)

    def __post_init__(self) -> None:
        object.__setattr__(self, "nfe", self.computed.sum(axis=1) + self.extra_evaluations)

    @property
    def num_steps(self) -> int:
        return self.computed.shape[1]

    @property
    def speedup(self) -> np.ndarray:
        """Model evaluations without skipping over those made, per sample (steps / NFE for
        one-call samplers: the paper's speedup in model calls)."""
        return (self.num_steps + self.extra_evaluations) / self.nfe

    @property
    def budget(self) -> np.ndarray | None:
        """[B] the calls per sample the policy was asked to spend (a budgeted policy), else None."""
        value = self.signals.get("budget")
        return None if value is None else np.asarray(value)

    def skipped_steps(self, row: int = 0) -> list[int]:
        return np.flatnonzero(~self.computed[row]).tolist()

    def _calls(self) -> str:
        nfe = self.nfe
        total = self.num_steps + self.extra_evaluations
        if nfe.min() == nfe.max():
            return f"{nfe.min()} of {total} model calls per sample (NFE)"
        return f"{nfe.mean():.1f} of {total} model calls per sample (NFE; min {nfe.min()}, max {nfe.max()})"

    def summary(self) -> str:
        """One line: sampler, policy, calls per sample, speedup."""
        speed = self.speedup
        speedup = f"{speed.mean():.2f}x" if np.ptp(speed) < 1e-9 else f"{speed.min():.2f}x-{speed.max():.2f}x"
        return f"{self.sampler}, {self.policy}: {self._calls()}, {speedup} speedup"

    def __str__(self) -> str:
        lines = [f"SkipReport: {self.summary()}"]
        lines.append(f"  samples: {len(self.nfe)}, steps: {self.num_steps}, model forwards: {self.model_calls}")
        if self.budget is not None:
            spent = "exactly" if (self.nfe - self.extra_evaluations == self.budget).all() else "not exactly"
            lines.append(f"  budget: {self.budget.max()} calls per sample, spent {spent}")
        if self.space is not None:
            lines.append(f"  measured latent: {self.space}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<SkipReport {self.summary()}>"

    def plot(self, ax=None, title: str | None = None):
        """Heat map of the compute mask (rows: samples, columns: steps). Needs matplotlib."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(max(4, self.num_steps / 6), max(1.5, len(self.nfe) / 3)))
        ax.imshow(self.computed, aspect="auto", cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
        ax.set_xlabel("step (dark: model called)")
        ax.set_ylabel("sample")
        ax.set_title(title or self.summary(), fontsize=8)
        return ax
