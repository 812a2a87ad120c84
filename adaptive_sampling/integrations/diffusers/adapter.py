"""The denoiser adapter: a diffusers pipeline's UNet or transformer as a k-diffusion-convention
denoiser, so the library's samplers and ``integrations.k_diffusion.adaptive(K.sampling.*)`` drive it::

    pipe.scheduler.set_timesteps(50)
    model = denoiser(pipe, guidance_scale=7.5)
    x, report = sample_dpmpp_2m(model, noise * start_scale(pipe.scheduler), scheduler_sigmas(pipe.scheduler),
                                extra_args={"prompt_embeds": cond, "negative_prompt_embeds": uncond})
    latents = x * end_scale(pipe.scheduler)     # what the pipeline would decode

Also the helpers the hook shares: finding the pipeline's model, reading and re-wrapping its output.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from .plan import PREDICTION_TYPES, check_scheduler, class_name, is_flow, scheduler_plan
from .plan import prediction_type as scheduler_prediction_type

__all__ = ["denoiser", "DiffusersDenoiser", "pipeline_model", "pipeline_models", "model_output", "rewrap"]



# The denoiser modules of a pipeline, in the order they are used (Wan 2.2 hands the low-noise steps
# to transformer_2).
MODEL_ATTRIBUTES = ("unet", "transformer", "transformer_2")


def pipeline_models(pipe: Any) -> list[torch.nn.Module]:
    """The pipeline's denoiser modules (``unet``, or ``transformer`` and ``transformer_2`` where set)."""
    if isinstance(pipe, torch.nn.Module):
        return []
    return [m for m in (getattr(pipe, a, None) for a in MODEL_ATTRIBUTES) if isinstance(m, torch.nn.Module)]


def pipeline_model(pipe_or_model: Any, name: str) -> torch.nn.Module:
    for attr in ("unet", "transformer"):
        model = getattr(pipe_or_model, attr, None)
        if isinstance(model, torch.nn.Module):
            return model
    if isinstance(pipe_or_model, torch.nn.Module):
        return pipe_or_model
    raise TypeError(
        f"{name} must be a diffusers pipeline with a unet or transformer (or the model itself), got {class_name(pipe_or_model)}"
    )


def model_output(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    sample = getattr(out, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    raise TypeError(f"the model returned {class_name(out)}; expected a tensor, a tuple or an output with .sample")


def rewrap(template: Any, tensor: torch.Tensor) -> Any:
    """``tensor`` in the container the model returns (``template``: one of its outputs)."""
    if isinstance(template, torch.Tensor):
        return tensor
    if isinstance(template, tuple):
        return (tensor, *template[1:])
    if isinstance(template, list):
        return [tensor, *template[1:]]
    return dataclasses.replace(template, **{dataclasses.fields(template)[0].name: tensor})


# Per-token position ids of Flux-like transformers: 2-D [tokens, 3], shared by every row
SHARED_IDS = ("txt_ids", "img_ids")
# Transformers that take the flow level s itself as their timestep (they scale it by 1000 inside):
# their pipelines pass ``timestep / 1000``; the others take the scheduler's timestep (s * 1000)
TIMESTEP_IS_S = ("FluxTransformer2DModel", "FluxKontextTransformer2DModel", "QwenImageTransformer2DModel",
                 "HunyuanVideoTransformer3DModel", "LTXVideoTransformer3DModel")  # fmt: skip
ALIASES = {"prompt_embeds": "encoder_hidden_states", "pooled_prompt_embeds": "pooled_projections"}


def _double(value: Any, batch: int, negative: Any = None, name: str = "") -> Any:
    """The CFG batch of one argument: ``[negative; value]`` if a negative is given, else the
    batch-leading tensors repeated ``[value; value]`` (recursively through dicts); others as is."""
    if name in SHARED_IDS and isinstance(value, torch.Tensor) and value.ndim == 2:
        return value
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
    ``encoder_hidden_states``, ``pooled_prompt_embeds`` of ``pooled_projections``).

    Under a flow scheduler (FlowMatchEuler, or ``use_flow_sigmas``) the denoiser is in the flow
    convention, for ``sample_flow_euler`` / ``sample_flow_dpmpp_2m`` and the k-diffusion wrapper with
    ``convention="flow"``: x is the flow latent (SD3 [B, C, H, W], Flux's packed [B, tokens, C],
    Wan's video [B, C, F, H, W]) at level s [B]; the transformer gets x itself and the timestep
    s * T (s itself for the transformers in ``TIMESTEP_IS_S``, such as Flux's), predicts the
    velocity v, and the denoiser returns x0 = x - s * v (after guidance on v, as the pipelines
    combine it). Shared 2-D ``txt_ids`` / ``img_ids`` pass as they are. With ``guidance_scale > 1`` the call is one batch
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
        self.model_2, self.boundary, self.guidance_scale_2 = None, None, None  # a second transformer (Wan 2.2)
        self.model_kwargs: dict = {}  # passed to every call as is
        self.flow = is_flow(scheduler)
        self.prediction_type = prediction_type or scheduler_prediction_type(scheduler)
        self.num_train_timesteps = float(scheduler.config.get("num_train_timesteps", 1000) or 1000)
        if self.flow:
            self._log_train_sigmas = None
            self.timestep_scale = 1 / self.num_train_timesteps if class_name(getattr(model, "_orig_mod", model)) in TIMESTEP_IS_S else 1.0
        else:
            ac = scheduler.alphas_cumprod.detach().to("cpu", torch.float64)
            self._log_train_sigmas = (((1 - ac) / ac) ** 0.5).log()
            self.timestep_scale = 1.0

    @property
    def cfg(self) -> bool:
        return self.guidance_scale > 1

    def timesteps(self, sigma: torch.Tensor) -> torch.Tensor:
        """The timestep of each sigma ([B]) as float32, on sigma's device (no host read)."""
        plan = scheduler_plan(self.scheduler)
        dev = sigma.device
        table_s = torch.from_numpy(plan.call_sigmas).to(dev, torch.float32)
        table_t = torch.from_numpy(plan.timesteps).to(dev, torch.float32)
        s = sigma.to(torch.float32)
        dist = (s[:, None] - table_s[None, :]).abs()
        j = dist.argmin(dim=1)
        exact = dist.gather(1, j[:, None])[:, 0] <= 1e-5 * s
        if self.flow:  # flow schedulers: timestep = s * T
            return torch.where(exact, table_t[j], s * self.num_train_timesteps) * self.timestep_scale
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
        for alias, name in ALIASES.items():
            if alias in kw:
                kw[name] = kw.pop(alias)
            if "negative_" + alias in kw:
                kw["negative_" + name] = kw.pop("negative_" + alias)
        negatives = {k[len("negative_"):]: kw.pop(k) for k in [k for k in kw if k.startswith("negative_")]}
        for k in negatives:
            if k not in kw:
                raise ValueError(f"negative_{k} was given without {k}")
        B = x.shape[0]
        s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        u = x if self.flow else x / ((s**2 + 1) ** 0.5)  # the expression of diffusers' scale_model_input
        t = self.timesteps(sigma)
        model, scale = self.model, self.guidance_scale
        if self.model_2 is not None:  # Wan 2.2: the high-noise transformer above the boundary, the other below
            high = t / self.timestep_scale >= self.boundary
            if not (bool(high.all()) or not bool(high.any())):
                raise ValueError("the rows of one call straddle the pipeline's boundary between its two transformers")
            if not bool(high.all()):
                model, scale = self.model_2, self.guidance_scale_2
        dtype = getattr(model, "dtype", x.dtype)
        if self.cfg:
            if "encoder_hidden_states" in kw and "encoder_hidden_states" not in negatives:
                raise ValueError("guidance_scale > 1 needs negative_prompt_embeds (the unconditional embeddings)")
            kw = {k: _double(v, B, negatives.get(k), k) for k, v in kw.items()}
            u, t = torch.cat([u, u]), torch.cat([t, t])
        out = model_output(model(u.to(dtype), timestep=t, return_dict=False, **self.model_kwargs, **kw))
        pred = out[:, : x.shape[1]].to(x.dtype)
        if self.cfg:
            uncond, cond = pred.chunk(2)
            pred = uncond + scale * (cond - uncond)
            if self.guidance_rescale > 0:
                from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

                pred = rescale_noise_cfg(pred, cond, guidance_rescale=self.guidance_rescale)
        if self.prediction_type in ("epsilon", "flow_prediction"):  # diffusers' Euler: sample - sigma * model_output
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
    guidance_scale_2: float | None = None,
    model_kwargs: dict | None = None,
) -> DiffusersDenoiser:
    """A k-diffusion-convention denoiser ``model(x, sigma, **extra_args) -> denoised`` from a
    diffusers pipeline (its ``unet`` or ``transformer``) or a model; see ``DiffusersDenoiser``.

    scheduler: gives sigma <-> timestep and the prediction type (default ``pipe.scheduler``);
        call its ``set_timesteps`` before sampling so grid sigmas map to its exact timesteps.
    guidance_scale: classifier-free guidance inside the denoiser (> 1 needs ``negative_prompt_embeds``).
    guidance_rescale: the pipelines' ``guidance_rescale`` (0 = off).
    prediction_type: overrides ``scheduler.config.prediction_type`` (flow schedulers: the velocity,
        ``"flow_prediction"``, the only one they take).
    guidance_scale_2: a two-transformer pipeline (Wan 2.2: ``transformer`` above the pipeline's
        ``boundary_ratio`` of the timesteps, ``transformer_2`` below) uses this scale below the
        boundary, as the pipeline does (default: ``guidance_scale``).
    model_kwargs: arguments passed to the model at every call as they are, never sliced per row:
        what every row shares, such as Flux's 2-D ``txt_ids`` / ``img_ids`` (per-row tensors go in
        the sampler's ``extra_args``, which per-sample calls slice).

    With ``scheduler_sigmas``, ``start_scale`` and ``end_scale`` the library's ``sample_ddim``,
    ``sample_euler`` and ``sample_dpmpp_2m`` reproduce the diffusers pipelines with DDIM, Euler and
    DPM-Solver++(2M) to float32 round-off (tests/test_diffusers.py states the figures).
    """
    model = pipeline_model(pipe_or_model, "pipe_or_model")
    if scheduler is None:
        scheduler = getattr(pipe_or_model, "scheduler", None)
        if scheduler is None:
            raise TypeError("scheduler is required when pipe_or_model is a model, not a pipeline")
    check_scheduler(scheduler, "scheduler")
    for name, value in (("guidance_scale", guidance_scale), ("guidance_rescale", guidance_rescale)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES} or None, got {prediction_type!r}")
    if prediction_type is not None and (prediction_type == "flow_prediction") != is_flow(scheduler):
        raise ValueError(
            f"prediction_type={prediction_type!r} does not fit scheduler ({class_name(scheduler)}): flow schedulers take "
            "'flow_prediction' (the velocity), the DDPM-schedule ones epsilon, v_prediction or sample"
        )
    if guidance_scale_2 is not None and (not isinstance(guidance_scale_2, (int, float)) or guidance_scale_2 < 0):
        raise ValueError(f"guidance_scale_2 must be a number >= 0 or None, got {guidance_scale_2!r}")
    if model_kwargs is not None and not isinstance(model_kwargs, dict):
        raise TypeError(f"model_kwargs must be a dict or None, got {type(model_kwargs).__name__}")
    out = DiffusersDenoiser(model, scheduler, guidance_scale, guidance_rescale, prediction_type)
    out.model_kwargs = dict(model_kwargs or {})
    second = getattr(pipe_or_model, "transformer_2", None)
    ratio = getattr(getattr(pipe_or_model, "config", None), "boundary_ratio", None)
    if isinstance(second, torch.nn.Module) and ratio is not None:
        out.model_2, out.boundary = second, float(ratio) * out.num_train_timesteps
        out.guidance_scale_2 = float(guidance_scale if guidance_scale_2 is None else guidance_scale_2)
    return out
