"""Tiny random diffusers pipelines built offline from configs (tests and bench/diffusers_caches.py).

A Stable Diffusion pipeline (UNet2DConditionModel, AutoencoderKL, CLIP text encoder with a locally
written byte-level vocabulary and no merges) and a PixArt-alpha pipeline (PixArtTransformer2DModel,
driven with ``prompt_embeds``: no T5 needed). Latents are 4 x 8 x 8; every model is random, so
outputs mean nothing, but every code path of the pipelines runs.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
import warnings

import torch

SD_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000
)  # Stable Diffusion's training schedule


def _bytes_to_unicode() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


@functools.lru_cache(maxsize=None)
def _vocab_files() -> tuple[str, str, int]:
    d = tempfile.mkdtemp(prefix="tiny_clip_")
    chars = _bytes_to_unicode()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in chars:
            vocab[c + suffix] = len(vocab)
    vocab_path, merges_path = os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt")
    with open(vocab_path, "w") as f:
        json.dump(vocab, f)
    with open(merges_path, "w") as f:
        f.write("#version: 0.2\n")
    return vocab_path, merges_path, len(vocab)


def clip_tokenizer():
    from transformers import CLIPTokenizer

    vocab, merges, _ = _vocab_files()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def sd_pipeline(scheduler_cls=None, seed: int = 0, **scheduler_kwargs):
    """A tiny StableDiffusionPipeline; ``scheduler_cls`` (default DDIM) gets SD's training schedule
    plus ``scheduler_kwargs``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8,
        norm_num_groups=4,
        attention_head_dim=2,
    )
    vae = AutoencoderKL(
        block_out_channels=(8,),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        norm_num_groups=4,
    )
    _, _, vocab_size = _vocab_files()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            hidden_size=8,
            intermediate_size=16,
            num_attention_heads=2,
            num_hidden_layers=1,
            vocab_size=vocab_size,
            projection_dim=8,
            max_position_embeddings=77,
        )
    )
    if scheduler_cls is None:  # Stable Diffusion's DDIM configuration
        scheduler_cls = DDIMScheduler
        scheduler_kwargs = {"clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, **scheduler_kwargs}
    scheduler = scheduler_cls(**{**SD_SCHEDULER, **scheduler_kwargs})
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pixart_pipeline(seed: int = 0, scheduler_cls=None, **scheduler_kwargs):
    """A tiny PixArtAlphaPipeline (learned-sigma transformer, DPM-Solver++ by default) without a
    text encoder: call it with ``prompt_embeds`` / ``negative_prompt_embeds`` [B, L, 8] and their
    attention masks."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        sample_size=8,
        num_layers=2,
        patch_size=2,
        attention_head_dim=4,
        num_attention_heads=2,
        in_channels=4,
        out_channels=8,
        cross_attention_dim=8,
        caption_channels=8,
        use_additional_conditions=False,
    )
    vae = AutoencoderKL(
        block_out_channels=(8,),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        norm_num_groups=4,
    )
    cls = scheduler_cls or DPMSolverMultistepScheduler
    scheduler = cls(**{**SD_SCHEDULER, "beta_schedule": "linear", "beta_end": 0.02, "beta_start": 0.0001, **scheduler_kwargs})
    pipe = PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl_pipeline(seed: int = 0, scheduler_cls=None, **scheduler_kwargs):
    """A tiny StableDiffusionXLPipeline: two CLIP text encoders (hidden 8 each, the second with a
    projection), a UNet with SDXL's ``text_time`` added conditioning (``added_cond_kwargs``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16,
        norm_num_groups=4,
        attention_head_dim=2,
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=6 * 4 + 8,
    )
    vae = AutoencoderKL(
        block_out_channels=(8,),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        norm_num_groups=4,
    )
    _, _, vocab_size = _vocab_files()
    config = CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=8,
        intermediate_size=16,
        num_attention_heads=2,
        num_hidden_layers=2,
        vocab_size=vocab_size,
        projection_dim=8,
        max_position_embeddings=77,
        hidden_act="gelu",
    )
    cls = scheduler_cls or EulerDiscreteScheduler
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(config),
        text_encoder_2=CLIPTextModelWithProjection(config),
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(),
        unet=unet,
        scheduler=cls(**{**SD_SCHEDULER, "steps_offset": 1, **scheduler_kwargs}),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --- flow-matching transformers: SD3 (batched CFG), Flux (true CFG: two calls), Wan 2.1 / 2.2 (video) ---


def _flow_scheduler(kind: str, **kwargs):
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    if kind == "euler":
        return FlowMatchEulerDiscreteScheduler(**{"shift": 3.0, **kwargs})
    flow = dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=kwargs.pop("shift", 3.0))
    if kind == "dpmpp_2m":
        return DPMSolverMultistepScheduler(**flow, algorithm_type="dpmsolver++", solver_order=2, **kwargs)
    if kind == "unipc":
        return UniPCMultistepScheduler(**flow, **kwargs)
    raise ValueError(kind)


def sd3_pipeline(seed: int = 0, scheduler: str = "euler", **scheduler_kwargs):
    """A tiny StableDiffusion3Pipeline without VAE and text encoders: call it with ``prompt_embeds`` [B, T, 16],
    ``pooled_prompt_embeds`` [B, 16] and their negatives, ``height = width = 64`` (latent 4 x 8 x 8),
    ``output_type="latent"``. CFG is one batched transformer call on [uncond; cond]."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                        caption_projection_dim=16, pooled_projection_dim=16, pos_embed_max_size=8).eval()  # fmt: skip
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=_flow_scheduler(scheduler, **scheduler_kwargs), vae=None,
                                    text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_pipeline(seed: int = 0, scheduler: str = "euler", **scheduler_kwargs):
    """A tiny FluxPipeline without VAE and text encoders (``prompt_embeds`` [B, T, 16], ``pooled_prompt_embeds``
    [B, 16]; ``true_cfg_scale > 1`` with the negatives: two transformer calls per step), ``height = width = 64``
    (packed latent [B, 16, 16]), dynamic shifting like FLUX.1's scheduler."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from diffusers import FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
                                         num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16,
                                         guidance_embeds=False, axes_dims_rope=(2, 2, 4)).eval()  # fmt: skip
    if scheduler == "euler":
        scheduler_kwargs = {"use_dynamic_shifting": True, **scheduler_kwargs}
    pipe = FluxPipeline(scheduler=_flow_scheduler(scheduler, **scheduler_kwargs), vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=transformer)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def wan_pipeline(seed: int = 0, scheduler: str = "unipc", two: bool = False, **scheduler_kwargs):
    """A tiny WanPipeline (video: latents [B, 4, 2, 4, 4] for ``num_frames=5, height=width=32``) without
    VAE and text encoder (``prompt_embeds`` / ``negative_prompt_embeds`` [B, T, 16]); CFG is two
    transformer calls per step. ``two=True``: Wan 2.2's two transformers, switched at
    ``boundary_ratio = 0.875``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from diffusers import WanPipeline, WanTransformer3DModel

    torch.manual_seed(seed)

    def transformer():
        return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                     out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2,
                                     rope_max_seq_len=32).eval()  # fmt: skip

    first = transformer()
    extra = dict(transformer_2=transformer(), boundary_ratio=0.875) if two else {}
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=_flow_scheduler(scheduler, **scheduler_kwargs),
                       transformer=first, **extra)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe
