"""One sampling call's skipping machinery: input checks, skip decisions, the model proxy, the report.

Every sampling loop (the library's own and the k-diffusion wrapper) creates a ``SkipRun`` per
call and asks it for the denoiser output of each step. The run

* checks the inputs once (clear errors naming the argument);
* asks the policy's controller which rows call the model (one device-to-host read per step);
* calls the model on exactly those rows (gather, call, scatter; batch-leading tensors in
  ``extra_args`` are sliced alike) and checks what comes back;
* answers skipped rows with ``x - sigma * eps_hat``, where ``eps_hat`` is what the controller's
  reuse strategy gives (the last eps, or a forecast), re-expressed at the current latent and
  sigma. Reuse is of eps, never of the cached x0 (SPEC.md); computed rows' eps are recorded
  back into the controller;
* builds the ``SkipReport`` from its own bookkeeping (mask, NFE, calls) and the controller's
  ``signals()``. The runner never reads a controller's fields: any object that follows the
  protocol of ``policies.base`` works.

State lives on the instance only, so a failed call leaves nothing behind and concurrent calls
(threads) do not interact.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from .policies import FixedMask, NonFiniteLatent, SkipPolicy
from .policies.base import Controller
from .report import SkipReport

__all__ = ["SkipRun", "as_sigmas", "check_sigmas", "check_latent", "slice_rows"]


def check_latent(x: Any, name: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = f"a {x.dtype} tensor" if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"{name} must be a floating-point torch.Tensor, got {got}")
    if x.ndim < 2 or x.shape[0] < 1 or x.numel() == 0:
        raise ValueError(f"{name} must be shaped [batch, ...] with at least one data dimension, got {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} holds NaN or Inf")
    return x


def as_sigmas(sigmas: Any, name: str = "sigmas") -> torch.Tensor:
    """A sigma schedule as a tensor: tensors pass unchanged, lists / tuples / numpy arrays of
    numbers become float64 CPU tensors; anything else is a TypeError naming the argument."""
    if isinstance(sigmas, torch.Tensor):
        return sigmas
    if isinstance(sigmas, (list, tuple, np.ndarray)):
        try:
            return torch.as_tensor(np.asarray(sigmas, dtype=np.float64))
        except (TypeError, ValueError) as e:
            raise TypeError(f"{name} must be a 1-D tensor (or list / numpy array) of noise levels") from e
    raise TypeError(f"{name} must be a 1-D tensor (or list / numpy array) of noise levels, got {type(sigmas).__name__}")


def check_sigmas(sigmas: Any, name: str = "sigmas") -> torch.Tensor:
    """Validate a sigma schedule; returns a float64 CPU copy (one read at the start of a call)."""
    sigmas = as_sigmas(sigmas, name)
    if sigmas.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(sigmas.shape)}")
    if len(sigmas) < 2:
        raise ValueError(f"{name} needs at least 2 entries (one step), got {len(sigmas)}")
    host = sigmas.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(host).all()):
        raise ValueError(f"{name} holds NaN or Inf")
    if not bool((host[1:] < host[:-1]).all()):
        raise ValueError(f"{name} must be strictly decreasing")
    if not bool((host[:-1] > 0).all()) or host[-1] < 0:
        raise ValueError(f"{name} must be positive (only the last may be 0)")
    return host


def slice_rows(value: Any, rows: torch.Tensor, batch: int) -> Any:
    """Select ``rows`` of every tensor whose first dimension is the batch size, recursively
    through dicts, lists and tuples; anything else passes unchanged."""
    if isinstance(value, torch.Tensor):
        return value.index_select(0, rows.to(value.device)) if value.ndim and value.shape[0] == batch else value
    if isinstance(value, dict):
        return {k: slice_rows(v, rows, batch) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [slice_rows(v, rows, batch) for v in value]
        return type(value)(items) if not hasattr(value, "_fields") else type(value)(*items)
    return value


def _rows(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a [B] tensor against a [B, ...] one."""
    return t.reshape(-1, *([1] * (like.ndim - 1)))


class SkipRun:
    """The per-call skipping state. See the module docstring."""

    def __init__(
        self,
        model: Callable[..., torch.Tensor],
        x: torch.Tensor,
        sigmas: torch.Tensor,
        extra_args: dict | None,
        skip: SkipPolicy | None,
        sampler: str,
    ) -> None:
        if not callable(model):
            raise TypeError(f"model must be callable as model(x, sigma, **extra_args), got {type(model).__name__}")
        check_latent(x)
        self.sigmas = check_sigmas(sigmas)
        if extra_args is not None and not isinstance(extra_args, dict):
            raise TypeError(f"extra_args must be a dict or None, got {type(extra_args).__name__}")
        if skip is not None and not callable(getattr(skip, "start", None)):
            raise TypeError(f"skip must be a skip policy (ThirdOrder, FixedMask, ...) or None, got {skip!r}")
        self.model = model
        self.extra_args = extra_args or {}
        self.sampler = sampler
        self.policy = skip
        self.given = as_sigmas(sigmas)  # the caller's grid as a tensor (its device and dtype)
        self.schedule = self.given.detach().cpu()  # the same on the host, for the solver updates
        self.num_steps = len(self.sigmas) - 1
        self.batch = x.shape[0]
        policy = skip or FixedMask(np.ones(self.num_steps, bool))
        self.controller: Controller = policy.start(x, self.num_steps, sampler, sigmas=self.sigmas)
        self.can_skip = bool(getattr(self.controller, "can_skip", True))
        self.computed = np.zeros((self.batch, self.num_steps), dtype=bool)
        self.model_calls = 0
        self.extra_evaluations = 0  # per-row evaluations outside the skippable calls
        self.last_output: torch.Tensor | None = None
        self.last_computed = np.ones(self.batch, dtype=bool)

    def denoise(self, step: int, x: torch.Tensor, sigma: torch.Tensor, extra_args: dict | None = None) -> torch.Tensor:
        """The denoiser output for step ``step`` at latent x and noise level ``sigma`` ([B]).

        Rows the policy lets skip get ``x - sigma * eps_prev``; the others call the model.
        ``extra_args`` defaults to the ones the run was started with.
        """
        extra_args = self.extra_args if extra_args is None else extra_args
        try:
            compute = self._decide(step, x, sigma)
        except NonFiniteLatent as e:
            raise self._non_finite_error(e) from None
        self.last_computed = compute
        self.computed[:, step] = compute
        if compute.all():
            denoised = self._call_model(step, x, sigma, extra_args)
            if self.can_skip:
                self.controller.record(step, sigma, (x - denoised) / _rows(sigma, x), None)
            return denoised
        sigma_rows = _rows(sigma, x)
        denoised = x - sigma_rows * self.controller.reuse(step, sigma)
        if compute.any():
            rows = torch.from_numpy(np.flatnonzero(compute)).to(x.device)
            x_rows = x.index_select(0, rows)
            extra = slice_rows(extra_args, rows, self.batch)
            out = self._call_model(step, x_rows, sigma.index_select(0, rows), extra)
            denoised.index_copy_(0, rows, out)
            eps = (x_rows - out) / sigma_rows.index_select(0, rows)
            self.controller.record(step, sigma.index_select(0, rows), eps, rows)
        return denoised

    def _decide(self, step: int, x: torch.Tensor, sigma: torch.Tensor) -> np.ndarray:
        """The controller's decision, checked against the protocol (one bool per row, call 0 computes)."""
        compute = self.controller.decide(step, x, sigma)
        if not isinstance(compute, np.ndarray) or compute.shape != (self.batch,) or compute.dtype != bool:
            got = f"{compute.dtype} array of shape {compute.shape}" if isinstance(compute, np.ndarray) else type(compute).__name__
            raise TypeError(f"the skip policy's decide() must return a numpy bool array of shape ({self.batch},), got {got}")
        if step == 0 and not compute.all():
            raise ValueError("the skip policy skipped call 0, which has no prediction to reuse")
        return compute

    def call_model(self, step: int, x: torch.Tensor, sigma: torch.Tensor, extra_args: dict | None = None) -> torch.Tensor:
        """An extra model call that is never skipped (the second call of a two-call step).

        It evaluates every row; its eps becomes the one the next skipped call reuses.
        """
        extra_args = self.extra_args if extra_args is None else extra_args
        denoised = self._call_model(step, x, sigma, extra_args)
        self.extra_evaluations += 1
        if self.can_skip:
            self.controller.record(step, sigma, (x - denoised) / _rows(sigma, x), None)
        return denoised

    def _call_model(self, step, x, sigma, extra) -> torch.Tensor:
        out = self.model(x, sigma, **extra)
        self.model_calls += 1
        if not isinstance(out, torch.Tensor) or out.shape != x.shape or out.dtype != x.dtype:
            got = f"{tuple(out.shape)} {out.dtype}" if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"model returned {got} at step {step}; expected a tensor of the input's shape "
                f"{tuple(x.shape)} and dtype {x.dtype}"
            )
        self.last_output = out
        return out

    def _non_finite_error(self, e: NonFiniteLatent) -> FloatingPointError:
        step = e.step - 1
        sigma = float(self.sigmas[step])
        if self.last_output is not None and not bool(torch.isfinite(self.last_output).all()):
            what = "the model returned NaN/Inf"
        elif not self.last_computed.all():
            what = "the latent became NaN/Inf (skipped call: the update overflowed)"
        else:
            what = "the latent became NaN/Inf (the solver update overflowed)"
        return FloatingPointError(f"{what} at step {step} (sigma={sigma:.6g}), batch rows {e.rows.tolist()}")

    def finish(self, x: torch.Tensor, sigma: torch.Tensor) -> SkipReport:
        """Check the final latent and assemble the report."""
        try:
            self.controller.finish(x, sigma)
        except NonFiniteLatent as e:
            raise self._non_finite_error(e) from None
        if not bool(torch.isfinite(x).all()):  # for controllers that check nothing themselves
            raise self._non_finite_error(NonFiniteLatent(self.num_steps, np.flatnonzero(
                ~torch.isfinite(x.reshape(self.batch, -1)).all(dim=1).cpu().numpy())))
        return SkipReport.build(
            computed=self.computed.copy(),
            model_calls=self.model_calls,
            extra_evaluations=self.extra_evaluations,
            signals=dict(self.controller.signals()),
            sampler=self.sampler,
            policy=repr(self.policy) if self.policy is not None else "no skipping",
            space=getattr(self.controller, "space", None),
        )

    def sigma_rows(self, step: int, x: torch.Tensor) -> torch.Tensor:
        """sigmas[step] as a [B] tensor on x's device and dtype (the model's sigma argument,
        the value k-diffusion's ``sigmas[i] * s_in`` gives)."""
        return x.new_full((self.batch,), float(self.sigmas[step]))
