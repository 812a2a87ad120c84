"""What a skipped call gets instead of a model evaluation: a noise prediction (eps), per row.

* ``"copy"`` / ``Copy()``: the eps of the row's last computed call, as is (the paper's method).
* ``Extrapolate(order, variable)``: a polynomial forecast of eps at the current noise level
  through the row's last ``order + 1`` COMPUTED calls (never through forecasts: a forecast is
  never recorded), in ``t = log(sigma)`` or ``t = sigma``. While a row has fewer computed calls
  it falls back to the order they allow (copy after one call). A call at sigma = inf (a flow
  grid's s = 1, in the VE view) is a node at infinity: the forecast through it is its limit, the
  lower-order forecast through the finite nodes.

Reuse is always of eps, never of the x0 estimate (docs/method.md): the runner hands the solver
``x - sigma * eps_hat`` at the current x and sigma; DPM-Solver++ takes that as its x0 estimate.

A strategy is an immutable description; ``start(x, num_steps)`` makes the per-call state, with
``record(step, sigma, eps, rows)`` for computed rows and ``predict(step, sigma)`` for all rows.
Forecast weights are computed on the device (no host read).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import torch

__all__ = ["Reuse", "ReuseState", "Copy", "Extrapolate", "make_reuse", "reuse_to_dict", "reuse_from_dict"]

Variable = Literal["log_sigma", "sigma"]


class ReuseState(Protocol):
    def record(self, step: int, sigma: torch.Tensor, eps: torch.Tensor, rows: torch.Tensor | None) -> None: ...

    def predict(self, step: int, sigma: torch.Tensor) -> torch.Tensor: ...


class Reuse(Protocol):
    def start(self, x: torch.Tensor, num_steps: int) -> ReuseState: ...


def _rows(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (like.ndim - 1)))


@dataclass(frozen=True)
class Copy:
    """Reuse the last computed eps of each row as is."""

    def start(self, x: torch.Tensor, num_steps: int) -> "CopyState":
        return CopyState()

    def __repr__(self) -> str:
        return "'copy'"


class CopyState:
    def __init__(self) -> None:
        self.eps: torch.Tensor | None = None

    def record(self, step: int, sigma: torch.Tensor, eps: torch.Tensor, rows: torch.Tensor | None) -> None:
        if rows is None:
            self.eps = eps
        else:
            self.eps.index_copy_(0, rows, eps)

    def predict(self, step: int, sigma: torch.Tensor) -> torch.Tensor:
        return self.eps


@dataclass(frozen=True)
class Extrapolate:
    """Forecast eps per row by Lagrange extrapolation through its last ``order + 1`` computed calls.

    order: 1 (linear) or 2 (quadratic). High orders diverge on real models; 1 is the safe choice.
    variable: the abscissa, ``"log_sigma"`` (the natural time of sigma-parametrised samplers;
        default) or ``"sigma"`` (exact for eps polynomial in sigma, e.g. Euler's own derivative).
    """

    order: int = 1
    variable: Variable = "log_sigma"

    def __post_init__(self) -> None:
        if self.order not in (1, 2) or isinstance(self.order, bool):
            raise ValueError(f"order must be 1 or 2, got {self.order!r}")
        if self.variable not in ("log_sigma", "sigma"):
            raise ValueError(f"variable must be 'log_sigma' or 'sigma', got {self.variable!r}")

    def start(self, x: torch.Tensor, num_steps: int) -> "ExtrapolateState":
        return ExtrapolateState(self.order, self.variable)


class ExtrapolateState:
    """Per-row ring of the last ``order + 1`` computed eps and their abscissae (newest first)."""

    def __init__(self, order: int, variable: Variable) -> None:
        self.order, self.variable = order, variable
        self.eps: torch.Tensor | None = None  # [m, B, ...]
        self.t: torch.Tensor | None = None  # [m, B] float64
        self.count: torch.Tensor | None = None  # [B] computed calls recorded so far

    def _abscissa(self, sigma: torch.Tensor) -> torch.Tensor:
        s = sigma.to(torch.float64)
        return s.log() if self.variable == "log_sigma" else s

    def record(self, step: int, sigma: torch.Tensor, eps: torch.Tensor, rows: torch.Tensor | None) -> None:
        m = self.order + 1
        if self.eps is None:
            if rows is not None:
                raise RuntimeError("the first recorded call must cover every row")
            self.eps = eps.new_zeros((m, *eps.shape))
            self.t = torch.zeros((m, eps.shape[0]), dtype=torch.float64, device=eps.device)
            self.count = torch.zeros(eps.shape[0], dtype=torch.long, device=eps.device)
        t = self._abscissa(sigma)
        if rows is None:
            self.eps = torch.cat([eps[None], self.eps[:-1]])
            self.t = torch.cat([t[None], self.t[:-1]])
            self.count = self.count + 1
        else:
            self.eps[:, rows] = torch.cat([eps[None], self.eps[:-1, rows]])
            self.t[:, rows] = torch.cat([t[None], self.t[:-1, rows]])
            self.count[rows] += 1

    def weights(self, sigma: torch.Tensor, order: int | None = None) -> torch.Tensor:
        """[m, B] Lagrange weights at ``sigma`` of the stored nodes, per row at the highest order
        (<= ``order``) its computed calls allow."""
        order = self.order if order is None else order
        t = self._abscissa(sigma)
        n = self.t
        q = torch.clamp(self.count - 1, max=order)
        # nodes at infinity (sigma = inf) can only be the oldest: use the finite ones in front of them
        q = torch.minimum(q, torch.isfinite(n).to(torch.long).cumprod(dim=0).sum(dim=0) - 1)
        one, zero = torch.ones_like(t), torch.zeros_like(t)
        w = [torch.stack([one, zero, zero][: self.order + 1])]
        if order >= 1:
            d01 = n[0] - n[1]
            w.append(torch.stack([(t - n[1]) / d01, (n[0] - t) / d01, zero][: self.order + 1]))
        if order >= 2:
            l0 = (t - n[1]) * (t - n[2]) / ((n[0] - n[1]) * (n[0] - n[2]))
            l1 = (t - n[0]) * (t - n[2]) / ((n[1] - n[0]) * (n[1] - n[2]))
            l2 = (t - n[0]) * (t - n[1]) / ((n[2] - n[0]) * (n[2] - n[1]))
            w.append(torch.stack([l0, l1, l2]))
        out = w[0]
        for k in range(1, len(w)):
            out = torch.where(q == k, w[k], out)
        return out

    def combine(self, weights: torch.Tensor) -> torch.Tensor:
        out = _rows(weights[0].to(self.eps.dtype), self.eps[0]) * self.eps[0]
        for j in range(1, weights.shape[0]):
            out = out + _rows(weights[j].to(self.eps.dtype), self.eps[j]) * self.eps[j]
        return out

    def predict(self, step: int, sigma: torch.Tensor) -> torch.Tensor:
        return self.combine(self.weights(sigma))

    def newest(self) -> torch.Tensor:
        return self.eps[0]


def make_reuse(reuse) -> Reuse:
    """``"copy"`` -> ``Copy()``; a strategy object passes through; anything else is a ValueError."""
    if isinstance(reuse, str):
        if reuse == "copy":
            return Copy()
        raise ValueError(f"reuse must be 'copy' or a strategy such as Extrapolate(order=1), got {reuse!r}")
    if not callable(getattr(reuse, "start", None)):
        raise ValueError(f"reuse must be 'copy' or a strategy such as Extrapolate(order=1), got {reuse!r}")
    return reuse


def reuse_to_dict(reuse) -> dict:
    """A JSON-able description of a built-in reuse strategy (for schedule files)."""
    r = make_reuse(reuse)
    if isinstance(r, Copy):
        return {"kind": "copy"}
    if isinstance(r, Extrapolate):
        return {"kind": "extrapolate", "order": r.order, "variable": r.variable}
    raise ValueError(f"only 'copy' and Extrapolate reuse can be saved, got {reuse!r}")


def reuse_from_dict(d: dict) -> Reuse | str:
    """The inverse of ``reuse_to_dict``."""
    if d.get("kind") == "copy":
        return "copy"
    if d.get("kind") == "extrapolate":
        return Extrapolate(int(d["order"]), d["variable"])
    raise ValueError(f"unknown reuse {d!r}: expected kind 'copy' or 'extrapolate'")
