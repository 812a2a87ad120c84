"""``LocalError``: skip a call when an a-posteriori estimate of what reusing would cost is small.

The estimate is an embedded pair, as in adaptive step-size control. Every solver update here
moves the latent by ``(sigma_next - sigma) * eps`` to first order (Euler and DDIM exactly; for
DPM-Solver++ the x0 estimate ``x - sigma * eps`` enters with the factor ``1 - sigma_next/sigma``,
which gives the same ``(sigma - sigma_next) * eps`` term), so reusing a wrong eps at call k
moves the next latent by ``|sigma_{k+1} - sigma_k| * (eps_true - eps_reused)``. Two predictors of
eps_true from computed calls only are at hand: the copy (order 0, the last computed eps) and the
linear forecast through the last two computed calls (order 1). Their difference estimates the
error of the lower-order one (the classic embedded-pair argument: the error of the order-0
predictor is its difference to the order-1 one, up to a higher-order term). Hence::

    est_k = |sigma_{k+1} - sigma_k| * rms(eps_forecast - eps_copy) / rms(x_k)

relative to the latent's own scale (rms over the sample's elements; VE latents). Skip call k
iff ``est_k < tol``. With the default ``reuse=Extrapolate(1)`` the skipped call gets the forecast,
whose error is of higher order, so the estimate is conservative (local extrapolation).

How good the estimate is (tested in ``tests/test_policies.py``): for a linear model
``eps = A x + b sigma + c`` under Euler steps, with ``t = sigma`` as the forecast variable and the
two previous calls computed, the actual one-step error of copying lies within
``[1 - h L, 1 + h L]`` times the estimate, where ``h`` is the length of the step between those
two calls and ``L = ||A||_2``: the successive eps differences are ``h_j (A eps_j + b)`` and
``A eps_j + b`` is multiplied by ``I + h_j A`` from one step to the next.

Cost: a few elementwise passes over eps and the latent in torch (no kernel), decision arithmetic
in float32 (float64 for float64 latents), one device-to-host read per step (score and NaN flag
together). The guards (warm-up, ``max_skips``) run on the host from the compute mask. Measured at
SD-1.5 size ([B, 4, 64, 64]) on a 2-core CPU: 0.2 to 1 ms per step, the order of ThirdOrder's torch
path, next to UNet calls of seconds (``bench/decision_cost.py``). A kernel would save little: the
two sums read tensors the step has just written, and there is no latent history to stream.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from ..checks import check_int, check_number
from .base import Controller, NonFiniteLatent, SkipPolicy
from .reuse import Extrapolate, ExtrapolateState, Reuse, Variable, make_reuse

__all__ = ["LocalError", "LocalErrorController"]


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class LocalError(SkipPolicy):
    """Skip the next call iff the embedded-pair estimate of its one-step error is below ``tol``
    (see the module docstring).

    tol: threshold on ``|dsigma| * rms(forecast - copy) / rms(x)`` (>= 0; 0 never skips). The
        default 1e-3 gives about 30 of 50 calls on the learned digits model with 50 Karras steps
        (tuned on the tuning seeds of ``bench/policy_sweep.py``); NFE falls as tol rises.
    max_skips: consecutive skips after which the next call is forced.
    warmup: calls that always run (>= 2: the estimate needs two computed calls).
    reuse: what a skipped call gets (default ``Extrapolate(1)``; ``"copy"`` the last eps).
    per_sample: each row decides for itself (default); ``False`` pools the sums over the batch.
    variable: the forecast variable of the estimate; ``None`` takes the reuse's (``log_sigma`` for copy).
    """

    tol: float = 1e-3
    max_skips: int = 4
    warmup: int = 4
    reuse: Reuse | str = Extrapolate(1)
    per_sample: bool = True
    variable: Variable | None = None

    shardable = True
    scored = True

    def __post_init__(self) -> None:
        check_number("tol", self.tol, 0.0)
        check_int("max_skips", self.max_skips, 0)
        check_int("warmup", self.warmup, 2)
        make_reuse(self.reuse)
        if self.variable not in (None, "log_sigma", "sigma"):
            raise ValueError(f"variable must be 'log_sigma', 'sigma' or None, got {self.variable!r}")
        if not isinstance(self.per_sample, bool):
            raise ValueError(f"per_sample must be a bool, got {self.per_sample!r}")

    def start(self, x: torch.Tensor, num_steps: int, sampler, sigmas: torch.Tensor | None = None):
        return LocalErrorController(self, x, num_steps, sigmas)

    def with_reuse(self, reuse: Reuse | str) -> "LocalError":
        return replace(self, reuse=reuse)


class LocalErrorController(Controller):
    """Per-call state of ``LocalError`` (also the ranking rule inside ``Budget``)."""

    space = "ve"

    def __init__(self, policy: LocalError, x: torch.Tensor, num_steps: int, sigmas: torch.Tensor | None) -> None:
        if sigmas is None:
            raise ValueError("LocalError needs the sigma grid: start(x, num_steps, sampler, sigmas=...)")
        super().__init__(x, num_steps, policy.reuse)
        self.policy = policy
        grid = torch.as_tensor(sigmas, dtype=torch.float64).cpu()
        if len(grid) != num_steps + 1:
            raise ValueError(f"sigmas has {len(grid)} entries, expected num_steps + 1 = {num_steps + 1}")
        self.step_length = (grid[:-1] - grid[1:]).abs().numpy()
        reuse = make_reuse(policy.reuse)
        variable = policy.variable or (reuse.variable if isinstance(reuse, Extrapolate) else "log_sigma")
        shared = isinstance(self.reuse_state, ExtrapolateState) and self.reuse_state.variable == variable
        self.history = self.reuse_state if shared else ExtrapolateState(1, variable)
        self._shared = shared
        B = x.shape[0]
        self.acc = _accumulator(x.dtype)
        self.scores = np.full((B, num_steps), np.nan, dtype=np.float64)
        self.capped = np.zeros((B, num_steps), dtype=bool)
        self.run = np.zeros(B, dtype=np.int64)  # consecutive skips so far, per row
        self.computed_calls = np.zeros(B, dtype=np.int64)

    collective = None  # set by integrations.distributed; None: this process decides alone

    def use_collective(self, collective) -> None:
        """Across processes: the per-sample sums (squared difference, squared latent, NaN flag)
        are completed through ``collective`` (all-reduced over the shards of a sharded latent,
        pooled over a data-parallel group in batch mode) before the estimate is formed, so every
        process decides from the same bits. Still one host read per step."""
        self.collective = collective

    def record(self, step: int, sigma: torch.Tensor, eps: torch.Tensor, rows: torch.Tensor | None) -> None:
        self.reuse_state.record(step, sigma, eps, rows)
        if not self._shared:
            self.history.record(step, sigma, eps, rows)

    @torch.no_grad()
    def estimate(self, step: int, x: torch.Tensor, sigma: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(est [B] float64 on the host, non-finite flag [B]) for call ``step``: one host read."""
        B = x.shape[0]
        h = self.history
        w = h.weights(sigma, order=1)
        diff = (w[0] - 1).to(h.eps.dtype).reshape(-1, *[1] * (x.ndim - 1)) * h.eps[0]
        diff = diff + w[1].to(h.eps.dtype).reshape(-1, *[1] * (x.ndim - 1)) * h.eps[1]
        d = diff.reshape(B, -1).to(self.acc)
        xs = x.reshape(B, -1).to(self.acc)
        bad = (xs * 0).sum(dim=1).isnan()
        num, den = (d * d).sum(dim=1), (xs * xs).sum(dim=1)
        c = self.collective
        if c is not None:
            sums = c.sample_sums(torch.stack([num, den, bad.to(self.acc)]), step)
            if not self.policy.per_sample:
                sums = c.batch_sums(sums, step)[0][:, None].expand(3, B)
            num, den, bad = sums[0], sums[1], sums[2] > 0
        elif not self.policy.per_sample:
            num, den, bad = num.sum().expand(B), den.sum().expand(B), bad.any().expand(B)
        rel = (num / den).sqrt()
        # a history node at sigma = inf (a flow grid's s = 1) leaves the order-1 forecast undefined:
        # no estimate, so the call computes
        rel = torch.where(torch.isfinite(h.t[:2]).all(dim=0), rel, torch.full_like(rel, torch.inf))
        packed = torch.stack([rel.to(torch.float64), bad.to(torch.float64)]).cpu().numpy()
        return packed[0] * self.step_length[step], packed[1] > 0

    def score(self, step: int, x: torch.Tensor, sigma: torch.Tensor) -> np.ndarray:
        """The estimate in units of ``tol`` (skip iff < 1); NaN/Inf latents raise ``NonFiniteLatent``."""
        est, bad = self.estimate(step, x, sigma)
        if bad.any():
            raise NonFiniteLatent(step, np.flatnonzero(bad))
        self.scores[:, step] = est
        with np.errstate(divide="ignore", invalid="ignore"):
            return est / self.policy.tol if self.policy.tol > 0 else np.full_like(est, np.inf)

    def decide(self, step: int, x: torch.Tensor, sigma: torch.Tensor) -> np.ndarray:
        B = x.shape[0]
        if step < self.policy.warmup:
            compute = np.ones(B, dtype=bool)
        else:
            s = self.score(step, x, sigma)
            capped = self.run >= self.policy.max_skips
            self.capped[:, step] = capped
            compute = ~(s < 1) | capped | (self.computed_calls < 2)
        self.note(compute)
        return compute

    def note(self, compute: np.ndarray) -> None:
        self.run = np.where(compute, 0, self.run + 1)
        self.computed_calls += compute

    def signals(self) -> dict[str, np.ndarray]:
        return {"scores": self.scores.copy(), "capped": self.capped.copy()}
