"""The pipeline hook: skip whole UNet / transformer calls of a diffusers pipeline, decided per prompt.

It keeps the pipeline, its scheduler and its loop (``diffusers`` is imported only when ``apply``
runs; ``import adaptive_sampling`` stays light)::

       import adaptive_sampling.integrations.diffusers as asd
       from adaptive_sampling import default_policy

       with asd.apply(pipe, skip=default_policy()) as handle:
           images = pipe(prompts, num_inference_steps=50).images
       print(handle.report.nfe)            # model calls per image, [B]

``apply`` registers a ``diffusers.hooks.ModelHook`` on ``pipe.unet`` (or ``pipe.transformer``, and
``pipe.transformer_2`` where a pipeline has two: Wan 2.2) and wraps ``pipe.progress_bar``, which
every diffusers pipeline enters around its denoising loop. The hook acts only inside that loop;
model calls elsewhere run unchanged. The loop's bookkeeping (which call is which, the skipping
runs) is ``loop.py``; the other way in, running the pipeline's model under the library's samplers,
is ``adapter.py``.

Semantics of the hook
---------------------
* **Per prompt.** Classifier-free guidance comes in two layouts, and both are one decision per
  prompt and step. *Batched* (SD, SDXL, SD3, PixArt, LTX): one call on ``[uncond(B); cond(B)]``
  (the latents repeated); rows ``b`` and ``B + b`` are one sample and skip or compute together,
  and both branches' predictions are reused. The layout is detected at the first model call of
  each loop: the input's two halves equal (or ``cfg=True / False``; pass ``cfg=False`` if you feed
  identical latents to different rows without guidance, else those rows would share their
  decisions). *Sequential* (Flux with ``true_cfg_scale``, Wan, Qwen-Image): two calls per step at
  the same timestep (``cache_context("cond")`` then ``("uncond")``), counted at the first step. The
  first call's run takes the decision, the others replay it; each call reuses its own prediction
  (so a skipped step's branches are recombined by the pipeline with the CURRENT guidance scale,
  e.g. Wan 2.2's ``guidance_scale_2``), and a computed step runs every call. With
  ``num_images_per_prompt = m`` the ``B = prompts * m`` rows are each their own sample.
  ``report.computed`` is ``[B, N]``, ``report.nfe`` counts computed steps per sample and
  ``report.model_calls`` every model forward (all calls of a step).
* **Sub-batches.** Rows that compute go to the model as one sub-batch: ``sample`` /
  ``hidden_states``, ``encoder_hidden_states``, a non-scalar ``timestep`` and every tensor argument
  whose first dimension is the model batch (recursively through dicts, lists and tuples, e.g.
  ``added_cond_kwargs``, ``pooled_projections``, ``guidance``, attention masks, ControlNet
  residuals) are sliced alike; Flux's 2-D ``txt_ids`` / ``img_ids`` are shared and never sliced. Rows that skip
  get the reused prediction without a model call; when no row computes the model is not called.
  ``pad_to="pow2"`` (or a list of sizes) pads a sub-batch to a few bucket sizes, for compiled
  models (``integrations.bucketing``). A compiled model works: ``pipe.unet =
  torch.compile(pipe.unet)``, then ``apply``.
  A ControlNet is a separate module: its own call still runs on every row.
* **Reuse is of eps, by prediction type.** ``epsilon`` outputs are eps. ``v_prediction`` and
  ``sample`` outputs, and flow schedulers' velocities (``flow_prediction``), are converted to eps
  with the latent and sigma of the call they came from, and the reused eps is converted back with
  the CURRENT latent and sigma (a copied v is not a copied eps; ``prediction.py``). Output channels beyond the latent's (a learned variance, e.g. PixArt) are copied
  from the row's last computed call. ``reuse=Extrapolate(...)`` forecasts eps per row.
* **Which latent the rule measures, and sigma.** The model input ``u`` of every supported
  scheduler is the variance-preserving latent (DDIM, DPM-Solver, UniPC, DEIS, PNDM, DDPM hold it;
  Euler, Heun, LMS, KDPM2 hold the variance-exploding ``x`` and feed ``scale_model_input(x) =
  x / sqrt(1 + sigma^2)``). sigma is recovered from the timestep's position in the scheduler's
  grid (``scheduler.sigmas``, or ``alphas_cumprod`` at the timestep for DDIM-like schedulers), and
  the policy sees ``x = u * sqrt(1 + sigma^2)`` with that sigma. The policy is started with the
  scheduler's sampler entry (``plan.scheduler_sampler``), whose ``space`` is the latent the
  scheduler holds, so a ``ThirdOrder`` with ``space=None`` (also inside ``Budget``) measures it:
  VP for DDIM / DPM-Solver / UniPC / DEIS / PNDM / DDPM, VE for Euler / Heun / LMS / KDPM2 (the
  reference code's choice for DDIM, DPM-Solver++ and Euler). Flow schedulers feed the model the
  flow latent itself and sigma is the flow level s (the run is in the flow convention, sampler
  ``flow_euler``, ``flow_dpmpp_2m`` or the scheduler's class), and the rule measures the flow
  latent. Pass ``space=`` to choose.
* **Schedulers.** One model call per loop iteration: DDIM, Euler, DPM-Solver multistep (any order
  and algorithm on a DDPM schedule), and the other DDPM-schedule schedulers (LMS, Euler
  ancestral, UniPC, DEIS, DDPM, DPM-Solver single-step, LCM...): every call after the policy's
  warm-up may skip. Two-call schedulers (Heun, KDPM2, KDPM2 ancestral, DPM-Solver SDE) and PNDM's
  first PLMS step: only the FIRST call of a step may skip (the k-diffusion wrapper's rule); the
  second (corrector) call always runs on every row and its eps is the next one reused
  (``report.extra_evaluations``). Flow matching: ``FlowMatchEulerDiscreteScheduler`` (static
  ``shift``, dynamic ``mu``, ``shift_terminal``) and the multistep schedulers with
  ``use_flow_sigmas=True`` and ``prediction_type="flow_prediction"`` (DPM-Solver, UniPC: Wan's).
  The model's timestep is the scheduler's or that divided by ``num_train_timesteps`` (Flux passes
  ``t / 1000``): both are recognised. Refused with an error naming the scheduler: other flow
  schedulers (FlowMatchHeun, FlowMatchLCM, ...), ``invert_sigmas`` (Mochi), EDM schedulers (no
  ``alphas_cumprod``), and PNDM in its Runge-Kutta (PRK) mode.
* **Tested pipelines** (tests/test_flow.py, tests/test_diffusers.py, tiny random models):
  Stable Diffusion, SDXL, PixArt-alpha, SD3 (FlowMatchEuler, flow DPM-Solver++), Flux (with and
  without true CFG), Wan 2.1 (UniPC, FlowMatchEuler) and Wan 2.2 (two transformers). Other
  pipelines with these call structures work the same way.
* **State is per pipeline call** (per denoising loop): created at the loop's first model call,
  dropped when the loop ends or fails (an exception anywhere in the loop), and by diffusers'
  ``reset_stateful_hooks()``. ``handle.report`` is the report of the last loop that ran to the end
  (``None`` while a call runs, after a failed or interrupted call). The final latent is read from
  the scheduler's last ``step`` output (to finish the report's signals and check it for NaN/Inf).
  One pipeline call at a time per pipeline (diffusers pipelines are not thread-safe anyway).
* One host read per model call for the decision (the policy's), one for the timestep check; the
  first call of a loop also compares the CFG halves.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import torch

from ...policies import check_policy, default_policy
from ...runner import check_merge_mode
from ..bucketing import check_pad_to
from .adapter import pipeline_models
from .loop import Loop
from .plan import check_scheduler, class_name

__all__ = ["apply", "SkipHandle", "HOOK_NAME"]

HOOK_NAME = "adaptive_sampling_skip"


class _BarProxy:
    """Stands in for the pipeline's progress bar: entering it starts a denoising loop, leaving it
    (normally or by an exception) ends it. Everything else goes to the real bar."""

    def __init__(self, bar: Any, handle: "SkipHandle") -> None:
        self._bar, self._handle = bar, handle

    def __enter__(self):
        self._handle._begin()
        try:
            return self._bar.__enter__()
        except BaseException:
            self._handle._end(failed=True)
            raise

    def __exit__(self, exc_type, exc, tb):
        try:
            return self._bar.__exit__(exc_type, exc, tb)
        finally:
            self._handle._end(failed=exc_type is not None)

    def __iter__(self):
        self._handle._begin()
        done = False
        try:
            for item in self._bar:
                yield item
            done = True
        finally:
            self._handle._end(failed=not done)

    def __len__(self):
        return len(self._bar)

    def __getattr__(self, name: str):
        return getattr(self._bar, name)


@functools.lru_cache(maxsize=None)
def _hook_class():
    from diffusers.hooks import ModelHook

    class AdaptiveSkipHook(ModelHook):
        """Routes the model's forward through the skip handle (see ``apply``)."""

        _is_stateful = True

        def __init__(self, handle: "SkipHandle") -> None:
            super().__init__()
            self.handle = handle

        def new_forward(self, module, *args, **kwargs):
            return self.handle._forward(self.fn_ref.original_forward, module, args, kwargs)

        def reset_state(self, module):
            self.handle._discard()
            return module

    return AdaptiveSkipHook


class SkipHandle:
    """What ``apply`` returns: the hook's state and its report.

    report: the ``SkipReport`` of the last pipeline call that ran its loop to the end (per sample:
        ``computed`` [B, N], ``nfe`` [B], ``model_calls``: model forwards made); ``None`` before,
        during, and after a failed or interrupted call.
    policy: the skip policy; may be replaced between pipeline calls.
    pad_to: the sub-batch buckets (``apply``'s ``pad_to``); may be replaced between pipeline calls.
    batch_sizes: the model batch size of each model call of that loop (after ``pad_to`` padding:
        what a compiled model saw); ``None`` when ``report`` is.
    remove(): unhook (the model's forward and ``pipe.progress_bar`` are restored); idempotent.
    Usable as a context manager (removes on exit).
    """

    def __init__(self, pipe: Any, models: list[torch.nn.Module], policy: Any, cfg: bool | None, pad_to: Any = None) -> None:
        from diffusers.hooks import HookRegistry

        self.pipe, self.models, self.policy, self.cfg = pipe, models, policy, cfg
        self.model = models[0]
        self.pad_to = pad_to
        self.report = None
        self.batch_sizes: list[int] | None = None
        self._loop: Loop | None = None
        self._depth = 0
        self._registries, self._signatures = [], {}
        for model in models:
            # torch.compile(model) gives an OptimizedModule whose forward takes (*args, **kwargs): bind
            # the arguments with the compiled module's own signature
            self._signatures[id(model)] = inspect.signature(type(getattr(model, "_orig_mod", model)).forward)
            registry = HookRegistry.check_if_exists_or_initialize(model)
            if getattr(registry, "_module_ref", model) is not model and not registry.hooks:
                # torch.compile's OptimizedModule stores attributes on the module it wraps, so an empty
                # registry left there for an earlier compiled wrapper would hook that wrapper: replace it
                registry = HookRegistry(model)
                model._diffusers_hook = registry
            if registry.get_hook(HOOK_NAME) is not None:
                raise ValueError(f"pipe's {class_name(model)} already carries an adaptive_sampling hook: remove() it first")
            self._registries.append(registry)
        if "progress_bar" in vars(pipe):
            raise ValueError("pipe.progress_bar is already replaced on this pipeline; cannot hook its denoising loop")
        for registry in self._registries:
            registry.register_hook(_hook_class()(self), HOOK_NAME)
        original_bar = type(pipe).progress_bar.__get__(pipe)

        def progress_bar(*args, **kwargs):
            return _BarProxy(original_bar(*args, **kwargs), self)

        object.__setattr__(pipe, "progress_bar", progress_bar)
        self._removed = False

    @property
    def active(self) -> bool:
        """Whether a denoising loop is running under the hook."""
        return self._loop is not None

    def _begin(self) -> None:
        self._depth += 1
        if self._depth == 1:
            self.report = None
            self.batch_sizes = None
            self._loop = Loop(self)

    def _end(self, failed: bool) -> None:
        self._depth = max(0, self._depth - 1)
        if self._depth:
            return
        loop, self._loop = self._loop, None
        if loop is None:
            return
        loop.close()
        if not failed:
            self.report = loop.report()
            self.batch_sizes = list(loop.seen) if self.report is not None else None

    def _discard(self) -> None:
        """Drop the running loop's state (a failure, or diffusers' reset_stateful_hooks)."""
        loop, self._loop = self._loop, None
        if loop is not None:
            loop.close()

    def _forward(self, original: Callable, module, args, kwargs):
        loop = self._loop
        if loop is None:  # outside a pipeline's denoising loop: unchanged
            return original(*args, **kwargs)
        try:
            signature = self._signatures.get(id(module)) or inspect.signature(type(getattr(module, "_orig_mod", module)).forward)
            return loop.forward(original, signature, module, args, kwargs)
        except BaseException:
            self._discard()
            raise

    def _unregister(self) -> None:
        for registry in self._registries:
            if registry.get_hook(HOOK_NAME) is not None:
                registry.remove_hook(HOOK_NAME, recurse=False)

    def remove(self) -> None:
        if self._removed:
            return
        self._discard()
        self._unregister()
        if "progress_bar" in vars(self.pipe):
            del vars(self.pipe)["progress_bar"]
        self._removed = True

    def __enter__(self) -> "SkipHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self._removed else ("running" if self.active else "idle")
        return f"SkipHandle({class_name(self.model)}, {self.policy!r}, {state})"


def apply(pipe: Any, skip: Any = None, *, cfg: bool | None = None, pad_to: Any = None) -> SkipHandle:
    """Skip whole model calls of a diffusers pipeline per prompt with the policy ``skip``.

    pipe: a diffusers pipeline with a ``unet`` or ``transformer`` (and ``transformer_2``) and a
        DDPM-schedule scheduler (DDIM, Euler, DPM-Solver, UniPC, LMS, Heun, KDPM2, PNDM/PLMS, ...) or
        a flow scheduler (FlowMatchEuler; DPM-Solver / UniPC with flow sigmas).
    skip: a skip policy (``default_policy()``, ``Calibrated``, ``FixedMask(...)``, ``ThirdOrder(...)``,
        ``Budget(...)``, a third-party one); default ``default_policy()``. A ``FixedMask`` has one entry
        per step (``num_inference_steps``; fewer with img2img ``strength``), [N] or [B, N] with B
        the images of the call (prompts x num_images_per_prompt).
    cfg: whether the model batch is ``[uncond; cond]``; ``None`` detects it per call (two equal halves).
    pad_to: ``None`` (default): a sub-batch call gets exactly the rows that compute. ``"pow2"`` or a
        list of ints: the per-prompt rows that compute are padded (with repeats of the first of
        them, in both CFG halves alike) to the smallest bucket >= their number, capped at the
        prompt batch (powers of two below it, then the batch itself; see
        ``integrations.bucketing``), and the padded rows' outputs are dropped. For compiled
        models (``torch.compile`` with static shapes, CUDA graphs): the model then sees a few batch
        sizes instead of one per sub-batch size. Decisions, NFE and the report are unchanged.

    Returns a ``SkipHandle`` (``.report``, ``.remove()``, context manager). See the module
    docstring for the semantics.
    """
    models = pipeline_models(pipe)
    if not models:
        raise TypeError(f"pipe must be a diffusers pipeline (with .unet or .transformer), got {class_name(pipe)}")
    if not callable(getattr(type(pipe), "progress_bar", None)):
        raise TypeError(f"pipe must be a diffusers pipeline (it has no progress_bar), got {class_name(pipe)}")
    policy = default_policy() if skip is None else check_policy(skip, "skip")
    check_merge_mode(policy, merge_skipped=False)  # the schedulers' loops have no merge mode
    if cfg is not None and not isinstance(cfg, bool):
        raise TypeError(f"cfg must be True, False or None, got {cfg!r}")
    check_scheduler(getattr(pipe, "scheduler", None), "pipe.scheduler")
    return SkipHandle(pipe, models, policy, cfg, check_pad_to(pad_to, "pad_to"))
