"""``default_policy``: the library's recommended skip policy, with a speed knob.

    from adaptive_sampling import default_policy, sample_dpmpp_2m
    x, report = sample_dpmpp_2m(model, x, sigmas, skip=default_policy())             # 2x: half the calls
    x, report = sample_dpmpp_2m(model, x, sigmas, skip=default_policy(speedup=3))    # a third of the calls
    x, report = sample_dpmpp_2m(model, x, sigmas, skip=default_policy(nfe=20))       # exactly 20 calls

It is ``Paced`` (``policies/paced.py``): exactly the budget's calls per sample on whatever grid it
runs, at a uniform stride with a linear eps forecast, re-planned online per sample to compute the
last steps when the sample's error estimate is rising there. How it was chosen
(``bench/budget_study.py``, ``docs/budget.md``): among the designs tried on the VALIDATION split
(classes 0-4, seed 5) of the digits MLP and the shapes UNet (the ``Budget`` quantile controller,
a ``LocalError`` threshold paced to a plan, a plan corridor, uniform stride with a fixed tail,
and this one), the one with the best margin over the better of fewer steps and uniform stride
pooled over both models and K = 15..35 of 50. The numbers quoted come from the TEST split
(classes 5-9, seeds 0, 3, 4) and the flow transformer, which chose nothing.

Without a budget, ``default_policy()`` runs at ``DEFAULT_SPEEDUP`` (2x: 25 of 50 calls), a stated
speed rather than a tolerance whose calls differ from model to model.
"""

from __future__ import annotations

import math

from .base import SkipPolicy
from .paced import Paced

__all__ = ["default_policy", "DEFAULT_SPEEDUP", "MAX_SPEEDUP", "DEFAULT_TOL"]

DEFAULT_SPEEDUP = 2.0
MAX_SPEEDUP = 5.0  # budgets from N / 5 to N calls: the range the policy was measured on
# The tolerance of the previous default, LocalError(max_skips=1) with Extrapolate(1) (the geometric
# mean of the two models' tolerances tuned to 30 of 50 calls; bench/results/calibration.md).
DEFAULT_TOL = 1.55e-3


def _number(name: str, value) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def default_policy(sampler: str | None = None, steps: int | None = None, *, nfe: int | None = None,
                   speedup: float | None = None) -> SkipPolicy:  # fmt: skip
    """The recommended policy: exactly ``nfe`` calls per sample, or ``steps / speedup`` of them
    (rounded, halves up), on whatever grid it runs; neither: ``speedup=2``.

    sampler: optional, a registered sampler with a library loop (``sample_`` prefix accepted); the
        recommendation is the same for every sampler, the name is only checked.
    steps: optional, the number of sampling steps, to check the budget against the grid now (it is
        checked when sampling starts anyway).
    nfe: calls per sample, an int from ceil(N / 5) to N for an N-step grid.
    speedup: steps / calls, a number from 1 to 5.
    Giving both ``nfe`` and ``speedup``, a value out of range or not a number, or a budget larger
    than the grid is a ValueError naming the argument (never a silent clamp).
    """
    if sampler is not None:
        from ..samplers.registry import get_sampler

        get_sampler(sampler, runnable=True)
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 5):
        raise ValueError(f"steps must be an int >= 5 or None, got {steps!r}")
    if nfe is not None and speedup is not None:
        raise ValueError(f"give nfe or speedup, not both (got nfe={nfe!r}, speedup={speedup!r})")
    if nfe is not None:
        if not isinstance(nfe, int) or isinstance(nfe, bool) or nfe < 1:
            raise ValueError(f"nfe must be an int >= 1 (calls per sample), got {nfe!r}")
        if steps is not None and not math.ceil(steps / MAX_SPEEDUP) <= nfe <= steps:
            raise ValueError(f"nfe must be in [{math.ceil(steps / MAX_SPEEDUP)}, {steps}] for {steps} steps, got {nfe}")
        return Paced(nfe=nfe, max_speedup=MAX_SPEEDUP)
    value = DEFAULT_SPEEDUP if speedup is None else _number("speedup", speedup)
    if not 1.0 <= value <= MAX_SPEEDUP:
        raise ValueError(f"speedup must be in [1, {MAX_SPEEDUP:g}] (steps / calls), got {speedup!r}")
    return Paced(speedup=value, max_speedup=MAX_SPEEDUP)
