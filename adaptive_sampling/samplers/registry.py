"""The sampler registry: one table that describes every sampler the library knows, by name.

Every place that needs a fact about a sampler reads it here, never from a list of its own:

* the skip policies: which latent the paper's rule measures by default (``space``);
* ``evaluate``, ``calibrate``, ``Calibrated`` and ``default_policy``: the library's loop of a
  name (``sample``) and which names exist;
* ``BySampler`` and the demo: the names;
* the k-diffusion wrapper: how many model calls a step makes (``calls_per_step``, ``ancestral``);
* the diffusers hook and adapter: which scheduler classes run the same solver (``schedulers``).

A new sampler is one module with its stepper and loop that calls ``register_sampler`` once
(``samplers/euler.py`` is the model to copy). Samplers the library has no loop for (k-diffusion's
ancestral and two-call samplers, diffusers-only solvers) are registered as descriptions
(``sample=None``), so the wrapper and the hook know them.

Policies receive the ``Sampler`` entry in ``start(x, num_steps, sampler, sigmas)``; a plain name
is looked up with ``resolve``, which describes an unregistered name as a one-call sampler that
measures the VE latent (what the rule assumes for a sampler it knows nothing about).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

__all__ = ["Sampler", "Space", "register_sampler", "get_sampler", "resolve", "sampler_names", "default_space"]

Space = Literal["vp", "ve", "flow"]
SPACES = ("vp", "ve", "flow")


@dataclass(frozen=True)
class Sampler:
    """What the library knows about one sampler.

    name: the registry key (k-diffusion's sampler name without ``sample_``).
    space: the latent the paper's rule measures by default: ``"vp"`` (x / sqrt(1 + sigma^2), what
        diffusers' DDIM and DPM-Solver schedulers hold), ``"ve"`` (x itself, what Euler-like
        schedulers hold) or ``"flow"`` (the rectified-flow latent, what flow schedulers hold).
    sample: the library's sampling loop, ``sample(model, x, sigmas, extra_args, callback, disable,
        *, skip) -> (x, SkipReport)``; ``None`` for a sampler known only by description.
    calls_per_step: model calls per step (2 for Heun-like samplers; ``None``: varies, cannot skip).
    multistep: the solver keeps a history of past model outputs (a reused eps enters it).
    ancestral: an ancestral step (k-diffusion's ``get_ancestral_step``: a deterministic part down to
        sigma_down, then fresh noise); a two-call ancestral step makes its second call only when
        sigma_down > 0.
    convention: the model convention the loop drives: ``"ve"`` (k-diffusion's: x = x0 + sigma *
        eps) or ``"flow"`` (rectified flow: x = (1 - s) x0 + s * eps, sigmas s in [0, 1]).
    schedulers: names of diffusers scheduler classes that run the same solver.
    """

    name: str
    space: Space
    sample: Callable | None = None
    calls_per_step: int | None = 1
    multistep: bool = False
    ancestral: bool = False
    convention: Literal["ve", "flow"] = "ve"
    schedulers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or self.name.startswith("sample_"):
            raise ValueError(f"name must be a non-empty str without the 'sample_' prefix, got {self.name!r}")
        if self.space not in SPACES:
            raise ValueError(f"space must be one of {SPACES}, got {self.space!r}")
        if self.sample is not None and not callable(self.sample):
            raise TypeError(f"sample must be a sampling function or None, got {self.sample!r}")
        if self.calls_per_step not in (None, 1, 2):
            raise ValueError(f"calls_per_step must be 1, 2 or None (variable), got {self.calls_per_step!r}")
        if self.convention not in ("ve", "flow"):
            raise ValueError(f"convention must be 've' or 'flow', got {self.convention!r}")

    @property
    def runnable(self) -> bool:
        """Whether the library has a loop for this sampler (``evaluate`` and ``calibrate`` need one)."""
        return self.sample is not None


_REGISTRY: dict[str, Sampler] = {}


def register_sampler(sampler: Sampler, *, replace: bool = False) -> Sampler:
    """Add ``sampler`` to the table (an existing name needs ``replace=True``). Returns it."""
    if not isinstance(sampler, Sampler):
        raise TypeError(f"sampler must be a Sampler, got {type(sampler).__name__}")
    if sampler.name in _REGISTRY and not replace:
        raise ValueError(f"a sampler named {sampler.name!r} is already registered (pass replace=True to replace it)")
    _REGISTRY[sampler.name] = sampler
    return sampler


def unregister_sampler(name: str) -> None:
    """Remove a name (for tests and plug-ins that register temporarily)."""
    _REGISTRY.pop(name, None)


def _key(name: str) -> str:
    return name.removeprefix("sample_")


def get_sampler(name: str | Sampler, *, runnable: bool = False, argument: str = "sampler") -> Sampler:
    """The registered sampler called ``name`` (k-diffusion's ``sample_`` prefix is accepted).

    runnable: also require the library's own loop. An unknown name is a ValueError naming
    ``argument`` and listing the known names.
    """
    if isinstance(name, Sampler):
        entry = name
    elif isinstance(name, str) and _key(name) in _REGISTRY:
        entry = _REGISTRY[_key(name)]
    else:
        known = sampler_names(runnable=runnable)
        raise ValueError(f"{argument} must be one of {known}, got {name!r}")
    if runnable and not entry.runnable:
        raise ValueError(
            f"{argument} must be one of {sampler_names(runnable=True)} (a sampler with a library loop), got {name!r}: "
            "it is known by description only"
        )
    return entry


def resolve(sampler: str | Sampler) -> Sampler:
    """The ``Sampler`` for a name or entry; an unregistered name is described as a one-call
    sampler measuring the VE latent (see the module docstring)."""
    if isinstance(sampler, Sampler):
        return sampler
    if not isinstance(sampler, str):
        raise TypeError(f"sampler must be a sampler name or a Sampler, got {type(sampler).__name__}")
    return _REGISTRY.get(_key(sampler)) or Sampler(_key(sampler) or "unnamed", "ve")


def sampler_names(*, runnable: bool = False, convention: str | None = None) -> list[str]:
    """Registered names, in registration order (``runnable``: with a library loop only)."""
    return [
        s.name
        for s in _REGISTRY.values()
        if (s.runnable or not runnable) and (convention is None or s.convention == convention)
    ]


def default_space(sampler: str | Sampler) -> Space:
    """The latent the paper's rule measures for ``sampler`` by default (``resolve(sampler).space``)."""
    return resolve(sampler).space


def registered() -> dict[str, Sampler]:
    """A copy of the table."""
    return dict(_REGISTRY)


# Samplers known by description only (no library loop): k-diffusion's other samplers and the
# diffusers solvers the hook names. Their measured space is the latent the matching diffusers
# scheduler holds: VP for the DPM-Solver family, VE for the k-diffusion ports.
for _entry in (
    Sampler("euler_ancestral", "ve", ancestral=True, schedulers=("EulerAncestralDiscreteScheduler",)),
    Sampler("lms", "ve", multistep=True, schedulers=("LMSDiscreteScheduler",)),
    Sampler("dpmpp_2m_sde", "vp", multistep=True),
    Sampler("dpmpp_3m_sde", "vp", multistep=True),
    Sampler("heun", "ve", calls_per_step=2, schedulers=("HeunDiscreteScheduler",)),
    Sampler("dpm_2", "ve", calls_per_step=2, schedulers=("KDPM2DiscreteScheduler",)),
    Sampler("dpm_2_ancestral", "ve", calls_per_step=2, ancestral=True, schedulers=("KDPM2AncestralDiscreteScheduler",)),
    Sampler("dpmpp_2s_ancestral", "vp", calls_per_step=2, ancestral=True),
    Sampler("dpmpp_sde", "ve", calls_per_step=2, schedulers=("DPMSolverSDEScheduler",)),
    Sampler("dpm_fast", "ve", calls_per_step=None),
    Sampler("dpm_adaptive", "ve", calls_per_step=None),
):
    register_sampler(_entry)
