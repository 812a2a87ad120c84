"""End to end on a GPU: wall-clock speedup of skipping on a Stable-Diffusion-1.5-size UNet, the
decision's cost, per-sample sub-batches, torch.compile recompiles with and without bucketing.

    OUT=<dir> bash bench/gpu_e2e.sh          # on the GPU machine (installs, runs, writes under $OUT)
    python bench/gpu_e2e.py --out <dir>      # the script itself; --tiny (or no CUDA): CPU tiny mode

The UNet is ``UNet2DConditionModel`` built from SD-1.5's published ``unet/config.json`` values
(``SD15_UNET`` below: 859.5M parameters), random weights, float16 on the GPU; no download. The
prompt embeddings are random [B, 77, 768] tensors (no text encoder needed); classifier-free guidance
7.5 makes every UNet call a batch of 2B. Random weights mean the images are noise: the timings and
call counts are real, the ThirdOrder decisions are those the rule takes on this random model's
trajectories (on a trained model they differ; NFE is reported for every row).

Phases (in this order; each writes its rows to ``rows.jsonl`` as they finish and the markdown
``summary.md`` is rewritten after each phase, so a run cut short keeps what it measured):

1. ``env``: device, torch / triton / diffusers / transformers versions, git commit, date.
2. ``subbatch``: one UNet call at 2k rows for k = 1..8 prompts (CFG), against the full batch of 8
   (16 rows): what a per-sample sub-batch costs, and what a bucket (k padded to 1, 2, 4, 8) costs.
3. ``decision``: the skipping machinery per step without the model (``SkipRun.denoise`` with a
   zero-cost model on a smooth synthetic trajectory at the SD latent size): ThirdOrder() and the
   floor (FixedMask, NaN check only), us per step, next to one UNet call (ms).
4. ``e2e``: DDIM, Euler, DPM-Solver++(2M), 50 steps, batch 1 and 8, through the library samplers
   (``adaptive_sampling.integrations.diffusers.denoiser``) and through the diffusers hook
   (``adaptive_sampling.integrations.diffusers.apply``) on a real ``StableDiffusionPipeline`` (the SD UNet, a tiny
   random VAE and text encoder that are never run: ``prompt_embeds`` in, ``output_type="latent"``
   out). Methods: no skipping; ``FixedMask`` with 25 of 50 calls (every other step); the
   policy ``ThirdOrder()`` (the paper's rule, whose calls depend on the trajectory; the
   library's ``default_policy()`` spends a fixed budget); on the hook path also the hook with a never-skipping mask (its own
   overhead). Per row: wall-clock, NFE, UNet calls, speedup vs no skipping on the same path, ideal
   ``steps / NFE`` and ``speedup / ideal`` (goal >= 0.97), and the host overhead per step (wall
   minus the UNet time the sub-batch table predicts for the calls made).
5. ``kernel``: the skip kernel at real sizes: ``bench/bench_skip_kernel.py`` for the SD-1.5 groups
   (fused vs the reference code's unfused ops) and the 268 MB history (% of HBM peak), in a
   subprocess with its own budget (the full sweep is ``bench/gpu_check.sh``).
6. ``compile``: ``torch.compile(unet)`` over a per-sample run (DDIM, batch 8, 50 steps, a
   per-prompt mask whose computing prompts go 1, 2, ..., 8, 1, ...: every sub-batch size occurs) in
   variants ``default`` (dynamic=None), ``reduce-overhead`` (CUDA graphs), ``static``
   (dynamic=False), each without and with ``bucketed(..., batch=8)`` (UNet batches 2, 4, 8, 16):
   graphs compiled (dynamo's ``unique_graphs``), first-run and warm wall-clock against the eager run,
   max relative difference from it. Variants are run in order of value and skipped when the time left
   is below their estimate (``--compile-graph-s`` per graph).

Estimated time on an H100 / H200 (SD-1.5 UNet fp16, 64x64 latents, SDPA attention; one UNet call
assumed ~15-25 ms at 2 rows, ~40-70 ms at 16 rows; the run records the real figures):

==========  =========================================================================  =======
phase       what                                                                       seconds
==========  =========================================================================  =======
start       imports, 860M-parameter UNet initialised on the GPU, pipeline              ~20
subbatch    8 batch sizes x (3 warm-up + 10 timed calls)                               ~5
decision    2 policies x 2 batch sizes x 50 steps x 2 repetitions                      ~3
e2e         3 samplers x 2 paths x (3-4 methods) runs of 50 steps; batch 1: 2 timed    ~90
            repetitions (~20 s), batch 8: 1 (~70 s); plus warm-up runs
kernel      pytest of 11 kernel benchmarks (Triton compile of the kernel included)      ~40
compile     per variant: graphs x ~40-70 s of Inductor compile + 3 runs of ~3 s:       ~100 each
            default 2 graphs, reduce-overhead+buckets 2 graphs (4 CUDA graphs), static
            +buckets 4; the rest only if time is left
==========  =========================================================================  =======

``--budget-s`` (default 450 on a GPU) bounds the whole run: e2e keeps 60 s for the kernel phase,
each later unit starts only if its estimate fits, and ``bench/gpu_e2e.sh`` kills the script
(SIGINT, then the summary of what finished is written) at its own limit. Expected total on an
H200: 6-7.5 minutes.

CPU tiny mode (``--tiny``, automatic without CUDA): a tiny random UNet (``TINY_UNET``, 8x8 latents),
16 steps (``FixedMask`` with 8 calls), float32, the compile phase with a counting eager backend
(dynamo's graph count without Inductor codegen; no CUDA graphs). It exists to test the script
(tests/test_gpu_e2e.py); its timings are CPU timings of a toy model and say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adaptive_sampling import FixedMask, ThirdOrder, sample_ddim, sample_dpmpp_2m, sample_euler  # noqa: E402
from adaptive_sampling.integrations.bucketing import bucket_size, bucket_sizes, bucketed  # noqa: E402
from adaptive_sampling.runner import SkipRun  # noqa: E402

# Stable Diffusion 1.5's unet/config.json (runwayml/stable-diffusion-v1-5), the values that differ
# from or matter beside UNet2DConditionModel's defaults: 859,520,964 parameters.
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=768,
    attention_head_dim=8,
)
SD15_TEXT = (77, 768)  # CLIP ViT-L/14 prompt embeddings: tokens x width

# The tests' tiny UNet (tests/tiny_pipelines.py): CPU tiny mode.
TINY_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(8, 16),
    layers_per_block=1,
    cross_attention_dim=8,
    norm_num_groups=4,
    attention_head_dim=2,
)
TINY_TEXT = (8, 8)

SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
# Stable Diffusion's configurations of the paper's three samplers (as tests/test_diffusers.py)
SAMPLERS = {
    "ddim": ("DDIMScheduler", dict(clip_sample=False, set_alpha_to_one=False, steps_offset=1), sample_ddim),
    "euler": ("EulerDiscreteScheduler", dict(steps_offset=1), sample_euler),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++", solver_order=2), sample_dpmpp_2m),
}
GUIDANCE = 7.5
GOAL = 0.97  # speedup >= GOAL x steps / NFE

COMPILE_VARIANTS = {
    # name: (torch.compile kwargs, bucket, graphs expected for the estimate; CUDA only)
    "default": (dict(), None, 2, False),
    "reduce-overhead-pow2": (dict(mode="reduce-overhead"), "pow2", 2, True),
    "static-pow2": (dict(dynamic=False), "pow2", 4, False),
    "default-pow2": (dict(), "pow2", 2, False),
    "reduce-overhead": (dict(mode="reduce-overhead"), None, 2, True),
    "static": (dict(dynamic=False), None, 8, False),
}
GPU_COMPILE_ORDER = ["default", "reduce-overhead-pow2", "static-pow2", "default-pow2", "reduce-overhead", "static"]
CPU_COMPILE_ORDER = ["static", "static-pow2", "default", "default-pow2"]


@dataclass
class Mode:
    name: str  # "gpu" or "cpu-tiny"
    device: torch.device
    dtype: torch.dtype
    unet_config: dict
    text: tuple[int, int]
    steps: int
    batches: tuple[int, ...]
    reps: dict[int, int]
    subbatch_reps: int
    compile_backend: Any = None  # None: Inductor (torch.compile's default)
    compile_graph_s: float = 60.0

    @property
    def latent(self) -> int:
        return self.unet_config["sample_size"]

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def make_mode(args) -> Mode:
    cuda = torch.cuda.is_available() and not args.tiny
    if cuda:
        mode = Mode("gpu", torch.device("cuda"), torch.float16, SD15_UNET, SD15_TEXT, 50, (1, 8), {1: 2, 8: 1}, 10,
                    compile_graph_s=60.0)
    else:
        mode = Mode("cpu-tiny", torch.device("cpu"), torch.float32, TINY_UNET, TINY_TEXT, 16, (1, 8), {1: 1, 8: 1}, 3,
                    compile_backend=CountingBackend(), compile_graph_s=5.0)
    if args.steps:
        mode.steps = args.steps
    if args.reps:
        mode.reps = {b: args.reps for b in mode.batches}
    if args.compile_graph_s:
        mode.compile_graph_s = args.compile_graph_s
    return mode


class CountingBackend:
    """A torch.compile backend that counts compiled graphs and runs them eagerly (CPU tiny mode)."""

    def __init__(self):
        self.compiles = 0

    def __call__(self, gm, example_inputs):
        self.compiles += 1
        return gm.forward


# --------------------------------------------------------------------------------------------
# Recording
# --------------------------------------------------------------------------------------------


class Recorder:
    """Rows (JSONL, appended and flushed one by one), the time budget, the summary."""

    def __init__(self, out: Path, budget_s: float, mode: Mode):
        self.out, self.budget_s, self.mode = out, budget_s, mode
        self.t0 = time.monotonic()
        self.rows: list[dict] = []
        self.status = "running"
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "rows.jsonl"
        self.path.write_text("")

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def add(self, row: dict) -> dict:
        row = {**row, "mode": self.mode.name, "t_s": round(self.elapsed(), 2)}
        self.rows.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row, default=_json_default) + "\n")
        write_summary(self)  # cheap; a run killed at any point keeps an up-to-date summary
        return row

    def skip(self, phase: str, what: dict, reason: str) -> None:
        self.add({"phase": phase, **what, "skipped": reason})
        log(f"  skip {phase} {what}: {reason}")

    def of(self, phase: str) -> list[dict]:
        return [r for r in self.rows if r.get("phase") == phase and "skipped" not in r and "error" not in r]


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def log(msg: str) -> None:
    print(msg, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t, out


# --------------------------------------------------------------------------------------------
# Models, pipeline, runs
# --------------------------------------------------------------------------------------------


def build_unet(mode: Mode):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from diffusers import UNet2DConditionModel
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()  # not the .to(dtype) notice of a model built in code
    torch.manual_seed(0)
    with torch.device(mode.device):  # initialise on the device: 860M parameters in seconds
        unet = UNet2DConditionModel(**mode.unet_config)
    return unet.to(mode.dtype).eval().requires_grad_(False)


def build_pipeline(unet, mode: Mode):
    """A StableDiffusionPipeline around ``unet`` with a tiny random VAE (one block: latents =
    image size) and text encoder; both are never run (prompt_embeds in, latents out)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from diffusers import AutoencoderKL, StableDiffusionPipeline
        from transformers import CLIPTextConfig, CLIPTextModel

        from tests.tiny_pipelines import _vocab_files, clip_tokenizer

    vae = AutoencoderKL(block_out_channels=(8,), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=4)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=8, intermediate_size=16, num_attention_heads=2,
        num_hidden_layers=1, vocab_size=_vocab_files()[2], projection_dim=8, max_position_embeddings=77))
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae.to(mode.device, mode.dtype), text_encoder=text_encoder.to(mode.device, mode.dtype),
        tokenizer=clip_tokenizer(), scheduler=make_scheduler("ddim"), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_scheduler(name: str):
    import diffusers

    cls, kw, _ = SAMPLERS[name]
    return getattr(diffusers, cls)(**{**SD_SCHEDULER, **kw})


@dataclass
class Inputs:
    cond: torch.Tensor
    uncond: torch.Tensor
    noise: torch.Tensor


def inputs(mode: Mode, batch: int, seed: int = 0) -> Inputs:
    g = torch.Generator().manual_seed(seed)
    L, D = mode.text
    h = mode.latent
    cond = torch.randn(batch, L, D, generator=g).to(mode.device, mode.dtype)
    uncond = torch.randn(batch, L, D, generator=g).to(mode.device, mode.dtype)
    noise = torch.randn(batch, 4, h, h, generator=g).to(mode.device)
    return Inputs(cond, uncond, noise)


def half_mask(steps: int) -> np.ndarray:
    """Every other step computes (steps 0, 2, 4, ...): 25 of 50."""
    m = np.zeros(steps, bool)
    m[::2] = True
    return m


def staircase(batch: int, steps: int) -> np.ndarray:
    """Per-prompt mask: step 0 all prompts, then the first k prompts with k = 1, 2, ..., batch, 1, ..."""
    m = np.ones((batch, steps), bool)
    for i in range(1, steps):
        m[:, i] = np.arange(batch) < ((i - 1) % batch) + 1
    return m


def methods(mode: Mode, path: str) -> dict[str, Any]:
    k = int(half_mask(mode.steps).sum())
    out: dict[str, Any] = {"none": None}
    if path == "hook":
        out["hook, never skipping"] = FixedMask(np.ones(mode.steps, bool))
    out[f"FixedMask({k} of {mode.steps})"] = FixedMask(half_mask(mode.steps))
    out["ThirdOrder()"] = ThirdOrder()
    return out


def library_run(unet, name: str, inp: Inputs, policy, steps: int, wrap=None):
    """denoiser() + the library sampler; returns (final VE latent, report, the wrapped model)."""
    import adaptive_sampling.integrations.diffusers as asd

    sched = make_scheduler(name)
    sched.set_timesteps(steps)
    model = asd.denoiser(unet, sched, guidance_scale=GUIDANCE)
    if wrap is not None:
        model = wrap(model)
    x = inp.noise.float() * asd.start_scale(sched)
    extra = {"prompt_embeds": inp.cond, "negative_prompt_embeds": inp.uncond}
    sampler = SAMPLERS[name][2]
    x, report = sampler(model, x, asd.scheduler_sigmas(sched), extra_args=extra, skip=policy, disable=True)
    return x, report, model


def hook_run(pipe, name: str, inp: Inputs, policy, steps: int, pad_to=None):
    """The pipeline's own loop, hooked with ``policy`` (None: the plain pipeline)."""
    import adaptive_sampling.integrations.diffusers as asd

    pipe.scheduler = make_scheduler(name)
    size = inp.noise.shape[-1]  # the VAE has one block: image size = latent size
    ctx = asd.apply(pipe, skip=policy, pad_to=pad_to) if policy is not None else contextlib.nullcontext(None)
    with ctx as handle:
        out = pipe(prompt_embeds=inp.cond, negative_prompt_embeds=inp.uncond, latents=inp.noise.to(inp.cond.dtype),
                   num_inference_steps=steps, guidance_scale=GUIDANCE, output_type="latent", height=size, width=size).images
    return out, (handle.report if handle is not None else None), handle


def nfe_fields(report, steps: int, batch: int) -> dict:
    if report is None:  # no skipping: every step, every row
        computed = np.ones((batch, steps), bool)
        calls = steps
    else:
        computed = np.asarray(report.computed)
        calls = int(report.model_calls)
    nfe = computed.sum(1)
    per_step = computed.sum(0)
    return {
        "nfe_mean": float(nfe.mean()),
        "nfe_min": int(nfe.min()),
        "nfe_max": int(nfe.max()),
        "unet_calls": calls,
        "unet_rows": int(2 * per_step.sum()),
        "prompts_per_call": [int(k) for k in per_step if k],
    }


# --------------------------------------------------------------------------------------------
# Phases
# --------------------------------------------------------------------------------------------


def env_row(mode: Mode, args) -> dict:
    def version(name):
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as dist_version

        try:
            return dist_version(name)
        except PackageNotFoundError:
            return None

    commit = os.environ.get("GIT_COMMIT")
    if not commit:
        try:
            commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True, timeout=10).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            commit = None
    dirty = None
    if commit and not os.environ.get("GIT_COMMIT"):
        try:
            dirty = bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                                        capture_output=True, text=True, timeout=10).stdout.strip())
        except (OSError, subprocess.SubprocessError):
            pass
    row = {
        "phase": "env",
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit or "-",
        "git_dirty": dirty,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "triton": version("triton"),
        "diffusers": version("diffusers"),
        "transformers": version("transformers"),
        "device": torch.cuda.get_device_name(0) if mode.cuda else f"CPU ({platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads)",
        "unet_dtype": str(mode.dtype).removeprefix("torch."),
        "latent": [4, mode.latent, mode.latent],
        "text": list(mode.text),
        "steps": mode.steps,
        "batches": list(mode.batches),
        "guidance": GUIDANCE,
        "budget_s": args.budget_s,
        "argv": sys.argv[1:],
    }
    if mode.cuda:
        p = torch.cuda.get_device_properties(0)
        row.update(capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1))
    return row


def phase_subbatch(rec: Recorder, unet, mode: Mode, max_batch: int) -> dict[int, float]:
    """ms of one UNet call at 2k rows (k prompts with CFG), k = 1..max_batch."""
    log("phase subbatch")
    L, D = mode.text
    h = mode.latent
    t = torch.tensor(500.0, device=mode.device)
    table: dict[int, float] = {}
    for k in range(1, max_batch + 1):
        if rec.left() < 5:
            rec.skip("subbatch", {"prompts": k}, "time budget")
            continue
        n = 2 * k
        sample = torch.randn(n, 4, h, h, device=mode.device, dtype=mode.dtype)
        ehs = torch.randn(n, L, D, device=mode.device, dtype=mode.dtype)
        with torch.no_grad():
            call = lambda: unet(sample, t, encoder_hidden_states=ehs, return_dict=False)[0]  # noqa: E731
            for _ in range(3):
                call()
            times = [timed(call, mode.device)[0] for _ in range(mode.subbatch_reps)]
        table[k] = statistics.median(times) * 1e3
        rec.add({"phase": "subbatch", "prompts": k, "unet_batch": n, "ms": table[k], "ms_all": [1e3 * x for x in times]})
    return table


def phase_decision(rec: Recorder, mode: Mode, unet_ms: dict[int, float]) -> None:
    """us per step of SkipRun.denoise with a zero-cost model (the policy's decide / reuse / record,
    the gather and scatter of the sub-batch, the host read), on a smooth synthetic trajectory."""
    log("phase decision")
    steps = 50
    h = mode.latent
    sched = make_scheduler("ddim")
    sched.set_timesteps(steps)
    import adaptive_sampling.integrations.diffusers as asd

    sigmas = asd.scheduler_sigmas(sched)
    model = lambda x, sigma, **kw: x  # noqa: E731  (denoised = x: no model cost)
    for batch in mode.batches:
        g = torch.Generator().manual_seed(0)
        base = torch.randn(batch, 4, h, h, generator=g)
        drift = torch.randn(batch, 4, h, h, generator=g)
        xs = [(base + drift * (k / steps) ** 2).to(mode.device) for k in range(steps)]
        for label, policy in (("FixedMask (NaN check only)", FixedMask(np.ones(steps, bool))), ("ThirdOrder()", ThirdOrder())):
            if rec.left() < 5:
                rec.skip("decision", {"policy": label, "batch": batch}, "time budget")
                continue
            per_step, skipped = [], 0
            for _ in range(2):
                run = SkipRun(model, xs[0], sigmas, None, policy, "ddim")
                for k in range(steps):
                    sigma = run.sigma_rows(k, xs[k])
                    dt, _ = timed(lambda: run.denoise(k, xs[k], sigma), mode.device)
                    if k >= 4:
                        per_step.append(dt * 1e6)
                skipped = int((~run.computed).sum())
            rec.add({
                "phase": "decision", "policy": label, "batch": batch, "latent_dtype": "float32",
                "us_per_step": statistics.median(per_step), "us_p90": float(np.percentile(per_step, 90)),
                "skipped_rows": skipped, "unet_ms": unet_ms.get(batch),
            })


def phase_e2e(rec: Recorder, unet, pipe, mode: Mode, unet_ms: dict[int, float], reserve_s: float) -> None:
    log("phase e2e")
    steps = mode.steps
    for batch in mode.batches:
        inp = inputs(mode, batch)
        # warm-up of both paths at this batch size (first-call Python and cuDNN / SDPA work)
        with torch.no_grad():
            library_run(unet, "ddim", inp, None, 2)
            hook_run(pipe, "ddim", inp, FixedMask(np.ones(2, bool)), 2)
        for name in SAMPLERS:
            for path in ("library", "hook"):
                base = None
                for label, policy in methods(mode, path).items():
                    what = {"path": path, "sampler": name, "batch": batch, "method": label}
                    if rec.left() < reserve_s:
                        rec.skip("e2e", what, "time budget")
                        continue
                    try:
                        walls = []
                        for _ in range(mode.reps[batch]):
                            if path == "library":
                                dt, (_, report, _) = timed(lambda: library_run(unet, name, inp, policy, steps), mode.device)
                            else:
                                dt, (_, report, _) = timed(lambda: hook_run(pipe, name, inp, policy, steps), mode.device)
                            walls.append(dt)
                    except Exception as e:  # noqa: BLE001 - record and go on: one run, one result
                        rec.add({"phase": "e2e", **what, "error": f"{type(e).__name__}: {e}"[:500]})
                        log(traceback.format_exc())
                        continue
                    wall = min(walls)
                    row = {"phase": "e2e", **what, "steps": steps, "wall_s": wall, "walls_s": walls,
                           **nfe_fields(report, steps, batch)}
                    if label == "none":
                        base = wall
                    if base is not None:
                        row["speedup"] = base / wall
                        row["ideal"] = steps / row["nfe_mean"]
                        row["speedup_over_ideal"] = row["speedup"] / row["ideal"]
                    predicted = sum(unet_ms.get(k, math.nan) for k in row["prompts_per_call"]) / 1e3
                    if math.isfinite(predicted):
                        row["unet_s_predicted"] = predicted
                        row["overhead_ms_per_step"] = 1e3 * (wall - predicted) / steps
                    rec.add(row)
                    log(f"  {path:7s} {name:8s} b{batch} {label:24s} {wall:7.3f} s  NFE {row['nfe_mean']:.1f}"
                        + (f"  speedup {row['speedup']:.3f} / ideal {row['ideal']:.3f}" if "speedup" in row else ""))


def phase_kernel(rec: Recorder, mode: Mode, out: Path) -> None:
    log("phase kernel")
    if not mode.cuda:
        rec.skip("kernel", {}, "CUDA only (the compiled Triton kernel); bench/gpu_check.sh runs the full kernel check")
        return
    limit = int(min(90, rec.left() - 5))
    if limit < 30:
        rec.skip("kernel", {}, "time budget")
        return
    jsonl = out / "kernel_rows.jsonl"
    jsonl.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("ADAPTIVE_SAMPLING_BACKEND", "TRITON_INTERPRET")}
    path = os.environ.get("PYTHONPATH")
    env.update(BENCH_JSONL=str(jsonl), BENCH_BUDGET_S=str(max(10, limit - 25)),
               PYTHONPATH=str(ROOT) + (os.pathsep + path if path else ""))
    cmd = [sys.executable, "-m", "pytest", "bench/bench_skip_kernel.py", "-q", "-p", "no:cacheprovider",
           "--benchmark-enable", "--benchmark-min-rounds=5", "--benchmark-max-time=0.1", "--benchmark-warmup=on",
           "--benchmark-warmup-iterations=3",
           "-k", "(test_skip_step and sd15 and fused and not jit and not program) or (test_large_history and not pps)"]
    t = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
        rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired as e:
        rc, tail = "timeout", str(e.stdout or "")[-3000:]
    (out / "kernel_bench.log").write_text(tail)
    n = 0
    if jsonl.exists():
        for line in jsonl.read_text().splitlines():
            r = json.loads(line)
            info = r.get("extra_info", {})
            rec.add({"phase": "kernel", "group": r.get("group"), "variant": info.get("variant"),
                     "wall_us": info.get("wall_us"), "device_us": info.get("device_us"),
                     "device_gbps": info.get("device_gbps"), "pct_peak": info.get("pct_peak"),
                     "stream_pct_peak": info.get("stream_pct_peak"), "bytes_per_step": info.get("bytes_per_step")})
            n += 1
    rec.add({"phase": "kernel_status", "returncode": rc, "rows": n, "seconds": round(time.monotonic() - t, 1)})


def _dynamo_counts() -> dict:
    from torch._dynamo.utils import counters

    out = {"unique_graphs": int(counters["stats"].get("unique_graphs", 0))}
    for key, value in counters["inductor"].items():
        if "cudagraph" in key:
            out[key] = int(value)
    return out


def phase_compile(rec: Recorder, unet, mode: Mode, batch: int, variants: list[str]) -> None:
    log("phase compile")
    steps = mode.steps
    name = "ddim"
    inp = inputs(mode, batch, seed=1)
    policy = FixedMask(staircase(batch, steps))
    wraps = {None: None, "pow2": lambda m: bucketed(m, batch=batch)}
    eager: dict[Any, tuple[float, torch.Tensor]] = {}
    measured: list[float] = []  # compile seconds per graph of the variants run so far
    for bucket in (None, "pow2"):
        if rec.left() < 10:
            rec.skip("compile", {"variant": "eager", "bucket": bucket}, "time budget")
            continue
        with torch.no_grad():
            library_run(unet, name, inp, policy, steps, wraps[bucket])  # warm
            dt, (x, report, model) = timed(lambda: library_run(unet, name, inp, policy, steps, wraps[bucket]), mode.device)
        eager[bucket] = (dt, x)
        rec.add({"phase": "compile", "variant": "eager", "bucket": bucket or "none", "warm_s": dt,
                 "unet_batches": sorted({2 * s for s in _model_sizes(model, report)}), **nfe_fields(report, steps, batch)})
    for variant in variants:
        kwargs, bucket, graphs, needs_cuda = COMPILE_VARIANTS[variant]
        what = {"variant": variant, "bucket": bucket or "none", "compile_kwargs": kwargs}
        if needs_cuda and not mode.cuda:
            rec.skip("compile", what, "CUDA graphs need CUDA")
            continue
        est = graphs * mode.compile_graph_s + 4 * (eager.get(None, (5.0,))[0])
        if rec.left() < est:
            rec.skip("compile", what, f"time budget (estimate {est:.0f} s, {rec.left():.0f} s left)")
            continue
        torch._dynamo.reset()
        kw = dict(kwargs)
        backend = None
        if mode.compile_backend is not None:
            backend = CountingBackend()
            kw = {k: v for k, v in kw.items() if k != "mode"}
            kw["backend"] = backend
        try:
            compiled = torch.compile(unet, **kw)
            c0 = _dynamo_counts()
            with torch.no_grad():
                first, (x, report, model) = timed(lambda: library_run(compiled, name, inp, policy, steps, wraps[bucket]), mode.device)
                c1 = _dynamo_counts()
                warm, (x, report, model) = timed(lambda: library_run(compiled, name, inp, policy, steps, wraps[bucket]), mode.device)
                c2 = _dynamo_counts()
        except Exception as e:  # noqa: BLE001 - record the failure (a compile error is a result)
            rec.add({"phase": "compile", **what, "error": f"{type(e).__name__}: {str(e)[:400]}"})
            log(traceback.format_exc())
            continue
        row = {"phase": "compile", **what, "first_s": first, "warm_s": warm,
               "graphs": c1["unique_graphs"] - c0["unique_graphs"],
               "graphs_in_warm_run": c2["unique_graphs"] - c1["unique_graphs"],
               "counters": {k: c2[k] - c0.get(k, 0) for k in c2},
               "unet_batches": sorted({2 * s for s in _model_sizes(model, report)}), **nfe_fields(report, steps, batch)}
        if backend is not None:
            row["backend_compiles"] = backend.compiles
        if None in eager:
            row["eager_s"] = eager[None][0]
            row["speedup_vs_eager"] = eager[None][0] / warm
            ref = eager[bucket][1] if bucket in eager else eager[None][1]
            row["max_rel_diff_vs_eager"] = float((x - ref).abs().max() / ref.abs().max())
        if row["graphs"] > 0:  # the next variants' estimates use what compiling really took here
            row["compile_s_per_graph"] = max(0.0, first - warm) / row["graphs"]
            measured.append(row["compile_s_per_graph"])
            mode.compile_graph_s = max(1.25 * max(measured), 1.0)  # the slowest seen (a cache hit is fast)
        rec.add(row)
        log(f"  {variant:22s} graphs {row['graphs']}  first {first:.1f} s  warm {warm:.3f} s  UNet batches {row['unet_batches']}")
    torch._dynamo.reset()


def _model_sizes(model, report) -> list[int]:
    """The prompt batch sizes the (compiled) UNet saw: the buckets if the model pads, else the sub-batches."""
    seen = getattr(model, "seen", None)
    if seen is not None:
        return list(seen)
    return [int(k) for k in np.asarray(report.computed).sum(0) if k]


# --------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------


def _f(v, fmt=".3f", none="-"):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return none
    return format(v, fmt)


def write_summary(rec: Recorder) -> None:
    mode = rec.mode
    env = next((r for r in rec.rows if r.get("phase") == "env"), {})
    L: list[str] = []
    if mode.name == "gpu":
        L.append(f"# End to end on a GPU: {env.get('device', '?')}, {env.get('date_utc', '?')[:10]}")
    else:
        L.append("# End to end, CPU TINY MODE (not GPU results)")
        L.append("")
        L.append("**CPU tiny mode**: a tiny random UNet (8x8 latents), few steps, float32 on the CPU, the compile phase "
                 "with a counting eager backend. These timings are CPU timings of a toy model, for testing the script; "
                 "they say nothing about a GPU.")
    L += ["", f"Status: **{rec.status}** after {rec.elapsed():.0f} s (budget {rec.budget_s:.0f} s).", ""]
    keys = ("device", "capability", "torch", "cuda_runtime", "triton", "diffusers", "transformers", "python",
            "git_commit", "git_dirty", "date_utc", "unet_dtype", "latent", "text", "steps", "batches", "guidance", "argv")
    L.append("| " + " | ".join(f"{k}: `{env.get(k)}`" for k in keys if k in env) + " |")
    L.append("")
    L.append("UNet: `UNet2DConditionModel` with " + ("SD-1.5's published config (859.5M parameters), random weights"
             if mode.name == "gpu" else "the tests' tiny config, random weights")
             + f"; classifier-free guidance {GUIDANCE} (a UNet call holds 2 rows per prompt). The policy measured is "
             "the paper's rule, `ThirdOrder()` (not the library's `default_policy()`, a fixed budget); random weights make the "
             "images noise, so its NFE is what the rule does on this model's trajectories.")

    sub = {r["prompts"]: r for r in rec.of("subbatch")}
    if sub:
        full = max(sub)
        L += ["", "## Per-sample sub-batches: one UNet call", "",
              f"k prompts of {full} compute (UNet batch 2k, CFG); `vs full`: the call's time over the full batch's; "
              "`bucket`: the pow2 bucket k is padded to and its cost.", "",
              "| k | UNet batch | ms | vs full | k / full | bucket | bucket ms |", "|---|---|---|---|---|---|---|"]
        sizes = bucket_sizes("pow2", full)
        for k, r in sorted(sub.items()):
            b = bucket_size(k, sizes)
            L.append(f"| {k} | {r['unet_batch']} | {r['ms']:.2f} | {r['ms'] / sub[full]['ms']:.2f} | {k / full:.2f} | "
                     f"{b} | {_f(sub.get(b, {}).get('ms'), '.2f')} |")

    dec = rec.of("decision")
    if dec:
        L += ["", "## The decision's cost per step", "",
              "`SkipRun.denoise` with a zero-cost model on a smooth synthetic trajectory (float32 latents of the UNet's "
              "size): decide, reuse, record, gather/scatter, the one host read; median over steps 4..49 of 2 runs.", "",
              "| policy | batch | us / step (median) | p90 | one UNet call at this batch, ms | share of a UNet call |",
              "|---|---|---|---|---|---|"]
        for r in dec:
            share = r["us_per_step"] / 1e3 / r["unet_ms"] if r.get("unet_ms") else None
            L.append(f"| {r['policy']} | {r['batch']} | {r['us_per_step']:.0f} | {r['us_p90']:.0f} | {_f(r.get('unet_ms'), '.2f')} "
                     f"| {_f(share and 100 * share, '.1f')}% |")

    e2e = rec.of("e2e")
    if e2e:
        L += ["", "## Wall-clock, 50-step runs" if mode.name == "gpu" else f"## Wall-clock, {mode.steps}-step runs", "",
              "`speedup`: wall of no skipping on the same path, sampler and batch over this row's; `ideal` = steps / "
              f"mean NFE; goal: speedup >= {GOAL} x ideal. `overhead/step`: (wall - UNet time the sub-batch table "
              "predicts for the calls made) / steps: the sampler, scheduler, guidance and skipping work on the host "
              "and device outside the UNet. Wall: the best of the timed repetitions.", "",
              "| path | sampler | batch | method | NFE mean [min, max] | UNet calls | wall s | speedup | ideal | "
              "speedup / ideal | overhead/step ms |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in e2e:
            ratio = r.get("speedup_over_ideal")
            mark = "" if ratio is None or r["method"] in ("none", "hook, never skipping") else (" ok" if ratio >= GOAL else " **below goal**")
            L.append(f"| {r['path']} | {r['sampler']} | {r['batch']} | {r['method']} | {r['nfe_mean']:.1f} "
                     f"[{r['nfe_min']}, {r['nfe_max']}] | {r['unet_calls']} | {r['wall_s']:.3f} | {_f(r.get('speedup'))} | "
                     f"{_f(r.get('ideal'))} | {_f(ratio)}{mark} | {_f(r.get('overhead_ms_per_step'), '.2f')} |")

    comp = rec.of("compile")
    if comp:
        L += ["", "## torch.compile(unet) over a per-sample run", "",
              "DDIM, batch " + str(max(mode.batches)) + f", {mode.steps} steps, a per-prompt mask whose computing prompts go 1, 2, ..., "
              "8, 1, ...: every sub-batch size occurs. `graphs`: graphs compiled in the first run (dynamo's unique_graphs; "
              "a recompile storm shows here); `first`: the first run, compiles included; `warm`: the second run. "
              "`bucket pow2`: `bucketed(denoiser, batch=8)`, the UNet sees 2, 4, 8, 16 rows. `speedup vs eager`: the eager "
              "run without bucketing over this warm run. Variants run one after the other with `torch._dynamo.reset()` "
              "between them; Inductor's on-disk cache may shorten a later variant's compiles."
              + (" CPU tiny mode: a counting eager backend (dynamo traces, no Inductor codegen)." if mode.name != "gpu" else ""),
              "", "| variant | bucket | UNet batches seen | graphs | first s | warm s | eager s | speedup vs eager | "
              "max rel diff vs eager | counters |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in comp:
            L.append(f"| {r['variant']} | {r['bucket']} | {r.get('unet_batches')} | {r.get('graphs', '-')} | "
                     f"{_f(r.get('first_s'), '.2f')} | {_f(r.get('warm_s'))} | {_f(r.get('eager_s'))} | "
                     f"{_f(r.get('speedup_vs_eager'))} | {_f(r.get('max_rel_diff_vs_eager'), '.2e')} | {r.get('counters', '')} |")

    kern = rec.of("kernel")
    if kern:
        L += ["", "## Skip kernel at real sizes (bench/bench_skip_kernel.py)", "",
              "| group | variant | wall us | device us | device GB/s | % of peak | streamed % of peak |", "|---|---|---|---|---|---|---|"]
        for r in kern:
            L.append(f"| {r['group']} | {r['variant']} | {_f(r.get('wall_us'), '.1f')} | {_f(r.get('device_us'), '.1f')} | "
                     f"{_f(r.get('device_gbps'), '.0f')} | {_f(r.get('pct_peak'), '.1f')} | {_f(r.get('stream_pct_peak'), '.1f')} |")
    bad = [r for r in rec.rows if "skipped" in r or "error" in r]
    if bad:
        L += ["", "## Skipped or failed", ""]
        for r in bad:
            what = {k: v for k, v in r.items() if k not in ("phase", "skipped", "error", "mode", "t_s")}
            L.append(f"- {r['phase']} {what}: {r.get('skipped') or r.get('error')}")
    L.append("")
    (rec.out / "summary.md").write_text("\n".join(L))


# --------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "gpu_e2e_out"), help="output folder (default $OUT or ./gpu_e2e_out)")
    p.add_argument("--tiny", action="store_true", help="CPU tiny mode even with CUDA")
    p.add_argument("--budget-s", type=float, default=None, help="time budget of the whole run (default 450 GPU, 300 CPU)")
    p.add_argument("--steps", type=int, default=None, help="override the number of steps (50 GPU, 16 tiny)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions of every e2e run (default: GPU 2 at batch 1, 1 at batch 8)")
    p.add_argument("--phases", default="subbatch,decision,e2e,kernel,compile", help="comma-separated phases to run")
    p.add_argument("--compile-variants", default=None, help=f"comma-separated, from {list(COMPILE_VARIANTS)}")
    p.add_argument("--compile-batch", type=int, default=8, help="batch of the compile phase's per-sample run")
    p.add_argument("--compile-graph-s", type=float, default=None, help="estimated seconds per compiled graph (60 GPU, 5 CPU)")
    args = p.parse_args(argv)
    mode = make_mode(args)
    if args.budget_s is None:
        args.budget_s = 450.0 if mode.cuda else 300.0
    phases = [s for s in args.phases.split(",") if s]
    unknown = set(phases) - {"subbatch", "decision", "e2e", "kernel", "compile"}
    if unknown:
        p.error(f"unknown phases {sorted(unknown)}")
    variants = (args.compile_variants.split(",") if args.compile_variants
                else GPU_COMPILE_ORDER if mode.cuda else CPU_COMPILE_ORDER)
    if set(variants) - set(COMPILE_VARIANTS):
        p.error(f"unknown compile variants {sorted(set(variants) - set(COMPILE_VARIANTS))}")
    out = Path(args.out)
    if not mode.cuda:
        torch.set_num_threads(1)
    rec = Recorder(out, args.budget_s, mode)
    rec.add(env_row(mode, args))
    log(f"gpu_e2e: mode {mode.name}, device {rec.rows[0]['device']}, out {out}, budget {args.budget_s:.0f} s")
    code = 0
    try:
        unet = build_unet(mode)
        rec.add({"phase": "build", "unet_params": sum(p.numel() for p in unet.parameters())})
        unet_ms: dict[int, float] = {}
        max_batch = max(mode.batches + ((args.compile_batch,) if "compile" in phases else ()))
        if "subbatch" in phases:
            unet_ms = phase_subbatch(rec, unet, mode, max_batch)
            write_summary(rec)
        if "decision" in phases:
            phase_decision(rec, mode, unet_ms)
            write_summary(rec)
        if "e2e" in phases:
            pipe = build_pipeline(unet, mode)
            reserve = 60.0 if (mode.cuda and "kernel" in phases) else 0.0
            phase_e2e(rec, unet, pipe, mode, unet_ms, reserve)
            write_summary(rec)
        if "kernel" in phases:
            phase_kernel(rec, mode, out)
            write_summary(rec)
        if "compile" in phases:
            phase_compile(rec, unet, mode, args.compile_batch, variants)
        rec.status = "finished"
    except KeyboardInterrupt:
        rec.status = "INTERRUPTED (time limit): partial results"
        code = 130
    except Exception as e:  # noqa: BLE001 - keep what was measured
        rec.status = f"FAILED: {type(e).__name__}: {str(e)[:300]}"
        log(traceback.format_exc())
        code = 1
    finally:
        write_summary(rec)
        log(f"gpu_e2e: {rec.status}; {len(rec.rows)} rows in {rec.path}, summary {out / 'summary.md'}")
    return code


if __name__ == "__main__":
    sys.exit(main())
