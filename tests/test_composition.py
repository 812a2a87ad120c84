"""The extension test of the architecture: a sampler and a rule written outside the package plug in
through the registry and the policy protocol, with no package edit.

* the outside sampler (``_third_party.sample_ab2``, registered in a few lines) runs through
  ``evaluate`` (with its baselines), ``calibrate`` (schedule and grid), a ``Calibrated`` schedule,
  ``default_policy`` and ``BySampler``;
* the outside rule (``_third_party.RelativeChange``) runs on its own, inside ``Budget`` (exactly K
  calls), as ``Calibrated(refine=...)`` (exactly the schedule's calls), and under ``shard`` (here:
  accepted; tests/test_distributed.py runs it across processes and compares with one process);
* composites read the protocol's declared members, never a class list (a rule that does not
  declare ``scored`` is refused by ``Budget`` and ``Calibrated``; one that does not declare
  ``shardable`` by ``shard``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adaptive_sampling import (
    Budget,
    BySampler,
    Calibrated,
    FixedMask,
    LocalError,
    calibrate,
    default_policy,
    get_sampler,
    get_sigmas_karras,
    sample_euler,
    sampler_names,
)
from adaptive_sampling.evaluation import evaluate
from adaptive_sampling.evaluation.baselines import uniform_mask
from adaptive_sampling.integrations import distributed as asd
from adaptive_sampling.samplers.registry import unregister_sampler

from . import _third_party as tp
from .helpers import CountingModel, MLPDenoiser, gaussian

SIGMAS = get_sigmas_karras(14, 0.03, 14.6)


@pytest.fixture
def ab2():
    entry = tp.register()
    yield entry
    unregister_sampler("ab2")


def _case(batch=3, seed=0):
    model = MLPDenoiser(dim=72, seed=seed)
    return model, gaussian().noise(batch, float(SIGMAS[0]), seed=seed + 1)


def test_outside_sampler_is_a_registry_entry(ab2):
    assert get_sampler("ab2") is ab2 and get_sampler("sample_ab2") is ab2
    assert "ab2" in sampler_names(runnable=True)
    model, x = _case()
    full, rep = tp.sample_ab2(model, x, SIGMAS, disable=True)
    assert rep.sampler == "ab2" and rep.nfe.tolist() == [14] * 3
    skipped, rep = tp.sample_ab2(model, x, SIGMAS, disable=True, skip=default_policy("ab2"))
    assert rep.nfe.min() < 14 and torch.isfinite(skipped).all()


def test_outside_sampler_through_evaluate(ab2):
    model = MLPDenoiser(dim=72, seed=2)
    noise = gaussian().noise(2, 1.0, seed=5)
    ev = evaluate(model, noise, lambda n: get_sigmas_karras(n, 0.03, 14.6), {"uniform": FixedMask(uniform_mask(14, 8))},
                  steps=14, samplers=("ab2", "euler"), baselines=("uniform", "fewer_steps"), disable=True)  # fmt: skip
    for method in ("full", "adaptive", "uniform", "fewer_steps"):
        r = ev.select("ab2", method)[0]
        assert r.psnr.shape == (2,) and np.isfinite(r.psnr).all()
    assert ev.select("ab2", "adaptive", "uniform")[0].nfe.tolist() == [8, 8]
    # the adaptive run with a uniform mask IS the uniform baseline: same output bits
    assert torch.equal(ev.select("ab2", "adaptive")[0].output, ev.select("ab2", "uniform")[0].output)
    # AB2 is not Euler: the outside loop really ran
    assert not torch.equal(ev.references["ab2"], ev.references["euler"])


def test_outside_sampler_through_calibrate_and_a_calibrated_schedule(ab2, tmp_path):
    model, x = _case(batch=2)
    policy = calibrate(model, "ab2", SIGMAS, x, nfe=9, disable=True)
    assert isinstance(policy, Calibrated) and policy.sampler == "ab2" and policy.calls == 9
    policy.save(tmp_path / "ab2.json")
    loaded = Calibrated.load(tmp_path / "ab2.json")
    new_x = gaussian().noise(3, float(SIGMAS[0]), seed=9)
    counting = CountingModel(model, 3)
    _, rep = tp.sample_ab2(counting, new_x, SIGMAS, {"ids": torch.arange(3)}, disable=True, skip=loaded)
    assert rep.nfe.tolist() == [9, 9, 9] and counting.rows.tolist() == [9, 9, 9]
    assert (rep.computed == loaded.mask).all()
    # a grid search of a multistep sampler needs the merge mode, which AB2's loop does not offer
    with pytest.raises(ValueError, match="takes merge_skipped"):
        calibrate(model, "ab2", SIGMAS, x, nfe=9, as_grid=True, disable=True)
    # a schedule for one sampler is refused under another (named), unless asked for on purpose
    with pytest.raises(ValueError, match="calibrated for sampler 'ab2', not 'euler'"):
        sample_euler(model, new_x, SIGMAS, disable=True, skip=loaded)
    _, rep = sample_euler(model, new_x, SIGMAS, disable=True, skip=loaded.for_sampler("euler"))
    assert rep.nfe.tolist() == [9, 9, 9]
    # BySampler picks the outside sampler's policy by its registry name
    picked = BySampler({"ab2": loaded, "euler": default_policy()})
    _, rep = tp.sample_ab2(model, new_x, SIGMAS, disable=True, skip=picked)
    assert (rep.computed == loaded.mask).all()


def test_outside_rule_decides_on_its_own():
    model, x = _case()
    _, rep = sample_euler(model, x, SIGMAS, disable=True, skip=tp.RelativeChange())
    assert rep.computed[:, :2].all() and (~rep.computed).any()
    runs = np.zeros(3, int)
    for k in range(14):  # its own guard: never more than max_skips skips in a row
        runs = np.where(rep.computed[:, k], 0, runs + 1)
        assert (runs <= 2).all()


@pytest.mark.parametrize("k", [6, 9, 12])
def test_outside_rule_inside_budget_spends_exactly_k(k):
    model, x = _case(batch=4, seed=3)
    counting = CountingModel(model, 4)
    _, rep = sample_euler(counting, x, SIGMAS, {"ids": torch.arange(4)}, disable=True, skip=Budget(k, rule=tp.RelativeChange()))
    assert rep.nfe.tolist() == [k] * 4 and counting.rows.tolist() == [k] * 4
    assert np.isfinite(rep.scores[:, 2:]).all()  # the rule's scores ranked the steps
    assert Budget(k, rule=tp.RelativeChange()).shardable  # declared by the rule, read through Budget


def test_outside_rule_refines_a_calibrated_schedule():
    model, x = _case(batch=4, seed=4)
    mask = uniform_mask(14, 8)
    schedule = Calibrated(SIGMAS, mask, "euler", refine=tp.RelativeChange(tol=0.3))
    counting = CountingModel(model, 4)
    _, rep = sample_euler(counting, x, SIGMAS, {"ids": torch.arange(4)}, disable=True, skip=schedule)
    assert rep.nfe.tolist() == [8] * 4 and counting.rows.tolist() == [8] * 4
    assert (rep.computed != mask).any(), "the refinement should move some calls"


def test_outside_rule_is_accepted_by_shard_and_data_parallel():
    assert isinstance(asd.shard(tp.RelativeChange()), asd.Sharded)
    assert isinstance(asd.shard(Budget(8, rule=tp.RelativeChange())), asd.Sharded)
    assert asd.data_parallel(tp.RelativeChange()) is not None


def test_composites_read_declared_capabilities_not_classes():
    class Unscored(tp.RelativeChange):
        scored = False
        shardable = False

    with pytest.raises(ValueError, match="rule must be a scored policy"):
        Budget(8, rule=Unscored())
    with pytest.raises(ValueError, match="refine must be a LocalError or another scored policy"):
        Calibrated(SIGMAS, uniform_mask(14, 8), "euler", refine=Unscored())
    with pytest.raises(ValueError, match="cannot be sharded"):
        asd.shard(Unscored())
    # the built-in rules declare the same capabilities
    assert LocalError.scored and LocalError.shardable and not FixedMask.scored
