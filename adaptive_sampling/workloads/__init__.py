"""Offline workloads: denoisers that need no download (import the submodules directly).

* ``gaussian``: Gaussian data, exact denoiser and closed-form ODE solution (checks mechanics to round-off).
* ``digits``: sklearn's 8x8 digits (1797 images, 10 classes) and their exact optimal denoiser,
  class-conditional with classifier-free guidance. Exact but memorising: checks mechanics, cannot
  rank skip policies by quality. Needs scikit-learn.
* ``learned``: a small learned class-conditional denoiser of the same digits (EDM preconditioning,
  about 1M parameters, shipped checkpoint), smooth and generalising: the workload for quality
  comparisons. ``load_pretrained()`` and ``cfg_denoiser(model, cond_scale)``.

Nothing is imported here, so ``import adaptive_sampling`` stays light.
"""
