"""A small MVTec-layout data set made deterministically from the real texture photographs that
ship with scikit-image (brick, grass, gravel), with synthetic defects and exact masks.

Normal images are random crops (and flips) of a photograph; defective ones add one defect of
four kinds, each with its ground-truth mask: ``scratch`` (a thin bright or dark curve),
``stain`` (a blurred, tinted blob), ``cut`` (a patch of another texture pasted in) and ``hole``
(a dark, shaded ellipse). The same parameters always give the same files.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from .io import atomic_open, atomic_write_json

CLASSES = ("brick", "grass", "gravel")
DEFECTS = ("scratch", "stain", "cut", "hole")
_VERSION = 1


def _photo(name: str) -> np.ndarray:
    import skimage.data

    img = getattr(skimage.data, name)()
    img = img.astype(np.float32) / (255.0 if img.dtype == np.uint8 else 1.0)
    return img if img.ndim == 3 else np.repeat(img[..., None], 3, axis=2)  # (H, W, 3) in [0, 1]


def _crop(photo: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    h, w, _ = photo.shape
    y, x = rng.integers(0, h - size + 1), rng.integers(0, w - size + 1)
    out = photo[y:y + size, x:x + size]
    if rng.random() < 0.5:
        out = out[:, ::-1]
    if rng.random() < 0.5:
        out = out[::-1]
    return np.ascontiguousarray(out)


def _ellipse(size: int, rng: np.random.Generator, rmin: float, rmax: float) -> np.ndarray:
    """A random ellipse as a boolean (size, size) mask, away from the border."""
    ry, rx = rng.uniform(rmin, rmax, 2) * size
    cy, cx = rng.uniform(0.2, 0.8, 2) * size
    theta = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    u = dx * np.cos(theta) + dy * np.sin(theta)
    v = -dx * np.sin(theta) + dy * np.cos(theta)
    return (u / rx) ** 2 + (v / ry) ** 2 <= 1


def _scratch(img, rng):
    size = img.shape[0]
    p0, p1, p2 = rng.uniform(0.15, 0.85, (3, 2)) * size
    t = np.linspace(0, 1, 4 * size)[:, None]
    pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2  # a quadratic Bezier curve
    line = np.zeros((size, size), bool)
    ij = np.clip(np.round(pts).astype(int), 0, size - 1)
    line[ij[:, 0], ij[:, 1]] = True
    mask = ndimage.binary_dilation(line, iterations=int(rng.integers(1, 3)))
    value = 0.95 if rng.random() < 0.5 else 0.05
    img[mask] = 0.25 * img[mask] + 0.75 * value
    return img, mask


def _stain(img, rng):
    size = img.shape[0]
    blob = ndimage.gaussian_filter(_ellipse(size, rng, 0.06, 0.12).astype(np.float32), sigma=size / 64)
    tint = np.array(rng.choice([[0.45, 0.25, 0.05], [0.1, 0.3, 0.6], [0.6, 0.1, 0.1]]), dtype=np.float32)
    weight = 0.8 * blob[..., None]
    img = img * (1 - weight) + tint * weight
    return img, blob > 0.5


def _cut(img, rng, other: np.ndarray):
    size = img.shape[0]
    mask = _ellipse(size, rng, 0.07, 0.13)
    patch = np.rot90(_crop(other, size, rng), k=int(rng.integers(0, 4)))
    img = img.copy()
    img[mask] = patch[mask]
    return img, mask


def _hole(img, rng):
    size = img.shape[0]
    mask = _ellipse(size, rng, 0.05, 0.1)
    dist = ndimage.distance_transform_edt(mask)
    shade = 0.05 + 0.15 * (1 - dist / max(dist.max(), 1))  # dark centre, lighter rim
    img = img.copy()
    img[mask] = shade[mask][:, None] * np.array([1.0, 0.9, 0.8], dtype=np.float32)
    return img, mask


def add_defect(image: np.ndarray, rng: np.random.Generator, others: Sequence[np.ndarray],
               kind: Optional[str] = None):
    """One synthetic defect on a copy of ``image`` (H, W, 3) float in [0, 1]: ``(image, mask)``,
    the mask a boolean (H, W). ``kind`` is one of DEFECTS (None: drawn from ``rng``); ``others``
    are images of other textures, at least as large as ``image``, that a ``cut`` pastes from.
    Training data for models that learn from anomalies (ResAD) use it on normal images."""
    if kind is None:
        kind = DEFECTS[int(rng.integers(0, len(DEFECTS)))]
    if kind not in DEFECTS:
        raise ValueError(f"unknown defect kind {kind!r}; choose from {', '.join(DEFECTS)}")
    if kind == "scratch":
        return _scratch(image.copy(), rng)
    if kind == "stain":
        return _stain(image, rng)
    if kind == "cut":
        if not others:
            raise ValueError("a 'cut' defect needs at least one other image to paste from")
        return _cut(image, rng, others[int(rng.integers(0, len(others)))])
    return _hole(image, rng)


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if array.dtype == bool:
        image = Image.fromarray(array.astype(np.uint8) * 255)
    else:
        image = Image.fromarray(np.clip(array * 255 + 0.5, 0, 255).astype(np.uint8))
    with atomic_open(path, "wb") as fh:
        image.save(fh, format="PNG")


def build_demo_dataset(root, classes: Sequence[str] = CLASSES, image_size: int = 192, n_train: int = 40,
                       n_test_good: int = 10, n_test_defect: int = 16, seed: int = 0) -> Path:
    """Write (or reuse) the demo data set under `root`; returns `root` as a Path."""
    root = Path(root)
    params = {"version": _VERSION, "classes": list(classes), "image_size": image_size, "n_train": n_train,
              "n_test_good": n_test_good, "n_test_defect": n_test_defect, "seed": seed}
    manifest = root / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text()) == params:
        return root
    for cls in classes:
        if cls not in CLASSES:
            raise ValueError(f"unknown demo class {cls!r}; choose from {', '.join(CLASSES)}")
        shutil.rmtree(root / cls, ignore_errors=True)
    photos = {c: _photo(c) for c in CLASSES}
    for ci, cls in enumerate(classes):
        rng = np.random.default_rng([seed, ci])
        photo = photos[cls]
        others = [photos[c] for c in CLASSES if c != cls]
        # a crop a bit larger than the output, resized down: a little blur, like a camera
        crop = min(photo.shape[0], photo.shape[1], int(image_size * 1.25))

        def normal():
            img = _crop(photo, crop, rng)
            return np.asarray(Image.fromarray((img * 255).astype(np.uint8)).resize(
                (image_size, image_size), Image.Resampling.LANCZOS), dtype=np.float32) / 255

        for i in range(n_train):
            _save(root / cls / "train" / "good" / f"{i:03d}.png", normal())
        for i in range(n_test_good):
            _save(root / cls / "test" / "good" / f"{i:03d}.png", normal())
        for i in range(n_test_defect):
            kind = DEFECTS[i % len(DEFECTS)]
            img, mask = add_defect(normal(), rng, others, kind)
            _save(root / cls / "test" / kind / f"{i:03d}.png", img)
            _save(root / cls / "ground_truth" / kind / f"{i:03d}_mask.png", mask)
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(manifest, params)  # last: its presence means every file above is whole
    return root
