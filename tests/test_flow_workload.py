"""The shipped flow transformer (``evaluation.workloads.flow``): it loads without network as the config
says, samples deterministically through the real FluxPipeline, its samples are their class for the
shipped classifier, its velocity beats a Gaussian-pixel predictor, and the library's flow sampler on
``flow.denoiser`` reproduces the pipeline (same noise, same grid) to float32 round-off."""

from __future__ import annotations

import math
import warnings
from importlib import resources

import pytest
import torch

from adaptive_sampling import get_sampler
from adaptive_sampling.evaluation.workloads import flow, shapes

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def pipe():
    return flow.pipeline()


def _sample(pipe, labels, steps: int, seed: int = 0, guidance: float | None = None) -> torch.Tensor:
    noise = torch.randn(len(labels), flow.image_seq_len(), 48, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pipe(**flow.prompt_kwargs(torch.as_tensor(labels), pipe.conditioning), latents=noise, num_inference_steps=steps,
                    true_cfg_scale=flow.RECOMMENDED_GUIDANCE if guidance is None else guidance, height=flow.HEIGHT,
                    width=flow.WIDTH, output_type="latent").images  # fmt: skip


def test_checkpoint_is_package_data_and_matches_the_config(pipe):
    ref = resources.files("adaptive_sampling") / "evaluation" / "workloads" / "data" / flow.CHECKPOINT.name
    assert ref.is_file()
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in pipe.transformer.config.items() if k in flow.TRANSFORMER_CONFIG}
    assert config == {k: (list(v) if isinstance(v, tuple) else v) for k, v in flow.TRANSFORMER_CONFIG.items()}
    params = sum(p.numel() for p in pipe.transformer.parameters())
    assert 3.0e6 < params < 4.0e6
    assert not any(p.requires_grad for p in pipe.transformer.parameters()) and not pipe.transformer.training
    assert type(pipe).__name__ == "FluxPipeline" and type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"


def test_pack_decode_and_grid(pipe):
    x = torch.randn(2, *flow.LATENT_SHAPE)
    assert torch.equal(flow.unpack(flow.pack(x)), x)
    assert sorted(flow.pack(x).flatten().tolist()) == sorted(x.flatten().tolist())  # a permutation
    sig = flow.sigmas(28)
    pipe.scheduler.set_timesteps(sigmas=[1.0 - i * (1.0 - 1 / 28) / 27 for i in range(28)], mu=flow.mu())
    assert torch.allclose(pipe.scheduler.sigmas.double(), sig, atol=1e-6)
    assert math.isclose(flow.mu(), 0.4675, abs_tol=1e-4)


def test_pipeline_samples_are_deterministic_and_their_class(pipe):
    labels = torch.arange(10).repeat(2)
    a = _sample(pipe, labels, 28, seed=0)
    b = _sample(pipe, labels[:3], 28, seed=0)
    assert torch.equal(a, _sample(pipe, labels, 28, seed=0))
    images = flow.decode(a).clamp(-1, 1)
    assert images.shape == (20, 3, 32, 32)
    accuracy = (shapes.load_classifier()(images).argmax(1) == labels).float().mean().item()
    assert accuracy >= 0.45, accuracy  # 11 of 20 here (seed 0, 28 steps, true CFG 4); chance is 2 of 20
    assert b.shape[0] == 3


def test_velocity_beats_the_gaussian_pixel_predictor(pipe):
    """v-MSE on fresh data at s = 0.2, 0.5, 0.8 against the exact posterior mean of independent Gaussian
    pixels with the data's per-pixel mean and variance (the best predictor that ignores structure)."""
    data, labels = shapes.make_data(64, seed=123)
    train, _ = shapes.make_data(2048, seed=124)
    mean, var = train.mean(0), train.var(0)
    model = flow.denoiser(1.0, pipe.transformer, pipe.conditioning)  # cond_scale 1: the conditional branch
    g = torch.Generator().manual_seed(5)
    for s in (0.2, 0.5, 0.8):
        noise = torch.randn(data.shape, generator=g)
        x = (1 - s) * data + s * noise
        x0 = model(x, torch.full((64,), s), y=labels)
        v_model = (x - x0) / s
        # Gaussian posterior mean of x0 given x: E[x0|x] = mean + (1-s) var / ((1-s)^2 var + s^2) (x - (1-s) mean)
        x0_gauss = mean + (1 - s) * var / ((1 - s) ** 2 * var + s**2) * (x - (1 - s) * mean)
        v_gauss = (x - x0_gauss) / s
        target = noise - data
        mse_model = ((v_model - target) ** 2).mean().item()
        mse_gauss = ((v_gauss - target) ** 2).mean().item()
        assert mse_model < 0.8 * mse_gauss, (s, mse_model, mse_gauss)


def test_library_flow_euler_on_the_denoiser_reproduces_the_pipeline(pipe):
    labels = torch.tensor([5, 6])
    steps = 10
    want = flow.decode(_sample(pipe, labels, steps, seed=3))
    noise = torch.randn(2, flow.image_seq_len(), 48, generator=torch.Generator().manual_seed(3))
    model = flow.denoiser(flow.RECOMMENDED_GUIDANCE, pipe.transformer, pipe.conditioning)
    got, report = get_sampler("flow_euler").sample(model, flow.decode(noise), flow.sigmas(steps), {"y": labels}, disable=True)
    assert report.nfe.tolist() == [steps, steps]
    assert (got - want).abs().max() / want.abs().max() < 2e-5
