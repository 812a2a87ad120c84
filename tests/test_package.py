"""Packaging contracts: light import, public names, typed package."""

import subprocess
import sys
from pathlib import Path

import adaptive_sampling


def test_import_loads_no_heavy_optional_package():
    code = (
        "import sys, adaptive_sampling, adaptive_sampling.integrations.k_diffusion, adaptive_sampling.evaluation,"
        " adaptive_sampling.evaluation.workloads.digits, adaptive_sampling.evaluation.workloads.learned,"
        " adaptive_sampling.evaluation.workloads.flow, adaptive_sampling.integrations.diffusers;"
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


def test_the_core_never_imports_an_integration_or_the_evaluation():
    """Integrations and evaluation import the core, never the other way round (docs/architecture.md).
    The command line (``__main__``) is an entry point, not core: it dispatches to them."""
    import ast

    root = Path(adaptive_sampling.__file__).parent
    outside = ("integrations", "evaluation")
    offenders = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if rel.parts[0] in outside or rel.name == "__main__.py":
            continue
        package = ["adaptive_sampling", *rel.parts[:-1]]
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                module = ".".join(base + ([node.module] if node.module else []))
                names = [module] + [f"{module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                parts = name.split(".")
                if parts[0] == "adaptive_sampling" and len(parts) > 1 and parts[1] in outside:
                    offenders.append(f"{rel}: {name}")
    assert not offenders, offenders
