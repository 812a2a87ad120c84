"""adaptive_sampling: training-free adaptive step skipping for diffusion samplers.

Implements AdaptiveDiffusion (Ye et al., "Training-Free Adaptive Diffusion with Bounded
Difference Approximation Strategy", NeurIPS 2024) and what our measurements added to it: a
sampler skips a noise-prediction call when reusing (or forecasting) the previous prediction is
cheap, while every solver update still runs. Decisions are per sample by default.

    from adaptive_sampling import default_policy, sample_dpmpp_2m
    x, report = sample_dpmpp_2m(model, x, sigmas, skip=default_policy())
    print(report)

Data flow (one module or package per concept): ``schedules`` (sigma grids) -> ``models``
(adapters to the denoiser convention) -> ``samplers`` (steppers, loops, the registry) ->
``runner`` (one call's skipping machinery) <- ``policies`` (when to skip, what a skip gets) <-
``kernels`` (the fused decision kernel) -> ``report``; ``calibration`` beside them.
``integrations`` (k-diffusion, diffusers, distributed, bucketing) and ``evaluation`` (metrics,
baselines, evaluate, the demo, the workloads) import the core and are never imported by it.

Importing this package loads torch and numpy only (no k_diffusion, triton, scipy, matplotlib).
"""

from .calibration import calibrate
from .models import (
    denoiser_from_eps,
    denoiser_from_flow,
    denoiser_from_flow_eps,
    denoiser_from_flow_x0,
    denoiser_from_v,
    denoiser_from_x0,
)
from .policies import (
    Budget,
    BySampler,
    Calibrated,
    Controller,
    Extrapolate,
    FixedMask,
    LocalError,
    Paced,
    SkipPolicy,
    ThirdOrder,
    default_policy,
)
from .report import SkipReport
from .samplers import (
    Sampler,
    get_sampler,
    register_sampler,
    sample_ddim,
    sample_dpmpp_2m,
    sample_euler,
    sample_flow_dpmpp_2m,
    sample_flow_euler,
    sampler_names,
)
from .schedules import get_sigmas_ddpm, get_sigmas_exponential, get_sigmas_flow, get_sigmas_karras

__version__ = "0.1.0"

__all__ = [
    "default_policy",
    "ThirdOrder",
    "FixedMask",
    "LocalError",
    "Budget",
    "Paced",
    "Calibrated",
    "BySampler",
    "calibrate",
    "Extrapolate",
    "SkipPolicy",
    "Controller",
    "SkipReport",
    "Sampler",
    "register_sampler",
    "get_sampler",
    "sampler_names",
    "sample_ddim",
    "sample_euler",
    "sample_dpmpp_2m",
    "sample_flow_euler",
    "sample_flow_dpmpp_2m",
    "get_sigmas_karras",
    "get_sigmas_exponential",
    "get_sigmas_ddpm",
    "get_sigmas_flow",
    "denoiser_from_eps",
    "denoiser_from_v",
    "denoiser_from_x0",
    "denoiser_from_flow",
    "denoiser_from_flow_x0",
    "denoiser_from_flow_eps",
]
