"""``python -m adaptive_sampling tune`` (also ``adaptive-sampling tune``): the verdict on YOUR pipeline.

    python -m adaptive_sampling tune --pipeline PATH_OR_ID --prompts prompts.txt --steps 50 --nfe 25 --out DIR

Loads a diffusers pipeline (``from_pretrained``: a local folder, or a hub id where the machine
reaches the hub), encodes the prompts, splits them into calibration and test prompts, and runs
``evaluation.tune.tune`` on the pipeline's model (through ``integrations.diffusers.denoiser``):
calibration of a schedule with ``--nfe`` calls, then every option and baseline on the held-out
prompts. Writes ``schedule.json``, ``report.md``, ``grid.png``, ``curves.png`` and ``masks.png``
to ``--out``. Every bad argument is refused before any heavy work; ``--dry-run`` prints the plan
and the model calls it would make; Ctrl-C or ``--max-minutes`` stop between stages and leave
what is finished on disk (``--resume`` then reuses the saved schedule).

Prompt encoding: Stable-Diffusion-like pipelines (``encode_prompt`` giving the embeddings and
the negative embeddings) and the shapes workload's ``ShapesPipeline`` (prompts are class names or
numbers). For any other pipeline, call ``evaluation.tune.tune`` from Python with its conditioning.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shlex
import sys
import time
from pathlib import Path

__all__ = ["main", "parse_args"]

SCHEDULERS = {  # --scheduler -> (diffusers class, extra config, library sampler)
    "ddim": ("DDIMScheduler", {}, "ddim"),
    "euler": ("EulerDiscreteScheduler", {}, "euler"),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}, "dpmpp_2m"),
    "flow_euler": ("FlowMatchEulerDiscreteScheduler", {}, "flow_euler"),
}
DTYPES = ("float32", "float16", "bfloat16")


class TuneError(ValueError):
    """A bad argument of the command (printed as ``error: ...`` with exit status 2)."""


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m adaptive_sampling tune", description=__doc__.split("\n\n")[0])
    p.add_argument("--pipeline", required=True, help="a diffusers pipeline folder (save_pretrained) or hub id")
    p.add_argument("--prompts", required=True, type=Path, help="a text file, one prompt per line")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    p.add_argument("--nfe", type=int, default=None, help="model calls per image to tune for (default: steps / 2)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--scheduler", choices=tuple(SCHEDULERS), default=None,
                   help="the solver (default: ddim for DDPM-schedule pipelines, flow_euler for flow pipelines)")  # fmt: skip
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default 7.5; ShapesPipeline 2)")
    p.add_argument("--batch", type=int, default=1, help="images per prompt (seeds --seed, --seed + 1, ...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calibration-prompts", type=int, default=None, help="how many prompts calibrate (default: half)")
    p.add_argument("--calibration", choices=("proxy", "greedy"), default="proxy", help="the search (default proxy: at most 10 runs of the calibration prompts)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop between stages once this much time has passed")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the model calls, run nothing")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    p.add_argument("--resume", action="store_true", help="reuse --out/schedule.json instead of calibrating again")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def check(args) -> dict:
    """Every check that needs no model: raises TuneError naming the argument."""
    folder = Path(args.pipeline)
    if folder.exists() and not (folder / "model_index.json").is_file():
        raise TuneError(f"--pipeline {args.pipeline!r} is a folder without model_index.json: not a diffusers pipeline")
    if not folder.exists() and (args.pipeline.startswith((".", "/", "~")) or "\\" in args.pipeline or args.pipeline.count("/") != 1):
        raise TuneError(f"--pipeline {args.pipeline!r}: no such folder (and not a hub id of the form owner/name)")
    if not args.prompts.is_file():
        raise TuneError(f"--prompts {str(args.prompts)!r}: no such file")
    prompts = [line.strip() for line in args.prompts.read_text().splitlines() if line.strip() and not line.startswith("#")]
    if not prompts:
        raise TuneError(f"--prompts {str(args.prompts)!r} holds no prompt (one per line)")
    if len(prompts) < 2:
        raise TuneError(f"--prompts holds {len(prompts)} prompt; the split needs at least 2 (calibration and test)")
    n_cal = args.calibration_prompts if args.calibration_prompts is not None else max(1, len(prompts) // 2)
    if not 1 <= n_cal < len(prompts):
        raise TuneError(f"--calibration-prompts must be in [1, {len(prompts) - 1}] for {len(prompts)} prompts, got {n_cal}")
    if args.steps < 5:
        raise TuneError(f"--steps must be >= 5, got {args.steps}")
    nfe = args.nfe if args.nfe is not None else math.ceil(args.steps / 2)
    low = math.ceil(args.steps / 5)
    if not low <= nfe <= args.steps:
        raise TuneError(f"--nfe must be in [{low}, {args.steps}] for --steps {args.steps} (N / 5 to N), got {nfe}")
    if args.batch < 1:
        raise TuneError(f"--batch must be >= 1, got {args.batch}")
    if args.max_minutes is not None and args.max_minutes <= 0:
        raise TuneError(f"--max-minutes must be > 0, got {args.max_minutes}")
    out = args.out
    if out.exists() and not out.is_dir():
        raise TuneError(f"--out {str(out)!r} is a file")
    if out.is_dir() and any(out.iterdir()) and not (args.overwrite or args.resume) and not args.dry_run:
        raise TuneError(f"--out {str(out)!r} is not empty: pass --overwrite (or --resume to reuse its schedule)")
    if args.resume and not (out / "schedule.json").is_file():
        raise TuneError(f"--resume: {str(out / 'schedule.json')!r} does not exist")
    return {"prompts": prompts, "n_cal": n_cal, "nfe": nfe}


def load_pipeline(args):
    import torch
    from diffusers import DiffusionPipeline

    dtype = getattr(torch, args.dtype)
    index = Path(args.pipeline) / "model_index.json"
    cls = DiffusionPipeline
    if index.is_file() and json.loads(index.read_text()).get("_class_name") == "ShapesPipeline":
        from .workloads import shapes

        cls = shapes.ShapesPipeline
    try:
        pipe = cls.from_pretrained(args.pipeline, torch_dtype=dtype)
    except Exception as e:  # noqa: BLE001 - named for the user, with the cause
        raise TuneError(f"--pipeline {args.pipeline!r} could not be loaded as a diffusers pipeline: {type(e).__name__}: {e}") from e
    pipe = pipe.to(args.device)
    if getattr(pipe, "unet", None) is None and getattr(pipe, "transformer", None) is None:
        raise TuneError(f"--pipeline {args.pipeline!r} ({type(pipe).__name__}) has neither a unet nor a transformer")
    return pipe


def use_scheduler(pipe, name: str | None):
    """Put the chosen solver in ``pipe.scheduler`` (from the pipeline's own config); the library sampler's name."""
    import diffusers

    from ..integrations.diffusers.plan import check_scheduler, is_flow

    flow = is_flow(pipe.scheduler)
    name = name or ("flow_euler" if flow else "ddim")
    if (name == "flow_euler") != flow:
        kind = "flow-matching" if flow else "DDPM-schedule"
        raise TuneError(f"--scheduler {name} does not fit this {kind} pipeline ({type(pipe.scheduler).__name__})")
    cls, extra, sampler = SCHEDULERS[name]
    pipe.scheduler = getattr(diffusers, cls).from_config(pipe.scheduler.config, **extra)
    check_scheduler(pipe.scheduler, "pipe.scheduler")
    return sampler


def conditioning(pipe, prompts: list[str], guidance: float, device: str) -> dict:
    """extra_args for the denoiser, one row per prompt."""
    import torch

    from .workloads import shapes

    if type(pipe).__name__ == "ShapesPipeline":
        labels = []
        for p in prompts:
            if p.isdigit() and int(p) < shapes.NUM_CLASSES:
                labels.append(int(p))
            elif p in shapes.CLASSES:
                labels.append(shapes.CLASSES.index(p))
            else:
                raise TuneError(f"ShapesPipeline prompts are class names {shapes.CLASSES} or 0-9, got {p!r}")
        y = torch.tensor(labels, device=device)
        return {"class_labels": y, "negative_class_labels": torch.full_like(y, shapes.NULL_CLASS)} if guidance > 1 else {"class_labels": y}
    encode = getattr(pipe, "encode_prompt", None)
    if encode is None or getattr(pipe, "text_encoder", None) is None or getattr(pipe, "unet", None) is None:
        raise TuneError(
            f"{type(pipe).__name__}: the command line encodes prompts for Stable-Diffusion-like pipelines (a unet, a "
            "text_encoder, encode_prompt) and ShapesPipeline; for this pipeline call adaptive_sampling.evaluation.tune.tune "
            "from Python with its conditioning"
        )
    with torch.no_grad():
        cond, uncond = encode(prompts, device, 1, guidance > 1)[:2]
    return {"prompt_embeds": cond, "negative_prompt_embeds": uncond} if guidance > 1 else {"prompt_embeds": cond}


def _repeat(args_: dict, times: int) -> dict:
    return {k: v.repeat_interleave(times, dim=0) for k, v in args_.items()}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    args.argv = argv  # the report quotes the command as given
    try:
        plan = check(args)
    except TuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from .tune import plan_calls

    prompts, n_cal, nfe = plan["prompts"], plan["n_cal"], plan["nfe"]
    cal_prompts, test_prompts = prompts[:n_cal], prompts[n_cal:]
    calls = plan_calls(args.steps, nfe, n_cal * args.batch, len(test_prompts) * args.batch,
                       iterations=None if args.resume else 1)  # fmt: skip
    print(f"tune: {args.pipeline}, {args.steps} steps, budget {nfe} calls per image ({args.steps / nfe:.2f}x)")
    print(f"  calibration prompts ({len(cal_prompts)}): {cal_prompts}")
    print(f"  test prompts ({len(test_prompts)}), held out: {test_prompts}")
    print(f"  images per prompt {args.batch}, seed {args.seed}; search {args.calibration}{' (resumed: none)' if args.resume else ''}")
    print(f"  model calls (denoiser rows; a guided row counts once): calibration {calls['calibration']:,}, evaluation "
          f"{calls['evaluation']:,}, curves {calls['curves']:,}; total {calls['total']:,}")  # fmt: skip
    if args.dry_run:
        print("dry run: nothing was run")
        return 0
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    deadline = None if args.max_minutes is None else started + 60 * args.max_minutes
    try:
        pipe = load_pipeline(args)
        sampler = use_scheduler(pipe, args.scheduler)
        guidance = args.guidance if args.guidance is not None else (2.0 if type(pipe).__name__ == "ShapesPipeline" else 7.5)
        cal_args = _repeat(conditioning(pipe, cal_prompts, guidance, args.device), args.batch)
        test_args = _repeat(conditioning(pipe, test_prompts, guidance, args.device), args.batch)
    except TuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return _run(args, pipe, sampler, guidance, cal_args, test_args, cal_prompts, test_prompts, nfe, started, deadline)


def _run(args, pipe, sampler, guidance, cal_args, test_args, cal_prompts, test_prompts, nfe, started, deadline) -> int:
    import torch

    import adaptive_sampling.integrations.diffusers as asd

    from ..policies import Calibrated
    from .tune import tune

    pipe.scheduler.set_timesteps(args.steps)
    sigmas = asd.scheduler_sigmas(pipe.scheduler)
    grid_scheduler = copy.deepcopy(pipe.scheduler)

    def schedule(n: int) -> torch.Tensor:
        grid_scheduler.set_timesteps(n)
        return asd.scheduler_sigmas(grid_scheduler)

    model = asd.denoiser(pipe, guidance_scale=guidance)
    module = getattr(pipe, "unet", None) or pipe.transformer
    shape = (module.config.in_channels, module.config.sample_size, module.config.sample_size)
    scale = asd.start_scale(pipe.scheduler) / float(sigmas[0]) if sampler != "flow_euler" else 1.0

    def noise(rows: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(rows, *shape, generator=g) * scale).to(args.device)

    cal_noise = noise(len(next(iter(cal_args.values()))), args.seed + 10_000)
    test_noise = noise(len(next(iter(test_args.values()))), args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    schedule_in = Calibrated.load(args.out / "schedule.json") if args.resume else None
    remaining = None if deadline is None else max(1.0, deadline - time.perf_counter())
    try:
        result = tune(model, sampler, sigmas, schedule, cal_noise, test_noise, nfe=nfe, cal_args=cal_args, test_args=test_args,
                      method=args.calibration, seconds=remaining if args.calibration == "greedy" else None,
                      schedule_in=schedule_in, disable=args.quiet, stop_after=deadline,
                      checkpoint=lambda cal: cal.save(args.out / "schedule.json"))  # fmt: skip
    except KeyboardInterrupt:
        done = "schedule.json (the calibrated schedule)" if (args.out / "schedule.json").is_file() else "nothing"
        print(f"\ninterrupted: {done} is on disk in {args.out}; re-run the same command with --resume to reuse it"
              if done != "nothing" else f"\ninterrupted before the calibration finished: nothing on disk; re-run to start again",
              file=sys.stderr)  # fmt: skip
        return 130
    except TimeoutError as e:
        print(f"stopped by --max-minutes: {e}; schedule.json is in {args.out}; re-run with --resume (and more minutes) "
              "to finish the comparison", file=sys.stderr)  # fmt: skip
        return 3
    decode = _decoder(pipe)
    header = (f"`python -m adaptive_sampling tune {shlex.join(args.argv)}` on "
              f"{args.device} ({args.dtype}), {type(pipe).__name__}, scheduler {type(pipe.scheduler).__name__}, guidance {guidance:g}, "
              f"{args.batch} image(s) per prompt, seed {args.seed}; {time.perf_counter() - started:.0f} s in all.")  # fmt: skip
    files = result.write(args.out, decode=decode, header=header, prompts={"calibration": cal_prompts, "test": test_prompts})
    print(result.table())
    print(f"\n{result.verdict}\n\nwrote {', '.join(p.name for p in files)} to {args.out}")
    return 0


def _decoder(pipe):
    """Latents -> images in [-1, 1] for the pictures, where the pipeline can decode."""
    if type(pipe).__name__ == "ShapesPipeline":
        from .workloads import shapes

        return lambda lat: shapes.from_latent(lat.float())
    vae = getattr(pipe, "vae", None)
    if vae is None:
        return None
    import torch

    import adaptive_sampling.integrations.diffusers as asd

    factor = asd.end_scale(pipe.scheduler) / getattr(vae.config, "scaling_factor", 1.0)

    def decode(lat):
        with torch.no_grad():
            return vae.decode((lat * factor).to(vae.dtype)).sample.float()

    return decode


if __name__ == "__main__":
    raise SystemExit(main())
