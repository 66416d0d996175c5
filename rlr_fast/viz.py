"""Pictures: anomaly-map overlays and heat maps as PNG (matplotlib, no display needed), binary
masks as 8-bit PNG (0 normal, 255 anomalous, as MVTec's ground truth).

Figures are made with matplotlib's object API (``Figure``), never pyplot: importing this module
does not choose a backend for the user's process (no ``matplotlib.use``), and no figure is kept
in pyplot's global registry."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from matplotlib.figure import Figure


def _image(image) -> np.ndarray:
    """A normalised (3, H, W) tensor or a uint8 (H, W, 3) array -> uint8 (H, W, 3)."""
    if hasattr(image, "detach"):
        from .data import denormalize

        return denormalize(image)
    return np.asarray(image)


def _map(m) -> np.ndarray:
    m = m.detach().float().cpu().numpy() if hasattr(m, "detach") else np.asarray(m, dtype=np.float32)
    return m.reshape(m.shape[-2:])


def _save(fig, path) -> None:
    from .io import atomic_savefig

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_savefig(fig, path, dpi=100, bbox_inches="tight")


def save_overlay(path, image, gt_mask, anomaly_map, title: str = "", vmax=None) -> None:
    """Three panels: the image, its ground truth, and the anomaly map over the image."""
    img, heat = _image(image), _map(anomaly_map)
    fig = Figure(figsize=(9.6, 3.4))
    axes = fig.subplots(1, 3)
    axes[0].imshow(img)
    axes[0].set_title("image")
    axes[1].imshow(_map(gt_mask), cmap="gray", vmin=0, vmax=1)
    axes[1].set_title("ground truth")
    axes[2].imshow(img)
    shown = axes[2].imshow(heat, cmap="jet", alpha=0.5, vmin=0, vmax=vmax if vmax is not None else heat.max())
    axes[2].set_title("anomaly map")
    fig.colorbar(shown, ax=axes[2], fraction=0.046, pad=0.04)
    for ax in axes:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    _save(fig, path)


def save_heatmap(path, image, anomaly_map, title: str = "", vmax=None) -> None:
    """The anomaly map over the image, with a colour bar."""
    img, heat = _image(image), _map(anomaly_map)
    fig = Figure(figsize=(4.2, 3.6))
    ax = fig.subplots()
    ax.imshow(img)
    shown = ax.imshow(heat, cmap="jet", alpha=0.5, vmin=0, vmax=vmax if vmax is not None else heat.max())
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
    ax.axis("off")
    if title:
        ax.set_title(title)
    _save(fig, path)


def save_mask(path, mask) -> None:
    """A binary mask (any shape ending in (H, W), True/nonzero = anomalous) as a 0/255 PNG."""
    from PIL import Image

    from .io import atomic_open

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (_map(mask) > 0).astype(np.uint8) * 255
    with atomic_open(path, "wb") as fh:
        Image.fromarray(pixels).save(fh, format="PNG")
