"""adaptive_sampling: training-free adaptive step skipping for diffusion samplers.

Implements AdaptiveDiffusion (Ye et al., "Training-Free Adaptive Diffusion with Bounded
Difference Approximation Strategy", NeurIPS 2024): a sampler skips a noise-prediction call
when the recent latent trajectory is locally smooth, reusing the previous prediction, while
every solver update still runs. Decisions are per sample by default.

    from adaptive_sampling import ThirdOrder, sample_dpmpp_2m
    x, report = sample_dpmpp_2m(model, x, sigmas, skip=ThirdOrder(delta=0.01, max_skips=4))
    print(report.nfe)

Importing this package loads torch and numpy only (no k_diffusion, triton, scipy, matplotlib).
"""

from .policies import Budget, Calibrated, Controller, Extrapolate, FixedMask, LocalError, SkipPolicy, ThirdOrder, default_space
from .models import denoiser_from_eps, denoiser_from_v, denoiser_from_x0
from .report import SkipReport
from .sampling import sample_ddim, sample_dpmpp_2m, sample_euler
from .calibration import calibrate
from .recommended import default_policy
from .schedules import get_sigmas_ddpm, get_sigmas_exponential, get_sigmas_karras

__version__ = "0.1.0"

__all__ = [
    "ThirdOrder",
    "FixedMask",
    "LocalError",
    "Budget",
    "Calibrated",
    "calibrate",
    "default_policy",
    "Extrapolate",
    "SkipPolicy",
    "Controller",
    "SkipReport",
    "default_space",
    "sample_ddim",
    "sample_euler",
    "sample_dpmpp_2m",
    "get_sigmas_karras",
    "get_sigmas_exponential",
    "get_sigmas_ddpm",
    "denoiser_from_eps",
    "denoiser_from_v",
    "denoiser_from_x0",
]
