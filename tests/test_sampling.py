"""Sampling loops: callback contract, reuse semantics, report contents, threads."""

import threading

import numpy as np
import pytest
import torch

from adaptive_sampling import FixedMask, ThirdOrder, get_sigmas_karras, sample_ddim, sample_dpmpp_2m, sample_euler
from adaptive_sampling.samplers import dpmpp_2m_step

from .helpers import MLPDenoiser, gaussian

SAMPLERS = {"ddim": sample_ddim, "euler": sample_euler, "dpmpp_2m": sample_dpmpp_2m}
SIGMAS = get_sigmas_karras(16, 0.03, 14.6)
MASK = [True, True, False, True, False, False, True, True, False, True, True, False, False, False, True, False]


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_callback_gets_k_diffusion_keys_and_computed(name):
    g = gaussian()
    x = g.noise(2, 14.6)
    infos = []
    _, rep = SAMPLERS[name](g.denoiser, x, SIGMAS, callback=infos.append, disable=True, skip=FixedMask(MASK))
    assert [i["i"] for i in infos] == list(range(16))
    for info in infos:
        assert set(info) == {"x", "i", "sigma", "sigma_hat", "denoised", "computed"}
        assert info["computed"].dtype == torch.bool and info["computed"].tolist() == [MASK[info["i"]]] * 2
        assert info["sigma"] == SIGMAS[info["i"]]
    assert rep.computed.tolist() == [MASK, MASK]


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_skipped_steps_reuse_eps_not_x0(name):
    """On a skipped step the denoiser output handed to the solver is x - sigma * eps_prev,
    where eps_prev = (x_j - D_j) / sigma_j of the last computed step j."""
    model = MLPDenoiser(dim=72, seed=2)
    x = gaussian().noise(2, 14.6)
    infos = []
    SAMPLERS[name](model, x, SIGMAS, callback=infos.append, disable=True, skip=FixedMask(MASK))
    eps_prev = None
    for k, info in enumerate(infos):
        if MASK[k]:
            torch.testing.assert_close(info["denoised"], model(info["x"], SIGMAS[k].expand(2)), rtol=0, atol=0)
            eps_prev = (info["x"] - info["denoised"]) / SIGMAS[k]
        else:
            torch.testing.assert_close(info["denoised"], info["x"] - SIGMAS[k] * eps_prev, rtol=1e-14, atol=1e-14)


def test_dpmpp_history_receives_the_reused_estimate():
    """The DPM-Solver++ history holds the x0 estimate made from the reused eps at the current x."""
    model = MLPDenoiser(dim=72, seed=2)
    x = gaussian().noise(1, 14.6)
    infos = []
    out, _ = sample_dpmpp_2m(model, x, SIGMAS, callback=infos.append, disable=True, skip=FixedMask(MASK))
    y, state = x, None
    for k, info in enumerate(infos):
        y, state = dpmpp_2m_step(y, SIGMAS[k], SIGMAS[k + 1], info["denoised"], state)
    assert torch.equal(y, out)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_report_contents(name):
    g = gaussian()
    x = g.noise(3, 14.6)
    policy = ThirdOrder(delta=0.2, max_skips=2)
    _, rep = SAMPLERS[name](g.denoiser, x, SIGMAS, disable=True, skip=policy)
    assert rep.computed.shape == (3, 16) and rep.scores.shape == (3, 16) and rep.stats.shape == (3, 16, 3)
    assert np.isnan(rep.scores[:, :4]).all() and np.isfinite(rep.scores[:, 4:]).all()
    decided = rep.computed[:, 4:]
    skip_ok = rep.scores[:, 4:] <= 0.2
    assert (decided == ~skip_ok | rep.capped[:, 4:]).all()
    assert np.isnan(rep.stats[:, 0]).all() and np.isfinite(rep.stats[:, 1:, :2]).all()
    assert np.isnan(rep.stats[:, :, 2]).all()  # the reference criterion does not need third differences
    assert rep.space == ("vp" if name != "euler" else "ve")
    assert (rep.speedup == 16 / rep.nfe).all()
    assert "NFE" in rep.summary()


def test_skip_none_calls_every_step():
    g = gaussian()
    _, rep = sample_euler(g.denoiser, g.noise(2, 14.6), SIGMAS, disable=True)
    assert rep.nfe.tolist() == [16, 16] and rep.model_calls == 16 and rep.policy == "no skipping"


def test_batch_mode_takes_one_decision():
    model = MLPDenoiser(dim=72, seed=1)
    x = gaussian().noise(4, 14.6)
    x[2:] *= 0.2
    _, per_sample = sample_euler(model, x, SIGMAS, disable=True, skip=ThirdOrder(delta=0.05))
    _, batch = sample_euler(model, x, SIGMAS, disable=True, skip=ThirdOrder(delta=0.05, per_sample=False))
    assert (batch.computed == batch.computed[:1]).all()
    assert len({tuple(r) for r in per_sample.computed.astype(int)}) > 1


def test_sigmas_may_be_a_list_or_float32():
    g = gaussian()
    x = g.noise(1, 14.6)
    a, _ = sample_euler(g.denoiser, x, SIGMAS, disable=True)
    b, _ = sample_euler(g.denoiser, x.float(), SIGMAS.float(), disable=True)
    torch.testing.assert_close(b.double(), a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_latents_decide_in_float32(dtype):
    g = gaussian(dtype=torch.float32)
    x = g.noise(2, 14.6).to(dtype)
    model = lambda x, s: g.denoiser(x.float(), s.float()).to(x.dtype)  # noqa: E731
    _, rep = sample_euler(model, x, SIGMAS.float(), disable=True, skip=ThirdOrder(delta=0.05))
    assert rep.scores.dtype == np.float32 and np.isfinite(rep.scores[:, 4:]).all()


def test_two_samplers_run_at_once_in_threads():
    g = gaussian()
    xs = [g.noise(2, 14.6, seed=s) for s in range(4)]
    policies = [ThirdOrder(delta=d) for d in (0.01, 0.05, 0.2, 1.0)]
    want = [sample_euler(g.denoiser, x, SIGMAS, disable=True, skip=p) for x, p in zip(xs, policies)]
    got = [None] * 4

    def work(i):
        for _ in range(5):
            got[i] = sample_euler(g.denoiser, xs[i], SIGMAS, disable=True, skip=policies[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (gx, gr), (wx, wr) in zip(got, want):
        assert torch.equal(gx, wx) and (gr.computed == wr.computed).all()
