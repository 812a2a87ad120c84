"""HOW the latent moves: one module per sampler (stepper, loop, registry entry) and the registry.

* ``registry``: ``Sampler`` (what the library knows about a sampler) and the table every other
  place reads (``get_sampler``, ``register_sampler``, ``sampler_names``);
* ``euler``, ``ddim``, ``dpmpp_2m``: the library's samplers in k-diffusion's VE convention;
* ``flow_euler``, ``flow_dpmpp_2m``: the samplers of rectified-flow models (SD3, Flux, Wan), in
  the flow convention (``conventions.FLOW``: sigmas s in [0, 1], starting at 1; DDIM on a flow
  model is flow Euler).

Every loop has k-diffusion's signature plus a keyword-only ``skip`` policy and returns
``(x, report)``::

    x, report = sample_euler(model, x, sigmas, skip=default_policy())

``model(x, sigma, **extra_args) -> denoised`` with x in VE scale and sigma shaped [B].
``skip=None`` calls the model at every step. Each step asks the per-call ``SkipRun`` for the
denoiser output (real or reused) and then ALWAYS performs the solver update, so a skipped call
changes the prediction the update uses, never the number of updates. The callback receives
k-diffusion's keys (``x, i, sigma, sigma_hat, denoised``) plus ``computed``: a [B] bool tensor,
which rows called the model at this step.
"""

from .registry import Sampler, default_space, get_sampler, register_sampler, resolve, sampler_names, unregister_sampler
from .euler import euler_step, sample_euler
from .ddim import ancestral_split, ddim_step, sample_ddim
from .dpmpp_2m import DPMSolverState, dpmpp_2m_step, sample_dpmpp_2m
from .flow_euler import flow_euler_step, sample_flow_euler
from .flow_dpmpp_2m import FlowDPMSolverState, flow_dpmpp_2m_step, sample_flow_dpmpp_2m

__all__ = [
    "Sampler",
    "register_sampler",
    "unregister_sampler",
    "get_sampler",
    "resolve",
    "sampler_names",
    "default_space",
    "euler_step",
    "ddim_step",
    "ancestral_split",
    "DPMSolverState",
    "dpmpp_2m_step",
    "sample_euler",
    "sample_ddim",
    "sample_dpmpp_2m",
    "flow_euler_step",
    "FlowDPMSolverState",
    "flow_dpmpp_2m_step",
    "sample_flow_euler",
    "sample_flow_dpmpp_2m",
]
