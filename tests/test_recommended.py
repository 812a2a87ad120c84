"""default_policy (the recommended online rule), BySampler, and the shipped calibrated schedules."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adaptive_sampling import (
    Calibrated,
    FixedMask,
    LocalError,
    default_policy,
    get_sigmas_karras,
    sample_ddim,
    sample_dpmpp_2m,
    sample_euler,
)
from adaptive_sampling.integrations.k_diffusion import adaptive
from adaptive_sampling.policies import BySampler
from adaptive_sampling.policies import Paced
from adaptive_sampling.policies.default import DEFAULT_SPEEDUP, DEFAULT_TOL
from adaptive_sampling.evaluation.workloads import calibrated

from .helpers import CountingModel, MLPDenoiser, gaussian

SIGMAS = get_sigmas_karras(30, 0.03, 14.6)
SAMPLERS = {"ddim": sample_ddim, "euler": sample_euler, "dpmpp_2m": sample_dpmpp_2m}


def _x(batch=3, seed=0):
    return gaussian().noise(batch, float(SIGMAS[0]), seed=seed)


def test_default_tolerance_is_a_measured_positive_number():
    assert isinstance(DEFAULT_TOL, float) and 0 < DEFAULT_TOL < 1


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_default_policy_runs_through_the_samplers_and_skips(name):
    model = CountingModel(MLPDenoiser(dim=72, seed=4), batch=3)
    x = _x()
    ids = {"ids": torch.arange(3)}
    out, rep = SAMPLERS[name](model, x, SIGMAS, ids, disable=True, skip=default_policy(name))
    full, _ = SAMPLERS[name](MLPDenoiser(dim=72, seed=4), x, SIGMAS, disable=True)
    assert torch.isfinite(out).all()
    np.testing.assert_array_equal(model.rows.numpy(), rep.nfe)  # the report counts the rows really evaluated
    assert (rep.nfe < len(SIGMAS) - 1).any(), "the default policy skipped nothing on a smooth model"
    # max_skips=1: never two skips in a row, so at least half the calls remain
    assert (rep.nfe >= (len(SIGMAS) - 1) / 2).all()
    assert not torch.equal(out, full)


@pytest.mark.parametrize("name", ["sample_euler", "sample_dpmpp_2m"])
def test_default_policy_runs_through_the_k_diffusion_wrapper(kdiff, name):
    model = MLPDenoiser(dim=72, seed=4)
    x = _x()
    fn = getattr(kdiff, name)
    got, rep = adaptive(fn, default_policy(name)).with_report(model, x, SIGMAS, disable=True)
    ours = {"sample_euler": sample_euler, "sample_dpmpp_2m": sample_dpmpp_2m}[name]
    want, want_rep = ours(model, x, SIGMAS, disable=True, skip=default_policy())
    np.testing.assert_array_equal(rep.nfe, want_rep.nfe)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_default_policy_is_the_documented_rule():
    p = default_policy("sample_euler", steps=50)
    assert isinstance(p, Paced) and p.speedup == DEFAULT_SPEEDUP == 2.0 and p.nfe is None
    assert p == default_policy()
    assert default_policy(nfe=20) == Paced(nfe=20, max_speedup=5.0)
    assert default_policy(speedup=3) == Paced(speedup=3.0, max_speedup=5.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"sampler": "heun"}, "sampler must be one of"), ({"sampler": 3}, "sampler must be one of"),
     ({"steps": 2}, "steps must be an int >= 5"), ({"steps": 30.0}, "steps must be an int >= 5")],
)  # fmt: skip
def test_default_policy_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        default_policy(**kwargs)


def test_by_sampler_picks_the_policy_of_the_running_sampler(kdiff):
    n = len(SIGMAS) - 1
    masks = {"euler": np.arange(n) % 2 == 0, "dpmpp_2m": np.arange(n) % 3 != 1}
    for m in masks.values():
        m[0] = True
    policy = BySampler({s: FixedMask(m) for s, m in masks.items()})
    model = MLPDenoiser(dim=72, seed=4)
    for name, sample in (("euler", sample_euler), ("dpmpp_2m", sample_dpmpp_2m)):
        _, rep = sample(model, _x(), SIGMAS, disable=True, skip=policy)
        assert (rep.computed == masks[name]).all()
    _, rep = adaptive(kdiff.sample_euler, policy).with_report(model, _x(), SIGMAS, disable=True)
    assert (rep.computed == masks["euler"]).all()
    with pytest.raises(ValueError, match="no policy for sampler 'ddim'"):
        sample_ddim(model, _x(), SIGMAS, disable=True, skip=policy)
    with pytest.raises(ValueError, match="must be a skip policy"):
        BySampler({"euler": "fast"})


@pytest.mark.parametrize("workload", ["digits", "shapes"])
def test_shipped_schedules_load_with_exactly_k_calls(workload):
    table = calibrated.available(workload)
    assert set(table) == {"ddim", "euler", "dpmpp_2m"}
    for sampler, ks in table.items():
        for k in ks:
            policy = calibrated.load(workload, sampler, k)
            assert isinstance(policy, Calibrated) and policy.calls == k and policy.sampler == sampler
            assert int(policy.mask.sum()) == k and policy.mask[0]
    for k in (20, 25, 50):  # the searches went down to 10 (digits) and 20 (shapes) calls
        g = calibrated.grid(workload, k)
        assert len(g) == k + 1 and g[-1] == 0 and (g[:-1] > g[1:]).all()
    other = get_sigmas_karras(30, 0.03, 14.6).double()
    g = calibrated.grid(workload, 12, sigmas=other)
    assert len(g) == 13 and set(g.tolist()) <= set(other.tolist()) and g[0] == other[0] and g[-1] == 0


def test_shipped_schedule_errors_name_the_argument():
    with pytest.raises(ValueError, match="workload must be"):
        calibrated.load("mnist", "euler", 30)
    with pytest.raises(ValueError, match="sampler must be one of"):
        calibrated.load("digits", "heun", 30)
    with pytest.raises(ValueError, match="nfe must be one of"):
        calibrated.load("digits", "euler", 31)
    with pytest.raises(ValueError, match="nfe must be an int in"):
        calibrated.grid("digits", 5)
    with pytest.raises(ValueError, match=r"nfe must be an int in \[20, 50\]"):
        calibrated.grid("shapes", 15)
