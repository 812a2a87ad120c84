"""The demo's pictures: images next to their amplified differences, quality-vs-compute curves, skip masks.

Every function takes plain data (named rows of images, named curves, named masks) so both demo
paths (the library samplers on digits / shapes, the diffusers pipeline with the peers on flow) draw
the same pictures. Needs matplotlib; ``require_matplotlib`` says which extra to install.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

__all__ = ["require_matplotlib", "image_grid", "curves", "masks", "MissingPlotting"]


class MissingPlotting(RuntimeError):
    """matplotlib is not installed."""


def require_matplotlib():
    """``matplotlib.pyplot`` with the file backend, or a ``MissingPlotting`` naming the extra to install."""
    try:
        import matplotlib
    except ImportError as e:
        raise MissingPlotting(
            "the demo's pictures need matplotlib: pip install matplotlib (or the package's 'plot' extra:"
            " pip install -e '.[plot]'); --no-plots runs without pictures"
        ) from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _strip(images: torch.Tensor) -> np.ndarray:
    """[B, C, H, W] in [-1, 1] (C = 1 or 3) -> one row [H, B * (W + 1), 3] in [0, 1] (white gaps)."""
    imgs = ((images.float().clamp(-1, 1) + 1) / 2).expand(-1, 3, -1, -1).permute(0, 2, 3, 1).cpu().numpy()
    H, W = imgs.shape[1:3]
    row = np.ones((H, imgs.shape[0] * (W + 1), 3))
    for i, im in enumerate(imgs):
        row[:, i * (W + 1) : i * (W + 1) + W] = im
    return row


def _diff_strip(images: torch.Tensor, reference: torch.Tensor, gain: float) -> np.ndarray:
    """|images - reference| (max over channels) x gain, clipped to [0, 1], as a dark-on-white strip."""
    d = (images.float() - reference.float()).abs().amax(dim=1, keepdim=True) / 2 * gain  # /2: data range 2
    return _strip(1 - 2 * d.clamp(0, 1))


def image_grid(rows: list[tuple[str, torch.Tensor]], reference: torch.Tensor, path: Path, title: str) -> float:
    """One picture: each row's images (left) and their difference to ``reference`` (right), amplified
    by one gain for the whole picture (so rows compare) and printed in the title. The first row is
    the reference itself. Returns the gain."""
    plt = require_matplotlib()
    diffs = [float((img.float() - reference.float()).abs().amax()) / 2 for _, img in rows]
    biggest = max([d for d in diffs if d > 0], default=0.0)
    gain = 1.0
    if biggest > 0:  # the largest of 1, 2, 5 x 10^n that keeps the biggest difference within the scale
        decade = 10 ** np.floor(np.log10(1 / biggest))
        gain = float(max(m * decade for m in (1, 2, 5) if m * decade * biggest <= 1))
    left = [_strip(img) for _, img in rows]
    right = [_diff_strip(img, reference, gain) for _, img in rows]
    H = left[0].shape[0]
    width = max(2.2, 0.45 * left[0].shape[1] / (H + 1))
    fig, axes = plt.subplots(1, 2, figsize=(3.0 + 2 * width, 0.8 + 0.5 * len(rows)), squeeze=False)
    for ax, strips, head in ((axes[0][0], left, "samples"), (axes[0][1], right, f"|difference to the first row| x {gain:g}")):
        gap = np.ones((1, strips[0].shape[1], 3))
        ax.imshow(np.concatenate([np.vstack([s, gap]) for s in strips]), vmin=0, vmax=1, interpolation="nearest")
        ax.set_yticks([(i + 0.5) * (H + 1) for i in range(len(rows))], [name for name, _ in rows], fontsize=7)
        ax.set_xticks([])
        ax.set_title(head, fontsize=8)
    axes[0][1].set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return gain


def curves(panels: dict[str, dict[str, list[tuple[float, float]]]], path: Path, xlabel: str, ylabel: str,
           highlight: tuple[str, ...] = ()) -> None:  # fmt: skip
    """One panel per key of ``panels``; in each, one curve per name: (x, y) points. ``highlight``:
    names drawn thick. The legend sits outside the data, to the right."""
    plt = require_matplotlib()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels) + 2.6, 3.9), squeeze=False)
    markers = "os^vDP<>Xph*d"
    names: list[str] = []
    for pts in panels.values():
        names += [n for n in pts if n not in names]
    for ax, (title, pts) in zip(axes[0], panels.items()):
        for name, xy in pts.items():
            if not xy:
                continue
            j = names.index(name)
            xy = sorted(xy)
            ax.plot([p[0] for p in xy], [p[1] for p in xy], marker=markers[j % len(markers)], color=f"C{j % 10}", ls="-" if len(xy) > 1 else "none",
                    lw=2.4 if name in highlight else 1.1, ms=6 if name in highlight else 4, label=name)  # fmt: skip
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    handles, labels = [], []
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)


def masks(panels: list[tuple[str, np.ndarray]], path: Path, columns: int = 3) -> None:
    """Which steps called the model: one heat map per (title, [B, N] bool mask); dark = called."""
    plt = require_matplotlib()
    rows = (len(panels) + columns - 1) // columns
    cols = min(columns, len(panels))
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 0.9 + 1.6 * rows), squeeze=False)
    for ax, (title, mask) in zip(axes.flat, panels):
        ax.imshow(np.asarray(mask), aspect="auto", cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.set_ylabel("sample", fontsize=7)
        ax.set_xlabel("step (dark: model called)", fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)
