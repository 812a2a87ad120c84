"""Procedural coloured shapes (32x32 RGB, 10 classes) and a small Stable-Diffusion-shaped model of them.

Why: the digits workload is an MLP in EDM (VE) parametrisation; Stable Diffusion, where the
paper's numbers come from, is a convolutional UNet predicting eps on a DDPM discrete schedule
(scaled_linear betas 0.00085..0.012, 1000 steps) with classifier-free guidance, sampled on a
leading-spacing grid. This workload has that shape, trained here (``bench/train_shapes.py``).

Data (``make_data``): each image is one anti-aliased shape of one of ten kinds (``CLASSES``) with
random size (radius 10 to 15 pixels), position, rotation and colour over a smooth random
background (a random base colour that contrasts with the shape, a linear colour gradient and
low-frequency noise at two scales). Seeded, unlimited, generated on the fly with torch alone
(about 10000 images per second on one core). An earlier version with smaller shapes and busier
backgrounds was too hard for a model trained in 30 CPU minutes (17-27% of samples recognisable).

Model: a diffusers ``UNet2DModel`` (``UNET_CONFIG``: 3 levels of 48/64/96 channels, one resnet
per level, no attention but the mid block's, class embedding with 11 rows: 0..9 and
``NULL_CLASS`` = 10 for guidance), eps prediction, trained with diffusers' ``DDPMScheduler`` on
SD's schedule (``SCHEDULER_CONFIG``, SD-1.5's betas and ``steps_offset``). Like SD's UNet it works
on a latent, not on pixels: here the latent is the 2x2 space-to-depth of the image (``to_latent``:
[3, 32, 32] -> [12, 16, 16], a lossless permutation of the pixel values, so L1 norms and
differences, which the skip rules measure, are the same in both; ``from_latent`` decodes). The
reason is speed: on a CPU the same UNet on 32x32 pixels costs about 2.5x more per call. 1.92M
parameters, 3.9 MB (float16). Trained in 27.5 minutes on 2 CPU cores (``bench/train_shapes.py``,
``bench/results/shapes_training.md``): 80% of 50-step DDIM samples at guidance 3 are labelled
their class by the shipped classifier (100% on real data).

Two faces:

* ``denoiser(cond_scale)``: k-diffusion's convention ``model(x, sigma, y=labels) -> denoised``
  (x in VE scale, sigma [B]) for ``sample_*``, the k-diffusion wrapper and ``evaluate``;
  sigma -> timestep by interpolation in log sigma (``sigma_to_t``; exact integers on the DDPM
  grids), CFG in one batched UNet call;
* ``load_pretrained()``: the raw ``UNet2DModel`` and its ``DDPMScheduler``, for diffusers'
  schedulers and pipelines (latents [B, 12, 16, 16] in VP scale, integer timesteps).

Recommended sampling (what the shipped model was checked with): ``sigmas(50)`` (SD's DDPM grid,
leading spacing; ``sigmas(n, "trailing")`` and ``karras_sigmas(n)`` also work), initial noise
``randn * sigmas[0]``, guidance ``cond_scale`` 3 (2 to 4 work; 1 gives 58% recognisable samples).

    import torch
    from adaptive_sampling import sample_ddim
    from adaptive_sampling.evaluation.workloads import shapes

    model = shapes.denoiser(cond_scale=3.0)
    grid = shapes.sigmas(50)
    y = torch.arange(10)  # one sample of each class
    x, report = sample_ddim(model, torch.randn(10, 3, 32, 32) * grid[0], grid, extra_args={"y": y})

``pipeline(scheduler)`` wraps the UNet in a real diffusers ``DiffusionPipeline`` (``ShapesPipeline``:
``pipe(labels, num_inference_steps=50, guidance_scale=2.0)``, the standard loop with batched CFG),
which the diffusers hook, ``save_pretrained`` / ``from_pretrained`` and the ``tune`` command take
like any pipeline.

``load_classifier()`` gives the small CNN that labels images (trained on procedural data only);
the tests use it to check that samples are recognisably their class.
Importing this module loads torch only; diffusers and safetensors load inside the functions.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ...schedules import ddpm_alphas_cumprod, get_sigmas_ddpm, get_sigmas_karras

__all__ = [
    "CLASSES",
    "NUM_CLASSES",
    "NULL_CLASS",
    "IMAGE_SHAPE",
    "PATCH",
    "UNET_CONFIG",
    "SCHEDULER_CONFIG",
    "SIGMA_MIN",
    "SIGMA_MAX",
    "CHECKPOINT",
    "CLASSIFIER_CHECKPOINT",
    "make_data",
    "to_latent",
    "from_latent",
    "train_sigmas",
    "sigma_to_t",
    "sigmas",
    "karras_sigmas",
    "load_pretrained",
    "denoiser",
    "ShapeClassifier",
    "load_classifier",
    "pipeline",
    "ShapesPipeline",
]

CLASSES = ("disk", "ring", "square", "triangle", "plus", "star", "crescent", "frame", "heart", "ellipse")
NUM_CLASSES = len(CLASSES)
NULL_CLASS = NUM_CLASSES  # the "no class" label of classifier-free guidance
IMAGE_SHAPE = (3, 32, 32)


# --- signed distances of the ten shapes, in canonical coordinates (shape inside the unit disk) ---------


def _box(px: torch.Tensor, py: torch.Tensor, hx: float, hy: float) -> torch.Tensor:
    qx, qy = px.abs() - hx, py.abs() - hy
    outside = torch.sqrt(qx.clamp_min(0) ** 2 + qy.clamp_min(0) ** 2)
    return outside + torch.maximum(qx, qy).clamp_max(0)


def _disk(px, py, r):
    return torch.sqrt(px * px + py * py) - r


def _triangle(px, py, r=0.82):
    """Equilateral triangle of half side r, centroid at the origin (Inigo Quilez's formula)."""
    k = math.sqrt(3.0)
    px = px.abs() - r
    py = py + r / k
    flip = px + k * py > 0
    px, py = torch.where(flip, (px - k * py) / 2, px), torch.where(flip, (-k * px - py) / 2, py)
    px = px - px.clamp(-2 * r, 0)
    return -torch.sqrt(px * px + py * py) * torch.sign(py)


def _star(px, py):
    """Five-pointed star: radius between 0.4 (notches) and 0.95 (tips), linear in the polar angle."""
    r = torch.sqrt(px * px + py * py)
    phase = torch.remainder(torch.atan2(px, py) * (5 / (2 * math.pi)), 1.0)
    tri = (2 * phase - 1).abs()  # 1 at the tips, 0 between them
    return (r - (0.4 + 0.55 * tri)) * 0.6  # 0.6: rough conversion of the radial gap to a distance


def _heart(px, py):
    """A square turned 45 degrees plus two disks on its upper edges."""
    a, cy = 0.45, -0.15
    qx, qy = (px + (py - cy)) / math.sqrt(2), ((py - cy) - px) / math.sqrt(2)
    sq = _box(qx, qy, a, a)
    o = a / math.sqrt(2)
    return torch.minimum(sq, torch.minimum(_disk(px - o, py - cy - o, a), _disk(px + o, py - cy - o, a)))


def _ellipse(px, py, a=0.9, b=0.4):
    """Approximate distance to an ellipse (Quilez's first-order formula)."""
    k0 = torch.sqrt((px / a) ** 2 + (py / b) ** 2)
    k1 = torch.sqrt((px / a**2) ** 2 + (py / b**2) ** 2).clamp_min(1e-6)
    return k0 * (k0 - 1) / k1


_SDF = (
    lambda x, y: _disk(x, y, 0.8),
    lambda x, y: _disk(x, y, 0.68).abs() - 0.2,
    lambda x, y: _box(x, y, 0.65, 0.65),
    _triangle,
    lambda x, y: torch.minimum(_box(x, y, 0.85, 0.24), _box(x, y, 0.24, 0.85)),
    _star,
    lambda x, y: torch.maximum(_disk(x, y, 0.8), -_disk(x - 0.42, y, 0.62)),
    lambda x, y: _box(x, y, 0.68, 0.68).abs() - 0.17,
    _heart,
    _ellipse,
)


BACKGROUND_WEIGHTS = (0.08, 0.02)  # amplitude of the 4x4 and the 8x8 background noise


def _texture_basis(size: int) -> torch.Tensor:
    """[80, size * size]: bicubic upsampling of a 4x4 and an 8x8 grid as one linear map (weights BACKGROUND_WEIGHTS)."""
    parts = []
    for cells, weight in ((4, BACKGROUND_WEIGHTS[0]), (8, BACKGROUND_WEIGHTS[1])):
        eye = torch.eye(cells * cells).reshape(-1, 1, cells, cells)
        up = F.interpolate(eye, size=size, mode="bicubic", align_corners=False)
        parts.append(weight * up.reshape(cells * cells, -1))
    return torch.cat(parts)


def make_data(n: int, seed: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images [n, 3, 32, 32] in [-1, 1] and their labels [n] (long, 0..9, i.i.d. uniform), from ``seed``.

    The same (n, seed) gives the same images on every call and machine thread count. All random
    draws are made up front per image parameter, so ``make_data(m, s)`` is NOT the first m images
    of ``make_data(n, s)``: use one n per purpose (or different seeds).
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    g = torch.Generator().manual_seed(int(seed))
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    centre = (torch.rand(n, 2, generator=g) - 0.5) * 0.2  # image coordinates run over [-1, 1]
    scale = 0.65 + 0.3 * torch.rand(n, generator=g)  # the unit disk's radius in image units (10 to 15 pixels)
    angle = torch.rand(n, generator=g) * (2 * math.pi)
    shape_colour = torch.rand(n, 3, generator=g) * 2 - 1
    base = (torch.rand(n, 3, generator=g) * 2 - 1) * 0.6
    cells = torch.randn(n, 3, 80, generator=g)  # the background's 4x4 and 8x8 noise grids
    slope = torch.randn(n, 3, 2, generator=g) * 0.15  # the background's linear colour gradient
    # a background too close to the shape's colour is moved to the opposite side
    close = (shape_colour - base).norm(dim=1) < 0.9
    base = torch.where(close[:, None], -0.5 * shape_colour, base)

    size = IMAGE_SHAPE[-1]
    basis = _texture_basis(size)
    u = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    gy, gx = torch.meshgrid(-u, u, indexing="ij")  # y points up
    images = torch.empty(n, *IMAGE_SHAPE, dtype=dtype)
    for lo in range(0, n, _CHUNK):  # chunks that stay in cache: this is memory-bound otherwise
        sl = slice(lo, min(n, lo + _CHUNK))
        images[sl] = _render(labels[sl], centre[sl], scale[sl], angle[sl], shape_colour[sl], base[sl], cells[sl], slope[sl],
                             basis, gx, gy).to(dtype)  # fmt: skip
    return images, labels


_CHUNK = 256


def _render(labels, centre, scale, angle, shape_colour, base, cells, slope, basis, gx, gy) -> torch.Tensor:
    m, size = len(labels), gx.shape[-1]
    dx = gx[None] - centre[:, 0, None, None]
    dy = gy[None] - centre[:, 1, None, None]
    c, s = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    sc = scale[:, None, None]
    px, py = (c * dx + s * dy) / sc, (-s * dx + c * dy) / sc
    dist = torch.empty(m, size, size)
    for k, sdf in enumerate(_SDF):
        rows = (labels == k).nonzero().flatten()
        if len(rows):
            dist[rows] = sdf(px[rows], py[rows]) * sc[rows]
    alpha = (0.5 - dist * (size / 2)).clamp(0, 1)[:, None]  # linear anti-aliasing over one pixel
    background = base[:, :, None, None] + (cells @ basis).reshape(m, 3, size, size)
    background = background + slope[..., 0, None, None] * gx + slope[..., 1, None, None] * gy
    images = background + (shape_colour[:, :, None, None] - background) * alpha
    return images.clamp(-1, 1)


# --- the model: a diffusers UNet2DModel on the 2x2 space-to-depth "latent" ---------------------------

PATCH = 2  # the UNet sees [3 * PATCH**2, 32 / PATCH, 32 / PATCH]: to_latent / from_latent
UNET_CONFIG = {
    "sample_size": IMAGE_SHAPE[-1] // PATCH,
    "in_channels": IMAGE_SHAPE[0] * PATCH * PATCH,
    "out_channels": IMAGE_SHAPE[0] * PATCH * PATCH,
    "block_out_channels": (48, 64, 96),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D", "UpBlock2D"),
    "norm_num_groups": 4,
    "num_class_embeds": NUM_CLASSES + 1,
}
# Stable Diffusion's training schedule; clip_sample off as in SD's scheduler configs
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "prediction_type": "epsilon",
    "clip_sample": False,
    "steps_offset": 1,
}
_DATA = Path(__file__).resolve().parent / "data"
CHECKPOINT = _DATA / "shapes_unet.safetensors"
CLASSIFIER_CHECKPOINT = _DATA / "shapes_classifier.safetensors"


def to_latent(images: torch.Tensor, patch: int = PATCH) -> torch.Tensor:
    """[B, 3, 32, 32] -> [B, 12, 16, 16]: each 2x2 pixel patch becomes 12 channels (a permutation of the values)."""
    return F.pixel_unshuffle(images, patch)


def from_latent(latents: torch.Tensor, patch: int = PATCH) -> torch.Tensor:
    """The inverse of ``to_latent``: [B, 12, 16, 16] -> [B, 3, 32, 32]."""
    return F.pixel_shuffle(latents, patch)


def train_sigmas(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The 1000 training noise levels sigma_t = sqrt((1 - alphabar_t) / alphabar_t), t = 0..999, ascending.

    Computed in float32 as diffusers (and ``get_sigmas_ddpm``) do, so a DDPM-grid sigma is one of
    these values exactly."""
    ac = ddpm_alphas_cumprod(
        SCHEDULER_CONFIG["beta_schedule"], SCHEDULER_CONFIG["beta_start"], SCHEDULER_CONFIG["beta_end"],
        SCHEDULER_CONFIG["num_train_timesteps"],
    )  # fmt: skip
    return ((1 - ac) / ac).sqrt().to(dtype)


SIGMA_MIN = float(train_sigmas()[0])  # about 0.0292
SIGMA_MAX = float(train_sigmas()[-1])  # about 14.61


def sigma_to_t(sigma: torch.Tensor, log_sigmas: torch.Tensor | None = None, quantize: bool = False) -> torch.Tensor:
    """The (fractional) DDPM timestep of each sigma: linear interpolation in log sigma between the two
    neighbouring training sigmas (k-diffusion's ``DiscreteSchedule.sigma_to_t``), clamped to [0, 999].

    A sigma equal to a training sigma gives its integer timestep exactly. ``quantize=True`` rounds
    to the nearest timestep in log sigma instead (k-diffusion's ``quantize``)."""
    if log_sigmas is None:
        log_sigmas = train_sigmas(torch.float64).log()
    log_sigmas = log_sigmas.to(sigma.device)
    ls = sigma.to(log_sigmas.dtype).clamp_min(1e-30).log()
    if quantize:
        return (ls[None] - log_sigmas[:, None]).abs().argmin(dim=0).to(ls.dtype)
    low = (ls[None] >= log_sigmas[:, None]).sum(dim=0).sub(1).clamp(0, len(log_sigmas) - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = ((ls - lo) / (hi - lo)).clamp(0, 1)
    return low.to(ls.dtype) + w


def sigmas(steps: int, spacing: str = "leading", *, grid: str = "ddim", dtype=torch.float64, device="cpu") -> torch.Tensor:
    """The model's DDPM-discrete sampling grid in VE sigma (``steps`` sigmas, then 0), as diffusers'
    ``grid`` scheduler lays it out with ``timestep_spacing=spacing`` (``get_sigmas_ddpm``)."""
    return get_sigmas_ddpm(
        steps, **{k: SCHEDULER_CONFIG[k] for k in ("beta_schedule", "beta_start", "beta_end", "num_train_timesteps", "steps_offset")},
        timestep_spacing=spacing, grid=grid, dtype=dtype, device=device,
    )  # fmt: skip


def karras_sigmas(steps: int, rho: float = 7.0, *, dtype=torch.float64, device="cpu") -> torch.Tensor:
    """A Karras grid over the model's training range (SIGMA_MIN .. SIGMA_MAX), then 0."""
    return get_sigmas_karras(steps, SIGMA_MIN, SIGMA_MAX, rho, dtype=dtype, device=device)


def _load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def load_pretrained(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """``(unet, scheduler)``: the shipped diffusers ``UNet2DModel`` (EMA weights of ``bench/train_shapes.py``,
    eval mode, no gradients) on ``device`` in ``dtype``, and a ``DDPMScheduler`` with the training
    schedule (``DDIMScheduler.from_config(scheduler.config)`` etc. for other samplers).

    The UNet works on ``to_latent(images)``: sample latents of shape [B, 12, 16, 16] and decode them
    with ``from_latent``. Needs diffusers and safetensors; no network access."""
    from diffusers import DDPMScheduler, UNet2DModel

    state, meta = _load_safetensors(CHECKPOINT)
    config = json.loads(meta["unet_config"]) if "unet_config" in meta else UNET_CONFIG
    unet = UNet2DModel(**config)
    unet.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
    unet = unet.to(device=device)  # float32 as built: cast only when asked (diffusers warns on every cast)
    if dtype != torch.float32:
        unet = unet.to(dtype=dtype)
    unet = unet.eval().requires_grad_(False)
    return unet, DDPMScheduler(**SCHEDULER_CONFIG)


def denoiser(cond_scale: float = 3.0, unet=None, *, quantize: bool = False) -> Callable[..., torch.Tensor]:
    """The model as a k-diffusion-convention denoiser ``model(x, sigma, y=labels) -> denoised``.

    x [B, 3, 32, 32] in VE scale (x = x0 + sigma * noise), sigma [B] (or a scalar), y [B] long
    (``None``: unconditional, ``NULL_CLASS`` rows likewise). Per call: t = ``sigma_to_t(sigma)``
    (continuous, or nearest with ``quantize=True``), the UNet sees ``to_latent(x / sqrt(1 + sigma^2))``
    and predicts eps; denoised = x - sigma * eps. With labels, classifier-free guidance
    eps = eps_u + cond_scale * (eps_c - eps_u) runs as ONE batched UNet call on the rows
    [cond(B); uncond(B)], so a skipped step skips both branches. The output has x's dtype.
    ``unet``: a UNet2DModel of this workload (default: ``load_pretrained()[0]``).
    """
    if unet is None:
        unet = load_pretrained()[0]
    log_sigmas = train_sigmas(torch.float64).log()
    patch = IMAGE_SHAPE[-1] // unet.config.sample_size

    def model(x: torch.Tensor, sigma: torch.Tensor | float, y: torch.Tensor | None = None) -> torch.Tensor:
        batch = x.shape[0]
        param = next(unet.parameters())
        sig = torch.as_tensor(sigma, device=x.device).reshape(-1)
        sig = sig.expand(batch) if sig.numel() == 1 else sig
        t = sigma_to_t(sig, log_sigmas, quantize).to(param.device, torch.float32)
        s = sig.to(x.dtype).reshape(-1, 1, 1, 1)
        lat = to_latent(x * torch.rsqrt(1 + s * s), patch).to(param.device, param.dtype)
        with torch.no_grad():
            if y is None:
                labels = torch.full((batch,), NULL_CLASS, dtype=torch.long, device=param.device)
                eps = unet(lat, t, class_labels=labels).sample
            else:
                y = y.to(param.device, torch.long).reshape(-1)
                both = unet(torch.cat([lat, lat]), torch.cat([t, t]), class_labels=torch.cat([y, torch.full_like(y, NULL_CLASS)])).sample
                cond, uncond = both[:batch], both[batch:]
                eps = uncond + cond_scale * (cond - uncond)
        return x - s * from_latent(eps, patch).to(x.device, x.dtype)

    return model


# --- a small CNN classifier of the procedural data (the "is it recognisably its class" check) ----------


class ShapeClassifier(nn.Module):
    """A 270k-parameter CNN labelling 32x32 shape images (trained by ``bench/train_shapes.py`` on
    procedural data only, never on model samples). ``forward(images) -> logits [B, 10]``."""

    def __init__(self) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

        self.net = nn.Sequential(
            *block(3, 24), nn.MaxPool2d(2),
            *block(24, 48), *block(48, 48), nn.MaxPool2d(2),
            *block(48, 96), *block(96, 96), nn.MaxPool2d(2),
            *block(96, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, NUM_CLASSES),
        )  # fmt: skip

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


def load_classifier(device: torch.device | str = "cpu") -> ShapeClassifier:
    """The shipped classifier in eval mode (needs safetensors)."""
    state, _ = _load_safetensors(CLASSIFIER_CHECKPOINT)
    model = ShapeClassifier()
    model.load_state_dict({k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state.items()})
    return model.to(device).eval().requires_grad_(False)


# --- the UNet as a diffusers pipeline (the hook, save_pretrained / from_pretrained, the tune command) ----


def __getattr__(name: str):
    if name == "ShapesPipeline":  # defined on first use: diffusers loads only then
        return _pipeline_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.lru_cache(maxsize=None)
def _pipeline_class():
    from diffusers import DiffusionPipeline, ImagePipelineOutput
    from diffusers.utils.torch_utils import randn_tensor

    class ShapesPipeline(DiffusionPipeline):
        """The shapes UNet as a diffusers pipeline: class labels in, images out.

        ``pipe(labels, num_inference_steps=50, guidance_scale=2.0, generator=None, latents=None,
        output_type="pt")``: latents [B, 12, 16, 16] from ``randn_tensor`` times the scheduler's
        ``init_noise_sigma`` (or ``latents``), then diffusers' standard loop: CFG as one batched UNet
        call on [uncond; cond] (the null class as uncond), ``scale_model_input``, ``scheduler.step``.
        ``output_type="pt"``: images [B, 3, 32, 32] in [-1, 1]; ``"latent"``: the final latents.
        """

        model_cpu_offload_seq = "unet"

        def __init__(self, unet, scheduler) -> None:
            super().__init__()
            self.register_modules(unet=unet, scheduler=scheduler)

        @torch.no_grad()
        def __call__(self, labels, num_inference_steps: int = 50, guidance_scale: float = 2.0, generator=None,
                     latents: torch.Tensor | None = None, output_type: str = "pt", return_dict: bool = True):  # fmt: skip
            device = self._execution_device
            labels = torch.as_tensor(labels, dtype=torch.long, device=device).reshape(-1)
            size, chans = self.unet.config.sample_size, self.unet.config.in_channels
            self.scheduler.set_timesteps(num_inference_steps, device=device)
            if latents is None:
                latents = randn_tensor((len(labels), chans, size, size), generator=generator, device=device, dtype=self.unet.dtype)
                latents = latents * self.scheduler.init_noise_sigma
            cfg = guidance_scale > 1
            null = torch.full_like(labels, NULL_CLASS)
            for t in self.progress_bar(self.scheduler.timesteps):
                inp = torch.cat([latents, latents]) if cfg else latents
                inp = self.scheduler.scale_model_input(inp, t)
                out = self.unet(inp, t, class_labels=torch.cat([null, labels]) if cfg else labels).sample
                if cfg:
                    uncond, cond = out.chunk(2)
                    out = uncond + guidance_scale * (cond - uncond)
                latents = self.scheduler.step(out, t, latents, generator=generator).prev_sample
            images = latents if output_type == "latent" else from_latent(latents.float(), IMAGE_SHAPE[-1] // size).clamp(-1, 1)
            self.maybe_free_model_hooks()
            return ImagePipelineOutput(images=images) if return_dict else (images,)

    ShapesPipeline.__module__ = __name__
    ShapesPipeline.__qualname__ = "ShapesPipeline"
    return ShapesPipeline


def pipeline(scheduler=None, unet=None):
    """A ``ShapesPipeline`` around the shipped UNet (or ``unet``) with ``scheduler`` (default: DDIM
    with the training schedule and Stable Diffusion's settings: leading spacing, steps_offset=1)."""
    from diffusers import DDIMScheduler

    if unet is None:
        unet = load_pretrained()[0]
    if scheduler is None:
        scheduler = DDIMScheduler(**{**SCHEDULER_CONFIG, "set_alpha_to_one": False})
    pipe = _pipeline_class()(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe
