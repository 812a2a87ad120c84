"""Pad per-sample sub-batches to a few fixed sizes ("buckets"), so compiled models see few shapes.

Per-sample skip decisions call the model on the rows that compute, a different number each step.
``torch.compile`` with static shapes (``dynamic=False``, and ``mode="reduce-overhead"``, whose
CUDA graphs are recorded per input size) then compiles or records once per new batch size: up to
one per possible sub-batch size. Bucketing pads a sub-batch of ``n`` rows up to the smallest bucket
``>= n`` with copies of its first row, calls the model once on the padded batch and returns the
first ``n`` output rows; the padded rows' outputs are discarded. The model then only ever sees
bucket sizes (e.g. 1, 2, 4, 8 for a batch of 8 instead of 1..8).

    from adaptive_sampling.integrations.bucketing import bucketed
    model = bucketed(torch.compile(denoiser, dynamic=False), batch=8)   # buckets 1, 2, 4, 8
    x, report = sample_dpmpp_2m(model, x, sigmas, extra_args=..., skip=ThirdOrder())

and for a diffusers pipeline ``adaptive_sampling.integrations.diffusers.apply(pipe, skip=..., pad_to="pow2")``
pads the UNet's sub-batch calls the same way (per prompt: both CFG halves alike).

What is padded: ``x``, ``sigma`` and every tensor in ``extra_args`` whose first dimension is the
sub-batch size, recursively through dicts, lists and tuples (the rule ``runner.slice_rows`` applies
when it gathers the computing rows; a non-batch tensor whose first dimension happens to equal the
sub-batch size would be padded too). The padding rows are real inputs (repeats of the first row),
so no NaN or garbage enters the model. The computed rows' outputs are the model's outputs for
those rows in a larger batch: equal to the unpadded call up to the batch-size dependence of the
model's round-off (tests/test_bucketing.py: a float64 MLP within 4e-16 relative over a whole run,
a tiny float32 diffusers UNet bit-identical on the CPU; GPU kernels may change with the batch size,
about 1e-6 per float32 call). NFE and the
report are unchanged (they count sampler calls and rows that compute, not padding); padding costs
the padded rows' compute, which on a GPU is often close to free below the size where the model
saturates the device (bench/gpu_e2e.py measures it).

Sizes (``sizes=``):

* ``"pow2"`` (default): 1, 2, 4, 8, ...; with ``batch=B`` capped at B (powers of two below B,
  then B itself), so a full batch of a size that is not a power of two is never padded;
* a list of positive ints: explicit buckets; a sub-batch larger than every bucket is passed through
  unpadded (with ``batch=B``, buckets above B are dropped and B is added).

``bucket_size(n, sizes, batch)`` is the rule on its own.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ..runner import slice_rows

__all__ = ["bucketed", "Bucketed", "bucket_sizes", "bucket_size", "pad_index", "padded_rows", "check_pad_to"]

_MAX_POW2 = 1 << 20


def bucket_sizes(sizes: Any = "pow2", batch: int | None = None, name: str = "sizes") -> tuple[int, ...] | None:
    """The explicit bucket list of ``sizes`` (sorted, unique), or ``None`` for unbounded powers of two.

    ``batch`` caps the buckets at the full batch size (and makes it a bucket). Bad arguments raise
    ValueError naming the argument (``name`` for the sizes, ``batch``).
    """
    if batch is not None and (not isinstance(batch, int) or isinstance(batch, bool) or batch < 1):
        raise ValueError(f"batch must be a positive int or None, got {batch!r}")
    if isinstance(sizes, str):
        if sizes != "pow2":
            raise ValueError(f"{name} must be 'pow2' or a non-empty list of positive ints, got {sizes!r}")
        if batch is None:
            return None
        out, p = [], 1
        while p < batch:
            out.append(p)
            p *= 2
        return tuple(out + [batch])
    try:
        values = list(sizes)
    except TypeError:
        raise ValueError(f"{name} must be 'pow2' or a non-empty list of positive ints, got {sizes!r}") from None
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
        raise ValueError(f"{name} must be 'pow2' or a non-empty list of positive ints, got {sizes!r}")
    values = sorted(set(values))
    if batch is not None:
        values = [v for v in values if v < batch] + [batch]
    return tuple(values)


def bucket_size(n: int, sizes: tuple[int, ...] | None) -> int:
    """The size a sub-batch of ``n`` rows is padded to: the smallest bucket ``>= n`` (``n`` itself
    if it exceeds every bucket); ``sizes=None`` means powers of two."""
    if sizes is None:
        if n > _MAX_POW2:
            return n
        return 1 << (n - 1).bit_length()
    for s in sizes:
        if s >= n:
            return s
    return n


def pad_index(n: int, size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``[0, 1, ..., n-1, 0, 0, ...]`` of length ``size``: the rows of a padded sub-batch."""
    idx = torch.zeros(size, dtype=torch.long, device=device)
    idx[:n] = torch.arange(n, device=device)
    return idx


class Bucketed:
    """A denoiser ``model(x, sigma, **extra_args)`` whose calls are padded to bucket sizes; made by
    ``bucketed()``. Attributes: ``model``, ``sizes`` (the explicit buckets, or ``None`` for powers
    of two), ``seen`` (the batch sizes the wrapped model was called with, in order: what a
    compiler sees)."""

    def __init__(self, model: Callable[..., torch.Tensor], sizes: tuple[int, ...] | None) -> None:
        self.model = model
        self.sizes = sizes
        self.seen: list[int] = []
        self._index: dict[tuple[int, int, str], torch.Tensor] = {}

    def _pad_index(self, n: int, size: int, device: torch.device) -> torch.Tensor:
        key = (n, size, str(device))
        idx = self._index.get(key)
        if idx is None:
            idx = self._index[key] = pad_index(n, size, device)
        return idx

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **extra_args: Any) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.ndim < 1:
            raise ValueError(f"x must be a batch-leading tensor, got {type(x).__name__}")
        n = x.shape[0]
        size = bucket_size(n, self.sizes)
        self.seen.append(size)
        if size == n:
            return self.model(x, sigma, **extra_args)
        idx = self._pad_index(n, size, x.device)
        padded = slice_rows({"x": x, "sigma": sigma, "extra": extra_args}, idx, n)
        out = self.model(padded["x"], padded["sigma"], **padded["extra"])
        if not isinstance(out, torch.Tensor) or out.ndim < 1 or out.shape[0] != size:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"the model returned {got} for a padded batch of {size} rows; expected {size} rows first")
        return out[:n]

    def __repr__(self) -> str:
        sizes = "pow2" if self.sizes is None else list(self.sizes)
        return f"bucketed({self.model!r}, sizes={sizes})"


def bucketed(model: Callable[..., torch.Tensor], sizes: Any = "pow2", *, batch: int | None = None) -> Bucketed:
    """Wrap a denoiser so every call is padded to a bucket size (see the module docstring).

    model: ``model(x, sigma, **extra_args) -> denoised`` (a library denoiser, a k-diffusion model
        wrapper, ``adaptive_sampling.integrations.diffusers.denoiser(...)``, possibly ``torch.compile``-d).
    sizes: ``"pow2"`` or a list of positive ints.
    batch: the full batch size; caps the buckets at it (a full-batch call is then never padded).

    Works with the library samplers and ``adaptive_sampling.integrations.k_diffusion.adaptive(...)``: they call
    the model on the computing rows only, and the wrapper pads that sub-batch.
    """
    if not callable(model):
        raise ValueError(f"model must be callable as model(x, sigma, **extra_args), got {type(model).__name__}")
    return Bucketed(model, bucket_sizes(sizes, batch))


def check_pad_to(pad_to: Any, name: str = "pad_to") -> Any:
    """Validate a ``pad_to`` argument (None, ``"pow2"`` or a list of positive ints) early."""
    if pad_to is not None:
        bucket_sizes(pad_to, None, name)
    return pad_to if pad_to is None or isinstance(pad_to, str) else tuple(pad_to)


def padded_rows(rows: torch.Tensor, sizes: Sequence[int] | None) -> torch.Tensor:
    """``rows`` (k indices) padded with repeats of ``rows[0]`` to ``bucket_size(k, sizes)``."""
    k = rows.numel()
    size = bucket_size(k, tuple(sizes) if sizes is not None else None)
    if size == k:
        return rows
    return rows.index_select(0, pad_index(k, size, rows.device))
