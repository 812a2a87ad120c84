"""The skip-policy protocol: how a rule plugs into every sampling loop, the k-diffusion wrapper,
the diffusers hook, the composite policies and the report, without touching library internals.

A **policy** is an immutable description (``ThirdOrder(delta=0.01)``). ``policy.start(x,
num_steps, sampler, sigmas=...)`` makes a **controller**: the state of ONE sampling call, never
shared. ``sampler`` is the registry entry of the sampler (``samplers.registry.Sampler``: its
name and the latent the paper's rule measures), or a name; ``resolve(sampler)`` gives the entry.
Per step the sampling machinery (``runner.SkipRun``) asks the controller

* ``decide(step, x, sigma) -> np.ndarray[bool] [B]``: which rows call the model at call
  ``step`` (x is the latent entering that call, in VE scale, sigma its noise level, [B]).
  Row-wise: each sample may follow its own path. Call 0 must compute. This is the WHEN;
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
    from adaptive_sampling.policies import Controller, SkipPolicy, make_reuse

    class EveryOther(SkipPolicy):
        '''Skip every second call after a warm-up of 4 calls.'''

        def __init__(self, reuse="copy"):
            self.reuse = make_reuse(reuse)

        def start(self, x, num_steps, sampler, sigmas=None):
            return EveryOtherController(x, num_steps, self.reuse)

    class EveryOtherController(Controller):
        def decide(self, step, x, sigma):
            return np.full(x.shape[0], step < 4 or step % 2 == 0)

    x, report = sample_euler(model, x, sigmas, skip=EveryOther())

Why abstract base classes and not a ``typing.Protocol``: the optional members below need
defaults that every policy inherits (a Protocol only describes, it gives nothing), the runner
and the composite policies then read them as plain attributes, never with ``getattr`` guesses,
and a missing ``start`` or ``decide`` fails when the class is instantiated, not mid-sampling.

**Optional members** (declared here with their defaults; composite policies and integrations
read them, never a list of classes):

* on the policy: ``warmup`` (calls that always run: 1, call 0), ``max_skips`` (consecutive skips
  after which a call is forced; ``None``: no cap), ``per_sample`` (each row decides from that row
  alone: True), ``shardable`` (its controllers implement ``use_collective``, so
  ``distributed.shard`` may complete their sums across processes: False), ``scored`` (its
  controllers implement ``score``, so ``Budget(rule=)`` and ``Calibrated(refine=)`` can rank
  steps with it: False), ``scorer(...)`` (the controller such a composite drives: ``start`` by
  default) and ``with_reuse(reuse)`` (the same rule with another reuse strategy, for a composite
  whose reuse must win: ``self`` by default, i.e. the rule keeps its own);
* on the controller: ``can_skip`` (False: no row ever skips, the runner records no eps),
  ``space`` (the latent the decision measured, for the report), ``score(step, x, sigma)`` (per
  row, in units of the rule's threshold: skip iff < 1; NaN/Inf latents raise
  ``NonFiniteLatent``), ``observe(step, x, sigma)`` (a warm-up step the composite does not score:
  the latent, for rules with a history), ``note(compute)`` (what the composite decided, for the
  rule's own counters), ``use_collective(collective)`` (see below).

Contracts the runner enforces on any controller: ``decide`` returns one bool per row, all True
at call 0; it is called once per step, in order. A controller should cost at most one
device-to-host read per step (the decision itself).

Across processes (``adaptive_sampling.integrations.distributed``): a controller whose decision
depends on the latent only through per-sample sums over its elements implements
``use_collective(c)`` and passes those sums through ``c.sample_sums`` (and ``c.batch_sums`` in a
batch-wide mode) before deciding; its policy then declares ``shardable = True``. The built-in
controllers do.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from ..checks import check_int, check_number
from .reuse import Reuse, ReuseState, make_reuse

if TYPE_CHECKING:
    from ..samplers.registry import Sampler

__all__ = ["SkipPolicy", "Controller", "NonFiniteLatent", "check_policy", "describe", "resolve", "check_int", "check_number"]


def resolve(sampler: "str | Sampler") -> "Sampler":
    """The registry entry for a sampler name or entry (``samplers.registry.resolve``)."""
    from ..samplers.registry import resolve as _resolve

    return _resolve(sampler)


class NonFiniteLatent(FloatingPointError):
    """The latent entering call ``step`` (produced by step ``step - 1``) holds NaN or Inf."""

    def __init__(self, step: int, rows: np.ndarray) -> None:
        self.step, self.rows = step, rows
        super().__init__(f"latent produced by step {step - 1} holds NaN/Inf in batch rows {rows.tolist()}")


class Controller(abc.ABC):
    """Base class of a controller (the per-call state of a policy); see the module docstring.

    ``reuse``: a ``Reuse`` strategy (or ``"copy"``); its state is created here for this call.
    """

    can_skip: bool = True
    space: str | None = None

    def __init__(self, x: torch.Tensor, num_steps: int, reuse: Reuse | str = "copy") -> None:
        self.batch = x.shape[0]
        self.num_steps = num_steps
        self.reuse_state: ReuseState = make_reuse(reuse).start(x, num_steps)

    @abc.abstractmethod
    def decide(self, step: int, x: torch.Tensor, sigma: torch.Tensor) -> np.ndarray:
        """[B] bool: which rows call the model at call ``step``."""

    def reuse(self, step: int, sigma: torch.Tensor) -> torch.Tensor:
        return self.reuse_state.predict(step, sigma)

    def record(self, step: int, sigma: torch.Tensor, eps: torch.Tensor, rows: torch.Tensor | None) -> None:
        self.reuse_state.record(step, sigma, eps, rows)

    def finish(self, x: torch.Tensor, sigma: torch.Tensor) -> None:
        pass

    def signals(self) -> dict[str, np.ndarray]:
        return {}

    # --- optional capabilities (see the module docstring) ---

    def score(self, step: int, x: torch.Tensor, sigma: torch.Tensor) -> np.ndarray:
        raise NotImplementedError(f"{type(self).__name__} gives no per-row score (its policy is not `scored`)")

    def observe(self, step: int, x: torch.Tensor, sigma: torch.Tensor) -> None:
        pass

    def note(self, compute: np.ndarray) -> None:
        pass

    def use_collective(self, collective: Any) -> None:
        raise ValueError(
            f"{type(self).__name__} has no use_collective(): its decisions cannot be completed across processes"
        )


class SkipPolicy(abc.ABC):
    """Base class of a skip policy: anything passed as ``skip=`` (see the module docstring)."""

    warmup: int = 1
    max_skips: int | None = None
    per_sample: bool = True
    shardable: ClassVar[bool] = False
    scored: ClassVar[bool] = False

    @abc.abstractmethod
    def start(self, x: torch.Tensor, num_steps: int, sampler: "str | Sampler", sigmas: torch.Tensor | None = None) -> Controller:
        """The controller of one sampling call."""

    def scorer(self, x: torch.Tensor, num_steps: int, sampler: "str | Sampler", sigmas: torch.Tensor | None = None) -> Controller:
        """The controller a composite (``Budget``, ``Calibrated(refine=)``) drives through
        ``observe`` / ``score`` / ``note`` instead of ``decide``; the composite applies the guards."""
        if not self.scored:
            raise ValueError(f"{self!r} gives no per-row score: it cannot rank steps for a budget or a refinement")
        return self.start(x, num_steps, sampler, sigmas=sigmas)

    def with_reuse(self, reuse: Reuse | str) -> "SkipPolicy":
        """This rule with another reuse strategy (default: unchanged; the rule keeps its own)."""
        return self


def describe(policy: Any) -> str:
    """A policy's short name for reports: a dataclass policy with its generated repr shows only the
    fields that differ from their defaults (``LocalError(tol=0.00155, max_skips=1)``), nested policies
    alike; a class with its own ``__repr__`` keeps it; anything else shows its class name (never
    ``<... object at 0x...>``)."""
    cls = type(policy)
    if dataclasses.is_dataclass(policy) and hasattr(cls.__repr__, "__wrapped__"):  # the repr dataclass generated
        parts = []
        for f in dataclasses.fields(policy):
            if not f.repr:
                continue
            value = getattr(policy, f.name)
            if isinstance(value, (np.ndarray, torch.Tensor)):
                continue
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            try:
                same = default is not dataclasses.MISSING and bool(value == default)
            except Exception:  # noqa: BLE001  (a value that does not compare: show it)
                same = False
            if not same:
                parts.append(f"{f.name}={describe(value) if isinstance(value, SkipPolicy) else repr(value)}")
        return f"{cls.__name__}({', '.join(parts)})"
    if cls.__repr__ is object.__repr__:
        return cls.__name__
    return repr(policy)


def check_policy(policy: Any, name: str = "skip") -> SkipPolicy:
    """``policy`` if it is a skip policy instance; a clear TypeError otherwise (naming ``name``)."""
    if isinstance(policy, SkipPolicy):
        return policy
    if isinstance(policy, type) and issubclass(policy, SkipPolicy):
        raise TypeError(f"{name}={policy.__name__} is the policy class; pass an instance, e.g. {name}={policy.__name__}()")
    hint = " (a third-party policy subclasses adaptive_sampling.policies.SkipPolicy)" if hasattr(policy, "start") else ""
    raise TypeError(f"{name} must be a skip policy such as default_policy() or ThirdOrder(), got {policy!r}{hint}")
