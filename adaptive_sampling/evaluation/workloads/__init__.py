"""Offline workloads: denoisers that need no download (import the submodules directly).

* ``gaussian``: Gaussian data, exact denoiser and closed-form ODE solution (checks mechanics to round-off).
* ``digits``: sklearn's 8x8 digits (1797 images, 10 classes) and their exact optimal denoiser,
  class-conditional with classifier-free guidance. Exact but memorising: checks mechanics, cannot
  rank skip policies by quality. Needs scikit-learn.
* ``learned``: a small learned class-conditional denoiser of the same digits (EDM preconditioning,
  about 1M parameters, shipped checkpoint), smooth and generalising: the workload for quality
  comparisons. ``load_pretrained()`` and ``cfg_denoiser(model, cond_scale)``.
* ``shapes``: a Stable-Diffusion-shaped model: a diffusers ``UNet2DModel`` predicting eps on SD's
  DDPM schedule, class-conditional with guidance, trained on procedural 32x32 RGB shapes
  (``make_data``); ``denoiser(cond_scale)`` (k-diffusion convention), ``load_pretrained()`` (the raw
  UNet and scheduler for diffusers), ``sigmas(steps, spacing)``. Needs diffusers and safetensors.
* ``calibrated``: the calibrated skip schedules and grids shipped for both learned models.

Nothing is imported here, so ``import adaptive_sampling`` stays light.
"""
