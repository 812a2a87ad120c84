"""A small rectified-flow transformer of the shapes data, run through diffusers' real ``FluxPipeline``.

Why: the models people run and cache today are flow-matching transformers (SD3, Flux, Wan), and
every peer cache (diffusers' FirstBlockCache, MagCache, TaylorSeer, FasterCache, Pyramid Attention
Broadcast; cache-dit) works on transformer blocks. This workload is a ``FluxTransformer2DModel``
built from a small config (``TRANSFORMER_CONFIG``: 3 double-stream and 6 single-stream blocks of
width 128, 3.4M parameters), trained here on the procedural shapes (``bench/train_flow.py``,
``bench/results/flow_training.md``) with the rectified-flow loss, so the library and the peers can
be compared on a model none of them was tuned on.

Latent: the shapes workload's 2x2 space-to-depth of the image, [12, 16, 16] (``shapes.to_latent``),
which ``FluxPipeline`` packs 2x2 into 64 tokens of 48 values (``pack``). The pipeline thinks in
pixels of a VAE with scale factor 8 that is not there: ``HEIGHT = WIDTH = 128`` give the 16x16
latent; sample with ``output_type="latent"`` and decode with ``decode`` (unpack, then
``shapes.from_latent``). No VAE and no text encoder are needed.

Conditioning: the class (0..9, ``NULL_CLASS`` = 10 for guidance) enters as the conditioning the
pipeline expects: a learned ``prompt_embeds`` of ``TEXT_TOKENS`` tokens and a learned
``pooled_prompt_embeds`` per class, trained with the transformer and shipped in the same file.
Classifier-free guidance is Flux's "true CFG": ``true_cfg_scale > 1`` with the null class as the
negative prompt, two transformer calls per step (``cache_context("cond")`` / ``("uncond")``).

Scheduler: ``FlowMatchEulerDiscreteScheduler`` with FLUX.1's config (``SCHEDULER_CONFIG``: dynamic
shifting, ``mu`` from the image sequence length: 64 tokens give mu = 0.4675, a time shift of
exp(mu) = 1.60); training drew t uniformly in [0, 1] (rectified flow's own draw).

How good it is (``bench/results/flow_training.md``): its velocity error on fresh data is 7 to 17% of
the exact Gaussian-pixel predictor's at s = 0.05 to 0.6; 52% of 50-step samples at true CFG 4 (56% at
6) are their class for the shipped classifier (the shapes UNet reaches 80%): the coarse shapes (disk,
ring, square, frame) come out, the fine ones (triangle, star, crescent) mostly do not. A weaker
model than the UNet (a second run with twice the learning rate and 1.7x the steps reached 58%:
``bench/results/flow_training_lr2e-3.md``), but a trained flow transformer with the pipeline, scheduler, CFG and block
structure the caches were built for, which is what the comparisons need.

    from adaptive_sampling.evaluation.workloads import flow
    pipe = flow.pipeline()                                   # FluxPipeline, the shipped weights
    labels = torch.arange(10)
    lat = pipe(**flow.prompt_kwargs(labels), true_cfg_scale=3.0, num_inference_steps=50,
               height=flow.HEIGHT, width=flow.WIDTH, output_type="latent",
               generator=torch.Generator().manual_seed(0)).images
    images = flow.decode(lat)                                # [10, 3, 32, 32] in [-1, 1]

Importing this module loads torch only; diffusers and safetensors load inside the functions.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import torch

from . import shapes

__all__ = [
    "TRANSFORMER_CONFIG",
    "SCHEDULER_CONFIG",
    "TEXT_TOKENS",
    "EMBED_DIM",
    "HEIGHT",
    "WIDTH",
    "LATENT_SHAPE",
    "NULL_CLASS",
    "CHECKPOINT",
    "image_seq_len",
    "mu",
    "pack",
    "unpack",
    "decode",
    "image_ids",
    "text_ids",
    "ClassConditioning",
    "load_pretrained",
    "pipeline",
    "prompt_kwargs",
    "denoiser",
    "sigmas",
    "RECOMMENDED_GUIDANCE",
]

EMBED_DIM = 64  # joint_attention_dim and pooled_projection_dim
TEXT_TOKENS = 4  # prompt_embeds tokens per class
TRANSFORMER_CONFIG = {
    "patch_size": 1,
    "in_channels": 48,  # 12 latent channels, packed 2x2 by the pipeline
    "num_layers": 3,
    "num_single_layers": 6,
    "attention_head_dim": 32,
    "num_attention_heads": 4,
    "joint_attention_dim": EMBED_DIM,
    "pooled_projection_dim": EMBED_DIM,
    "guidance_embeds": False,
    "axes_dims_rope": (8, 12, 12),
}
# FLUX.1's FlowMatchEulerDiscreteScheduler config (dynamic shifting; mu from the image sequence length)
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
LATENT_SHAPE = (12, 16, 16)
HEIGHT = WIDTH = 128  # pipeline "pixels": latent 16 x 16 with the default vae_scale_factor 8
NULL_CLASS = shapes.NULL_CLASS
RECOMMENDED_GUIDANCE = 4.0  # true_cfg_scale used by the benchmarks (52% recognisable at 50 steps; FLUX.1 users run 3.5-4)
NUM_CLASSES = shapes.NUM_CLASSES
CHECKPOINT = Path(__file__).resolve().parent / "data" / "flow_transformer.safetensors"


def image_seq_len() -> int:
    """Tokens per image after the pipeline's 2x2 packing (64)."""
    return (LATENT_SHAPE[1] // 2) * (LATENT_SHAPE[2] // 2)


def mu() -> float:
    """FluxPipeline's ``mu`` for this image size (``calculate_shift`` with the scheduler's config)."""
    c = SCHEDULER_CONFIG
    m = (c["max_shift"] - c["base_shift"]) / (c["max_image_seq_len"] - c["base_image_seq_len"])
    return image_seq_len() * m + c["base_shift"] - m * c["base_image_seq_len"]


def time_shift(t: torch.Tensor) -> torch.Tensor:
    """The scheduler's exponential time shift at this ``mu``: s = e^mu / (e^mu + 1 / t - 1)."""
    e = math.exp(mu())
    return e * t / (e * t + 1 - t)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, 12, 16, 16] -> [B, 64, 48], FluxPipeline's ``_pack_latents``."""
    B, C, H, W = latents.shape
    return latents.view(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (H // 2) * (W // 2), C * 4)


def unpack(tokens: torch.Tensor) -> torch.Tensor:
    """[B, 64, 48] -> [B, 12, 16, 16], the inverse of ``pack`` (FluxPipeline's ``_unpack_latents``)."""
    B = tokens.shape[0]
    C, H, W = LATENT_SHAPE
    return tokens.view(B, H // 2, W // 2, C, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)


def decode(tokens: torch.Tensor) -> torch.Tensor:
    """Packed latents (the pipeline's ``output_type="latent"`` output) -> images [B, 3, 32, 32]."""
    return shapes.from_latent(unpack(tokens))


def image_ids(device="cpu", dtype=torch.float32) -> torch.Tensor:
    """[64, 3] position ids of the packed latent tokens (FluxPipeline's ``_prepare_latent_image_ids``)."""
    h, w = LATENT_SHAPE[1] // 2, LATENT_SHAPE[2] // 2
    ids = torch.zeros(h, w, 3)
    ids[..., 1] += torch.arange(h)[:, None]
    ids[..., 2] += torch.arange(w)[None, :]
    return ids.reshape(h * w, 3).to(device=device, dtype=dtype)


def text_ids(device="cpu", dtype=torch.float32) -> torch.Tensor:
    """[TEXT_TOKENS, 3] zeros, as FluxPipeline's ``encode_prompt`` makes them."""
    return torch.zeros(TEXT_TOKENS, 3, device=device, dtype=dtype)


class ClassConditioning(torch.nn.Module):
    """The learned stand-in for a text encoder: per class (and the null class), ``TEXT_TOKENS``
    prompt-embedding tokens and one pooled embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = torch.nn.Parameter(torch.randn(NUM_CLASSES + 1, TEXT_TOKENS, EMBED_DIM) * 0.5)
        self.pooled = torch.nn.Parameter(torch.randn(NUM_CLASSES + 1, EMBED_DIM) * 0.5)

    def forward(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tokens[labels], self.pooled[labels]


def load_pretrained(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """``(transformer, scheduler, conditioning)``: the shipped ``FluxTransformer2DModel`` (EMA
    weights, eval mode, no gradients), a ``FlowMatchEulerDiscreteScheduler`` with
    ``SCHEDULER_CONFIG`` and the ``ClassConditioning``. Needs diffusers and safetensors."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    state, meta = shapes._load_safetensors(CHECKPOINT)
    config = json.loads(meta["transformer_config"]) if "transformer_config" in meta else TRANSFORMER_CONFIG
    transformer = FluxTransformer2DModel(**config)
    cond = ClassConditioning()
    cond.load_state_dict({k[len("conditioning."):]: v.float() for k, v in state.items() if k.startswith("conditioning.")})
    transformer.load_state_dict({k[len("transformer."):]: v.float() for k, v in state.items() if k.startswith("transformer.")})
    transformer = transformer.to(device=device)  # float32 as built: cast only when asked (diffusers warns on casts)
    if dtype != torch.float32:
        transformer = transformer.to(dtype=dtype)
    transformer = transformer.eval().requires_grad_(False)
    cond = cond.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return transformer, FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), cond


def pipeline(transformer=None, scheduler=None, conditioning=None, device="cpu", dtype=torch.float32):
    """A diffusers ``FluxPipeline`` around the shipped transformer (no VAE, no text encoders); the
    ``ClassConditioning`` rides along as ``pipe.conditioning`` for ``prompt_kwargs``."""
    from diffusers import FluxPipeline

    if transformer is None or scheduler is None or conditioning is None:
        t, s, c = load_pretrained(device, dtype)
        transformer, scheduler, conditioning = transformer or t, scheduler or s, conditioning or c
    pipe = FluxPipeline(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=transformer)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    pipe.conditioning = conditioning
    return pipe


@functools.lru_cache(maxsize=1)
def _shipped_conditioning() -> ClassConditioning:
    """The shipped ``ClassConditioning`` alone (loaded once; the transformer is not built)."""
    state, _ = shapes._load_safetensors(CHECKPOINT)
    cond = ClassConditioning()
    cond.load_state_dict({k[len("conditioning."):]: v.float() for k, v in state.items() if k.startswith("conditioning.")})
    return cond.eval().requires_grad_(False)


@torch.no_grad()
def prompt_kwargs(labels: torch.Tensor, conditioning: ClassConditioning | None = None, *, negative: bool = True) -> dict:
    """The pipeline's conditioning arguments for class ``labels`` [B]: ``prompt_embeds``,
    ``pooled_prompt_embeds`` and (``negative``) the null class as ``negative_prompt_embeds`` /
    ``negative_pooled_prompt_embeds`` for true CFG."""
    if conditioning is None:
        conditioning = _shipped_conditioning()
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1).to(conditioning.tokens.device)
    tokens, pooled = conditioning(labels)
    out = {"prompt_embeds": tokens, "pooled_prompt_embeds": pooled}
    if negative:
        nt, npool = conditioning(torch.full_like(labels, NULL_CLASS))
        out.update(negative_prompt_embeds=nt, negative_pooled_prompt_embeds=npool)
    return out


def sigmas(steps: int, *, dtype=torch.float64, device="cpu") -> torch.Tensor:
    """The pipeline's flow grid for ``steps`` steps: s from 1 to 0, FLUX.1's dynamic shift at this
    workload's ``mu`` (what ``pipeline()`` samples with)."""
    from ...schedules import get_sigmas_flow

    return get_sigmas_flow(steps, mu=mu(), spacing="pipeline", dtype=dtype, device=device)


def denoiser(cond_scale: float = 3.0, transformer=None, conditioning=None):
    """The model as a flow-convention denoiser ``model(x, s, y=labels) -> x0`` on IMAGES [B, 3, 32, 32]
    (x = (1 - s) x0 + s noise, s [B]), for the library's flow samplers and ``evaluate``.

    Per call: the transformer sees the packed latent ``pack(to_latent(x))`` (a permutation of x's
    values) at timestep s, as the pipeline calls it, and predicts the velocity v; x0 = x - s v.
    With labels, classifier-free guidance v = v_u + cond_scale * (v_c - v_u) runs as ONE batched
    transformer call on [cond(B); uncond(B)] (the pipeline's true CFG makes two calls; the same
    math), so a skipped step skips both branches. ``y=None``: unconditional (the null class)."""
    if transformer is None or conditioning is None:
        t, _, c = load_pretrained()
        transformer, conditioning = transformer or t, conditioning or c
    ids_img, ids_txt = image_ids(), text_ids()

    def model(x: torch.Tensor, s: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        batch = x.shape[0]
        param = next(transformer.parameters())
        sig = torch.as_tensor(s, device=x.device).reshape(-1)
        sig = sig.expand(batch) if sig.numel() == 1 else sig
        tokens = pack(shapes.to_latent(x)).to(param.device, param.dtype)
        t = sig.to(param.device, param.dtype)
        labels = torch.full((batch,), NULL_CLASS, dtype=torch.long, device=param.device) if y is None else y.to(param.device).long().reshape(-1)
        with torch.no_grad():
            if y is None:
                enc, pooled = conditioning(labels)
                v = transformer(hidden_states=tokens, encoder_hidden_states=enc, pooled_projections=pooled, timestep=t,
                                img_ids=ids_img.to(param.device), txt_ids=ids_txt.to(param.device), return_dict=False)[0]  # fmt: skip
            else:
                enc, pooled = conditioning(torch.cat([labels, torch.full_like(labels, NULL_CLASS)]))
                both = transformer(hidden_states=torch.cat([tokens, tokens]), encoder_hidden_states=enc, pooled_projections=pooled,
                                   timestep=torch.cat([t, t]), img_ids=ids_img.to(param.device), txt_ids=ids_txt.to(param.device),
                                   return_dict=False)[0]  # fmt: skip
                cond, uncond = both[:batch], both[batch:]
                v = uncond + cond_scale * (cond - uncond)
        v = shapes.from_latent(unpack(v)).to(x.device, x.dtype)
        return x - sig.to(x.dtype).reshape(-1, 1, 1, 1) * v

    return model
