"""Former home of the skip policies; they live in ``adaptive_sampling.policies`` now.

Kept so that ``from adaptive_sampling.criteria import ThirdOrder`` keeps working.
"""

from .policies import FixedMask, SkipPolicy, ThirdOrder, default_space
from .policies.kernel_controller import KernelController as SkipController
from .policies.kernel_controller import NonFiniteLatent

__all__ = ["SkipPolicy", "ThirdOrder", "FixedMask", "SkipController", "NonFiniteLatent", "default_space"]
