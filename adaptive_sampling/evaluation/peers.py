"""The competing caches, as settings that switch on around a diffusers pipeline call, next to the
library's own policies and the plain baselines, so that one loop can measure them all the same way.

Why: a user of a flow transformer (Flux, Wan, HunyuanVideo ...) can already pick diffusers' caches
(FirstBlockCache, MagCache, TaylorSeer, FasterCache, Pyramid Attention Broadcast) or cache-dit's
DBCache; the library has to be measured against them, at the same compute, on the same prompts.

A ``Setting`` is a name and a context manager ``setting.applied(pipe, steps, calibration)`` that
switches the method on for ``steps``-step calls of ``pipe`` and back off (the pipeline computes
exactly as before afterwards); it yields the number of steps to run (a fewer-steps baseline changes
it). ``calibration`` is a function that runs the pipeline once on calibration prompts at ``steps``
steps: MagCache needs it (its ratios are measured, printed by diffusers, and parsed here).

    settings = peer_settings(steps=30) + library_settings(steps=30, nfe=(10, 15))
    for s in settings:
        with s.applied(pipe, 30, calibration=lambda: pipe(**cal_kwargs, num_inference_steps=30)) as n:
            out = pipe(**test_kwargs, num_inference_steps=n)

Requirements, checked with a clear ``PeerUnavailable``: diffusers' caches need a transformer with
diffusers' ``CacheMixin`` (``enable_cache``; Flux, Wan, HunyuanVideo, LTX ... but not SD3 or the
UNets in diffusers 0.42); cache-dit's need ``pip install cache-dit`` and a pipeline it supports. What
each peer does on which model, and the workarounds that were needed: docs/peers.md.
"""

from __future__ import annotations

import ast
import contextlib
import io
import os
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterator

import torch

__all__ = ["Setting", "PeerUnavailable", "peer_settings", "library_settings", "baseline_settings", "magcache_ratios",
           "cache_dit_patched", "dpmpp_flow_scheduler", "measure", "front", "CallCounter", "library_setting", "no_cache"]


class PeerUnavailable(RuntimeError):
    """This method cannot run on this pipeline (missing package, model without the hooks it needs)."""


@dataclass(frozen=True)
class Setting:
    """One method at one setting. ``family``: the method (the curve it belongs to in a plot);
    ``library``: who ships it ("diffusers", "cache-dit", "adaptive_sampling", "baseline");
    ``knob``: the value swept along the family's curve (for tables)."""

    name: str
    family: str
    library: str
    knob: float | int | str | None
    _applied: Callable[[Any, int, Callable[[], Any] | None], ContextManager[int]]
    _report: Callable[[], Any] | None = None

    @property
    def report(self):
        """The library's settings: the ``SkipReport`` of the last pipeline call made under ``applied``
        (masks, calls per prompt); None for the others."""
        return None if self._report is None else self._report()

    def applied(self, pipe: Any, steps: int, calibration: Callable[[], Any] | None = None) -> ContextManager[int]:
        """Switch the method on for ``steps``-step calls of ``pipe``; yields the steps to run."""
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 2:
            raise ValueError(f"steps must be an int >= 2, got {steps!r}")
        return self._applied(pipe, steps, calibration)

    def __repr__(self) -> str:
        return f"Setting({self.name!r}, library={self.library!r})"


# ---------------------------------------------------------------------------------------------
# diffusers' caches (CacheMixin.enable_cache)
# ---------------------------------------------------------------------------------------------


def _transformer(pipe):
    tr = getattr(pipe, "transformer", None)
    if tr is None or not hasattr(tr, "enable_cache"):
        name = type(tr).__name__ if tr is not None else f"{type(pipe).__name__} (no transformer)"
        raise PeerUnavailable(f"diffusers' caches need a transformer with CacheMixin.enable_cache; {name} has none")
    if cache_dit_patched(tr):
        raise PeerUnavailable(
            "this transformer was patched by cache-dit (it stays patched after cache_dit.disable_cache, with the same"
            " outputs), and diffusers' caches then miss its blocks (MagCache calibrates nothing): use a fresh transformer"
        )
    return tr


def cache_dit_patched(transformer) -> bool:
    """Whether cache-dit's patch functor rewrote this transformer (Flux: its single blocks folded into the
    double-block loop). Measured: the outputs stay the same, but diffusers' block hooks stop matching."""
    import sys

    if "cache_dit" not in sys.modules:
        return False
    from cache_dit.utils import check_patched

    return bool(check_patched(transformer))


def _timestep_callback(pipe) -> Callable[[], float]:
    """The current timestep on the scheduler's 0..1000 scale, as FasterCache / PAB ask for it."""
    if hasattr(type(pipe), "current_timestep"):
        return lambda: pipe.current_timestep

    def current() -> float:
        s = pipe.scheduler
        return float(s.timesteps[s.step_index if s.step_index is not None else 0])

    return current


def _diffusers_cache(make_config: Callable[[Any, int, Callable | None], Any]):
    @contextlib.contextmanager
    def applied(pipe, steps, calibration) -> Iterator[int]:
        tr = _transformer(pipe)
        config = make_config(pipe, steps, calibration)
        tr.enable_cache(config)
        try:
            yield steps
        finally:
            tr.disable_cache()

    return applied


_MAG_MARK = "[MagCache] Calibration Complete"


def magcache_ratios(pipe, steps: int, calibration: Callable[[], Any]) -> list[float]:
    """MagCache's ratios for ``steps`` steps, measured the documented way: run ``calibration`` with
    ``MagCacheConfig(calibrate=True)`` and read the list diffusers prints (it keeps no copy). With
    sequential CFG (Flux true CFG, Wan) it prints one list per branch; the first (the conditional
    branch) is used, as a user copying the first printed list would."""
    from diffusers import MagCacheConfig

    tr = _transformer(pipe)
    printed = io.StringIO()
    tr.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps))
    try:
        with contextlib.redirect_stdout(printed):
            calibration()
    finally:
        tr.disable_cache()
    text = printed.getvalue()
    at = text.find(_MAG_MARK)
    if at < 0:
        raise PeerUnavailable(f"MagCache calibration printed no ratios (got {text[:200]!r})")
    start = text.index("[", at + len(_MAG_MARK))
    ratios = ast.literal_eval(text[start : text.index("]", start) + 1])
    if len(ratios) != steps:
        raise PeerUnavailable(f"MagCache calibration gave {len(ratios)} ratios for {steps} steps")
    return [float(r) for r in ratios]


def _magcache(threshold: float):
    measured: dict = {}  # (pipeline, steps, calibration) -> ratios: calibrate once per setting, not per call

    def config(pipe, steps, calibration):
        from diffusers import MagCacheConfig

        if calibration is None:
            raise ValueError("MagCache needs calibration= (a function that runs the pipeline once on calibration prompts)")
        key = (id(pipe), steps, id(calibration))
        if key not in measured:
            measured[key] = magcache_ratios(pipe, steps, calibration)
        return MagCacheConfig(threshold=threshold, num_inference_steps=steps, mag_ratios=measured[key])

    return config


def _fbc(threshold: float):
    def config(pipe, steps, calibration):
        from diffusers import FirstBlockCacheConfig

        return FirstBlockCacheConfig(threshold=threshold)

    return config


def _taylorseer(interval: int):
    def config(pipe, steps, calibration):
        from diffusers import TaylorSeerCacheConfig

        # float32 factors: the bfloat16 default would add its own round-off on a float32 model
        return TaylorSeerCacheConfig(cache_interval=interval, max_order=1, taylor_factors_dtype=torch.float32)

    return config


def _pab(skip_range: int):
    def config(pipe, steps, calibration):
        from diffusers import PyramidAttentionBroadcastConfig

        return PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=skip_range,
                                               current_timestep_callback=_timestep_callback(pipe))  # fmt: skip

    return config


def _fastercache(pipe, steps, calibration):
    from diffusers import FasterCacheConfig

    # is_guidance_distilled: its CFG-branch skipping assumes one batched [uncond; cond] call and fails
    # (IndexError) on sequential CFG; with it, only attention is reused (shared by both branches).
    return FasterCacheConfig(spatial_attention_block_skip_range=2, current_timestep_callback=_timestep_callback(pipe),
                             is_guidance_distilled=True)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# cache-dit
# ---------------------------------------------------------------------------------------------


def _cache_dit(threshold: float | None, taylorseer: bool = False, mask: str | None = None):
    @contextlib.contextmanager
    def applied(pipe, steps, calibration) -> Iterator[int]:
        os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")
        try:
            import cache_dit
        except ImportError as e:
            raise PeerUnavailable("cache-dit is not installed (pip install cache-dit)") from e
        kw = dict(Fn_compute_blocks=1, Bn_compute_blocks=0, num_inference_steps=steps, enable_separate_cfg=_separate_cfg(pipe))
        if mask is not None:
            kw.update(steps_computation_mask=cache_dit.steps_mask(mask_policy=mask, total_steps=steps),
                      steps_computation_policy="static")  # fmt: skip
        else:
            kw.update(residual_diff_threshold=threshold)
        calibrator = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=1) if taylorseer else None
        try:
            cache_dit.enable_cache(pipe, cache_config=cache_dit.DBCacheConfig(**kw), calibrator_config=calibrator)
        except (ValueError, AssertionError) as e:
            raise PeerUnavailable(f"cache-dit refused {type(pipe).__name__}: {e}") from e
        try:
            yield steps
        finally:
            cache_dit.disable_cache(pipe)

    return applied


def _separate_cfg(pipe) -> bool:
    """Sequential CFG (two transformer calls per step) must be declared to cache-dit, or it treats the
    two branches as consecutive steps (and never caches). FluxPipeline's true CFG, Wan."""
    return type(pipe).__name__.startswith(("Wan", "Flux", "HunyuanVideo", "Qwen"))


# ---------------------------------------------------------------------------------------------
# the lists
# ---------------------------------------------------------------------------------------------


FBC_THRESHOLDS = (0.02, 0.05, 0.1, 0.2, 0.4)
MAGCACHE_THRESHOLDS = (0.02, 0.06, 0.12, 0.24, 0.5)
TAYLORSEER_INTERVALS = (2, 3, 5)
PAB_RANGES = (2, 3)
DBCACHE_THRESHOLDS = (0.04, 0.08, 0.16, 0.32)
DBCACHE_MASKS = ("slow", "medium", "fast")


def peer_settings(steps: int | None = None, *, cache_dit: bool = True) -> list[Setting]:
    """Every peer at the settings swept in bench/peers.py (each family from nearly lossless to
    aggressive; the defaults of each method are among them where they run on small models).
    ``steps``: unused except for validation (the settings adapt to the steps they are applied with)."""
    if steps is not None and (not isinstance(steps, int) or steps < 2):
        raise ValueError(f"steps must be an int >= 2 or None, got {steps!r}")
    out = [Setting(f"FirstBlockCache(threshold={t:g})", "FirstBlockCache", "diffusers", t, _diffusers_cache(_fbc(t)))
           for t in FBC_THRESHOLDS]  # fmt: skip
    out += [Setting(f"MagCache(threshold={t:g})", "MagCache", "diffusers", t, _diffusers_cache(_magcache(t)))
            for t in MAGCACHE_THRESHOLDS]  # fmt: skip
    out += [Setting(f"TaylorSeer(cache_interval={i})", "TaylorSeer", "diffusers", i, _diffusers_cache(_taylorseer(i)))
            for i in TAYLORSEER_INTERVALS]  # fmt: skip
    out += [Setting(f"PAB(skip_range={r})", "PAB", "diffusers", r, _diffusers_cache(_pab(r))) for r in PAB_RANGES]
    out += [Setting("FasterCache(distilled)", "FasterCache", "diffusers", None, _diffusers_cache(_fastercache))]
    if cache_dit:
        out += [Setting(f"DBCache F1B0(threshold={t:g})", "DBCache", "cache-dit", t, _cache_dit(t)) for t in DBCACHE_THRESHOLDS]
        out += [Setting(f"DBCache F1B0 + TaylorSeer(threshold={t:g})", "DBCache+TaylorSeer", "cache-dit", t, _cache_dit(t, True))
                for t in DBCACHE_THRESHOLDS]  # fmt: skip
        out += [Setting(f"DBCache steps_mask({m})", "DBCache mask", "cache-dit", m, _cache_dit(None, mask=m)) for m in DBCACHE_MASKS]
    return out


def _hooked(name: str, family: str, knob, policy_factory: Callable[[int], Any]) -> Setting:
    last: dict = {}

    @contextlib.contextmanager
    def applied(pipe, steps, calibration) -> Iterator[int]:
        from ..integrations import diffusers as asd

        with asd.apply(pipe, skip=policy_factory(steps)) as handle:
            last["handle"] = handle
            yield steps

    return Setting(name, family, "adaptive_sampling", knob, applied, lambda: last["handle"].report if "handle" in last else None)


def library_settings(nfe: tuple[int, ...] = (), *, schedules: dict[int, Any] | None = None,
                     paper: bool = True) -> list[Setting]:  # fmt: skip
    """The library's options through its diffusers hook: ``default_policy(nfe=K)`` for each K, the
    calibrated schedules given (``{K: Calibrated}``), uniform stride with the same K (extrapolated
    reuse), and the paper's rule ``ThirdOrder()``."""
    from ..policies import FixedMask, ThirdOrder, default_policy
    from ..policies.reuse import Extrapolate
    from .baselines import uniform_mask

    out = [_hooked(f"default_policy(nfe={k})", "default_policy", k, lambda steps, k=k: default_policy(nfe=k)) for k in nfe]
    for k, schedule in sorted((schedules or {}).items()):
        out.append(_hooked(f"calibrated schedule (K={k})", "calibrated", k, lambda steps, s=schedule: s))
    out += [_hooked(f"uniform stride (K={k})", "uniform stride", k,
                    lambda steps, k=k: FixedMask(uniform_mask(steps, k), reuse=Extrapolate(1))) for k in nfe]  # fmt: skip
    if paper:
        out.append(_hooked("ThirdOrder()", "ThirdOrder", None, lambda steps: ThirdOrder()))
    return out


def library_setting(name: str, policy: Any) -> Setting:
    """Any skip policy through the library's diffusers hook, as a ``Setting`` named ``name``."""
    from ..policies.base import check_policy

    check_policy(policy, "policy")
    return _hooked(name, name, None, lambda steps: policy)


def no_cache(name: str = "no cache") -> Setting:
    """The pipeline as it is: the reference every other setting is measured against."""
    return Setting(name, "no cache", "baseline", None, lambda pipe, steps, calibration: contextlib.nullcontext(steps))


def _fewer_steps(k: int, scheduler_factory: Callable[[Any], Any] | None):
    @contextlib.contextmanager
    def applied(pipe, steps, calibration) -> Iterator[int]:
        if k > steps:
            raise ValueError(f"a {k}-step baseline is not fewer than {steps} steps")
        old = pipe.scheduler
        if scheduler_factory is not None:
            pipe.scheduler = scheduler_factory(old)
        try:
            yield k
        finally:
            pipe.scheduler = old

    return applied


def dpmpp_flow_scheduler(scheduler):
    """DPM-Solver++(2M) on the same flow grid as a ``FlowMatchEulerDiscreteScheduler`` (its shift or
    dynamic shifting carried over): the strongest few-step solver a diffusers user can switch to."""
    from diffusers import DPMSolverMultistepScheduler

    c = scheduler.config
    kw = dict(prediction_type="flow_prediction", use_flow_sigmas=True, algorithm_type="dpmsolver++", solver_order=2,
              flow_shift=c.get("shift", 1.0), use_dynamic_shifting=c.get("use_dynamic_shifting", False),
              time_shift_type=c.get("time_shift_type", "exponential"), num_train_timesteps=c.get("num_train_timesteps", 1000))  # fmt: skip
    return DPMSolverMultistepScheduler(**kw)


def baseline_settings(nfe: tuple[int, ...]) -> list[Setting]:
    """What a user gets without any cache at K calls per prompt: the pipeline's own scheduler with K
    steps, and DPM-Solver++(2M) with K steps."""
    out = [Setting(f"fewer steps (K={k})", "fewer steps", "baseline", k, _fewer_steps(k, None)) for k in nfe]
    out += [Setting(f"DPM-Solver++(2M), {k} steps", "DPM-Solver++ steps", "baseline", k, _fewer_steps(k, dpmpp_flow_scheduler))
            for k in nfe]  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------

FIRST_LAYERS = ("x_embedder", "pos_embed", "patch_embedding", "img_in", "conv_in", "proj_in")


class CallCounter:
    """Model forwards that really ran and their rows, counted at the transformer's first layer
    (``x_embedder`` for Flux, ``pos_embed`` for SD3 / PixArt, ``patch_embedding`` for Wan ...): the
    library's hook replaces the transformer's forward, so a pre-hook on the transformer itself would
    also see the calls it skips; a block cache still runs the first layer (its call counts)."""

    def __init__(self, transformer) -> None:
        layer = next((getattr(transformer, n) for n in FIRST_LAYERS if isinstance(getattr(transformer, n, None), torch.nn.Module)), None)
        if layer is None:
            raise ValueError(f"no first layer among {FIRST_LAYERS} on {type(transformer).__name__}")
        self.forwards = self.rows = 0
        self._handle = layer.register_forward_pre_hook(self._count)

    def _count(self, module, args) -> None:
        self.forwards += 1
        self.rows += int(args[0].shape[0])

    def reset(self) -> None:
        self.forwards = self.rows = 0

    def close(self) -> None:
        self._handle.remove()


def measure(setting: Setting, pipe: Any, run: Callable[[int], Any], steps: int,
            calibration: Callable[[], Any] | None = None) -> tuple[Any, dict]:  # fmt: skip
    """``run(steps)`` with ``setting`` switched on: its output and the compute it took, the same way for
    every method: ``flops`` of everything that ran (``torch.utils.flop_counter``, attention through
    the math SDPA backend so that it is counted: the fused CPU kernel counts 0), ``forwards`` and
    ``rows`` of the transformer (``CallCounter``). Work outside matmuls (cache bookkeeping, forecasts)
    is not counted by torch."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = CallCounter(pipe.transformer)
    try:
        with setting.applied(pipe, steps, calibration) as n:
            counter.reset()  # MagCache's calibration run happened inside applied()
            with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
                out = run(n)
    finally:
        counter.close()
    return out, {"flops": int(fc.get_total_flops()), "forwards": counter.forwards, "rows": counter.rows}


def front(points: list[tuple[float, float]], at: float) -> float | None:
    """The best quality a family reaches with compute <= ``at``: ``points`` are (compute, quality);
    None where no setting of the family is that cheap."""
    ok = [q for c, q in points if c <= at + 1e-9]
    return max(ok) if ok else None
