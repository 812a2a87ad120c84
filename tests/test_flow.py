"""Flow-matching models: the library's flow samplers, the k-diffusion wrapper in the flow convention,
and the diffusers hook and adapter on SD3, Flux (with and without true CFG), Wan 2.1 and Wan 2.2.

Equivalence figures (printed, float32, tiny random models): the library's flow Euler and flow
DPM-Solver++(2M) against diffusers' FlowMatchEulerDiscreteScheduler / DPMSolverMultistepScheduler
loops within 1e-6 relative; the hook never skipping is bit-identical to the unhooked pipeline;
the hooked pipeline equals the library sampler driving the pipeline's transformer through the
adapter within 1e-5 relative (batched vs sequential CFG calls change the round-off).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import adaptive_sampling.integrations.diffusers as asd
from hypothesis import given, settings
from hypothesis import strategies as st

from adaptive_sampling import (
    calibrate,
    Extrapolate,
    FixedMask,
    ThirdOrder,
    default_policy,
    denoiser_from_flow,
    denoiser_from_flow_eps,
    get_sigmas_flow,
    get_sigmas_karras,
    sample_euler,
    sample_flow_dpmpp_2m,
    sample_flow_euler,
)

from .helpers import assert_merge_mode_is_the_sub_grid_run
from .tiny_pipelines import flux_pipeline, sd3_pipeline, wan_pipeline

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

N = 8
MASKS = np.array([
    [1, 1, 1, 1, 0, 1, 0, 1],
    [1, 1, 1, 0, 0, 1, 1, 0],
    [1, 1, 1, 1, 1, 1, 1, 1],
], dtype=bool)  # fmt: skip


# ---------------------------------------------------------------- library samplers vs diffusers


class Velocity:
    """A smooth velocity network v(x, s) on [B, 32], float32."""

    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.w1 = torch.randn(33, 64, generator=g) / 6
        self.w2 = torch.randn(64, 32, generator=g) / 8

    def __call__(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return torch.tanh(torch.cat([x, s[:, None].to(x.dtype)], 1) @ self.w1) @ self.w2 + 0.9 * x


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("config, spacing, kw", [
    (dict(shift=3.0), "scheduler", dict(shift=3.0)),  # SD3: the scheduler's own grid, static shift
    (dict(use_dynamic_shifting=True), "pipeline", dict(mu=0.8)),  # Flux: sigmas passed, dynamic shift
    (dict(shift=5.0), "pipeline", dict(shift=5.0)),  # Wan with FlowMatchEuler
    (dict(use_dynamic_shifting=True, shift_terminal=0.1), "pipeline", dict(mu=1.2, shift_terminal=0.1)),  # LTX
])  # fmt: skip
def test_flow_euler_equals_flow_match_euler(config, spacing, kw):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(**config)
    if spacing == "scheduler":
        sched.set_timesteps(20)
    else:
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 20, 20), mu=kw.get("mu"))
    sigmas = get_sigmas_flow(20, spacing=spacing, **kw)
    assert torch.equal(sigmas.float(), sched.sigmas)  # the grid, to the bit
    v, noise = Velocity(), torch.randn(3, 32, generator=torch.Generator().manual_seed(1))
    x = noise.clone()
    for t in sched.timesteps:
        x = sched.step(v(x, (t / 1000).expand(3)), t, x).prev_sample
    ours, rep = sample_flow_euler(denoiser_from_flow(v), noise.clone(), sigmas.float(), disable=True)
    print(f"\nflow Euler vs FlowMatchEulerDiscreteScheduler ({spacing}, {kw}): {_rel(ours, x):.1e}")
    assert _rel(ours, x) < 1e-6 and rep.nfe.tolist() == [20] * 3


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_dpmpp_2m_equals_dpm_solver_with_flow_sigmas(shift):
    from diffusers import DPMSolverMultistepScheduler

    sched = DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=shift, prediction_type="flow_prediction")
    sched.set_timesteps(20)
    sigmas = get_sigmas_flow(20, shift=shift, spacing="dpmsolver")
    assert torch.equal(sigmas.float(), sched.sigmas)
    v, noise = Velocity(2), torch.randn(3, 32, generator=torch.Generator().manual_seed(3))
    x = noise.clone()
    for i, t in enumerate(sched.timesteps):
        x = sched.step(v(x, sched.sigmas[i].expand(3)), t, x).prev_sample
    ours, _ = sample_flow_dpmpp_2m(denoiser_from_flow(v), noise.clone(), sigmas.float(), disable=True)
    print(f"\nflow DPM-Solver++(2M) vs DPMSolverMultistepScheduler(use_flow_sigmas, shift {shift}): {_rel(ours, x):.1e}")
    assert _rel(ours, x) < 1e-6


def test_flow_samplers_start_exactly_at_s_1_and_skip():
    model, noise = denoiser_from_flow(Velocity()), torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    sigmas = get_sigmas_flow(30, shift=3.0)
    assert float(sigmas[0]) == 1.0
    for sample in (sample_flow_euler, sample_flow_dpmpp_2m):
        full, _ = sample(model, noise, sigmas, disable=True)
        for policy in (default_policy(), FixedMask(np.arange(30) % 2 == 0, reuse=Extrapolate(1)), FixedMask(np.arange(30) % 3 == 0)):
            out, rep = sample(model, noise, sigmas, disable=True, skip=policy)
            assert torch.isfinite(out).all() and rep.nfe.max() < 30
            assert _rel(out, full) < 0.2  # close to the full run, not garbage


@given(steps=st.integers(5, 20), seed=st.integers(0, 10_000), batch=st.integers(1, 3), start=st.sampled_from([1.0, 0.95]))
@settings(max_examples=25, deadline=None)
def test_merged_flow_dpmpp_2m_is_flow_dpmpp_2m_on_the_sub_grid(steps, seed, batch, start):
    """A mask with K calls in merge mode is exactly flow DPM-Solver++(2M) on the K-point sub-grid of
    the computed levels plus the final one (per row), from s = 1 (first steps first order) or below."""
    model = denoiser_from_flow(Velocity(seed % 5))
    sigmas = get_sigmas_flow(steps, shift=3.0)
    sigmas = sigmas * start if start < 1 else sigmas
    rng = np.random.default_rng(seed)
    mask = rng.random((batch, steps)) < 0.5
    mask[:, 0] = True
    x = torch.randn(batch, 32, generator=torch.Generator().manual_seed(seed))
    assert_merge_mode_is_the_sub_grid_run(sample_flow_dpmpp_2m, model, x, sigmas, mask)


def test_flow_dpmpp_2m_merge_mode_checks_and_calibrated_grid():
    """Without skipping the merge mode is the plain solver; a bad flag is refused; and
    ``calibrate(..., as_grid=True)`` now works for flow DPM-Solver++: a K-point sub-grid whose run is
    the calibrated mask's merge-mode run."""
    model = denoiser_from_flow(Velocity(1))
    sigmas = get_sigmas_flow(12, shift=3.0)
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(4))
    assert torch.equal(sample_flow_dpmpp_2m(model, x, sigmas, disable=True, merge_skipped=True)[0],
                       sample_flow_dpmpp_2m(model, x, sigmas, disable=True)[0])  # fmt: skip
    with pytest.raises(ValueError, match="merge_skipped must be a bool"):
        sample_flow_dpmpp_2m(model, x, sigmas, disable=True, merge_skipped=1)
    grid = calibrate(model, "flow_dpmpp_2m", sigmas, x, nfe=6, as_grid=True, disable=True)
    assert len(grid) == 7 and float(grid[0]) == float(sigmas[0]) and float(grid[-1]) == 0.0
    assert set(grid.tolist()) <= set(sigmas.tolist())
    policy = calibrate(model, "flow_dpmpp_2m", sigmas, x, nfe=6, merge_skipped=True, disable=True)
    merged, rep = sample_flow_dpmpp_2m(model, x, sigmas, disable=True, skip=policy, merge_skipped=True)
    assert rep.nfe.tolist() == [6, 6, 6]
    assert torch.equal(merged, sample_flow_dpmpp_2m(model, x, grid, disable=True)[0])


def test_eps_semantics_are_exact_on_a_model_with_linear_eps():
    """A flow model whose eps is linear in log sigma_ve (the forecast's variable), whatever x: the
    velocity v = (eps - x) / (1 - s) is affine in x but not linear in the forecast variable. An
    Extrapolate(1) forecast of eps reproduces the no-skip output to round-off; copying eps does not."""
    e0, e1 = torch.randn(1, 16, dtype=torch.float64), torch.randn(1, 16, dtype=torch.float64)

    def velocity(x, s):
        lam = (s / (1 - s)).log()[:, None]  # log sigma_ve
        return (e0 + e1 * lam - x) / (1 - s)[:, None]

    model = denoiser_from_flow(velocity)
    sigmas = get_sigmas_flow(16, shift=3.0, spacing="dpmsolver", dtype=torch.float64)  # starts below 1: eps finite
    x = torch.randn(2, 16, dtype=torch.float64)
    mask = np.array([1, 1, 1, 0, 1, 0, 1, 0, 0, 1, 0, 1, 0, 1, 0, 0], bool)
    for sample in (sample_flow_euler, sample_flow_dpmpp_2m):
        full, _ = sample(model, x, sigmas, disable=True)
        forecast, _ = sample(model, x, sigmas, disable=True, skip=FixedMask(mask, reuse=Extrapolate(1)))
        copied, _ = sample(model, x, sigmas, disable=True, skip=FixedMask(mask))
        assert _rel(forecast, full) < 1e-12, sample.__name__
        assert _rel(copied, full) > 1e-4, sample.__name__


# ---------------------------------------------------------------- the k-diffusion wrapper (CONST)


def test_k_diffusion_wrapper_on_a_const_model(kdiff):
    from adaptive_sampling.integrations.k_diffusion import adaptive

    model, noise = denoiser_from_flow(Velocity()), torch.randn(3, 32, generator=torch.Generator().manual_seed(4))
    sigmas = get_sigmas_flow(20, shift=3.0).float()
    mask = FixedMask(np.arange(20) % 2 == 0)
    # k-diffusion's Euler on the flow latent is flow Euler (to_d is the velocity): the same bits
    got, rep = adaptive(kdiff.sample_euler, mask, convention="flow").with_report(model, noise, sigmas, disable=True)
    want, _ = sample_flow_euler(model, noise, sigmas, disable=True, skip=mask)
    assert torch.equal(got, want) and rep.nfe.tolist() == [10] * 3
    # the paper's rule measures the flow latent (the latent a flow scheduler holds)
    _, rep = adaptive(kdiff.sample_euler, ThirdOrder(), convention="flow").with_report(model, noise, sigmas, disable=True)
    assert rep.space == "flow"
    _, rep = sample_flow_euler(model, noise, sigmas, disable=True, skip=ThirdOrder())
    assert rep.space == "flow"
    with pytest.raises(ValueError, match="above 1: a flow-matching grid"):
        adaptive(kdiff.sample_euler, convention="flow")(model, noise, get_sigmas_karras(10, 0.1, 10.0).float(), disable=True)
    with pytest.warns(UserWarning, match="shape of a flow-matching grid"):
        adaptive(kdiff.sample_euler)(model, noise, sigmas, disable=True)
    with pytest.raises(ValueError, match="convention must be"):
        adaptive(kdiff.sample_euler, convention="const")


def test_flow_grids_and_models_refuse_bad_input():
    model = denoiser_from_flow(Velocity())
    with pytest.raises(ValueError, match="above 1"):
        sample_flow_euler(model, torch.randn(2, 32), get_sigmas_karras(10, 0.1, 10.0), disable=True)
    with pytest.warns(UserWarning, match="flow-matching grid"):
        sample_euler(model, torch.randn(2, 32), get_sigmas_flow(10), disable=True)
    with pytest.raises(ValueError, match="at s = 1 an eps prediction gives no x0"):
        sample_flow_euler(denoiser_from_flow_eps(lambda x, s: x), torch.randn(2, 32), get_sigmas_flow(10), disable=True)
    with pytest.raises(ValueError, match="spacing must be"):
        get_sigmas_flow(10, spacing="karras")


# ---------------------------------------------------------------- the diffusers hook on flow pipelines


def _embeds(batch: int, tokens: int = 3, dim: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, tokens, dim, generator=g) for _ in range(2)], [torch.randn(batch, dim, generator=g) for _ in range(2)]


class Case:
    """One pipeline and how to call it: latent shape, conditioning, CFG model rows per computed step."""

    def __init__(self, name):
        self.name = name
        if name.startswith("sd3"):
            self.pipe, self.shape, self.rows_per_step = sd3_pipeline(scheduler="euler" if name == "sd3" else "dpmpp_2m"), (4, 8, 8), 2
        elif name.startswith("flux"):
            self.pipe, self.shape = flux_pipeline(), (16, 16)
            self.rows_per_step = 2 if name == "flux-true-cfg" else 1
        else:
            scheduler = "euler" if name.endswith("-euler") else "unipc"
            self.pipe, self.shape, self.rows_per_step = wan_pipeline(two=name.startswith("wan2.2"), scheduler=scheduler), (4, 2, 4, 4), 2

    @property
    def branches(self) -> int:
        """Transformer calls per step: 2 with sequential CFG (Flux true CFG, Wan), else 1."""
        return 2 if self.name == "flux-true-cfg" or self.name.startswith("wan") else 1

    def latents(self, batch: int, seed: int = 0) -> torch.Tensor:
        return torch.randn(batch, *self.shape, generator=torch.Generator().manual_seed(seed))

    def kwargs(self, prompts: list[int]) -> dict:
        (pe, npe), (pp, npp) = _embeds(8)
        rows = torch.tensor(prompts)
        if self.name.startswith("sd3"):
            return dict(prompt_embeds=pe[rows], negative_prompt_embeds=npe[rows], pooled_prompt_embeds=pp[rows],
                        negative_pooled_prompt_embeds=npp[rows], guidance_scale=4.0, height=64, width=64)  # fmt: skip
        if self.name == "flux":
            return dict(prompt_embeds=pe[rows], pooled_prompt_embeds=pp[rows], height=64, width=64)
        if self.name == "flux-true-cfg":
            return dict(prompt_embeds=pe[rows], pooled_prompt_embeds=pp[rows], negative_prompt_embeds=npe[rows],
                        negative_pooled_prompt_embeds=npp[rows], true_cfg_scale=3.0, height=64, width=64)  # fmt: skip
        extra = dict(guidance_scale_2=2.0) if self.name.startswith("wan2.2") else {}
        return dict(prompt_embeds=pe[rows], negative_prompt_embeds=npe[rows], guidance_scale=4.0, height=32, width=32,
                    num_frames=5, **extra)  # fmt: skip

    def __call__(self, prompts: list[int], latents: torch.Tensor, steps: int = N) -> torch.Tensor:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = self.pipe(**self.kwargs(prompts), latents=latents.clone(), num_inference_steps=steps, output_type="latent")
        return out.frames if hasattr(out, "frames") else out.images

    def modules(self):
        return asd.adapter.pipeline_models(self.pipe)


CASES = ["sd3", "sd3-dpmpp", "flux", "flux-true-cfg", "wan2.1", "wan2.2"]


@pytest.fixture(scope="module", params=CASES)
def case(request):
    return Case(request.param)


def _count_rows(case):
    """Rows each transformer forward really evaluated (a hook on the final projection)."""
    rows = []
    handles = [m.proj_out.register_forward_hook(lambda mod, inp, out: rows.append(inp[0].shape[0])) for m in case.modules()]
    return rows, handles


def test_hook_never_skipping_is_bit_identical(case):
    lat = case.latents(2)
    want = case([0, 1], lat)
    with asd.apply(case.pipe, skip=FixedMask(np.ones(N, bool))) as handle:
        got = case([0, 1], lat)
    assert torch.equal(got, want)
    assert handle.report.nfe.tolist() == [N, N]
    assert handle.report.sampler in ("flow_euler", "flow_dpmpp_2m", "UniPCMultistepScheduler")
    assert torch.equal(case([0, 1], lat), want)  # removed: the pipeline as before


def test_fixed_mask_runs_exactly_k_forwards_per_prompt(case):
    lat = case.latents(3, seed=1)
    rows, hooks = _count_rows(case)
    try:
        with asd.apply(case.pipe, skip=FixedMask(MASKS)) as handle:
            case([0, 1, 2], lat)
    finally:
        for h in hooks:
            h.remove()
    ks = MASKS.sum(1)
    assert handle.report.nfe.tolist() == ks.tolist()
    assert (handle.report.computed == MASKS).all()
    assert sum(rows) == int(ks.sum()) * case.rows_per_step, (rows, ks)  # every CFG branch of every computed step
    assert handle.report.model_calls == len(rows) == case.branches * int(MASKS.any(0).sum())


def test_three_prompts_on_three_masks_equal_their_batch_one_runs(case):
    lat = case.latents(3, seed=2)
    with asd.apply(case.pipe, skip=FixedMask(MASKS)):
        together = case([0, 1, 2], lat)
    for b in range(3):
        with asd.apply(case.pipe, skip=FixedMask(MASKS[b])):
            alone = case([b], lat[b : b + 1])
        torch.testing.assert_close(together[b : b + 1], alone, rtol=1e-4, atol=1e-5)


def test_default_policy_runs_per_prompt(case):
    lat = case.latents(2, seed=3)
    with asd.apply(case.pipe) as handle:  # default_policy(): 2x, exactly 6 of 12 calls per prompt
        out = case([0, 1], lat, steps=12)
    assert torch.isfinite(out).all() and handle.report.nfe.tolist() == [6, 6]
    assert handle.report.computed[:, 0].all() and handle.report.model_calls == 6 * case.branches


ADAPTED = {
    "sd3": sample_flow_euler,
    "sd3-dpmpp": sample_flow_dpmpp_2m,
    "flux-true-cfg": sample_flow_euler,
    "wan2.1-euler": sample_flow_euler,  # (Wan's UniPC has no library loop)
    "wan2.2-euler": sample_flow_euler,  # two transformers: the adapter switches at the pipeline's boundary
}


@pytest.mark.parametrize("name", list(ADAPTED))
def test_hooked_pipeline_equals_the_library_sampler_with_the_adapter(name):
    case = Case(name)
    lat = case.latents(2, seed=4)
    mask = FixedMask(MASKS[:2])
    if name.startswith("wan2.2"):
        # the hook reuses each CFG branch and combines them with the scale of the current step; the
        # adapter reuses the guided prediction. They agree unless a skip straddles the switch to
        # transformer_2 and its guidance_scale_2 (here at step 3: computed)
        mask = FixedMask(np.array([[1, 1, 1, 1, 1, 0, 1, 0], [1, 1, 0, 1, 1, 1, 0, 1]], bool))
    with asd.apply(case.pipe, skip=mask) as handle:
        hooked = case([0, 1], lat)
    kw = case.kwargs([0, 1])
    guidance = kw.pop("guidance_scale", None) or kw.pop("true_cfg_scale")
    guidance_2 = kw.pop("guidance_scale_2", None)
    extra = {k: v for k, v in kw.items() if "embeds" in k}
    shared = {}
    if name.startswith("flux"):  # shared by every row: bound into the denoiser, never sliced
        from diffusers import FluxPipeline

        shared = dict(img_ids=FluxPipeline._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32), txt_ids=torch.zeros(3, 3))
    model = asd.denoiser(case.pipe, guidance_scale=guidance, model_kwargs=shared, guidance_scale_2=guidance_2)
    sampler = ADAPTED[name]
    ours, rep = sampler(model, lat.clone() * asd.start_scale(case.pipe.scheduler), asd.scheduler_sigmas(case.pipe.scheduler),
                        extra, disable=True, skip=mask)  # fmt: skip
    rel = _rel(ours, hooked)
    print(f"\nhooked {name} pipeline vs {sampler.__name__} with the adapter: {rel:.1e}")
    assert rel < 1e-5 and (rep.computed == handle.report.computed).all()


def test_unknown_flow_layouts_are_refused_and_leave_the_pipeline_as_before():
    from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler

    case = Case("sd3")
    lat = case.latents(1)
    want = case([0], lat)
    old = case.pipe.scheduler
    try:
        case.pipe.scheduler = FlowMatchHeunDiscreteScheduler(shift=3.0)
        with pytest.raises(ValueError, match="FlowMatchHeunDiscreteScheduler, a flow-matching scheduler: not supported"):
            asd.apply(case.pipe)
        case.pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, invert_sigmas=True)
        with pytest.raises(ValueError, match="invert_sigmas"):
            asd.apply(case.pipe)
    finally:
        case.pipe.scheduler = old
    assert "progress_bar" not in vars(case.pipe) and torch.equal(case([0], lat), want)
    with pytest.raises(ValueError, match="does not fit scheduler"):
        asd.denoiser(case.pipe, prediction_type="epsilon")
