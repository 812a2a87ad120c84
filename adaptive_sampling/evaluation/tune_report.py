"""What ``tune`` writes: the schedule, ``report.md`` and the pictures a person would rather look at.

* ``schedule.json``: the calibrated schedule (``Calibrated.load``; ``apply(pipe, skip=...)``);
* ``report.md``: what ran, which prompts were held out, the table, the verdict, the curves' points;
* ``grid.png``: a few test images, full run / each method, with the difference to the full run
  amplified next to each;
* ``curves.png``: PSNR against the full run over calls per image, every option;
* ``masks.png``: which steps each test image computed, for the knob and the schedule.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

__all__ = ["write_report"]

SHOWN = ("default_policy(nfe=K) (online)", "calibrated schedule", "uniform stride", "fewer steps")


def write_report(result, out: Path, *, decode: Callable | None, header: str, prompts: dict) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    path = out / "schedule.json"
    result.schedule.save(path)
    written.append(path)
    lines = ["# adaptive_sampling tune report", ""]
    if header:
        lines += [header, ""]
    lines += [
        f"Sampler `{result.sampler}`, {result.steps} steps, budget {result.nfe} calls per image "
        f"({result.steps / result.nfe:.2f}x). PSNR / SSIM against the full {result.steps}-step output of the same noise "
        f"(data range {result.notes.get('data_range', 2.0):.3g}); seconds per image on this device.",
        "",
    ]
    if prompts:
        lines += [f"- calibration prompts ({len(prompts.get('calibration', []))}): " + "; ".join(map(str, prompts.get("calibration", []))),
                  f"- held-out test prompts ({len(prompts.get('test', []))}), every figure below: " + "; ".join(map(str, prompts.get("test", []))),
                  ""]  # fmt: skip
    prov = result.schedule.provenance
    lines += [
        f"Calibration: {prov.get('method', '?')} search, {prov.get('full_run_equivalents', '?')} sampling runs' worth of calls "
        f"on the calibration prompts, {result.calibration_seconds:.1f} s; evaluation {result.evaluation_seconds:.1f} s.",
        "",
        "## Verdict",
        "",
        result.verdict,
        "",
        "## Every option at the budget (held-out prompts)",
        "",
        result.table(),
        "",
        "The paper's rule decides its own calls; its baselines in `evaluate`'s table run at its calls.",
        "",
    ]
    if result.curves:
        lines += ["## Quality against calls", "", "| method | " + " | ".join("calls / PSNR" for _ in next(iter(result.curves.values()))) + " |",
                  "|---|" + "---|" * len(next(iter(result.curves.values())))]  # fmt: skip
        for name, pts in result.curves.items():
            lines.append(f"| {name} | " + " | ".join(f"{c:.1f} / {p:.1f}" for c, p in pts) + " |")
        lines.append("")
    lines += ["## Files", "", "- `schedule.json`: `Calibrated.load(path)`, then `skip=` in the samplers or "
              "`adaptive_sampling.integrations.diffusers.apply(pipe, skip=...)`",
              "- `grid.png`, `curves.png`, `masks.png`: the pictures (need matplotlib)", ""]  # fmt: skip
    path = out / "report.md"
    path.write_text("\n".join(lines))
    written.append(path)
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError:
        (out / "pictures_skipped.txt").write_text("the pictures need matplotlib: pip install 'adaptive-diffusion-sampling[plot]'\n")
        return written
    written += [_grid(result, out / "grid.png", decode), _curves(result, out / "curves.png"), _masks(result, out / "masks.png")]
    return written


def _images(t: torch.Tensor, decode) -> np.ndarray:
    x = decode(t) if decode is not None else t[:, :3]
    x = x.float()
    if x.ndim != 4:
        x = x.reshape(x.shape[0], 1, -1, x.shape[-1]) if x.ndim == 3 else x.reshape(x.shape[0], 1, 1, -1)
    if decode is None:  # latents: each image normalised to its own range
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        hi = x.amax(dim=(1, 2, 3), keepdim=True)
        x = (x - lo) / (hi - lo).clamp_min(1e-8) * 2 - 1
    x = ((x.clamp(-1, 1) + 1) / 2)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x[:, :3].permute(0, 2, 3, 1).cpu().numpy()


def _grid(result, path: Path, decode) -> Path:
    import matplotlib.pyplot as plt

    ev = result.evaluation
    ref = ev.references[result.sampler]
    shown = min(4, ref.shape[0])
    rows = [("full run", ref)] + [(name, ev.select(result.sampler, r["method"], r["policy"])[0].output)
                                  for r in result.rows for name in [r["name"]] if name in SHOWN]  # fmt: skip
    full = _images(ref[:shown], decode)
    fig, axes = plt.subplots(len(rows), 2 * shown, figsize=(2.0 * 2 * shown, 2.1 * len(rows)), squeeze=False)
    for i, (name, out) in enumerate(rows):
        imgs = _images(out[:shown], decode)
        for j in range(shown):
            ax, dx = axes[i][2 * j], axes[i][2 * j + 1]
            ax.imshow(imgs[j])
            diff = np.abs(imgs[j] - full[j]).mean(axis=-1)
            dx.imshow(np.clip(diff * 10, 0, 1), cmap="magma", vmin=0, vmax=1)
            for a in (ax, dx):
                a.set_xticks([])
                a.set_yticks([])
            if j == 0:
                ax.set_ylabel(name, fontsize=8)
            if i == 0:
                ax.set_title(f"test image {j + 1}", fontsize=8)
                dx.set_title("|difference| x 10", fontsize=8)
    fig.suptitle("full run and each method at the budget; right of each image: its difference to the full run, amplified 10x", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _curves(result, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for name, pts in result.curves.items():
        pts = np.array(sorted(pts))
        ax.plot(pts[:, 0], pts[:, 1], "o-", label=name)
    ax.axvline(result.nfe, color="0.6", ls=":", label=f"the budget ({result.nfe} calls)")
    ax.set_xlabel(f"model calls per image (of {result.steps})")
    ax.set_ylabel("PSNR against the full run (dB)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    ax.set_title("quality against calls on the held-out prompts", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _masks(result, path: Path) -> Path:
    import matplotlib.pyplot as plt

    ev = result.evaluation
    picked = [("default_policy(nfe=K) (online)", "default"), ("calibrated schedule", "calibrated")]
    fig, axes = plt.subplots(len(picked), 1, figsize=(8, 1.2 + 0.3 * ev.references[result.sampler].shape[0] * len(picked)), squeeze=False)
    for ax, (name, policy) in zip(axes[:, 0], picked):
        mask = ev.select(result.sampler, "adaptive", policy)[0].mask
        ax.imshow(mask, aspect="auto", cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"{name}: dark = the model was called", fontsize=8)
        ax.set_ylabel("test image", fontsize=8)
        ax.set_xlabel("step", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
