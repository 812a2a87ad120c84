"""Evaluation: is skipping worth it? Imports the core; the core never imports it.

* ``metrics``: PSNR, SSIM, max-abs error per sample;
* ``baselines``: uniform stride, random masks, fewer steps at matched calls;
* ``suite``: ``evaluate``, every policy and baseline on every sampler, against the full-step
  output and an ODE truth;
* ``demo``: the main demo (``python -m adaptive_sampling demo``);
* ``workloads``: offline models (exact Gaussian and digits, the learned digits MLP, the shapes
  UNet, the flow transformer) and the calibrated schedules shipped for them.
"""

from .baselines import fewer_steps, random_mask, uniform_mask
from .metrics import max_abs_error, psnr, ssim
from .suite import BASELINES, Evaluation, Result, evaluate

__all__ = ["evaluate", "Evaluation", "Result", "BASELINES", "uniform_mask", "random_mask", "fewer_steps", "psnr", "ssim",
           "max_abs_error"]  # fmt: skip
