"""Bucketing of per-sample sub-batches (adaptive_sampling.bucketing, apply(pad_to=...)).

Measured on the CPU (this file asserts them with margin):
* float64 MLP denoiser with a batch-leading conditioning tensor, per-row masks that give every
  sub-batch size 1..8: bucketed vs plain final latents differ by at most 3.9e-16 relative (Euler,
  DDIM, DPM-Solver++; matmul blocking changes with the batch size); asserted 1e-14.
* tiny random diffusers UNet (float32), denoiser() + DDIM / DPM-Solver++ and the pipeline hook with
  pad_to="pow2", each vs the same run unpadded: 0 (bit-identical) on this CPU; asserted 3e-6, the
  float32 round-off bound of tests/test_diffusers.py (GPU kernels may change with the batch size).
* recompiles of ``torch.compile(model, backend=<counting eager>)`` over a 17-step Euler run whose
  sub-batch sizes go 8, 1, 2, ..., 8, 1, ..., 8: ``dynamic=False`` 8 compiles without bucketing, 4
  with ``bucketed(..., batch=8)`` (the buckets 1, 2, 4, 8); default ``dynamic=None`` 3 and 3 (the
  compiler marks the batch dimension dynamic after the first change; size 1 is specialised);
  ``dynamic=True`` 2 and 2. On the tiny UNet through the pipeline hook (measured, not in this file:
  4 s of tracing per compile here): 8 compiles without ``pad_to``, 4 with ``pad_to="pow2"``.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from adaptive_sampling import FixedMask, ThirdOrder, get_sigmas_karras, sample_ddim, sample_dpmpp_2m, sample_euler
from adaptive_sampling.integrations.bucketing import bucket_size, bucket_sizes, bucketed, pad_index

from .helpers import MLPDenoiser

B, N = 8, 17


def staircase(batch: int = B, steps: int = N) -> np.ndarray:
    """A per-row mask whose computing rows are 0..k-1 with k = 1, 2, ..., batch, 1, 2, ... (call 0: all)."""
    m = np.ones((batch, steps), bool)
    for i in range(1, steps):
        m[:, i] = np.arange(batch) < ((i - 1) % batch) + 1
    return m


class CondMLP(torch.nn.Module):
    """A float64 denoiser with a batch-leading conditioning tensor in extra_args: a row paired with
    another row's conditioning gives a different output."""

    def __init__(self, dim: int = 72):
        super().__init__()
        self.mlp = MLPDenoiser(dim, seed=3)

    def forward(self, x, sigma, cond):
        return self.mlp(x, sigma) + 0.1 * cond.reshape(x.shape)


class Recording:
    """Records the batch size of every call."""

    def __init__(self, model):
        self.model, self.sizes = model, []

    def __call__(self, x, sigma, **kw):
        self.sizes.append(x.shape[0])
        assert sigma.shape[0] == x.shape[0] and all(v.shape[0] == x.shape[0] for v in kw.values())
        return self.model(x, sigma, **kw)


def rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def problem():
    sigmas = get_sigmas_karras(N, 0.03, 14.6).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 2, 6, 6, dtype=torch.float64, generator=g) * sigmas[0]
    cond = torch.randn(B, 72, dtype=torch.float64, generator=g)
    return CondMLP(), x, sigmas, {"cond": cond}


# ------------------------------------------------------------------ the rule


def test_bucket_sizes_and_rule():
    assert bucket_sizes("pow2") is None
    assert bucket_sizes("pow2", batch=8) == (1, 2, 4, 8)
    assert bucket_sizes("pow2", batch=6) == (1, 2, 4, 6)  # a full batch is never padded
    assert bucket_sizes("pow2", batch=1) == (1,)
    assert bucket_sizes([4, 2, 4]) == (2, 4)
    assert bucket_sizes([4, 16], batch=8) == (4, 8)
    assert [bucket_size(n, None) for n in range(1, 10)] == [1, 2, 4, 4, 8, 8, 8, 8, 16]
    assert [bucket_size(n, (2, 4)) for n in (1, 2, 3, 4, 5)] == [2, 2, 4, 4, 5]  # above every bucket: as is
    assert pad_index(3, 5).tolist() == [0, 1, 2, 0, 0]


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: bucket_sizes("pow3"), "sizes"),
        (lambda: bucket_sizes([]), "sizes"),
        (lambda: bucket_sizes([2, 0]), "sizes"),
        (lambda: bucket_sizes([2.0]), "sizes"),
        (lambda: bucket_sizes(3), "sizes"),
        (lambda: bucket_sizes([True]), "sizes"),
        (lambda: bucket_sizes("pow2", batch=0), "batch"),
        (lambda: bucketed(lambda x, s: x, batch=2.5), "batch"),
        (lambda: bucketed(lambda x, s: x, sizes=[-1]), "sizes"),
        (lambda: bucketed(None), "model"),
    ],
)
def test_bad_arguments_raise_value_errors_naming_them(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_wrong_model_output_is_an_error(problem):
    _, x, sigmas, _ = problem
    model = bucketed(lambda x, sigma: x[:1], batch=B)
    with pytest.raises(ValueError, match="padded batch of 4 rows"):
        model(x[:3], sigmas[:1].expand(3))


# ------------------------------------------------------------------ the library samplers


@pytest.mark.parametrize("sampler", [sample_euler, sample_ddim, sample_dpmpp_2m])
def test_computed_rows_unchanged_and_model_sees_only_buckets(problem, sampler):
    model, x, sigmas, extra = problem
    skip = FixedMask(staircase())
    want, want_rep = sampler(model, x, sigmas, extra_args=extra, skip=skip, disable=True)
    inner = Recording(model)
    wrapped = bucketed(inner, batch=B)
    got, rep = sampler(wrapped, x, sigmas, extra_args=extra, skip=skip, disable=True)
    assert rel(got, want) < 1e-14  # measured <= 3.9e-16
    assert set(inner.sizes) == {1, 2, 4, 8} and wrapped.seen == inner.sizes
    assert sorted(set(want_rep.computed.sum(0).tolist())) == list(range(1, B + 1))  # every size 1..8 occurred
    np.testing.assert_array_equal(rep.computed, want_rep.computed)
    np.testing.assert_array_equal(rep.nfe, want_rep.nfe)
    assert rep.model_calls == want_rep.model_calls == N


def test_thirdorder_decisions_unchanged(problem):
    model, x, sigmas, extra = problem
    x = x * torch.linspace(0.3, 2.0, B, dtype=x.dtype).reshape(B, 1, 1, 1)
    policy = ThirdOrder(delta=0.2)
    want, want_rep = sample_dpmpp_2m(model, x, sigmas, extra_args=extra, skip=policy, disable=True)
    got, rep = sample_dpmpp_2m(bucketed(model, [2, 4]), x, sigmas, extra_args=extra, skip=policy, disable=True)
    c = want_rep.computed
    assert (c.any(0) & ~c.all(0)).any(), "some steps should compute on a sub-batch here"
    np.testing.assert_array_equal(rep.computed, want_rep.computed)
    assert rel(got, want) < 1e-14


def test_k_diffusion_wrapper(kdiff, problem):
    from adaptive_sampling.integrations.k_diffusion import adaptive

    model, x, sigmas, extra = problem
    fn = adaptive(kdiff.sample_euler, FixedMask(staircase()))
    want, want_rep = fn.with_report(model, x, sigmas, extra_args=extra, disable=True)
    inner = Recording(model)
    got, rep = fn.with_report(bucketed(inner, batch=B), x, sigmas, extra_args=extra, disable=True)
    assert rel(got, want) < 1e-14 and set(inner.sizes) == {1, 2, 4, 8}
    np.testing.assert_array_equal(rep.nfe, want_rep.nfe)


# ------------------------------------------------------------------ torch.compile recompiles


class CountingBackend:
    """A torch.compile backend that counts the graphs compiled and runs them eagerly (no codegen)."""

    def __init__(self):
        self.compiles = 0

    def __call__(self, gm, example_inputs):
        self.compiles += 1
        return gm.forward


@pytest.mark.parametrize("dynamic, without, with_buckets", [(False, 8, 4), (None, 3, 3)])
def test_recompiles_bounded_by_buckets(problem, dynamic, without, with_buckets):
    model, x, sigmas, extra = problem
    counts, outs = {}, {}
    for pad in (False, True):
        torch._dynamo.reset()
        backend = CountingBackend()
        compiled = torch.compile(model, backend=backend, dynamic=dynamic)
        wrapped = bucketed(compiled, batch=B) if pad else compiled
        outs[pad], _ = sample_euler(wrapped, x, sigmas, extra_args=extra, skip=FixedMask(staircase()), disable=True)
        counts[pad] = backend.compiles
    torch._dynamo.reset()
    assert counts == {False: without, True: with_buckets}
    assert counts[True] <= len(bucket_sizes("pow2", B)) and counts[True] <= counts[False]
    assert rel(outs[True], outs[False]) < 1e-14


# ------------------------------------------------------------------ diffusers: adapter and hook

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import adaptive_sampling.integrations.diffusers as asd  # noqa: E402

from .tiny_pipelines import SD_SCHEDULER, sd_pipeline  # noqa: E402

BP, NP = 5, 8  # 5 prompts: pow2 buckets (1, 2, 4, 5)


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(1)
    return sd_pipeline()


def _mask() -> np.ndarray:
    m = np.random.default_rng(0).random((BP, NP)) < 0.5
    m[:, 0] = True
    m[:, 3] = np.arange(BP) < 3  # a sub-batch of 3: padded to 4
    return m


def _latents():
    return torch.randn(BP, 4, 8, 8, generator=torch.Generator().manual_seed(1))


def _hook_run(pipe, pad_to):
    with asd.apply(pipe, skip=FixedMask(_mask()), pad_to=pad_to) as handle:
        out = pipe(["a cat"] * BP, num_inference_steps=NP, height=8, width=8, output_type="latent",
                   latents=_latents(), guidance_scale=7.5).images
    return out, handle


def test_hook_pad_to(pipe):
    want, h0 = _hook_run(pipe, None)
    got, h1 = _hook_run(pipe, "pow2")
    assert rel(got, want) < 3e-6  # measured 0 on the CPU
    sizes = _mask().sum(0)
    assert 3 in sizes and h0.batch_sizes == [2 * int(k) for k in sizes if k]
    assert set(h1.batch_sizes) <= {2, 4, 8, 10} and 6 not in h1.batch_sizes
    np.testing.assert_array_equal(h1.report.computed, h0.report.computed)
    np.testing.assert_array_equal(h1.report.nfe, h0.report.nfe)
    assert h1.report.model_calls == h0.report.model_calls


def test_hook_pad_to_bad_argument(pipe):
    with pytest.raises(ValueError, match="pad_to"):
        asd.apply(pipe, pad_to="pow4")
    with pytest.raises(ValueError, match="pad_to"):
        asd.apply(pipe, pad_to=[0, 2])


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m"])
def test_denoiser_bucketed(pipe, name):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    cls, kw, sampler = {
        "ddim": (DDIMScheduler, dict(clip_sample=False, set_alpha_to_one=False, steps_offset=1), sample_ddim),
        "dpmpp_2m": (DPMSolverMultistepScheduler, dict(algorithm_type="dpmsolver++", solver_order=2), sample_dpmpp_2m),
    }[name]
    scheduler = cls(**{**SD_SCHEDULER, **kw})
    scheduler.set_timesteps(NP)
    cond, uncond = pipe.encode_prompt(["a cat"] * BP, "cpu", 1, True)
    extra = {"prompt_embeds": cond, "negative_prompt_embeds": uncond}
    model = asd.denoiser(pipe.unet, scheduler, guidance_scale=7.5)
    x = _latents() * asd.start_scale(scheduler)
    sigmas = asd.scheduler_sigmas(scheduler)
    want, want_rep = sampler(model, x, sigmas, extra_args=extra, skip=FixedMask(_mask()), disable=True)
    wrapped = bucketed(model, batch=BP)
    got, rep = sampler(wrapped, x, sigmas, extra_args=extra, skip=FixedMask(_mask()), disable=True)
    assert rel(got, want) < 3e-6
    assert set(wrapped.seen) <= {1, 2, 4, 5} and 3 not in wrapped.seen
    np.testing.assert_array_equal(rep.nfe, want_rep.nfe)


def test_hook_on_a_compiled_unet(pipe):
    """``pipe.unet = torch.compile(pipe.unet)`` then ``apply``: the hook binds the UNet's signature,
    and an earlier compiled wrapper's (empty) hook registry, which torch.compile stores on the inner
    module, is not reused."""
    unet = pipe.unet
    try:
        pipe.unet = torch.compile(unet, backend=CountingBackend(), dynamic=False)
        asd.apply(pipe).remove()  # leaves an empty registry on `unet`, tied to that wrapper
        backend = CountingBackend()
        pipe.unet = torch.compile(unet, backend=backend, dynamic=False)
        mask = np.ones((2, 4), bool)
        mask[1, 2:] = False  # a sub-batch of 1 prompt at steps 2, 3, padded to the bucket 2
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with asd.apply(pipe, skip=FixedMask(mask), pad_to=[2]) as handle:
                got = pipe(["a", "b"], num_inference_steps=4, height=8, width=8, output_type="latent",
                           latents=_latents()[:2], guidance_scale=7.5).images
        assert handle.report is not None and handle.report.nfe.tolist() == [4, 2]
        assert handle.batch_sizes == [4, 4, 4, 4] and backend.compiles == 1  # one shape: one graph
        pipe.unet = unet
        with asd.apply(pipe, skip=FixedMask(mask)) as plain:
            want = pipe(["a", "b"], num_inference_steps=4, height=8, width=8, output_type="latent",
                        latents=_latents()[:2], guidance_scale=7.5).images
        assert plain.batch_sizes == [4, 4, 2, 2] and rel(got, want) < 3e-6
    finally:
        pipe.unet = unet
        torch._dynamo.reset()
