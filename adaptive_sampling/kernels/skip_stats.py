"""The skip decision: difference norms of the newest latents and the relative threshold, fused.

One function, two implementations side by side (the Liger-Kernel pattern):

* ``_update_torch``: the plain-torch reference, the definition of what the step computes;
* the Triton version, which reads each latent once: ``_fused_kernel`` (one launch, small latents)
  or ``_partials_kernel`` + ``_decide_kernel`` (two launches), built from the shared
  ``@triton.jit`` helpers ``_accumulate`` (the streaming sums) and ``_decide`` (the rule).

and one dispatcher, ``skip_update``, that every caller goes through. One concept in one module
(over 400 lines on purpose): the kernel, its reference and its dispatch stay side by side, so
that a change to one is seen next to the others.

The two stages are also callable apart, for processes that each hold a shard of the latents
(``adaptive_sampling.integrations.distributed``): ``skip_partials`` returns the per-sample sums [4, B] (same
layout on both backends), the caller completes them over the processes (an all-reduce), and
``skip_decide`` applies the rule to the completed sums. ``skip_update`` itself is unchanged by
this: one process keeps the fused single launch (small latents) and the kernel-side reduction.

What one update does, for the latent ``x_i`` entering call ``k = i + 1`` (per sample b, in the
chosen space: each latent times 1 / sqrt(1 + sigma^2) for VP, 1 / (1 + sigma) for the flow latent,
as is for VE):

* ``bad``: whether x_i holds NaN/Inf (then the decision is "compute": never skip on garbage);
* ``d  = mean|x_i - x_{i-1}|`` (reference criterion), ``l2 = ||x_i - x_{i-1}||_2`` and
  ``l3 = ||x_i - 3x_{i-1} + 3x_{i-2} - x_{i-3}||_2`` (paper criterion), as far as the history
  reaches; written to ``stats[i]``;
* for ``k >= warmup``, the decision for call k:
    - reference: skip iff ``|(d_i + d_{i-2}) / 2 - d_{i-1}| <= d_{i-1} * delta``
      (the authors' expression, operation for operation), score = lhs / d_{i-1};
    - paper: skip iff ``l3 < delta * l2``, score = l3 / l2;
  overridden to "compute" after ``max_skips`` consecutive skips, or on non-finite values;
* the state update: the previous d's shift, the consecutive-skip counter advances or resets;
* ``flags[b] = compute | (bad << 1)``: the ONE tensor the host reads per step.

Reductions accumulate in float32 for fp16/bf16/fp32 latents and in float64 for float64
latents. With ``per_sample=False`` the sums are pooled over the batch first (the reference
code's single decision: its mean over every element of every sample).

Why two launches for larger latents: a deterministic reduction across programs needs every
partial sum to exist before the final sum starts. Triton has no grid-wide barrier, and the
alternatives are float atomics (order-dependent, so not deterministic) or a ticket counter
with release/acquire fences across programs, whose correctness rests on subtle memory-model
details. The second launch is one program of B lanes that reduces the [B, C] partials in a
fixed order, decides and updates the state: a few microseconds, and no host round trip.
Small latents (at most ``_FUSED_MAX_ELEMENTS`` per latent over the whole batch: SD-1.5 up to
batch 8, SDXL at batch 1) need no grid: one program streams every sample and decides, in a single launch.

Triton launch layout: ``_partials_kernel`` runs on a (B, C) grid; program (b, c) streams a
contiguous chunk of sample b through every latent of the history once (int64 offsets), keeps
per-lane fp32 (fp64) accumulators and writes four partial sums (|diff|, diff^2, third^2, count of
non-finite values) to ``partials[4, B, C]``. C is chosen so that the grid covers the GPU
(``_PROGRAMS_PER_SM`` programs per SM) without programs smaller than ``_MIN_ELEMENTS_PER_PROGRAM``.
``_decide_kernel`` (one program) reduces the partials tile by tile in a fixed order, then applies
the rule with IEEE-rounded division and square root (``div_rn``/``sqrt_rn`` in float32, which are
what torch computes; Triton's plain ``/`` and ``sqrt`` are approximate on NVIDIA GPUs), so the
two backends differ only in the order of the floating-point sums (and, on a GPU, in fused
multiply-adds the compiler may form in the elementwise differences).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..schedules import vp_scale

try:  # Triton is optional: the torch reference runs everywhere.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

__all__ = [
    "NONE",
    "REFERENCE",
    "PAPER",
    "FLAG_COMPUTE",
    "FLAG_NONFINITE",
    "SkipRule",
    "SkipState",
    "skip_update",
    "skip_partials",
    "skip_decide",
    "PARTIAL_ABS",
    "PARTIAL_SQ",
    "PARTIAL_THIRD",
    "PARTIAL_BAD",
    "resolve_backend",
    "triton_available",
]

# Criterion codes (also the kernel's constexpr values).
NONE, REFERENCE, PAPER = 0, 1, 2
# Bits of the flag byte the host reads.
FLAG_COMPUTE, FLAG_NONFINITE = 1, 2

BACKEND_ENV = "ADAPTIVE_SAMPLING_BACKEND"


@dataclass(frozen=True)
class SkipRule:
    """The static parameters of the decision (one per sampling call).

    ``reference_cap_bug`` reproduces the reference code's ``max_skip_steps`` check, which only
    starts once more than 4 decisions exist (and, for 0, looks at the whole mask), so that masks
    can be compared bit for bit with the authors' code.
    """

    criterion: int = REFERENCE
    delta: float = 0.01
    max_skips: int = 4
    warmup: int = 4
    per_sample: bool = True
    vp: bool = True
    reference_cap_bug: bool = False
    flow: bool = False  # measure the rectified-flow latent x / (1 + sigma) (then vp must be False)

    def __post_init__(self) -> None:
        if self.vp and self.flow:
            raise ValueError("SkipRule: vp and flow are exclusive (one measured space)")

    @property
    def space_code(self) -> int:
        """The kernel's SPACE constexpr: 0 VE (as is), 1 VP, 2 flow."""
        return 2 if self.flow else int(self.vp)

    @property
    def history(self) -> int:
        """How many latents (newest first) the criterion looks at."""
        return {NONE: 1, REFERENCE: 2, PAPER: 4}[self.criterion]


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 latents, float32 for everything narrower."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class SkipState:
    """Per-call device state. Created fresh for every sampling call; nothing is global.

    stats[i, b]  = (d, l2, l3) of latent x_i (NaN where the history does not reach).
    scores[k, b] = the criterion value that decided call k (NaN where no decision was made).
    """

    prev_d: torch.Tensor  # [B, 2] d_{i-1}, d_{i-2} as the criterion sees them
    skip_run: torch.Tensor  # [B] int32 consecutive skipped calls so far
    flags: torch.Tensor  # [B] int8 output
    stats: torch.Tensor  # [N, B, 3]
    scores: torch.Tensor  # [N, B]
    delta: torch.Tensor  # [1] delta in the accumulator dtype (no float32 rounding of the threshold)
    partials: torch.Tensor | None = None  # [4, B, C] Triton scratch (made on the first Triton update)
    launches: dict = field(default_factory=dict)  # compiled Triton kernels of this call (_launch)

    @classmethod
    def new(cls, x: torch.Tensor, num_steps: int, delta: float) -> "SkipState":
        B, dev = x.shape[0], x.device
        acc = accumulator_dtype(x.dtype)
        nan = float("nan")
        return cls(
            prev_d=torch.full((B, 2), nan, dtype=acc, device=dev),
            skip_run=torch.zeros(B, dtype=torch.int32, device=dev),
            flags=torch.ones(B, dtype=torch.int8, device=dev),
            stats=torch.full((num_steps, B, 3), nan, dtype=acc, device=dev),
            scores=torch.full((num_steps, B), nan, dtype=acc, device=dev),
            delta=torch.tensor([delta], dtype=acc, device=dev),
        )


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------


def triton_available() -> bool:
    return triton is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(device: torch.device, backend: str | None = None) -> str:
    """Pick ``"torch"`` or ``"triton"`` for tensors on ``device``.

    ``backend`` (argument) wins over ``$ADAPTIVE_SAMPLING_BACKEND``; both accept
    ``auto | torch | triton``. ``auto`` takes Triton for CUDA tensors when triton imports and the
    torch reference otherwise. Asking for Triton where it cannot run is an error, never a silent
    fallback.
    """
    source = "backend argument"
    if backend is None:
        backend, source = os.environ.get(BACKEND_ENV, "auto"), f"${BACKEND_ENV}"
    backend = backend.strip().lower()
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"{source} must be 'auto', 'torch' or 'triton', got {backend!r}")
    device = torch.device(device)
    if backend == "auto":
        return "triton" if (device.type == "cuda" and triton is not None) else "torch"
    if backend == "triton":
        if triton is None:
            raise RuntimeError(f"{source} asks for 'triton', but triton is not installed (pip install triton)")
        if device.type != "cuda" and not _interpreting():
            raise RuntimeError(
                f"{source} asks for 'triton', but the latents are on {device}; Triton needs CUDA tensors "
                "(or TRITON_INTERPRET=1 set before adaptive_sampling.kernels.skip_stats is imported)"
            )
    return backend


def skip_update(
    latents: Sequence[torch.Tensor],
    sigmas: Sequence[torch.Tensor],
    state: SkipState,
    step: int,
    rule: SkipRule,
    backend: str | None = None,
) -> torch.Tensor:
    """Observe the latent entering call ``step`` and decide that call; returns ``state.flags``.

    latents: newest first, ``latents[0]`` = x_{step-1}, at most ``rule.history`` of them, all of
        one shape [B, ...], dtype and device.
    sigmas:  one [B] tensor per latent, its noise level. With ``rule.vp`` each latent is measured
        as x / sqrt(1 + sigma^2) (computed inside the kernel: no extra launches), else as is.
    step:    1 <= step <= N; ``step = N`` observes the final latent (stats and NaN check only).
    """
    if not 1 <= len(latents) <= 4 or len(sigmas) != len(latents):
        raise ValueError("skip_update needs 1 to 4 latents and one sigma vector per latent")
    # Fast path for callers that resolved the backend once (SkipController): "torch" always runs,
    # and "triton" on CUDA tensors needs no check. Everything else goes through resolve_backend,
    # so "triton" for CPU tensors without the interpreter is still a clear error.
    if backend != "torch" and not (backend == "triton" and triton is not None and latents[0].is_cuda):
        backend = resolve_backend(latents[0].device, backend)
    if backend == "triton":
        _update_triton(latents, sigmas, state, step, rule)
    else:
        _update_torch(latents, sigmas, state, step, rule)
    return state.flags


# Rows of the [4, B] per-sample sums of ``skip_partials`` (the same layout on both backends).
PARTIAL_ABS, PARTIAL_SQ, PARTIAL_THIRD, PARTIAL_BAD = 0, 1, 2, 3


def skip_partials(
    latents: Sequence[torch.Tensor],
    sigmas: Sequence[torch.Tensor],
    state: SkipState,
    rule: SkipRule,
    backend: str | None = None,
) -> torch.Tensor:
    """Stage 1 of ``skip_update`` on its own: the per-sample sums of one update, no decision.

    Returns a new [4, B] tensor in the accumulator dtype (float32; float64 for float64 latents),
    on the latents' device, rows ``PARTIAL_ABS`` = sum |y0 - y1|, ``PARTIAL_SQ`` = sum (y0 - y1)^2,
    ``PARTIAL_THIRD`` = sum (y0 - 3 y1 + 3 y2 - y3)^2 and ``PARTIAL_BAD`` = the number of NaN/Inf
    values in ``latents[0]`` (y_j: latent j in the measured space; rows the history does not reach
    are 0). Both backends give this layout; they differ only in the order of the additions.

    Every row is a sum over elements, so the sums of the shards of a latent add up to the sums of
    the whole latent: this is what ``adaptive_sampling.integrations.distributed`` all-reduces before
    ``skip_decide``. ``state`` lends the Triton path its scratch buffer and launch cache; it is
    not changed otherwise. Triton: ``_partials_kernel`` on its (B, C) grid, then ``_sums_kernel``
    (one program) reduces the chunks in the fixed order ``_decide_kernel`` uses.
    """
    if not 1 <= len(latents) <= 4 or len(sigmas) != len(latents):
        raise ValueError("skip_partials needs 1 to 4 latents and one sigma vector per latent")
    if backend != "torch" and not (backend == "triton" and triton is not None and latents[0].is_cuda):
        backend = resolve_backend(latents[0].device, backend)
    if backend == "triton":
        return _partials_triton(latents, sigmas, state, rule)
    return _sums_torch(latents, sigmas, rule, state.prev_d.dtype, exact_count=True)


def skip_decide(
    sums: torch.Tensor,
    state: SkipState,
    step: int,
    rule: SkipRule,
    n_latents: int,
    numel: int,
    pooled: tuple[torch.Tensor, int] | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Stage 2 of ``skip_update`` on its own: decide call ``step`` from per-sample sums; returns ``state.flags``.

    sums: [4, B] as ``skip_partials`` lays them out, for whole samples (after the all-reduce over
        the shards of a sharded latent).
    n_latents: how many latents the sums were taken over (``len(latents)`` of ``skip_partials``).
    numel: elements of one whole sample (the sum over the shards): ``d = sum|diff| / numel``.
    pooled: batch mode only (``rule.per_sample=False``): ``(totals [4], elements)``, the four sums
        and the element count over every sample of the whole batch (all processes of a
        data-parallel group); ``None`` pools this ``sums``' rows (what ``skip_update`` does).

    Given the same sums, state and step, the result is deterministic (no collective, no atomics),
    so processes that hold the same all-reduced sums take the same decision.
    """
    B = state.flags.shape[0]
    if sums.shape != (4, B) or sums.dtype != state.prev_d.dtype:
        raise ValueError(f"sums must be a [4, {B}] {state.prev_d.dtype} tensor, got {tuple(sums.shape)} {sums.dtype}")
    if not 1 <= n_latents <= 4:
        raise ValueError(f"n_latents must be in [1, 4], got {n_latents}")
    if pooled is not None and (pooled[0].shape != (4,) or pooled[0].dtype != sums.dtype):
        raise ValueError(f"pooled sums must be a [4] {sums.dtype} tensor, got {tuple(pooled[0].shape)} {pooled[0].dtype}")
    if rule.per_sample:
        pooled = None
    if backend != "torch" and not (backend == "triton" and triton is not None and sums.is_cuda):
        backend = resolve_backend(sums.device, backend)
    order = _order(n_latents, rule)
    if backend == "triton":
        _decide_triton(sums, state, step, rule, order, numel, pooled)
    else:
        _decide_torch(sums, state, step, rule, order, numel, pooled)
    return state.flags


def _order(n_latents: int, rule: SkipRule) -> int:
    """Highest difference the update computes: 0 (NaN check only), 1 or 3."""
    if rule.criterion == NONE or n_latents < 2:
        return 0
    return 3 if (rule.criterion == PAPER and n_latents >= 4) else 1


def _deciding(step: int, rule: SkipRule, state: SkipState) -> bool:
    """Call ``step`` is decided by the rule: after warm-up, and never past the last call."""
    return rule.criterion != NONE and rule.warmup <= step < state.scores.shape[0]


def cap_window(step: int, rule: SkipRule) -> tuple[int, bool]:
    """(window, active): ``max_skips`` forces call ``step`` to compute when active and skip_run >= window."""
    if not rule.reference_cap_bug:
        return rule.max_skips, True
    made = step - rule.warmup  # decisions already in the reference code's mask
    if made <= 4:
        return 0, False
    return (min(rule.max_skips, made) if rule.max_skips > 0 else made), True


# --------------------------------------------------------------------------------------------
# Torch reference
# --------------------------------------------------------------------------------------------


def _update_torch(latents, sigmas, state: SkipState, step: int, rule: SkipRule) -> None:
    sums = _sums_torch(latents, sigmas, rule, state.prev_d.dtype, exact_count=False)
    _decide_torch(sums, state, step, rule, _order(len(latents), rule), latents[0][0].numel(), None)


def _space_scale(sigma: torch.Tensor, rule: SkipRule) -> torch.Tensor:
    """Factor from the VE latent into the measured space, per sample: 1 / sqrt(1 + sigma^2) (VP),
    1 / (1 + sigma) (the flow latent: x_flow = x_ve (1 - s) with s = sigma / (1 + sigma)), or 1."""
    if rule.flow:
        return 1 / (1 + sigma)
    return vp_scale(sigma) if rule.vp else torch.ones_like(sigma)


def _sums_torch(latents, sigmas, rule: SkipRule, acc: torch.dtype, exact_count: bool = True) -> torch.Tensor:
    """Stage 1 of the reference: the [4, B] per-sample sums (see ``skip_partials``).

    ``exact_count=False`` (the single-process update) fills row ``PARTIAL_BAD`` with 0/1 (one
    product and one sum: x * 0 is 0 for finite x and NaN for NaN/Inf, and a sum with a NaN is NaN;
    ``isfinite`` takes several elementwise passes, a 10x difference on CPUs); ``True`` counts the
    non-finite values as the Triton kernel does (``skip_partials``: the same layout on both backends).
    """
    B = latents[0].shape[0]
    flat = [x.reshape(B, -1) for x in latents]
    if exact_count:
        bad = (flat[0] - flat[0]).ne(0).sum(dim=1, dtype=acc)  # x - x is NaN for NaN/Inf, and NaN != 0
    else:
        bad = (flat[0] * 0).sum(dim=1, dtype=acc).isnan().to(acc)
    order = _order(len(latents), rule)
    # latent * fp32 scale promotes to fp32 elementwise (exact for fp16/bf16), in one pass
    scales = [_space_scale(g.to(acc), rule) for g in sigmas[: order + 1]]
    x = [f * c[:, None] for f, c in zip(flat[: order + 1], scales)] if order else []
    zeros = torch.zeros(B, dtype=acc, device=bad.device)
    s1 = s2 = s3 = zeros
    if order >= 1:
        diff = x[0] - x[1]
        s1, s2 = diff.abs().sum(dim=1), (diff * diff).sum(dim=1)
    if order >= 3:
        third = x[0] - 3 * x[1] + 3 * x[2] - x[3]
        s3 = (third * third).sum(dim=1)
    return torch.stack([s1, s2, s3, bad])


def _decide_torch(sums: torch.Tensor, state: SkipState, step: int, rule: SkipRule, order: int, n: int, pooled) -> None:
    """Stage 2 of the reference: stats, decision, state update and flag bytes from the [4, B]
    sums of whole samples of ``n`` elements each; ``pooled`` as in ``skip_decide``."""
    B = sums.shape[1]
    s1, s2, s3 = sums[0], sums[1], sums[2]
    bad = sums[3] > 0
    if order >= 1:
        state.stats[step - 1, :, 0] = s1 / n
        state.stats[step - 1, :, 1] = s2.sqrt()
    if order >= 3:
        state.stats[step - 1, :, 2] = s3.sqrt()
    count = n
    bad_rule = bad
    if not rule.per_sample:
        if pooled is None:  # row by row (a [B] sum each), as the single decision has always been pooled
            totals, count = [v.sum() for v in (s1, s2, s3, sums[3])], n * B
        else:
            totals, count = list(pooled[0].unbind(0)), pooled[1]
        s1, s2, s3 = (v.expand(B) for v in totals[:3])
        bad_rule = (totals[3] > 0).expand(B)
    d = s1 / count

    compute = torch.ones(B, dtype=torch.bool, device=bad.device)
    if _deciding(step, rule, state):
        delta = state.delta[0]
        if rule.criterion == REFERENCE:
            d1, d2 = state.prev_d[:, 0], state.prev_d[:, 1]
            lhs = ((d + d2) / 2 - d1).abs()
            ok, score = lhs <= d1 * delta, lhs / d1
            inputs = (d, d1, d2)
        else:
            l3, l2 = s3.sqrt(), s2.sqrt()
            ok, score = l3 < delta * l2, l3 / l2
            inputs = (l3, l2)
        finite = torch.stack([torch.isfinite(v) for v in inputs]).all(dim=0) & ~bad_rule
        run = state.skip_run
        window, active = cap_window(step, rule)
        skip = ok & finite & ~(active & (run >= window))
        state.skip_run.copy_(torch.where(skip, run + 1, torch.zeros_like(run)))
        state.scores[step] = score
        compute = ~skip
    else:
        state.skip_run.zero_()
    if order >= 1:
        state.prev_d[:, 1] = state.prev_d[:, 0]
        state.prev_d[:, 0] = d
    state.flags.copy_(compute.to(torch.int8) | (bad.to(torch.int8) << 1))


# --------------------------------------------------------------------------------------------
# Triton
# --------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _div(a, b, F64: tl.constexpr):
        """IEEE round-to-nearest division (what torch computes); plain ``/`` is approximate in fp32."""
        if F64:
            q = a / b
        else:
            q = tl.div_rn(a, b)
        return q

    @triton.jit
    def _sqrt(a, F64: tl.constexpr):
        """IEEE round-to-nearest square root; ``tl.sqrt`` is approximate in fp32."""
        if F64:
            r = tl.sqrt(a)
        else:
            r = tl.sqrt_rn(a)
        return r

    @triton.jit
    def _scale(sigma_ptr, b, SPACE: tl.constexpr, ACC: tl.constexpr, F64: tl.constexpr):
        """Factor into the measured space for sample b: 1 / sqrt(1 + sigma^2) (VP), 1 / (1 + sigma)
        (flow) or 1 (VE)."""
        s = tl.load(sigma_ptr + b).to(ACC)
        one = s * 0 + 1
        if SPACE == 1:
            one = _div(one, _sqrt(one + s * s, F64), F64)
        elif SPACE == 2:
            one = _div(one, one + s, F64)
        return one

    @triton.jit
    def _accumulate(
        x0_ptr, x1_ptr, x2_ptr, x3_ptr, g0_ptr, g1_ptr, g2_ptr, g3_ptr, b, base, start, stop,
        ORDER: tl.constexpr, SPACE: tl.constexpr, ACC: tl.constexpr, F64: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        """Sums over elements [start, stop) of sample b (row offset ``base``), one pass over the
        latents: sum|y0 - y1|, sum (y0 - y1)^2, sum (y0 - 3 y1 + 3 y2 - y3)^2 and the number of
        non-finite values in x0, where y_j = x_j * scale(sigma_j[b])."""
        s0 = _scale(g0_ptr, b, SPACE, ACC, F64)
        s1 = _scale(g1_ptr, b, SPACE, ACC, F64)
        s2 = _scale(g2_ptr, b, SPACE, ACC, F64)
        s3 = _scale(g3_ptr, b, SPACE, ACC, F64)
        acc_abs = tl.zeros([BLOCK], dtype=ACC)
        acc_sq = tl.zeros([BLOCK], dtype=ACC)
        acc_third = tl.zeros([BLOCK], dtype=ACC)
        acc_bad = tl.zeros([BLOCK], dtype=tl.float32)
        lanes = tl.arange(0, BLOCK)
        for off in range(start, stop, BLOCK):
            idx = off + lanes
            m = idx < stop
            x0 = tl.load(x0_ptr + base + idx, mask=m, other=0.0).to(ACC)
            # x - x is 0 for finite x and NaN for NaN/Inf, and NaN != 0.
            acc_bad += tl.where(m & ((x0 - x0) != 0), 1.0, 0.0)
            if ORDER >= 1:
                y0 = x0 * s0
                y1 = tl.load(x1_ptr + base + idx, mask=m, other=0.0).to(ACC) * s1
                diff = y0 - y1
                acc_abs += tl.abs(diff)
                acc_sq += diff * diff
                if ORDER >= 3:
                    y2 = tl.load(x2_ptr + base + idx, mask=m, other=0.0).to(ACC) * s2
                    y3 = tl.load(x3_ptr + base + idx, mask=m, other=0.0).to(ACC) * s3
                    third = y0 - 3.0 * y1 + 3.0 * y2 - y3
                    acc_third += third * third
        return (tl.sum(acc_abs, axis=0), tl.sum(acc_sq, axis=0), tl.sum(acc_third, axis=0),
                tl.sum(acc_bad, axis=0).to(ACC))  # fmt: skip

    @triton.jit
    def _decide(
        s_abs, s_sq, s_third, s_bad, b, live,
        prev_d_ptr, run_ptr, flags_ptr, stats_ptr, scores_ptr, delta_ptr, pooled_ptr,
        n, n_decide, stats_off, score_off, deciding, window, cap_active,
        ORDER: tl.constexpr, CRITERION: tl.constexpr, PER_SAMPLE: tl.constexpr, POOLED: tl.constexpr,
        ACC: tl.constexpr, F64: tl.constexpr, BLOCK_B: tl.constexpr,
    ):  # fmt: skip
        """Given each sample's four sums (lanes b): stats, decision, state update, flag bytes.

        ``n`` is the element count of one sample (stats), ``n_decide`` that of the decision
        (``n`` per sample, ``n * B`` when the batch is pooled); ``stats_off``/``score_off`` are
        the element offsets of this step's rows in ``stats``/``scores``. ``POOLED`` (batch mode
        only): the batch's four sums are not the lanes' but given at ``pooled_ptr`` (pooled over
        the processes of a data-parallel group, ``adaptive_sampling.integrations.distributed``).
        """
        bad = s_bad > 0
        stats = stats_ptr + stats_off + b * 3
        if ORDER >= 1:
            tl.store(stats + 0, _div(s_abs, tl.zeros([BLOCK_B], dtype=ACC) + n, F64), mask=live)
            tl.store(stats + 1, _sqrt(s_sq, F64), mask=live)
        if ORDER >= 3:
            tl.store(stats + 2, _sqrt(s_third, F64), mask=live)
        bad_rule = bad
        if not PER_SAMPLE:
            if POOLED:
                s_abs = tl.zeros([BLOCK_B], dtype=ACC) + tl.load(pooled_ptr + 0)
                s_sq = tl.zeros([BLOCK_B], dtype=ACC) + tl.load(pooled_ptr + 1)
                s_third = tl.zeros([BLOCK_B], dtype=ACC) + tl.load(pooled_ptr + 2)
                bad_rule = (tl.zeros([BLOCK_B], dtype=ACC) + tl.load(pooled_ptr + 3)) > 0
            else:
                s_abs = tl.zeros([BLOCK_B], dtype=ACC) + tl.sum(tl.where(live, s_abs, 0.0), axis=0)
                s_sq = tl.zeros([BLOCK_B], dtype=ACC) + tl.sum(tl.where(live, s_sq, 0.0), axis=0)
                s_third = tl.zeros([BLOCK_B], dtype=ACC) + tl.sum(tl.where(live, s_third, 0.0), axis=0)
                any_bad = tl.max(tl.where(live & bad, 1, 0), axis=0)
                bad_rule = (tl.zeros([BLOCK_B], dtype=tl.int32) + any_bad) > 0
        d = _div(s_abs, tl.zeros([BLOCK_B], dtype=ACC) + n_decide, F64)
        d1 = tl.load(prev_d_ptr + b * 2 + 0, mask=live, other=0.0)
        d2 = tl.load(prev_d_ptr + b * 2 + 1, mask=live, other=0.0)
        delta = tl.load(delta_ptr)
        run = tl.load(run_ptr + b, mask=live, other=0)
        if CRITERION == 1:
            lhs = tl.abs((d + d2) * 0.5 - d1)  # x * 0.5 and x / 2 are the same correctly rounded value
            ok = lhs <= d1 * delta
            score = _div(lhs, d1, F64)
            finite = ((d - d) == 0) & ((d1 - d1) == 0) & ((d2 - d2) == 0)
        else:
            l3 = _sqrt(s_third, F64)
            l2 = _sqrt(s_sq, F64)
            ok = l3 < delta * l2
            score = _div(l3, l2, F64)
            finite = ((l3 - l3) == 0) & ((l2 - l2) == 0)
        capped = (cap_active != 0) & (run >= window)
        skip = ok & finite & (bad_rule == 0) & (capped == 0) & (deciding != 0)
        tl.store(run_ptr + b, tl.where(skip, run + 1, 0), mask=live)
        tl.store(scores_ptr + score_off + b, score, mask=live & (deciding != 0))
        if ORDER >= 1:
            tl.store(prev_d_ptr + b * 2 + 1, d1, mask=live)
            tl.store(prev_d_ptr + b * 2 + 0, d, mask=live)
        flag = tl.where(skip, 0, 1) + tl.where(bad, 2, 0)
        tl.store(flags_ptr + b, flag.to(tl.int8), mask=live)

    @triton.jit(do_not_specialize=["plane", "num_chunks"])
    def _partials_kernel(
        x0_ptr, x1_ptr, x2_ptr, x3_ptr, g0_ptr, g1_ptr, g2_ptr, g3_ptr, partials_ptr,
        n, chunk, plane, num_chunks,
        ORDER: tl.constexpr, SPACE: tl.constexpr, ACC: tl.constexpr, F64: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        """Stage 1, program (b, c): the four sums over elements [c * chunk, (c + 1) * chunk) of
        sample b, written to partials[q, b, c] (``plane`` = B * C is the stride between the
        quantities). ``n`` keeps Triton's divisibility specialisation, which lets the compiler
        vectorise the loads when rows are 16-element aligned."""
        b = tl.program_id(0)
        c = tl.program_id(1)
        start = c.to(tl.int64) * chunk
        a_abs, a_sq, a_third, a_bad = _accumulate(
            x0_ptr, x1_ptr, x2_ptr, x3_ptr, g0_ptr, g1_ptr, g2_ptr, g3_ptr, b,
            b.to(tl.int64) * n, start, tl.minimum(start + chunk, n), ORDER, SPACE, ACC, F64, BLOCK,
        )  # fmt: skip
        out = partials_ptr + b * num_chunks + c
        tl.store(out, a_abs)
        tl.store(out + plane, a_sq)
        tl.store(out + 2 * plane, a_third)
        tl.store(out + 3 * plane, a_bad)

    @triton.jit(
        do_not_specialize=[
            "B", "n", "n_decide", "plane", "num_chunks", "stats_off", "score_off", "deciding", "window", "cap_active"
        ]
    )  # fmt: skip
    def _decide_kernel(
        partials_ptr, prev_d_ptr, run_ptr, flags_ptr, stats_ptr, scores_ptr, delta_ptr, pooled_ptr,
        B, n, n_decide, plane, num_chunks, stats_off, score_off, deciding, window, cap_active,
        ORDER: tl.constexpr, CRITERION: tl.constexpr, PER_SAMPLE: tl.constexpr, POOLED: tl.constexpr,
        ACC: tl.constexpr, F64: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        """Stage 2, one program, one lane per sample: the [B, C] partials of each quantity are
        summed (``_reduce_partials``), then ``_decide``. With C = 1 (``skip_decide``) the
        partials are the per-sample sums themselves and the reduction adds them to 0 (exact)."""
        b = tl.arange(0, BLOCK_B)
        live = b < B
        s_abs, s_sq, s_third, s_bad = _reduce_partials(partials_ptr, b, live, plane, num_chunks, ACC, BLOCK_B, BLOCK_C)
        _decide(s_abs, s_sq, s_third, s_bad, b, live, prev_d_ptr, run_ptr, flags_ptr, stats_ptr, scores_ptr,
                delta_ptr, pooled_ptr, n, n_decide, stats_off, score_off, deciding, window, cap_active,
                ORDER, CRITERION, PER_SAMPLE, POOLED, ACC, F64, BLOCK_B)  # fmt: skip

    @triton.jit
    def _reduce_partials(
        partials_ptr, b, live, plane, num_chunks, ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr
    ):  # fmt: skip
        """The [B, C] partials of each quantity summed tile by tile ([BLOCK_B, BLOCK_C] loads, a
        tree sum along C per tile, tiles in ascending order: deterministic)."""
        s_abs = tl.zeros([BLOCK_B], dtype=ACC)
        s_sq = tl.zeros([BLOCK_B], dtype=ACC)
        s_third = tl.zeros([BLOCK_B], dtype=ACC)
        s_bad = tl.zeros([BLOCK_B], dtype=ACC)
        cols = tl.arange(0, BLOCK_C)
        for c0 in range(0, num_chunks, BLOCK_C):
            m = live[:, None] & ((c0 + cols) < num_chunks)[None, :]
            p = partials_ptr + b[:, None] * num_chunks + (c0 + cols)[None, :]
            s_abs += tl.sum(tl.load(p, mask=m, other=0.0), axis=1)
            s_sq += tl.sum(tl.load(p + plane, mask=m, other=0.0), axis=1)
            s_third += tl.sum(tl.load(p + 2 * plane, mask=m, other=0.0), axis=1)
            s_bad += tl.sum(tl.load(p + 3 * plane, mask=m, other=0.0), axis=1)
        return s_abs, s_sq, s_third, s_bad

    @triton.jit(do_not_specialize=["B", "plane", "num_chunks"])
    def _sums_kernel(
        partials_ptr, sums_ptr, B, plane, num_chunks,
        ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        """Stage 1b of ``skip_partials``, one program: the [4, B, C] partials reduced to the
        per-sample sums [4, B] exactly as ``_decide_kernel`` reduces them."""
        b = tl.arange(0, BLOCK_B)
        live = b < B
        s_abs, s_sq, s_third, s_bad = _reduce_partials(partials_ptr, b, live, plane, num_chunks, ACC, BLOCK_B, BLOCK_C)
        tl.store(sums_ptr + b, s_abs, mask=live)
        tl.store(sums_ptr + B + b, s_sq, mask=live)
        tl.store(sums_ptr + 2 * B + b, s_third, mask=live)
        tl.store(sums_ptr + 3 * B + b, s_bad, mask=live)

    @triton.jit(do_not_specialize=["B", "n_decide", "stats_off", "score_off", "deciding", "window", "cap_active"])
    def _fused_kernel(
        x0_ptr, x1_ptr, x2_ptr, x3_ptr, g0_ptr, g1_ptr, g2_ptr, g3_ptr,
        prev_d_ptr, run_ptr, flags_ptr, stats_ptr, scores_ptr, delta_ptr, pooled_ptr,
        B, n, n_decide, stats_off, score_off, deciding, window, cap_active,
        ORDER: tl.constexpr, CRITERION: tl.constexpr, PER_SAMPLE: tl.constexpr, SPACE: tl.constexpr,
        ACC: tl.constexpr, F64: tl.constexpr, BLOCK: tl.constexpr, BLOCK_B: tl.constexpr,
    ):  # fmt: skip
        """Both stages in ONE program, for small latents (SD-1.5 up to batch 8): the samples are
        streamed one after another, so there is no second launch and no partials buffer."""
        lanes = tl.arange(0, BLOCK_B)
        live = lanes < B
        s_abs = tl.zeros([BLOCK_B], dtype=ACC)
        s_sq = tl.zeros([BLOCK_B], dtype=ACC)
        s_third = tl.zeros([BLOCK_B], dtype=ACC)
        s_bad = tl.zeros([BLOCK_B], dtype=ACC)
        for b in range(0, B):
            # b * n fits in int32 here: this path only runs for B * n <= _FUSED_MAX_ELEMENTS
            a_abs, a_sq, a_third, a_bad = _accumulate(
                x0_ptr, x1_ptr, x2_ptr, x3_ptr, g0_ptr, g1_ptr, g2_ptr, g3_ptr, b, b * n, 0, n, ORDER, SPACE, ACC, F64, BLOCK
            )  # fmt: skip
            here = lanes == b
            s_abs = tl.where(here, a_abs, s_abs)
            s_sq = tl.where(here, a_sq, s_sq)
            s_third = tl.where(here, a_third, s_third)
            s_bad = tl.where(here, a_bad, s_bad)
        _decide(s_abs, s_sq, s_third, s_bad, lanes, live, prev_d_ptr, run_ptr, flags_ptr, stats_ptr, scores_ptr,
                delta_ptr, pooled_ptr, n, n_decide, stats_off, score_off, deciding, window, cap_active,
                ORDER, CRITERION, PER_SAMPLE, False, ACC, F64, BLOCK_B)  # fmt: skip


# Launch geometry. Module-level so that bench/bench_skip_kernel.py can sweep them on a GPU.
_BLOCK = 2048  # elements per loop iteration of a partials program
# 8 programs of 8 warps per SM: the best of the geometries swept on an H200 for a 268 MB history
# (bench/results/gpu_h200_*.md); 4 x 4 streamed about 5 points of peak bandwidth lower.
_NUM_WARPS = 8  # warps per partials program (8 elements per thread and latent per iteration)
_PROGRAMS_PER_SM = 8  # partials programs per SM the grid aims for
_MIN_ELEMENTS_PER_PROGRAM = 2 * _BLOCK  # smaller chunks would be all launch and no streaming
_DECIDE_TILE = 2048  # elements per [BLOCK_B, BLOCK_C] tile of the decide kernel
# Up to this many elements per latent (all samples), one program streams everything and decides:
# one launch instead of two. Beyond it the single program's serial loop costs more than a launch.
# Measured on an H200 (bench/results/): one program was faster for SD-1.5 at batch 8 and SDXL at
# batch 1 (131k and 65k elements) and slower for SDXL at batch 8 and video (524k, 262k and more).
_FUSED_MAX_ELEMENTS = 1 << 17
_FUSED_BLOCK = 4096
_FUSED_NUM_WARPS = 8


def _num_chunks(batch: int, n: int, device: torch.device) -> int:
    """Chunks per sample: enough programs to cover the GPU, none smaller than the minimum.

    (On the CPU interpreter, where programs run one after another, 4 "SMs" keep the grid small.)
    """
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    by_size = max(1, -(-n // _MIN_ELEMENTS_PER_PROGRAM))
    by_occupancy = max(1, -(-_PROGRAMS_PER_SM * sms // batch))
    return min(by_size, by_occupancy)


_fast_launch = True  # cleared (with a warning) if this Triton cannot re-launch a compiled kernel


def _launch(state: SkipState, kernel, grid: tuple, args: dict, options: dict, dynamic: tuple, order: int) -> None:
    """Launch ``kernel`` with ``args`` (every parameter, by name), re-using the compiled kernel of
    an earlier step of this call when that is safe.

    ``JITFunction.run`` recomputes the specialisation of every argument at every launch, which is
    most of its host cost (tens of microseconds against a kernel of a few). Within one sampling
    call the skip kernels are launched with the same dtypes, sizes and state buffers at every step;
    only ``dynamic`` (the latents and sigmas of this step) change, so the compiled kernel stays
    valid while their dtypes and 16-byte alignment (the pointer specialisation) stay the same.
    Those, with ``order`` (the one constexpr that changes between steps, as the history fills),
    are the cache key; any mismatch takes the normal path.
    """
    global _fast_launch
    key = (id(kernel), grid, order, tuple((t.dtype, t.data_ptr() % 16 == 0) for t in dynamic))
    compiled = state.launches.get(key) if _fast_launch else None
    if compiled is not None:
        try:
            compiled[(grid + (1, 1))[:3]](*[args[name] for name in kernel.arg_names])  # the runner wants 3-D grids
            return
        except (TypeError, ValueError, AttributeError, IndexError) as e:  # a Triton whose launcher API differs
            _fast_launch = False
            warnings.warn(f"re-launching compiled Triton kernels failed ({e!r}); using the normal launch path", stacklevel=2)
    compiled = kernel[grid](**args, **options)
    if _fast_launch and grid is not None and hasattr(compiled, "__getitem__") and hasattr(kernel, "arg_names"):
        state.launches[key] = compiled


def _triton_inputs(latents, sigmas) -> tuple:
    """Checked latents and sigmas, padded to the kernels' four slots: (dynamic tensors, their arguments)."""
    x0 = latents[0]
    for x in latents:
        if not x.is_contiguous():
            raise ValueError("the Triton skip kernel needs contiguous latents")
        if x.shape != x0.shape:
            raise ValueError(f"all latents must have one shape, got {tuple(x0.shape)} and {tuple(x.shape)}")
    lat = list(latents) + [x0] * (4 - len(latents))
    sig = [g if g.is_contiguous() else g.contiguous() for g in sigmas]
    sig += [sig[0]] * (4 - len(sig))
    dynamic = (*lat, *sig)
    return dynamic, dict(zip(("x0_ptr", "x1_ptr", "x2_ptr", "x3_ptr", "g0_ptr", "g1_ptr", "g2_ptr", "g3_ptr"), dynamic))


def _stage1_triton(latents, state: SkipState, inputs: dict, dynamic: tuple, order: int, rule: SkipRule) -> torch.Tensor:
    """Launch ``_partials_kernel`` on its (B, C) grid; returns the [4, B, C] partials (``state.partials``)."""
    x0 = latents[0]
    B = x0.shape[0]
    n = x0.numel() // B
    acc = state.prev_d.dtype
    f64 = acc == torch.float64
    partials = state.partials
    if partials is None or partials.shape[1] != B:
        partials = state.partials = torch.empty((4, B, _num_chunks(B, n, x0.device)), dtype=acc, device=x0.device)
    C = partials.shape[2]
    chunk = -(-n // C)
    chunk = -(-chunk // _BLOCK) * _BLOCK
    stage1 = dict(**inputs, partials_ptr=partials, n=n, chunk=chunk, plane=B * C, num_chunks=C,
                  ORDER=order, SPACE=rule.space_code, ACC=tl.float64 if f64 else tl.float32, F64=f64, BLOCK=_BLOCK)  # fmt: skip
    _launch(state, _partials_kernel, (B, C), stage1, dict(num_warps=_NUM_WARPS), dynamic, order)
    return partials


def _decide_block_c(block_b: int) -> int:
    return max(1, min(64, _DECIDE_TILE // block_b))


def _update_triton(latents, sigmas, state: SkipState, step: int, rule: SkipRule) -> None:
    """Launch the kernels (one for small latents, two otherwise). Host work: a few integers per step."""
    x0 = latents[0]
    B = x0.shape[0]
    n = x0.numel() // B
    acc = state.prev_d.dtype
    dynamic, inputs = _triton_inputs(latents, sigmas)
    order = _order(len(latents), rule)
    f64 = acc == torch.float64
    tl_acc = tl.float64 if f64 else tl.float32
    N = state.scores.shape[0]
    window, active = cap_window(step, rule)
    block_b = max(16, triton.next_power_of_2(B))
    decision = (B, n, n if rule.per_sample else n * B)  # samples, elements per sample, elements per decision
    offsets = ((step - 1) * B * 3, min(step, N - 1) * B, int(_deciding(step, rule, state)), window, int(active))
    # pooled_ptr: unused (POOLED=False: a batch-wide decision pools the lanes inside the kernel)
    state_ptrs = (state.prev_d, state.skip_run, state.flags, state.stats, state.scores, state.delta, state.delta)
    constants = dict(ORDER=order, CRITERION=max(rule.criterion, 1), PER_SAMPLE=rule.per_sample, ACC=tl_acc, F64=f64)
    state_names = ("prev_d_ptr", "run_ptr", "flags_ptr", "stats_ptr", "scores_ptr", "delta_ptr", "pooled_ptr")
    state_args = dict(zip(state_names, state_ptrs))
    step_args = dict(zip(("stats_off", "score_off", "deciding", "window", "cap_active"), offsets))
    sizes = dict(zip(("B", "n", "n_decide"), decision))
    if B * n <= _FUSED_MAX_ELEMENTS:
        args = dict(**inputs, **state_args, **sizes, **step_args, **constants, SPACE=rule.space_code, BLOCK=_FUSED_BLOCK,
                    BLOCK_B=block_b)  # fmt: skip
        _launch(state, _fused_kernel, (1,), args, dict(num_warps=_FUSED_NUM_WARPS), dynamic, order)
        return
    partials = _stage1_triton(latents, state, inputs, dynamic, order, rule)
    C = partials.shape[2]
    stage2 = dict(partials_ptr=partials, **state_args, **sizes, plane=B * C, num_chunks=C, **step_args, **constants,
                  POOLED=False, BLOCK_B=block_b, BLOCK_C=_decide_block_c(block_b))  # fmt: skip
    _launch(state, _decide_kernel, (1,), stage2, dict(num_warps=4), (), order)


def _partials_triton(latents, sigmas, state: SkipState, rule: SkipRule) -> torch.Tensor:
    """``skip_partials`` on Triton: the partials kernel, then ``_sums_kernel`` to [4, B]."""
    dynamic, inputs = _triton_inputs(latents, sigmas)
    order = _order(len(latents), rule)
    partials = _stage1_triton(latents, state, inputs, dynamic, order, rule)
    _, B, C = partials.shape
    sums = torch.empty((4, B), dtype=partials.dtype, device=partials.device)
    block_b = max(16, triton.next_power_of_2(B))
    args = dict(partials_ptr=partials, sums_ptr=sums, B=B, plane=B * C, num_chunks=C,
                ACC=tl.float64 if partials.dtype == torch.float64 else tl.float32,
                BLOCK_B=block_b, BLOCK_C=_decide_block_c(block_b))  # fmt: skip
    _launch(state, _sums_kernel, (1,), args, dict(num_warps=4), (sums,), order)
    return sums


def _decide_triton(sums: torch.Tensor, state: SkipState, step: int, rule: SkipRule, order: int, n: int, pooled) -> None:
    """``skip_decide`` on Triton: ``_decide_kernel`` over the sums as [4, B, 1] partials (C = 1)."""
    B = sums.shape[1]
    sums = sums.contiguous()
    f64 = state.prev_d.dtype == torch.float64
    N = state.scores.shape[0]
    window, active = cap_window(step, rule)
    block_b = max(16, triton.next_power_of_2(B))
    given = pooled is not None
    totals = pooled[0].contiguous() if given else state.delta  # pooled_ptr is only read when POOLED
    n_decide = n if rule.per_sample else (int(pooled[1]) if given else n * B)
    args = dict(
        partials_ptr=sums, prev_d_ptr=state.prev_d, run_ptr=state.skip_run, flags_ptr=state.flags,
        stats_ptr=state.stats, scores_ptr=state.scores, delta_ptr=state.delta, pooled_ptr=totals,
        B=B, n=n, n_decide=n_decide, plane=B, num_chunks=1,
        stats_off=(step - 1) * B * 3, score_off=min(step, N - 1) * B, deciding=int(_deciding(step, rule, state)),
        window=window, cap_active=int(active),
        ORDER=order, CRITERION=max(rule.criterion, 1), PER_SAMPLE=rule.per_sample, POOLED=given,
        ACC=tl.float64 if f64 else tl.float32, F64=f64, BLOCK_B=block_b, BLOCK_C=_decide_block_c(block_b),
    )  # fmt: skip
    # the cache key tells this launch from _update_triton's (sums and totals are dynamic here) and
    # from the other POOLED variant
    _launch(state, _decide_kernel, (1,), args, dict(num_warps=4), (sums, totals), (order, given))
