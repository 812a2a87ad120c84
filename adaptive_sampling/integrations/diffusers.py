"""Skip whole UNet / transformer calls of diffusers pipelines, decided per prompt; and run a
pipeline's model under this library's samplers.

Two ways in (both import ``diffusers`` only when called; ``import adaptive_sampling`` stays light):

1. **The pipeline hook** keeps the pipeline, its scheduler and its loop::

       import adaptive_sampling.diffusers as asd
       from adaptive_sampling import ThirdOrder

       with asd.apply(pipe, skip=ThirdOrder(delta=0.01)) as handle:
           images = pipe(prompts, num_inference_steps=50).images
       print(handle.report.nfe)            # model calls per image, [B]

   ``apply`` registers a ``diffusers.hooks.ModelHook`` on ``pipe.unet`` (or ``pipe.transformer``)
   and wraps ``pipe.progress_bar``, which every diffusers pipeline enters around its denoising loop.
   The hook acts only inside that loop; model calls elsewhere run unchanged.

2. **The denoiser adapter** turns the pipeline's model into a k-diffusion-convention denoiser, so
   the library's samplers (``sample_ddim``, ``sample_euler``, ``sample_dpmpp_2m``, and
   ``adaptive_sampling.k_diffusion.adaptive(K.sampling.*)``) drive it::

       pipe.scheduler.set_timesteps(50)
       model = asd.denoiser(pipe, guidance_scale=7.5)
       cond, uncond = pipe.encode_prompt(prompts, "cpu", 1, True)
       x = noise * asd.start_scale(pipe.scheduler)
       x, report = sample_dpmpp_2m(model, x, asd.scheduler_sigmas(pipe.scheduler),
                                   extra_args={"prompt_embeds": cond, "negative_prompt_embeds": uncond},
                                   skip=ThirdOrder())
       latents = x * asd.end_scale(pipe.scheduler)     # what the pipeline would decode

Semantics of the hook
---------------------
* **Per prompt.** The model sees classifier-free guidance as one call on ``[uncond(B); cond(B)]``
  (the latents repeated). Rows ``b`` and ``B + b`` are one sample: they skip or compute together,
  and the whole guided prediction is reused (both branches). With ``num_images_per_prompt = m``
  the ``B = prompts * m`` rows are each their own sample. ``report.computed`` is ``[B, N]``. The
  CFG layout is detected at the first model call of each loop: the input's two halves equal (or
  ``cfg=True / False``; pass ``cfg=False`` if you feed identical latents to different rows
  without guidance, else those rows would share their decisions).
* **Sub-batches.** Rows that compute go to the model as one sub-batch: ``sample`` /
  ``hidden_states``, ``encoder_hidden_states``, a non-scalar ``timestep`` and every tensor argument
  whose first dimension is the model batch (recursively through dicts, lists and tuples, e.g.
  ``added_cond_kwargs``, attention masks, ControlNet residuals) are sliced alike. Rows that skip
  get the reused prediction without a model call; when no row computes the model is not called.
  ``pad_to="pow2"`` (or a list of sizes) pads a sub-batch to a few bucket sizes, for compiled
  models (``adaptive_sampling.bucketing``). A compiled model works: ``pipe.unet =
  torch.compile(pipe.unet)``, then ``apply``.
  A ControlNet is a separate module: its own call still runs on every row.
* **Reuse is of eps, by prediction type.** ``epsilon`` outputs are eps. ``v_prediction`` and
  ``sample`` outputs are converted to eps with the latent and sigma of the call they came from,
  and the reused eps is converted back with the CURRENT latent and sigma (a copied v is not a
  copied eps). Output channels beyond the latent's (a learned variance, e.g. PixArt) are copied
  from the row's last computed call. ``reuse=Extrapolate(...)`` forecasts eps per row.
* **Which latent the rule measures, and sigma.** The model input ``u`` of every supported
  scheduler is the variance-preserving latent (DDIM, DPM-Solver, UniPC, DEIS, PNDM, DDPM hold it;
  Euler, Heun, LMS, KDPM2 hold the variance-exploding ``x`` and feed ``scale_model_input(x) =
  x / sqrt(1 + sigma^2)``). sigma is recovered from the timestep's position in the scheduler's
  grid (``scheduler.sigmas``, or ``alphas_cumprod`` at the timestep for DDIM-like schedulers), and
  the policy sees ``x = u * sqrt(1 + sigma^2)`` with that sigma. A ``ThirdOrder`` (or ``Budget``
  of ``ThirdOrder``) policy with ``space=None`` then measures the latent the scheduler holds: VP
  for DDIM / DPM-Solver / UniPC / DEIS / PNDM / DDPM, VE for Euler / Heun / LMS / KDPM2 (the
  reference code's choice for DDIM, DPM-Solver++ and Euler). Pass ``space=`` to choose.
* **Schedulers.** One model call per loop iteration: DDIM, Euler, DPM-Solver multistep (any order
  and algorithm on a DDPM schedule), and the other DDPM-schedule schedulers (LMS, Euler
  ancestral, UniPC, DEIS, DDPM, DPM-Solver single-step, LCM...): every call after the policy's
  warm-up may skip. Two-call schedulers (Heun, KDPM2, KDPM2 ancestral, DPM-Solver SDE) and PNDM's
  first PLMS step: only the FIRST call of a step may skip (the k-diffusion wrapper's rule); the
  second (corrector) call always runs on every row and its eps is the next one reused
  (``report.extra_evaluations``). Flow-matching and EDM schedulers (no ``alphas_cumprod``) are
  refused with an error, as is PNDM in its Runge-Kutta (PRK) mode.
* **State is per pipeline call** (per denoising loop): created at the loop's first model call,
  dropped when the loop ends or fails (an exception anywhere in the loop), and by diffusers'
  ``reset_stateful_hooks()``. ``handle.report`` is the report of the last loop that ran to the end
  (``None`` while a call runs, after a failed or interrupted call). The final latent is read from
  the scheduler's last ``step`` output (to finish the report's signals and check it for NaN/Inf).
  One pipeline call at a time per pipeline (diffusers pipelines are not thread-safe anyway).
* One host read per model call for the decision (the policy's), one for the timestep check; the
  first call of a loop also compares the CFG halves.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from ..bucketing import bucket_sizes, check_pad_to, padded_rows
from ..policies import Budget, ThirdOrder, default_space
from ..runner import SkipRun, slice_rows

__all__ = [
    "apply",
    "SkipHandle",
    "denoiser",
    "DiffusersDenoiser",
    "scheduler_sigmas",
    "start_scale",
    "end_scale",
    "held_space",
    "HOOK_NAME",
]

HOOK_NAME = "adaptive_sampling_skip"

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

# Schedulers that hold the variance-exploding latent (k-diffusion ports; scale_model_input divides
# by sqrt(sigma^2 + 1)). Subclasses are recognised by their init_noise_sigma > 1 as well.
_VE_SCHEDULERS = {
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler",
    "LMSDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "DPMSolverSDEScheduler",
}

# The library / k-diffusion name of the same solver (the report's ``sampler`` and the policies'
# space default); other schedulers are named after their class.
_SAMPLER_NAMES = {
    "DDIMScheduler": "ddim",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_ancestral",
    "HeunDiscreteScheduler": "heun",
    "LMSDiscreteScheduler": "lms",
    "KDPM2DiscreteScheduler": "dpm_2",
    "KDPM2AncestralDiscreteScheduler": "dpm_2_ancestral",
    "DPMSolverSDEScheduler": "dpmpp_sde",
}


# --------------------------------------------------------------------------------------------
# What a scheduler's loop looks like: the sigma of every model call, which calls start a step
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """The model calls of one denoising loop over ``scheduler.timesteps``.

    timesteps: [M] the loop's timesteps (one model call each); call_sigmas: [M] VE sigma of each
    call; first: [M] whether the call starts a step (only those may skip); grid: the step grid
    (sigmas of the first calls, then the final sigma), N + 1 entries.
    """

    timesteps: np.ndarray
    call_sigmas: np.ndarray
    first: np.ndarray
    final_sigma: float
    space: str
    name: str
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


def _cls(obj: Any) -> str:
    return type(obj).__name__


def _check_scheduler(scheduler: Any, name: str = "scheduler") -> None:
    """Refuse what the hook and the adapter cannot handle, naming the argument."""
    if not hasattr(scheduler, "config") or not hasattr(scheduler, "timesteps") or not callable(
        getattr(scheduler, "step", None)
    ):
        raise TypeError(f"{name} must be a diffusers scheduler, got {_cls(scheduler)}")
    if getattr(scheduler, "alphas_cumprod", None) is None:
        raise ValueError(
            f"{name} is a {_cls(scheduler)}, which has no DDPM noise schedule (alphas_cumprod): "
            "flow-matching and EDM schedulers are not supported"
        )
    config = scheduler.config
    if config.get("use_flow_sigmas", False):
        raise ValueError(f"{name} ({_cls(scheduler)}) uses flow-matching sigmas (use_flow_sigmas=True): not supported")
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise ValueError(f"{name}.config.prediction_type must be one of {PREDICTION_TYPES}, got {prediction!r}")
    if _cls(scheduler) == "PNDMScheduler" and not config.get("skip_prk_steps", False):
        raise ValueError(
            f"{name} is a PNDMScheduler in Runge-Kutta (PRK) mode, four model calls per step: not supported; "
            "use skip_prk_steps=True (PLMS, as Stable Diffusion does)"
        )


def held_space(scheduler: Any) -> str:
    """``"ve"`` if the scheduler holds the variance-exploding latent (Euler, Heun, LMS, KDPM2...),
    ``"vp"`` if it holds the variance-preserving one (DDIM, DPM-Solver, UniPC, DEIS, PNDM, DDPM)."""
    if _cls(scheduler) in _VE_SCHEDULERS:
        return "ve"
    return "ve" if float(scheduler.init_noise_sigma) > 1.0 + 1e-6 else "vp"


def _sampler_name(scheduler: Any) -> str:
    cls = _cls(scheduler)
    if cls == "DPMSolverMultistepScheduler":
        c = scheduler.config
        if c.get("algorithm_type") == "dpmsolver++" and c.get("solver_order") == 2:
            return "dpmpp_2m"
        return f"dpm_solver_multistep({c.get('algorithm_type')}, order {c.get('solver_order')})"
    return _SAMPLER_NAMES.get(cls, cls)


def _plan(scheduler: Any, name: str = "scheduler") -> _Plan:
    _check_scheduler(scheduler, name)
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
            raise ValueError(f"{name} ({_cls(scheduler)}) has fractional timesteps but no sigmas")
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
    if not np.all(np.isfinite(steps)) or not np.all(steps[1:] < steps[:-1]) or not final >= 0:
        raise ValueError(f"{name} ({_cls(scheduler)}) gives a step grid that is not strictly decreasing: {steps}")
    return _Plan(
        timesteps=ts,
        call_sigmas=call,
        first=first,
        final_sigma=final,
        space=held_space(scheduler),
        name=_sampler_name(scheduler),
        prediction_type=scheduler.config.get("prediction_type", "epsilon"),
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
    plan = _plan(scheduler)
    if plan.zero_last_step:
        raise ValueError(
            f"scheduler ({_cls(scheduler)}) ends with a zero-length step (its last timestep has the final "
            "alphabar): no strictly decreasing sigma grid reproduces it; use steps_offset=1 or set_alpha_to_one=True"
        )
    return torch.from_numpy(plan.grid())


def start_scale(scheduler: Any) -> float:
    """Factor from unit Gaussian noise to the library sampler's starting (VE) latent, such that
    ``noise * start_scale(s)`` equals the pipeline's initial latents ``noise * s.init_noise_sigma``
    taken to VE at the first sigma: ``init_noise_sigma * sqrt(1 + sigma_0^2)`` for VP-holding
    schedulers (DDIM, DPM-Solver: init_noise_sigma = 1), ``init_noise_sigma`` itself for Euler-like
    ones (sigma_max for linspace / trailing spacing, sqrt(sigma_max^2 + 1) for leading)."""
    plan = _plan(scheduler)
    init = float(scheduler.init_noise_sigma)
    s0 = float(plan.grid()[0])
    return init * math.sqrt(1 + s0 * s0) if plan.space == "vp" else init


def end_scale(scheduler: Any) -> float:
    """Factor from the library sampler's final (VE) latent to the latent the pipeline decodes:
    ``1 / sqrt(1 + sigma_final^2)`` for VP-holding schedulers (DDIM ends at alphabar_0 when
    ``set_alpha_to_one=False``), 1 for Euler-like ones."""
    plan = _plan(scheduler)
    return 1 / math.sqrt(1 + plan.final_sigma**2) if plan.space == "vp" else 1.0


# --------------------------------------------------------------------------------------------
# Prediction types (u: the VP model input, s: VE sigma; all in the computing dtype)
# --------------------------------------------------------------------------------------------


def _eps_from(pred: torch.Tensor, u: torch.Tensor, s: float, kind: str) -> torch.Tensor:
    if kind == "epsilon":
        return pred
    a = 1 / math.sqrt(1 + s * s)
    if kind == "v_prediction":  # v = a eps - sv x0, u = a x0 + sv eps  =>  eps = sv u + a v
        return (s * a) * u + a * pred
    return (u - a * pred) / (s * a)  # sample: x0


def _pred_from(eps: torch.Tensor, u: torch.Tensor, s: float, kind: str) -> torch.Tensor:
    if kind == "epsilon":
        return eps
    a = 1 / math.sqrt(1 + s * s)
    if kind == "v_prediction":
        return (eps - (s * a) * u) / a
    return (u - (s * a) * eps) / a


def _rows(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (like.ndim - 1)))


# --------------------------------------------------------------------------------------------
# The denoiser adapter
# --------------------------------------------------------------------------------------------


def _pipeline_model(pipe_or_model: Any, name: str) -> torch.nn.Module:
    for attr in ("unet", "transformer"):
        model = getattr(pipe_or_model, attr, None)
        if isinstance(model, torch.nn.Module):
            return model
    if isinstance(pipe_or_model, torch.nn.Module):
        return pipe_or_model
    raise TypeError(
        f"{name} must be a diffusers pipeline with a unet or transformer (or the model itself), got {_cls(pipe_or_model)}"
    )


def _model_output(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    sample = getattr(out, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    raise TypeError(f"the model returned {_cls(out)}; expected a tensor, a tuple or an output with .sample")


def _rewrap(template: Any, tensor: torch.Tensor) -> Any:
    """``tensor`` in the container the model returns (``template``: one of its outputs)."""
    if isinstance(template, torch.Tensor):
        return tensor
    if isinstance(template, tuple):
        return (tensor, *template[1:])
    if isinstance(template, list):
        return [tensor, *template[1:]]
    return dataclasses.replace(template, **{dataclasses.fields(template)[0].name: tensor})


def _double(value: Any, batch: int, negative: Any = None) -> Any:
    """The CFG batch of one argument: ``[negative; value]`` if a negative is given, else the
    batch-leading tensors repeated ``[value; value]`` (recursively through dicts); others as is."""
    if negative is not None:
        if isinstance(value, torch.Tensor):
            return torch.cat([negative, value])
        if isinstance(value, dict):
            return {k: _double(v, batch, negative.get(k)) for k, v in value.items()}
        return value
    if isinstance(value, torch.Tensor):
        return torch.cat([value, value]) if value.ndim and value.shape[0] == batch else value
    if isinstance(value, dict):
        return {k: _double(v, batch) for k, v in value.items()}
    return value


class DiffusersDenoiser:
    """A diffusers UNet / transformer as a k-diffusion denoiser; made by ``denoiser()``.

    ``model(x, sigma, **extra_args) -> denoised`` with x the VE latent [B, C, H, W] and sigma [B].
    The network gets ``x / sqrt(1 + sigma^2)`` (what the pipeline feeds it), the scheduler's
    timestep of that sigma, and ``extra_args`` (``prompt_embeds`` is an alias of
    ``encoder_hidden_states``). With ``guidance_scale > 1`` the call is one batch
    ``[uncond; cond]`` as in the pipelines: every argument ``k`` with a ``negative_k`` counterpart
    (``negative_prompt_embeds``, ``negative_added_cond_kwargs``, ...) is stacked ``[negative_k; k]``,
    other batch-leading tensors are repeated, and the outputs are combined as the pipelines do
    (``uncond + g * (cond - uncond)``, then ``guidance_rescale``), in the model's output space.
    Output channels beyond the latent's (learned variance) are dropped.

    Timesteps: a sigma on the scheduler's current grid (``scheduler_sigmas``, also the midpoint
    sigmas of KDPM2) maps to the scheduler's own timestep; any other sigma to the continuous
    timestep of k-diffusion's ``sigma_to_t`` (interpolated in log sigma over the training sigmas).
    The scheduler is read at each call, so ``set_timesteps`` may change between runs.
    """

    def __init__(self, model, scheduler, guidance_scale: float, guidance_rescale: float, prediction_type: str | None):
        self.model = model
        self.scheduler = scheduler
        self.guidance_scale = float(guidance_scale)
        self.guidance_rescale = float(guidance_rescale)
        self.prediction_type = prediction_type or scheduler.config.get("prediction_type", "epsilon")
        ac = scheduler.alphas_cumprod.detach().to("cpu", torch.float64)
        self._log_train_sigmas = (((1 - ac) / ac) ** 0.5).log()

    @property
    def cfg(self) -> bool:
        return self.guidance_scale > 1

    def timesteps(self, sigma: torch.Tensor) -> torch.Tensor:
        """The timestep of each sigma ([B]) as float32, on sigma's device (no host read)."""
        plan = _plan(self.scheduler)
        dev = sigma.device
        table_s = torch.from_numpy(plan.call_sigmas).to(dev, torch.float32)
        table_t = torch.from_numpy(plan.timesteps).to(dev, torch.float32)
        s = sigma.to(torch.float32)
        dist = (s[:, None] - table_s[None, :]).abs()
        j = dist.argmin(dim=1)
        exact = dist.gather(1, j[:, None])[:, 0] <= 1e-5 * s
        # k-diffusion's DiscreteSchedule.sigma_to_t (quantize=False)
        log_sigmas = self._log_train_sigmas.to(dev, torch.float32)
        log_s = s.clamp(min=1e-10).log()
        dists = log_s - log_sigmas[:, None]
        low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=len(log_sigmas) - 2)
        w = ((log_sigmas[low] - log_s) / (log_sigmas[low] - log_sigmas[low + 1])).clamp(0, 1)
        t_cont = (1 - w) * low + w * (low + 1)
        return torch.where(exact, table_t[j], t_cont)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **extra_args) -> torch.Tensor:
        if not isinstance(sigma, torch.Tensor) or sigma.ndim != 1 or sigma.shape[0] != x.shape[0]:
            raise ValueError(f"sigma must be a [batch] tensor for x of shape {tuple(x.shape)}")
        kw = dict(extra_args)
        if "prompt_embeds" in kw:
            kw["encoder_hidden_states"] = kw.pop("prompt_embeds")
        if "negative_prompt_embeds" in kw:
            kw["negative_encoder_hidden_states"] = kw.pop("negative_prompt_embeds")
        negatives = {k[len("negative_"):]: kw.pop(k) for k in [k for k in kw if k.startswith("negative_")]}
        for k in negatives:
            if k not in kw:
                raise ValueError(f"negative_{k} was given without {k}")
        B = x.shape[0]
        s = _rows(sigma, x)
        u = x / ((s**2 + 1) ** 0.5)  # the expression of diffusers' scale_model_input
        t = self.timesteps(sigma)
        dtype = getattr(self.model, "dtype", x.dtype)
        if self.cfg:
            if "encoder_hidden_states" in kw and "encoder_hidden_states" not in negatives:
                raise ValueError("guidance_scale > 1 needs negative_prompt_embeds (the unconditional embeddings)")
            kw = {k: _double(v, B, negatives.get(k)) for k, v in kw.items()}
            u, t = torch.cat([u, u]), torch.cat([t, t])
        out = _model_output(self.model(u.to(dtype), timestep=t, return_dict=False, **kw))
        pred = out[:, : x.shape[1]].to(x.dtype)
        if self.cfg:
            uncond, cond = pred.chunk(2)
            pred = uncond + self.guidance_scale * (cond - uncond)
            if self.guidance_rescale > 0:
                from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

                pred = rescale_noise_cfg(pred, cond, guidance_rescale=self.guidance_rescale)
        if self.prediction_type == "epsilon":  # diffusers' Euler: sample - sigma * model_output
            return x - s * pred
        if self.prediction_type == "v_prediction":
            return pred * (-s / (s**2 + 1) ** 0.5) + (x / (s**2 + 1))
        return pred


def denoiser(
    pipe_or_model: Any,
    scheduler: Any = None,
    guidance_scale: float = 1.0,
    *,
    guidance_rescale: float = 0.0,
    prediction_type: str | None = None,
) -> DiffusersDenoiser:
    """A k-diffusion-convention denoiser ``model(x, sigma, **extra_args) -> denoised`` from a
    diffusers pipeline (its ``unet`` or ``transformer``) or a model; see ``DiffusersDenoiser``.

    scheduler: gives sigma <-> timestep and the prediction type (default ``pipe.scheduler``);
        call its ``set_timesteps`` before sampling so grid sigmas map to its exact timesteps.
    guidance_scale: classifier-free guidance inside the denoiser (> 1 needs ``negative_prompt_embeds``).
    guidance_rescale: the pipelines' ``guidance_rescale`` (0 = off).
    prediction_type: overrides ``scheduler.config.prediction_type``.

    With ``scheduler_sigmas``, ``start_scale`` and ``end_scale`` the library's ``sample_ddim``,
    ``sample_euler`` and ``sample_dpmpp_2m`` reproduce the diffusers pipelines with DDIM, Euler and
    DPM-Solver++(2M) to float32 round-off (tests/test_diffusers.py states the figures).
    """
    model = _pipeline_model(pipe_or_model, "pipe_or_model")
    if scheduler is None:
        scheduler = getattr(pipe_or_model, "scheduler", None)
        if scheduler is None:
            raise TypeError("scheduler is required when pipe_or_model is a model, not a pipeline")
    _check_scheduler(scheduler, "scheduler")
    for name, value in (("guidance_scale", guidance_scale), ("guidance_rescale", guidance_rescale)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES} or None, got {prediction_type!r}")
    return DiffusersDenoiser(model, scheduler, guidance_scale, guidance_rescale, prediction_type)


# --------------------------------------------------------------------------------------------
# The pipeline hook
# --------------------------------------------------------------------------------------------


def _policy_for(policy: Any, space: str, name: str) -> Any:
    """Make a ``space=None`` ThirdOrder (or Budget of one) measure the latent the scheduler holds
    when the sampler name's default (``default_space``) would differ."""
    if space == default_space(name):
        return policy
    if isinstance(policy, ThirdOrder) and policy.space is None:
        return dataclasses.replace(policy, space=space)
    if isinstance(policy, Budget) and isinstance(policy.rule, ThirdOrder) and policy.rule.space is None:
        return dataclasses.replace(policy, rule=dataclasses.replace(policy.rule, space=space))
    return policy


def _timestep_value(t: Any) -> float:
    """The (single) timestep of a model call; one host read."""
    if isinstance(t, torch.Tensor):
        if t.numel() == 1:
            return float(t.reshape(()))
        lo, hi = torch.stack(torch.aminmax(t.reshape(-1).to(torch.float64))).tolist()
        if lo != hi:
            raise ValueError(f"the rows of one model call have different timesteps ({lo} .. {hi}): not supported")
        return lo
    if isinstance(t, (int, float, np.integer, np.floating)):
        return float(t)
    raise TypeError(f"the model's timestep must be a tensor or a number, got {_cls(t)}")


_MISSING = object()


def _close(t: float, ref: float) -> bool:  # fp16 timesteps round to ~5e-4 relative
    return abs(t - ref) <= 5e-4 * abs(ref) + 1e-6


class _Loop:
    """The state of one denoising loop (one pipeline call)."""

    def __init__(self, handle: "SkipHandle") -> None:
        self.handle = handle
        self.scheduler = handle.pipe.scheduler
        self.run: SkipRun | None = None
        self.last_latent: torch.Tensor | None = None
        self.sizes: tuple[int, ...] | None = None  # pad_to's buckets (per-prompt rows), None: no padding
        self.seen: list[int] = []  # the model batch size of every model call (after padding)
        self._install_step()

    # -- the scheduler's step: its output is the next latent (the final one ends the report) --
    def _install_step(self) -> None:
        """Wrap ``scheduler.step`` (whatever it is now: the method or someone's wrapper) for the
        loop's duration; ``close`` puts back what was there."""
        sched = self.scheduler
        self._previous_step = vars(sched).get("step", _MISSING)
        original = sched.step

        @functools.wraps(original)
        def step(*args, **kwargs):
            out = original(*args, **kwargs)
            self.last_latent = out[0] if isinstance(out, tuple) else getattr(out, "prev_sample", None)
            return out

        sched.step = step
        self._step_wrapper = step

    def close(self) -> None:
        sched = self.scheduler
        if self._step_wrapper is not None and vars(sched).get("step") is self._step_wrapper:  # else someone wrapped over it: leave theirs
            if self._previous_step is _MISSING:
                del vars(sched)["step"]
            else:
                sched.step = self._previous_step
        self._step_wrapper = None

    # -- the first model call of the loop --
    def _start(self, sample: torch.Tensor, timestep: Any) -> None:
        handle = self.handle
        plan = _plan(self.scheduler, "pipe.scheduler")
        n = sample.shape[0]
        c = _chunks(sample, handle.cfg)
        t0 = _timestep_value(timestep)
        where = np.flatnonzero(plan.first & (np.abs(plan.timesteps - t0) <= 5e-4 * np.abs(plan.timesteps) + 1e-6))
        if len(where) == 0:
            raise ValueError(
                f"the model's first timestep {t0:g} is not one of pipe.scheduler's step timesteps "
                f"{plan.timesteps.tolist()}: the pipeline does not follow its scheduler's grid"
            )
        self.plan, self.c, self.B, self.n = plan, c, n // c, n
        self.sizes = None if handle.pad_to is None else bucket_sizes(handle.pad_to, self.B, "pad_to")
        self.begin = int(where[0])
        self.j = self.begin - 1  # index (into plan.timesteps) of the latest model call
        self.step = -1  # index of the latest step (first call)
        self.dtype = torch.promote_types(sample.dtype, torch.float32) if sample.is_floating_point() else torch.float32
        self.kind = plan.prediction_type
        self.template: Any = None
        self.extra: torch.Tensor | None = None  # output channels beyond the latent's, per model row
        s0 = float(plan.call_sigmas[self.begin])
        x = self._layout(sample, s0)
        policy = _policy_for(handle.policy, plan.space, plan.name)
        rows = torch.arange(self.B, device=sample.device)
        self.run = SkipRun(self._model, x, torch.from_numpy(plan.grid(self.begin)), {"_rows": rows}, policy, plan.name)

    def _layout(self, u: torch.Tensor, s: float) -> torch.Tensor:
        """Model input [c*B, ...] -> the policy's latent [B, c, ...]: VE, in the computing dtype."""
        v = u.to(self.dtype).reshape(self.c, self.B, *u.shape[1:]).transpose(0, 1)
        return (v * math.sqrt(1 + s * s)).contiguous()

    # -- every model call inside the loop --
    def forward(self, original: Callable, signature: inspect.Signature, module, args, kwargs) -> Any:
        bound = signature.bind(module, *args, **kwargs)
        names = list(signature.parameters)
        sample_name = names[1]
        sample = bound.arguments.get(sample_name)
        if not isinstance(sample, torch.Tensor):
            raise TypeError(f"the model's {sample_name} must be a tensor, got {_cls(sample)}")
        timestep = bound.arguments.get("timestep")
        if self.run is None:
            self._start(sample, timestep)
        plan = self.plan
        if sample.shape[0] != self.n:
            raise ValueError(f"the model batch changed within one pipeline call ({self.n} -> {sample.shape[0]} rows)")
        self.j += 1
        j = self.j
        if j >= len(plan.timesteps):
            raise RuntimeError(
                f"the pipeline made more model calls than pipe.scheduler's {len(plan.timesteps)} timesteps"
            )
        first = bool(plan.first[j])
        if plan.checks_order and bool(self.scheduler.state_in_first_order) != first:
            raise RuntimeError(
                f"model call {j} of {_cls(self.scheduler)}: the scheduler's step structure is not the "
                "expected first, second, first, ... call order"
            )
        s = float(plan.call_sigmas[j])
        self.s, self.u, self.bound, self.original, self.sample_name = s, sample, bound, original, sample_name
        self.raw = self.raw_tensor = self.raw_rows = None
        x = self._layout(sample, s)
        sigma = x.new_full((self.B,), s)
        if first:
            self.step += 1
            denoised = self.run.denoise(self.step, x, sigma)
            computed = self.run.last_computed
        else:  # a corrector call: never skipped, its eps is the next one reused
            denoised = self.run.call_model(self.step, x, sigma)
            computed = np.ones(self.B, dtype=bool)
        t = _timestep_value(timestep)
        if not _close(t, float(plan.timesteps[j])):
            raise RuntimeError(
                f"model call {j} got timestep {t:g}, pipe.scheduler's grid has {plan.timesteps[j]:g} there: the "
                "pipeline does not call the model once per scheduler timestep"
            )
        if computed.all():
            return self.raw
        return self._assemble(x, denoised)

    def _model(self, x: torch.Tensor, sigma: torch.Tensor, _rows: torch.Tensor) -> torch.Tensor:
        """The "model" of the SkipRun: the original forward on the rows ``_rows`` (all chunks)."""
        c, B = self.c, self.B
        k = _rows.numel()
        bound = self.bound
        if k == B:
            out = self.original(*bound.args[1:], **bound.kwargs)
            u, model_rows = self.u, None
            tensor = _model_output(out)
            self.seen.append(self.n)
        else:
            model_rows = (_rows[None, :] + B * torch.arange(c, device=_rows.device)[:, None]).reshape(-1)
            # pad_to: the sub-batch padded with repeats of its first row to a bucket size (both CFG
            # halves alike); the padded rows' outputs are dropped below
            call_rows = _rows if self.sizes is None else padded_rows(_rows, self.sizes)
            kp = call_rows.numel()
            padded = (call_rows[None, :] + B * torch.arange(c, device=_rows.device)[:, None]).reshape(-1)
            sliced = inspect.BoundArguments(bound.signature, dict(bound.arguments))
            for name, value in bound.arguments.items():
                if name != "self":
                    sliced.arguments[name] = slice_rows(value, padded, self.n)
            u = sliced.arguments[self.sample_name]
            out = self.original(*sliced.args[1:], **sliced.kwargs)
            tensor = _model_output(out)
            self.seen.append(kp * c)
            if kp != k:
                if tensor.shape[0] != u.shape[0]:
                    raise ValueError(f"the model returned shape {tuple(tensor.shape)} for an input of shape {tuple(u.shape)}")
                keep = (torch.arange(k, device=tensor.device)[None, :] + kp * torch.arange(c, device=tensor.device)[:, None]).reshape(-1)
                tensor, u = tensor.index_select(0, keep), u.index_select(0, keep.to(u.device))
        C = u.shape[1]
        if tensor.shape[0] != u.shape[0] or tensor.shape[2:] != u.shape[2:] or tensor.shape[1] < C:
            raise ValueError(f"the model returned shape {tuple(tensor.shape)} for an input of shape {tuple(u.shape)}")
        if self.template is None:
            self.template = out
        if tensor.shape[1] > C:
            if self.extra is None:
                self.extra = tensor[:, C:].clone()
            elif model_rows is None:
                self.extra.copy_(tensor[:, C:])
            else:
                self.extra.index_copy_(0, model_rows, tensor[:, C:])
        self.raw, self.raw_tensor, self.raw_rows = out, tensor, model_rows
        eps = _eps_from(tensor[:, :C].to(self.dtype), u.to(self.dtype), self.s, self.kind)
        eps = eps.reshape(c, k, *eps.shape[1:]).transpose(0, 1)
        return x - self.s * eps

    def _assemble(self, x: torch.Tensor, denoised: torch.Tensor) -> Any:
        """The model output for a call where some rows skipped: reused eps in the model's output
        type at the current latent and sigma, computed rows as the model returned them."""
        eps = ((x - denoised) / self.s).transpose(0, 1).reshape(self.n, *x.shape[2:])
        out_dtype = _model_output(self.template).dtype
        pred = _pred_from(eps, self.u.to(self.dtype), self.s, self.kind).to(out_dtype)
        if self.extra is not None:
            pred = torch.cat([pred, self.extra.to(out_dtype)], dim=1)
        if self.raw_tensor is not None:
            pred.index_copy_(0, self.raw_rows, self.raw_tensor.to(out_dtype))
        return _rewrap(self.template, pred)

    def report(self):
        """The SkipReport if the loop made all its model calls and the final latent was seen."""
        if self.run is None or self.j != len(self.plan.timesteps) - 1 or self.last_latent is None:
            return None
        lat = self.last_latent.to(self.dtype)
        if self.plan.space == "vp":
            lat = lat * math.sqrt(1 + self.plan.final_sigma**2)
        x = lat.unsqueeze(1).expand(self.B, self.c, *lat.shape[1:]).contiguous()
        return self.run.finish(x, x.new_full((self.B,), self.plan.final_sigma))


def _chunks(sample: torch.Tensor, cfg: bool | None) -> int:
    """How many copies of the latents the model batch holds (2 with classifier-free guidance)."""
    n = sample.shape[0]
    halves_equal = n % 2 == 0 and bool(torch.equal(sample[: n // 2], sample[n // 2 :]))
    if cfg is True:
        if not halves_equal:
            raise ValueError(
                "cfg=True, but the model input is not [latents; latents] (its two halves differ): "
                "the pipeline does not batch classifier-free guidance as one call"
            )
        return 2
    if cfg is False:
        return 1
    return 2 if halves_equal else 1


class _BarProxy:
    """Stands in for the pipeline's progress bar: entering it starts a denoising loop, leaving it
    (normally or by an exception) ends it. Everything else goes to the real bar."""

    def __init__(self, bar: Any, handle: "SkipHandle") -> None:
        self._bar, self._handle = bar, handle

    def __enter__(self):
        self._handle._begin()
        try:
            return self._bar.__enter__()
        except BaseException:
            self._handle._end(failed=True)
            raise

    def __exit__(self, exc_type, exc, tb):
        try:
            return self._bar.__exit__(exc_type, exc, tb)
        finally:
            self._handle._end(failed=exc_type is not None)

    def __iter__(self):
        self._handle._begin()
        done = False
        try:
            for item in self._bar:
                yield item
            done = True
        finally:
            self._handle._end(failed=not done)

    def __len__(self):
        return len(self._bar)

    def __getattr__(self, name: str):
        return getattr(self._bar, name)


@functools.lru_cache(maxsize=None)
def _hook_class():
    from diffusers.hooks import ModelHook

    class AdaptiveSkipHook(ModelHook):
        """Routes the model's forward through the skip handle (see ``apply``)."""

        _is_stateful = True

        def __init__(self, handle: "SkipHandle") -> None:
            super().__init__()
            self.handle = handle

        def new_forward(self, module, *args, **kwargs):
            return self.handle._forward(self.fn_ref.original_forward, module, args, kwargs)

        def reset_state(self, module):
            self.handle._discard()
            return module

    return AdaptiveSkipHook


class SkipHandle:
    """What ``apply`` returns: the hook's state and its report.

    report: the ``SkipReport`` of the last pipeline call that ran its loop to the end (per sample:
        ``computed`` [B, N], ``nfe`` [B], ``model_calls``: model forwards made); ``None`` before,
        during, and after a failed or interrupted call.
    policy: the skip policy; may be replaced between pipeline calls.
    pad_to: the sub-batch buckets (``apply``'s ``pad_to``); may be replaced between pipeline calls.
    batch_sizes: the model batch size of each model call of that loop (after ``pad_to`` padding:
        what a compiled model saw); ``None`` when ``report`` is.
    remove(): unhook (the model's forward and ``pipe.progress_bar`` are restored); idempotent.
    Usable as a context manager (removes on exit).
    """

    def __init__(self, pipe: Any, model: torch.nn.Module, policy: Any, cfg: bool | None, pad_to: Any = None) -> None:
        from diffusers.hooks import HookRegistry

        self.pipe, self.model, self.policy, self.cfg = pipe, model, policy, cfg
        self.pad_to = pad_to
        self.report = None
        self.batch_sizes: list[int] | None = None
        self._loop: _Loop | None = None
        self._depth = 0
        # torch.compile(model) gives an OptimizedModule whose forward takes (*args, **kwargs): bind
        # the arguments with the compiled module's own signature
        self._signature = inspect.signature(type(getattr(model, "_orig_mod", model)).forward)
        registry = HookRegistry.check_if_exists_or_initialize(model)
        if getattr(registry, "_module_ref", model) is not model and not registry.hooks:
            # torch.compile's OptimizedModule stores attributes on the module it wraps, so an empty
            # registry left there for an earlier compiled wrapper would hook that wrapper: replace it
            registry = HookRegistry(model)
            model._diffusers_hook = registry
        if registry.get_hook(HOOK_NAME) is not None:
            raise ValueError(f"pipe's {_cls(model)} already carries an adaptive_sampling hook: remove() it first")
        if "progress_bar" in vars(pipe):
            raise ValueError("pipe.progress_bar is already replaced on this pipeline; cannot hook its denoising loop")
        registry.register_hook(_hook_class()(self), HOOK_NAME)
        self._registry = registry
        original_bar = type(pipe).progress_bar.__get__(pipe)

        def progress_bar(*args, **kwargs):
            return _BarProxy(original_bar(*args, **kwargs), self)

        object.__setattr__(pipe, "progress_bar", progress_bar)
        self._removed = False

    @property
    def active(self) -> bool:
        """Whether a denoising loop is running under the hook."""
        return self._loop is not None

    def _begin(self) -> None:
        self._depth += 1
        if self._depth == 1:
            self.report = None
            self.batch_sizes = None
            self._loop = _Loop(self)

    def _end(self, failed: bool) -> None:
        self._depth = max(0, self._depth - 1)
        if self._depth:
            return
        loop, self._loop = self._loop, None
        if loop is None:
            return
        loop.close()
        if not failed:
            self.report = loop.report()
            self.batch_sizes = list(loop.seen) if self.report is not None else None

    def _discard(self) -> None:
        """Drop the running loop's state (a failure, or diffusers' reset_stateful_hooks)."""
        loop, self._loop = self._loop, None
        if loop is not None:
            loop.close()

    def _forward(self, original: Callable, module, args, kwargs):
        loop = self._loop
        if loop is None:  # outside a pipeline's denoising loop: unchanged
            return original(*args, **kwargs)
        try:
            return loop.forward(original, self._signature, module, args, kwargs)
        except BaseException:
            self._discard()
            raise

    def remove(self) -> None:
        if self._removed:
            return
        self._discard()
        self._registry.remove_hook(HOOK_NAME, recurse=False)
        if "progress_bar" in vars(self.pipe):
            del vars(self.pipe)["progress_bar"]
        self._removed = True

    def __enter__(self) -> "SkipHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self._removed else ("running" if self.active else "idle")
        return f"SkipHandle({_cls(self.model)}, {self.policy!r}, {state})"


def apply(pipe: Any, skip: Any = None, *, cfg: bool | None = None, pad_to: Any = None) -> SkipHandle:
    """Skip whole model calls of a diffusers pipeline per prompt with the policy ``skip``.

    pipe: a diffusers pipeline with a ``unet`` or ``transformer`` and a DDPM-schedule scheduler
        (DDIM, Euler, DPM-Solver, UniPC, LMS, Heun, KDPM2, PNDM/PLMS, ...).
    skip: a skip policy (``ThirdOrder(...)``, ``FixedMask(...)``, ``LocalError(...)``,
        ``Budget(...)``, a third-party one); default ``ThirdOrder()``. A ``FixedMask`` has one entry
        per step (``num_inference_steps``; fewer with img2img ``strength``), [N] or [B, N] with B
        the images of the call (prompts x num_images_per_prompt).
    cfg: whether the model batch is ``[uncond; cond]``; ``None`` detects it per call (two equal halves).
    pad_to: ``None`` (default): a sub-batch call gets exactly the rows that compute. ``"pow2"`` or a
        list of ints: the per-prompt rows that compute are padded (with repeats of the first of
        them, in both CFG halves alike) to the smallest bucket >= their number, capped at the
        prompt batch (powers of two below it, then the batch itself; see
        ``adaptive_sampling.bucketing``), and the padded rows' outputs are dropped. For compiled
        models (``torch.compile`` with static shapes, CUDA graphs): the model then sees a few batch
        sizes instead of one per sub-batch size. Decisions, NFE and the report are unchanged.

    Returns a ``SkipHandle`` (``.report``, ``.remove()``, context manager). See the module
    docstring for the semantics.
    """
    model = _pipeline_model(pipe, "pipe")
    if not isinstance(model, torch.nn.Module) or model is pipe:
        raise TypeError(f"pipe must be a diffusers pipeline (with .unet or .transformer), got {_cls(pipe)}")
    if not callable(getattr(type(pipe), "progress_bar", None)):
        raise TypeError(f"pipe must be a diffusers pipeline (it has no progress_bar), got {_cls(pipe)}")
    policy = ThirdOrder() if skip is None else skip
    if not callable(getattr(policy, "start", None)):
        raise TypeError(f"skip must be a skip policy (ThirdOrder, FixedMask, ...) or None, got {skip!r}")
    if cfg is not None and not isinstance(cfg, bool):
        raise TypeError(f"cfg must be True, False or None, got {cfg!r}")
    _check_scheduler(getattr(pipe, "scheduler", None), "pipe.scheduler")
    return SkipHandle(pipe, model, policy, cfg, check_pad_to(pad_to, "pad_to"))
