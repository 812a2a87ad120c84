"""Integrations with other libraries' sampling machinery; one module (or package) each, one import path each.

* ``k_diffusion``: ``adaptive(K.sampling.sample_*)``, any k-diffusion sampler as an adaptive drop-in;
* ``diffusers``: a hook that skips whole UNet / transformer calls of diffusers pipelines, decided
  per prompt, and an adapter that runs a pipeline's model under this library's samplers;
* ``distributed``: identical decisions across processes (data parallel, sharded latents);
* ``bucketing``: pad per-sample sub-batches to a few sizes, for compiled models.

The core never imports these; ``import adaptive_sampling`` does not load them.
"""
