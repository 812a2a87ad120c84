"""The reference criterion, with the compatibility switch on and one decision per batch, reproduces
the masks of a direct transcription of the authors' `estimate_skipping` loop on recorded trajectories."""

import numpy as np
import pytest
import torch

from adaptive_sampling import ThirdOrder, get_sigmas_karras, sample_ddim, sample_dpmpp_2m, sample_euler
from adaptive_sampling.schedules import vp_scale

from .helpers import MLPDenoiser, gaussian

SAMPLERS = {"ddim": sample_ddim, "euler": sample_euler, "dpmpp_2m": sample_dpmpp_2m}


def transcribed_reference_masks(latents, threshold, max_skip_steps):
    """The authors' pipeline loop (sparse_pipeline.py), transcribed: which steps call the model,
    given the latents x_0..x_{N-1} each step produced (in the space the pipeline holds them)."""
    prev_latents, mask, diff_list, called = [], [], [], []

    def estimate_skipping(latent):  # True = compute the next step
        prev_diff, prev_prev_diff = diff_list[-1], diff_list[-2]
        cur_diff = (latent - prev_latents[-1]).abs().mean()
        diff_list.append(cur_diff)
        if len(mask) > 4 and not any(mask[-max_skip_steps:]):
            return True
        if abs((cur_diff + prev_prev_diff) / 2 - prev_diff) <= prev_diff * threshold:
            return False
        return True

    for latent in latents:
        if len(prev_latents) <= 3:
            called.append(True)
            if len(prev_latents) > 1:
                diff_list.append((prev_latents[-1] - prev_latents[-2]).abs().mean())
        else:
            called.append(bool(mask[-1]))
        if len(prev_latents) >= 3:
            mask.append(bool(estimate_skipping(latent)))
        prev_latents.append(latent)
    return np.array(called)


def record(sampler, model, x, sigmas, policy, space):
    """Run the sampler and collect x_0..x_{N-1} in the measured space."""
    seen = []

    def callback(info):
        if info["i"] > 0:
            seen.append((info["x"], float(sigmas[info["i"]])))

    out, report = sampler(model, x, sigmas, callback=callback, disable=True, skip=policy)
    seen.append((out, float(sigmas[-1])))
    scale = (lambda s: vp_scale(torch.tensor(s, dtype=torch.float64))) if space == "vp" else (lambda s: 1.0)
    return [lat * scale(s) for lat, s in seen], report


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("space", ["vp", "ve"])
@pytest.mark.parametrize("delta, max_skips", [(0.01, 4), (0.2, 2), (0.5, 1), (0.5, 0), (1.0, 6), (0.05, 3)])
@pytest.mark.parametrize("model_name", ["gaussian", "mlp"])
def test_masks_equal_transcription(name, space, delta, max_skips, model_name):
    g = gaussian()
    model = g.denoiser if model_name == "gaussian" else MLPDenoiser(dim=72, seed=3)
    sigmas = get_sigmas_karras(30, 0.03, 14.6)
    x = g.noise(3, float(sigmas[0]), seed=5)
    policy = ThirdOrder(delta=delta, max_skips=max_skips, per_sample=False, reference_cap_bug=True, space=space)
    latents, report = record(SAMPLERS[name], model, x, sigmas, policy, space)
    want = transcribed_reference_masks(latents, delta, max_skips)
    assert (report.computed == want[None, :]).all(), (report.computed[0].astype(int), want.astype(int))


def test_the_cap_bug_is_visible_and_off_by_default():
    """On a trajectory where the rule would skip on and on, the reference caps the first run at 5
    whatever max_skips says; the library's default applies max_skips from the first run."""
    g = gaussian()
    sigmas = get_sigmas_karras(30, 0.03, 14.6)
    x = g.noise(2, float(sigmas[0]), seed=5)
    runs = {}
    for bug in (True, False):
        _, rep = sample_euler(g.denoiser, x, sigmas, disable=True,
                              skip=ThirdOrder(delta=1.0, max_skips=2, per_sample=False, reference_cap_bug=bug))
        runs[bug] = _longest_skip_run(rep.computed[0])
    assert runs[True] == 5
    assert runs[False] == 2


def _longest_skip_run(computed):
    best = cur = 0
    for c in computed:
        cur = 0 if c else cur + 1
        best = max(best, cur)
    return best
