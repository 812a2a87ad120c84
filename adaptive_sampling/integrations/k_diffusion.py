"""Make a k-diffusion sampler adaptive, as a drop-in::

    import k_diffusion as K
    from adaptive_sampling import default_policy
    from adaptive_sampling.integrations.k_diffusion import adaptive

    sample = adaptive(K.sampling.sample_dpmpp_2m, skip=default_policy())
    x = sample(model, x, sigmas, extra_args=extra)                  # same signature, same return
    x, report = sample.with_report(model, x, sigmas, extra_args=extra)  # plus the SkipReport

This module never imports ``k_diffusion``: it works on the samplers' calling convention. The
wrapped sampler runs unchanged; only the ``model`` it receives is replaced by a per-call proxy
that decides, at the first model call of each step, which rows call the real model and which
reuse their previous noise prediction (``x - sigma * eps_prev``: eps is reused, never the cached
``denoised``). A ``callback`` is always passed so the proxy can check the step structure; the
user's callback still receives k-diffusion's dict, plus ``computed`` ([B] bool).

Step boundaries (which model call starts a step) come from the sampler registry
(``Sampler.calls_per_step`` and ``ancestral``, looked up by the function's name), since they
cannot be read off sigma alone (a Heun step's second call uses the next step's sigma). For
k-diffusion's samplers that gives:

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

Any other sampler raises a ValueError unless it is registered (``register_sampler``, with its
calls per step) or ``generic=True``, which assumes one model call per step followed by one
callback (the shape of every one-call sampler above); a sampler that does not follow it is
detected at its first callback and stopped with an error.

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
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch

from ..policies import SkipPolicy, check_policy, default_policy
from ..runner import SkipRun, check_merge_mode
from ..samplers import ancestral_split
from ..samplers.registry import Sampler, registered

__all__ = ["adaptive", "SUPPORTED_SAMPLERS", "TWO_CALL"]

# k-diffusion's sampler functions (the names its ``k_diffusion.sampling`` defines): the set this
# wrapper documents and tests. How each one steps comes from the registry, not from here.
K_DIFFUSION_SAMPLERS = (
    "sample_euler", "sample_euler_ancestral", "sample_lms", "sample_dpmpp_2m", "sample_dpmpp_2m_sde",
    "sample_dpmpp_3m_sde", "sample_heun", "sample_dpm_2", "sample_dpm_2_ancestral", "sample_dpmpp_2s_ancestral",
    "sample_dpmpp_sde", "sample_dpm_fast", "sample_dpm_adaptive",
)  # fmt: skip


def _entry(fn_name: str) -> Sampler | None:
    return registered().get(fn_name.removeprefix("sample_"))


SUPPORTED_SAMPLERS = tuple(n for n in K_DIFFUSION_SAMPLERS if (e := _entry(n)) is not None and e.calls_per_step)
TWO_CALL = tuple(n for n in SUPPORTED_SAMPLERS if _entry(n).calls_per_step == 2)


def _name(fn: Callable) -> str:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "__name__", type(fn).__name__)


@dataclass(frozen=True)
class _Structure:
    """Where steps begin: ``second_call[i]`` says whether step i makes a second model call."""

    second_call: tuple[bool, ...]


def _structure(spec: Sampler, sigmas: torch.Tensor, arguments: dict) -> _Structure:
    n = len(sigmas) - 1
    if spec.calls_per_step == 2:
        if spec.ancestral:  # the second call happens when sigma_down > 0
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
                "(see adaptive_sampling.integrations.k_diffusion; generic=True assumes one call per step)"
            )
        if self.user_callback is not None:
            self.user_callback({**info, "computed": torch.from_numpy(self.run.last_computed.copy())})


def adaptive(
    sampler_fn: Callable, skip: SkipPolicy | None = None, *, generic: bool = False, convention: str = "ve"
) -> Callable:
    """Wrap a k-diffusion sampler function so its model calls follow the ``skip`` policy.

    sampler_fn: e.g. ``k_diffusion.sampling.sample_euler`` (or any function with the same calling
        convention: ``(model, x, sigmas, extra_args=None, callback=None, disable=None, ...)``).
    skip: the policy (default ``default_policy()``, the library's recommendation); to sample
        without skipping, call the sampler itself.
    generic: accept a sampler the registry does not know, assuming one model call per step.
    convention: the model's convention. ``"ve"`` (k-diffusion's: x = x0 + sigma eps, sigmas from
        sigma_max down to 0) or ``"flow"`` (rectified-flow models in ComfyUI's "CONST" form: the
        sampler runs on the flow latent x = (1 - s) x0 + s eps with sigmas = s in [0, 1], the model
        returns x0 = x - s v, and k-diffusion's ``to_d`` is then the velocity). Eps, its forecasts
        and the rule's measured latent follow it (the flow latent for ``"flow"``). A grid above 1
        with ``"flow"``, or one that starts at exactly 1 with ``"ve"``, is a ValueError.

    Sigmas meet the latent in its dtype: the wrapped sampler receives ``sigmas`` cast to ``x``'s
    floating dtype (k-diffusion's samplers would otherwise turn a float32 latent into float64 when
    given float64 sigmas, such as the library's ``get_sigmas_karras``, and a float32 network fails).

    Returns a function with the sampler's own signature and return value; its ``with_report``
    attribute runs the same call and returns ``(x, report)``. No state is shared between calls:
    two wrapped samplers may run at once in threads.
    """
    if not callable(sampler_fn):
        raise TypeError(f"sampler_fn must be a k-diffusion sampler function, got {sampler_fn!r}")
    name = _name(sampler_fn)
    spec = _entry(name)
    if spec is not None and spec.calls_per_step is None:
        raise ValueError(
            f"{name} makes a variable number of model calls per step; adaptive skipping needs a fixed "
            f"step structure (supported: {', '.join(SUPPORTED_SAMPLERS)})"
        )
    if convention not in ("ve", "flow"):
        raise ValueError(f"convention must be 've' or 'flow', got {convention!r}")
    if spec is None:
        if not generic:
            raise ValueError(
                f"unknown sampler {name!r}: supported are {', '.join(SUPPORTED_SAMPLERS)}; register it "
                "(adaptive_sampling.register_sampler) or pass generic=True for a sampler that makes exactly one model "
                "call per step and calls callback after it"
            )
        spec = Sampler(name.removeprefix("sample_") or "generic", "ve")
    if convention == "flow":
        spec = replace(spec, convention="flow", space="flow")
    policy = default_policy() if skip is None else check_policy(skip, "skip")
    check_merge_mode(policy, merge_skipped=False)  # k-diffusion's loops have no merge mode
    signature = inspect.signature(sampler_fn)
    for needed in ("model", "x", "sigmas", "callback"):
        if needed not in signature.parameters:
            raise TypeError(f"{name} has no {needed!r} parameter; it does not follow k-diffusion's calling convention")

    def with_report(*args: Any, **kwargs: Any):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        x, sigmas = a["x"], a["sigmas"]
        if isinstance(x, torch.Tensor) and x.is_floating_point() and isinstance(sigmas, torch.Tensor) and sigmas.is_floating_point():
            a["sigmas"] = sigmas.to(x.dtype)
        run = SkipRun(a["model"], x, a["sigmas"], a.get("extra_args"), policy, spec)
        proxy = _ModelProxy(run, _structure(spec, run.sigmas, a), name, a["callback"])
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
