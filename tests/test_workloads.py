"""The offline workloads: Gaussian (closed form), the digits' exact denoiser, the shipped learned denoiser."""

from __future__ import annotations

from importlib import resources

import pytest
import torch

from adaptive_sampling import get_sigmas_karras, sample_dpmpp_2m, sample_euler
from adaptive_sampling.evaluation.workloads.digits import NULL_CLASS, DigitsOptimalDenoiser, load_digits_data
from adaptive_sampling.evaluation.workloads.gaussian import GaussianWorkload
from adaptive_sampling.evaluation.workloads.learned import CHECKPOINT, DigitsDenoiser, cfg_denoiser, load_pretrained

# --- Gaussian data -------------------------------------------------------------------------------


def test_gaussian_denoiser_is_the_posterior_mean():
    w = GaussianWorkload.make(num_classes=3, shape=(2, 4, 4), std=0.5, seed=1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 2, 4, 4, generator=g, dtype=torch.float64) * 3
    sigma = torch.tensor([0.01, 0.1, 0.5, 1.0, 5.0, 80.0], dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    mu = w.means[y]
    s2, sig2 = 0.25, sigma.reshape(-1, 1, 1, 1) ** 2
    expected = (s2 * x + sig2 * mu) / (s2 + sig2)
    torch.testing.assert_close(w.denoiser(x, sigma, y), expected, rtol=1e-14, atol=1e-14)


def test_euler_with_many_steps_approaches_the_ode_solution():
    """Euler is first order: the error at sigma_min falls 4x per 4x steps and gets small."""
    w = GaussianWorkload.make(num_classes=2, shape=(1, 4, 4), std=0.5, seed=2)
    y = torch.tensor([0, 1])
    x = w.noise(2, sigma_max=10.0, seed=3)
    exact = w.ode_solution(x, 10.0, 0.002, y)
    errors = []
    for n in (25, 100, 400, 1600):
        sigmas = get_sigmas_karras(n, 0.002, 10.0)[:-1]  # stop at sigma_min, where ode_solution is evaluated
        out, _ = sample_euler(w.denoiser, x, sigmas, extra_args={"y": y}, disable=True)
        errors.append((out - exact).abs().max().item())
    for coarse, fine in zip(errors, errors[1:]):
        assert 3.5 < coarse / fine < 4.5
    assert errors[-1] < 2e-3


# --- the digits' exact denoiser ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    images, labels = load_digits_data(torch.float64)
    return images, labels, DigitsOptimalDenoiser(images, labels)


def test_load_digits_data():
    images, labels = load_digits_data()
    assert images.shape == (1797, 1, 8, 8) and images.dtype == torch.float32
    assert labels.shape == (1797,) and labels.dtype == torch.long
    assert images.min().item() == -1.0 and images.max().item() == 1.0
    assert set(labels.tolist()) == set(range(10))


def test_tiny_sigma_returns_the_nearest_image_of_the_requested_class(digits):
    images, labels, denoiser = digits
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(len(images), (16,), generator=g)
    x = images[idx] + 0.3 * torch.randn(16, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (16,), generator=g)  # mostly not the class of the image x came from
    flat = images.flatten(1)
    expected = []
    for b in range(16):
        pool = (labels == y[b]).nonzero().flatten()
        d = (flat[pool] - x[b].flatten()).pow(2).sum(1)
        two = d.topk(2, largest=False).values
        assert two[1] - two[0] > 1e-2  # a clear winner, so the posterior is one-hot at sigma = 1e-3
        expected.append(images[pool[d.argmin()]])
    out = denoiser(x, torch.full((16,), 1e-3, dtype=torch.float64), y=y)
    torch.testing.assert_close(out, torch.stack(expected), rtol=0, atol=1e-12)


def test_huge_sigma_returns_the_class_mean(digits):
    images, labels, denoiser = digits
    g = torch.Generator().manual_seed(1)
    sigma = 1e6
    x = torch.randn(10, 1, 8, 8, generator=g, dtype=torch.float64) * sigma
    y = torch.arange(10)
    means = torch.stack([images[labels == c].mean(0) for c in range(10)])
    torch.testing.assert_close(denoiser(x, torch.full((10,), sigma), y=y), means, rtol=0, atol=1e-4)
    torch.testing.assert_close(denoiser(x, sigma), images.mean(0).expand_as(x), rtol=0, atol=1e-4)


def test_guidance(digits):
    images, labels, denoiser = digits
    g = torch.Generator().manual_seed(2)
    x = images[:8] + 0.8 * torch.randn(8, 1, 8, 8, generator=g, dtype=torch.float64)
    sigma = torch.full((8,), 0.8, dtype=torch.float64)
    y = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])
    cond = denoiser(x, sigma, y=y)
    uncond = denoiser(x, sigma)
    assert torch.equal(denoiser(x, sigma, y=y, cond_scale=1.0), cond)
    torch.testing.assert_close(denoiser(x, sigma, y=y, cond_scale=2.5), uncond + 2.5 * (cond - uncond))
    torch.testing.assert_close(denoiser(x, sigma, y=y, cond_scale=0.0), uncond)
    # the null class means "unconditional" row by row
    mixed = y.clone()
    mixed[::2] = NULL_CLASS
    out = denoiser(x, sigma, y=mixed, cond_scale=1.0)
    torch.testing.assert_close(out[::2], uncond[::2])
    torch.testing.assert_close(out[1::2], cond[1::2])


def test_dtypes_and_sampling(digits):
    images, labels, denoiser = digits
    x64 = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2
    sigma = torch.tensor([2.0, 1.0, 0.5, 0.1], dtype=torch.float64)
    y = torch.tensor([0, 7, 7, 9])
    out64 = denoiser(x64, sigma, y=y, cond_scale=2.0)
    out32 = denoiser(x64.float(), sigma.float(), y=y, cond_scale=2.0)
    assert out64.dtype == torch.float64 and out32.dtype == torch.float32 and out32.shape == x64.shape
    torch.testing.assert_close(out32, out64.float(), rtol=1e-5, atol=1e-5)
    # sampling to sigma_min lands on a training image of the requested class
    x, _ = sample_euler(denoiser, x64 * 40, get_sigmas_karras(30, 0.01, 80.0), extra_args={"y": y}, disable=True)
    nearest = torch.cdist(x.flatten(1), images.flatten(1)).argmin(1)
    assert torch.equal(labels[nearest], y)
    torch.testing.assert_close(x, images[nearest], rtol=0, atol=1e-6)


# --- the learned denoiser ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    return load_pretrained()


def test_checkpoint_is_package_data():
    ref = resources.files("adaptive_sampling") / "evaluation" / "workloads" / "data" / "digits_denoiser.pt"
    assert ref.is_file()
    assert CHECKPOINT.samefile(str(ref))
    assert 0 < CHECKPOINT.stat().st_size <= 5_000_000


def test_loads_in_eval_mode_with_about_a_million_parameters(model):
    assert isinstance(model, DigitsDenoiser) and not model.training
    n = sum(p.numel() for p in model.parameters())
    assert 800_000 <= n <= 1_300_000
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in model.parameters())


def test_two_loads_give_identical_weights(model):
    again = load_pretrained()
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_output_is_deterministic_with_input_shape_and_dtype(model):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(8, 1, 8, 8, generator=g) * 3
    sigma = torch.tensor([20.0, 10.0, 3.0, 1.0, 0.5, 0.1, 0.01, 0.002])
    y = torch.tensor([0, 1, 2, 3, 4, 5, 6, 10])
    with torch.no_grad():
        out = model(x, sigma, y)
        assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
        assert torch.equal(model(x, sigma, y), out)
        assert torch.equal(model(x, sigma, None)[-1], out[-1])  # None = the null class
        out64 = model(x.double(), sigma.double(), y)
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64, out.double(), rtol=1e-5, atol=1e-5)
    # EDM preconditioning: at tiny sigma the denoiser is close to the identity
    assert (out[-1] - x[-1]).abs().max() < 0.05


class CountingModel:
    def __init__(self, model):
        self.model, self.calls, self.rows = model, 0, 0

    def __call__(self, x, sigma, y=None):
        self.calls += 1
        self.rows += x.shape[0]
        return self.model(x, sigma, y)


def test_cfg_denoiser_is_one_model_call(model):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 1, 8, 8, generator=g)
    sigma = torch.full((6,), 1.5)
    y = torch.tensor([0, 1, 2, 3, 8, 9])
    counting = CountingModel(model)
    guided = cfg_denoiser(counting, cond_scale=2.0)
    with torch.no_grad():
        out = guided(x, sigma, y)
        assert counting.calls == 1 and counting.rows == 12
        cond, uncond = model(x, sigma, y), model(x, sigma, None)
        torch.testing.assert_close(out, uncond + 2.0 * (cond - uncond), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cfg_denoiser(model, 1.0)(x, sigma, y), cond, rtol=1e-5, atol=1e-5)
        # in a sampler: one model call per computed step
        counting.calls = 0
        sample_dpmpp_2m(guided, x * 20, get_sigmas_karras(8, 0.002, 20.0), extra_args={"y": y}, disable=True)
        assert counting.calls == 8


def test_samples_stay_in_the_data_range(model):
    y = torch.arange(10)
    x = torch.randn(10, 1, 8, 8, generator=torch.Generator().manual_seed(6)) * 20
    out, _ = sample_dpmpp_2m(
        cfg_denoiser(model, 2.0), x, get_sigmas_karras(20, 0.002, 20.0), extra_args={"y": y}, disable=True
    )
    assert torch.isfinite(out).all() and out.abs().max() < 1.5
