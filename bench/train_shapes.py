"""Train the shapes workload shipped with ``adaptive_sampling.evaluation.workloads.shapes``: the UNet and its classifier.

    python bench/train_shapes.py                       # the shipped checkpoints (see shapes_training.md)
    python bench/train_shapes.py --steps 300 --classifier-steps 100 --out /tmp/u.safetensors \\
        --classifier-out /tmp/c.safetensors --results /tmp/res           # a quick try

1. The classifier (``ShapeClassifier``): cross-entropy on fresh procedural images every step (with
   a little random Gaussian pixel noise, so that slightly noisy samples are still read), AdamW,
   one-cycle learning rate. Its accuracy on 2000 fresh images is recorded.
2. The UNet (diffusers ``UNet2DModel`` of ``UNET_CONFIG``, on the 4x4 space-to-depth latent):
   Stable Diffusion's DDPM objective with diffusers' ``DDPMScheduler`` (scaled_linear betas
   0.00085..0.012, 1000 steps): t uniform in 0..999, x_t = scheduler.add_noise(x0, eps, t), loss
   MSE(eps_hat, eps); labels dropped to the null class with probability ``--label-dropout``
   (classifier-free guidance); AdamW, linear warm-up then cosine decay; bfloat16 autocast for the
   forward pass only with ``--bf16``; EMA of the weights, which are shipped
   (float16 safetensors).

Every training batch is fresh procedural data (``make_data(batch, seed)`` with seeds from
``--seed`` * 10**7 + 10**6 upwards), so there is no overfitting to a finite set; the evaluation
seeds of the checks below and of the tests are small integers, never used for training.
Seeded and deterministic on a given machine and thread count (default 1 thread).

Checks written to ``shapes_training.md`` (with ``shapes_training_loss.png``), all on the weights as
shipped (reloaded from the file): eps-MSE on fresh data at several timesteps against two trivial
predictors, and the classifier's accuracy on 50-step DDIM samples (``sample_ddim`` on
``sigmas(50)``, leading spacing) at several guidance scales.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

# libgomp's default busy-wait slows training when another process holds a core (see train_digits.py).
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adaptive_sampling.evaluation.workloads import shapes  # noqa: E402
from train_digits import lr_factor, machine  # noqa: E402  (bench/ is on the path when run as a script)

EVAL_TIMESTEPS = (10, 100, 250, 500, 750, 900, 990)
DATA_SEED_BASE = 10**7  # training batch b of seed s uses make_data(batch, s * 10**7 + 10**6 + b)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=2200, help="UNet optimiser steps")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps, then cosine decay to 1%%")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay (warmed up as (1+t)/(10+t))")
    p.add_argument("--label-dropout", type=float, default=0.1)
    p.add_argument(
        "--weighting", choices=("v", "eps"), default="eps",
        help="v: eps-MSE weighted by (1 + sigma_t^2) (the v-prediction loss of an eps model), normalised"
        " to mean 1 over t; eps: plain eps-MSE (DDPM's simple loss)",
    )  # fmt: skip
    p.add_argument("--channels", type=str, default=None, help="block_out_channels, e.g. 64,96,128 (default: UNET_CONFIG)")
    p.add_argument("--patch", type=int, default=shapes.PATCH, help="space-to-depth factor of the latent")
    p.add_argument("--no-identity-init", action="store_true", help="diffusers' random initialisation only")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (fast only on CPUs with native bf16; 30x slower on AVX2)")
    p.add_argument("--classifier-steps", type=int, default=600)
    p.add_argument("--classifier-batch", type=int, default=128)
    p.add_argument("--skip-classifier", action="store_true",
                   help="keep the classifier file as it is (its accuracy is still measured)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log-every", type=int, default=0, help="loss table interval (default: steps / 30)")
    p.add_argument("--check-per-class", type=int, default=10, help="DDIM samples per class in the sampling check")
    p.add_argument("--out", type=Path, default=shapes.CHECKPOINT)
    p.add_argument("--classifier-out", type=Path, default=shapes.CLASSIFIER_CHECKPOINT)
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    return p.parse_args(argv)


def unet_config(args: argparse.Namespace) -> dict:
    config = dict(shapes.UNET_CONFIG)
    size, chans = shapes.IMAGE_SHAPE[-1], shapes.IMAGE_SHAPE[0]
    config.update(sample_size=size // args.patch, in_channels=chans * args.patch**2, out_channels=chans * args.patch**2)
    if args.channels:
        levels = tuple(int(c) for c in args.channels.split(","))
        config.update(block_out_channels=levels, down_block_types=("DownBlock2D",) * len(levels),
                      up_block_types=("UpBlock2D",) * len(levels))  # fmt: skip
    return config


IDENTITY_BIAS = 6.0


@torch.no_grad()
def identity_init(unet, bias: float = IDENTITY_BIAS) -> None:
    """Start the UNet as (nearly) the identity map, the answer for eps at high noise (x_t is almost all eps).

    An eps-prediction network must pass its input through to about 1% accuracy at large sigma
    (there x0 = (x_t - sqrt(1 - alphabar) eps) / sqrt(alphabar) multiplies eps errors by sigma, up to
    14.6), and a randomly initialised UNet2DModel learns that identity slowly (probe runs here,
    300 steps of batch 128 at t >= 900: eps-MSE 0.020 from random weights). Only the weights are
    set; the architecture stays diffusers' UNet2DModel. With C_in input channels and norm groups of
    G channels, each group of the first level holds (G - 2) / 2 input channels as (+x_k, -x_k) pairs
    and one constant pair (+bias, -bias):

    * conv_in: exactly those channels (centre tap, no random channels);
    * the last resnet of the last up block: conv2 zero (ADM's zero-init), its 1x1 shortcut copies the
      conv_in skip it receives;
    * conv_norm_out then sees groups of mean exactly 0 whose variance is dominated by the constant
      pair (so the normalisation is nearly a fixed scale, not x's own rms), and conv_out takes
      silu(a) - silu(-a) = a, rescaled to the identity at unit-variance input (high noise).
    """
    cin, c0 = unet.config.in_channels, unet.config.block_out_channels[0]
    group = c0 // unet.config.norm_num_groups
    per_group = (group - 2) // 2
    if unet.config.out_channels != cin or group % 2 or per_group < 1 or per_group * unet.config.norm_num_groups < cin:
        raise ValueError("identity_init needs out = in channels and first-level norm groups holding all input pairs")
    w, b = unet.conv_in.weight, unet.conv_in.bias
    w.zero_()
    b.zero_()
    scale = math.sqrt((per_group + bias**2) / (per_group + 1))  # the group rms at unit-variance input
    ow = unet.conv_out.weight
    ow.zero_()
    unet.conv_out.bias.zero_()
    for g in range(unet.config.norm_num_groups):
        base = g * group
        for j in range(per_group):
            k = g * per_group + j
            if k < cin:
                w[base + 2 * j, k, 1, 1], w[base + 2 * j + 1, k, 1, 1] = 1.0, -1.0
                ow[k, base + 2 * j, 1, 1], ow[k, base + 2 * j + 1, 1, 1] = scale, -scale
        b[base + group - 2], b[base + group - 1] = bias, -bias
    last = unet.up_blocks[-1].resnets[-1]
    last.conv2.weight.zero_()
    last.conv2.bias.zero_()
    sw, sb = last.conv_shortcut.weight, last.conv_shortcut.bias
    skip = sw.shape[1] - c0  # the conv_in skip is the second half of the concatenated input
    sw.zero_()
    sb.zero_()
    for c in range(c0):
        sw[c, skip + c, 0, 0] = 1.0


def save(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path), metadata=metadata)


# --- 1. the classifier ------------------------------------------------------------------------------


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """What a sample may differ by without changing its shape: a Gaussian blur of up to 1.2 pixels
    (per image) and pixel noise of up to 0.1, so the classifier judges shapes, not sharpness."""
    n = len(x)
    sigma = 1.2 * torch.rand(n, generator=g)
    r = torch.arange(-3, 4, dtype=x.dtype)
    k = torch.exp(-(r[None] ** 2) / (2 * sigma[:, None].clamp_min(1e-3) ** 2))
    k = k / k.sum(1, keepdim=True)  # [n, 7] separable kernel per image
    flat = x.reshape(1, n * 3, 32, 32)
    kk = k.repeat_interleave(3, 0)
    flat = torch.nn.functional.conv2d(torch.nn.functional.pad(flat, (3, 3, 0, 0), mode="replicate"), kk[:, None, None, :], groups=n * 3)
    flat = torch.nn.functional.conv2d(torch.nn.functional.pad(flat, (0, 0, 3, 3), mode="replicate"), kk[:, None, :, None], groups=n * 3)
    x = flat.reshape(x.shape)
    return x + 0.1 * torch.randn(x.shape, generator=g) * torch.rand(n, 1, 1, 1, generator=g)


def train_classifier(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    model = shapes.ShapeClassifier()
    opt = torch.optim.AdamW(model.parameters(), 3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=args.classifier_steps, pct_start=0.1)
    g = torch.Generator().manual_seed(args.seed + 1)
    base = args.seed * DATA_SEED_BASE + 5 * 10**6
    started = time.time()
    for step in range(args.classifier_steps):
        x, y = shapes.make_data(args.classifier_batch, base + step)
        x = augment(x, g)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % max(1, args.classifier_steps // 10) == 0:
            print(f"classifier step {step + 1}/{args.classifier_steps}  loss {loss.item():.4f}"
                  f"  {time.time() - started:5.0f}s", flush=True)  # fmt: skip
    seconds = time.time() - started
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    save(state, args.classifier_out, {"steps": str(args.classifier_steps), "seed": str(args.seed)})
    acc = classifier_accuracy(load_classifier_from(args.classifier_out))
    print(f"classifier: {seconds / 60:.1f} min")
    return {"seconds": seconds, "accuracy": acc, "params": sum(p.numel() for p in model.parameters())}


@torch.no_grad()
def classifier_accuracy(classifier) -> float:
    x, y = shapes.make_data(2000, 7)
    acc = (classifier(x).argmax(1) == y).float().mean().item()
    print(f"classifier: accuracy {acc:.4f} on 2000 fresh images (make_data(2000, 7))")
    return acc


def load_classifier_from(path: Path) -> shapes.ShapeClassifier:
    state, _ = shapes._load_safetensors(path)
    model = shapes.ShapeClassifier()
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return model.eval().requires_grad_(False)


# --- 2. the UNet ---------------------------------------------------------------------------------------


class FixedEval:
    """Fixed (image, label, noise, t) draws: the same eps-MSE estimate at every checkpoint."""

    def __init__(self, scheduler, patch: int, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        x0, self.y = shapes.make_data(n, seed)
        self.noise = torch.randn(x0.shape, generator=g)
        self.t = torch.randint(0, 1000, (n,), generator=g)
        self.xt = shapes.to_latent(scheduler.add_noise(x0, self.noise, self.t), patch)
        self.noise = shapes.to_latent(self.noise, patch)

    @torch.no_grad()
    def __call__(self, unet) -> float:
        was = unet.training
        unet.eval()
        losses = [
            (unet(self.xt[i : i + 256], self.t[i : i + 256], class_labels=self.y[i : i + 256]).sample
             - self.noise[i : i + 256]).pow(2).sum().item()
            for i in range(0, len(self.t), 256)
        ]  # fmt: skip
        unet.train(was)
        return sum(losses) / self.noise.numel()


def train_unet(args: argparse.Namespace, config: dict):
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(args.seed)
    scheduler = DDPMScheduler(**shapes.SCHEDULER_CONFIG)
    unet = UNet2DModel(**config)
    if not args.no_identity_init:
        identity_init(unet)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    n_params = sum(p.numel() for p in unet.parameters())
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, args.warmup, args.steps))
    log_every = args.log_every or max(1, args.steps // 30)
    fixed = FixedEval(scheduler, args.patch, 1024, seed=3)
    g = torch.Generator().manual_seed(args.seed + 2)
    base = args.seed * DATA_SEED_BASE + 10**6
    ac = scheduler.alphas_cumprod.double()
    weight = (1 / ac if args.weighting == "v" else torch.ones_like(ac)).float()  # 1 + sigma^2 = 1 / alphabar
    weight = weight / weight.mean()
    print(f"UNet: {n_params:,} parameters, latent {config['in_channels']}x{config['sample_size']}^2,"
          f" {args.steps} steps of batch {args.batch}", flush=True)  # fmt: skip
    rows = []  # (step, mean training loss over the window, EMA loss on fixed draws, lr, seconds)
    window, window_n = 0.0, 0
    started = time.time()
    for step in range(args.steps):
        x0, y = shapes.make_data(args.batch, base + step)
        y[torch.rand(args.batch, generator=g) < args.label_dropout] = shapes.NULL_CLASS
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (args.batch,), generator=g)
        xt = shapes.to_latent(scheduler.add_noise(x0, noise, t), args.patch)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            pred = unet(xt, t, class_labels=y).sample
        loss = (weight[t] * (pred.float() - shapes.to_latent(noise, args.patch)).pow(2).mean((1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), unet.parameters()):
                e.lerp_(p, 1 - decay)
        window += loss.item()
        window_n += 1
        if (step + 1) % log_every == 0 or step + 1 == args.steps:
            ema_loss = fixed(ema)
            rows.append((step + 1, window / window_n, ema_loss, sched.get_last_lr()[0], time.time() - started))
            window, window_n = 0.0, 0
            print(f"step {step + 1:6d}/{args.steps}  loss {rows[-1][1]:.4f}  EMA {ema_loss:.4f}"
                  f"  lr {rows[-1][3]:.2e}  {rows[-1][4]:6.0f}s", flush=True)  # fmt: skip
    seconds = time.time() - started
    state = {k: v.half() for k, v in ema.state_dict().items()}
    meta = {"unet_config": json.dumps(config), "steps": str(args.steps), "batch": str(args.batch), "seed": str(args.seed)}
    save(state, args.out, meta)
    print(f"saved {args.out} ({args.out.stat().st_size / 1e6:.2f} MB, float16)")
    return rows, n_params, seconds


# --- 3. checks on the shipped weights --------------------------------------------------------------


def load_unet_from(path: Path):
    from diffusers import UNet2DModel

    state, meta = shapes._load_safetensors(path)
    unet = UNet2DModel(**json.loads(meta["unet_config"]))
    unet.load_state_dict({k: v.float() for k, v in state.items()})
    return unet.eval().requires_grad_(False)


@torch.no_grad()
def eps_mse_check(unet, patch: int, n: int = 512, seed: int = 11) -> list[tuple[int, float, float, float]]:
    """(t, model eps-MSE, eps=0 MSE, per-pixel-Gaussian MSE) on fresh data at EVAL_TIMESTEPS.

    The Gaussian predictor is the exact posterior mean E[eps | x_t] if every pixel were an
    independent Gaussian with the data's per-pixel mean and variance (estimated on 20000 images)."""
    ref, _ = shapes.make_data(20000, 12)
    mu, var = ref.mean(0), ref.var(0)
    ac = shapes.ddpm_alphas_cumprod().double()
    x0, y = shapes.make_data(n, seed)
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in EVAL_TIMESTEPS:
        noise = torch.randn(x0.shape, generator=g)
        a = ac[t].float()
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        pred = torch.cat([
            shapes.from_latent(unet(shapes.to_latent(xt[i : i + 256], patch), torch.full((len(xt[i : i + 256]),), t),
                                    class_labels=y[i : i + 256]).sample, patch)
            for i in range(0, n, 256)
        ])  # fmt: skip
        gauss = (1 - a).sqrt() / (a * var + 1 - a) * (xt - a.sqrt() * mu)
        out.append((t, (pred - noise).pow(2).mean().item(), noise.pow(2).mean().item(), (gauss - noise).pow(2).mean().item()))
    return out


@torch.no_grad()
def sampling_check(unet, classifier, per_class: int, scales=(1.0, 2.0, 3.0, 4.0, 6.0)):
    """Classifier accuracy of 50-step DDIM samples (leading grid) per guidance scale; the samples at each scale."""
    from adaptive_sampling import sample_ddim

    y = torch.arange(10).repeat_interleave(per_class)
    noise = torch.randn(len(y), *shapes.IMAGE_SHAPE, generator=torch.Generator().manual_seed(1234))
    grid = shapes.sigmas(50)
    out = {}
    for scale in scales:
        model = shapes.denoiser(scale, unet)
        x, _ = sample_ddim(model, noise * grid[0], grid, extra_args={"y": y}, disable=True)
        x = x.clamp(-1, 1)
        pred = classifier(x).argmax(1)
        per = [(pred[y == c] == c).float().mean().item() for c in range(10)]
        out[scale] = ((pred == y).float().mean().item(), per, x)
    return out


def save_grid(samples: torch.Tensor, per_class: int, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = ((samples.clamp(-1, 1) + 1) / 2).reshape(10, per_class, 3, 32, 32)
    x = torch.nn.functional.pad(x, (1, 1, 1, 1), value=1.0)
    grid = x.permute(0, 3, 1, 4, 2).reshape(10 * 34, per_class * 34, 3)
    fig, ax = plt.subplots(figsize=(per_class * 0.7, 7.4))
    ax.imshow(grid.numpy(), interpolation="nearest")
    ax.set_yticks([17 + 34 * i for i in range(10)], shapes.CLASSES, fontsize=8)
    ax.set_xticks([])
    ax.set_title(title, fontsize=8)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    started = time.time()
    config = unet_config(args)
    if args.skip_classifier:
        cls_info = {"seconds": None, "params": sum(p.numel() for p in shapes.ShapeClassifier().parameters())}
        cls_info["accuracy"] = classifier_accuracy(load_classifier_from(args.classifier_out))
    else:
        cls_info = train_classifier(args)
    rows, n_params, train_seconds = train_unet(args, config)

    unet = load_unet_from(args.out)
    classifier = load_classifier_from(args.classifier_out)
    eps = eps_mse_check(unet, args.patch)
    for t, m, zero, gauss in eps:
        print(f"t={t:4d}: eps-MSE model {m:.4f}, eps=0 {zero:.4f}, Gaussian {gauss:.4f}")
    checks = sampling_check(unet, classifier, args.check_per_class)
    for scale, (acc, per, _) in checks.items():
        print(f"guidance {scale:g}: classifier accuracy of 50-step DDIM samples {acc:.3f}")
    args.results.mkdir(parents=True, exist_ok=True)
    best = max(checks, key=lambda s: checks[s][0])
    save_grid(checks[3.0][2] if 3.0 in checks else checks[best][2], args.check_per_class,
              args.results / "shapes_samples.png", "50-step DDIM (leading grid), guidance 3: one row per class")  # fmt: skip
    write_results(args, config, rows, n_params, train_seconds, time.time() - started, cls_info, eps, checks)


def write_results(args, config, rows, n_params, train_seconds, total_seconds, cls_info, eps, checks) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r[0] for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(steps, [r[1] for r in rows], label=f"training loss (mean over {steps[0]} steps)")
    ax.plot(steps, [r[2] for r in rows], label="EMA model, fixed draws (1024 images, t uniform)")
    ax.set_xlabel("step")
    ax.set_ylabel("eps MSE")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title("Shapes UNet training (bench/train_shapes.py)")
    fig.tight_layout()
    fig.savefig(args.results / "shapes_training_loss.png", dpi=110)
    plt.close(fig)

    command = "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])
    rel = lambda p: os.path.relpath(p, ROOT) if Path(p).resolve().is_relative_to(ROOT) else str(p)  # noqa: E731
    lines = [
        "# Shapes workload: training record",
        "",
        "Written by `bench/train_shapes.py`; every number below was measured by that run.",
        "",
        f"- machine: {machine()}",
        f"- torch {torch.__version__}, {torch.get_num_threads()} thread(s)"
        f" (GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')}), Python {platform.python_version()}",
        f"- date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        f"- command: `{command}`",
        f"- UNet2DModel config: `{json.dumps(config)}`",
        f"- UNet parameters: {n_params:,}; checkpoint `{rel(args.out)}`, {args.out.stat().st_size / 1e6:.2f} MB"
        " (float16 safetensors of the EMA weights)",
        f"- settings: steps {args.steps}, batch {args.batch} (fresh procedural images every step), AdamW lr {args.lr}"
        f" (warm-up {args.warmup}, cosine to 1%), weight decay {args.weight_decay}, EMA {args.ema},"
        f" label dropout {args.label_dropout}, {'bfloat16 autocast' if args.bf16 else 'float32'}, seed {args.seed}",
        f"- wall time: UNet training {train_seconds / 60:.1f} min; whole run (classifier, UNet, checks) {total_seconds / 60:.1f} min",
        f"- final training loss (mean of the last {steps[-1] - (steps[-2] if len(steps) > 1 else 0)} steps): {rows[-1][1]:.4f};"
        f" EMA loss on fixed draws: {rows[-1][2]:.4f}",
    ]
    trained = (
        "kept from an earlier run of this script (`--skip-classifier`)" if cls_info["seconds"] is None
        else f"{args.classifier_steps} steps of batch {args.classifier_batch}, {cls_info['seconds'] / 60:.1f} min"
    )  # fmt: skip
    lines.append(
        f"- classifier (`ShapeClassifier`, {cls_info['params']:,} parameters, {trained}): accuracy"
        f" {cls_info['accuracy']:.4f} on 2000 fresh procedural images (`make_data(2000, 7)`);"
        f" checkpoint `{rel(args.classifier_out)}`"
    )
    lines += [
        "",
        "## eps-MSE of the shipped weights on fresh data",
        "",
        "512 images `make_data(512, 11)`, their own labels, one noise draw per timestep. Trivial predictors:"
        " eps = 0, and the exact posterior mean E[eps | x_t] for data made of independent Gaussian pixels with"
        " the data's per-pixel mean and variance (20000 images).",
        "",
        "| t | sigma | model | eps = 0 | Gaussian pixels | model / Gaussian |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    ts = shapes.train_sigmas()
    for t, m, zero, gauss in eps:
        lines.append(f"| {t} | {ts[t]:.3f} | {m:.4f} | {zero:.4f} | {gauss:.4f} | {m / gauss:.3f} |")
    lines += [
        "",
        "## Sampling check: are the samples their class?",
        "",
        f"{10 * args.check_per_class} samples ({args.check_per_class} per class) from 50-step DDIM"
        " (`sample_ddim` on `sigmas(50)`, leading spacing, initial noise `randn * sigmas[0]`, seed 1234),"
        " clamped to [-1, 1], labelled by the shipped classifier. Samples at guidance 3:"
        " `shapes_samples.png`.",
        "",
        "| guidance | accuracy | " + " | ".join(shapes.CLASSES) + " |",
        "|---:|---:|" + "---:|" * 10,
    ]
    for scale, (acc, per, _) in checks.items():
        lines.append(f"| {scale:g} | {acc:.3f} | " + " | ".join(f"{p:.1f}" for p in per) + " |")
    lines += [
        "",
        f"## Loss every {steps[0]} steps",
        "",
        f"Training loss: mean over the preceding steps ({'bfloat16' if args.bf16 else 'float32'} forward, label dropout). EMA: the EMA weights"
        " in float32, eval mode, on 1024 fixed (image, noise, t) draws.",
        "",
        "| step | training loss | EMA loss | lr | seconds |",
        "|---|---|---|---|---|",
    ]
    for step, tr, ev, lr, sec in rows:
        lines.append(f"| {step} | {tr:.4f} | {ev:.4f} | {lr:.2e} | {sec:.0f} |")
    (args.results / "shapes_training.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.results / 'shapes_training.md'}, shapes_training_loss.png, shapes_samples.png")


if __name__ == "__main__":
    main()
