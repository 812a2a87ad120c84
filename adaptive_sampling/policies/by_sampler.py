"""``BySampler``: one policy object that picks a different policy for each sampler it runs with.

Used by ``default_policy()`` (no sampler named): the recommendation differs per sampler, and a
user who passes ``skip=default_policy()`` to any sampler, or to the k-diffusion wrapper, gets the
recommendation for that sampler. Sampler names may carry k-diffusion's ``sample_`` prefix.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .base import SkipPolicy, resolve

__all__ = ["BySampler"]


@dataclass(frozen=True)
class BySampler(SkipPolicy):
    """``policies``: sampler name -> policy; ``fallback``: the policy for any other sampler
    (None: other samplers are refused with an error naming the known ones)."""

    policies: dict = field(default_factory=dict)
    fallback: SkipPolicy | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.policies, dict):
            raise TypeError(f"policies must be a dict of sampler name -> policy, got {type(self.policies).__name__}")
        for name, p in list(self.policies.items()) + [("fallback", self.fallback)]:
            if not isinstance(name, str):
                raise TypeError(f"policies keys must be sampler names (str), got {name!r}")
            if p is not None and not isinstance(p, SkipPolicy):
                raise ValueError(f"policies[{name!r}] must be a skip policy, got {p!r}")
        object.__setattr__(self, "policies", {k.removeprefix("sample_"): v for k, v in self.policies.items()})

    def _all(self) -> list[SkipPolicy]:
        return list(self.policies.values()) + ([self.fallback] if self.fallback is not None else [])

    @property
    def per_sample(self) -> bool:  # type: ignore[override]
        return all(p.per_sample for p in self._all())

    @property
    def shardable(self) -> bool:  # type: ignore[override]
        return all(p.shardable for p in self._all())

    def policy_for(self, sampler) -> SkipPolicy:
        """The policy for a sampler name or registry entry (``sample_`` prefix optional)."""
        name = resolve(sampler).name
        policy = self.policies.get(name, self.fallback)
        if policy is None:
            raise ValueError(f"no policy for sampler {name!r}; known: {sorted(self.policies)}")
        return policy

    def start(self, x: torch.Tensor, num_steps: int, sampler, sigmas: torch.Tensor | None = None):
        return self.policy_for(sampler).start(x, num_steps, sampler, sigmas=sigmas)
