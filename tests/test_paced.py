"""The speed knob: ``default_policy(nfe=...)`` / ``(speedup=...)`` (``Paced``) spends exactly its budget
per sample on every sampler and grid, decides its one re-plan per sample from its own estimate,
aligns a batch's rows when asked, and refuses bad budgets by name."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from adaptive_sampling import (
    Paced,
    default_policy,
    denoiser_from_flow,
    get_sigmas_flow,
    get_sigmas_karras,
    sample_ddim,
    sample_dpmpp_2m,
    sample_euler,
    sample_flow_dpmpp_2m,
    sample_flow_euler,
)
from adaptive_sampling.policies.paced import budget_for, stride_mask

from .helpers import CountingModel, MLPDenoiser, gaussian

SAMPLERS = {"ddim": sample_ddim, "euler": sample_euler, "dpmpp_2m": sample_dpmpp_2m}


@given(
    name=st.sampled_from(list(SAMPLERS) + ["flow_euler", "flow_dpmpp_2m"]),
    steps=st.integers(5, 60),
    frac=st.floats(0.2, 1.0),
    batch=st.integers(1, 4),
    align=st.booleans(),
    by_speedup=st.booleans(),
)
def test_exactly_the_budget_per_sample(name, steps, frac, batch, align, by_speedup):
    k = max(1, math.ceil(frac * steps))
    policy = Paced(speedup=steps / k, align=align) if by_speedup else Paced(nfe=k, align=align)
    expected = budget_for(steps, policy.nfe, policy.speedup)
    model = CountingModel(MLPDenoiser(dim=72, seed=1), batch)
    scales = torch.tensor([1.0, 0.3, 2.0, 0.7][:batch]).reshape(-1, 1, 1, 1)
    if name.startswith("flow"):
        sample = {"flow_euler": sample_flow_euler, "flow_dpmpp_2m": sample_flow_dpmpp_2m}[name]
        sigmas = get_sigmas_flow(steps, shift=3.0)
        flow_model = CountingModel(denoiser_from_flow(lambda x, s: MLPDenoiser(dim=72, seed=1)(x, s * 10)), batch)
        model, x = flow_model, gaussian().noise(batch, 1.0) * scales
    else:
        sample, sigmas = SAMPLERS[name], get_sigmas_karras(steps, 0.03, 14.6)
        x = gaussian().noise(batch, float(sigmas[0])) * scales
    _, rep = sample(model, x, sigmas, {"ids": torch.arange(batch)}, disable=True, skip=policy)
    assert rep.nfe.tolist() == [expected] * batch and model.rows.tolist() == [expected] * batch
    assert rep.budget.tolist() == [expected] * batch
    if align:  # one shared mask: the model runs exactly K times for the whole batch
        assert (rep.computed == rep.computed[0]).all() and rep.model_calls == expected


def test_speedup_rounds_halves_up_and_the_plan_is_a_uniform_stride():
    assert budget_for(50, None, 2.0) == 25 and budget_for(50, None, 3.0) == 17 and budget_for(30, None, 4.0) == 8
    assert budget_for(5, None, 2.0) == 3  # 2.5 -> 3
    mask = stride_mask(50, 25)
    assert mask.sum() == 25 and mask[0] and (mask[::2]).all()
    tail = stride_mask(12, 6, tail=2)
    assert tail.sum() == 6 and tail[-2:].all() and tail[0]


def _digits_like(batch=4):
    model = MLPDenoiser(dim=72, seed=3)
    sigmas = get_sigmas_karras(40, 0.03, 14.6)
    return model, gaussian().noise(batch, float(sigmas[0])), sigmas


def test_the_replan_is_a_per_sample_online_decision():
    model, x, sigmas = _digits_like()
    _, free = sample_euler(model, x, sigmas, disable=True, skip=Paced(nfe=16, align=False, ratio=0.0))  # ratio 0: always re-plan
    assert free.signals["replanned"].all() and free.computed[:, -2:].all()
    _, never = sample_euler(model, x, sigmas, disable=True, skip=Paced(nfe=16, align=False, ratio=1e9))
    assert not never.signals["replanned"].any()
    assert (never.computed == stride_mask(40, 16)).all()
    # the estimates that decided are in the report
    assert np.isfinite(free.scores[:, 10:30]).all()


def test_align_makes_the_batch_share_one_mask_through_the_hook_rows():
    model, x, sigmas = _digits_like(batch=6)
    x = x * torch.tensor([1.0, 0.1, 3.0, 0.5, 2.0, 0.2]).reshape(-1, 1, 1, 1)
    counting = CountingModel(model, 6)
    _, rep = sample_euler(counting, x, sigmas, {"ids": torch.arange(6)}, disable=True, skip=Paced(nfe=14))
    assert (rep.computed == rep.computed[0]).all() and rep.model_calls == 14


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: default_policy(nfe=20, speedup=2), "nfe or speedup, not both"),
        (lambda: default_policy(speedup=0.5), r"speedup must be in \[1, 5\]"),
        (lambda: default_policy(speedup=6), r"speedup must be in \[1, 5\]"),
        (lambda: default_policy(speedup="2x"), "speedup must be a finite number"),
        (lambda: default_policy(nfe=2.5), "nfe must be an int"),
        (lambda: default_policy(nfe=0), "nfe must be an int >= 1"),
        (lambda: default_policy(nfe=60, steps=50), r"nfe must be in \[10, 50\] for 50 steps"),
        (lambda: Paced(), "give a budget"),
        (lambda: Paced(nfe=10, tail=-1), "tail must be an int"),
    ],
)
def test_bad_budgets_are_refused_by_name(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_a_budget_larger_than_the_grid_is_an_error_not_a_clamp():
    model, x, sigmas = _digits_like()
    with pytest.raises(ValueError, match="nfe=60 calls do not fit a grid of 40 steps"):
        sample_euler(model, x, sigmas, disable=True, skip=default_policy(nfe=60))
    with pytest.raises(ValueError, match=r"nfe=5 is below the 8 calls \(N / 5\)"):
        sample_euler(model, x, sigmas, disable=True, skip=default_policy(nfe=5))


def test_the_report_shows_the_budget_and_what_was_spent():
    model, x, sigmas = _digits_like(batch=2)
    _, rep = sample_dpmpp_2m(model, x, sigmas, disable=True, skip=default_policy(speedup=2))
    text = str(rep)
    assert "20 of 40 model calls per sample (NFE)" in text and "budget: 20 calls per sample, spent exactly" in text
    assert rep.summary() == "dpmpp_2m, Paced(speedup=2): 20 of 40 model calls per sample (NFE), 2.00x speedup"
    assert "\n" not in repr(rep) and "array" not in repr(rep)
