"""Skip policies: WHEN a sampler may skip a model call, and WHAT a skipped call gets instead.

One module per rule; the protocol every policy follows (with every optional member and a
complete example of a third-party policy) is in ``base``:

* ``base``: ``SkipPolicy`` / ``Controller`` (the interface the sampling loops drive) and
  ``NonFiniteLatent``;
* ``reuse``: what a skipped call gets: ``"copy"`` (the last eps) or ``Extrapolate(order, variable)``;
* ``third_order``: ``ThirdOrder``, the AdaptiveDiffusion rule (reference code and paper criteria);
* ``fixed_mask``: ``FixedMask``, a given compute mask (baselines, oracles);
* ``local_error``: ``LocalError``, an embedded-pair estimate of the skip's one-step error;
* ``budget``: ``Budget``, exactly ``nfe`` calls per sample, allocated online by a scored rule;
* ``calibrated``: ``Calibrated``, a schedule searched offline (``adaptive_sampling.calibrate``),
  keyed by log sigma, saved as JSON, optionally refined per sample online;
* ``by_sampler``: ``BySampler``, one policy object holding a different policy per sampler;
* ``paced``: ``Paced``, exactly K calls per sample on any grid (the speed knob);
* ``default``: ``default_policy()``, the measured recommendation (``Paced`` at 2x, or a budget);
* ``kernel_controller``: the controller behind ``ThirdOrder`` and ``FixedMask`` (fused kernel).
"""

from .base import Controller, NonFiniteLatent, SkipPolicy, check_policy
from .budget import Budget
from .by_sampler import BySampler
from .calibrated import Calibrated
from .default import default_policy
from .fixed_mask import FixedMask
from .kernel_controller import KernelController
from .local_error import LocalError
from .paced import Paced
from .reuse import Copy, Extrapolate, make_reuse
from .third_order import ThirdOrder

__all__ = [
    "SkipPolicy",
    "Controller",
    "NonFiniteLatent",
    "check_policy",
    "ThirdOrder",
    "FixedMask",
    "LocalError",
    "Budget",
    "Paced",
    "Calibrated",
    "BySampler",
    "default_policy",
    "Copy",
    "Extrapolate",
    "make_reuse",
    "KernelController",
]
