"""The peer settings (``evaluation.peers``) on the shipped flow transformer through the real FluxPipeline
with true CFG: every setting runs, the aggressive ones change the output (the knob is live), every one
leaves the pipeline computing exactly as before, MagCache's ratios are measured, the library's settings
spend their budget, and a model without diffusers' cache hooks is refused with a clear error."""

from __future__ import annotations

import warnings

import pytest
import torch

from adaptive_sampling.evaluation import peers
from adaptive_sampling.evaluation.workloads import flow

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
pytest.importorskip("diffusers")

N = 12  # cache-dit warms up for 8 steps by default
LIVE = {"FirstBlockCache(threshold=0.4)", "MagCache(threshold=0.5)", "TaylorSeer(cache_interval=2)", "PAB(skip_range=2)",
        "DBCache F1B0(threshold=0.32)", "DBCache steps_mask(fast)"}  # fmt: skip


@pytest.fixture(scope="module")
def pipe():
    return flow.pipeline()


@pytest.fixture(scope="module")
def pipe_for_cache_dit():
    """cache-dit patches the transformer for good (see test_cache_dit_leaves_the_transformer_patched): its own pipeline."""
    return flow.pipeline()


def _call(pipe, steps: int = N, labels=(5, 6), seed: int = 0) -> torch.Tensor:
    noise = torch.randn(len(labels), flow.image_seq_len(), 48, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pipe(**flow.prompt_kwargs(torch.tensor(labels), pipe.conditioning), latents=noise, true_cfg_scale=3.0,
                    num_inference_steps=steps, height=flow.HEIGHT, width=flow.WIDTH, output_type="latent").images  # fmt: skip


@pytest.fixture(scope="module")
def baseline(pipe):
    return _call(pipe)


def _calibration(pipe):
    return lambda: _call(pipe, labels=(0, 1), seed=100)


SETTINGS = peers.peer_settings(N, cache_dit=True)


@pytest.mark.parametrize("setting", SETTINGS, ids=[s.name for s in SETTINGS])
def test_every_peer_runs_and_leaves_the_pipeline_as_before(pipe, pipe_for_cache_dit, baseline, setting):
    if setting.library == "cache-dit":
        pytest.importorskip("cache_dit")
        pipe = pipe_for_cache_dit
    with setting.applied(pipe, N, _calibration(pipe)) as steps:
        assert steps == N
        out = _call(pipe, steps)
    assert out.shape == baseline.shape and torch.isfinite(out).all()
    if setting.name in LIVE:
        assert not torch.equal(out, baseline), f"{setting.name} changed nothing"
    assert torch.equal(_call(pipe), baseline)  # switched off: exactly the uncached pipeline


def test_magcache_ratios_are_measured_on_the_calibration_call(pipe):
    ratios = peers.magcache_ratios(pipe, N, _calibration(pipe))
    assert len(ratios) == N and ratios[0] == 1.0 and all(r > 0 for r in ratios)
    assert ratios != peers.magcache_ratios(pipe, N, lambda: _call(pipe, labels=(7, 8), seed=3))  # data-dependent


def test_magcache_without_calibration_is_refused(pipe, baseline):
    mag = next(s for s in SETTINGS if s.family == "MagCache")
    with pytest.raises(ValueError, match="calibration"):
        with mag.applied(pipe, N, None):
            pass
    assert torch.equal(_call(pipe), baseline)


def test_library_settings_spend_their_budget_and_baselines_restore_the_scheduler(pipe, baseline):
    rows = []
    # counted at the first layer: the library's hook replaces the transformer's forward, so a pre-hook on the
    # transformer itself would also see the calls it skips
    handle = pipe.transformer.x_embedder.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    try:
        for setting in peers.library_settings((4,), paper=False):
            rows.clear()
            with setting.applied(pipe, N) as steps:
                _call(pipe, steps)
            assert sum(rows) == 4 * 2 * 2, setting.name  # K calls x 2 CFG branches x 2 images
        scheduler = pipe.scheduler
        for setting in peers.baseline_settings((4,)):
            rows.clear()
            with setting.applied(pipe, N) as steps:
                assert steps == 4
                _call(pipe, steps)
            assert sum(rows) == 4 * 2 * 2 and pipe.scheduler is scheduler, setting.name
    finally:
        handle.remove()
    assert torch.equal(_call(pipe), baseline)


def test_a_model_without_cache_hooks_is_refused_clearly():
    from .tiny_pipelines import sd3_pipeline

    pipe = sd3_pipeline()
    fbc = next(s for s in SETTINGS if s.family == "FirstBlockCache")
    with pytest.raises(peers.PeerUnavailable, match="CacheMixin"):
        with fbc.applied(pipe, N):
            pass
    with pytest.raises(ValueError, match="steps"):
        fbc.applied(pipe, 1)


def test_cache_dit_leaves_the_transformer_patched_and_diffusers_caches_refuse_it(pipe_for_cache_dit):
    """Found here: after cache_dit.enable_cache / disable_cache the Flux transformer gives the same outputs but
    stays patched, and diffusers' MagCache then never reaches its tail block (calibration prints nothing)."""
    pytest.importorskip("cache_dit")
    pipe = pipe_for_cache_dit
    db = next(s for s in SETTINGS if s.library == "cache-dit")
    with db.applied(pipe, N) as steps:
        _call(pipe, steps)
    assert peers.cache_dit_patched(pipe.transformer)
    for family in ("MagCache", "FirstBlockCache"):
        with pytest.raises(peers.PeerUnavailable, match="patched by cache-dit"):
            with next(s for s in SETTINGS if s.family == family).applied(pipe, N, _calibration(pipe)):
                pass
