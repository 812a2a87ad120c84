"""Test setup. TRITON_INTERPRET must be set before the kernel module is imported, so it is set here,
before any test module imports adaptive_sampling.kernels.skip_stats."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.pop("ADAPTIVE_SAMPLING_BACKEND", None)

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def kdiff():
    """k-diffusion's sampling module (imported only by the tests that compare against it)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from k_diffusion import sampling
    return sampling
