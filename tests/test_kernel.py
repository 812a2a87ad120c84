"""The Triton skip kernel against its torch reference, the backend dispatch, and equal masks.

``adaptive_sampling.kernels.skip_stats`` holds two implementations of one update (difference
norms of the newest latents, the skip decision, the state update). Here the Triton one is checked
against the torch one on identical copies of a ``SkipState``.

On the CPU (CI) Triton runs through its interpreter (``TRITON_INTERPRET=1``, set by conftest.py).
The same file runs unchanged on a GPU with compiled Triton::

    TRITON_INTERPRET=0 ADAPTIVE_SAMPLING_TEST_DEVICE=cuda python -m pytest tests/test_kernel.py

Tolerances (float32 accumulation; float64 for float64 latents, with that dtype's epsilon):

* ``RTOL = 256 eps`` on the sums. Both backends form the same elementwise terms and add them in
  different orders (torch: its vectorised/pairwise reduction; Triton: per-lane running sums,
  a tree over the lanes of a block, then the chunks of a sample in order). For sums of
  non-negative terms any order is within ``depth * eps`` relative of the exact sum, where the
  depth (longest chain of additions) is below ~100 for the sizes tested here.
* ``ELEM = 8 eps`` times the magnitude of the terms a difference cancels (e.g.
  ``|y0| + 3|y1| + 3|y2| + |y3|`` for the third difference). On a GPU the compiler may contract
  ``a * s - b`` into one fused multiply-add, which rounds once instead of twice; on a smooth
  trajectory the differences are much smaller than the latents, so that error is relative to
  the latents, not to the differences. (The interpreter's numpy arithmetic rounds exactly like
  torch, so on the CPU only the summation order differs.)

Decisions must agree wherever the reference's distance to its threshold exceeds twice the
propagated tolerance, and always where a guard forces the call (warm-up, ``max_skips``, NaN/Inf).
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings

import numpy as np
import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

from adaptive_sampling import ThirdOrder, get_sigmas_karras, sample_ddim, sample_dpmpp_2m, sample_euler
from adaptive_sampling.kernels import skip_stats as ks
from adaptive_sampling.schedules import vp_scale

from .helpers import MLPDenoiser, gaussian

DEVICE = torch.device(os.environ.get("ADAPTIVE_SAMPLING_TEST_DEVICE", "cpu"))
if DEVICE.type == "cuda" and not torch.cuda.is_available():
    raise RuntimeError("ADAPTIVE_SAMPLING_TEST_DEVICE=cuda, but torch sees no CUDA device")

pytestmark = [
    pytest.mark.skipif(ks.triton is None, reason="triton is not installed"),
    # the interpreter's numpy arithmetic warns on the padding lanes of the decide kernel (x / 0)
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
CRITERIA = [ks.NONE, ks.REFERENCE, ks.PAPER]


def eps_of(acc: torch.dtype) -> float:
    return torch.finfo(acc).eps


def rtol_of(acc):
    return 256 * eps_of(acc)


def elem_of(acc):
    return 8 * eps_of(acc)


# --------------------------------------------------------------------------------------------
# Building inputs
# --------------------------------------------------------------------------------------------


def trajectory(batch, dims, count, dtype, roughness, seed, device=DEVICE):
    """``count`` latents, newest first: x_k = base + k v + roughness * noise_k (rows differ).

    Small roughness gives smooth trajectories (small third differences, steady d's: the skip
    side of the rules); large roughness gives rough ones (the compute side).
    """
    g = torch.Generator().manual_seed(seed)
    shape = (batch, *dims)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    v = torch.randn(shape, generator=g, dtype=torch.float64) * 0.3
    row_rough = roughness * torch.exp(torch.randn(batch, generator=g, dtype=torch.float64))
    xs = []
    for k in range(count):
        noise = torch.randn(shape, generator=g, dtype=torch.float64)
        xs.append(base + k * v + row_rough.reshape(-1, *[1] * len(dims)) * noise)
    return [x.to(device=device, dtype=dtype).contiguous() for x in reversed(xs)]


def make_sigmas(batch, count, dtype, seed, device=DEVICE):
    """One [B] noise level per latent (newest first: increasing going back), in the latents' dtype."""
    g = torch.Generator().manual_seed(seed + 1)
    sig = torch.rand(batch, generator=g, dtype=torch.float64) * 5 + 0.1
    return [(sig * (1.3**j)).to(device=device, dtype=dtype) for j in range(count)]


def clone_state(state: ks.SkipState) -> ks.SkipState:
    return dataclasses.replace(
        state,
        **{f.name: getattr(state, f.name).clone() for f in dataclasses.fields(state) if f.name not in ("partials", "launches")},
        partials=None,
        launches={},
    )


def measured(latents, sigmas, vp):
    """float64 CPU copies of the latents in the measured space (for magnitudes only)."""
    scales = [vp_scale(g.cpu().double()) if vp else torch.ones(len(g), dtype=torch.float64) for g in sigmas]
    return [x.cpu().double().reshape(x.shape[0], -1) * c[:, None] for x, c in zip(latents, scales)]


def mean_diff(latents, sigmas, vp):
    y = measured(latents[:2], sigmas[:2], vp)
    return (y[0] - y[1]).abs().mean(dim=1)


# --------------------------------------------------------------------------------------------
# The comparison
# --------------------------------------------------------------------------------------------


def order_of(n_latents, criterion):
    if criterion == ks.NONE or n_latents < 2:
        return 0
    return 3 if (criterion == ks.PAPER and n_latents >= 4) else 1


def run_both(latents, sigmas, state, step, rule):
    ref, tri = clone_state(state), clone_state(state)
    ks.skip_update(latents, sigmas, ref, step, rule, backend="torch")
    ks.skip_update(latents, sigmas, tri, step, rule, backend="triton")
    return ref, tri


def check_update(latents, sigmas, before, ref, tri, step, rule):
    """Assert that the Triton update ``tri`` agrees with the torch update ``ref`` of ``before``.

    Returns the rows whose decision had to match (for tests that want to see both outcomes).
    """
    acc = before.prev_d.dtype
    RTOL, ELEM, EPS = rtol_of(acc), elem_of(acc), eps_of(acc)
    B, N = latents[0].shape[0], before.scores.shape[0]
    order = order_of(len(latents), rule.criterion)
    y = measured(latents[: max(order + 1, 1)], sigmas[: max(order + 1, 1)], rule.vp)
    row = step - 1
    cpu = lambda t: t.detach().cpu().double()  # noqa: E731

    # 1. the NaN/Inf flag is exact, and a flagged row computes
    bad = ~torch.isfinite(latents[0].reshape(B, -1)).all(dim=1).cpu()
    for name, updated in (("torch", ref), ("triton", tri)):
        flags = updated.flags.cpu()
        assert torch.equal((flags & ks.FLAG_NONFINITE) != 0, bad), name
        assert ((flags & ks.FLAG_COMPUTE) != 0)[bad].all(), name
        assert ((flags & ~(ks.FLAG_COMPUTE | ks.FLAG_NONFINITE)) == 0).all(), name

    # 2. stats of this latent, per sample: sums within RTOL, cancellation within ELEM * magnitude
    st_ref, st_tri = cpu(ref.stats), cpu(tri.stats)
    others = torch.ones(N, dtype=torch.bool)
    others[row] = False
    assert torch.equal(st_ref[others].isnan(), st_tri[others].isnan())  # untouched rows stay NaN
    tol = torch.full((B, 3), math.inf, dtype=torch.float64)
    if order >= 1:
        tol[:, 0] = RTOL * st_ref[row, :, 0].abs() + ELEM * (y[0].abs() + y[1].abs()).mean(dim=1)
        tol[:, 1] = RTOL * st_ref[row, :, 1] + ELEM * (y[0].norm(dim=1) + y[1].norm(dim=1))
    if order >= 3:
        n3 = y[0].norm(dim=1) + 3 * y[1].norm(dim=1) + 3 * y[2].norm(dim=1) + y[3].norm(dim=1)
        tol[:, 2] = RTOL * st_ref[row, :, 2] + ELEM * n3
    a, b = st_ref[row], st_tri[row]
    assert torch.equal(a.isnan(), b.isnan()), (a, b)
    assert torch.equal(torch.isinf(a), torch.isinf(b)), (a, b)
    fin = torch.isfinite(a) & torch.isfinite(b)
    assert ((a - b).abs()[fin] <= tol[fin]).all(), (a, b, tol)

    # 3. prev_d: shifted exactly, the new d within tolerance (pooled when the batch decides as one)
    pd_before, pd_ref, pd_tri = cpu(before.prev_d), cpu(ref.prev_d), cpu(tri.prev_d)
    tol_d = torch.zeros(B, dtype=torch.float64)  # order 0: d is exactly 0 in both
    if order >= 1:
        assert torch.equal(pd_ref[:, 1].nan_to_num(7.5), pd_before[:, 0].nan_to_num(7.5))
        assert torch.equal(pd_tri[:, 1].nan_to_num(7.5), pd_before[:, 0].nan_to_num(7.5))
        tol_d = tol[:, 0] if rule.per_sample else tol[:, 0].mean().expand(B)
        d_ref, d_tri = pd_ref[:, 0], pd_tri[:, 0]
        assert torch.equal(d_ref.isfinite(), d_tri.isfinite())
        f = d_ref.isfinite()
        assert ((d_ref - d_tri).abs()[f] <= tol_d[f]).all(), (d_ref, d_tri, tol_d)
        if not rule.per_sample:  # one pooled d for the whole batch
            assert (d_ref == d_ref[0]).all() or not f.any()
            assert (d_tri == d_tri[0]).all() or not f.any()
    else:
        assert torch.equal(pd_ref.nan_to_num(7.5), pd_before.nan_to_num(7.5))
        assert torch.equal(pd_tri.nan_to_num(7.5), pd_before.nan_to_num(7.5))

    # 4. the decision
    deciding = rule.criterion != ks.NONE and rule.warmup <= step < N
    run_before = before.skip_run.cpu().long()
    comp_ref = (ref.flags.cpu() & ks.FLAG_COMPUTE) != 0
    comp_tri = (tri.flags.cpu() & ks.FLAG_COMPUTE) != 0
    must = torch.ones(B, dtype=torch.bool)  # rows whose decision is not within tolerance of the threshold
    if deciding:
        window, active = ks.cap_window(step, rule)
        bad_rule = bad if rule.per_sample else bad.any().expand(B)
        capped = active & (run_before >= window)
        delta = float(before.delta[0])
        if rule.criterion == ks.REFERENCE:
            d = pd_ref[:, 0] if order >= 1 else torch.zeros(B, dtype=torch.float64)  # order 0: no difference
            d1, d2 = pd_before[:, 0], pd_before[:, 1]
            inputs_ok = d.isfinite() & d1.isfinite() & d2.isfinite()
            lhs = ((d + d2) / 2 - d1).abs()
            margin = (lhs - d1 * delta).abs()
            tol_dec = tol_d + 4 * EPS * (d.abs() + d1.abs() + d2.abs())
            score_tol = tol_dec / d1.abs() + RTOL * (lhs / d1).abs()
        else:
            sq = lambda v: (v * v).sum() if not rule.per_sample else v * v  # noqa: E731
            l2 = sq(a[:, 1]).sqrt().expand(B)
            l3 = (sq(a[:, 2]).sqrt().expand(B)) if order >= 3 else torch.zeros(B, dtype=torch.float64)
            t2 = tol[:, 1] if rule.per_sample else tol[:, 1].sum().expand(B)
            t3 = tol[:, 2] if rule.per_sample else tol[:, 2].sum().expand(B)
            t3 = t3 if order >= 3 else torch.zeros(B, dtype=torch.float64)
            inputs_ok = l2.isfinite() & l3.isfinite()
            margin = (l3 - delta * l2).abs()
            tol_dec = t3 + delta * t2 + 4 * EPS * (l3 + delta * l2)
            score_tol = (t3 + (l3 / l2) * t2) / l2 + 4 * RTOL * (l3 / l2)
        forced = capped | bad_rule | ~inputs_ok
        assert comp_ref[forced].all() and comp_tri[forced].all(), "a guard must force the call"
        must = forced | (margin > 2 * tol_dec)
        # scores of this call (NaN elsewhere)
        sc_ref, sc_tri = cpu(ref.scores), cpu(tri.scores)
        assert torch.equal(sc_ref[torch.arange(N) != step].isnan(), sc_tri[torch.arange(N) != step].isnan())
        s_ref, s_tri = sc_ref[step], sc_tri[step]
        fin = s_ref.isfinite() & s_tri.isfinite() & inputs_ok & ~bad_rule
        assert ((s_ref - s_tri).abs()[fin] <= score_tol[fin]).all(), (s_ref, s_tri, score_tol)
        comparable = inputs_ok & ~bad_rule & must
        assert torch.equal(s_ref[comparable].isfinite(), s_tri[comparable].isfinite())
    else:
        assert comp_ref.all() and comp_tri.all(), "no decision: every row calls the model"
        assert torch.equal(cpu(ref.scores).isnan(), cpu(before.scores).isnan())
        assert torch.equal(cpu(tri.scores).isnan(), cpu(before.scores).isnan())
    assert torch.equal(comp_ref[must], comp_tri[must]), (comp_ref, comp_tri, must)

    # 5. the skip counter: each backend advances it on its own skips and resets it otherwise
    for name, updated, comp in (("torch", ref, comp_ref), ("triton", tri, comp_tri)):
        want = torch.where(comp, torch.zeros_like(run_before), run_before + 1) if deciding else 0 * run_before
        assert torch.equal(updated.skip_run.cpu().long(), want), name
        assert updated.skip_run.dtype == torch.int32 and updated.flags.dtype == torch.int8
    uniform_state = (pd_before == pd_before[0]).all() and (run_before == run_before[0]).all()
    if not rule.per_sample and deciding and uniform_state:  # as a pooled call keeps it: one decision
        assert (comp_ref == comp_ref[0]).all() and (comp_tri == comp_tri[0]).all()
    return must, comp_ref


# --------------------------------------------------------------------------------------------
# Property test
# --------------------------------------------------------------------------------------------

# Odd sizes (masked tails, unaligned rows) and a few powers of two (aligned rows).
SIZES = [1, 3, 5, 7, 9, 11, 13, 17, 31, 33, 63, 127, 255, 1021, 4099, 2, 16, 64]
MAX_ELEMENTS = 120_000  # per test case (batch * sample), to keep the CPU interpreter quick


@st.composite
def shapes(draw, batch):
    """1 to 4 non-batch dims with at most MAX_ELEMENTS // batch elements in all."""
    room, dims = MAX_ELEMENTS // batch, []
    for _ in range(draw(st.integers(1, 4))):
        dims.append(draw(st.sampled_from([s for s in SIZES if s <= room])))
        room //= dims[-1]
    return tuple(dims)


@st.composite
def cases(draw):
    batch = draw(st.integers(1, 8))
    dims = draw(shapes(batch))
    dtype = draw(st.sampled_from(DTYPES))
    rule = ks.SkipRule(
        criterion=draw(st.sampled_from(CRITERIA)),
        delta=draw(st.sampled_from([0.0, 0.01, 0.05, 0.2, 1.0, 4.0])),
        max_skips=draw(st.integers(0, 6)),
        warmup=draw(st.integers(4, 6)),
        per_sample=draw(st.booleans()),
        vp=draw(st.booleans()),
        reference_cap_bug=draw(st.booleans()),
    )
    # mostly the history the criterion needs (as SkipController passes it), sometimes any
    n_lat = draw(st.one_of(st.just(rule.history), st.sampled_from([1, 2, 4])))
    num_steps = draw(st.integers(5, 24))
    # mostly deciding steps, sometimes any step (warm-up, the final observation)
    step = draw(st.one_of(st.integers(min(rule.warmup, num_steps - 1), num_steps - 1), st.integers(1, num_steps)))
    roughness = draw(st.sampled_from([0.0, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0]))
    seed = draw(st.integers(0, 2**16))
    runs = draw(st.lists(st.one_of(st.integers(0, 1), st.integers(0, 8)), min_size=batch, max_size=batch))
    # prev_d relative to this step's d: (1 + u1, 1 + u2); NaN models "history too short"
    prev = draw(st.lists(st.tuples(st.floats(-0.4, 0.4), st.floats(-0.4, 0.4)), min_size=batch, max_size=batch))
    nan_prev = draw(st.booleans()) and draw(st.integers(0, batch - 1))
    poison = draw(st.one_of(st.none(), st.none(), st.sampled_from([math.nan, math.inf, -math.inf])))
    poison_latent = draw(st.integers(0, n_lat - 1))
    return batch, dims, dtype, n_lat, rule, num_steps, step, roughness, seed, runs, prev, nan_prev, poison, poison_latent


def build(case):
    batch, dims, dtype, n_lat, rule, num_steps, step, roughness, seed, runs, prev, nan_prev, poison, which = case
    latents = trajectory(batch, dims, n_lat, dtype, roughness, seed)
    acc = ks.accumulator_dtype(dtype)
    sigmas = make_sigmas(batch, n_lat, dtype, seed)
    state = ks.SkipState.new(latents[0], num_steps, rule.delta)
    d = mean_diff(latents, sigmas, rule.vp) if n_lat >= 2 else torch.ones(batch, dtype=torch.float64)
    d = d.clamp_min(1e-3)
    prev_d = torch.tensor(prev, dtype=torch.float64)
    prev_d = d[:, None] * (1 + prev_d)
    if nan_prev is not False:
        prev_d[nan_prev] = math.nan
    runs = torch.tensor(runs, dtype=torch.int32)
    if not rule.per_sample:  # a pooled call keeps one d history and one counter for all rows
        prev_d[:] = prev_d[0].clone()
        runs[:] = runs[0].clone()
    state.prev_d.copy_(prev_d.to(acc))
    state.skip_run.copy_(runs)
    if poison is not None:
        flat = latents[which].view(batch, -1)
        g = torch.Generator().manual_seed(seed)
        rows = torch.randperm(batch, generator=g)[: max(1, batch // 2)]
        cols = torch.randint(flat.shape[1], (len(rows),), generator=g)
        flat[rows.to(flat.device), cols.to(flat.device)] = poison
    return latents, sigmas, state, step, rule


@settings(max_examples=150)
@given(case=cases())
def test_kernel_matches_reference(case):
    latents, sigmas, state, step, rule = build(case)
    ref, tri = run_both(latents, sigmas, state, step, rule)
    must, comp = check_update(latents, sigmas, state, ref, tri, step, rule)
    # what the examples covered (pytest --hypothesis-show-statistics)
    event(f"elements per sample: {'<1e3' if latents[0][0].numel() < 1000 else '<1e4' if latents[0][0].numel() < 10**4 else '>=1e4'}")
    if rule.criterion != ks.NONE and rule.warmup <= step < state.scores.shape[0]:
        event(f"deciding; some row skips: {bool((~comp).any())}; some row within tolerance: {bool((~must).any())}")


# Larger explicit cases (~1e5 elements per sample), deciding steps, both criteria.
LARGE = [
    (1, (3, 5, 7, 953), torch.float16, ks.PAPER, True),
    (2, (4, 127, 129), torch.bfloat16, ks.REFERENCE, True),
    (3, (99, 1001), torch.float32, ks.PAPER, False),
    (8, (5, 41, 61), torch.float32, ks.REFERENCE, False),
]


@pytest.mark.parametrize("batch, dims, dtype, criterion, per_sample", LARGE)
@pytest.mark.parametrize("roughness", [1e-3, 1.0])
def test_kernel_matches_reference_large(batch, dims, dtype, criterion, per_sample, roughness):
    rule = ks.SkipRule(criterion=criterion, delta=0.05, max_skips=3, per_sample=per_sample, vp=True)
    latents = trajectory(batch, dims, rule.history, dtype, roughness, seed=batch)
    sigmas = make_sigmas(batch, rule.history, dtype, seed=batch)
    state = ks.SkipState.new(latents[0], 20, rule.delta)
    d = mean_diff(latents, sigmas, True)
    if not per_sample:
        d = d.mean().expand(batch)
    state.prev_d.copy_(torch.stack([d * 1.01, d * 0.97], dim=1).float())
    state.skip_run.copy_(torch.arange(batch, dtype=torch.int32) % 5 if per_sample else 1)
    ref, tri = run_both(latents, sigmas, state, 9, rule)
    check_update(latents, sigmas, state, ref, tri, 9, rule)


@pytest.mark.parametrize("criterion", [ks.REFERENCE, ks.PAPER])
@pytest.mark.parametrize("per_sample", [True, False])
@pytest.mark.parametrize("cap_bug", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_step_sequences_match(criterion, per_sample, cap_bug, dtype):
    """A whole call, step after step, as SkipController drives it (bounded history, warm-up, then
    decisions, the final observation): both backends take the same decisions and states.

    Rows differ in roughness, so some skip (and run into max_skips) and some compute; the test
    checks that both outcomes and the cap really occur. Each step starts both backends from the
    reference's state (the d's they store differ in the last bits, and a decision may land within
    tolerance of its threshold), so every step is compared from identical inputs.
    """
    batch, dims, num_steps = 4, (3, 17, 19), 20
    rule = ks.SkipRule(criterion=criterion, delta=0.05, max_skips=2, per_sample=per_sample, reference_cap_bug=cap_bug)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(batch, *dims, generator=g, dtype=torch.float64)
    v = torch.randn(batch, *dims, generator=g, dtype=torch.float64)
    # per sample: smooth to rough rows; pooled: all smooth (one rough row would dominate the sums),
    # so the batch skips until max_skips forces a call
    rough = [0.0, 1e-3, 0.03, 1.0] if per_sample else [0.0, 1e-4, 3e-4, 1e-3]
    rough = torch.tensor(rough, dtype=torch.float64).reshape(-1, 1, 1, 1)
    xs = [(x + k * v + rough * torch.randn(x.shape, generator=g, dtype=torch.float64)).to(DEVICE, dtype)
          for k in range(num_steps)]  # fmt: skip
    ref = ks.SkipState.new(xs[0], num_steps, rule.delta)
    tri = clone_state(ref)
    history = []
    decided = []
    for step in range(1, num_steps + 1):
        history = [(xs[step - 1], torch.ones(batch, device=DEVICE))] + history[: rule.history - 1]
        latents, sigmas = zip(*history)
        for f in ("prev_d", "skip_run", "flags", "stats", "scores"):  # start each step from one state
            getattr(tri, f).copy_(getattr(ref, f))
        before = clone_state(ref)
        ks.skip_update(latents, sigmas, ref, step, rule, backend="torch")
        ks.skip_update(latents, sigmas, tri, step, rule, backend="triton")
        must, comp = check_update(list(latents), list(sigmas), before, ref, tri, step, rule)
        if rule.warmup <= step < num_steps:
            decided.append(comp)
    decided = torch.stack(decided)  # [steps, B], True = compute
    assert (~decided).any() and decided.any(), "the sequence should both skip and compute"
    assert longest_skip_run(decided) >= rule.max_skips, "some row should run into max_skips"


def longest_skip_run(computed: torch.Tensor) -> int:
    best = 0
    for col in computed.T.tolist():
        cur = 0
        for c in col:
            cur = 0 if c else cur + 1
            best = max(best, cur)
    return best


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("criterion", [ks.NONE, ks.REFERENCE, ks.PAPER])
@pytest.mark.parametrize("per_sample", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_non_finite_newest_latent_computes(value, criterion, per_sample, dtype):
    """NaN/Inf in the newest latent sets FLAG_NONFINITE on that row and forces the call; with one
    decision per batch it forces the whole batch. On a perfectly smooth trajectory every row
    would otherwise skip, so a broken guard cannot pass."""
    batch = 3
    rule = ks.SkipRule(criterion=criterion, delta=0.2, max_skips=4, per_sample=per_sample, vp=False)
    n_lat = rule.history
    latents = trajectory(batch, (5, 7, 9), n_lat, dtype, 0.0, seed=1)
    sigmas = make_sigmas(batch, n_lat, dtype, seed=1)
    state = ks.SkipState.new(latents[0], 12, rule.delta)
    if n_lat >= 2:
        d = mean_diff(latents, sigmas, False).float()
        state.prev_d.copy_(torch.stack([d, d], dim=1))
    clean_ref, clean_tri = run_both(latents, sigmas, state, 6, rule)
    if criterion != ks.NONE:
        assert (clean_ref.flags.cpu() == 0).all() and (clean_tri.flags.cpu() == 0).all(), "smooth rows skip"
    latents[0][1, 2, 3, 4] = value
    ref, tri = run_both(latents, sigmas, state, 6, rule)
    for updated in (ref, tri):
        flags = updated.flags.cpu().tolist()
        assert flags[1] == ks.FLAG_COMPUTE | ks.FLAG_NONFINITE
        others = [flags[0], flags[2]]
        if criterion == ks.NONE or not per_sample:
            assert others == [ks.FLAG_COMPUTE] * 2
        else:
            assert others == [0, 0]
    check_update(latents, sigmas, state, ref, tri, 6, rule)


def test_triton_update_is_deterministic():
    """Same inputs, same bits: the reduction has a fixed order (no atomics)."""
    rule = ks.SkipRule(criterion=ks.PAPER, delta=0.05, per_sample=False)
    latents = trajectory(3, (7, 33, 65), 4, torch.float16, 1e-2, seed=5)
    sigmas = make_sigmas(3, 4, torch.float16, seed=5)
    state = ks.SkipState.new(latents[0], 10, rule.delta)
    a, b = clone_state(state), clone_state(state)
    ks.skip_update(latents, sigmas, a, 6, rule, backend="triton")
    ks.skip_update(latents, sigmas, b, 6, rule, backend="triton")
    for f in ("prev_d", "skip_run", "flags", "stats", "scores"):
        assert torch.equal(getattr(a, f).nan_to_num(-1), getattr(b, f).nan_to_num(-1)), f


def test_triton_rejects_what_it_cannot_read():
    rule = ks.SkipRule(criterion=ks.REFERENCE)
    latents = trajectory(2, (6, 8), 2, torch.float32, 0.1, seed=0)
    sigmas = make_sigmas(2, 2, torch.float32, seed=0)
    state = ks.SkipState.new(latents[0], 10, rule.delta)
    with pytest.raises(ValueError, match="contiguous"):
        ks.skip_update([latents[0].transpose(1, 2), latents[1]], sigmas, state, 5, rule, backend="triton")
    with pytest.raises(ValueError, match="one shape"):
        ks.skip_update([latents[0], latents[1][:, :4].contiguous()], sigmas, state, 5, rule, backend="triton")


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------


@pytest.fixture
def spies(monkeypatch):
    """Record which implementation skip_update runs (without running either)."""
    calls = []
    monkeypatch.setattr(ks, "_update_torch", lambda *a: calls.append("torch"))
    monkeypatch.setattr(ks, "_update_triton", lambda *a: calls.append("triton"))
    return calls


def _update(backend=None, device=DEVICE):
    """One skip_update on small tensors (of the test device by default) with the given backend
    argument (CPU tensors run Triton only in the interpreter, CUDA tensors run it compiled)."""
    x = torch.zeros(2, 3, device=device)
    return ks.skip_update([x], [torch.ones(2, device=device)], ks.SkipState.new(x, 5, 0.01), 1, ks.SkipRule(), backend)


@pytest.mark.parametrize("env", [None, "auto", "torch", "triton", " Triton "])
@pytest.mark.parametrize("arg", ["torch", "triton"])
def test_argument_beats_environment(monkeypatch, spies, env, arg):
    if env is None:
        monkeypatch.delenv(ks.BACKEND_ENV, raising=False)
    else:
        monkeypatch.setenv(ks.BACKEND_ENV, env)
    _update(arg)
    assert spies == [arg]
    assert ks.resolve_backend(DEVICE, arg) == arg


AUTO = "triton" if DEVICE.type == "cuda" else "torch"  # what auto picks for the test device's tensors


@pytest.mark.parametrize("env, want", [("torch", "torch"), ("triton", "triton"), ("auto", AUTO), ("TORCH", "torch")])
def test_environment_applies_without_argument(monkeypatch, spies, env, want):
    monkeypatch.setenv(ks.BACKEND_ENV, env)
    _update()
    assert spies == [want]


def test_auto_picks_torch_on_cpu_even_when_interpreting(monkeypatch):
    monkeypatch.delenv(ks.BACKEND_ENV, raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ks._interpreting()
    assert ks.resolve_backend(torch.device("cpu")) == "torch"
    assert ks.resolve_backend(torch.device("cpu"), "auto") == "torch"


def test_auto_picks_triton_for_cuda_tensors(monkeypatch):
    monkeypatch.delenv(ks.BACKEND_ENV, raising=False)
    assert ks.resolve_backend(torch.device("cuda")) == "triton"
    monkeypatch.setattr(ks, "triton", None)
    assert ks.resolve_backend(torch.device("cuda")) == "torch"


@pytest.mark.parametrize("via_env", [False, True])
@pytest.mark.parametrize("value", ["cuda", "", "none", "tritonn"])
def test_invalid_backend_names_the_source(monkeypatch, via_env, value):
    if via_env:
        monkeypatch.setenv(ks.BACKEND_ENV, value)
        arg, source = None, r"\$ADAPTIVE_SAMPLING_BACKEND"
    else:
        monkeypatch.delenv(ks.BACKEND_ENV, raising=False)
        arg, source = value, "backend argument"
    with pytest.raises(ValueError, match=f"{source} must be 'auto', 'torch' or 'triton', got {value!r}"):
        ks.resolve_backend(torch.device("cpu"), arg)
    with pytest.raises(ValueError, match=source):
        _update(arg)
    with pytest.raises(ValueError, match="backend"):
        ThirdOrder(backend=value)


@pytest.mark.parametrize("how", ["env", "function"])
@pytest.mark.parametrize("via_env", [False, True])
def test_triton_on_cpu_without_interpreter_is_an_error(monkeypatch, spies, how, via_env):
    if how == "env":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    else:
        monkeypatch.setattr(ks, "_interpreting", lambda: False)
    if via_env:
        monkeypatch.setenv(ks.BACKEND_ENV, "triton")
    arg = None if via_env else "triton"
    with pytest.raises(RuntimeError, match="Triton needs CUDA tensors.*TRITON_INTERPRET=1"):
        ks.resolve_backend(torch.device("cpu"), arg)
    # also when the caller passes the resolved name straight to skip_update (its fast path)
    with pytest.raises(RuntimeError, match="latents are on cpu"):
        _update(arg, device="cpu")
    with pytest.raises(RuntimeError, match="Triton needs CUDA tensors"):
        ThirdOrder(backend=arg).start(torch.zeros(2, 3), 5, "euler")
    assert spies == []  # never a silent fallback to torch


@pytest.mark.parametrize("via_env", [False, True])
def test_triton_missing_is_an_error(monkeypatch, spies, via_env):
    monkeypatch.setattr(ks, "triton", None)
    if via_env:
        monkeypatch.setenv(ks.BACKEND_ENV, "triton")
    arg = None if via_env else "triton"
    with pytest.raises(RuntimeError, match="triton is not installed"):
        ks.resolve_backend(torch.device("cuda"), arg)
    with pytest.raises(RuntimeError, match="triton is not installed"):
        _update(arg)
    assert spies == []
    assert ks.resolve_backend(torch.device("cuda"), "torch") == "torch"


# --------------------------------------------------------------------------------------------
# The skip policy: same masks with either backend on the sampling tests' workloads
# --------------------------------------------------------------------------------------------

SAMPLERS = {"ddim": sample_ddim, "euler": sample_euler, "dpmpp_2m": sample_dpmpp_2m}
SIGMAS = get_sigmas_karras(16, 0.03, 14.6)


def _workload(model_name, dtype):
    """Rows at different scales, so per-sample masks differ."""
    g = gaussian(dtype=dtype)
    x = g.noise(4, float(SIGMAS[0]), seed=7)
    x = (x * torch.tensor([1.0, 0.2, 3.0, 1.0], dtype=dtype).reshape(4, 1, 1, 1)).to(DEVICE)
    if model_name == "gaussian":
        return g.denoiser, x
    model = MLPDenoiser(dim=72, seed=1).to(device=DEVICE, dtype=dtype)
    return model, x


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("criterion, delta", [("reference", 0.05), ("paper", 0.3)])
@pytest.mark.parametrize("per_sample", [True, False])
@pytest.mark.parametrize("model_name, dtype", [("gaussian", torch.float64), ("mlp", torch.float64), ("gaussian", torch.float32)])
def test_policy_masks_equal_across_backends(name, criterion, delta, per_sample, model_name, dtype):
    model, x = _workload(model_name, dtype)
    reports = {}
    for backend in ("torch", "triton"):
        policy = ThirdOrder(delta=delta, max_skips=3, criterion=criterion, per_sample=per_sample, backend=backend)
        out, rep = SAMPLERS[name](model, x, SIGMAS.to(dtype), disable=True, skip=policy)
        reports[backend] = (out, rep)
    (o_ref, r_ref), (o_tri, r_tri) = reports["torch"], reports["triton"]
    assert (~r_ref.computed).any(), "the workload should skip some calls (else the test shows nothing)"
    np.testing.assert_array_equal(r_tri.computed, r_ref.computed)
    np.testing.assert_array_equal(r_tri.capped, r_ref.capped)
    # A sanity check of the recorded values only (check_update bounds them precisely): 64 * RTOL
    # leaves room for the GPU's fused multiply-adds on the small late-step differences.
    rtol = 64 * rtol_of(ks.accumulator_dtype(dtype))
    np.testing.assert_allclose(r_tri.stats, r_ref.stats, rtol=rtol, atol=0, equal_nan=True)
    np.testing.assert_allclose(r_tri.scores, r_ref.scores, rtol=rtol, atol=rtol, equal_nan=True)
    torch.testing.assert_close(o_tri, o_ref, rtol=0, atol=0)  # same masks, same arithmetic outside the kernel


# --------------------------------------------------------------------------------------------
# CUDA only: one device-to-host read per step
# --------------------------------------------------------------------------------------------


@pytest.mark.skipif(DEVICE.type != "cuda", reason="counts CUDA synchronisations (ADAPTIVE_SAMPLING_TEST_DEVICE=cuda)")
@pytest.mark.parametrize("criterion", ["reference", "paper"])
@pytest.mark.parametrize("per_sample", [True, False])
def test_one_device_to_host_read_per_step(criterion, per_sample):
    """The controller's step (history push, kernels, state update) synchronises with the host
    exactly once: the ``.cpu()`` of the flag bytes. Counted with torch's sync debug mode."""
    num_steps, batch = 12, 2
    xs = trajectory(batch, (4, 32, 32), num_steps, torch.float16, 1e-3, seed=2)[::-1]
    policy = ThirdOrder(delta=0.05, criterion=criterion, per_sample=per_sample, backend="triton")

    def sigma(k):  # constant, so the VP scaling keeps the trajectory smooth enough to skip
        return xs[0].new_full((batch,), 2.0)

    warm = policy.start(xs[0], num_steps, "ddim")  # compile every kernel variant first
    for k in range(num_steps):
        warm.decide(k, xs[k], sigma(k))
    controller = policy.start(xs[0], num_steps, "ddim")
    torch.cuda.synchronize()
    counts = []
    previous = torch.cuda.get_sync_debug_mode()
    try:
        torch.cuda.set_sync_debug_mode("warn")
        for k in range(num_steps):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                controller.decide(k, xs[k], sigma(k))
            counts.append(sum("synchroniz" in str(w.message) for w in caught))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            controller.finish(xs[-1], xs[-1].new_full((batch,), 0.0))
        final = sum("synchroniz" in str(w.message) for w in caught)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert counts == [0] + [1] * (num_steps - 1) and final == 1, (counts, final)
    assert (~controller.computed).any()


@pytest.mark.parametrize("fused_max", [0, 1 << 30], ids=["two-launch", "one-launch"])
@pytest.mark.parametrize("criterion", [ks.REFERENCE, ks.PAPER])
@pytest.mark.parametrize("per_sample", [True, False])
def test_both_triton_launch_paths_match_reference(monkeypatch, fused_max, criterion, per_sample):
    """The single-program path (small latents) and the two-launch path both agree with the reference."""
    monkeypatch.setattr(ks, "_FUSED_MAX_ELEMENTS", fused_max)
    rule = ks.SkipRule(criterion=criterion, delta=0.05, max_skips=3, per_sample=per_sample, vp=True)
    batch = 3
    latents = trajectory(batch, (4, 33, 31), rule.history, torch.float32, 1e-2, seed=7)
    sigmas = make_sigmas(batch, rule.history, torch.float32, seed=7)
    state = ks.SkipState.new(latents[0], 12, rule.delta)
    d = mean_diff(latents, sigmas, True)
    if not per_sample:
        d = d.mean().expand(batch)
    state.prev_d.copy_(torch.stack([d * 1.01, d * 0.98], dim=1).float())
    ref, tri = run_both(latents, sigmas, state, 8, rule)
    check_update(latents, sigmas, state, ref, tri, 8, rule)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="compiled kernels are re-launched on CUDA only")
@pytest.mark.parametrize("fused_max", [0, 1 << 30], ids=["two-launch", "one-launch"])
@pytest.mark.parametrize("criterion", [ks.REFERENCE, ks.PAPER])
def test_fast_relaunch_matches_jit_launch(monkeypatch, fused_max, criterion):
    """Re-launching the compiled kernel (skip_stats._launch) gives the same bits as launching
    through JITFunction.run at every step, and is really taken (no silent fallback)."""
    monkeypatch.setattr(ks, "_FUSED_MAX_ELEMENTS", fused_max)
    rule = ks.SkipRule(criterion=criterion, delta=0.05, max_skips=2, per_sample=True)
    xs = trajectory(3, (4, 16, 16), 10, torch.float16, 1e-2, seed=11)[::-1]
    sig = make_sigmas(3, 10, torch.float16, seed=11)[::-1]
    fast = ks.SkipState.new(xs[0], 10, rule.delta)
    slow = clone_state(fast)
    for step in range(1, 11):
        lat = xs[max(0, step - rule.history) : step][::-1]
        sg = sig[max(0, step - rule.history) : step][::-1]
        monkeypatch.setattr(ks, "_fast_launch", False)
        ks.skip_update(lat, sg, slow, step, rule, backend="triton")
        monkeypatch.setattr(ks, "_fast_launch", True)
        ks.skip_update(lat, sg, fast, step, rule, backend="triton")
        for f in ("prev_d", "skip_run", "flags", "stats", "scores"):
            assert torch.equal(getattr(fast, f).nan_to_num(-1), getattr(slow, f).nan_to_num(-1)), (step, f)
    assert ks._fast_launch and fast.launches and not slow.launches
