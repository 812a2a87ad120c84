"""pytest-benchmark setup for bench/: record the accelerator and library versions in the JSON.

The benchmarks are not part of the test suite (setup.cfg: ``testpaths = tests``, and
``--benchmark-disable`` in addopts); run them with ``--benchmark-enable`` (see bench/README.md).
"""

from __future__ import annotations

import os
import platform

import torch

# CPU threads for the torch ops. One by default: on a shared or small machine, OpenMP threads
# that wait for each other made elementwise ops 100x slower than one thread (seen on the
# 2-core development machine). Set BENCH_CPU_THREADS to measure multi-threaded CPU numbers.
torch.set_num_threads(int(os.environ.get("BENCH_CPU_THREADS", "1")))


def pytest_benchmark_update_machine_info(config, machine_info):
    """Add what the benchmark numbers depend on: GPU, torch, triton, CUDA, the backend env."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # pragma: no cover - triton is optional
        triton_version = None
    info = {
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda_runtime": torch.version.cuda,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
        "ADAPTIVE_SAMPLING_BACKEND": os.environ.get("ADAPTIVE_SAMPLING_BACKEND"),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_capability"] = f"{props.major}.{props.minor}"
        info["gpu_sms"] = props.multi_processor_count
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    machine_info["adaptive_sampling"] = info
