"""Packaging contracts: light import, public names, typed package."""

import subprocess
import sys
from pathlib import Path

import adaptive_sampling


def test_import_loads_no_heavy_optional_package():
    code = (
        "import sys, adaptive_sampling, adaptive_sampling.k_diffusion, adaptive_sampling.evaluate,"
        " adaptive_sampling.workloads.digits, adaptive_sampling.workloads.learned, adaptive_sampling.diffusers;"
        "print(','.join(m for m in ('k_diffusion', 'triton', 'scipy', 'matplotlib', 'sklearn', 'diffusers',"
        " 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def test_public_api():
    for name in ("ThirdOrder", "FixedMask", "sample_ddim", "sample_euler", "sample_dpmpp_2m", "SkipReport"):
        assert hasattr(adaptive_sampling, name)


def test_py_typed_is_shipped():
    assert (Path(adaptive_sampling.__file__).parent / "py.typed").exists()
