"""Skip policies: WHEN a sampler may skip a model call, and WHAT a skipped call gets instead.

One module per rule; the protocol every policy follows (and a complete example of a
third-party policy) is in ``base``:

* ``base``: ``SkipPolicy`` / ``Controller``, the interface the sampling loops drive;
* ``reuse``: what a skipped call gets: ``"copy"`` (the last eps) or ``Extrapolate(order, variable)``;
* ``third_order``: ``ThirdOrder``, the AdaptiveDiffusion rule (reference code and paper criteria);
* ``fixed_mask``: ``FixedMask``, a given compute mask (baselines, oracles);
* ``local_error``: ``LocalError``, an embedded-pair estimate of the skip's one-step error;
* ``budget``: ``Budget``, exactly ``nfe`` calls per sample, allocated online by a rule;
* ``calibrated``: ``Calibrated``, a schedule searched offline (``adaptive_sampling.calibrate``),
  keyed by log sigma, saved as JSON, optionally refined per sample online;
* ``by_sampler``: ``BySampler``, one policy object holding a different policy per sampler;
* ``kernel_controller``: the controller behind ``ThirdOrder`` and ``FixedMask`` (fused kernel).
"""

from .base import Controller, SkipPolicy
from .budget import Budget
from .by_sampler import BySampler
from .calibrated import Calibrated
from .fixed_mask import FixedMask
from .kernel_controller import KernelController, NonFiniteLatent
from .local_error import LocalError
from .reuse import Copy, Extrapolate, make_reuse
from .third_order import ThirdOrder, default_space

__all__ = [
    "SkipPolicy",
    "Controller",
    "ThirdOrder",
    "FixedMask",
    "LocalError",
    "Budget",
    "Calibrated",
    "BySampler",
    "Copy",
    "Extrapolate",
    "make_reuse",
    "default_space",
    "KernelController",
    "NonFiniteLatent",
]
