"""What a diffusers scheduler's denoising loop looks like, in the library's terms.

``schedulerscheduler_plan(scheduler)`` reads a scheduler (after ``set_timesteps``) into a ``SchedulerPlan``:
the timestep and VE sigma of every model call of its loop, which calls start a step (only those
may skip; a Heun or KDPM2 step's second call and PNDM's repeated first timestep do not), the step
grid, the prediction type and the sampler it runs (a registry entry, measuring the latent the
scheduler holds). ``scheduler_sigmas``, ``start_scale`` and ``end_scale`` turn that into what the
library's samplers need to reproduce the pipeline. Schedulers the hook and the adapter cannot
handle are refused here, with an error naming the argument.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from ...samplers.registry import Sampler, registered

__all__ = ["SchedulerPlan", "scheduler_plan", "check_scheduler", "held_space", "scheduler_sampler", "is_flow", "prediction_type",
           "scheduler_sigmas", "start_scale", "end_scale", "PREDICTION_TYPES", "class_name"]  # fmt: skip

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow_prediction")

# Flow-matching schedulers the hook and the adapter understand: FlowMatchEuler (one call per step,
# sigmas s from the config's shift / mu), and the multistep solvers with ``use_flow_sigmas``.
FLOW_EULER_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)


@dataclass(frozen=True)
class SchedulerPlan:
    """The model calls of one denoising loop over ``scheduler.timesteps``.

    timesteps: [M] the loop's timesteps (one model call each); call_sigmas: [M] VE sigma of each
    call; first: [M] whether the call starts a step (only those may skip); grid: the step grid
    (sigmas of the first calls, then the final sigma), N + 1 entries.
    """

    timesteps: np.ndarray
    call_sigmas: np.ndarray
    first: np.ndarray
    final_sigma: float
    sampler: Sampler
    prediction_type: str
    checks_order: bool  # the scheduler reports state_in_first_order (two-call k-diffusion ports)

    @property
    def zero_last_step(self) -> bool:
        """The last step goes from sigma to the same sigma (DDIM with ``set_alpha_to_one=False``
        whose last timestep is 0: a model call that leaves the latent as is)."""
        return self.final_sigma >= self.call_sigmas[self.first][-1]

    def grid(self, begin: int = 0) -> np.ndarray:
        """The step grid from call ``begin`` on. A zero-length last step gets the final sigma 0
        here (the policies need a strictly decreasing grid; only the report's last entry uses it)."""
        final = 0.0 if self.zero_last_step else self.final_sigma
        return np.concatenate([self.call_sigmas[begin:][self.first[begin:]], [final]])


def class_name(obj: Any) -> str:
    return type(obj).__name__


def is_flow(scheduler: Any) -> bool:
    """Whether the scheduler runs a rectified-flow model (sigmas s in [0, 1], velocity outputs)."""
    return class_name(scheduler) in FLOW_EULER_SCHEDULERS or bool(scheduler.config.get("use_flow_sigmas", False))


def prediction_type(scheduler: Any) -> str:
    """What the model predicts under this scheduler (flow schedulers: the velocity)."""
    if class_name(scheduler) in FLOW_EULER_SCHEDULERS:
        return "flow_prediction"
    return scheduler.config.get("prediction_type", "epsilon")


def check_scheduler(scheduler: Any, name: str = "scheduler") -> None:
    """Refuse what the hook and the adapter cannot handle, naming the argument."""
    if not hasattr(scheduler, "config") or not hasattr(scheduler, "timesteps") or not callable(
        getattr(scheduler, "step", None)
    ):
        raise TypeError(f"{name} must be a diffusers scheduler, got {class_name(scheduler)}")
    config = scheduler.config
    cls = class_name(scheduler)
    if is_flow(scheduler):
        if config.get("invert_sigmas", False):
            raise ValueError(f"{name} ({cls}) inverts its sigmas (invert_sigmas=True, Mochi): not supported")
        if cls not in FLOW_EULER_SCHEDULERS and prediction_type(scheduler) != "flow_prediction":
            raise ValueError(
                f"{name} ({cls}) uses flow sigmas with prediction_type={prediction_type(scheduler)!r}: "
                "flow sigmas need prediction_type='flow_prediction'"
            )
        return
    if getattr(scheduler, "alphas_cumprod", None) is None:
        kind = "flow-matching scheduler" if "FlowMatch" in cls else "scheduler without a DDPM noise schedule (alphas_cumprod)"
        raise ValueError(
            f"{name} is a {cls}, a {kind}: not supported; supported are the DDPM-schedule schedulers (DDIM, Euler, "
            f"DPM-Solver, UniPC, ...), {', '.join(FLOW_EULER_SCHEDULERS)} and multistep schedulers with use_flow_sigmas=True"
        )
    prediction = prediction_type(scheduler)
    if prediction not in PREDICTION_TYPES or prediction == "flow_prediction":
        raise ValueError(f"{name}.config.prediction_type must be one of {PREDICTION_TYPES[:3]}, got {prediction!r}")
    if class_name(scheduler) == "PNDMScheduler" and not config.get("skip_prk_steps", False):
        raise ValueError(
            f"{name} is a PNDMScheduler in Runge-Kutta (PRK) mode, four model calls per step: not supported; "
            "use skip_prk_steps=True (PLMS, as Stable Diffusion does)"
        )


def _registered(scheduler: Any) -> Sampler | None:
    """The registry entry whose ``schedulers`` name this scheduler's class (None: not registered)."""
    cls = class_name(scheduler)
    if cls == "DPMSolverMultistepScheduler":  # one class, many solvers: only 2M with dpmsolver++ is ours
        c = scheduler.config
        if not (c.get("algorithm_type") == "dpmsolver++" and c.get("solver_order") == 2):
            return None
        if is_flow(scheduler):
            return registered().get("flow_dpmpp_2m")
    return next((s for s in registered().values() if cls in s.schedulers), None)


def held_space(scheduler: Any) -> str:
    """``"ve"`` if the scheduler holds the variance-exploding latent (Euler, Heun, LMS, KDPM2...),
    ``"vp"`` if it holds the variance-preserving one (DDIM, DPM-Solver, UniPC, DEIS, PNDM, DDPM).
    Registered scheduler classes take their registry entry's space; others (and subclasses) are
    recognised by ``init_noise_sigma > 1`` (only VE-holding schedulers scale the initial noise);
    flow schedulers hold the rectified-flow latent (``"flow"``)."""
    entry = _registered(scheduler)
    if entry is not None:
        return entry.space
    if is_flow(scheduler):
        return "flow"
    return "ve" if float(scheduler.init_noise_sigma) > 1.0 + 1e-6 else "vp"


def scheduler_sampler(scheduler: Any) -> Sampler:
    """The registry entry of the solver this scheduler runs, measuring the latent it holds; an
    unregistered scheduler is described under its class name (DPM-Solver variants other than 2M
    as ``dpm_solver_multistep(algorithm, order k)``)."""
    entry = _registered(scheduler)
    space = held_space(scheduler)
    if entry is not None:
        return entry if entry.space == space else replace(entry, space=space)
    cls = class_name(scheduler)
    if cls == "DPMSolverMultistepScheduler":
        c = scheduler.config
        cls = f"dpm_solver_multistep({c.get('algorithm_type')}, order {c.get('solver_order')})"
    return Sampler(cls, space, convention="flow" if is_flow(scheduler) else "ve")


def scheduler_plan(scheduler: Any, name: str = "scheduler") -> SchedulerPlan:
    check_scheduler(scheduler, name)
    if getattr(scheduler, "num_inference_steps", None) is None:
        raise ValueError(f"{name} has no inference timesteps yet: call {name}.set_timesteps(...) first")
    ts = scheduler.timesteps.detach().to("cpu", torch.float64).numpy()
    m = len(ts)
    checks_order = hasattr(scheduler, "state_in_first_order")
    if checks_order:  # Heun / KDPM2: first, second, first, second, ..., first (the last step has one call)
        first = np.arange(m) % 2 == 0
    else:  # a repeated timestep marks a corrector call (PNDM's first PLMS step)
        first = np.ones(m, dtype=bool)
        first[:-1] = ts[:-1] != ts[1:]
    sigmas = getattr(scheduler, "sigmas", None)
    if isinstance(sigmas, torch.Tensor) and len(sigmas) > m:
        s = sigmas.detach().to("cpu", torch.float64).numpy()
        call = s[:m].copy()
        interp = getattr(scheduler, "sigmas_interpol", None)  # KDPM2's midpoint calls
        if isinstance(interp, torch.Tensor):
            call[~first] = interp.detach().to("cpu", torch.float64).numpy()[:m][~first]
        final = float(s[-1])
    else:  # DDIM, DDPM, PNDM, LCM...: integer timesteps into alphas_cumprod (float32, as diffusers)
        if not np.all(ts == np.round(ts)):
            raise ValueError(f"{name} ({class_name(scheduler)}) has fractional timesteps but no sigmas")
        ac = scheduler.alphas_cumprod.detach().to("cpu", torch.float32)
        a = ac[torch.from_numpy(ts.astype(np.int64))]
        call = (((1 - a) / a) ** 0.5).to(torch.float64).numpy()
        fa = getattr(scheduler, "final_alpha_cumprod", None)
        if fa is None:
            final = 0.0
        else:
            fa = torch.as_tensor(fa, dtype=torch.float32)
            final = float(((1 - fa) / fa) ** 0.5)
    steps = call[first]
    if is_flow(scheduler) and (steps.max() > 1 or final < 0):
        raise ValueError(f"{name} ({class_name(scheduler)}) is a flow scheduler whose sigmas leave [0, 1]: {steps}")
    if not np.all(np.isfinite(steps)) or not np.all(steps[1:] < steps[:-1]) or not final >= 0:
        raise ValueError(f"{name} ({class_name(scheduler)}) gives a step grid that is not strictly decreasing: {steps}")
    return SchedulerPlan(
        timesteps=ts,
        call_sigmas=call,
        first=first,
        final_sigma=final,
        sampler=scheduler_sampler(scheduler),
        prediction_type=prediction_type(scheduler),
        checks_order=checks_order,
    )


def scheduler_sigmas(scheduler: Any) -> torch.Tensor:
    """The scheduler's step grid as VE sigmas (float64, N + 1 entries, after ``set_timesteps``):
    the sigma of each step's first model call, then the final sigma (0, or sigma(alphabar_0) for
    DDIM with ``set_alpha_to_one=False`` and for ``final_sigmas_type="sigma_min"``). Pass it to the
    library's samplers with ``denoiser(...)``; the sampler takes the same steps as the pipeline.

    Caveat: with ``timestep_spacing="linspace"`` diffusers' DDIM steps from t to ``t - T // N``,
    which is not the next grid point; no sampler on this grid (nor any consistent one) reproduces
    it. A DDIM grid whose last timestep is 0 with ``set_alpha_to_one=False`` ends with a step of
    length zero (sigma(alphabar_0) to itself): a ValueError, since a sampler grid must decrease
    (use ``steps_offset=1`` as Stable Diffusion does, or ``set_alpha_to_one=True``).
    """
    plan = scheduler_plan(scheduler)
    if plan.zero_last_step:
        raise ValueError(
            f"scheduler ({class_name(scheduler)}) ends with a zero-length step (its last timestep has the final "
            "alphabar): no strictly decreasing sigma grid reproduces it; use steps_offset=1 or set_alpha_to_one=True"
        )
    return torch.from_numpy(plan.grid())


def start_scale(scheduler: Any) -> float:
    """Factor from unit Gaussian noise to the library sampler's starting (VE) latent, such that
    ``noise * start_scale(s)`` equals the pipeline's initial latents ``noise * s.init_noise_sigma``
    taken to VE at the first sigma: ``init_noise_sigma * sqrt(1 + sigma_0^2)`` for VP-holding
    schedulers (DDIM, DPM-Solver: init_noise_sigma = 1), ``init_noise_sigma`` itself for Euler-like
    ones (sigma_max for linspace / trailing spacing, sqrt(sigma_max^2 + 1) for leading).
    Flow schedulers: 1 (the flow samplers start from the noise itself)."""
    plan = scheduler_plan(scheduler)
    if plan.sampler.convention == "flow":
        return 1.0
    init = float(scheduler.init_noise_sigma)
    s0 = float(plan.grid()[0])
    return init * math.sqrt(1 + s0 * s0) if plan.sampler.space == "vp" else init


def end_scale(scheduler: Any) -> float:
    """Factor from the library sampler's final (VE) latent to the latent the pipeline decodes:
    ``1 / sqrt(1 + sigma_final^2)`` for VP-holding schedulers (DDIM ends at alphabar_0 when
    ``set_alpha_to_one=False``), 1 for Euler-like and flow ones."""
    plan = scheduler_plan(scheduler)
    return 1 / math.sqrt(1 + plan.final_sigma**2) if plan.sampler.space == "vp" else 1.0
