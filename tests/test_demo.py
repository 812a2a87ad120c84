"""The main demo runs end to end on a reduced setting and writes its files."""

from adaptive_sampling.evaluation import demo


def test_demo_runs_and_writes_its_files(tmp_path, capsys):
    assert demo.main(["--steps", "10", "--batch", "2", "--out", str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    for name in ("grid.png", "nfe_vs_psnr.png", "masks.png", "table.md"):
        path = tmp_path / name
        assert path.exists() and path.stat().st_size > 0, name
    for sampler in ("ddim", "dpmpp_2m", "euler"):
        for method in ("full", "adaptive", "uniform", "fewer_steps", "dpmpp_2m_steps", "dpmpp_2m_grid", "random", "greedy"):
            assert f"| {sampler} | {method} |" in out
    for policy in ("default", "calibrated(6)", "reference", "paper", "local_error", "budget(6)", "uniform(6)+forecast"):
        assert f"| euler | adaptive | {policy} |" in out, policy
    assert "| sampler | method | matches | NFE | speedup | PSNR (dB) | SSIM |" in (tmp_path / "table.md").read_text()


def test_demo_runs_on_the_shapes_unet(tmp_path, capsys):
    assert demo.main(["--workload", "shapes", "--steps", "6", "--batch", "1", "--out", str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "shapes UNet" in out
    for sampler in ("ddim", "dpmpp_2m", "euler"):
        assert f"| {sampler} | adaptive | default |" in out
        assert f"| {sampler} | greedy |" not in out  # off by default on the UNet
    assert (tmp_path / "grid.png").stat().st_size > 0
