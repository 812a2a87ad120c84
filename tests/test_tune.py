"""The tune command and function: a tiny pipeline saved to a folder, run end to end; the report's
figures equal a direct ``evaluate`` run; the schedule replays through the hook with the stated NFE;
every bad input refused before any heavy work."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

import adaptive_sampling.integrations.diffusers as asd
from adaptive_sampling import Calibrated, ThirdOrder, default_policy, get_sigmas_karras
from adaptive_sampling.evaluation import evaluate
from adaptive_sampling.calibration.proxy import proxy_runs
from adaptive_sampling.evaluation.tune import tune
from adaptive_sampling.evaluation.tune_cli import main

from .helpers import MLPDenoiser, gaussian
from .tiny_pipelines import sd_pipeline

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

PROMPTS = ["a cat", "a dog", "a ship at night", "a red house"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    pipe = sd_pipeline()
    pipe.save_pretrained(root / "pipe")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return root


def _cli(saved, out, *extra):
    return main(["--pipeline", str(saved / "pipe"), "--prompts", str(saved / "prompts.txt"), "--steps", "10", "--nfe", "5",
                 "--out", str(out), "--quiet", "--guidance", "3.0", "--threads", "1", *extra])  # fmt: skip


@pytest.fixture(scope="module")
def ran(saved):
    out = saved / "out"
    assert _cli(saved, out) == 0
    return out


def test_the_command_writes_every_file_and_they_parse(saved, ran):
    for name in ("schedule.json", "report.md", "grid.png", "curves.png", "masks.png"):
        assert (ran / name).is_file() and (ran / name).stat().st_size > 0, name
    schedule = Calibrated.load(ran / "schedule.json")
    assert schedule.sampler == "ddim" and schedule.calls == 5
    report = (ran / "report.md").read_text()
    assert "held-out test prompts (2)" in report and "a ship at night" in report and "## Verdict" in report
    assert "calibration prompts (2): a cat; a dog" in report
    assert f"--prompts {saved / 'prompts.txt'}" in report and "--guidance 3.0" in report  # the command as given
    rows = re.findall(r"^\| (.+?) \| ([\d.]+) \| ([\d.]+) \| [\d.\-]+ \| [\d.]+ \|$", report, flags=re.M)
    names = [r[0] for r in rows]
    assert "calibrated schedule" in names and "default_policy(nfe=K) (online)" in names and "fewer steps" in names
    assert all(float(calls) == 5.0 for name, calls, _ in rows if name in ("calibrated schedule", "default_policy(nfe=K) (online)"))


def test_the_schedule_replays_through_the_hook_with_the_stated_nfe(saved, ran):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(saved / "pipe")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    schedule = Calibrated.load(ran / "schedule.json")
    with asd.apply(pipe, skip=schedule) as handle:
        pipe("a ship at night", num_inference_steps=10, guidance_scale=3.0, output_type="latent",
             generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert handle.report.nfe.tolist() == [5] and (handle.report.computed[0] == schedule.mask).all()


def test_the_reports_figures_equal_a_direct_evaluate_run():
    model = MLPDenoiser(dim=72, seed=2)
    schedule = lambda n: get_sigmas_karras(n, 0.03, 14.6)  # noqa: E731
    sigmas = schedule(20)
    cal = gaussian().noise(3, 1.0, seed=1)
    test = gaussian().noise(3, 1.0, seed=2)
    result = tune(model, "euler", sigmas, schedule, cal, test, nfe=10, disable=True, curves=False)
    ev = evaluate(model, test, schedule, {"default": default_policy(nfe=10), "calibrated": result.schedule, "paper": ThirdOrder()},
                  steps=20, samplers=("euler",), baselines=("uniform", "fewer_steps", "dpmpp_2m_steps"),
                  data_range=result.notes["data_range"], disable=True)  # fmt: skip
    for row in result.rows:
        direct = ev.select("euler", row["method"], row["policy"])[0]
        assert row["psnr_per_image"] == [float(v) for v in direct.psnr], row["name"]
        assert row["calls"] == float(np.mean(direct.nfe))
    prov = result.schedule.provenance
    assert prov["method"] == "proxy" and prov["full_run_equivalents"] == 1 + prov["proxy_masks_observed"] <= proxy_runs(1)


def test_dry_run_prints_the_plan_and_runs_nothing(saved, tmp_path, capsys):
    assert _cli(saved, tmp_path / "dry", "--dry-run") == 0
    out = capsys.readouterr().out
    assert "held out: ['a ship at night', 'a red house']" in out and "model calls" in out and "dry run: nothing was run" in out
    assert not (tmp_path / "dry").exists()


@pytest.mark.parametrize(
    "change, match",
    [
        ({"--pipeline": "{tmp}/notapipe"}, "without model_index.json"),
        ({"--pipeline": "./missing/folder"}, "no such folder"),
        ({"--prompts": "{tmp}/none.txt"}, "no such file"),
        ({"--prompts": "{tmp}/empty.txt"}, "holds no prompt"),
        ({"--prompts": "{tmp}/one.txt"}, "needs at least 2"),
        ({"--nfe": "1"}, r"--nfe must be in \[2, 10\]"),
        ({"--nfe": "11"}, r"--nfe must be in \[2, 10\]"),
        ({"--out": "{tmp}/full"}, "is not empty: pass --overwrite"),
        ({"--scheduler": "flow_euler"}, "does not fit this DDPM-schedule pipeline"),
    ],
)
def test_bad_input_is_refused_before_heavy_work(saved, tmp_path, capsys, change, match):
    (tmp_path / "notapipe").mkdir()
    (tmp_path / "empty.txt").write_text("\n# only a comment\n")
    (tmp_path / "one.txt").write_text("a cat\n")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "something").write_text("x")
    args = {"--pipeline": str(saved / "pipe"), "--prompts": str(saved / "prompts.txt"), "--steps": "10", "--nfe": "5",
            "--out": str(tmp_path / "out"), "--quiet": None}  # fmt: skip
    args.update({k: v.format(tmp=tmp_path) for k, v in change.items()})
    argv = [t for k, v in args.items() for t in ((k,) if v is None else (k, v))]
    assert main(argv) == 2
    assert re.search(match, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_an_unknown_scheduler_name_is_refused_by_the_parser(saved, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["--pipeline", str(saved / "pipe"), "--prompts", str(saved / "prompts.txt"), "--out", str(tmp_path / "o"),
              "--scheduler", "heun"])  # fmt: skip
    assert e.value.code == 2


def test_the_console_script_is_declared():
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["adaptive-sampling"] == "adaptive_sampling.__main__:main"
    assert json.dumps(project["scripts"])


def test_tune_runs_on_a_flow_sampler():
    """Flow pipelines go through the Python function (the command encodes SD-like and ShapesPipeline prompts)."""
    from adaptive_sampling import denoiser_from_flow, get_sigmas_flow

    net = MLPDenoiser(dim=72, seed=3)
    model = denoiser_from_flow(lambda x, s: net(x, s * 10))
    schedule = lambda n: get_sigmas_flow(n, shift=3.0)  # noqa: E731
    cal, test = gaussian().noise(2, 1.0, seed=1), gaussian().noise(2, 1.0, seed=2)
    result = tune(model, "flow_euler", schedule(12), schedule, cal, test, nfe=6, disable=True, curves=False)
    assert result.sampler == "flow_euler" and result.schedule.calls == 6
    rows = {r["name"]: r for r in result.rows}
    assert rows["calibrated schedule"]["calls"] == rows["default_policy(nfe=K) (online)"]["calls"] == 6.0
    assert "DPM-Solver++(2M) with K steps" in rows and result.verdict
