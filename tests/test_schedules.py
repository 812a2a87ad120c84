"""Schedules: Karras / exponential against k-diffusion, DDPM-discrete against diffusers' schedulers."""

import warnings

import numpy as np
import pytest
import torch

from adaptive_sampling import schedules

SPACINGS = ["leading", "linspace", "trailing"]
BETAS = [("scaled_linear", 0.00085, 0.012), ("linear", 0.0001, 0.02)]


@pytest.mark.parametrize("n", [1, 7, 50])
def test_karras_and_exponential_match_k_diffusion(kdiff, n):
    ours = schedules.get_sigmas_karras(n, 0.03, 14.6, rho=7.0, dtype=torch.float32)
    assert torch.equal(ours, kdiff.get_sigmas_karras(n, 0.03, 14.6, rho=7.0))
    ours = schedules.get_sigmas_exponential(n, 0.03, 14.6, dtype=torch.float32)
    assert torch.equal(ours, kdiff.get_sigmas_exponential(n, 0.03, 14.6))


def _diffusers():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import diffusers
    return diffusers


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("n", [10, 25, 50])
def test_ddpm_grids_match_diffusers(spacing, beta, n):
    d = _diffusers()
    kind, start, end = beta
    cfg = dict(beta_schedule=kind, beta_start=start, beta_end=end, timestep_spacing=spacing, steps_offset=1)
    ours = dict(beta_schedule=kind, beta_start=start, beta_end=end, timestep_spacing=spacing, steps_offset=1)

    euler = d.EulerDiscreteScheduler(**cfg)
    euler.set_timesteps(n)
    got = schedules.get_sigmas_ddpm(n, grid="euler", dtype=torch.float32, **ours)
    assert torch.equal(got, euler.sigmas.float())
    assert np.array_equal(schedules.ddpm_timesteps(n, 1000, spacing, 1, "euler"), euler.timesteps.numpy())

    dpm = d.DPMSolverMultistepScheduler(**cfg)
    dpm.set_timesteps(n)
    got = schedules.get_sigmas_ddpm(n, grid="dpmsolver", dtype=torch.float32, **ours)
    assert torch.equal(got, dpm.sigmas.float())

    ddim = d.DDIMScheduler(**cfg, set_alpha_to_one=False)
    ddim.set_timesteps(n)
    t = schedules.ddpm_timesteps(n, 1000, spacing, 1, "ddim")
    assert np.array_equal(t, ddim.timesteps.numpy())
    ac = ddim.alphas_cumprod
    assert torch.equal(schedules.ddpm_alphas_cumprod(kind, start, end), ac)
    expected = ((1 - ac[t]) / ac[t]) ** 0.5
    got = schedules.get_sigmas_ddpm(n, grid="ddim", dtype=torch.float32, final_sigma="sigma_min", **ours)
    assert torch.equal(got[:-1], expected)
    fa = ddim.final_alpha_cumprod
    assert got[-1] == ((1 - fa) / fa) ** 0.5


def test_ddpm_sigmas_are_a_valid_schedule():
    s = schedules.get_sigmas_ddpm(50)
    assert s.dtype == torch.float64 and len(s) == 51 and s[-1] == 0
    assert bool((s[1:] < s[:-1]).all())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n=0), "n"),
        (dict(n=5, beta_schedule="cosine"), "beta_schedule"),
        (dict(n=5, timestep_spacing="even"), "timestep_spacing"),
        (dict(n=5, grid="pndm"), "grid"),
        (dict(n=5, final_sigma="one"), "final_sigma"),
        (dict(n=2000), "num_train_timesteps"),
        (dict(n=5, steps_offset=900), "steps_offset"),
    ],
)
def test_ddpm_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        schedules.get_sigmas_ddpm(**kwargs)


@pytest.mark.parametrize("args", [(0, 0.1, 10.0), (5, 0.0, 10.0), (5, 10.0, 1.0)])
def test_karras_bad_arguments(args):
    with pytest.raises(ValueError):
        schedules.get_sigmas_karras(*args)
