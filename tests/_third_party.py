"""A sampler and a skip rule written OUTSIDE the package, as a research repo would write them.

Nothing here is known to the library: the sampler is registered at import time of the tests that
use it (``register``), the rule plugs in through the policy protocol only. Kept in a module of its
own (not a ``test_*.py``) so the spawned processes of tests/test_distributed.py can import the rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from adaptive_sampling import Controller, Sampler, SkipPolicy, register_sampler
from adaptive_sampling.progress import steps
from adaptive_sampling.runner import SkipRun


# --- a sampler: two-step Adams-Bashforth on the probability-flow ODE dx/dsigma = eps ------------------


def sample_ab2(model, x, sigmas, extra_args=None, callback=None, disable=None, *, skip=None):
    """Adams-Bashforth 2 with variable steps in sigma (Euler for the first step)."""
    run = SkipRun(model, x, sigmas, extra_args, skip, "ab2")
    s = run.schedule
    prev = None  # (eps, step length) of the previous step
    for i in steps(run.num_steps, disable):
        denoised = run.denoise(i, x, run.sigma_rows(i, x))
        run.notify(callback, i, x, denoised)
        eps, h = (x - denoised) / s[i], s[i + 1] - s[i]
        slope = eps if prev is None else eps + (h / (2 * prev[1])) * (eps - prev[0])
        x, prev = x + h * slope, (eps, h)
    return x, run.finish(x, run.sigma_rows(-1, x))


AB2 = Sampler("ab2", "ve", sample_ab2, multistep=True)


def register() -> Sampler:
    return register_sampler(AB2, replace=True)


# --- a rule: skip when the latent barely moved over the last step ----------------------------------


@dataclass(frozen=True)
class RelativeChange(SkipPolicy):
    """Skip the next call when ||x_k - x_{k-1}|| < tol ||x_k|| (per sample). Its decision depends
    on the latent only through per-sample sums, so it declares ``shardable``; it gives a score, so
    it declares ``scored``."""

    tol: float = 0.2
    warmup: int = 2
    max_skips: int = 2

    shardable = True
    scored = True

    def start(self, x, num_steps, sampler, sigmas=None):
        return RelativeChangeController(self, x, num_steps)


class RelativeChangeController(Controller):
    def __init__(self, policy: RelativeChange, x: torch.Tensor, num_steps: int) -> None:
        super().__init__(x, num_steps)
        self.policy = policy
        self.prev: torch.Tensor | None = None
        self.collective = None
        self.run = np.zeros(x.shape[0], dtype=np.int64)
        self.scores = np.full((x.shape[0], num_steps), np.nan)

    def use_collective(self, collective) -> None:
        self.collective = collective

    def observe(self, step, x, sigma) -> None:
        self.prev = x

    def score(self, step, x, sigma) -> np.ndarray:
        B = x.shape[0]
        diff, base = (x - self.prev).reshape(B, -1), x.reshape(B, -1)
        sums = torch.stack([(diff * diff).sum(1), (base * base).sum(1)])
        if self.collective is not None:
            sums = self.collective.sample_sums(sums, step)
        self.prev = x
        score = ((sums[0] / sums[1]).sqrt() / self.policy.tol).cpu().numpy().astype(np.float64)
        self.scores[:, step] = score
        return score

    def decide(self, step, x, sigma) -> np.ndarray:
        if step < self.policy.warmup:
            self.observe(step, x, sigma)
            compute = np.ones(x.shape[0], dtype=bool)
        else:
            compute = ~(self.score(step, x, sigma) < 1) | (self.run >= self.policy.max_skips)
        self.note(compute)
        return compute

    def note(self, compute) -> None:
        self.run = np.where(compute, 0, self.run + 1)

    def signals(self):
        return {"scores": self.scores.copy()}
