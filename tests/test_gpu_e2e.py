"""bench/gpu_e2e.py in CPU tiny mode: every phase runs and writes its rows and summary.

The compile phase runs one variant (static shapes with pow2 buckets) at batch 1 here (one dynamo
trace of the tiny UNet, ~4 s on the development machine); the full tiny mode's recompile counts
(static 8 graphs without bucketing, 4 with) are in docs/gpu_e2e.md, and tests/test_bucketing.py
asserts the drop on a cheaper model.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
STEPS = 16
pytestmark = pytest.mark.slow  # ~20 s: the script end to end (still run by .ci/run)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("gpu_e2e", ROOT / "bench" / "gpu_e2e.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_e2e"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    out = tmp_path_factory.mktemp("gpu_e2e")
    code = mod.main(["--tiny", "--out", str(out), "--compile-variants", "static-pow2", "--compile-batch", "1"])
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    return mod, code, rows, (out / "summary.md").read_text()


def test_finishes_and_labels_cpu_mode(result):
    _, code, rows, summary = result
    assert code == 0
    assert "CPU TINY MODE (not GPU results)" in summary and "Status: **finished**" in summary
    assert all(r["mode"] == "cpu-tiny" for r in rows)
    env = rows[0]
    assert env["phase"] == "env"
    for key in ("device", "torch", "triton", "diffusers", "git_commit", "date_utc"):
        assert key in env
    assert not [r for r in rows if "error" in r]


def test_rows_for_every_sampler_method_batch(result):
    mod, _, rows, summary = result
    e2e = [r for r in rows if r["phase"] == "e2e"]
    assert not [r for r in e2e if "skipped" in r]
    half = STEPS // 2
    want = {
        (path, sampler, batch, method)
        for path in ("library", "hook")
        for sampler in mod.SAMPLERS
        for batch in (1, 8)
        for method in ["none", f"FixedMask({half} of {STEPS})", "ThirdOrder()"] + (["hook, never skipping"] if path == "hook" else [])
    }
    got = {(r["path"], r["sampler"], r["batch"], r["method"]) for r in e2e}
    assert got == want
    for r in e2e:
        assert r["steps"] == STEPS and r["wall_s"] > 0 and r["speedup"] > 0
        assert 1 <= r["nfe_min"] <= r["nfe_mean"] <= r["nfe_max"] <= STEPS
        assert r["unet_rows"] == 2 * r["batch"] * r["nfe_mean"]  # CFG: two UNet rows per prompt and call
        if r["method"] in ("none", "hook, never skipping"):
            assert r["nfe_mean"] == r["unet_calls"] == STEPS and r["ideal"] == 1
        elif r["method"].startswith("FixedMask"):
            assert r["nfe_min"] == r["nfe_max"] == r["unet_calls"] == half and r["ideal"] == 2
        else:  # ThirdOrder: the first 4 calls always run
            assert r["nfe_min"] >= 4 and r["ideal"] == pytest.approx(STEPS / r["nfe_mean"])
        assert r["speedup_over_ideal"] == pytest.approx(r["speedup"] / r["ideal"])
    assert summary.count("| library |") == summary.count("| hook |") * 3 // 4 == 18


def test_subbatch_decision_kernel_compile_rows(result):
    _, _, rows, summary = result
    sub = [r for r in rows if r["phase"] == "subbatch"]
    assert [r["prompts"] for r in sub] == list(range(1, 9)) and all(r["ms"] > 0 for r in sub)
    assert [r["unet_batch"] for r in sub] == [2 * k for k in range(1, 9)]
    dec = [r for r in rows if r["phase"] == "decision"]
    assert {(r["policy"], r["batch"]) for r in dec} == {(p, b) for p in ("FixedMask (NaN check only)", "ThirdOrder()") for b in (1, 8)}
    assert all(r["us_per_step"] > 0 and r["unet_ms"] > 0 for r in dec)
    kernel = [r for r in rows if r["phase"] == "kernel"]
    assert len(kernel) == 1 and "CUDA only" in kernel[0]["skipped"]
    comp = {(r["variant"], r["bucket"]): r for r in rows if r["phase"] == "compile"}
    assert set(comp) == {("eager", "none"), ("eager", "pow2"), ("static-pow2", "pow2")}
    r = comp["static-pow2", "pow2"]
    assert r["graphs"] == r["backend_compiles"] == 1 and r["graphs_in_warm_run"] == 0
    assert r["unet_batches"] == [2] and r["nfe_mean"] == STEPS
    assert r["max_rel_diff_vs_eager"] < 1e-5 and r["warm_s"] > 0
    for title in ("Per-sample sub-batches", "decision's cost", "Wall-clock", "torch.compile", "Skipped or failed"):
        assert title in summary


def test_bad_arguments(result):
    mod = result[0]
    with pytest.raises(SystemExit):
        mod.main(["--tiny", "--phases", "e2e,bogus"])
    with pytest.raises(SystemExit):
        mod.main(["--tiny", "--compile-variants", "fastest"])
