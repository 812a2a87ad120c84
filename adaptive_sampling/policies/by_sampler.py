"""``BySampler``: one policy object that picks a different policy for each sampler it runs with.

Used by ``default_policy()`` (no sampler named): the recommendation differs per sampler, and a
user who passes ``skip=default_policy()`` to any sampler, or to the k-diffusion wrapper, gets the
recommendation for that sampler. Sampler names may carry k-diffusion's ``sample_`` prefix.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .base import SkipPolicy

__all__ = ["BySampler"]


@dataclass(frozen=True)
class BySampler:
    """``policies``: sampler name -> policy; ``fallback``: the policy for any other sampler
    (None: other samplers are refused with an error naming the known ones)."""

    policies: dict = field(default_factory=dict)
    fallback: SkipPolicy | None = None

    def __post_init__(self) -> None:
        for name, p in list(self.policies.items()) + [("fallback", self.fallback)]:
            if p is not None and not callable(getattr(p, "start", None)):
                raise ValueError(f"policies[{name!r}] must be a skip policy, got {p!r}")

    def policy_for(self, sampler: str) -> SkipPolicy:
        name = sampler.removeprefix("sample_")
        policy = self.policies.get(name, self.fallback)
        if policy is None:
            raise ValueError(f"no policy for sampler {sampler!r}; known: {sorted(self.policies)}")
        return policy

    def start(self, x: torch.Tensor, num_steps: int, sampler: str, sigmas: torch.Tensor | None = None):
        return self.policy_for(sampler).start(x, num_steps, sampler, sigmas=sigmas)
