"""The skip-policy protocol: how a rule plugs into every sampling loop, the k-diffusion wrapper
and the report, without touching library internals.

A **policy** is an immutable description (``ThirdOrder(delta=0.01)``). ``policy.start(x,
num_steps, sampler, sigmas=...)`` makes a **controller**: the state of ONE sampling call, never
shared. Per step the sampling machinery (``runner.SkipRun``) asks the controller

* ``decide(step, x, sigma) -> np.ndarray[bool] [B]``: which rows call the model at call
  ``step`` (x is the latent entering that call, sigma its noise level, [B]). Row-wise: each
  sample may follow its own path. Call 0 must compute. This is the WHEN;
* ``reuse(step, sigma) -> eps [B, ...]``: the noise prediction a skipped row gets instead of a
  model call (only the skipped rows of the result are used). This is the WHAT, delegated to a
  ``ReuseState`` (``reuse.py``: the last eps as is, or a forecast from computed calls);
* ``record(step, sigma, eps, rows)``: the eps of the rows that did call the model (``rows`` an
  index tensor, ``None`` for all), so the reuse and the rule may use them;
* ``finish(x, sigma)``: the final latent (for checks and signals; no decision);
* ``signals() -> dict[str, np.ndarray]``: the controller's own per-sample signal values for the
  ``SkipReport`` (``scores`` [B, N], ``capped`` [B, N], ``stats`` [B, N, 3], or any other name).

The runner keeps the compute mask, the NFE and the model calls itself. Subclass ``Controller``
to get ``reuse``/``record`` (from a ``reuse=`` strategy), ``finish`` and ``signals`` for free;
then only ``decide`` is left. A complete third-party policy::

    import numpy as np
    from adaptive_sampling.policies import Controller, make_reuse

    class EveryOther:
        '''Skip every second call after a warm-up of 4 calls.'''

        def __init__(self, reuse="copy"):
            self.reuse = make_reuse(reuse)

        def start(self, x, num_steps, sampler, sigmas=None):
            return EveryOtherController(x, num_steps, self.reuse)

    class EveryOtherController(Controller):
        def decide(self, step, x, sigma):
            return np.full(x.shape[0], step < 4 or step % 2 == 0)

    x, report = sample_euler(model, x, sigmas, skip=EveryOther())

Contracts the runner enforces on any controller: ``decide`` returns one bool per row, all True
at call 0; it is called once per step, in order. A controller should cost at most one
device-to-host read per step (the decision itself).

Across processes (``adaptive_sampling.distributed``): a controller whose decision depends on the
latent only through per-sample sums over its elements may implement ``use_collective(c)`` and
pass those sums through ``c.sample_sums`` (and ``c.batch_sums`` in a batch-wide mode) before
deciding; its policy then declares ``shardable = True``. The built-in controllers do.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch

from .reuse import Reuse, ReuseState, make_reuse

__all__ = ["SkipPolicy", "Controller", "check_int", "check_number"]


@runtime_checkable
class SkipPolicy(Protocol):
    """Anything with ``start`` can be passed as ``skip=`` to the samplers."""

    def start(self, x: torch.Tensor, num_steps: int, sampler: str, sigmas: torch.Tensor | None = None) -> "Controller":
        ...


class Controller:
    """Base class of a controller (the per-call state of a policy); see the module docstring.

    ``reuse``: a ``Reuse`` strategy (or ``"copy"``); its state is created here for this call.
    ``can_skip = False`` tells the runner that no row will ever skip (it then records no eps).
    """

    can_skip = True

    def __init__(self, x: torch.Tensor, num_steps: int, reuse: Reuse | str = "copy") -> None:
        self.batch = x.shape[0]
        self.num_steps = num_steps
        self.reuse_state: ReuseState = make_reuse(reuse).start(x, num_steps)

    def decide(self, step: int, x: torch.Tensor, sigma: torch.Tensor) -> np.ndarray:
        raise NotImplementedError

    def reuse(self, step: int, sigma: torch.Tensor) -> torch.Tensor:
        return self.reuse_state.predict(step, sigma)

    def record(self, step: int, sigma: torch.Tensor, eps: torch.Tensor, rows: torch.Tensor | None) -> None:
        self.reuse_state.record(step, sigma, eps, rows)

    def finish(self, x: torch.Tensor, sigma: torch.Tensor) -> None:
        pass

    def signals(self) -> dict[str, np.ndarray]:
        return {}


def check_int(name: str, value, minimum: int, maximum: int | None = None) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum or (
        maximum is not None and value > maximum
    ):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be an int {bound}, got {value!r}")


def check_number(name: str, value, minimum: float = 0.0, strict: bool = False) -> None:
    ok = isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)
    if not ok or not np.isfinite(value) or value < minimum or (strict and value == minimum):
        bound = f"> {minimum}" if strict else f">= {minimum}"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
