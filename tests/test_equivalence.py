"""With skipping off, the steppers reproduce k-diffusion (Euler, DPM-Solver++ 2M) and diffusers'
VP DDIM formulas, in float64, to round-off. The measured worst relative errors are printed
(run with -s to see them)."""

import pytest
import torch

from adaptive_sampling import get_sigmas_ddpm, get_sigmas_karras, sample_ddim, sample_dpmpp_2m, sample_euler
from adaptive_sampling.schedules import ddpm_alphas_cumprod, ddpm_timesteps

from .helpers import MLPDenoiser, gaussian

SIGMAS = {
    "karras": lambda n: get_sigmas_karras(n, 0.03, 14.6),
    "ddpm-leading": lambda n: get_sigmas_ddpm(n, timestep_spacing="leading", steps_offset=1),
    "ddpm-trailing": lambda n: get_sigmas_ddpm(n, timestep_spacing="trailing", grid="euler"),
}


def _models():
    g = gaussian()
    return {"gaussian": (g.denoiser, g.noise), "mlp": (MLPDenoiser(dim=72), g.noise)}


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("grid", list(SIGMAS))
@pytest.mark.parametrize("model_name", ["gaussian", "mlp"])
@pytest.mark.parametrize("ours_name, theirs_name", [("euler", "sample_euler"), ("dpmpp_2m", "sample_dpmpp_2m")])
def test_matches_k_diffusion(kdiff, grid, model_name, ours_name, theirs_name):
    model, noise = _models()[model_name]
    sigmas = SIGMAS[grid](20)
    x = noise(3, float(sigmas[0]), seed=1)
    ours = {"euler": sample_euler, "dpmpp_2m": sample_dpmpp_2m}[ours_name]
    got, report = ours(model, x, sigmas, disable=True)
    want = getattr(kdiff, theirs_name)(model, x, sigmas, disable=True)
    err = rel_err(got, want)
    print(f"\n{ours_name} vs k-diffusion {theirs_name} [{grid}, {model_name}]: relative error {err:.2e}")
    assert err <= 1e-12
    assert report.nfe.tolist() == [20, 20, 20]


def _ddim_vp_reference(eps_vp, x_vp, alphas_cumprod, timesteps, final_alpha, eta=0.0, noises=None):
    """DDIM written in VP coordinates from diffusers' DDIMScheduler.step formulas (eq. 12 of Song et al.)."""
    for k, t in enumerate(timesteps):
        a_t = alphas_cumprod[t]
        a_prev = alphas_cumprod[timesteps[k + 1]] if k + 1 < len(timesteps) else final_alpha
        eps = eps_vp(x_vp, t)
        x0 = (x_vp - (1 - a_t) ** 0.5 * eps) / a_t**0.5
        variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        std = eta * variance**0.5
        x_vp = a_prev**0.5 * x0 + (1 - a_prev - std**2) ** 0.5 * eps
        if eta > 0:
            x_vp = x_vp + std * noises[k]
    return x_vp


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_matches_vp_formulas(spacing, eta):
    n = 25
    g = gaussian()
    ac = ddpm_alphas_cumprod().double()
    t = ddpm_timesteps(n, 1000, spacing, 1, "ddim")
    final_alpha = ac[0]
    # The same schedule in both coordinate systems: sigma_t = sqrt((1 - ab_t) / ab_t) in float64
    # (get_sigmas_ddpm rounds to float32 like diffusers, which would hide formula errors below 1e-7).
    alphas = torch.cat([ac[torch.from_numpy(t)], final_alpha[None]])
    sigmas = ((1 - alphas) / alphas) ** 0.5

    def eps_vp(x_vp, t_):  # the Gaussian workload's exact eps, as a VP network would predict it
        a = ac[t_]
        sigma = ((1 - a) / a) ** 0.5
        x_ve = x_vp / a**0.5
        s = torch.full((x_vp.shape[0],), float(sigma), dtype=x_vp.dtype)
        return (x_ve - g.denoiser(x_ve, s)) / sigma

    x_ve = g.noise(3, float(sigmas[0]), seed=2)
    noises = [torch.randn(x_ve.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(k)) for k in range(n)]
    it = iter(noises)
    got, _ = sample_ddim(g.denoiser, x_ve, sigmas, disable=True, eta=eta, noise_sampler=lambda s, sn: next(it))
    a0 = ac[t[0]]
    want_vp = _ddim_vp_reference(eps_vp, x_ve * a0**0.5, ac, t, final_alpha, eta, noises)
    want = want_vp / final_alpha**0.5  # VE latent at the final sigma
    err = rel_err(got, want)
    print(f"\nDDIM(eta={eta}) vs VP DDIM [{spacing}]: relative error {err:.2e}")
    assert err <= 1e-10


def test_euler_matches_the_exact_gaussian_ode_solution():
    g = gaussian()
    sigmas = get_sigmas_karras(400, 0.05, 10.0)
    x = g.noise(2, 10.0)
    got, _ = sample_euler(g.denoiser, x, sigmas[:-1], disable=True)  # stop at sigma_min
    want = g.ode_solution(x, 10.0, float(sigmas[-2]))
    assert rel_err(got, want) < 1e-2  # first-order solver: agrees to discretisation error
