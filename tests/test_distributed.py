"""Skipping under torch.distributed: data parallel and sharded latents (``adaptive_sampling.integrations.distributed``).

Two runs of spawned processes (gloo on the CPU), 2 and 3 processes, each executing every scenario
of ``tests/_dist_workers.py`` once (module-scoped fixtures); the tests below compare what each
process saw with single-process runs of the same workloads, computed here:

* data parallel, per sample: outputs and masks of every row equal the single-process run on the
  whole batch, bit for bit; batch mode (``per_sample=False``, sums pooled over the group): the
  same masks (and here, with an elementwise model, the same output bits);
* sharded latents: every process's mask is identical, equal to the single-process mask on the
  unsharded latent, and the outputs' shards are the single-process output's bits; with the shards
  assigned to the processes in reverse order (so the all-reduce adds the partial sums in another
  order, whose bits do differ from one process's sums), the processes still hold identical bits;
* a process that fails mid-loop makes the others raise ``DistributedSkipError`` within a bounded
  time: one that dies (2 processes: the closed connection is seen at once), one that stalls alive
  (3 processes: the failure group's timeout, ``FAIL_TIMEOUT_S`` seconds);
* the skip kernel's torch and Triton stage 1 (``skip_partials``) give one layout.

Every spawned run is bounded: the processes use a group timeout (60 s; 4 s in the failure
scenario) and are killed, failing the test, if they have not finished after ``JOIN_TIMEOUT_S``.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import time

import numpy as np
import pytest
import torch

from adaptive_sampling import Controller, FixedMask, LocalError, SkipPolicy, ThirdOrder, sample_dpmpp_2m, sample_euler
from adaptive_sampling.integrations import distributed as asd
from adaptive_sampling.kernels import skip_stats as ks

from . import _dist_workers as W

JOIN_TIMEOUT_S = 240  # a hung run fails the test after this; a normal one takes ~10 s

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")


# The processes are forked from a fork server that has imported torch, the library, Triton and
# k-diffusion once (a clean, single-threaded process: no torch thread pool to inherit), instead of
# each of the five processes importing them again on two shared cores.
PRELOAD = ["tests._dist_workers", "adaptive_sampling.integrations.distributed", "adaptive_sampling.kernels.skip_stats", "k_diffusion"]


def spawn(world: int, fail: str, tmp_path) -> list[dict]:
    """Run ``_dist_workers.main`` in ``world`` new processes; returns each one's results."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    t_spawn = time.time()
    init_file = str(tmp_path / "store")
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # inherited by the fork server (started here)
    try:
        procs = [ctx.Process(target=W.main, args=(r, world, init_file, str(tmp_path), fail)) for r in range(world)]
        for p in procs:
            p.start()
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not hung, f"processes {hung} of {world} did not finish within {JOIN_TIMEOUT_S} s"
    results = []
    for r in range(world):
        path = tmp_path / f"rank{r}.pt"
        assert path.exists(), f"process {r} saved nothing (exit code {procs[r].exitcode})"
        res = torch.load(path, weights_only=False)
        assert "traceback" not in res, f"process {r} failed:\n{res['traceback']}"
        res["startup_seconds"] = res["t_main"] - t_spawn  # spawn and imports
        results.append(res)
    return results


@pytest.fixture(scope="module")
def run2(tmp_path_factory):
    t0 = time.perf_counter()
    res = spawn(2, "exit", tmp_path_factory.mktemp("dist2"))
    print(f"2 processes: {time.perf_counter() - t0:.1f} s (startup {max(r['startup_seconds'] for r in res):.1f} s)")
    return res


@pytest.fixture(scope="module")
def run3(tmp_path_factory):
    t0 = time.perf_counter()
    res = spawn(3, "stall", tmp_path_factory.mktemp("dist3"))
    print(f"3 processes: {time.perf_counter() - t0:.1f} s (startup {max(r['startup_seconds'] for r in res):.1f} s)")
    return res


@pytest.fixture(scope="module")
def single():
    """The single-process reference of every case (whole batch, whole latent), computed once."""
    cache = {}

    def get(case):
        if case.name not in cache:
            cache[case.name] = W.run_single(case)
        return cache[case.name]

    return get


def _runs(request, world):
    return request.getfixturevalue(f"run{world}")


def _cases(kind):
    """(world, case) for every case of that kind each run executes."""
    return [pytest.param(w, c, id=f"{c.name}-{w}") for w in (2, 3) for c in W.cases(w) if c.kind == kind]


def _same_bits(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and bool(np.array_equal(a, b, equal_nan=True))


# --------------------------------------------------------------------------------------------
# Data parallel
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world, case", _cases("dp"))
def test_data_parallel_equals_one_process(request, world, case, single):
    runs = _runs(request, world)
    out, rep = single(case)
    assert (~rep.computed).any(), "the workload should skip some calls (else the test shows nothing)"
    for r, res in enumerate(runs):
        got = res[case.name]
        np.testing.assert_array_equal(got["computed"], rep.computed, err_msg=f"rank {r}")
        assert torch.equal(got["out"], out), f"rank {r}: gathered outputs differ from the single-process run"
        lo, hi = got["local_rows"]
        np.testing.assert_array_equal(got["local_nfe"], rep.nfe[lo:hi])
        if case.policy().per_sample:
            # per sample: nothing is communicated; every row's signals are the single-process bits
            assert _same_bits(got["scores"], rep.scores), f"rank {r}: scores differ"
            assert _same_bits(got["stats"], rep.stats), f"rank {r}: stats differ"
    assert sum(np.diff(res[case.name]["local_rows"])[0] for res in runs) == W.BATCH


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", ["dp-batch-ref-torch", "dp-batch-localerror"])
def test_data_parallel_batch_mode_pools_over_the_group(request, world, name, single):
    """The pooling matters: some process deciding batch-wide on its own rows alone would decide
    otherwise than the whole batch; pooled over the group, every process decides as the whole batch."""
    runs = _runs(request, world)
    case = next(c for c in W.cases(world) if c.name == name)
    _, rep = single(case)
    model, x, extra = W.workload(case.dtype)
    differ = 0
    for r, res in enumerate(runs):
        assert res[name]["policy"].startswith("data_parallel(")
        rows = asd._block(W.BATCH, r, world)
        y = {"y": extra["y"][rows]}
        _, alone = W.SAMPLERS[case.sampler](model, x[rows], case.sigmas, y, case.policy())
        differ += not np.array_equal(alone.computed, rep.computed[rows])
        np.testing.assert_array_equal(res[name]["computed"], rep.computed)
    assert differ, "no process alone would decide otherwise: the workload cannot tell pooled from local decisions"


# --------------------------------------------------------------------------------------------
# Sharded latents
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world, case", _cases("shard"))
def test_sharded_decisions_identical_and_equal_to_one_process(request, world, case, single):
    runs = _runs(request, world)
    out, rep = single(case)
    if not isinstance(case.policy(), FixedMask):
        assert (~rep.computed).any(), "the workload should skip some calls (else the test shows nothing)"
    first = runs[0][case.name]
    for r, res in enumerate(runs):
        got = res[case.name]
        assert got["agree"], f"rank {r}: decisions_agree() is False"
        # identical on every process, bit for bit (masks and the scores that made them)
        np.testing.assert_array_equal(got["computed"], first["computed"], err_msg=f"rank {r} vs rank 0")
        assert _same_bits(got["scores"], first["scores"]), f"rank {r}: scores differ from rank 0's"
        assert _same_bits(got["stats"], first["stats"]), f"rank {r}: stats differ from rank 0's"
        # equal to the single-process run on the unsharded latent
        np.testing.assert_array_equal(got["computed"], rep.computed, err_msg=f"rank {r} vs one process")
        assert torch.equal(got["out"], W.shard_of(out, got["shard"], world)), f"rank {r}: output shard differs"
        # the stats are those of the whole latent (all-reduced), to round-off
        np.testing.assert_allclose(got["stats"], rep.stats, rtol=1e-5, equal_nan=True)
        assert got["policy"].startswith("shard(")


@pytest.mark.parametrize(
    "world, name", [(2, "shard-permuted-f32"), (3, "shard-permuted-f32"), (2, "shard-permuted-triton")]
)
def test_sharded_ranks_agree_when_partial_sums_arrive_in_another_order(request, world, name):
    """The shards are assigned in reverse order, so the all-reduce adds the processes' partial
    sums in another order than one process adds the whole latent's terms; the completed sums
    differ from the single-process sums in the last bits at some steps (checked: else this test
    would show nothing), and yet every process holds the same bits at every step."""
    runs = _runs(request, world)
    sums = [res[name]["sums"] for res in runs]
    for r in range(1, world):
        assert torch.equal(sums[r], sums[0]), f"rank {r}'s all-reduced sums differ from rank 0's"
    case = next(c for c in W.cases(world) if c.name == name)
    assert [res[name]["shard"] for res in runs] == list(range(world))[::-1]
    # the same sums from one process: stage 1 of the kernel on the whole latent, step by step
    torch_sums = _single_process_sums(case)
    differs = [not torch.equal(a, b) for a, b in zip(sums[0], torch_sums)]
    assert any(differs), "the permuted all-reduce gave the single-process bits at every step"
    np.testing.assert_allclose(sums[0].numpy(), torch.stack(torch_sums).numpy(), rtol=1e-5)


def _single_process_sums(case):
    """Replay the single-process run's latents through skip_partials (the bits one process adds up)."""
    policy = case.policy()
    captured = []

    def cb(info):
        captured.append(info["x"].clone())

    model, x, extra = W.workload(case.dtype)
    sigmas = case.sigmas
    fn = {"euler": sample_euler, "dpmpp_2m": sample_dpmpp_2m}[case.sampler]
    out, _ = fn(model, x, sigmas, extra, callback=cb, disable=True, skip=policy)
    xs = captured[1:] + [out]  # the latents entering calls 1..N
    rule = policy.kernel_rule(case.sampler)
    state = ks.SkipState.new(x, len(xs), rule.delta)
    sums = []
    for step in range(1, len(xs) + 1):
        lat = xs[max(0, step - rule.history) : step][::-1]
        sg = [torch.full((W.BATCH,), float(sigmas[k]), dtype=case.dtype) for k in range(step, max(0, step - rule.history), -1)]
        assert len(sg) == len(lat)
        sums.append(ks.skip_partials(lat, sg, state, rule, policy.backend))
    return sums


# --------------------------------------------------------------------------------------------
# Failure: bounded, with a clear error
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world, how", [(2, "exit"), (3, "stall")])
def test_a_failing_process_makes_the_others_fail_in_bounded_time(request, world, how):
    runs = _runs(request, world)
    failing = world - 1
    for r in range(world - 1):
        got = runs[r]["fail"]
        assert got is not None and got["error"] == "DistributedSkipError", (r, got)
        assert "another process of the group stopped sampling" in got["message"]
        assert "all-reduce of the per-sample skip sums at step" in got["message"]
        if how == "stall":  # waited for the failure group's timeout, not for ever
            assert W.FAIL_TIMEOUT_S - 0.5 <= got["seconds"] <= W.FAIL_TIMEOUT_S + 20, got["seconds"]
            assert "Timed out" in got["message"]
        else:  # the dead peer's closed connection is seen without waiting for the timeout
            assert got["seconds"] < W.FAIL_TIMEOUT_S + 20, got["seconds"]
        # it failed at the failure, not before: it made exactly the calls the failing process made
        assert got["calls"] == W.FAIL_STEP, got
    assert runs[failing]["fail"] is None  # it exited inside the scenario, after saving the rest


# --------------------------------------------------------------------------------------------
# In-process checks: the kernel's stages, errors, the row split
# --------------------------------------------------------------------------------------------


@pytest.mark.skipif(ks.triton is None, reason="triton is not installed")
@pytest.mark.parametrize(
    "criterion, n_latents", [(ks.NONE, 1), (ks.REFERENCE, 2), (ks.PAPER, 2), (ks.PAPER, 4)], ids=["none", "ref", "paper-2", "paper-4"]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("dims", [(3, 5, 7), (4, 40, 33)], ids=["small", "several-chunks"])
def test_partials_layout_is_the_same_on_both_backends(criterion, n_latents, dtype, dims):
    g = torch.Generator().manual_seed(n_latents + len(dims))
    B = 3
    latents = [torch.randn((B, *dims), generator=g).to(dtype) for _ in range(n_latents)]
    latents[0][1].view(-1)[[2, 5]] = torch.tensor([float("nan"), float("inf")], dtype=dtype)  # row 1: 2 non-finite
    sigmas = [torch.rand(B, generator=g).to(dtype) + 0.5 for _ in range(n_latents)]
    rule = ks.SkipRule(criterion=criterion, vp=True)
    out = {}
    for backend in ("torch", "triton"):
        state = ks.SkipState.new(latents[0], 8, rule.delta)
        out[backend] = ks.skip_partials(latents, sigmas, state, rule, backend)
    a, b = out["torch"], out["triton"]
    assert a.shape == b.shape == (4, B) and a.dtype == b.dtype == ks.accumulator_dtype(dtype)
    assert a.is_contiguous() and b.is_contiguous()
    np.testing.assert_array_equal(a[ks.PARTIAL_BAD].numpy(), [0, 2, 0])  # counts, on both
    np.testing.assert_array_equal(b[ks.PARTIAL_BAD].numpy(), [0, 2, 0])
    order = ks._order(n_latents, rule)
    filled = {0: [], 1: [0, 1], 3: [0, 1, 2]}[order]
    for q in range(3):
        if q not in filled:
            assert not a[q].any() and not b[q].any(), f"row {q} should be 0 below order {order}"
    ok = [0, 2]  # rows without NaN/Inf: the sums agree to the summation order's round-off
    rtol = 1e-12 if dtype == torch.float64 else 2e-5
    np.testing.assert_allclose(b[:, ok].numpy(), a[:, ok].numpy(), rtol=rtol)
    if filled:
        assert b[filled, 1].isnan().all() and a[filled, 1].isnan().all()  # NaN propagates on both


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.skipif(ks.triton is None, reason="no triton"))])
@pytest.mark.parametrize("per_sample", [True, False])
@pytest.mark.parametrize("criterion", [ks.REFERENCE, ks.PAPER])
def test_stages_apart_equal_skip_update(backend, per_sample, criterion):
    """skip_partials + skip_decide (what a process runs between its all-reduces) against the fused
    skip_update: bit for bit on torch; on Triton the same flags (the sums differ in order only)."""
    rule = ks.SkipRule(criterion=criterion, delta=0.2, max_skips=2, per_sample=per_sample, vp=True)
    g = torch.Generator().manual_seed(3)
    base, vel = torch.randn((4, 3, 6, 6), generator=g), torch.randn((4, 3, 6, 6), generator=g)
    xs = [base + k * 0.3 * vel + 0.01 * torch.randn((4, 3, 6, 6), generator=g) for k in range(10)]
    sig = [torch.full((4,), 3.0 / (k + 1)) for k in range(10)]
    fused, apart = ks.SkipState.new(xs[0], 10, rule.delta), ks.SkipState.new(xs[0], 10, rule.delta)
    skipped = False
    for step in range(1, 11):
        lat, sg = xs[max(0, step - rule.history) : step][::-1], sig[max(0, step - rule.history) : step][::-1]
        ks.skip_update(lat, sg, fused, step, rule, backend)
        sums = ks.skip_partials(lat, sg, apart, rule, backend)
        pooled = None if per_sample else (torch.stack([r.sum() for r in sums]), lat[0].numel())
        ks.skip_decide(sums, apart, step, rule, len(lat), lat[0][0].numel(), pooled, backend)
        assert torch.equal(fused.flags, apart.flags), step
        skipped = skipped or bool((fused.flags == 0).any())
    assert skipped, "some call should skip"
    if backend == "torch":
        for f in ("prev_d", "skip_run", "stats", "scores"):
            assert torch.equal(getattr(fused, f).nan_to_num(-1), getattr(apart, f).nan_to_num(-1)), f


def test_skip_decide_checks_its_inputs():
    rule = ks.SkipRule()
    state = ks.SkipState.new(torch.zeros(2, 3), 5, 0.01)
    with pytest.raises(ValueError, match=r"sums must be a \[4, 2\] torch.float32"):
        ks.skip_decide(torch.zeros(3, 2), state, 1, rule, 2, 3)
    with pytest.raises(ValueError, match="n_latents"):
        ks.skip_decide(torch.zeros(4, 2), state, 1, rule, 5, 3)


class EveryOther(SkipPolicy):
    """A third-party policy (not known to be sum-based)."""

    def start(self, x, num_steps, sampler, sigmas=None):
        return _NoCollective(x, num_steps)


class _NoCollective(Controller):
    def decide(self, step, x, sigma):  # pragma: no cover - never decides here
        raise AssertionError


def test_policies_that_cannot_be_sharded_are_refused():
    with pytest.raises(ValueError, match="cannot be sharded"):
        asd.shard(EveryOther())
    assert asd.data_parallel(EveryOther()) is not None  # per sample by default: returned as is
    assert asd.data_parallel(EveryOther()).__class__ is EveryOther
    with pytest.raises(TypeError, match="needs a skip policy"):
        asd.shard(object())
    with pytest.raises(NotImplementedError, match="2-D"):
        asd.shard(asd.data_parallel(ThirdOrder(per_sample=False)))
    # opting in without the controller hook fails at start, before any collective
    opted = dataclasses.make_dataclass("Opted", [], bases=(EveryOther,), namespace={"shardable": True})()
    with pytest.raises(ValueError, match="has no use_collective"):
        asd.shard(opted).start(torch.zeros(1, 2), 4, "euler")
    batch_wide = dataclasses.make_dataclass("BatchWide", [], bases=(EveryOther,), namespace={"per_sample": False})()
    with pytest.raises(ValueError, match="has no use_collective"):
        asd.data_parallel(batch_wide).start(torch.zeros(1, 2), 4, "euler")
    for policy in (ThirdOrder(), LocalError(), FixedMask(np.ones(4, bool))):
        assert asd.data_parallel(policy) is policy  # per sample: nothing to communicate
        assert isinstance(asd.shard(policy), asd.Sharded)


def test_without_a_process_group_the_error_says_so():
    import torch.distributed as dist

    if dist.is_initialized():  # pragma: no cover
        pytest.skip("a process group is initialised in this process")
    with pytest.raises(RuntimeError, match="initialised process group"):
        asd.local_rows(4)
    with pytest.raises(RuntimeError, match="initialised process group"):
        asd.shard(ThirdOrder()).start(torch.zeros(2, 3), 5, "euler")


def test_import_stays_light():
    import subprocess
    import sys

    code = (
        "import sys, adaptive_sampling.integrations.distributed;"
        "print(','.join(m for m in ('k_diffusion', 'triton', 'scipy', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


@pytest.mark.parametrize("batch, world", [(5, 2), (5, 3), (2, 3), (8, 4), (1, 1)])
def test_rows_cover_the_batch_in_rank_order(batch, world):
    blocks = [asd._block(batch, r, world) for r in range(world)]
    assert [b.start for b in blocks] == [0] + [b.stop for b in blocks[:-1]]
    assert blocks[-1].stop == batch
    sizes = [b.stop - b.start for b in blocks]
    assert sizes == [len(t) for t in torch.arange(batch).tensor_split(world)]
