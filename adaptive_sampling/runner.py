"""One sampling call's skipping machinery: input checks, skip decisions, the model proxy, the report.

Every sampling loop (the library's own and the k-diffusion wrapper) creates a ``SkipRun`` per
call and asks it for the denoiser output of each step. The run

* checks the inputs once (clear errors naming the argument);
* asks the policy's controller which rows call the model (one device-to-host read per step);
* calls the model on exactly those rows (gather, call, scatter; batch-leading tensors in
  ``extra_args`` are sliced alike) and checks what comes back;
* answers skipped rows with the denoiser output ``eps_hat`` stands for at the current latent and
  sigma (``x - sigma * eps_hat`` in the VE convention), where ``eps_hat`` is what the controller's
  reuse strategy gives (the last eps, or a forecast). Reuse is of eps, never of the cached x0
  (docs/method.md); computed rows' eps are recorded back into the controller;
* speaks the model's convention (``conventions``: VE, or rectified flow for the flow samplers) to
  the model and the loop, and the VE view of latent and sigma to the controller, so every policy
  works unchanged on flow models;
* builds the ``SkipReport`` from its own bookkeeping (mask, NFE, calls) and the controller's
  ``signals()``. The runner never reads a controller's fields: any object that follows the
  protocol of ``policies.base`` works.

State lives on the instance only, so a failed call leaves nothing behind and concurrent calls
(threads) do not interact.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from .checks import as_sigmas, check_latent, check_sigmas
from .conventions import get_convention
from .policies import FixedMask
from .policies.base import Controller, NonFiniteLatent, SkipPolicy, check_policy, describe, resolve
from .report import SkipReport

if TYPE_CHECKING:
    from .samplers.registry import Sampler

__all__ = ["SkipRun", "slice_rows", "Callback"]

Callback = Callable[[dict], None]


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


def check_batch_leading(extra_args: dict, batch: int, name: str = "extra_args") -> None:
    """Every tensor in ``extra_args`` (recursively through dicts, lists and tuples) must lead with
    the batch size (or 1, broadcast), so that a per-sample call can slice it like x. Anything else
    is a ValueError naming the entry: a tensor of another length would reach the model unsliced."""

    def walk(value: Any, where: str) -> None:
        if isinstance(value, torch.Tensor):
            if value.ndim and value.shape[0] not in (batch, 1):
                raise ValueError(
                    f"{where} has {value.shape[0]} rows (shape {tuple(value.shape)}) but x has batch size {batch}: "
                    "tensors in extra_args must lead with the batch size (or 1) so per-sample calls can slice them; "
                    "bind tensors shared by every row into the model instead (e.g. functools.partial)"
                )
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{where}[{k!r}]")
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, f"{where}[{i}]")

    walk(extra_args, name)


def check_merge_mode(skip, merge_skipped: bool) -> None:
    """A schedule calibrated in DPM-Solver++'s merge mode (``merge_skipped=True``) means a different
    update for its skipped steps than the default mode: replaying it in the other mode would run
    without error and be silently not what was calibrated, so refuse the mismatch."""
    calibrated = getattr(skip, "merge_skipped", None)
    if not isinstance(calibrated, bool) or calibrated == merge_skipped:
        return
    if calibrated:
        raise ValueError(
            "this schedule was calibrated in DPM-Solver++'s merge mode (merge_skipped=True): replay it with "
            "sample_dpmpp_2m / sample_flow_dpmpp_2m(..., merge_skipped=True); the diffusers hook and the "
            "k-diffusion wrapper have no merge mode (calibrate without merge_skipped for them)"
        )
    raise ValueError("this schedule was calibrated without the merge mode: sample without merge_skipped=True")


class SkipRun:
    """The per-call skipping state. See the module docstring."""

    def __init__(
        self,
        model: Callable[..., torch.Tensor],
        x: torch.Tensor,
        sigmas: torch.Tensor,
        extra_args: dict | None,
        skip: SkipPolicy | None,
        sampler: "str | Sampler",
        merge_skipped: bool = False,
    ) -> None:
        if not callable(model):
            raise TypeError(f"model must be callable as model(x, sigma, **extra_args), got {type(model).__name__}")
        check_latent(x)
        self.sigmas = check_sigmas(sigmas)
        self.spec = resolve(sampler)
        self.convention = get_convention(self.spec.convention)
        self.convention.check_grid(self.sigmas)
        if extra_args is not None and not isinstance(extra_args, dict):
            raise TypeError(f"extra_args must be a dict or None, got {type(extra_args).__name__}")
        if skip is not None:
            check_policy(skip, "skip")
            check_merge_mode(skip, merge_skipped)
        self.model = model
        self.extra_args = extra_args or {}
        self.sampler = self.spec.name
        self.policy = skip
        self.given = as_sigmas(sigmas)  # the caller's grid as a tensor (its device and dtype)
        self.schedule = self.given.detach().cpu()  # the same on the host, for the solver updates
        self.num_steps = len(self.sigmas) - 1
        self.batch = x.shape[0]
        check_batch_leading(self.extra_args, self.batch)
        policy = skip or FixedMask(np.ones(self.num_steps, bool))
        self.view_sigmas = self.convention.ve_sigmas(self.sigmas)  # the grid the policy sees (VE sigma)
        self.controller: Controller = policy.start(x, self.num_steps, self.spec, sigmas=self.view_sigmas)
        if not isinstance(self.controller, Controller):
            raise TypeError(
                f"{type(policy).__name__}.start() must return a Controller (adaptive_sampling.policies.Controller), "
                f"got {type(self.controller).__name__}"
            )
        self.can_skip = bool(self.controller.can_skip)
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
        conv = self.convention
        x_view, sigma_view = conv.ve_view(x, sigma)
        try:
            compute = self._decide(step, x_view, sigma_view)
        except NonFiniteLatent as e:
            raise self._non_finite_error(e) from None
        self.last_computed = compute
        self.computed[:, step] = compute
        if compute.all():
            denoised = self._call_model(step, x, sigma, extra_args)
            if self.can_skip:
                self.controller.record(step, sigma_view, conv.to_eps(x, sigma, denoised), None)
            return denoised
        denoised = conv.from_eps(x, sigma, self.controller.reuse(step, sigma_view))
        if compute.any():
            rows = torch.from_numpy(np.flatnonzero(compute)).to(x.device)
            x_rows, sigma_rows = x.index_select(0, rows), sigma.index_select(0, rows)
            extra = slice_rows(extra_args, rows, self.batch)
            out = self._call_model(step, x_rows, sigma_rows, extra)
            denoised.index_copy_(0, rows, out)
            self.controller.record(step, sigma_view.index_select(0, rows), conv.to_eps(x_rows, sigma_rows, out), rows)
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
            _, sigma_view = self.convention.ve_view(x, sigma)
            self.controller.record(step, sigma_view, self.convention.to_eps(x, sigma, denoised), None)
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
            self.controller.finish(*self.convention.ve_view(x, sigma))
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
            policy=describe(self.policy) if self.policy is not None else "no skipping",
            space=self.controller.space,
        )

    def notify(self, callback: Callback | None, i: int, x: torch.Tensor, denoised: torch.Tensor) -> None:
        """Call the user's callback with k-diffusion's keys plus ``computed`` ([B] bool) for step i."""
        if callback is not None:
            sigma = self.given[i]
            computed = torch.from_numpy(self.last_computed.copy())
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised, "computed": computed})

    def sigma_rows(self, step: int, x: torch.Tensor) -> torch.Tensor:
        """sigmas[step] as a [B] tensor on x's device and dtype (the model's sigma argument,
        the value k-diffusion's ``sigmas[i] * s_in`` gives)."""
        return x.new_full((self.batch,), float(self.sigmas[step]))
