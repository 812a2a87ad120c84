"""Whole-call skipping for diffusers pipelines, decided per prompt, and the denoiser adapter.

The implementation lives in ``adaptive_sampling.integrations.diffusers`` (its docstring states the
semantics); this module is the public import path::

    import adaptive_sampling.diffusers as asd
    handle = asd.apply(pipe, skip=ThirdOrder())

``diffusers`` itself is imported only when ``apply`` / ``denoiser`` run.
"""

from .integrations.diffusers import (  # noqa: F401
    HOOK_NAME,
    DiffusersDenoiser,
    SkipHandle,
    apply,
    denoiser,
    end_scale,
    held_space,
    scheduler_sigmas,
    start_scale,
)
from .integrations.diffusers import __all__  # noqa: F401
