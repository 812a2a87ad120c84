"""Bad input raises a clear error naming the argument; a failed call leaves nothing behind."""

import math

import numpy as np
import pytest
import torch

from adaptive_sampling import FixedMask, ThirdOrder, get_sigmas_karras, sample_ddim, sample_dpmpp_2m, sample_euler

from .helpers import gaussian

SAMPLERS = [sample_ddim, sample_euler, sample_dpmpp_2m]
G = gaussian()
SIGMAS = get_sigmas_karras(12, 0.03, 14.6)
X = G.noise(2, 14.6)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize(
    "x, sigmas, exc, match",
    [
        (X.long(), SIGMAS, TypeError, "x must be a floating-point"),
        (X.numpy(), SIGMAS, TypeError, "x must be a floating-point"),
        (X[0, 0, 0], SIGMAS, ValueError, r"x must be shaped \[batch, ...\]"),
        (torch.where(X > 1, math.nan, X), SIGMAS, ValueError, "x holds NaN or Inf"),
        (torch.where(X > 1, math.inf, X), SIGMAS, ValueError, "x holds NaN or Inf"),
        (X, SIGMAS[None], ValueError, "sigmas must be 1-D"),
        (X, SIGMAS[:1], ValueError, "sigmas needs at least 2"),
        (X, SIGMAS.flip(0), ValueError, "sigmas must be strictly decreasing"),
        (X, torch.tensor([3.0, 2.0, 2.0, 0.0]), ValueError, "sigmas must be strictly decreasing"),
        (X, torch.tensor([3.0, math.nan, 0.0]), ValueError, "sigmas holds NaN or Inf"),
        (X, torch.tensor([math.inf, 1.0, 0.0]), ValueError, "sigmas holds NaN or Inf"),
        (X, torch.tensor([1.0, 0.0, -1.0]), ValueError, "sigmas must be positive"),
    ],
)
def test_bad_latents_and_sigmas(sampler, x, sigmas, exc, match):
    with pytest.raises(exc, match=match):
        sampler(G.denoiser, x, sigmas, disable=True, skip=ThirdOrder())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(delta=-0.1), "delta must be >= 0"),
        (dict(delta=math.nan), "delta must be a finite number"),
        (dict(delta="0.1"), "delta must be a finite number"),
        (dict(max_skips=-1), "max_skips must be an int >= 0"),
        (dict(max_skips=1.5), "max_skips must be an int >= 0"),
        (dict(warmup=3), "warmup must be an int >= 4"),
        (dict(criterion="l2"), "criterion must be 'reference' or 'paper'"),
        (dict(space="xy"), "space must be 'vp', 've' or None"),
        (dict(backend="cuda"), "backend must be"),
    ],
)
def test_bad_policy_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ThirdOrder(**kwargs)


@pytest.mark.parametrize(
    "mask, match",
    [
        ([False, True], r"mask\[..., 0\] must be True"),
        ([[1, 2]], "mask must be boolean"),
        (np.ones((2, 2, 2), bool), r"mask must be shaped \[N\] or \[B, N\]"),
    ],
)
def test_bad_fixed_masks(mask, match):
    with pytest.raises(ValueError, match=match):
        FixedMask(mask)


def test_fixed_mask_must_fit_the_call():
    with pytest.raises(ValueError, match="mask has 5 steps, the sigmas give 12"):
        sample_euler(G.denoiser, X, SIGMAS, disable=True, skip=FixedMask([True] * 5))
    with pytest.raises(ValueError, match="mask has 3 rows, x has batch size 2"):
        sample_euler(G.denoiser, X, SIGMAS, disable=True, skip=FixedMask(np.ones((3, 12), bool)))


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_other_bad_arguments(sampler):
    with pytest.raises(TypeError, match="model must be callable"):
        sampler("not a model", X, SIGMAS, disable=True)
    with pytest.raises(TypeError, match="extra_args must be a dict"):
        sampler(G.denoiser, X, SIGMAS, [1], disable=True)
    with pytest.raises(TypeError, match="skip must be a skip policy"):
        sampler(G.denoiser, X, SIGMAS, disable=True, skip=0.01)


def _wrong_shape(x, s):
    return x[:, :1]


def _wrong_dtype(x, s):
    return x.float()


def _not_a_tensor(x, s):
    return x.numpy()


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("model", [_wrong_shape, _wrong_dtype, _not_a_tensor])
def test_model_returning_the_wrong_thing(sampler, model):
    with pytest.raises(ValueError, match="model returned .* at step 0; expected a tensor of the input's shape"):
        sampler(model, X, SIGMAS, disable=True, skip=ThirdOrder())


class NaNAt:
    def __init__(self, step, value=math.nan, rows=slice(None)):
        self.step, self.value, self.rows, self.calls = step, value, rows, 0

    def __call__(self, x, s):
        out = G.denoiser(x, s)
        if self.calls == self.step:
            out = out.clone()
            out[self.rows] = self.value
        self.calls += 1
        return out


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("step", [0, 3, 7, 11])
@pytest.mark.parametrize("value", [math.nan, math.inf])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_model_returning_nan_names_the_step(sampler, step, value, backend):
    policy = ThirdOrder(max_skips=0, backend=backend)  # every step calls, so call index = step
    with pytest.raises(FloatingPointError, match=f"the model returned NaN/Inf at step {step} "):
        sampler(NaNAt(step, value, rows=1), X, SIGMAS, disable=True, skip=policy)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_nan_is_caught_without_a_policy(sampler):
    with pytest.raises(FloatingPointError, match="at step 4 "):
        sampler(NaNAt(4), X, SIGMAS, disable=True)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_a_failed_call_leaves_nothing_behind(sampler):
    policy = ThirdOrder(delta=0.05)
    want = sampler(G.denoiser, X, SIGMAS, disable=True, skip=policy)
    with pytest.raises(FloatingPointError):
        sampler(NaNAt(6), X, SIGMAS, disable=True, skip=policy)
    with pytest.raises(ValueError):
        sampler(_wrong_shape, X, SIGMAS, disable=True, skip=policy)
    got = sampler(G.denoiser, X, SIGMAS, disable=True, skip=policy)
    assert torch.equal(got[0], want[0])
    assert (got[1].computed == want[1].computed).all()


def test_eta_must_be_non_negative():
    with pytest.raises(ValueError, match="eta must be a number >= 0"):
        sample_ddim(G.denoiser, X, SIGMAS, disable=True, eta=-1.0)


# --- traps a new user fell into (the architecture issue's list) -------------------------------------


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_a_policy_class_instead_of_an_instance_says_so(sampler):
    with pytest.raises(TypeError, match=r"skip=ThirdOrder is the policy class; pass an instance, e.g. skip=ThirdOrder\(\)"):
        sampler(G.denoiser, X, SIGMAS, disable=True, skip=ThirdOrder)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_extra_args_with_another_batch_size_are_refused(sampler):
    y = torch.tensor([0, 1, 2])  # 3 labels for a batch of 2
    with pytest.raises(ValueError, match=r"extra_args\['y'\] has 3 rows .* x has batch size 2"):
        sampler(G.denoiser, X, SIGMAS, {"y": y}, disable=True)
    with pytest.raises(ValueError, match=r"extra_args\['c'\]\[1\] has 5 rows"):
        sampler(G.denoiser, X, SIGMAS, {"c": [torch.zeros(2, 3), torch.zeros(5, 3)]}, disable=True)
    # batch-leading, broadcastable (1) and 0-dim tensors and plain values are fine
    sampler(lambda x, s, **kw: G.denoiser(x, s), X, SIGMAS, {"a": torch.zeros(2), "b": torch.zeros(1, 4), "c": torch.tensor(3.0), "d": 2.0},
            disable=True)  # fmt: skip


def test_a_broken_schedule_file_names_its_path(tmp_path):
    from adaptive_sampling import Calibrated

    bad = tmp_path / "broken.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"broken.json' is not a calibrated schedule file \(not valid JSON"):
        Calibrated.load(bad)
    other = tmp_path / "other.json"
    other.write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match=r"other.json' is not a valid calibrated schedule: not a adaptive_sampling.Calibrated"):
        Calibrated.load(other)
    with pytest.raises(ValueError, match=r"cannot read a calibrated schedule from '.*missing.json'"):
        Calibrated.load(tmp_path / "missing.json")


def test_a_schedule_is_refused_under_another_sampler():
    from adaptive_sampling import Calibrated

    schedule = Calibrated(SIGMAS, np.arange(12) % 2 == 0, "euler")
    with pytest.raises(ValueError, match=r"calibrated for sampler 'euler', not 'dpmpp_2m'.*BySampler.*for_sampler"):
        sample_dpmpp_2m(G.denoiser, X, SIGMAS, disable=True, skip=schedule)
    _, rep = sample_dpmpp_2m(G.denoiser, X, SIGMAS, disable=True, skip=schedule.for_sampler("dpmpp_2m"))
    assert rep.nfe.tolist() == [6, 6]


def test_calibrate_names_nfe_not_an_internal_argument():
    from adaptive_sampling import calibrate

    with pytest.raises(ValueError, match=r"nfe must be an int in \[4, 12\]"):
        calibrate(G.denoiser, "euler", SIGMAS, X, nfe=50, disable=True)


def test_float64_sigmas_meet_a_float32_latent_in_its_dtype(kdiff):
    """get_sigmas_karras gives float64 (the library's samplers do their step arithmetic with it and
    never promote the latent); the k-diffusion wrapper casts the sigmas to the latent's dtype, since
    k-diffusion's samplers would promote a float32 latent to float64 and a float32 network fails."""
    from adaptive_sampling.integrations.k_diffusion import adaptive

    net = torch.nn.Linear(72, 72)

    def model(x, sigma):
        return net(x.reshape(x.shape[0], -1)).reshape(x.shape)  # float32 weights: fails on float64 input

    x = X.float()
    assert SIGMAS.dtype == torch.float64
    for fn in (kdiff.sample_euler, kdiff.sample_heun, kdiff.sample_dpmpp_2m):
        out = adaptive(fn)(model, x, SIGMAS, disable=True)
        assert out.dtype == torch.float32
    for sampler in SAMPLERS:
        out, _ = sampler(model, x, SIGMAS, disable=True)
        assert out.dtype == torch.float32


def test_a_merge_mode_schedule_is_refused_outside_the_merge_mode(kdiff):
    """A schedule calibrated with merge_skipped=True means another update for its skipped steps:
    replayed in the default mode (or a default-mode schedule in the merge mode) it would run and be
    silently not what was calibrated. The samplers, the k-diffusion wrapper and the diffusers hook
    refuse the mismatch; the matching mode runs."""
    from adaptive_sampling import Calibrated
    from adaptive_sampling.integrations.diffusers import apply
    from adaptive_sampling.integrations.k_diffusion import adaptive

    from .tiny_pipelines import flux_pipeline

    mask = np.arange(12) % 2 == 0
    merged = Calibrated(SIGMAS, mask, "dpmpp_2m", merge_skipped=True)
    plain = Calibrated(SIGMAS, mask, "dpmpp_2m")
    with pytest.raises(ValueError, match=r"merge mode \(merge_skipped=True\).*merge_skipped=True"):
        sample_dpmpp_2m(G.denoiser, X, SIGMAS, disable=True, skip=merged)
    with pytest.raises(ValueError, match="calibrated without the merge mode"):
        sample_dpmpp_2m(G.denoiser, X, SIGMAS, disable=True, skip=plain, merge_skipped=True)
    with pytest.raises(ValueError, match="k-diffusion wrapper have no merge mode"):
        adaptive(kdiff.sample_dpmpp_2m, merged)  # refused when wrapping, before any call
    pipe = flux_pipeline()
    with pytest.raises(ValueError, match="diffusers hook"):
        apply(pipe, skip=merged)
    assert "progress_bar" not in vars(pipe)  # nothing installed: the hook replaces it when applied
    registry = getattr(pipe.transformer, "_diffusers_hook", None)
    assert registry is None or registry.get_hook("adaptive_sampling_skip") is None
    for policy, merge in ((merged, True), (plain, False)):
        _, rep = sample_dpmpp_2m(G.denoiser, X, SIGMAS, disable=True, skip=policy, merge_skipped=merge)
        assert rep.nfe.tolist() == [6, 6]
