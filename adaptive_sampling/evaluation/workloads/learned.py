"""A small learned class-conditional denoiser of sklearn's digits, shipped as package data.

Why: the exact denoiser of a finite set memorises, so two sampling runs either land on the same
training image or on different ones; ranking skip policies by quality needs a smooth,
generalising model. This one is trained by ``bench/train_digits.py`` (EDM loss, label dropout for
classifier-free guidance, EMA weights) in minutes on 2 CPU cores; the checkpoint is
``workloads/data/digits_denoiser.pt``.

Architecture (about 1M parameters; an MLP, because thousands of batched calls must run fast on
a CPU): EDM preconditioning (Karras et al. 2022, sigma_data = 0.5)

    D(x, sigma) = c_skip x + c_out F(c_in x, c_noise, y),  c_noise = log(sigma) / 4

where F flattens the 64 pixels, projects them to width 256 and applies residual MLP blocks
(LayerNorm -> FiLM from the noise + class embedding -> Linear -> SiLU -> Linear). The noise
level enters through a sinusoidal embedding of c_noise, the class through a learned embedding
with 11 rows: 0..9 are the digits, 10 (``NULL_CLASS``) is "no class", used for guidance.
A third embedding tells the network whether its training input was shifted one pixel left or
right (EDM's non-leaking augmentation, which cuts the overfitting of 1797 images); sampling
always uses label 0, "not shifted", which is what ``augment=None`` means.

Recommended sampling (what the shipped model was checked with): a Karras grid with
sigma_min = 0.002 and sigma_max = 20 (rho = 7), 50 steps, initial noise ``randn * 20``, guidance
``cond_scale`` 1.5 to 2. Why sigma_max = 20 and not EDM's 80: the data lies in [-1, 1] (std 0.75),
so sigma = 20 already drowns it, and the training noise distribution (log-normal, P_mean = -1.2,
P_std = 1.2) almost never visits sigma > 20, where the network extrapolates (it drifts from the
exact denoiser's class mean as sigma grows). Stronger guidance works (samples stay
class-correct at 3) but makes trajectories more sensitive to skipped steps: a few samples then
jump to another shape.

    from adaptive_sampling import get_sigmas_karras, sample_dpmpp_2m
    from adaptive_sampling.evaluation.workloads.learned import cfg_denoiser, load_pretrained

    guided = cfg_denoiser(load_pretrained(), cond_scale=2.0)
    sigmas = get_sigmas_karras(50, 0.002, 20.0)
    y = torch.arange(10)  # one sample of each digit
    x, report = sample_dpmpp_2m(guided, torch.randn(10, 1, 8, 8) * 20, sigmas, extra_args={"y": y})
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch
from torch import nn

__all__ = [
    "SIGMA_DATA",
    "NUM_CLASSES",
    "NULL_CLASS",
    "NUM_AUGMENTS",
    "RECOMMENDED_SIGMA_MIN",
    "RECOMMENDED_SIGMA_MAX",
    "CHECKPOINT",
    "DigitsDenoiser",
    "cfg_denoiser",
    "load_pretrained",
]

SIGMA_DATA = 0.5
NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES
NUM_AUGMENTS = 3  # training-time augmentation labels: 0 none (always at sampling), 1/2 shifted left/right
RECOMMENDED_SIGMA_MIN = 0.002
RECOMMENDED_SIGMA_MAX = 20.0
CHECKPOINT = Path(__file__).resolve().parent / "data" / "digits_denoiser.pt"


class NoiseEmbedding(nn.Module):
    """Sinusoidal features of c_noise at fixed geometric frequencies (no parameters, no buffer)."""

    def __init__(self, dim: int = 64, min_freq: float = 0.5, max_freq: float = 64.0) -> None:
        super().__init__()
        self.dim, self.min_freq, self.max_freq = dim, min_freq, max_freq

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        ramp = torch.linspace(0, 1, half, device=c_noise.device, dtype=c_noise.dtype)
        freqs = self.min_freq * (self.max_freq / self.min_freq) ** ramp
        angles = c_noise[:, None] * freqs[None, :]
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class ResidualBlock(nn.Module):
    """h + MLP(FiLM(LayerNorm(h))): the embedding sets a per-feature scale and shift."""

    def __init__(self, width: int, hidden: int, emb_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.film = nn.Linear(emb_dim, 2 * width)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.dropout = nn.Dropout(dropout)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(emb).chunk(2, dim=1)
        z = self.norm(h) * (1 + scale) + shift
        z = self.fc2(self.dropout(nn.functional.silu(self.fc1(z))))
        return h + z


class DigitsDenoiser(nn.Module):
    """EDM-preconditioned class-conditional MLP denoiser for 1x8x8 images (see the module docstring).

    ``forward(x, sigma, y=None)``: x [B, 1, 8, 8] in VE scale, sigma [B] (or a scalar), y [B] long
    (``None`` or ``NULL_CLASS`` rows: unconditional) -> denoised, same shape and dtype as x.
    ``augment`` [B] long is for training only (see the module docstring).
    """

    def __init__(
        self,
        width: int = 256,
        hidden: int = 512,
        depth: int = 3,
        emb_dim: int = 128,
        noise_features: int = 64,
        dropout: float = 0.0,
        augment_labels: int = NUM_AUGMENTS,
        sigma_data: float = SIGMA_DATA,
        image_shape: tuple[int, int, int] = (1, 8, 8),
    ) -> None:
        super().__init__()
        self.sigma_data = sigma_data
        self.image_shape = tuple(image_shape)
        pixels = math.prod(image_shape)
        self.noise_embed = NoiseEmbedding(noise_features)
        self.noise_mlp = nn.Sequential(nn.Linear(noise_features, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_embed = nn.Embedding(NUM_CLASSES + 1, emb_dim)
        self.augment_embed = nn.Embedding(augment_labels, emb_dim)
        self.inp = nn.Linear(pixels, width)
        self.blocks = nn.ModuleList(ResidualBlock(width, hidden, emb_dim, dropout) for _ in range(depth))
        self.out_norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, pixels)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def preconditioning(self, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """EDM's c_skip, c_out, c_in, c_noise for sigma [B]."""
        sd2 = self.sigma_data**2
        s2 = sigma * sigma
        c_skip = sd2 / (s2 + sd2)
        c_out = sigma * self.sigma_data * torch.rsqrt(s2 + sd2)
        c_in = torch.rsqrt(s2 + sd2)
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise

    def forward(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor | float,
        y: torch.Tensor | None = None,
        augment: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch = x.shape[0]
        param = self.out.weight
        sig = torch.as_tensor(sigma, device=param.device, dtype=param.dtype).reshape(-1)
        sig = sig.expand(batch) if sig.numel() == 1 else sig
        if y is None:
            y = torch.full((batch,), NULL_CLASS, dtype=torch.long, device=param.device)
        c_skip, c_out, c_in, c_noise = self.preconditioning(sig)
        flat = x.reshape(batch, -1).to(param.dtype)
        emb = self.noise_mlp(self.noise_embed(c_noise)) + self.class_embed(y.to(param.device, torch.long).reshape(-1))
        if augment is None:
            emb = emb + self.augment_embed.weight[0]
        else:
            emb = emb + self.augment_embed(augment.to(param.device, torch.long).reshape(-1))
        emb = nn.functional.silu(emb)
        h = self.inp(flat * c_in[:, None])
        for block in self.blocks:
            h = block(h, emb)
        f = self.out(self.out_norm(h))
        # the skip term in x's own dtype, so a float64 latent is not rounded to the weights' dtype
        skip = c_skip.to(x.dtype)[:, None] * x.reshape(batch, -1)
        return (skip + (c_out[:, None] * f).to(x.dtype)).reshape(x.shape)


def cfg_denoiser(model: Callable[..., torch.Tensor], cond_scale: float) -> Callable[..., torch.Tensor]:
    """Classifier-free guidance as one model: ``(x, sigma, y) -> D_u + cond_scale * (D_c - D_u)``.

    The conditional and unconditional branches run in ONE batched call of ``model`` (rows
    concatenated, the second half labelled ``NULL_CLASS``), so a skipped step skips both.
    """

    def guided(x: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        batch = x.shape[0]
        if y is None:
            return model(x, sigma, y=None)
        sig = torch.as_tensor(sigma, device=x.device).reshape(-1)
        sig = sig.expand(batch) if sig.numel() == 1 else sig
        y = y.to(torch.long).reshape(-1)
        null = torch.full_like(y, NULL_CLASS)
        both = model(torch.cat([x, x]), torch.cat([sig, sig]), y=torch.cat([y, null]))
        cond, uncond = both[:batch], both[batch:]
        return uncond + cond_scale * (cond - uncond)

    return guided


def load_pretrained(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> DigitsDenoiser:
    """The shipped model (EMA weights of ``bench/train_digits.py``), in eval mode, on ``device`` in ``dtype``."""
    state = torch.load(CHECKPOINT, map_location="cpu", weights_only=True)
    model = DigitsDenoiser()
    model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
