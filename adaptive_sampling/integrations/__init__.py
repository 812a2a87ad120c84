"""Integrations with other libraries' sampling machinery.

* ``diffusers``: a hook that skips whole UNet / transformer calls of diffusers pipelines, decided
  per prompt, and an adapter that runs a pipeline's model under this library's samplers
  (re-exported as ``adaptive_sampling.diffusers``).

The k-diffusion drop-in stays at ``adaptive_sampling.k_diffusion`` (a stable import path).
Nothing here is imported by ``import adaptive_sampling``.
"""
