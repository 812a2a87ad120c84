"""What diffusers' built-in caches and cache-dit do, next to ``adaptive_sampling.integrations.diffusers.apply``,
on a tiny UNet pipeline (Stable Diffusion) and a tiny transformer pipeline (PixArt-alpha).

Measured, not read off documentation: for every method, on each pipeline,

* whether it runs at all (the exception if not);
* ``calls``: whole model forwards that ran (counted at the model's first layer: UNet ``conv_in``,
  PixArt ``pos_embed``), of N;
* ``rows``: model-input rows evaluated, of N x (CFG batch); a method that skips half a CFG batch
  or a prompt's rows shows up here;
* ``attn`` / ``ffn``: attention and feed-forward computations that ran (their first ``Linear``
  executed), as a share of the uncached run's;
* ``change``: max|latents - uncached| / max|uncached| (what the skipping changed);
* ``batch dep.``: prompt A's latents in the batch [A, B] vs A alone, same noise, same method
  (round-off ~1e-6 if decisions are per prompt; larger if B's rows changed what A got);
* ``pattern``: per denoising step, ``C`` = whole call computed, ``-`` = no model call, ``p`` =
  partly computed (fewer attention / FFN / rows than a full call), for the batch [A, B] and for
  A alone (a decision taken once for the batch can differ between the two).

The models are random and tiny (4x8x8 latents, N = 10 steps, CFG 2 prompts), so ``change`` says
nothing about quality; the point is what each method skips and on which models it runs.

Run (CPU, ~1 min): ``PYTHONPATH=. python bench/diffusers_caches.py [--out bench/results/diffusers_caches.md]``
cache-dit is used if importable (``pip install cache-dit``; it also installs with ``--no-deps``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import platform
import sys
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

warnings.simplefilter("ignore")

from tests.tiny_pipelines import pixart_pipeline, sd_pipeline  # noqa: E402

import adaptive_sampling.integrations.diffusers as asd  # noqa: E402
from adaptive_sampling import ThirdOrder  # noqa: E402

N = 10
GUIDANCE = {"sd": 7.5, "pixart": 4.5}


# ---------------------------------------------------------------------------------------------
# pipelines and their calls
# ---------------------------------------------------------------------------------------------


def build(kind: str):
    from diffusers import DPMSolverMultistepScheduler

    if kind == "sd":
        pipe = sd_pipeline()
        from tests.tiny_pipelines import SD_SCHEDULER

        pipe.scheduler = DPMSolverMultistepScheduler(**SD_SCHEDULER)
        model, first = pipe.unet, pipe.unet.conv_in
    else:
        pipe = pixart_pipeline()
        model, first = pipe.transformer, pipe.transformer.pos_embed
    return pipe, model, first


def inputs(kind: str, rows: list[int]):
    g = torch.Generator().manual_seed(7)
    lat_all = torch.randn(2, 4, 8, 8, generator=g)
    lat = lat_all[rows]
    if kind == "sd":
        prompts = ["a photo of a cat", "a watercolour of a ship at night"]
        return dict(prompt=[prompts[r] for r in rows], latents=lat)
    pe_all, ne_all = torch.randn(2, 6, 8, generator=g), torch.randn(2, 6, 8, generator=g)
    m = torch.ones(len(rows), 6)
    return dict(
        negative_prompt=None, prompt_embeds=pe_all[rows], negative_prompt_embeds=ne_all[rows], prompt_attention_mask=m,
        negative_prompt_attention_mask=m, latents=lat, use_resolution_binning=False,
    )


@contextlib.contextmanager
def cache_context(model):
    """``model.cache_context("cond")`` where the model has it (CacheMixin); else the same through
    diffusers' private ``_set_cache_context`` (PixArt's and the UNet's classes have no CacheMixin,
    and their pipelines enter no context: the block caches raise "No cache context is set")."""
    if hasattr(model, "cache_context"):
        with model.cache_context("cond"):
            yield
        return
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    _set_cache_context(model, CacheContext(name="cond"))
    try:
        yield
    finally:
        _set_cache_context(model, None)


def call(pipe, kind: str, rows: list[int], context: bool):
    kw = dict(num_inference_steps=N, height=8, width=8, output_type="latent", guidance_scale=GUIDANCE[kind])
    model = pipe.unet if kind == "sd" else pipe.transformer
    try:
        with cache_context(model) if context else contextlib.nullcontext():
            return pipe(**inputs(kind, rows), **kw).images
    finally:
        if not hasattr(model, "_reset_stateful_cache"):
            # what pipelines do for CacheMixin models at the end of a call (maybe_free_model_hooks);
            # without it the block caches carry one call's state into the next (FirstBlockCache then
            # fails at the next batch size)
            from diffusers.hooks import HookRegistry

            HookRegistry.check_if_exists_or_initialize(model).reset_stateful_hooks()


def hooks_on(model) -> int:
    """diffusers hooks registered anywhere in the model (0: the method found nothing to hook)."""
    return sum(len(getattr(m, "_diffusers_hook").hooks) for _, m in model.named_modules() if hasattr(m, "_diffusers_hook"))


# ---------------------------------------------------------------------------------------------
# counting what ran
# ---------------------------------------------------------------------------------------------


class Meter:
    """Counts whole forwards, rows, attention and FFN computations per denoising step."""

    def __init__(self, pipe, model, first):
        self.handles = []
        self.steps: list[dict] = []
        self.handles.append(first.register_forward_pre_hook(self._forward))
        for name, module in model.named_modules():
            if type(module).__name__ == "Attention" and hasattr(module, "to_q"):
                self.handles.append(module.to_q.register_forward_pre_hook(self._count("attn")))
            if type(module).__name__ == "FeedForward":
                self.handles.append(module.net[-1].register_forward_pre_hook(self._count("ffn")))
        self.pipe = pipe
        sched = pipe.scheduler
        self._step = sched.step

        def step(*a, **k):  # one scheduler step per denoising step: open the next bucket
            self.steps.append({"calls": 0, "rows": 0, "attn": 0, "ffn": 0})
            return self._step(*a, **k)

        self.steps.append({"calls": 0, "rows": 0, "attn": 0, "ffn": 0})
        sched.step = step

    def _forward(self, module, args):
        self.steps[-1]["calls"] += 1
        self.steps[-1]["rows"] += args[0].shape[0]

    def _count(self, key):
        def hook(module, args):
            self.steps[-1][key] += 1

        return hook

    def close(self):
        for h in self.handles:
            h.remove()
        vars(self.pipe.scheduler).pop("step", None)
        self.steps = [s for s in self.steps[:N]]

    def totals(self):
        return {k: sum(s[k] for s in self.steps) for k in ("calls", "rows", "attn", "ffn")}


# ---------------------------------------------------------------------------------------------
# the methods
# ---------------------------------------------------------------------------------------------


def diffusers_cache(config_fn, context: bool = True):
    """enable(pipe, model, meter_timestep) -> disable; via enable_cache where the model has it,
    else the hook's apply_* function directly on the model."""

    def enable(pipe, model, timestep):
        config, apply_fn = config_fn(timestep)
        if hasattr(model, "enable_cache"):
            model.enable_cache(config)
            return model.disable_cache
        if not hasattr(model, "enable_cache"):
            # UNets have no enable_cache (no CacheMixin): try the hook function itself
            apply_fn(model, config)
            from diffusers.hooks import HookRegistry

            def disable():
                registry = HookRegistry.check_if_exists_or_initialize(model)
                for name in list(registry.hooks):
                    registry.remove_hook(name, recurse=True)
                for _, m in model.named_modules():
                    r = getattr(m, "_diffusers_hook", None)
                    if r is not None:
                        for name in list(r.hooks):
                            r.remove_hook(name, recurse=False)

            return disable

    enable.context = context
    return enable


def fbc(threshold):
    def config(timestep):
        from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

        return FirstBlockCacheConfig(threshold=threshold), apply_first_block_cache

    return diffusers_cache(config)


MAG_RATIOS: dict[str, np.ndarray] = {}


def magcache(threshold):
    def config(timestep):
        from diffusers.hooks import MagCacheConfig, apply_mag_cache

        return MagCacheConfig(threshold=threshold, num_inference_steps=N, mag_ratios=MAG_RATIOS["current"]), apply_mag_cache

    return diffusers_cache(config)


def taylorseer(identifiers=None):
    def config(timestep):
        from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache

        return TaylorSeerCacheConfig(
            cache_interval=3, disable_cache_before_step=3, taylor_factors_dtype=torch.float32,
            cache_identifiers=identifiers,
        ), apply_taylorseer_cache

    return diffusers_cache(config)


def fastercache():
    def config(timestep):
        from diffusers.hooks import FasterCacheConfig, apply_faster_cache

        return FasterCacheConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 901),
            unconditional_batch_skip_range=2, unconditional_batch_timestep_skip_range=(-1, 901),
            current_timestep_callback=timestep, tensor_format="BCHW", attention_weight_callback=lambda _: 0.5,
        ), apply_faster_cache

    return diffusers_cache(config, context=False)


def pab():
    def config(timestep):
        from diffusers.hooks import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast

        return PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, cross_attention_block_skip_range=2,
            spatial_attention_timestep_skip_range=(-1, 901), cross_attention_timestep_skip_range=(-1, 901),
            current_timestep_callback=timestep,
        ), apply_pyramid_attention_broadcast

    return diffusers_cache(config, context=False)


def cache_dit(**config):
    def enable(pipe, model, timestep):
        import cache_dit

        if config:
            cache_dit.enable_cache(pipe, cache_config=cache_dit.DBCacheConfig(num_inference_steps=N, **config))
        else:
            cache_dit.enable_cache(pipe)
        return lambda: cache_dit.disable_cache(pipe)

    enable.context = False
    return enable


def ours(policy):
    def enable(pipe, model, timestep):
        handle = asd.apply(pipe, skip=policy)
        return handle.remove

    enable.context = False
    return enable


METHODS = {
    "none (reference)": None,
    "FirstBlockCache(threshold=0.05)": fbc(0.05),
    "FirstBlockCache(threshold=0.5)": fbc(0.5),
    "MagCache(threshold=0.5, calibrated)": magcache(0.5),
    "TaylorSeer(interval=3, warm-up 3)": taylorseer(),
    "TaylorSeer(..., cache_identifiers=blocks)": taylorseer([r"(.*\.)?transformer_blocks\.\d+"]),
    "FasterCache(attn range 2, uncond range 2)": fastercache(),
    "PAB(self+cross attn range 2)": pab(),
    "cache-dit enable_cache(pipe)": cache_dit(),
    "cache-dit DBCache F1B0, warm-up 3": cache_dit(Fn_compute_blocks=1, Bn_compute_blocks=0, max_warmup_steps=3),
    "cache-dit F1B0 steps_computation_mask, static": cache_dit(
        Fn_compute_blocks=1, Bn_compute_blocks=0, max_warmup_steps=3,
        steps_computation_mask=[1, 1, 1, 1, 0, 1, 0, 1, 0, 1], steps_computation_policy="static",
    ),
    "adaptive_sampling apply(ThirdOrder())": ours(ThirdOrder()),
    "adaptive_sampling apply(ThirdOrder(0.5))": ours(ThirdOrder(delta=0.5, max_skips=2)),
}


def short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg[:110]}"


def pattern(steps, full) -> str:
    out = []
    for s in steps:
        if s["calls"] == 0:
            out.append("-")
        elif s["rows"] < full["rows"] or s["attn"] < full["attn"] or s["ffn"] < full["ffn"]:
            out.append("p")
        else:
            out.append("C")
    return "".join(out)


def measure(kind: str):
    rows = []
    ref = ref_a = full_step = full_step_a = None
    for label, method in METHODS.items():
        pipe, model, first = build(kind)
        current = {"t": 1000.0}

        def grab(module, args, kwargs):
            t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
            current["t"] = float(t.reshape(-1)[0]) if isinstance(t, torch.Tensor) else float(t)

        model.register_forward_pre_hook(grab, with_kwargs=True)
        timestep = lambda: current["t"]  # noqa: E731
        context = bool(getattr(method, "context", False))
        try:
            if label.startswith("MagCache"):  # calibration run: MagCache's own calibrate mode
                from diffusers.hooks import MagCacheConfig, apply_mag_cache

                calib = MagCacheConfig(num_inference_steps=N, calibrate=True)
                (model.enable_cache(calib) if hasattr(model, "enable_cache") else apply_mag_cache(model, calib))
                printed = io.StringIO()
                with contextlib.redirect_stdout(printed):
                    call(pipe, kind, [0, 1], context=True)
                if hooks_on(model) == 0:
                    rows.append((label, "does nothing: registers no hook ('MagCache: No transformer blocks found')"))
                    continue
                MAG_RATIOS["current"] = _mag_ratios(printed.getvalue())
                pipe, model, first = build(kind)  # a fresh model for the cached run
                model.register_forward_pre_hook(grab, with_kwargs=True)
            disable = method(pipe, model, timestep) if method is not None else (lambda: None)
            if method is not None and not label.startswith(("adaptive", "cache-dit")) and hooks_on(model) == 0:
                rows.append((label, "does nothing: registers no hook on this model (no module matches its block patterns)"))
                continue
        except Exception as e:  # noqa: BLE001
            rows.append((label, f"fails: `{short(e)}`"))
            continue
        try:
            meter = Meter(pipe, model, first)
            try:
                out = call(pipe, kind, [0, 1], context)
            finally:
                meter.close()
            meter_a = Meter(pipe, model, first)
            try:
                alone = call(pipe, kind, [0], context)
            finally:
                meter_a.close()
            disable()
        except Exception as e:  # noqa: BLE001
            rows.append((label, f"fails: `{short(e)}`"))
            if "--trace" in sys.argv:
                traceback.print_exc()
            continue
        tot = meter.totals()
        if method is None:
            ref, ref_a, ref_tot, full_step, full_step_a = out, alone, tot, meter.steps[0], meter_a.steps[0]
        change = float((out - ref).abs().max() / ref.abs().max())
        dep = float((out[:1] - alone).abs().max() / alone.abs().max())
        rows.append((
            label,
            dict(
                calls=f"{tot['calls']}/{N}",
                rows=f"{tot['rows']}/{ref_tot['rows']}",
                attn=f"{100 * tot['attn'] / ref_tot['attn']:.0f}%",
                ffn=f"{100 * tot['ffn'] / ref_tot['ffn']:.0f}%" if ref_tot["ffn"] else "-",
                change=f"{change:.1e}",
                dep=f"{dep:.1e}",
                pattern=pattern(meter.steps, full_step),
                alone=pattern(meter_a.steps, full_step_a),
            ),
        ))
    return rows


def _mag_ratios(printed: str) -> list[float]:
    """The ratios MagCache's calibration pass printed (its documented way to hand them over)."""
    lines = printed.splitlines()
    for k, line in enumerate(lines):
        if "Calibration Complete" in line:
            return [float(v) for v in lines[k + 1].strip().strip("[]").split(",")]
    raise RuntimeError("MagCache calibration printed no ratios")


def table(kind: str, rows) -> str:
    head = (
        "| method | calls | rows | attn | ffn | change | batch dep. | pattern [A, B] | pattern A alone |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for label, r in rows:
        if isinstance(r, str):
            lines.append(f"| {label} | {r} | | | | | | | |")
        else:
            lines.append(
                f"| {label} | {r['calls']} | {r['rows']} | {r['attn']} | {r['ffn']} | {r['change']} | {r['dep']} "
                f"| `{r['pattern']}` | `{r['alone']}` |"
            )
    return head + "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--trace", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import diffusers

    try:
        import cache_dit

        cd = f"cache-dit {cache_dit.__version__}" if hasattr(cache_dit, "__version__") else "cache-dit"
    except Exception as e:  # noqa: BLE001
        cd = f"cache-dit not importable ({short(e)})"
    from diffusers import PixArtTransformer2DModel, UNet2DConditionModel

    has = {c.__name__: hasattr(c, "enable_cache") for c in (UNet2DConditionModel, PixArtTransformer2DModel)}
    note = (
        f"`hasattr(cls, 'enable_cache')`: {has}. "
        "Neither model class has `enable_cache` (no `CacheMixin`), so diffusers' caches are applied with their "
        "`apply_*` functions; FirstBlockCache, MagCache and TaylorSeer run inside a cache context (set through "
        "diffusers' private `_set_cache_context`: neither pipeline enters one) and their state is reset after "
        "each call, as pipelines do for `CacheMixin` models. MagCache gets the ratios of its own calibration "
        "pass (`calibrate=True`) on the same prompts.\n"
    )
    parts = [
        f"Measured {datetime.date.today()} with bench/diffusers_caches.py: diffusers {diffusers.__version__}, "
        f"torch {torch.__version__}, {cd}, Python {platform.python_version()}, CPU. N = {N} steps, "
        "DPM-Solver++(2M), 2 prompts (A, B) with classifier-free guidance (model batch 4).\n\n",
        note,
        "\n### Tiny Stable Diffusion pipeline (UNet2DConditionModel)\n\n",
        table("sd", measure("sd")),
        "\n### Tiny PixArt-alpha pipeline (PixArtTransformer2DModel, 2 transformer blocks)\n\n",
        table("pixart", measure("pixart")),
    ]
    text = "".join(parts)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
