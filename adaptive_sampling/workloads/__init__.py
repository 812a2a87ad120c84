"""Offline workloads: denoisers that need no download.

* ``gaussian``: Gaussian data, exact denoiser and closed-form ODE solution (checks mechanics to round-off).
"""
