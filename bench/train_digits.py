"""Train the learned digits denoiser shipped with ``adaptive_sampling.evaluation.workloads.learned``.

    python bench/train_digits.py                 # the shipped checkpoint (about 10 min on 2 idle CPU cores)
    python bench/train_digits.py --steps 2000 --out /tmp/d.pt --results /tmp/res   # a quick try

EDM training (Karras et al. 2022) on all 1797 images of sklearn's digits: log-normal sigma
(P_mean = -1.2, P_std = 1.2), loss weight (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2,
labels dropped to the null class with probability ``--label-dropout`` (classifier-free guidance),
AdamW with linear warm-up and cosine decay, EMA of the weights (the EMA weights are shipped).
Seeded and deterministic on a given machine and thread count (2 threads).

Writes the checkpoint (a float32 state_dict, float16 if that would exceed 5 MB), and
``digits_training.md`` + ``digits_training_loss.png`` in ``--results``: the loss curve, and a
check of the sampler's sensitivity (50 vs 25 Karras steps from the same noise, PSNR).
``--holdout`` keeps a fraction of the images out of training and reports their loss, to measure
the generalisation gap (the shipped model uses none).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import math
import os
import platform
import sys
import time
from pathlib import Path

# libgomp's default busy-wait makes 2-thread training up to 20x slower when another process holds
# a core (measured here: 580 ms vs 26 ms per step); a short spin keeps the speed when alone.
# It must be set before torch loads libgomp.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adaptive_sampling.evaluation.workloads.digits import load_digits_data  # noqa: E402
from adaptive_sampling.evaluation.workloads.learned import (  # noqa: E402
    CHECKPOINT,
    NULL_CLASS,
    NUM_AUGMENTS,
    RECOMMENDED_SIGMA_MAX,
    RECOMMENDED_SIGMA_MIN,
    SIGMA_DATA,
    DigitsDenoiser,
    cfg_denoiser,
)

P_MEAN, P_STD = -1.2, 1.2
MAX_BYTES = 5_000_000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=16_000, help="optimiser steps")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup", type=int, default=1000, help="linear warm-up steps, then cosine decay")
    p.add_argument("--ema", type=float, default=0.9995, help="EMA decay (warmed up as (1+t)/(10+t))")
    p.add_argument("--label-dropout", type=float, default=0.12)
    p.add_argument("--dropout", type=float, default=0.3, help="dropout inside the MLP blocks")
    p.add_argument(
        "--augment", type=float, default=0.5, help="probability of a 1-pixel horizontal shift (conditioned on)"
    )
    p.add_argument("--holdout", type=float, default=0.0, help="fraction of images kept out of training")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log-every", type=int, default=0, help="loss table interval (default: steps / 30)")
    p.add_argument("--out", type=Path, default=CHECKPOINT)
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--grid", type=Path, default=None, help="also save a sample grid PNG here")
    return p.parse_args(argv)


def edm_loss(
    model: torch.nn.Module,
    x0: torch.Tensor,
    y: torch.Tensor,
    noise: torch.Tensor,
    sigma: torch.Tensor,
    augment: torch.Tensor | None = None,
) -> torch.Tensor:
    """EDM's weighted denoising loss, per sample ([B])."""
    weight = (sigma**2 + SIGMA_DATA**2) / (sigma * SIGMA_DATA) ** 2
    denoised = model(x0 + noise * sigma[:, None, None, None], sigma, y, augment)
    return weight * (denoised - x0).pow(2).flatten(1).mean(1)


def shifted_copies(images: torch.Tensor) -> torch.Tensor:
    """[NUM_AUGMENTS, N, 1, 8, 8]: the images as they are, shifted one pixel left, one pixel right.

    Only horizontal shifts: the digits' outer columns are almost always empty (background -1 fills
    the new column), while the top and bottom rows often hold strokes. The model is told which
    shift it sees (EDM's non-leaking augmentation) and samples with label 0 (no shift).
    """
    left = torch.cat([images[..., 1:], torch.full_like(images[..., :1], -1.0)], dim=-1)
    right = torch.cat([torch.full_like(images[..., :1], -1.0), images[..., :-1]], dim=-1)
    return torch.stack([images, left, right])


class FixedEval:
    """A fixed set of (image, label, noise, sigma) draws: the same loss estimate at every checkpoint."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, repeats: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x0 = images.repeat(repeats, 1, 1, 1)
        self.y = labels.repeat(repeats)
        self.noise = torch.randn(self.x0.shape, generator=g)
        self.sigma = (torch.randn(len(self.x0), generator=g) * P_STD + P_MEAN).exp()

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module) -> float:
        was_training = model.training
        model.eval()
        loss = edm_loss(model, self.x0, self.y, self.noise, self.sigma).mean().item()
        model.train(was_training)
        return loss


def lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t))


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}"


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Per-sample PSNR in dB for images in [-1, 1] (data range 2)."""
    mse = (a - b).pow(2).flatten(1).mean(1).clamp_min(1e-20)
    return 10 * torch.log10(data_range**2 / mse)


@torch.no_grad()
def sampling_check(model: torch.nn.Module, images: torch.Tensor, cond_scale: float = 2.0, per_class: int = 8):
    """Sample 50 and 25 Karras steps from the same noise (DPM-Solver++ 2M and Euler); PSNR between them.

    Also the nearest-training-image distance of the 50-step samples against the typical
    nearest-neighbour distance within the training set (memorisation indicator).
    """
    from adaptive_sampling import get_sigmas_karras, sample_dpmpp_2m, sample_euler

    guided = cfg_denoiser(model, cond_scale)
    y = torch.arange(10).repeat_interleave(per_class)
    g = torch.Generator().manual_seed(1234)
    noise = torch.randn(len(y), 1, 8, 8, generator=g) * RECOMMENDED_SIGMA_MAX
    out = {}
    for name, sampler in (("dpmpp_2m", sample_dpmpp_2m), ("euler", sample_euler)):
        xs = {}
        for n in (50, 25):
            sigmas = get_sigmas_karras(n, RECOMMENDED_SIGMA_MIN, RECOMMENDED_SIGMA_MAX, dtype=torch.float32)
            x, _ = sampler(guided, noise.clone(), sigmas, extra_args={"y": y}, disable=True)
            xs[n] = x.clamp(-1, 1)
        p = psnr(xs[50], xs[25])
        out[name] = (p.mean().item(), p.median().item(), p.min().item(), p.max().item())
        if name == "dpmpp_2m":
            samples = xs[50]
    flat_s, flat_d = samples.flatten(1), images.flatten(1)
    nn_sample = torch.cdist(flat_s, flat_d).min(1).values
    dd = torch.cdist(flat_d, flat_d)
    dd.fill_diagonal_(float("inf"))
    nn_data = dd.min(1).values
    return out, samples, y, nn_sample.median().item(), nn_data.median().item()


def save_grid(samples: torch.Tensor, per_class: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    padded = torch.nn.functional.pad(samples.reshape(10, per_class, 8, 8), (1, 1, 1, 1), value=-1.0)
    grid = padded.permute(0, 2, 1, 3).reshape(100, per_class * 10)
    fig, ax = plt.subplots(figsize=(per_class * 0.8, 8))
    ax.imshow(grid.numpy(), cmap="gray_r", vmin=-1, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    started = time.time()

    images, labels = load_digits_data(torch.float32)
    g = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(images), generator=g)
    n_hold = int(round(args.holdout * len(images)))
    hold, train = order[:n_hold], order[n_hold:]
    x_train, y_train = images[train], labels[train]
    x_shifted = shifted_copies(x_train)
    eval_train = FixedEval(x_train, y_train, repeats=2, seed=args.seed + 1)
    eval_hold = FixedEval(images[hold], labels[hold], repeats=8, seed=args.seed + 2) if n_hold else None

    model = DigitsDenoiser(dropout=args.dropout)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, args.warmup, args.steps))
    log_every = args.log_every or max(1, args.steps // 30)
    print(f"{n_params:,} parameters; {len(train)} training images, {n_hold} held out; {args.steps} steps")

    rows = []  # (step, mean train loss over the window, EMA loss on the fixed draws, EMA held-out loss, lr)
    window, window_n = 0.0, 0
    for step in range(args.steps):
        idx = torch.randint(len(x_train), (args.batch,), generator=g)
        shift = torch.randint(1, NUM_AUGMENTS, (args.batch,), generator=g)
        shift[torch.rand(args.batch, generator=g) >= args.augment] = 0
        x0, y = x_shifted[shift, idx], y_train[idx].clone()
        y[torch.rand(args.batch, generator=g) < args.label_dropout] = NULL_CLASS
        noise = torch.randn(x0.shape, generator=g)
        sigma = (torch.randn(args.batch, generator=g) * P_STD + P_MEAN).exp()
        loss = edm_loss(model, x0, y, noise, sigma, shift).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 1 - decay)
        window += loss.item()
        window_n += 1
        if (step + 1) % log_every == 0 or step + 1 == args.steps:
            ema_loss = eval_train(ema)
            hold_loss = eval_hold(ema) if eval_hold else float("nan")
            rows.append((step + 1, window / window_n, ema_loss, hold_loss, sched.get_last_lr()[0]))
            window, window_n = 0.0, 0
            extra = f"  held-out {hold_loss:.4f}" if eval_hold else ""
            print(
                f"step {step + 1:6d}/{args.steps}  loss {rows[-1][1]:.4f}  EMA {ema_loss:.4f}{extra}"
                f"  lr {rows[-1][4]:.2e}  {time.time() - started:6.0f}s",
                flush=True,
            )
    train_seconds = time.time() - started

    state = {k: v.detach().clone() for k, v in ema.state_dict().items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, args.out)
    stored = "float32"
    if args.out.stat().st_size > MAX_BYTES:
        torch.save({k: v.half() for k, v in state.items()}, args.out)
        stored = "float16"
    size = args.out.stat().st_size
    print(f"saved {args.out} ({size / 1e6:.2f} MB, {stored})")

    # Check the weights as shipped (reloaded from the file).
    shipped = DigitsDenoiser()
    shipped.load_state_dict({k: v.float() for k, v in torch.load(args.out, weights_only=True).items()})
    shipped.eval().requires_grad_(False)
    check, samples, y, nn_sample, nn_data = sampling_check(shipped, images)
    if args.grid:
        save_grid(samples, 8, args.grid)
    total_seconds = time.time() - started
    write_results(args, rows, n_params, size, stored, train_seconds, total_seconds, check, nn_sample, nn_data)


def write_results(args, rows, n_params, size, stored, train_seconds, total_seconds, check, nn_sample, nn_data) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args.results.mkdir(parents=True, exist_ok=True)
    steps = [r[0] for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(steps, [r[1] for r in rows], label=f"training loss (mean over {steps[0]} steps)")
    ax.plot(steps, [r[2] for r in rows], label="EMA model, fixed noise draws")
    if args.holdout:
        ax.plot(steps, [r[3] for r in rows], label="EMA model, held-out images")
    ax.set_xlabel("step")
    ax.set_ylabel("EDM weighted loss")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title("Digits denoiser training (bench/train_digits.py)")
    fig.tight_layout()
    fig.savefig(args.results / "digits_training_loss.png", dpi=110)
    plt.close(fig)

    command = "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])
    hold_col = args.holdout > 0
    lines = [
        "# Learned digits denoiser: training record",
        "",
        "Written by `bench/train_digits.py`; every number below was measured by that run.",
        "",
        f"- machine: {machine()}",
        f"- torch {torch.__version__}, {torch.get_num_threads()} threads"
        f" (GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')}), Python {platform.python_version()}",
        f"- date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        f"- command: `{command}`",
        f"- settings: steps {args.steps}, batch {args.batch}, AdamW lr {args.lr} (warm-up {args.warmup}, cosine to 1%),"
        f" weight decay {args.weight_decay}, EMA {args.ema}, label dropout {args.label_dropout},"
        f" dropout {args.dropout}, horizontal-shift augmentation p={args.augment}, seed {args.seed},"
        f" held out {args.holdout:.0%}",
        f"- parameters: {n_params:,}",
        f"- wall time: training {train_seconds / 60:.1f} min, with the checks below {total_seconds / 60:.1f} min",
        f"- final training loss (mean of the last {steps[0]} steps): {rows[-1][1]:.4f}",
        f"- final EMA loss on fixed noise draws (training images): {rows[-1][2]:.4f}",
    ]
    if hold_col:
        lines.append(f"- final EMA loss on held-out images: {rows[-1][3]:.4f}")
    lines += [
        f"- checkpoint: `{os.path.relpath(args.out, ROOT) if args.out.is_relative_to(ROOT) else args.out}`,"
        f" {size / 1e6:.2f} MB ({stored} state_dict of the EMA weights)",
        "",
        "## Sampling check (shipped weights)",
        "",
        "80 samples (8 per class), guidance cond_scale 2,"
        f" Karras grid sigma {RECOMMENDED_SIGMA_MIN}..{RECOMMENDED_SIGMA_MAX}, rho 7;"
        " PSNR between the 50-step and the 25-step output from the same noise"
        " (outputs clamped to [-1, 1], data range 2):",
        "",
        "| sampler | mean PSNR (dB) | median | min | max |",
        "|---|---|---|---|---|",
    ]
    for name, (mean, med, lo, hi) in check.items():
        lines.append(f"| {name} | {mean:.2f} | {med:.2f} | {lo:.2f} | {hi:.2f} |")
    lines += [
        "",
        f"Median L2 distance from a 50-step DPM-Solver++ sample to its nearest training image: {nn_sample:.3f};"
        f" median nearest-neighbour distance between training images: {nn_data:.3f}"
        " (a memorising model would give about 0 for the samples).",
        "",
        "## Loss every {} steps".format(steps[0]),
        "",
        "Training loss: mean over the preceding steps, with dropout active and half the inputs shifted"
        " (hence above the EMA column). EMA: the EMA weights, in eval mode, on fixed noise draws"
        " (2 per training image, same draws at every row)"
        + ("; held-out: 8 draws per held-out image." if hold_col else "."),
        "",
        "| step | training loss | EMA loss" + (" | held-out loss" if hold_col else "") + " | lr |",
        "|---|---|---" + ("|---" if hold_col else "") + "|---|",
    ]
    for step, tr, ev, ho, lr in rows:
        lines.append(f"| {step} | {tr:.4f} | {ev:.4f}" + (f" | {ho:.4f}" if hold_col else "") + f" | {lr:.2e} |")
    (args.results / "digits_training.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.results / 'digits_training.md'} and digits_training_loss.png")
    for name, (mean, med, lo, hi) in check.items():
        print(f"50 vs 25 steps ({name}): PSNR mean {mean:.2f} dB, median {med:.2f}, min {lo:.2f}, max {hi:.2f}")
    print(f"nearest training image: samples {nn_sample:.3f}, training set {nn_data:.3f}")


if __name__ == "__main__":
    main()
