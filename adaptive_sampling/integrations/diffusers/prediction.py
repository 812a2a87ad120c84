"""Prediction types: a diffusers model's output as the ODE derivative d and back.

d = (x - x0) / sigma is k-diffusion's ``to_d``, the derivative the library's samplers step with,
in the convention the scheduler runs: eps for the DDPM family (x = x0 + sigma eps, VE), the
velocity v = eps - x0 for flow schedulers (x = (1 - s) x0 + s eps). The hook hands the runner
``denoised = x - sigma * d`` and gets a reused row's d back the same way; the runner turns that
into eps in the model's convention (``conventions``), so the reuse is always of eps.

Arguments: ``u`` the model input latent (VP for the DDPM family, the flow latent for flow
schedulers), ``s`` the call's sigma (VE sigma, or flow s). ``epsilon`` outputs are eps;
``v_prediction`` (v = a eps - s a x0 with a = 1 / sqrt(1 + s^2)) and ``sample`` (x0) outputs are
converted with the latent and sigma of the call they came from, and a reused eps goes back with
the CURRENT latent and sigma: a copied v is not a copied eps. ``flow_prediction`` outputs are the
velocity, already d.
"""

from __future__ import annotations

import math

import torch

__all__ = ["derivative_from_prediction", "prediction_from_derivative"]


def derivative_from_prediction(pred: torch.Tensor, u: torch.Tensor, s: float, kind: str) -> torch.Tensor:
    if kind in ("epsilon", "flow_prediction"):
        return pred
    a = 1 / math.sqrt(1 + s * s)
    if kind == "v_prediction":  # v = a eps - sv x0, u = a x0 + sv eps  =>  eps = sv u + a v
        return (s * a) * u + a * pred
    return (u - a * pred) / (s * a)  # sample: x0


def prediction_from_derivative(d: torch.Tensor, u: torch.Tensor, s: float, kind: str) -> torch.Tensor:
    if kind in ("epsilon", "flow_prediction"):
        return d
    a = 1 / math.sqrt(1 + s * s)
    if kind == "v_prediction":
        return (d - (s * a) * u) / a
    return (u - (s * a) * d) / a
