"""The skip decision: difference norms of the newest latents and the relative threshold, fused.

One function, two implementations side by side (the Liger-Kernel pattern):

* ``_update_torch``: the plain-torch reference, the definition of what the step computes;
* ``_partials_kernel`` + ``_decide_kernel``: the Triton version, which reads each latent once.

and one dispatcher, ``skip_update``, that every caller goes through.

What one update does, for the latent ``x_i`` entering call ``k = i + 1`` (per sample b, in the
chosen space, i.e. each latent multiplied by its ``scale``):

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

Why two launches on the Triton path: a deterministic reduction across programs needs every
partial sum to exist before the final sum starts. Triton has no grid-wide barrier, and the
alternatives are float atomics (order-dependent, so not deterministic) or a ticket counter
with release/acquire fences across programs, whose correctness rests on subtle memory-model
details. The second launch is one program of B lanes that reduces the [B, C] partials in a
fixed order, decides and updates the state: a few microseconds, and no host round trip.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch

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
    partials: torch.Tensor | None = None  # [B, C, 4] Triton scratch

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
    scales: Sequence[torch.Tensor],
    state: SkipState,
    step: int,
    rule: SkipRule,
    backend: str | None = None,
) -> torch.Tensor:
    """Observe the latent entering call ``step`` and decide that call; returns ``state.flags``.

    latents: newest first, ``latents[0]`` = x_{step-1}, at most ``rule.history`` of them, all of
        one shape [B, ...], dtype and device.
    scales:  one [B] tensor per latent, multiplying it into the measured space (1 for VE,
        1/sqrt(1+sigma^2) for VP).
    step:    1 <= step <= N; ``step = N`` observes the final latent (stats and NaN check only).
    """
    if not 1 <= len(latents) <= 4 or len(scales) != len(latents):
        raise ValueError("skip_update needs 1 to 4 latents and one scale per latent")
    if backend is None or backend not in ("torch", "triton"):
        backend = resolve_backend(latents[0].device, backend)
    if backend == "triton":
        _update_triton(latents, scales, state, step, rule)
    else:
        _update_torch(latents, scales, state, step, rule)
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


def _update_torch(latents, scales, state: SkipState, step: int, rule: SkipRule) -> None:
    acc = state.prev_d.dtype
    B = latents[0].shape[0]
    flat = [x.reshape(B, -1) for x in latents]
    n = flat[0].shape[1]
    bad = ~torch.isfinite(flat[0]).all(dim=1)
    order = _order(len(latents), rule)
    x = [f.to(acc) * s.to(acc)[:, None] for f, s in zip(flat[: order + 1], scales[: order + 1])] if order else []
    zeros = torch.zeros(B, dtype=acc, device=bad.device)
    s1 = s2 = s3 = zeros
    if order >= 1:
        diff = x[0] - x[1]
        s1, s2 = diff.abs().sum(dim=1), (diff * diff).sum(dim=1)
        state.stats[step - 1, :, 0] = s1 / n
        state.stats[step - 1, :, 1] = s2.sqrt()
    if order >= 3:
        third = x[0] - 3 * x[1] + 3 * x[2] - x[3]
        s3 = (third * third).sum(dim=1)
        state.stats[step - 1, :, 2] = s3.sqrt()
    count = n
    bad_rule = bad
    if not rule.per_sample:
        s1, s2, s3 = (v.sum().expand(B) for v in (s1, s2, s3))
        count, bad_rule = n * B, bad.any().expand(B)
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
    def _partials_kernel(
        x0_ptr, x1_ptr, x2_ptr, x3_ptr,
        c0_ptr, c1_ptr, c2_ptr, c3_ptr,
        partials_ptr,
        n, chunk, num_chunks,
        ORDER: tl.constexpr,
        ACC: tl.constexpr,
        BLOCK: tl.constexpr,
    ):  # fmt: skip
        """Program (b, c): sums over elements [c * chunk, (c + 1) * chunk) of sample b."""
        b = tl.program_id(0)
        c = tl.program_id(1)
        base = b.to(tl.int64) * n
        start = c.to(tl.int64) * chunk
        stop = tl.minimum(start + chunk, n)
        s0 = tl.load(c0_ptr + b).to(ACC)
        s1 = tl.load(c1_ptr + b).to(ACC)
        s2 = tl.load(c2_ptr + b).to(ACC)
        s3 = tl.load(c3_ptr + b).to(ACC)
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
        out = partials_ptr + (b * num_chunks + c) * 4
        tl.store(out + 0, tl.sum(acc_abs, axis=0))
        tl.store(out + 1, tl.sum(acc_sq, axis=0))
        tl.store(out + 2, tl.sum(acc_third, axis=0))
        tl.store(out + 3, tl.sum(acc_bad, axis=0).to(ACC))

    @triton.jit
    def _decide_kernel(
        partials_ptr, prev_d_ptr, run_ptr, flags_ptr, stats_ptr, score_ptr, delta_ptr,
        B, n, num_chunks, deciding, capped_window, cap_active,
        ORDER: tl.constexpr,
        CRITERION: tl.constexpr,
        PER_SAMPLE: tl.constexpr,
        ACC: tl.constexpr,
        BLOCK_B: tl.constexpr,
    ):  # fmt: skip
        """One program, one lane per sample: fixed-order final sums, decision, state update."""
        b = tl.arange(0, BLOCK_B)
        live = b < B
        s_abs = tl.zeros([BLOCK_B], dtype=ACC)
        s_sq = tl.zeros([BLOCK_B], dtype=ACC)
        s_third = tl.zeros([BLOCK_B], dtype=ACC)
        s_bad = tl.zeros([BLOCK_B], dtype=ACC)
        for c in range(0, num_chunks):
            p = partials_ptr + (b * num_chunks + c) * 4
            s_abs += tl.load(p + 0, mask=live, other=0.0)
            s_sq += tl.load(p + 1, mask=live, other=0.0)
            s_third += tl.load(p + 2, mask=live, other=0.0)
            s_bad += tl.load(p + 3, mask=live, other=0.0)
        bad = s_bad > 0
        count = tl.zeros([BLOCK_B], dtype=ACC) + n
        if ORDER >= 1:
            tl.store(stats_ptr + b * 3 + 0, s_abs / count, mask=live)
            tl.store(stats_ptr + b * 3 + 1, tl.sqrt(s_sq), mask=live)
        if ORDER >= 3:
            tl.store(stats_ptr + b * 3 + 2, tl.sqrt(s_third), mask=live)
        bad_rule = bad
        if not PER_SAMPLE:
            s_abs = tl.zeros([BLOCK_B], dtype=ACC) + tl.sum(s_abs, axis=0)
            s_sq = tl.zeros([BLOCK_B], dtype=ACC) + tl.sum(s_sq, axis=0)
            s_third = tl.zeros([BLOCK_B], dtype=ACC) + tl.sum(s_third, axis=0)
            any_bad = tl.max(tl.where(live & bad, 1, 0), axis=0)
            bad_rule = (tl.zeros([BLOCK_B], dtype=tl.int32) + any_bad) > 0
            count = count * B
        d = s_abs / count
        d1 = tl.load(prev_d_ptr + b * 2 + 0, mask=live, other=0.0)
        d2 = tl.load(prev_d_ptr + b * 2 + 1, mask=live, other=0.0)
        delta = tl.load(delta_ptr)
        run = tl.load(run_ptr + b, mask=live, other=0)
        if CRITERION == 1:
            lhs = tl.abs((d + d2) / 2 - d1)
            ok = lhs <= d1 * delta
            score = lhs / d1
            finite = ((d - d) == 0) & ((d1 - d1) == 0) & ((d2 - d2) == 0)
        else:
            l3 = tl.sqrt(s_third)
            l2 = tl.sqrt(s_sq)
            ok = l3 < delta * l2
            score = l3 / l2
            finite = ((l3 - l3) == 0) & ((l2 - l2) == 0)
        capped = (cap_active != 0) & (run >= capped_window)
        skip = ok & finite & (bad_rule == 0) & (capped == 0) & (deciding != 0)
        new_run = tl.where(skip, run + 1, 0)
        tl.store(run_ptr + b, new_run, mask=live)
        tl.store(score_ptr + b, score, mask=live & (deciding != 0))
        if ORDER >= 1:
            tl.store(prev_d_ptr + b * 2 + 1, d1, mask=live)
            tl.store(prev_d_ptr + b * 2 + 0, d, mask=live)
        flag = tl.where(skip, 0, 1) + tl.where(bad, 2, 0)
        tl.store(flags_ptr + b, flag.to(tl.int8), mask=live)


_BLOCK = 2048
_MIN_ELEMENTS_PER_PROGRAM = 4 * _BLOCK


def _num_chunks(batch: int, n: int, device: torch.device) -> int:
    """Split each sample so the grid covers the GPU (about 4 programs per SM) without tiny programs."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    by_size = max(1, -(-n // _MIN_ELEMENTS_PER_PROGRAM))
    by_occupancy = max(1, -(-4 * sms // batch))
    return min(by_size, by_occupancy)


_TL_ACC = {torch.float32: "fp32", torch.float64: "fp64"}


def _update_triton(latents, scales, state: SkipState, step: int, rule: SkipRule) -> None:
    x0 = latents[0]
    B = x0.shape[0]
    n = x0.numel() // B
    order = _order(len(latents), rule)
    for x in latents:
        if not x.is_contiguous():
            raise ValueError("the Triton skip kernel needs contiguous latents")
    if state.partials is None:
        C = _num_chunks(B, n, x0.device)
        state.partials = torch.empty((B, C, 4), dtype=state.prev_d.dtype, device=x0.device)
    C = state.partials.shape[1]
    chunk = -(-n // C)
    chunk = -(-chunk // _BLOCK) * _BLOCK
    lat = list(latents) + [x0] * (4 - len(latents))
    sc = [s.to(state.prev_d.dtype) for s in scales] + [scales[0]] * (4 - len(scales))
    acc = tl.float64 if state.prev_d.dtype == torch.float64 else tl.float32
    _partials_kernel[(B, C)](
        *lat, *sc, state.partials, n, chunk, C, ORDER=order, ACC=acc, BLOCK=_BLOCK, num_warps=4
    )
    deciding = _deciding(step, rule, state)
    window, active = cap_window(step, rule)
    score_row = state.scores[min(step, state.scores.shape[0] - 1)]
    stats_row = state.stats[step - 1]
    _decide_kernel[(1,)](
        state.partials, state.prev_d, state.skip_run, state.flags, stats_row, score_row, state.delta,
        B, n, C, int(deciding), window, int(active),
        ORDER=order,
        CRITERION=max(rule.criterion, 1),
        PER_SAMPLE=rule.per_sample,
        ACC=acc,
        BLOCK_B=triton.next_power_of_2(B),
        num_warps=1,
    )  # fmt: skip

