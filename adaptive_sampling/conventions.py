"""How a latent relates to its clean image x0 and its noise eps: the two model conventions.

* ``VE`` (k-diffusion's): x = x0 + sigma * eps, sigma in (0, inf), the last may be 0. The
  denoiser convention ``model(x, sigma) -> x0`` of every library sampler and k-diffusion.
* ``FLOW`` (rectified flow; ComfyUI's "CONST"): x = (1 - s) x0 + s * eps, s in [0, 1], the grid
  may START at s = 1 (pure noise). The same denoiser convention ``model(x, s) -> x0`` on the flow
  latent; a velocity network (v = eps - x0) gives x0 = x - s * v (``models.denoiser_from_flow``).

Both describe the same ODE. In VE coordinates a flow latent is x_ve = x / (1 - s) at
sigma_ve = s / (1 - s) (so -log sigma_ve = log((1 - s) / s) is the log-SNR lambda), and x0 and eps
are the SAME in both. That is why the skip machinery needs one coordinate system only: the runner
converts the model's output to eps in the model's convention, and hands the policies the VE view
of the latent and sigma (``ve_view``), where their rules, reuse and forecasts (linear in log sigma
= in lambda) keep their meaning. At s = 1 the VE view is infinite; call 0 always computes and no
built-in rule looks at it.

Each convention is a small object of pure functions, exact at its grid's ends:

* ``to_eps(x, sigma, denoised)`` / ``from_eps(x, sigma, eps)``: eps of a denoiser output, and the
  denoiser output that a reused eps stands for at the current x and sigma;
* ``ve_view(x, sigma)``: the latent and sigma in VE coordinates;
* ``ve_sigmas(sigmas)``: a whole grid in VE sigma (float64);
* ``initial(noise, sigma0)``: the starting latent from unit noise;
* ``check_grid(sigmas, name)``: the grid's range. A flow grid with sigmas above 1 is refused (a
  ValueError naming the convention to use); a VE grid that starts at exactly 1, the shape of a
  flow grid, is warned about, not refused (a VE grid may legitimately start at sigma = 1).
"""

from __future__ import annotations

import abc
import warnings
from dataclasses import dataclass

import torch

__all__ = ["Convention", "VE", "FLOW", "get_convention"]


def _rows(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (like.ndim - 1)))


@dataclass(frozen=True)
class Convention(abc.ABC):
    """The interface both conventions implement (module docstring); ``VE`` and ``FLOW`` are its instances."""

    name: str

    @abc.abstractmethod
    def to_eps(self, x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
        """eps of a denoiser output at (x, sigma)."""

    @abc.abstractmethod
    def from_eps(self, x: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The denoiser output a reused eps stands for at (x, sigma)."""

    @abc.abstractmethod
    def ve_view(self, x: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The latent and sigma in VE coordinates."""

    @abc.abstractmethod
    def ve_sigmas(self, sigmas: torch.Tensor) -> torch.Tensor:
        """A whole grid in VE sigma (float64)."""

    @abc.abstractmethod
    def initial(self, noise: torch.Tensor, sigma0) -> torch.Tensor:
        """The starting latent from unit noise."""

    @abc.abstractmethod
    def check_grid(self, sigmas: torch.Tensor, name: str = "sigmas") -> None:
        """Refuse (or warn about) a grid outside this convention's range."""


class _VE(Convention):
    def to_eps(self, x, sigma, denoised):
        return (x - denoised) / _rows(sigma, x)

    def from_eps(self, x, sigma, eps):
        return x - _rows(sigma, x) * eps

    def ve_view(self, x, sigma):
        return x, sigma

    def ve_sigmas(self, sigmas):
        return sigmas.to(torch.float64)

    def initial(self, noise, sigma0):
        return noise * sigma0

    def check_grid(self, sigmas, name="sigmas"):
        if float(sigmas[0]) == 1.0:
            warnings.warn(
                f"{name} starts at exactly 1, the shape of a flow-matching grid (s from 1 to 0), but the sampler is in "
                "the VE convention: with a rectified-flow model use a flow sampler (sample_flow_euler, "
                "sample_flow_dpmpp_2m) or convention='flow' in the k-diffusion wrapper",
                UserWarning,
                stacklevel=4,
            )


class _Flow(Convention):
    def to_eps(self, x, sigma, denoised):
        s = _rows(sigma, x)
        return (x - (1 - s) * denoised) / s

    def from_eps(self, x, sigma, eps):
        s = _rows(sigma, x)
        return (x - s * eps) / (1 - s)

    def ve_view(self, x, sigma):
        return x / _rows(1 - sigma, x), sigma / (1 - sigma)

    def ve_sigmas(self, sigmas):
        s = sigmas.to(torch.float64)
        return s / (1 - s)

    def initial(self, noise, sigma0):
        return noise

    def check_grid(self, sigmas, name="sigmas"):
        if float(sigmas.max()) > 1.0:
            raise ValueError(
                f"{name} reaches {float(sigmas.max()):g}, above 1: a flow-matching grid holds s in [0, 1] "
                "(a VE / EDM grid such as Karras's belongs to a VE sampler: sample_euler, sample_dpmpp_2m, ...)"
            )


VE: Convention = _VE("ve")
FLOW: Convention = _Flow("flow")


def get_convention(name: str) -> Convention:
    if name == "ve":
        return VE
    if name == "flow":
        return FLOW
    raise ValueError(f"convention must be 've' or 'flow', got {name!r}")
