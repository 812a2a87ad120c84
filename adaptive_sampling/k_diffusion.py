"""Make a k-diffusion sampler adaptive, as a drop-in::

    import k_diffusion as K
    from adaptive_sampling import ThirdOrder
    from adaptive_sampling.k_diffusion import adaptive

    sample = adaptive(K.sampling.sample_dpmpp_2m, skip=ThirdOrder(delta=0.01))
    x = sample(model, x, sigmas, extra_args=extra)                  # same signature, same return
    x, report = sample.with_report(model, x, sigmas, extra_args=extra)  # plus the SkipReport

This module never imports ``k_diffusion``: it works on the samplers' calling convention. The
wrapped sampler runs unchanged; only the ``model`` it receives is replaced by a per-call proxy
that decides, at the first model call of each step, which rows call the real model and which
reuse their previous noise prediction (``x - sigma * eps_prev``: eps is reused, never the cached
``denoised``). A ``callback`` is always passed so the proxy can check the step structure; the
user's callback still receives k-diffusion's dict, plus ``computed`` ([B] bool).

Step boundaries (which model call starts a step) come from this table, since they cannot be
read off sigma alone (a Heun step's second call uses the next step's sigma):

==========================  =========  ====================================================
sampler                     calls/step which calls may be skipped
==========================  =========  ====================================================
sample_euler (any s_churn)  1          every call after warm-up (the model sees x after churn)
sample_euler_ancestral      1          every call after warm-up
sample_lms                  1          every call after warm-up (the reused eps enters the
                                       LMS derivative history)
sample_dpmpp_2m             1          every call after warm-up (the reused eps becomes an x0
                                       estimate at the current x, sigma in the solver history)
sample_dpmpp_2m_sde         1          every call after warm-up
sample_dpmpp_3m_sde         1          every call after warm-up
sample_heun                 2          the FIRST call of a step only. It reuses the latest
sample_dpm_2                2          computed eps, which is the previous step's second call
sample_dpm_2_ancestral      2          (for Heun: evaluated at this very sigma). The second
sample_dpmpp_2s_ancestral   2          (corrector / midpoint) call always runs, so a skipped
sample_dpmpp_sde            2          step still has a fresh evaluation and stays second
                                       order; a skipped step saves one of its two calls.
                                       The last step (to sigma = 0) has only its first call.
sample_dpm_fast,            variable   not supported: the number of calls per step varies,
sample_dpm_adaptive                    so there is no step to skip (a clear ValueError).
==========================  =========  ====================================================

Any other sampler raises a ValueError unless ``generic=True``, which assumes one model call per
step followed by one callback (the shape of every one-call sampler above); a sampler that does
not follow it is detected at its first callback and stopped with an error.

Stochastic samplers (ancestral, SDE, Euler with churn): the latent the rule sees at a step
boundary includes the noise injected so far, so ``d_k = mean|x_k - x_{k-1}|`` is dominated by
fresh noise of size ~sigma_up, whose magnitude varies smoothly with the schedule. The rule then
reacts to the noise schedule more than to the model's smoothness; see the README for how many
calls the default skips on them.

The skipped prediction is the model's whole output, so a classifier-free-guidance function
passed as ``model`` is skipped as one: both branches are reused together. Per-sample decisions
call it on the needed rows only, slicing every ``extra_args`` tensor whose first dimension is
the batch size (recursively through dicts, lists and tuples).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .policies import SkipPolicy, ThirdOrder
from .runner import SkipRun
from .steppers import ancestral_split

__all__ = ["adaptive", "SUPPORTED_SAMPLERS"]

ONE_CALL = ("sample_euler", "sample_euler_ancestral", "sample_lms", "sample_dpmpp_2m", "sample_dpmpp_2m_sde",
            "sample_dpmpp_3m_sde")  # fmt: skip
TWO_CALL = ("sample_heun", "sample_dpm_2", "sample_dpm_2_ancestral", "sample_dpmpp_2s_ancestral", "sample_dpmpp_sde")
VARIABLE_NFE = ("sample_dpm_fast", "sample_dpm_adaptive")
SUPPORTED_SAMPLERS = ONE_CALL + TWO_CALL
_ANCESTRAL_TWO_CALL = ("sample_dpm_2_ancestral", "sample_dpmpp_2s_ancestral")


def _name(fn: Callable) -> str:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "__name__", type(fn).__name__)


@dataclass(frozen=True)
class _Structure:
    """Where steps begin: ``second_call[i]`` says whether step i makes a second model call."""

    second_call: tuple[bool, ...]


def _structure(name: str, sigmas: torch.Tensor, arguments: dict) -> _Structure:
    n = len(sigmas) - 1
    if name in TWO_CALL:
        if name in _ANCESTRAL_TWO_CALL:  # the second call happens when sigma_down > 0
            eta = float(arguments.get("eta", 1.0))
            downs = [float(ancestral_split(sigmas[i], sigmas[i + 1], eta)[0]) for i in range(n)]
            return _Structure(tuple(d > 0 for d in downs))
        return _Structure(tuple(bool(sigmas[i + 1] > 0) for i in range(n)))
    return _Structure((False,) * n)


class _ModelProxy:
    """Stands in for the model during one wrapped call; routes each call through the SkipRun."""

    def __init__(self, run: SkipRun, structure: _Structure, name: str, user_callback):
        self.run, self.structure, self.name = run, structure, name
        self.user_callback = user_callback
        self.step = -1  # index of the latest step whose first call has happened
        self.expect_second = False

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **extra_args) -> torch.Tensor:
        if self.expect_second:
            self.expect_second = False
            return self.run.call_model(self.step, x, sigma, extra_args)
        self.step += 1
        if self.step >= self.run.num_steps:
            raise RuntimeError(f"{self.name} called the model more often than its {self.run.num_steps} steps allow")
        self.expect_second = self.structure.second_call[self.step]
        return self.run.denoise(self.step, x, sigma, extra_args)

    def callback(self, info: dict) -> None:
        if info.get("i") != self.step:
            raise RuntimeError(
                f"{self.name} reported step {info.get('i')} after the first call of step {self.step}: "
                "its model calls do not follow the step structure adaptive() assumed "
                "(see adaptive_sampling.k_diffusion's table; generic=True assumes one call per step)"
            )
        if self.user_callback is not None:
            self.user_callback({**info, "computed": torch.from_numpy(self.run.last_computed.copy())})


def adaptive(sampler_fn: Callable, skip: SkipPolicy | None = None, *, generic: bool = False) -> Callable:
    """Wrap a k-diffusion sampler function so its model calls follow the ``skip`` policy.

    sampler_fn: e.g. ``k_diffusion.sampling.sample_euler`` (or any function with the same calling
        convention: ``(model, x, sigmas, extra_args=None, callback=None, disable=None, ...)``).
    skip: the policy (default ``ThirdOrder()``); ``None`` is not allowed here, use the sampler itself.
    generic: accept a sampler that is not in the table, assuming one model call per step.

    Returns a function with the sampler's own signature and return value; its ``with_report``
    attribute runs the same call and returns ``(x, report)``. No state is shared between calls:
    two wrapped samplers may run at once in threads.
    """
    name = _name(sampler_fn)
    if name in VARIABLE_NFE:
        raise ValueError(
            f"{name} makes a variable number of model calls per step; adaptive skipping needs a fixed "
            f"step structure (supported: {', '.join(SUPPORTED_SAMPLERS)})"
        )
    if name not in SUPPORTED_SAMPLERS and not generic:
        raise ValueError(
            f"unknown sampler {name!r}: supported are {', '.join(SUPPORTED_SAMPLERS)}; pass generic=True for a "
            "sampler that makes exactly one model call per step and calls callback after it"
        )
    policy = ThirdOrder() if skip is None else skip
    if not callable(getattr(policy, "start", None)):
        raise TypeError(f"skip must be a skip policy (ThirdOrder, FixedMask, ...), got {skip!r}")
    signature = inspect.signature(sampler_fn)
    for needed in ("model", "x", "sigmas", "callback"):
        if needed not in signature.parameters:
            raise TypeError(f"{name} has no {needed!r} parameter; it does not follow k-diffusion's calling convention")

    def with_report(*args: Any, **kwargs: Any):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        run = SkipRun(a["model"], a["x"], a["sigmas"], a.get("extra_args"), policy, name)
        proxy = _ModelProxy(run, _structure(name, run.sigmas, a), name, a["callback"])
        a["model"], a["callback"] = proxy, proxy.callback
        out = sampler_fn(*bound.args, **bound.kwargs)
        if proxy.step != run.num_steps - 1:
            raise RuntimeError(f"{name} made {proxy.step + 1} steps, the sigmas give {run.num_steps}")
        return out, run.finish(out, run.sigma_rows(-1, out))

    @functools.wraps(sampler_fn)
    def wrapped(*args: Any, **kwargs: Any):
        return with_report(*args, **kwargs)[0]

    wrapped.with_report = with_report  # type: ignore[attr-defined]
    wrapped.skip = policy  # type: ignore[attr-defined]
    return wrapped
