"""The diffusers integration on tiny random pipelines built offline (tests/tiny_pipelines.py).

Figures (max|a - b| / max|b| of the final latents, float32, CPU; bench/diffusers_equivalence.py
measures them over 3 seeds, bench/results/diffusers_equivalence.md has the table):
* the hook with a never-skipping policy: bit-identical to the unhooked pipeline;
* denoiser() + sample_euler with skip=None: bit-identical to the Euler pipeline; sample_ddim and
  sample_dpmpp_2m: up to 1.2e-6 and 9.1e-7;
* hook with FixedMask vs denoiser() + the library sampler with the same mask: up to 9.8e-7;
  Heun / KDPM2 hook vs adaptive(k_diffusion.sample_heun / sample_dpm_2): up to 8.3e-7;
* per prompt: each of 3 prompts on its own mask equals its batch-1 run to 1.6e-6;
* prediction_type="sample": 7.6e-6 (the library is 6.5e-6 off the pipeline without skipping).
The tests assert 3e-6 (2e-5 for "sample").
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        FlowMatchHeunDiscreteScheduler,
        HeunDiscreteScheduler,
        KDPM2DiscreteScheduler,
        LMSDiscreteScheduler,
        PNDMScheduler,
        UniPCMultistepScheduler,
    )

import adaptive_sampling.integrations.diffusers as asd
from adaptive_sampling import Extrapolate, FixedMask, ThirdOrder, sample_ddim, sample_dpmpp_2m, sample_euler

from .tiny_pipelines import SD_SCHEDULER, pixart_pipeline, sd_pipeline, sdxl_pipeline

SCHEDULERS = {
    # Stable Diffusion's configurations of the three schedulers of the paper
    "ddim": (DDIMScheduler, dict(clip_sample=False, set_alpha_to_one=False, steps_offset=1), sample_ddim),
    "euler": (EulerDiscreteScheduler, dict(steps_offset=1), sample_euler),
    "dpmpp_2m": (DPMSolverMultistepScheduler, dict(algorithm_type="dpmsolver++", solver_order=2), sample_dpmpp_2m),
}
PROMPTS = ["a cat", "a red dog", "two birds"]
N = 8
TOL = 3e-6  # float32 round-off of a whole run (measured up to 1.5e-6)
MASK = [1, 1, 1, 1, 0, 1, 0, 1]  # K = 6 of 8


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(1)
    return sd_pipeline()


def use(pipe, name: str, **overrides):
    cls, kwargs, _ = SCHEDULERS[name]
    pipe.scheduler = cls(**{**SD_SCHEDULER, **kwargs, **overrides})
    return pipe


def noise(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def run(pipe, prompts, latents, guidance=7.5, steps=N, **kw) -> torch.Tensor:
    return pipe(
        prompts, num_inference_steps=steps, height=8, width=8, output_type="latent", latents=latents,
        guidance_scale=guidance, **kw,
    ).images


class Counter:
    """Counts the model forwards and the rows of each, inside the UNet (a pre-hook on conv_in)."""

    def __init__(self, module: torch.nn.Module):
        self.rows: list[int] = []
        self.handle = module.register_forward_pre_hook(lambda m, args: self.rows.append(args[0].shape[0]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def library_run(pipe, name, prompts, latents, guidance, skip=None):
    """denoiser() + the library's sampler on the pipeline's UNet, scheduler and prompt embeddings."""
    sampler = SCHEDULERS[name][2]
    cfg = guidance > 1
    cond, uncond = pipe.encode_prompt(prompts, "cpu", 1, cfg)
    pipe.scheduler.set_timesteps(N)
    model = asd.denoiser(pipe, guidance_scale=guidance)
    extra = {"prompt_embeds": cond, **({"negative_prompt_embeds": uncond} if cfg else {})}
    x = latents * asd.start_scale(pipe.scheduler)
    x, report = sampler(model, x, asd.scheduler_sigmas(pipe.scheduler), extra_args=extra, skip=skip, disable=True)
    return x * asd.end_scale(pipe.scheduler), report


# ------------------------------------------------------------------ never skipping: bit-identical


@pytest.mark.parametrize("name", list(SCHEDULERS))
@pytest.mark.parametrize("guidance", [1.0, 7.5])
@pytest.mark.parametrize("per_prompt", [1, 2])
def test_never_skipping_is_bit_identical(pipe, name, guidance, per_prompt):
    use(pipe, name)
    prompts = PROMPTS[:2]
    lat = noise(2 * per_prompt)
    ref = run(pipe, prompts, lat, guidance, num_images_per_prompt=per_prompt)
    with asd.apply(pipe, skip=FixedMask(np.ones(N, bool))) as handle, Counter(pipe.unet.conv_in) as count:
        out = run(pipe, prompts, lat, guidance, num_images_per_prompt=per_prompt)
    assert torch.equal(out, ref)
    assert handle.report.computed.shape == (2 * per_prompt, N)
    assert handle.report.nfe.tolist() == [N] * (2 * per_prompt)
    assert count.rows == [(2 if guidance > 1 else 1) * 2 * per_prompt] * N


# ------------------------------------------------------------------ the denoiser adapter


@pytest.mark.parametrize(
    "name, spacing",
    [("ddim", "leading"), ("ddim", "trailing")]
    + [(n, s) for n in ("euler", "dpmpp_2m") for s in ("leading", "trailing", "linspace")],
)
def test_denoiser_and_library_sampler_reproduce_the_pipeline(pipe, name, spacing):
    use(pipe, name, timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    prompts, lat = PROMPTS[:2], noise(2)
    ref = run(pipe, prompts, lat, 7.5)
    ours, report = library_run(pipe, name, prompts, lat, 7.5)
    assert report.nfe.tolist() == [N, N]
    if name == "euler":
        assert torch.equal(ours, ref)  # the same float32 operations
    else:
        assert rel(ours, ref) < TOL


def test_ddim_linspace_grid_and_zero_length_last_step_are_refused(pipe):
    use(pipe, "ddim", timestep_spacing="linspace", steps_offset=0)  # last timestep 0 -> alphabar_0 to itself
    pipe.scheduler.set_timesteps(N)
    with pytest.raises(ValueError, match="zero-length step"):
        asd.scheduler_sigmas(pipe.scheduler)


def test_denoiser_timesteps_of_grid_and_off_grid_sigmas(pipe):
    use(pipe, "euler")
    pipe.scheduler.set_timesteps(N)
    model = asd.denoiser(pipe)
    sig = asd.scheduler_sigmas(pipe.scheduler)[:-1].float()
    assert torch.equal(model.timesteps(sig), pipe.scheduler.timesteps.float())
    # off the grid: k-diffusion's continuous sigma_to_t; sigma(t) at integer t maps back to t
    ac = pipe.scheduler.alphas_cumprod.double()
    s = ((1 - ac[[10, 500, 990]]) / ac[[10, 500, 990]]).sqrt().float()
    assert torch.allclose(model.timesteps(s), torch.tensor([10.0, 500.0, 990.0]), atol=1e-2)


# ------------------------------------------------------------------ FixedMask: K forwards, = library


@pytest.mark.parametrize("name", list(SCHEDULERS))
@pytest.mark.parametrize("reuse", ["copy", Extrapolate(1)], ids=["copy", "extrapolate"])
def test_fixed_mask_makes_k_forwards_and_matches_the_library_sampler(pipe, name, reuse):
    use(pipe, name)
    prompts, lat = PROMPTS[:2], noise(2)
    with asd.apply(pipe, skip=FixedMask(MASK, reuse=reuse)) as handle, Counter(pipe.unet.conv_in) as count:
        out = run(pipe, prompts, lat, 7.5)
    K = sum(MASK)
    assert len(count.rows) == K and count.rows == [4] * K
    assert handle.report.model_calls == K and handle.report.nfe.tolist() == [K, K]
    assert handle.report.computed.tolist() == [[bool(m) for m in MASK]] * 2
    ours, report = library_run(pipe, name, prompts, lat, 7.5, skip=FixedMask(MASK, reuse=reuse))
    assert report.nfe.tolist() == [K, K]
    assert rel(out, ours) < TOL
    assert rel(out, run(pipe, prompts, lat, 7.5)) > 1e-3  # skipping changed something


def test_third_order_runs_and_reports_per_sample(pipe):
    use(pipe, "dpmpp_2m")
    with asd.apply(pipe, skip=ThirdOrder(delta=0.5, max_skips=2)) as handle, Counter(pipe.unet.conv_in) as count:
        run(pipe, PROMPTS[:2], noise(2), 7.5)
    r = handle.report
    assert r.sampler == "dpmpp_2m" and r.space == "vp"
    assert r.computed[:, :4].all() and r.nfe.min() < N
    assert sum(count.rows) == 2 * int(r.computed.sum())  # both CFG rows of each computing prompt
    assert np.isfinite(r.stats[:, -1, 0]).all()  # the final latent was observed


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_third_order_through_the_hook_decides_as_the_library_sampler(pipe, name):
    """The hook's rule sees the same latents (recovered from the UNet input and the scheduler's
    sigma) as the library sampler on denoiser(): same masks, same latents to round-off. (The
    scores here are at least 12% away from delta, so round-off cannot flip a decision.)"""
    use(pipe, name)
    lat, policy = noise(3), ThirdOrder(delta=0.2, max_skips=2)
    with asd.apply(pipe, skip=policy) as handle:
        out = run(pipe, PROMPTS, lat, 7.5)
    ours, report = library_run(pipe, name, PROMPTS, lat, 7.5, skip=policy)
    assert handle.report.computed.tolist() == report.computed.tolist()
    assert handle.report.nfe.max() < N
    assert rel(out, ours) < TOL


def test_space_default_is_the_latent_the_scheduler_holds(pipe):
    for name, space in (("ddim", "vp"), ("euler", "ve"), ("dpmpp_2m", "vp")):
        use(pipe, name)
        with asd.apply(pipe, skip=ThirdOrder()) as handle:
            run(pipe, PROMPTS[:1], noise(1), 1.0)
        assert handle.report.space == space
    pipe.scheduler = UniPCMultistepScheduler(**SD_SCHEDULER)  # not a library sampler name, holds VP
    with asd.apply(pipe, skip=ThirdOrder()) as handle:
        run(pipe, PROMPTS[:1], noise(1), 1.0)
    assert handle.report.space == "vp"


# ------------------------------------------------------------------ per prompt


@pytest.mark.parametrize("name", ["euler", "dpmpp_2m"])
def test_each_prompt_follows_its_own_mask_and_equals_its_batch_one_run(pipe, name):
    use(pipe, name)
    masks = np.array([[1, 1, 1, 1, 0, 1, 0, 1], [1, 1, 1, 1, 1, 0, 0, 1], [1, 1, 1, 1, 0, 0, 1, 0]], bool)
    lat = noise(3)
    with asd.apply(pipe, skip=FixedMask(masks)) as handle, Counter(pipe.unet.conv_in) as count:
        out = run(pipe, PROMPTS, lat, 7.5)
    assert handle.report.computed.tolist() == masks.tolist()
    # the UNet saw only the rows that compute (both CFG rows of each), no call where none does
    assert count.rows == [2 * int(k) for k in masks.sum(0) if k]
    for b in range(3):
        with asd.apply(pipe, skip=FixedMask(masks[b])):
            alone = run(pipe, PROMPTS[b : b + 1], lat[b : b + 1], 7.5)
        assert rel(out[b : b + 1], alone) < TOL


def test_num_images_per_prompt_rows_are_their_own_samples(pipe):
    use(pipe, "ddim")
    masks = np.array([[1, 1, 1, 1, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0, 1]], bool)
    with asd.apply(pipe, skip=FixedMask(masks)) as handle, Counter(pipe.unet.conv_in) as count:
        run(pipe, PROMPTS[:1], noise(2), 7.5, num_images_per_prompt=2)
    assert handle.report.computed.tolist() == masks.tolist()
    assert count.rows == [2 * int(k) for k in masks.sum(0)]


def test_sdxl_added_cond_kwargs_are_sliced_per_prompt():
    """SDXL's UNet takes added_cond_kwargs (text_embeds, time_ids) with the model batch leading."""
    pipe = sdxl_pipeline()
    masks = np.array([[1, 1, 1, 1, 0, 1, 0, 1], [1, 1, 1, 1, 1, 0, 0, 1], [1, 1, 1, 1, 0, 0, 1, 0]], bool)
    lat = noise(3)
    kw = dict(num_inference_steps=N, height=8, width=8, output_type="latent", guidance_scale=5.0)
    with asd.apply(pipe, skip=FixedMask(masks)) as handle, Counter(pipe.unet.conv_in) as count:
        out = pipe(PROMPTS, latents=lat, **kw).images
        assert count.rows == [2 * int(k) for k in masks.sum(0) if k]
        for b in range(3):
            handle.policy = FixedMask(masks[b])
            alone = pipe(PROMPTS[b : b + 1], latents=lat[b : b + 1], **kw).images
            assert rel(out[b : b + 1], alone) < TOL


def test_img2img_runs_the_steps_after_strength(pipe):
    """img2img starts inside the scheduler's grid: the hook's steps are the ones the loop runs."""
    from diffusers import StableDiffusionImg2ImgPipeline

    use(pipe, "ddim")
    i2i = StableDiffusionImg2ImgPipeline(**pipe.components)
    i2i.set_progress_bar_config(disable=True)
    image = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))

    def call():
        return i2i(PROMPTS[:2], image=image, strength=0.6, num_inference_steps=10, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).images

    ref = call()
    with asd.apply(i2i, skip=FixedMask(np.ones(6, bool))) as handle:
        assert torch.equal(call(), ref) and handle.report.num_steps == 6
        handle.policy = FixedMask([1, 1, 1, 1, 0, 1])
        with Counter(pipe.unet.conv_in) as count:
            call()
        assert len(count.rows) == 5


# ------------------------------------------------------------------ prediction types


class CopyOutput:
    """What reusing the raw model output would do: a forward hook that returns the last computed
    output at the mask's skipped calls (the model still runs; only its output is replaced)."""

    def __init__(self, module, mask):
        self.mask, self.k, self.cache = list(mask), -1, None
        self.handle = module.register_forward_hook(self)

    def __call__(self, module, args, output):
        self.k += 1
        if self.mask[self.k]:
            self.cache = output
            return None
        return self.cache


@pytest.mark.parametrize(
    "prediction, name",
    [("v_prediction", "ddim"), ("v_prediction", "euler"), ("v_prediction", "dpmpp_2m"), ("epsilon", "dpmpp_2m"),
     ("sample", "dpmpp_2m")],
)
def test_reuse_is_of_eps_for_every_prediction_type(pipe, prediction, name):
    use(pipe, name, prediction_type=prediction)
    prompts, lat = PROMPTS[:2], noise(2)
    with asd.apply(pipe, skip=FixedMask(MASK)):
        hooked = run(pipe, prompts, lat, 7.5)
    eps_reuse, _ = library_run(pipe, name, prompts, lat, 7.5, skip=FixedMask(MASK))
    copy = CopyOutput(pipe.unet, MASK)
    try:
        copied = run(pipe, prompts, lat, 7.5)
    finally:
        copy.handle.remove()
    # x0 outputs amplify round-off at small sigma: the pipeline and the library differ by 6.5e-6
    # for prediction_type="sample" even without skipping
    assert rel(hooked, eps_reuse) < (2e-5 if prediction == "sample" else TOL)
    if prediction == "epsilon":
        assert rel(hooked, copied) < TOL  # for eps models, copying the output is eps reuse
    else:
        # a copied v (or x0, in a multistep solver) is not a copied eps: measured 0.05 .. 0.14
        assert rel(hooked, copied) > 1e-2


# ------------------------------------------------------------------ other schedulers


@pytest.mark.parametrize("cls, extra", [
    (UniPCMultistepScheduler, {}),
    (LMSDiscreteScheduler, {}),
    (PNDMScheduler, dict(skip_prk_steps=True, steps_offset=1)),
])
def test_other_schedulers_through_the_hook(pipe, cls, extra):
    pipe.scheduler = cls(**SD_SCHEDULER, **extra)
    prompts, lat = PROMPTS[:2], noise(2)
    ref = run(pipe, prompts, lat, 7.5)
    with asd.apply(pipe, skip=FixedMask(np.ones(N, bool))) as handle:
        assert torch.equal(run(pipe, prompts, lat, 7.5), ref)
        handle.policy = FixedMask(MASK)
        with Counter(pipe.unet.conv_in) as count:
            out = run(pipe, prompts, lat, 7.5)
    second = handle.report.extra_evaluations  # PNDM's first PLMS step has a corrector call
    assert second == (1 if cls is PNDMScheduler else 0)
    assert len(count.rows) == sum(MASK) + second
    assert torch.isfinite(out).all() and rel(out, ref) > 1e-4


@pytest.mark.parametrize("cls, name", [(HeunDiscreteScheduler, "sample_heun"), (KDPM2DiscreteScheduler, "sample_dpm_2")])
def test_two_call_schedulers_skip_only_first_calls_like_the_k_diffusion_wrapper(pipe, kdiff, cls, name):
    from adaptive_sampling.integrations.k_diffusion import adaptive

    pipe.scheduler = cls(**SD_SCHEDULER)
    steps, mask = 6, [1, 1, 1, 1, 0, 1]
    prompts, lat = PROMPTS[:2], noise(2)
    with asd.apply(pipe, skip=FixedMask(mask)) as handle, Counter(pipe.unet.conv_in) as count:
        out = run(pipe, prompts, lat, 7.5, steps=steps)
    assert len(count.rows) == sum(mask) + steps - 1  # every step but the last has its corrector call
    assert handle.report.extra_evaluations == steps - 1
    cond, uncond = pipe.encode_prompt(prompts, "cpu", 1, True)
    pipe.scheduler.set_timesteps(steps)
    model = asd.denoiser(pipe, guidance_scale=7.5)
    x = lat * asd.start_scale(pipe.scheduler)
    x = adaptive(getattr(kdiff, name), skip=FixedMask(mask))(
        model, x, asd.scheduler_sigmas(pipe.scheduler),
        extra_args={"prompt_embeds": cond, "negative_prompt_embeds": uncond}, disable=True,
    )
    assert rel(out, x * asd.end_scale(pipe.scheduler)) < TOL


# ------------------------------------------------------------------ a transformer pipeline


def test_transformer_pipeline_pixart():
    pp = pixart_pipeline()
    g = torch.Generator().manual_seed(0)
    pe, ne = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    m = torch.ones(2, 5)
    lat = noise(2)
    kw = dict(
        negative_prompt=None, prompt_embeds=pe, negative_prompt_embeds=ne, prompt_attention_mask=m,
        negative_prompt_attention_mask=m, num_inference_steps=N, height=8, width=8, output_type="latent",
        latents=lat, use_resolution_binning=False, guidance_scale=4.5,
    )
    ref = pp(**kw).images
    with asd.apply(pp, skip=FixedMask(np.ones(N, bool))):
        assert torch.equal(pp(**kw).images, ref)
    with asd.apply(pp, skip=FixedMask(MASK)) as handle, Counter(pp.transformer.pos_embed) as count:
        out = pp(**kw).images
    assert len(count.rows) == sum(MASK) and handle.report.nfe.tolist() == [sum(MASK)] * 2
    pp.scheduler.set_timesteps(N)
    extra = dict(
        prompt_embeds=pe, negative_prompt_embeds=ne, encoder_attention_mask=m, negative_encoder_attention_mask=m,
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    )
    x = lat * asd.start_scale(pp.scheduler)
    x, _ = sample_dpmpp_2m(
        asd.denoiser(pp, guidance_scale=4.5), x, asd.scheduler_sigmas(pp.scheduler), extra_args=extra,
        skip=FixedMask(MASK), disable=True,
    )
    assert rel(out, x * asd.end_scale(pp.scheduler)) < TOL  # learned-sigma channels dropped, eps reused


# ------------------------------------------------------------------ state, failures, removal


def test_a_failed_call_leaves_the_hook_reset_and_the_next_call_works(pipe):
    use(pipe, "dpmpp_2m")
    prompts, lat = PROMPTS[:2], noise(2)
    with asd.apply(pipe, skip=FixedMask(MASK)) as handle:
        good = run(pipe, prompts, lat, 7.5)

        def boom(p, i, t, kw):
            if i == 3:
                raise KeyboardInterrupt("stop at step 3")
            return kw

        with pytest.raises(KeyboardInterrupt):
            run(pipe, prompts, lat, 7.5, callback_on_step_end=boom)
        assert not handle.active and handle.report is None
        assert "step" not in vars(pipe.scheduler)  # the scheduler's step is unwrapped
        # a failure inside the model: the third forward raises
        calls = []

        def fail(module, args):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("model failure")

        h = pipe.unet.conv_in.register_forward_pre_hook(fail)
        try:
            with pytest.raises(RuntimeError, match="model failure"):
                run(pipe, prompts, lat, 7.5)
        finally:
            h.remove()
        assert not handle.active and handle.report is None
        again = run(pipe, prompts, lat, 7.5)
        assert torch.equal(again, good) and handle.report.nfe.tolist() == [sum(MASK)] * 2
        # a second call with another batch size and steps: fresh state
        handle.policy = FixedMask([1, 1, 1, 1, 0])
        run(pipe, PROMPTS, noise(3), 1.0, steps=5)
        assert handle.report.computed.shape == (3, 5)


def test_remove_restores_the_forward_and_the_progress_bar(pipe):
    use(pipe, "euler")
    forward = pipe.unet.forward
    prompts, lat = PROMPTS[:2], noise(2)
    ref = run(pipe, prompts, lat, 7.5)
    handle = asd.apply(pipe, skip=FixedMask(MASK))
    assert pipe.unet.forward != forward and "progress_bar" in vars(pipe)
    assert not torch.equal(run(pipe, prompts, lat, 7.5), ref)
    handle.remove()
    handle.remove()  # idempotent
    assert pipe.unet.forward == forward and "progress_bar" not in vars(pipe)
    with Counter(pipe.unet.conv_in) as count:
        assert torch.equal(run(pipe, prompts, lat, 7.5), ref)
    assert len(count.rows) == N
    with asd.apply(pipe, skip=FixedMask(MASK)):
        pass
    assert pipe.unet.forward == forward  # the context manager removes too


def test_a_wrapped_scheduler_step_is_chained_and_put_back(pipe):
    use(pipe, "dpmpp_2m")
    original, seen = pipe.scheduler.step, []

    def step(*args, **kwargs):
        seen.append(1)
        return original(*args, **kwargs)

    pipe.scheduler.step = step  # someone else's instance-level wrapper
    with asd.apply(pipe, skip=FixedMask(MASK)) as handle:
        run(pipe, PROMPTS[:1], noise(1), 7.5)
    assert len(seen) == N and handle.report is not None  # both ran; the final latent was seen
    assert vars(pipe.scheduler)["step"] is step
    del pipe.scheduler.step


def test_model_calls_outside_the_denoising_loop_are_untouched(pipe):
    use(pipe, "ddim")
    pipe.scheduler.set_timesteps(N)
    x, t = noise(2), pipe.scheduler.timesteps[0]
    ehs = torch.randn(2, 77, 8)
    ref = pipe.unet(x, t, encoder_hidden_states=ehs).sample
    with asd.apply(pipe, skip=FixedMask(MASK)) as handle:
        assert torch.equal(pipe.unet(x, t, encoder_hidden_states=ehs).sample, ref)
        assert handle.report is None and not handle.active


def test_reset_stateful_hooks_drops_a_running_loop(pipe):
    from diffusers.hooks import HookRegistry

    use(pipe, "ddim")
    with asd.apply(pipe, skip=FixedMask(MASK)) as handle:

        def reset(p, i, t, kw):
            if i == 2:
                HookRegistry.check_if_exists_or_initialize(pipe.unet).reset_stateful_hooks()
                assert not handle.active
            return kw

        run(pipe, PROMPTS[:1], noise(1), 7.5, callback_on_step_end=reset)  # the rest runs unhooked
        assert handle.report is None
        run(pipe, PROMPTS[:1], noise(1), 7.5)
        assert handle.report.nfe.tolist() == [sum(MASK)]


# ------------------------------------------------------------------ errors and packaging


def test_bad_arguments_are_named(pipe):
    use(pipe, "ddim")
    with pytest.raises(TypeError, match="pipe must be a diffusers pipeline"):
        asd.apply(object())
    with pytest.raises(TypeError, match="pipe must be a diffusers pipeline"):
        asd.apply(pipe.unet)
    with pytest.raises(TypeError, match="skip must be a skip policy"):
        asd.apply(pipe, skip="fast")
    with pytest.raises(TypeError, match="cfg must be"):
        asd.apply(pipe, cfg="yes")
    with asd.apply(pipe, skip=FixedMask(MASK)):
        with pytest.raises(ValueError, match="already carries"):
            asd.apply(pipe)
    with asd.apply(pipe, skip=FixedMask(MASK[:5])):
        with pytest.raises(ValueError, match="mask has 5 steps"):
            run(pipe, PROMPTS[:1], noise(1), 7.5)
    with asd.apply(pipe, skip=FixedMask(MASK), cfg=True):
        with pytest.raises(ValueError, match="cfg=True"):
            run(pipe, PROMPTS[:2], noise(2), 1.0)
    old = pipe.scheduler
    pipe.scheduler = FlowMatchHeunDiscreteScheduler()  # a flow scheduler the hook does not support
    with pytest.raises(ValueError, match="flow-matching"):
        asd.apply(pipe)
    pipe.scheduler = PNDMScheduler(**SD_SCHEDULER)
    with pytest.raises(ValueError, match="PRK"):
        asd.apply(pipe)
    pipe.scheduler = old
    with pytest.raises(ValueError, match="guidance_scale"):
        asd.denoiser(pipe, guidance_scale=-1)
    with pytest.raises(ValueError, match="prediction_type"):
        asd.denoiser(pipe, prediction_type="flow")
    with pytest.raises(TypeError, match="scheduler is required"):
        asd.denoiser(pipe.unet)
    model = asd.denoiser(pipe, guidance_scale=7.5)
    pipe.scheduler.set_timesteps(N)
    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        model(noise(1), torch.ones(1), prompt_embeds=torch.randn(1, 77, 8))
    fresh = DDIMScheduler(**SD_SCHEDULER)
    with pytest.raises(ValueError, match="set_timesteps"):
        asd.scheduler_sigmas(fresh)
