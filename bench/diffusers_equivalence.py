"""The equivalence figures of the diffusers integration, measured on the tiny offline pipelines of
tests/tiny_pipelines.py (the same cases tests/test_diffusers.py asserts, with more seeds).

Every figure is max|a - b| / max|b| over the final latents (float32, CPU); "forwards" are UNet
forwards counted at ``conv_in``. Run: ``PYTHONPATH=. python bench/diffusers_equivalence.py``.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.simplefilter("ignore")

from tests import test_diffusers as T  # noqa: E402  (its helpers: use, run, library_run, Counter, ...)

import adaptive_sampling.integrations.diffusers as asd  # noqa: E402
from adaptive_sampling import Extrapolate, FixedMask  # noqa: E402

SEEDS = (1, 2, 3)


def main() -> None:
    torch.set_num_threads(1)
    pipe = T.sd_pipeline()
    N, MASK = T.N, T.MASK
    out = []

    worst = 0.0
    for name in T.SCHEDULERS:
        for g in (1.0, 7.5):
            for per in (1, 2):
                for seed in SEEDS:
                    T.use(pipe, name)
                    lat = T.noise(2 * per, seed)
                    ref = T.run(pipe, T.PROMPTS[:2], lat, g, num_images_per_prompt=per)
                    with asd.apply(pipe, skip=FixedMask(np.ones(N, bool))):
                        o = T.run(pipe, T.PROMPTS[:2], lat, g, num_images_per_prompt=per)
                    worst = max(worst, float((o - ref).abs().max()))
    out.append(f"| hook, never skipping vs unhooked pipeline (3 schedulers x CFG on/off x 1, 2 images per prompt x {len(SEEDS)} seeds) | max abs {worst:.1e} |")

    for name, spacings in (("ddim", ("leading", "trailing")), ("euler", ("leading", "trailing", "linspace")),
                           ("dpmpp_2m", ("leading", "trailing", "linspace"))):
        for sp in spacings:
            figs = []
            for g in (1.0, 7.5):
                for seed in SEEDS:
                    T.use(pipe, name, timestep_spacing=sp, steps_offset=1 if sp == "leading" else 0)
                    lat = T.noise(2, seed)
                    ref = T.run(pipe, T.PROMPTS[:2], lat, g)
                    ours, _ = T.library_run(pipe, name, T.PROMPTS[:2], lat, g)
                    figs.append(T.rel(ours, ref))
            out.append(f"| denoiser() + sample_{name}, skip=None vs pipeline, {sp} spacing (CFG on/off) | {max(figs):.1e} |")

    T.use(pipe, "ddim", timestep_spacing="linspace", steps_offset=0, set_alpha_to_one=True)
    lat = T.noise(2, 1)
    ref = T.run(pipe, T.PROMPTS[:2], lat, 7.5)
    ours, _ = T.library_run(pipe, "ddim", T.PROMPTS[:2], lat, 7.5)
    out.append(f"| (not reproducible) DDIM linspace, set_alpha_to_one=True: diffusers steps t -> t - T//N off the grid | {T.rel(ours, ref):.1e} |")

    for name in T.SCHEDULERS:
        for reuse, label in (("copy", "copy"), (Extrapolate(1), "Extrapolate(1)")):
            figs, forwards = [], set()
            for seed in SEEDS:
                T.use(pipe, name)
                lat = T.noise(2, seed)
                with asd.apply(pipe, skip=FixedMask(MASK, reuse=reuse)), T.Counter(pipe.unet.conv_in) as c:
                    o = T.run(pipe, T.PROMPTS[:2], lat, 7.5)
                forwards.add(len(c.rows))
                ours, _ = T.library_run(pipe, name, T.PROMPTS[:2], lat, 7.5, skip=FixedMask(MASK, reuse=reuse))
                figs.append(T.rel(o, ours))
            out.append(f"| hook FixedMask (K = {sum(MASK)} of {N}, reuse {label}) vs denoiser() + sample_{name}, same mask; UNet forwards {sorted(forwards)} | {max(figs):.1e} |")

    masks = np.array([[1, 1, 1, 1, 0, 1, 0, 1], [1, 1, 1, 1, 1, 0, 0, 1], [1, 1, 1, 1, 0, 0, 1, 0]], bool)
    for name in T.SCHEDULERS:
        figs = []
        for seed in SEEDS:
            T.use(pipe, name)
            lat = T.noise(3, seed)
            with asd.apply(pipe, skip=FixedMask(masks)), T.Counter(pipe.unet.conv_in) as c:
                o = T.run(pipe, T.PROMPTS, lat, 7.5)
            rows = c.rows
            for b in range(3):
                with asd.apply(pipe, skip=FixedMask(masks[b])):
                    alone = T.run(pipe, T.PROMPTS[b : b + 1], lat[b : b + 1], 7.5)
                figs.append(T.rel(o[b : b + 1], alone))
        out.append(f"| per prompt, {name}: 3 prompts on 3 masks vs each prompt's batch-1 run; UNet rows per forward {rows} | {max(figs):.1e} |")

    for pred, name in (("v_prediction", "ddim"), ("v_prediction", "euler"), ("v_prediction", "dpmpp_2m"), ("sample", "dpmpp_2m")):
        T.use(pipe, name, prediction_type=pred)
        lat = T.noise(2, 1)
        ref0 = T.run(pipe, T.PROMPTS[:2], lat, 7.5)
        ours0, _ = T.library_run(pipe, name, T.PROMPTS[:2], lat, 7.5)
        with asd.apply(pipe, skip=FixedMask(MASK)):
            o = T.run(pipe, T.PROMPTS[:2], lat, 7.5)
        ours, _ = T.library_run(pipe, name, T.PROMPTS[:2], lat, 7.5, skip=FixedMask(MASK))
        copy = T.CopyOutput(pipe.unet, MASK)
        copied = T.run(pipe, T.PROMPTS[:2], lat, 7.5)
        copy.handle.remove()
        out.append(
            f"| {pred}, {name}: hook vs library (eps reuse) {T.rel(o, ours):.1e}; without skipping the library is "
            f"{T.rel(ours0, ref0):.1e} off the pipeline; copying the raw output instead: {T.rel(o, copied):.1e} | |"
        )

    from k_diffusion import sampling as K

    from adaptive_sampling.integrations.k_diffusion import adaptive
    from diffusers import HeunDiscreteScheduler, KDPM2DiscreteScheduler

    for cls, fn in ((HeunDiscreteScheduler, K.sample_heun), (KDPM2DiscreteScheduler, K.sample_dpm_2)):
        pipe.scheduler = cls(**T.SD_SCHEDULER)
        steps, mask = 6, [1, 1, 1, 1, 0, 1]
        lat = T.noise(2, 1)
        with asd.apply(pipe, skip=FixedMask(mask)), T.Counter(pipe.unet.conv_in) as c:
            o = T.run(pipe, T.PROMPTS[:2], lat, 7.5, steps=steps)
        cond, uncond = pipe.encode_prompt(T.PROMPTS[:2], "cpu", 1, True)
        pipe.scheduler.set_timesteps(steps)
        x = lat * asd.start_scale(pipe.scheduler)
        x = adaptive(fn, skip=FixedMask(mask))(
            asd.denoiser(pipe, guidance_scale=7.5), x, asd.scheduler_sigmas(pipe.scheduler),
            extra_args={"prompt_embeds": cond, "negative_prompt_embeds": uncond}, disable=True,
        )
        out.append(f"| {cls.__name__} hook (mask {mask}) vs adaptive(k_diffusion.{fn.__name__}); UNet forwards {len(c.rows)} = 5 first + 5 corrector calls | {T.rel(o, x * asd.end_scale(pipe.scheduler)):.1e} |")

    import datetime
    import platform

    import diffusers

    print(f"Measured {datetime.date.today()} with bench/diffusers_equivalence.py: diffusers {diffusers.__version__}, "
          f"torch {torch.__version__}, Python {platform.python_version()}, CPU, float32, seeds {SEEDS}.\n")
    print("| case | figure |\n|---|---|")
    print("\n".join(out))


if __name__ == "__main__":
    main()
