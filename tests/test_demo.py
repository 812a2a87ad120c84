"""The demo runs end to end on reduced settings, speaks in the README's names, and fails clearly without matplotlib."""

import builtins

import pytest
import torch

from adaptive_sampling.evaluation import demo

POLICIES = ("default_policy()", "calibrated schedule (6 calls)", "ThirdOrder() (the paper)", "ThirdOrder(criterion='paper')",
            "LocalError()", "Budget(6)", "uniform stride + forecast (6 calls)")  # fmt: skip


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_demo_runs_and_writes_its_files(tmp_path, capsys, threads):
    assert demo.main(["--steps", "10", "--batch", "2", "--out", str(tmp_path), "--quiet", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "torch threads: 1 (of" in out and torch.get_num_threads() == 1
    assert out.index("Takeaway:") < out.index("| method | calls | speedup | vs full run | vs ODE solution |")
    for sampler in ("DDIM", "Euler", "DPM-Solver++(2M)"):
        assert f"* {sampler}: default_policy() runs 5 of 10 calls (2.00x)" in out
    assert "| full run (10 steps) | 10 | 1.00x | identical |" in out
    for name in ("grid.png", "nfe_vs_psnr.png", "masks.png", "table.md"):
        path = tmp_path / name
        assert path.exists() and path.stat().st_size > 0, name
    table = (tmp_path / "table.md").read_text()
    assert "| sampler | method | at the calls of | NFE | speedup | PSNR (dB) | SSIM |" in table and "Takeaway:" in table
    for sampler in ("ddim", "dpmpp_2m", "euler"):
        for method in ("full", "adaptive", "uniform", "fewer_steps", "dpmpp_2m_steps", "dpmpp_2m_grid", "random", "greedy"):
            assert f"| {sampler} | {method} |" in table
        for policy in POLICIES:
            assert f"| {sampler} | adaptive | {policy} |" in table, policy
    assert "| euler | adaptive | default_policy() | 5.0 |" in table  # exactly half the calls


def test_demo_runs_on_the_shapes_unet_without_plots(tmp_path, capsys, threads):
    assert demo.main(["--workload", "shapes", "--steps", "6", "--batch", "1", "--out", str(tmp_path), "--quiet", "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "shapes UNet" in out and "pictures: none (--no-plots)" in out
    table = (tmp_path / "table.md").read_text()
    for sampler in ("ddim", "dpmpp_2m", "euler"):
        assert f"| {sampler} | adaptive | default_policy() |" in table
        assert f"| {sampler} | greedy |" not in table  # off by default on the UNet
    assert not list(tmp_path.glob("*.png"))


def test_demo_on_the_flow_transformer_lists_the_peers(tmp_path, capsys, threads):
    pytest.importorskip("diffusers")
    assert demo.main(["--workload", "flow", "--steps", "8", "--batch", "1", "--out", str(tmp_path), "--quiet", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "FluxPipeline" in out and "Takeaway:" in out
    assert "| full run (8 steps) | baseline | 100% | 8.0 | 1.00x | identical |" in out
    assert "| default_policy() | adaptive_sampling | 50% | 4.0 |" in out
    for name in ("calibrated schedule (4 calls)", "ThirdOrder() (the paper)", "fewer steps (K=4)", "DPM-Solver++(2M), 4 steps",
                 "FirstBlockCache(threshold=0.05)", "MagCache(threshold=0.06)", "TaylorSeer(cache_interval=5)", "PAB(skip_range=2)",
                 "FasterCache(distilled)"):  # fmt: skip
        assert f"| {name} |" in out, name
    for name in ("grid.png", "quality_vs_compute.png", "masks.png", "table.md"):
        assert (tmp_path / name).stat().st_size > 0, name


def test_without_matplotlib_the_demo_says_what_to_install(tmp_path, capsys, monkeypatch):
    real = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert demo.main(["--steps", "10", "--batch", "1", "--out", str(tmp_path), "--quiet"]) == 2
    out = capsys.readouterr().out
    assert "error: the demo's pictures need matplotlib" in out and "'.[plot]'" in out and "--no-plots" in out
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # refused before any work


@pytest.mark.parametrize("argv, match", [(["--steps", "3"], "--steps must be >= 6"), (["--batch", "0"], "--batch must be >= 1"),
                                         (["--threads", "0"], "--threads must be >= 1")])  # fmt: skip
def test_bad_arguments_are_refused(argv, match, capsys):
    with pytest.raises(SystemExit):
        demo.main(argv)
    assert match in capsys.readouterr().err
