"""Microbenchmarks of one skip step: the fused update against the reference code's unfused ops.

Not part of the test suite (``testpaths = tests``); run with::

    python -m pytest bench/bench_skip_kernel.py --benchmark-enable            # CPU or GPU
    bash bench/gpu_check.sh                                                   # the GPU run

One benchmark group per workload: ``{size}-b{batch}-{criterion}`` with sizes SD-1.5 latents
(4x64x64), SDXL (4x128x128) and video (16 frames x 4x64x64), batch 1 and 8, both criteria;
latents are float16 on a GPU and float32 on the CPU. Variants in a group:

* ``fused``: ``skip_update`` with the backend ``auto`` picks (Triton on CUDA, the torch
  reference on the CPU) plus the ``.cpu()`` of the flags: what a sampler step costs in the
  decision, the one device-to-host read included.
* ``controller``: the whole policy step, ``SkipController.decide`` (history ring, the fused
  update with its in-kernel VP scaling, the host read, the mask bookkeeping).
* ``unfused``: the step written the way the authors' pipeline computes it (``UnfusedReference``):
  separate torch ops in the latent dtype, Python arithmetic on 0-dim tensors, ``bool()`` of a
  device scalar for the decision, a Python list as history.
* CUDA only: ``triton`` (``skip_update(backend="triton")`` followed by a synchronize, no host
  read) and ``compiled`` (``torch.compile`` of the reference ``_update_torch``, fullgraph, plus
  the host read; a failing compile fails that benchmark visibly).

Plus, on CUDA only, the ``large-268MB-paper`` group: 4 float16 latents of 67 MB each (the paper
criterion reads all four: 268 MB per step), with a small sweep of the Triton launch geometry.

Reported in ``extra_info`` (and by bench/summarize.py): bytes of latents read per step (the
history the criterion needs; temporaries of the unfused version are not counted, so its GB/s is
an effective figure), wall time (pytest-benchmark's median) and GB/s from it; on CUDA also the
device time (CUDA events around each step, L2 flushed before each; it includes the step's own
host synchronisation) with GB/s and the fraction of the device's peak memory bandwidth, for the
kernel-only ``triton`` variants the streaming time (20 steps launched back to back between two
events, so the GPU never waits for the host) with its GB/s and % of peak, and the number of
device-to-host synchronisations per step (torch's sync debug mode).

Environment knobs: ``BENCH_DEVICE`` (default: cuda if available), ``BENCH_BUDGET_S`` (skip the
remaining benchmarks once this many seconds have passed), ``BENCH_COMPILE_BUDGET_S`` (skip the
remaining ``compiled`` variants once torch.compile has taken this long in total), ``BENCH_JSONL``
(append each finished benchmark's stats and extra_info to this file as one JSON line).
"""

from __future__ import annotations

import json
import os
import statistics
import time
import warnings
from dataclasses import dataclass

import pytest
import torch

from adaptive_sampling import ThirdOrder
from adaptive_sampling.kernels import skip_stats as ks

DEVICE = torch.device(os.environ.get("BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
CUDA = DEVICE.type == "cuda"
DTYPE = torch.float16 if CUDA else torch.float32
SIZES = {"sd15": (4, 64, 64), "sdxl": (4, 128, 128), "video": (16, 4, 64, 64)}
BATCHES = (1, 8)
CRITERIA = ("reference", "paper")
LARGE = (8, 64, 4, 128, 128)  # float16: 67 MB per latent; the paper criterion reads four: 268 MB
NUM_STEPS, STEP, DELTA, MAX_SKIPS = 50, 10, 0.01, 4

BUDGET_S = float(os.environ.get("BENCH_BUDGET_S", "inf"))
COMPILE_BUDGET_S = float(os.environ.get("BENCH_COMPILE_BUDGET_S", "inf"))
_T0 = time.monotonic()
_COMPILE_SPENT = [0.0]

# Peak DRAM bandwidth by device name (vendor data sheets), checked in order.
PEAK_GBPS = [
    ("H200", 4800.0),
    ("H100 PCIe", 2000.0),
    ("H100 NVL", 3900.0),
    ("H100", 3350.0),  # SXM5 (the "H100 80GB HBM3" name)
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),
]


def peak_bandwidth() -> tuple[float | None, str]:
    """(GB/s, where the number comes from) for the current CUDA device."""
    if not CUDA:
        return None, "n/a (CPU)"
    props = torch.cuda.get_device_properties(DEVICE)
    for key, gbps in PEAK_GBPS:
        if key in props.name:
            return gbps, f"data sheet ({key})"
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:  # double data rate: 2 transfers per clock
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9, "computed: 2 x memory_clock_rate x memory_bus_width / 8"
    return None, "unknown"


# --------------------------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------------------------


@dataclass
class Workload:
    """Five distinct latents (newest first) on a smooth trajectory, and their noise levels.

    Five so that a rotating history never reads the same buffer twice in one step (which would
    turn DRAM reads into cache hits).
    """

    pool: list[torch.Tensor]
    sigmas: list[torch.Tensor]

    def bytes_per_step(self, criterion: str) -> int:
        x = self.pool[0]
        return history(criterion) * x.numel() * x.element_size()


def history(criterion: str) -> int:
    return 2 if criterion == "reference" else 4


_WORKLOADS: dict[tuple, Workload] = {}


def workload(shape: tuple[int, ...]) -> Workload:
    if shape not in _WORKLOADS:
        torch.manual_seed(0)
        base = torch.randn(shape, device=DEVICE, dtype=torch.float32)
        v = torch.randn(shape, device=DEVICE, dtype=torch.float32) * 0.1
        pool = [(base + (5 - k) * v).to(DTYPE) for k in range(5)]
        del base, v
        acc = ks.accumulator_dtype(DTYPE)
        sigmas = [torch.full((shape[0],), 2.0 + k, device=DEVICE, dtype=acc) for k in range(5)]
        _WORKLOADS[shape] = Workload(pool, sigmas)
    return _WORKLOADS[shape]


def rule_for(criterion: str) -> ks.SkipRule:
    return ks.SkipRule(criterion=ks.REFERENCE if criterion == "reference" else ks.PAPER, delta=DELTA, max_skips=MAX_SKIPS)


# --------------------------------------------------------------------------------------------
# The unfused baseline
# --------------------------------------------------------------------------------------------


class UnfusedReference:
    """One step the way the authors' pipeline computes it (``estimate_skipping`` in
    ``sparse_pipeline.py``): separate torch ops in the latent dtype, Python arithmetic on 0-dim
    device tensors, ``bool()`` of a device scalar (the host sync), Python lists as history.

    A benchmark baseline only (it is not the library's rule: one decision per batch, the
    reference's cap check, no VP scaling since the pipelines hold VP latents already). The
    ``paper`` variant is the paper's formula in the same style. The lists are trimmed to their
    last 8 entries so that a long benchmark loop does not grow them without bound; the
    reference keeps them for the whole call, which costs nothing per step.
    """

    def __init__(self, criterion: str, delta: float, max_skip_steps: int, pool: list[torch.Tensor]):
        self.criterion, self.delta, self.max_skip_steps = criterion, delta, max_skip_steps
        # The observed sequence is pool[t % L] for t = -h, ..., -1, 0, 1, ... (L = h + 1): any L
        # consecutive latents are distinct buffers, so no step reads one buffer twice.
        self.pool = pool[: history(criterion) + 1]
        self.prev_latents = list(self.pool[1:])  # t = -h .. -1, oldest first (the reference appends)
        d = (self.prev_latents[-1] - self.prev_latents[-2]).abs().mean()
        self.diff_list = [d, d]
        self.mask: list[bool] = [True] * 4
        self.calls = 0

    def step(self) -> bool:
        """Observe the next latent of the cycle; True = call the model next."""
        latent = self.pool[self.calls % len(self.pool)]
        self.calls += 1
        if self.criterion == "reference":
            prev_diff, prev_prev_diff = self.diff_list[-1], self.diff_list[-2]
            cur_diff = (latent - self.prev_latents[-1]).abs().mean()
            self.diff_list.append(cur_diff)
            if len(self.mask) > 4 and not any(self.mask[-self.max_skip_steps :]):
                compute = True
            else:
                compute = not (abs((cur_diff + prev_prev_diff) / 2 - prev_diff) <= prev_diff * self.delta)
        else:
            x1, x2, x3 = self.prev_latents[-1], self.prev_latents[-2], self.prev_latents[-3]
            third_norm = (latent - 3 * x1 + 3 * x2 - x3).norm()
            first_norm = (latent - x1).norm()
            if len(self.mask) > 4 and not any(self.mask[-self.max_skip_steps :]):
                compute = True
            else:
                compute = bool(third_norm >= self.delta * first_norm)
        self.mask.append(compute)
        self.prev_latents.append(latent)
        del self.prev_latents[:-8], self.diff_list[:-8], self.mask[:-8]
        return compute


# --------------------------------------------------------------------------------------------
# Variants: each returns (step, core) where core is what one sampler step does and step is core
# plus a synchronize when core has no host read of its own (so wall times mean something).
# --------------------------------------------------------------------------------------------


def fused_variant(w: Workload, criterion: str, backend: str, host_read: bool = True):
    """``skip_update`` on ``backend``; with ``host_read`` the step ends in the flag read (what a
    sampler does), else in a synchronize (the kernel alone)."""
    rule = rule_for(criterion)
    h = rule.history
    lat, sc = w.pool[:h], w.sigmas[:h]
    state = ks.SkipState.new(lat[0], NUM_STEPS, DELTA)

    if not host_read:

        def core():
            ks.skip_update(lat, sc, state, STEP, rule, backend)

        def step():
            core()
            torch.cuda.synchronize()

        return step, core

    def core():
        ks.skip_update(lat, sc, state, STEP, rule, backend)
        return state.flags.cpu()

    return core, core


def controller_variant(w: Workload, criterion: str):
    h = history(criterion)
    pool, sigmas = w.pool[: h + 1], w.sigmas[: h + 1]
    policy = ThirdOrder(delta=DELTA, max_skips=MAX_SKIPS, criterion=criterion, space="vp", backend="auto")
    controller = policy.start(pool[0], NUM_STEPS, "ddim")
    calls = [0]

    def core():
        j = calls[0] % len(pool)
        calls[0] += 1
        return controller.decide(STEP, pool[j], sigmas[j])

    for _ in range(h):  # fill the history
        core()
    return core, core


def unfused_variant(w: Workload, criterion: str):
    ref = UnfusedReference(criterion, DELTA, MAX_SKIPS, w.pool)
    return ref.step, ref.step


_COMPILED = {}


def compiled_variant(w: Workload, criterion: str):
    """``torch.compile`` of the reference update itself (one copy of the math), latents flattened
    to [B, n] so that the graphs of 4-D and 5-D latents coincide. Returns (step, core, compile_s)."""
    if "fn" not in _COMPILED:
        cfg = torch._dynamo.config
        for name, value in (("recompile_limit", 64), ("cache_size_limit", 64)):
            if hasattr(cfg, name):
                setattr(cfg, name, value)
        _COMPILED["fn"] = torch.compile(ks._update_torch, fullgraph=True)
    fn = _COMPILED["fn"]
    rule = rule_for(criterion)
    h = rule.history
    B = w.pool[0].shape[0]
    lat, sc = tuple(x.reshape(B, -1) for x in w.pool[:h]), tuple(w.sigmas[:h])
    state = ks.SkipState.new(w.pool[0], NUM_STEPS, DELTA)

    def core():
        fn(lat, sc, state, STEP, rule)
        return state.flags.cpu()

    t = time.monotonic()
    core()  # compiles (or raises: the benchmark then fails with torch.compile's error)
    compile_s = time.monotonic() - t
    return core, core, compile_s


# --------------------------------------------------------------------------------------------
# Measurement helpers
# --------------------------------------------------------------------------------------------


def device_time_us(fn, reps: int = 30) -> float:
    """Median time per call between CUDA events, with the L2 cache flushed before each call."""
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device=DEVICE)
    fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        flush.zero_()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) * 1e3


def stream_time_us(fn, reps: int = 20) -> float:
    """Time per call of ``reps`` calls launched back to back between two CUDA events (``fn`` must
    not synchronise): the kernels' own throughput, with launch latency hidden behind execution."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / reps


def syncs_per_step(fn, steps: int = 4) -> float:
    """Device-to-host synchronisations per call, counted with torch's sync debug mode."""
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    try:
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(steps):
                fn()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    return sum("synchroniz" in str(w.message) for w in caught) / steps


def check_budget():
    if time.monotonic() - _T0 > BUDGET_S:
        pytest.skip(f"BENCH_BUDGET_S={BUDGET_S:g} s used up")


def run(benchmark, group, variant, w, criterion, step, core, **extra):
    """Benchmark ``step`` and record the figures in extra_info."""
    benchmark.group = group
    benchmark(step)
    nbytes = w.bytes_per_step(criterion)
    x = w.pool[0]
    info = benchmark.extra_info
    info.update(
        variant=variant,
        group=group,
        shape=list(x.shape),
        dtype=str(x.dtype).removeprefix("torch."),
        device=str(DEVICE) if not CUDA else torch.cuda.get_device_name(DEVICE),
        criterion=criterion,
        bytes_per_step=nbytes,
        **extra,
    )
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if stats is not None:  # None with --benchmark-disable
        info["wall_us"] = stats.median * 1e6
        info["wall_gbps"] = nbytes / stats.median / 1e9
    if CUDA:
        dev_us = device_time_us(step, reps=10 if nbytes > 2**27 else 30)
        peak, source = peak_bandwidth()
        info.update(device_us=dev_us, device_gbps=nbytes / dev_us / 1e3, peak_gbps=peak, peak_source=source)
        if peak:
            info["pct_peak"] = 100 * info["device_gbps"] / peak
        info["syncs_per_step"] = syncs_per_step(core)
        if variant.startswith("triton") and step is not core:  # kernel only: core has no host read
            stream_us = stream_time_us(core)
            info.update(stream_us=stream_us, stream_gbps=nbytes / stream_us / 1e3)
            if peak:
                info["stream_pct_peak"] = 100 * info["stream_gbps"] / peak
    if stats is not None and os.environ.get("BENCH_JSONL"):
        # One line per finished benchmark: pytest-benchmark writes its JSON only at the end of the
        # session (and not at all when a timeout interrupts a benchmark), this file survives.
        fields = ("min", "max", "mean", "stddev", "median", "iqr", "rounds")
        row_stats = {f: getattr(stats, f) for f in fields}
        row_stats["iterations"] = getattr(benchmark.stats, "iterations", None)
        row = {"group": group, "name": benchmark.name, "stats": row_stats, "extra_info": info}
        with open(os.environ["BENCH_JSONL"], "a") as fh:
            fh.write(json.dumps(row) + "\n")


# --------------------------------------------------------------------------------------------
# Benchmarks
# --------------------------------------------------------------------------------------------

GROUPS = [(size, batch, crit) for size in SIZES for batch in BATCHES for crit in CRITERIA]
GROUP_IDS = [f"{s}-b{b}-{c}" for s, b, c in GROUPS]


@pytest.mark.parametrize("variant", ["fused", "controller", "triton", "triton-jit-launch", "triton-one-program", "unfused"])
@pytest.mark.parametrize("size, batch, criterion", GROUPS, ids=GROUP_IDS)
def test_skip_step(benchmark, monkeypatch, size, batch, criterion, variant):
    """``triton-jit-launch``: the fused step with every launch through ``JITFunction.run`` (no
    re-use of the compiled kernel); ``triton-one-program``: the fused step forced onto the
    single-program kernel whatever the size. Both exist to tune the defaults on a GPU."""
    check_budget()
    if variant.startswith("triton") and not CUDA:
        pytest.skip("the compiled Triton kernel needs CUDA (the CPU runs it only in the interpreter)")
    if variant == "triton-jit-launch":
        monkeypatch.setattr(ks, "_fast_launch", False)
    if variant == "triton-one-program":
        monkeypatch.setattr(ks, "_FUSED_MAX_ELEMENTS", 1 << 40)
    w = workload((batch, *SIZES[size]))
    if variant in ("fused", "triton-jit-launch", "triton-one-program"):
        backend = ks.resolve_backend(DEVICE, "auto")
        step, core = fused_variant(w, criterion, backend)
        extra = {"backend": backend}
    elif variant == "triton":
        step, core = fused_variant(w, criterion, "triton", host_read=False)
        extra = {"backend": "triton"}
    elif variant == "controller":
        step, core = controller_variant(w, criterion)
        extra = {"backend": ks.resolve_backend(DEVICE, "auto")}
    else:
        step, core = unfused_variant(w, criterion)
        extra = {"backend": "unfused torch ops"}
    run(benchmark, f"{size}-b{batch}-{criterion}", variant, w, criterion, step, core, **extra)


@pytest.mark.skipif(not CUDA, reason="the large-history case runs on CUDA only")
@pytest.mark.parametrize(
    "variant, programs_per_sm, num_warps",
    [("fused", None, None), ("triton", None, None), ("unfused", None, None),
     ("triton", 4, 4), ("triton", 8, 4), ("triton", 16, 8), ("triton", 16, 16)],
    ids=["fused", "triton", "unfused", "triton-pps4-w4", "triton-pps8-w4", "triton-pps16-w8", "triton-pps16-w16"],
)  # fmt: skip
def test_large_history(benchmark, monkeypatch, variant, programs_per_sm, num_warps):
    """The bandwidth case: 4 x 67 MB float16 latents (paper criterion, batch 8, 32 frames of
    4x128x128). The ``triton-ppsP-wW`` variants sweep the launch geometry (programs per SM,
    warps per program) around the defaults, for tuning; they change module constants only."""
    check_budget()
    if programs_per_sm is not None:
        monkeypatch.setattr(ks, "_PROGRAMS_PER_SM", programs_per_sm)
        monkeypatch.setattr(ks, "_NUM_WARPS", num_warps)
    w = workload(LARGE)
    if variant == "unfused":
        step, core = unfused_variant(w, "paper")
    else:
        backend = "triton" if variant.startswith("triton") else ks.resolve_backend(DEVICE, "auto")
        step, core = fused_variant(w, "paper", backend, host_read=variant == "fused")
    name = variant if programs_per_sm is None else f"triton-pps{programs_per_sm}-w{num_warps}"
    extra = {"programs_per_sm": ks._PROGRAMS_PER_SM, "num_warps": ks._NUM_WARPS}
    run(benchmark, "large-268MB-paper", name, w, "paper", step, core, **extra)


@pytest.mark.skipif(not CUDA, reason="torch.compile variants run on CUDA only")
@pytest.mark.parametrize("size, batch, criterion", GROUPS + [("large", 8, "paper")], ids=GROUP_IDS + ["large-268MB-paper"])
def test_skip_step_compiled(benchmark, size, batch, criterion):
    """Last in the file: compiling is the slowest part, and a spent budget skips only these."""
    check_budget()
    if _COMPILE_SPENT[0] > COMPILE_BUDGET_S:
        pytest.skip(f"BENCH_COMPILE_BUDGET_S={COMPILE_BUDGET_S:g} s of torch.compile used up")
    w = workload(LARGE if size == "large" else (batch, *SIZES[size]))
    try:
        step, core, compile_s = compiled_variant(w, criterion)
    except Exception as e:  # record the failure in the results, with torch.compile's message
        pytest.fail(f"torch.compile of _update_torch failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
    _COMPILE_SPENT[0] += compile_s
    group = "large-268MB-paper" if size == "large" else f"{size}-b{batch}-{criterion}"
    run(benchmark, group, "compiled", w, criterion, step, core, backend="torch.compile(_update_torch)", compile_s=compile_s)
