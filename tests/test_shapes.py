"""The shapes workload: procedural data, the shipped diffusers UNet as a denoiser, and that it is a real model.

Nothing here trains: the checks run the shipped checkpoints (``bench/train_shapes.py`` made them).
"""

from __future__ import annotations

from importlib import resources

import numpy as np
import pytest
import torch

from adaptive_sampling import get_sigmas_ddpm, sample_ddim
from adaptive_sampling.evaluation.workloads import shapes

pytest.importorskip("diffusers")
pytest.importorskip("safetensors")


@pytest.fixture(scope="module")
def pretrained():
    return shapes.load_pretrained()


@pytest.fixture(scope="module")
def classifier():
    return shapes.load_classifier()


# --- data ---------------------------------------------------------------------------------------------


def test_make_data_is_seeded_in_range_and_covers_the_classes():
    x, y = shapes.make_data(600, 0)
    assert x.shape == (600, 3, 32, 32) and x.dtype == torch.float32
    assert y.shape == (600,) and y.dtype == torch.long
    assert x.min().item() >= -1.0 and x.max().item() <= 1.0
    assert x.min().item() < -0.99 and x.max().item() > 0.99  # the range is used, not a sliver of it
    assert set(y.tolist()) == set(range(10))
    x2, y2 = shapes.make_data(600, 0)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = shapes.make_data(600, 1)
    assert (x - x3).abs().mean() > 0.2
    # images are distinct, not copies
    d = torch.cdist(x.flatten(1), x.flatten(1))
    d.fill_diagonal_(float("inf"))
    assert d.min() > 1.0
    assert shapes.make_data(0, 0)[0].shape == (0, 3, 32, 32)
    with pytest.raises(ValueError):
        shapes.make_data(-1, 0)


def test_latent_is_a_permutation_of_the_pixels():
    x, _ = shapes.make_data(4, 2)
    lat = shapes.to_latent(x)
    assert lat.shape == (4, 12, 16, 16)
    assert torch.equal(shapes.from_latent(lat), x)
    assert torch.equal(lat.flatten(1).sort(1).values, x.flatten(1).sort(1).values)
    # a 2x2 patch of the image is one latent position
    assert torch.equal(lat[0, :, 1, 2].reshape(3, 2, 2), x[0, :, 2:4, 4:6])


def test_shipped_classifier_reads_fresh_procedural_data(classifier):
    x, y = shapes.make_data(500, 3)
    with torch.no_grad():
        acc = (classifier(x).argmax(1) == y).float().mean().item()
    assert acc >= 0.97
    with torch.no_grad():  # it reads shapes, not colours: shuffled pixels are not classified
        shuffled = x.flatten(2)[:, :, torch.randperm(1024, generator=torch.Generator().manual_seed(0))].reshape(x.shape)
        assert (classifier(shuffled).argmax(1) == y).float().mean().item() < 0.4


# --- the checkpoint and its interfaces ---------------------------------------------------------------


def test_checkpoints_are_package_data():
    for path in (shapes.CHECKPOINT, shapes.CLASSIFIER_CHECKPOINT):
        ref = resources.files("adaptive_sampling") / "evaluation" / "workloads" / "data" / path.name
        assert ref.is_file() and path.samefile(str(ref))
        assert 0 < path.stat().st_size <= 10_000_000


def test_load_pretrained_gives_the_diffusers_unet_and_schedule(pretrained):
    from diffusers import DDPMScheduler, UNet2DModel

    unet, scheduler = pretrained
    assert isinstance(unet, UNet2DModel) and isinstance(scheduler, DDPMScheduler) and not unet.training
    assert 1_500_000 <= sum(p.numel() for p in unet.parameters()) <= 8_000_000  # 1.92M
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in unet.parameters())
    assert unet.config.num_class_embeds == shapes.NUM_CLASSES + 1
    assert (unet.config.in_channels, unet.config.sample_size) == (12, 16)
    c = scheduler.config
    assert (c.beta_schedule, c.beta_start, c.beta_end, c.num_train_timesteps) == ("scaled_linear", 0.00085, 0.012, 1000)
    assert c.prediction_type == "epsilon"
    ac = shapes.ddpm_alphas_cumprod()
    torch.testing.assert_close(scheduler.alphas_cumprod, ac, rtol=0, atol=0)


def test_sigmas_and_sigma_to_t():
    for spacing in ("leading", "trailing"):
        want = get_sigmas_ddpm(50, timestep_spacing=spacing, steps_offset=1)  # Stable Diffusion's scheduler config
        torch.testing.assert_close(shapes.sigmas(50, spacing), want, rtol=0, atol=0)
    s = shapes.sigmas(50)
    ts = shapes.train_sigmas()
    assert s[-1] == 0 and s[0] == ts[981] and len(s) == 51
    # grid sigmas map to their integer timesteps exactly; in between, monotone in log sigma
    t = shapes.sigma_to_t(s[:-1])
    assert torch.equal(t, torch.arange(981, -1, -20, dtype=torch.float64))
    mid = (ts[100].log() * 0.25 + ts[101].log() * 0.75).exp()
    assert shapes.sigma_to_t(mid.reshape(1)).item() == pytest.approx(100.75, abs=1e-9)
    assert shapes.sigma_to_t(mid.reshape(1), quantize=True).item() == 101
    assert shapes.sigma_to_t(torch.tensor([1e-4, 1e4], dtype=torch.float64)).tolist() == [0.0, 999.0]
    k = shapes.karras_sigmas(10)
    assert k[0].item() == pytest.approx(shapes.SIGMA_MAX) and k[-2].item() == pytest.approx(shapes.SIGMA_MIN)


class Counting(torch.nn.Module):
    """Wraps the UNet, counting calls and rows."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.config, self.calls, self.rows = unet, unet.config, 0, 0

    def forward(self, sample, timestep, class_labels=None):
        self.calls += 1
        self.rows += sample.shape[0]
        return self.unet(sample, timestep, class_labels=class_labels)


def test_denoiser_is_the_unet_with_cfg_in_one_call_and_deterministic(pretrained):
    unet, _ = pretrained
    g = torch.Generator().manual_seed(4)
    x0, _ = shapes.make_data(6, 5)
    sigma = torch.tensor([14.0, 5.0, 1.0, 0.3, 0.1, 0.03], dtype=torch.float64)
    x = x0.double() + sigma.reshape(-1, 1, 1, 1) * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 7, 8, 10])
    counting = Counting(unet)
    model = shapes.denoiser(2.5, counting)
    out = model(x, sigma, y=y)
    assert counting.calls == 1 and counting.rows == 12
    assert out.dtype == torch.float64 and out.shape == x.shape and torch.isfinite(out).all()
    assert torch.equal(model(x, sigma, y=y), out)  # deterministic
    # by hand: VP input, continuous timestep, eps -> denoised, guidance on eps
    xin = shapes.to_latent((x / (1 + sigma.reshape(-1, 1, 1, 1) ** 2).sqrt()).float())
    t = shapes.sigma_to_t(sigma).float()
    with torch.no_grad():
        ec = unet(xin, t, class_labels=y).sample
        eu = unet(xin, t, class_labels=torch.full_like(y, shapes.NULL_CLASS)).sample
    eps = shapes.from_latent(eu + 2.5 * (ec - eu)).double()
    torch.testing.assert_close(out, x - sigma.reshape(-1, 1, 1, 1) * eps, rtol=1e-4, atol=1e-4)
    # the null class is "unconditional"; y=None is one unconditional call
    torch.testing.assert_close(out[-1], model(x[-1:], sigma[-1:])[0], rtol=1e-4, atol=1e-4)
    counting.calls = counting.rows = 0
    model(x, sigma)
    assert (counting.calls, counting.rows) == (1, 6)
    # float32 in, float32 out, close to the float64 result
    out32 = model(x.float(), sigma.float(), y=y)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), out, rtol=1e-3, atol=1e-3)


def test_eps_mse_is_far_below_trivial_predictors(pretrained):
    """eps = 0 scores 1. The Gaussian-pixel predictor (exact posterior mean if the pixels were
    independent Gaussians with the data's mean and variance) is the stronger trivial rule.
    Measured here (make_data(256, 21), one noise draw per t; model / Gaussian): t=50 0.053 / 0.757,
    t=250 0.020 / 0.254, t=500 0.011 / 0.060, t=800 0.0037 / 0.0064 (bench/results/shapes_training.md
    has 512 images and more t)."""
    unet, _ = pretrained
    x0, y = shapes.make_data(256, 21)
    ref, _ = shapes.make_data(4000, 22)
    mu, var = ref.mean(0), ref.var(0)
    ac = shapes.ddpm_alphas_cumprod()
    g = torch.Generator().manual_seed(23)
    ratios = {}
    for t in (50, 250, 500, 800):
        noise = torch.randn(x0.shape, generator=g)
        a = ac[t]
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with torch.no_grad():
            pred = shapes.from_latent(unet(shapes.to_latent(xt), torch.full((256,), t), class_labels=y).sample)
        gauss = (1 - a).sqrt() / (a * var + 1 - a) * (xt - a.sqrt() * mu)
        model_mse, gauss_mse = (pred - noise).pow(2).mean().item(), (gauss - noise).pow(2).mean().item()
        assert model_mse < 0.3 * min(1.0, gauss_mse) or t >= 800, (t, model_mse, gauss_mse)
        ratios[t] = model_mse / gauss_mse
    assert ratios[800] < 0.7  # even where the noise is nearly all that is left, the model knows better


def test_ddim_samples_are_their_class(pretrained, classifier):
    """The full 50-step DDIM run (leading grid, guidance 3) on 50 samples, 5 per class, labelled by
    the shipped classifier (trained on procedural data only). The issue asks for >= 80%.

    Measured when the test was written (this machine, 2 threads): 41 of 50 correct; with every
    label shifted by one class, the same noise gives 36 of 50 read as the shifted class."""
    unet, _ = pretrained
    y = torch.arange(10).repeat_interleave(5)
    noise = torch.randn(50, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    grid = shapes.sigmas(50)
    out, report = sample_ddim(shapes.denoiser(3.0, unet), noise * grid[0], grid, extra_args={"y": y}, disable=True)
    assert np.all(report.nfe == 50)
    assert out.min() > -2 and out.max() < 2  # the data lie in [-1, 1]; samples overshoot a little
    with torch.no_grad():
        pred = classifier(out.clamp(-1, 1)).argmax(1)
    correct = (pred == y).sum().item()
    assert correct >= 40, correct
    # the labels matter: the same noise with every label shifted by one is mostly read as the shifted class
    shifted = (y + 1) % 10
    out, _ = sample_ddim(shapes.denoiser(3.0, unet), noise * grid[0], grid, extra_args={"y": shifted}, disable=True)
    with torch.no_grad():
        assert (classifier(out.clamp(-1, 1)).argmax(1) == shifted).sum().item() >= 30


def test_library_ddim_on_the_denoiser_matches_diffusers_ddim_on_the_raw_unet(pretrained):
    """The two faces of the workload agree: diffusers' DDIMScheduler driving the raw UNet (VP latents,
    integer timesteps, CFG on eps) and the library's sample_ddim on ``denoiser`` and ``sigmas``."""
    from diffusers import DDIMScheduler

    unet, scheduler = pretrained
    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(10)
    y = torch.tensor([0, 3, 5, 9])
    null = torch.full_like(y, shapes.NULL_CLASS)
    lat = torch.randn(4, 12, 16, 16, generator=torch.Generator().manual_seed(8))
    start = lat.clone()
    with torch.no_grad():
        for t in ddim.timesteps:
            both = unet(torch.cat([lat, lat]), t, class_labels=torch.cat([y, null])).sample
            eps = both[4:] + 3.0 * (both[:4] - both[4:])
            lat = ddim.step(eps, t, lat).prev_sample
    grid = shapes.sigmas(10)
    assert torch.equal(shapes.sigma_to_t(grid[:-1]), ddim.timesteps.double())
    x = shapes.from_latent(start).double() * (1 + grid[0] ** 2).sqrt()
    out, _ = sample_ddim(shapes.denoiser(3.0, unet), x, grid, extra_args={"y": y}, disable=True)
    torch.testing.assert_close(out.float(), shapes.from_latent(lat), rtol=0, atol=1e-4)  # measured: 4e-6
