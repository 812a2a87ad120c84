"""Kernels behind one dispatch each. ``skip_stats``: the fused skip decision (Triton + torch reference).

The kernel modules import triton (when installed) at import time, so they are loaded lazily by
their callers; ``import adaptive_sampling`` never imports triton.
"""
