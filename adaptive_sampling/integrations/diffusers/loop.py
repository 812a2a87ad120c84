"""The state of one hooked denoising loop (one pipeline call): which model call is which, and the
skipping runs behind them.

A pipeline calls its model once per scheduler timestep, or once per timestep and CFG branch: SD,
SD3, PixArt and LTX batch [uncond; cond] into ONE call; Flux with true CFG, Wan and Qwen-Image make
TWO calls per step (``cache_context("cond")``, then ``("uncond")``). The loop tells them apart by
their timesteps: calls at the same scheduler timestep, counted at the first step, are the step's
*branches*; the count is then fixed for the loop. Heun-like correctors and PNDM's repeated first
timestep are separate scheduler timesteps and stay calls of their own (``SchedulerPlan.first``).

Each branch has its own ``SkipRun`` (its own reused eps, in the model's output type) over the
latent it was called with. The first branch's run takes the decisions with the user's policy; the
others replay them (``_Follow``), so a step's cond and uncond calls are ONE decision per prompt, and
a skipped prompt gets each branch's own reused prediction. A computed step runs every branch.
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import replace
from typing import Any, Callable

import numpy as np
import torch

from ...policies import Controller, SkipPolicy
from ...runner import SkipRun, slice_rows
from ..bucketing import bucket_sizes, padded_rows
from .adapter import model_output, rewrap
from .plan import class_name, scheduler_plan
from .prediction import derivative_from_prediction, prediction_from_derivative

__all__ = ["Loop"]

_MISSING = object()
# Per-token position ids of Flux-like transformers: 2-D [tokens, 3], shared by every row (never sliced)
SHARED_IDS = ("txt_ids", "img_ids")


def _timestep_value(t: Any) -> float:
    """The (single) timestep of a model call; one host read."""
    if isinstance(t, torch.Tensor):
        if t.numel() == 1:
            return float(t.reshape(()))
        lo, hi = torch.stack(torch.aminmax(t.reshape(-1).to(torch.float64))).tolist()
        if lo != hi:
            raise ValueError(f"the rows of one model call have different timesteps ({lo} .. {hi}): not supported")
        return lo
    if isinstance(t, (int, float, np.integer, np.floating)):
        return float(t)
    raise TypeError(f"the model's timestep must be a tensor or a number, got {class_name(t)}")


def _close(t: float, ref: float) -> bool:  # fp16 timesteps round to ~5e-4 relative
    return abs(t - ref) <= 5e-4 * abs(ref) + 1e-6


def _chunks(sample: torch.Tensor, cfg: bool | None) -> int:
    """How many copies of the latents the model batch holds (2 with batched classifier-free guidance)."""
    n = sample.shape[0]
    halves_equal = n % 2 == 0 and bool(torch.equal(sample[: n // 2], sample[n // 2 :]))
    if cfg is True:
        if not halves_equal:
            raise ValueError(
                "cfg=True, but the model input is not [latents; latents] (its two halves differ): "
                "the pipeline does not batch classifier-free guidance as one call"
            )
        return 2
    if cfg is False:
        return 1
    return 2 if halves_equal else 1


def _slice_argument(name: str, value: Any, rows: torch.Tensor, n: int) -> Any:
    if name in SHARED_IDS and isinstance(value, torch.Tensor) and value.ndim == 2:
        return value
    return slice_rows(value, rows, n)


class _Follow(SkipPolicy):
    """The policy of a CFG branch after the first: the first branch's decisions, step by step, with
    a controller of the user's policy for this branch's own reuse (its decide is never asked)."""

    def __init__(self, policy: SkipPolicy, leader: SkipRun) -> None:
        self.policy, self.leader = policy, leader

    def start(self, x, num_steps, sampler, sigmas=None) -> Controller:
        return _FollowController(self.policy.start(x, num_steps, sampler, sigmas=sigmas), self.leader)


class _FollowController(Controller):
    def __init__(self, inner: Controller, leader: SkipRun) -> None:  # no state of its own beyond these
        self.inner, self.leader = inner, leader
        self.batch, self.num_steps = inner.batch, inner.num_steps
        self.can_skip, self.space = inner.can_skip, inner.space

    def decide(self, step, x, sigma) -> np.ndarray:
        return self.leader.computed[:, step].copy()

    def reuse(self, step, sigma):
        return self.inner.reuse(step, sigma)

    def record(self, step, sigma, eps, rows) -> None:
        self.inner.record(step, sigma, eps, rows)


class _Branch:
    """One model call per step of the loop (the only one, or one CFG branch), and its SkipRun."""

    def __init__(self, loop: "Loop", index: int, sample: torch.Tensor, policy: SkipPolicy) -> None:
        self.loop, self.index = loop, index
        self.c = _chunks(sample, loop.handle.cfg)
        self.n = sample.shape[0]
        self.B = self.n // self.c
        self.template: Any = None
        self.extra: torch.Tensor | None = None  # output channels beyond the latent's, per model row
        plan = loop.plan
        s0 = float(plan.call_sigmas[loop.begin])
        rows = torch.arange(self.B, device=sample.device)
        self.run = SkipRun(self._model, self.layout(sample, s0), torch.from_numpy(plan.grid(loop.begin)), {"_rows": rows},
                           policy, plan.sampler)  # fmt: skip

    def layout(self, u: torch.Tensor, s: float) -> torch.Tensor:
        """Model input [c*B, ...] -> the run's latent [B, c, ...] in the computing dtype: VE for the
        DDPM family (the model input is VP), the flow latent itself for flow schedulers."""
        v = u.to(self.loop.dtype).reshape(self.c, self.B, *u.shape[1:]).transpose(0, 1)
        if self.loop.flow:
            return v.contiguous()
        return (v * math.sqrt(1 + s * s)).contiguous()

    def call(self, original: Callable, bound: inspect.BoundArguments, sample_name: str, first: bool, step: int, s: float):
        self.s, self.u, self.bound, self.original, self.sample_name = s, bound.arguments[sample_name], bound, original, sample_name
        self.raw = self.raw_tensor = self.raw_rows = None
        x = self.layout(self.u, s)
        sigma = x.new_full((self.B,), s)
        if first:
            denoised = self.run.denoise(step, x, sigma)
            computed = self.run.last_computed
        else:  # a corrector call: never skipped, its eps is the next one reused
            denoised = self.run.call_model(step, x, sigma)
            computed = np.ones(self.B, dtype=bool)
        if computed.all():
            return self.raw
        return self._assemble(x, denoised)

    def _model(self, x: torch.Tensor, sigma: torch.Tensor, _rows: torch.Tensor) -> torch.Tensor:
        """The "model" of the SkipRun: the original forward on the rows ``_rows`` (all chunks)."""
        c, B, loop = self.c, self.B, self.loop
        k = _rows.numel()
        bound = self.bound
        if k == B:
            out = self.original(*bound.args[1:], **bound.kwargs)
            u, model_rows = self.u, None
            tensor = model_output(out)
            loop.seen.append(self.n)
        else:
            model_rows = (_rows[None, :] + B * torch.arange(c, device=_rows.device)[:, None]).reshape(-1)
            # pad_to: the sub-batch padded with repeats of its first row to a bucket size (both CFG
            # halves alike); the padded rows' outputs are dropped below
            call_rows = _rows if loop.sizes is None else padded_rows(_rows, loop.sizes)
            kp = call_rows.numel()
            padded = (call_rows[None, :] + B * torch.arange(c, device=_rows.device)[:, None]).reshape(-1)
            sliced = inspect.BoundArguments(bound.signature, dict(bound.arguments))
            for name, value in bound.arguments.items():
                if name != "self":
                    sliced.arguments[name] = _slice_argument(name, value, padded, self.n)
            u = sliced.arguments[self.sample_name]
            out = self.original(*sliced.args[1:], **sliced.kwargs)
            tensor = model_output(out)
            loop.seen.append(kp * c)
            if kp != k:
                if tensor.shape[0] != u.shape[0]:
                    raise ValueError(f"the model returned shape {tuple(tensor.shape)} for an input of shape {tuple(u.shape)}")
                keep = (torch.arange(k, device=tensor.device)[None, :] + kp * torch.arange(c, device=tensor.device)[:, None]).reshape(-1)
                tensor, u = tensor.index_select(0, keep), u.index_select(0, keep.to(u.device))
        C = u.shape[1]
        if tensor.shape[0] != u.shape[0] or tensor.shape[2:] != u.shape[2:] or tensor.shape[1] < C:
            raise ValueError(f"the model returned shape {tuple(tensor.shape)} for an input of shape {tuple(u.shape)}")
        if self.template is None:
            self.template = out
        if tensor.shape[1] > C:
            if self.extra is None:
                self.extra = tensor[:, C:].clone()
            elif model_rows is None:
                self.extra.copy_(tensor[:, C:])
            else:
                self.extra.index_copy_(0, model_rows, tensor[:, C:])
        self.raw, self.raw_tensor, self.raw_rows = out, tensor, model_rows
        d = derivative_from_prediction(tensor[:, :C].to(loop.dtype), u.to(loop.dtype), self.s, loop.kind)
        d = d.reshape(c, k, *d.shape[1:]).transpose(0, 1)
        return x - self.s * d

    def _assemble(self, x: torch.Tensor, denoised: torch.Tensor) -> Any:
        """The model output for a call where some rows skipped: reused eps in the model's output
        type at the current latent and sigma, computed rows as the model returned them."""
        d = ((x - denoised) / self.s).transpose(0, 1).reshape(self.n, *x.shape[2:])
        out_dtype = model_output(self.template).dtype
        pred = prediction_from_derivative(d, self.u.to(self.loop.dtype), self.s, self.loop.kind).to(out_dtype)
        if self.extra is not None:
            pred = torch.cat([pred, self.extra.to(out_dtype)], dim=1)
        if self.raw_tensor is not None:
            pred.index_copy_(0, self.raw_rows, self.raw_tensor.to(out_dtype))
        return rewrap(self.template, pred)


class Loop:
    """The state of one denoising loop (one pipeline call); see the module docstring."""

    def __init__(self, handle) -> None:
        self.handle = handle
        self.scheduler = handle.pipe.scheduler
        self.plan = None
        self.branches: list[_Branch] = []
        self.last_latent: torch.Tensor | None = None
        self.sizes: tuple[int, ...] | None = None  # pad_to's buckets (per-prompt rows), None: no padding
        self.seen: list[int] = []  # the model batch size of every model call (after padding)
        self._install_step()

    # -- the scheduler's step: its output is the next latent (the final one ends the report) --
    def _install_step(self) -> None:
        """Wrap ``scheduler.step`` (whatever it is now: the method or someone's wrapper) for the
        loop's duration; ``close`` puts back what was there."""
        sched = self.scheduler
        self._previous_step = vars(sched).get("step", _MISSING)
        original = sched.step

        @functools.wraps(original)
        def step(*args, **kwargs):
            out = original(*args, **kwargs)
            self.last_latent = out[0] if isinstance(out, tuple) else getattr(out, "prev_sample", None)
            return out

        sched.step = step
        self._step_wrapper = step

    def close(self) -> None:
        sched = self.scheduler
        if self._step_wrapper is not None and vars(sched).get("step") is self._step_wrapper:  # else someone wrapped over it: leave theirs
            if self._previous_step is _MISSING:
                del vars(sched)["step"]
            else:
                sched.step = self._previous_step
        self._step_wrapper = None

    # -- the first model call of the loop --
    def _start(self, sample: torch.Tensor, timestep: Any) -> None:
        plan = scheduler_plan(self.scheduler, "pipe.scheduler")
        t0 = _timestep_value(timestep)
        T = float(self.scheduler.config.get("num_train_timesteps", 1000) or 1000)
        for scale in (1.0, T):  # the model sees the scheduler's timestep, or it / T (Flux: s itself)
            where = np.flatnonzero(plan.first & (np.abs(plan.timesteps - t0 * scale) <= 5e-4 * np.abs(plan.timesteps) + 1e-6))
            if len(where):
                break
        if len(where) == 0:
            raise ValueError(
                f"the model's first timestep {t0:g} is not one of pipe.scheduler's step timesteps "
                f"{plan.timesteps.tolist()} (nor one of them / {T:g}): the pipeline does not follow its scheduler's grid"
            )
        self.plan, self.t_scale = plan, scale
        self.flow = plan.sampler.convention == "flow"
        self.begin = int(where[0])
        self.j = self.begin - 1  # index (into plan.timesteps) of the latest scheduler timestep called
        self.k = 0  # branch of the latest call at that timestep
        self.n_branches: int | None = None  # calls per timestep, known once the first step is over
        self.step = -1  # index of the latest step (first call)
        self.dtype = torch.promote_types(sample.dtype, torch.float32) if sample.is_floating_point() else torch.float32
        self.kind = plan.prediction_type

    def _next_call(self, t: float) -> tuple[int, int]:
        """(scheduler timestep index, branch) of a call at model timestep ``t`` (scaled)."""
        plan = self.plan
        timesteps = plan.timesteps
        j, k, nb = self.j, self.k, self.n_branches
        if j >= self.begin:
            another = (nb is None and j == self.begin and _close(t, float(timesteps[j]))
                       and (j + 1 >= len(timesteps) or not _close(t, float(timesteps[j + 1]))))  # fmt: skip
            if another or (nb is not None and k + 1 < nb):
                if not _close(t, float(timesteps[j])):
                    raise RuntimeError(
                        f"model call {k + 1} at pipe.scheduler's timestep {timesteps[j]:g} got timestep {t:g}: the pipeline "
                        f"makes {nb} model calls per step, and this one is out of that order"
                    )
                return j, k + 1
            if nb is None:
                self.n_branches = k + 1
        j += 1
        if j >= len(timesteps):
            raise RuntimeError(f"the pipeline made more model calls than pipe.scheduler's {len(timesteps)} timesteps")
        if not _close(t, float(timesteps[j])):
            raise RuntimeError(
                f"model call {j} got timestep {t:g}, pipe.scheduler's grid has {timesteps[j]:g} there: the "
                "pipeline does not call the model once per scheduler timestep (and CFG branch)"
            )
        return j, 0

    # -- every model call inside the loop --
    def forward(self, original: Callable, signature: inspect.Signature, module, args, kwargs) -> Any:
        bound = signature.bind(module, *args, **kwargs)
        sample_name = list(signature.parameters)[1]
        sample = bound.arguments.get(sample_name)
        if not isinstance(sample, torch.Tensor):
            raise TypeError(f"the model's {sample_name} must be a tensor, got {class_name(sample)}")
        timestep = bound.arguments.get("timestep")
        if self.plan is None:
            self._start(sample, timestep)
        plan = self.plan
        t = _timestep_value(timestep) * self.t_scale
        j, k = self._next_call(t)
        first = bool(plan.first[j])
        if k == 0 and plan.checks_order and bool(self.scheduler.state_in_first_order) != first:
            raise RuntimeError(
                f"model call {j} of {class_name(self.scheduler)}: the scheduler's step structure is not the "
                "expected first, second, first, ... call order"
            )
        if k == len(self.branches):
            if j != self.begin:
                raise RuntimeError(f"the pipeline made {k + 1} model calls at timestep {t:g}, {k} at the first step")
            self._add_branch(sample)
        branch = self.branches[k]
        if sample.shape[0] != branch.n:
            raise ValueError(f"the model batch changed within one pipeline call ({branch.n} -> {sample.shape[0]} rows)")
        self.j, self.k = j, k
        if first and k == 0:
            self.step += 1
        return branch.call(original, bound, sample_name, first, self.step, float(plan.call_sigmas[j]))

    def _add_branch(self, sample: torch.Tensor) -> None:
        handle = self.handle
        if not self.branches:
            branch = _Branch(self, 0, sample, handle.policy)
            self.sizes = None if handle.pad_to is None else bucket_sizes(handle.pad_to, branch.B, "pad_to")
        else:
            leader = self.branches[0]
            branch = _Branch(self, len(self.branches), sample, _Follow(handle.policy, leader.run))
            if branch.B != leader.B:
                raise ValueError(
                    f"the pipeline's model calls of one step hold different prompt batches ({leader.B} and {branch.B} rows)"
                )
        self.branches.append(branch)

    def report(self):
        """The SkipReport if the loop made all its model calls and the final latent was seen."""
        if not self.branches or self.j != len(self.plan.timesteps) - 1 or self.last_latent is None:
            return None
        if self.k + 1 != (self.n_branches or 1):
            return None
        leader = self.branches[0]
        lat = self.last_latent.to(self.dtype)
        if self.plan.sampler.space == "vp":
            lat = lat * math.sqrt(1 + self.plan.final_sigma**2)
        x = lat.unsqueeze(1).expand(leader.B, leader.c, *lat.shape[1:]).contiguous()
        report = leader.run.finish(x, x.new_full((leader.B,), self.plan.final_sigma))
        if len(self.branches) > 1:
            report = replace(report, model_calls=sum(b.run.model_calls for b in self.branches))
        return report
