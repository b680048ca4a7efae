"""Figures: 2-D scatter panels, image grids, trajectories and curves (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def _np(x) -> np.ndarray:
    return x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def image_grid(x, nrow: int | None = None) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (H', W', C) uint8 grid, rows of ``nrow`` images."""
    x = _np(x)
    B, C, H, W = x.shape
    nrow = nrow or int(np.ceil(np.sqrt(B)))
    ncol = int(np.ceil(B / nrow))
    grid = np.ones((ncol * (H + 1) + 1, nrow * (W + 1) + 1, C), dtype=np.float32)
    for i in range(B):
        r, c = divmod(i, nrow)
        grid[1 + r * (H + 1) : 1 + r * (H + 1) + H, 1 + c * (W + 1) : 1 + c * (W + 1) + W] = np.transpose(
            (x[i] + 1) / 2, (1, 2, 0)
        )
    return (np.clip(grid, 0, 1) * 255).astype(np.uint8)


def panels_figure(panels: Mapping[str, object], lim: float = 3.0, size: float = 3.0):
    """One row of panels: (N, 2) arrays as scatter plots, (B, C, H, W) arrays as image grids."""
    fig, axes = plt.subplots(1, len(panels), figsize=(size * len(panels), size), squeeze=False)
    for ax, (title, x) in zip(axes[0], panels.items()):
        x = _np(x)
        if x.ndim == 2:
            ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.5, linewidths=0)
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
            ax.set_aspect("equal")
        else:
            g = image_grid(x)
            ax.imshow(g[..., 0] if g.shape[-1] == 1 else g, cmap="gray", interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig


def save_figure(fig, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` (parent folders made, 110 dpi) and close it; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_panels(path: str | Path, panels: Mapping[str, object], **kwargs) -> Path:
    fig = panels_figure(panels, **kwargs)
    return save_figure(fig, path)


def save_trajectories(path: str | Path, trajectories: np.ndarray | torch.Tensor, lim: float = 3.0) -> Path:
    """(K + 1, N, 2) states along a sampler's grid: start points, paths and end points."""
    traj = _np(trajectories)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot(traj[:, :, 0], traj[:, :, 1], color="0.6", lw=0.4, alpha=0.5)
    ax.scatter(traj[0, :, 0], traj[0, :, 1], s=2, c="tab:blue", label="t=1")
    ax.scatter(traj[-1, :, 0], traj[-1, :, 1], s=2, c="tab:red", label="t=0")
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def save_curves(
    path: str | Path,
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    xlabel: str,
    ylabel: str,
    logy: bool = False,
    logx: bool = False,
) -> Path:
    """Named (x, y) curves on one axis."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, (xs, ys) in curves.items():
        ax.plot(xs, ys, marker="o", ms=3, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    if logx:
        ax.set_xscale("log", base=2)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)
