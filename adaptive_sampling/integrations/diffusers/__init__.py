"""diffusers pipelines: whole-call skipping decided per prompt, and the denoiser adapter.

One module per concept:

* ``plan``: what a scheduler's loop looks like (timesteps, sigmas, which calls start a step, the
  sampler it runs) and the scales between the pipeline's latents and the library's;
* ``prediction``: epsilon / v / sample outputs as eps and back;
* ``adapter``: ``denoiser(pipe, ...)``, the pipeline's model as a k-diffusion-convention denoiser;
* ``hook``: ``apply(pipe, skip=...)``, the hook that skips whole model calls inside the pipeline.

    import adaptive_sampling.integrations.diffusers as asd
    with asd.apply(pipe, skip=default_policy()) as handle:
        images = pipe(prompts, num_inference_steps=50).images
    print(handle.report)

``diffusers`` itself is imported only when ``apply`` / ``denoiser`` run.
"""

from .adapter import DiffusersDenoiser, denoiser
from .hook import HOOK_NAME, SkipHandle, apply
from .plan import end_scale, held_space, scheduler_plan, scheduler_sigmas, start_scale

__all__ = [
    "apply",
    "SkipHandle",
    "HOOK_NAME",
    "denoiser",
    "DiffusersDenoiser",
    "scheduler_plan",
    "scheduler_sigmas",
    "start_scale",
    "end_scale",
    "held_space",
]
