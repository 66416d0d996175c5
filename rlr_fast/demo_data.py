"""A small MVTec-layout data set made deterministically from the real texture photographs that
ship with scikit-image (brick, grass, gravel), with synthetic defects and exact masks.

Normal images are random crops (and flips) of a photograph; defective ones add one defect of
four kinds, each with its ground-truth mask: ``scratch`` (a thin bright or dark curve),
``stain`` (a blurred, tinted blob), ``cut`` (a patch of another texture pasted in) and ``hole``
(a dark, shaded ellipse). The same parameters always give the same files.

``build_benchmark_dataset`` makes the accuracy benchmark's larger data set the same way from
fifteen of scikit-image's photographs (textures as crops, objects as one aligned view with small
nuisance variation) with four more defect kinds (BENCHMARK_DEFECTS); ``build_demo_dataset`` and
its files are unchanged by it.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from scipy import ndimage

from .io import atomic_open, atomic_write_json

CLASSES = ("brick", "grass", "gravel")
DEFECTS = ("scratch", "stain", "cut", "hole")  # the demo's kinds; the demo cycles through exactly these
# the benchmark's: the demo's four, DRAEM-style Perlin-shaped blends of another photograph, foreign
# objects pasted from another photograph, and two subtle ones (local blur, local colour shift)
BENCHMARK_DEFECTS = DEFECTS + ("perlin", "foreign", "blur", "tint")
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


# -- the benchmark's further defect kinds: each changes the image only inside its mask ---------

def _perlin(size: int, res, rng: np.random.Generator) -> np.ndarray:
    """2-D gradient (Perlin) noise, (size, size) float, on a lattice of res = (ry, rx) cells."""
    ry, rx = res
    angles = rng.uniform(0, 2 * np.pi, (ry + 1, rx + 1))
    gy, gx = np.sin(angles), np.cos(angles)
    y = np.arange(size) * ry / size
    x = np.arange(size) * rx / size
    y0, x0 = np.floor(y).astype(int)[:, None], np.floor(x).astype(int)[None, :]
    fy, fx = y[:, None] - y0, x[None, :] - x0  # (size, 1), (1, size) offsets inside a cell

    def corner(dy, dx):
        return gy[y0 + dy, x0 + dx] * (fy - dy) + gx[y0 + dy, x0 + dx] * (fx - dx)

    u, v = (t * t * t * (t * (t * 6 - 15) + 10) for t in (fy, fx))  # Perlin's fade curve
    return (corner(0, 0) * (1 - v) + corner(0, 1) * v) * (1 - u) + (corner(1, 0) * (1 - v) + corner(1, 1) * v) * u


def _perlin_mask(size: int, rng: np.random.Generator, fmin: float, fmax: float) -> np.ndarray:
    """A DRAEM-style region: two octaves of Perlin noise thresholded so that a random fraction
    in [fmin, fmax] of the image is inside (a quantile, so the area never degenerates), less
    the specks (parts under a fifth of the largest part's area)."""
    res = tuple(int(r) for r in rng.choice([2, 3, 4, 6], 2))
    noise = _perlin(size, res, rng) + 0.5 * _perlin(size, (2 * res[0], 2 * res[1]), rng)
    mask = noise > np.quantile(noise, 1 - rng.uniform(fmin, fmax))
    labels, n = ndimage.label(mask)
    areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]  # (n,)
    return np.isin(labels, 1 + np.flatnonzero(areas >= 0.2 * areas.max()))


def _perlin_blend(img, rng, other: np.ndarray):
    """DRAEM's anomaly: inside a Perlin-shaped region, the image blended with (mostly replaced
    by) a crop of another photograph."""
    size = img.shape[0]
    mask = _perlin_mask(size, rng, 0.02, 0.08)
    texture = np.rot90(_crop(other, size, rng), k=int(rng.integers(0, 4)))
    keep = rng.uniform(0.1, 0.5)  # weight of the original image inside the region
    img = img.copy()
    img[mask] = keep * img[mask] + (1 - keep) * texture[mask]
    return img, mask


def _foreign(img, rng, other: np.ndarray):
    """A foreign object: an irregular (star-shaped) piece of another photograph lying on the
    surface, with a darker rim inside its outline like the edge of a real object."""
    size = img.shape[0]
    r0 = rng.uniform(0.05, 0.1) * size
    cy, cx = rng.uniform(0.2, 0.8, 2) * size
    harmonics = [(k, rng.uniform(0, 0.2), rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5)]
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    phi = np.arctan2(yy - cy, xx - cx)
    radius = r0 * (1 + sum(a * np.cos(k * phi + p) for k, a, p in harmonics))
    mask = np.hypot(yy - cy, xx - cx) <= radius
    patch = np.rot90(_crop(other, size, rng), k=int(rng.integers(0, 4)))
    rim = mask & ~ndimage.binary_erosion(mask, iterations=max(1, size // 128))
    img = img.copy()
    img[mask] = patch[mask]
    img[rim] *= 0.5
    return img, mask


def _blur(img, rng):
    """A subtle defect: an elliptic region out of focus (a smear or a local loss of sharpness),
    placed where the blur changes the image most (the best of 16 candidate regions), so that it
    shows: a blur of a flat region would be a defect nobody could see."""
    size = img.shape[0]
    sigma = rng.uniform(1.0, 2.0) * size / 128
    blurred = ndimage.gaussian_filter(img, (sigma, sigma, 0))
    change = np.abs(blurred - img).sum(axis=2)  # (H, W)
    candidates = [_ellipse(size, rng, 0.06, 0.12) for _ in range(16)]
    mask = max(candidates, key=lambda m: float(change[m].mean()))
    img = img.copy()
    img[mask] = blurred[mask]
    return img, mask


def _tint(img, rng):
    """A subtle defect: a Perlin-shaped discolouration, a small shift of colour (of brightness
    on grayscale images) with a sharp edge."""
    size = img.shape[0]
    mask = _perlin_mask(size, rng, 0.02, 0.08)
    amount = rng.uniform(0.04, 0.08)
    if np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 0], img[..., 2]):
        delta = np.full(3, amount if rng.random() < 0.5 else -amount)
    else:
        direction = rng.normal(size=3)
        direction -= direction.mean()  # a change of hue, not of brightness
        delta = amount * direction / max(np.abs(direction).max(), 1e-6)
    img = img.copy()
    img[mask] = np.clip(img[mask] + delta.astype(np.float32), 0, 1)
    return img, mask


def add_defect(image: np.ndarray, rng: np.random.Generator, others: Sequence[np.ndarray],
               kind: Optional[str] = None, kinds: Sequence[str] = DEFECTS):
    """One synthetic defect on a copy of ``image`` (H, W, 3) float in [0, 1]: ``(image, mask)``,
    the mask a boolean (H, W). ``kind`` is one of BENCHMARK_DEFECTS (None: drawn from ``kinds``
    with ``rng``; ``kinds`` defaults to the demo's four DEFECTS, so that callers which leave a
    test-time kind out of training can say so); ``others`` are images of other photographs, at
    least as large as ``image``, that ``cut``, ``perlin`` and ``foreign`` paste from.
    Training data for models that learn from anomalies (ResAD) use it on normal images."""
    if kind is None:
        if not kinds:
            raise ValueError("no defect kinds to draw from")
        kind = kinds[int(rng.integers(0, len(kinds)))]
    if kind not in BENCHMARK_DEFECTS:
        raise ValueError(f"unknown defect kind {kind!r}; choose from {', '.join(BENCHMARK_DEFECTS)}")
    if kind in ("cut", "perlin", "foreign") and not others:
        raise ValueError(f"a {kind!r} defect needs at least one other image to paste from")
    if kind == "scratch":
        return _scratch(image.copy(), rng)
    if kind == "stain":
        return _stain(image, rng)
    if kind == "cut":
        return _cut(image, rng, others[int(rng.integers(0, len(others)))])
    if kind == "hole":
        return _hole(image, rng)
    if kind == "perlin":
        return _perlin_blend(image, rng, others[int(rng.integers(0, len(others)))])
    if kind == "foreign":
        return _foreign(image, rng, others[int(rng.integers(0, len(others)))])
    if kind == "blur":
        return _blur(image, rng)
    return _tint(image, rng)


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


# -- the accuracy benchmark: many classes from scikit-image's photographs ----------------------

@dataclass(frozen=True)
class _Source:
    """How a photograph becomes a class. ``texture``: random crops (a stationary surface, as in
    MVTec's texture classes), flipped when ``flip``. ``object``: the photograph's ``window``
    (y0, x0, height, width in its pixels) as one aligned object, with small nuisance variation."""
    kind: str
    flip: bool = True
    window: Optional[Tuple[int, int, int, int]] = None


_SOURCES = {
    "brick": _Source("texture"), "grass": _Source("texture"), "gravel": _Source("texture"),
    "text": _Source("texture", flip=False), "page": _Source("texture", flip=False),  # mirrored writing is not normal
    "astronaut": _Source("object", window=(0, 0, 512, 512)),
    "camera": _Source("object", window=(0, 0, 512, 512)),
    "cell": _Source("object", window=(97, 0, 550, 550)),  # the cell near the middle
    "chelsea": _Source("object", window=(0, 75, 300, 300)),  # the cat's head
    "coffee": _Source("object", window=(0, 100, 400, 400)),  # cup and saucer
    "coins": _Source("object", window=(0, 0, 303, 384)),  # the whole tray, 1.27:1 squeezed to a square
    "microaneurysms": _Source("object", window=(0, 0, 102, 102)),  # 102 px: upscaled 2.7x
    "motorcycle_left": _Source("object", window=(0, 100, 500, 600)),  # the motorcycle, 1.2:1
    "retina": _Source("object", window=(0, 0, 1411, 1411)),  # the whole fundus, downscaled 5.2x at 256
    "rocket": _Source("object", window=(0, 106, 427, 427)),  # rocket and towers
}
BENCHMARK_PHOTOS = tuple(_SOURCES)  # every class the benchmark can build, in a fixed order (seeds use it)
# Default classes: four textures (three natural ones and handwriting, a man-made pattern) and
# four aligned objects (coins: grayscale, many similar parts; coffee: colour, smooth and
# specular; chelsea: fine fur detail, the hardest; retina: a round medical object on black), as
# MVTec mixes textures and objects. Eight keeps the default run's cost within reach of a CPU.
BENCHMARK_CLASSES = ("brick", "grass", "gravel", "text", "coins", "coffee", "chelsea", "retina")
# 2: blur placed by its change over 16 candidates (was: detail over 6); 3: objects bend a little,
# subtler blur (sigma 2-4 px at 256, was 3-6) and tint (0.04-0.08, was 0.07-0.12): a nearest-
# neighbour baseline with all 40 references scored 1.000 image AUROC on chelsea with version 2
_BENCH_VERSION = 3
_MARGIN = 1.06  # an object's window spans 6% more than the image: translation and rotation stay on real pixels
_SHIFT, _ROTATE = 0.015, 2.0  # nuisance: up to 1.5% of the side (4 px at 256) and 2 degrees
_BEND = 1.5 / 256  # and a smooth bend of up to 1.5 px at 256: one photograph stands for many instances


def _skimage_photo(name: str) -> np.ndarray:
    if name == "motorcycle_left":  # shipped with scikit-image (no download), as the left of a stereo pair
        import skimage.data

        return _photo_array(skimage.data.stereo_motorcycle()[0])
    return _photo(name)


def _photo_array(img: np.ndarray) -> np.ndarray:
    img = img.astype(np.float32) / 255.0
    return img if img.ndim == 3 else np.repeat(img[..., None], 3, axis=2)


def _resize(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """Lanczos resampling of an (H, W, 3) float image in [0, 1] through 8 bits, as the demo does."""
    pil = Image.fromarray((img * 255).astype(np.uint8)).resize((width, height), Image.Resampling.LANCZOS)
    return np.asarray(pil, dtype=np.float32) / 255


def _is_gray(img: np.ndarray) -> bool:
    return bool(np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 0], img[..., 2]))


def _texture_crop(photo: np.ndarray, size: int) -> int:
    return min(photo.shape[0], photo.shape[1], int(size * 1.25))


def _working_image(name: str, photo: np.ndarray, size: int) -> np.ndarray:
    """The photograph at the scale of the class's images (each side >= ``size``): a texture
    scaled as its crops are, an object so that its window spans ``size * _MARGIN`` pixels."""
    h, w = photo.shape[:2]
    src = _SOURCES[name]
    if src.kind == "texture":
        sy = sx = size / _texture_crop(photo, size)
    else:
        sy, sx = size * _MARGIN / src.window[2], size * _MARGIN / src.window[3]
    return _resize(photo, max(size, round(w * sx)), max(size, round(h * sy)))


def _aligned_object(work: np.ndarray, centre, size: int, rng: np.random.Generator) -> np.ndarray:
    """The object seen again: ``size`` x ``size`` pixels around ``centre`` of the working image,
    shifted by up to _SHIFT * size, turned by up to _ROTATE degrees and bent by a smooth random
    displacement of up to _BEND * size (cubic spline sampling): an aligned object whose instances
    differ a little, as real parts do."""
    theta = np.deg2rad(rng.uniform(-_ROTATE, _ROTATE))
    dy, dx = rng.uniform(-_SHIFT, _SHIFT, 2) * size
    bend = ndimage.gaussian_filter(rng.normal(size=(2, size, size)), (0, size / 16, size / 16))  # (2, S, S)
    bend *= rng.uniform(0.3, 1.0) * _BEND * size / max(np.abs(bend).max(), 1e-12)
    u, v = np.mgrid[:size, :size].astype(np.float64) - (size - 1) / 2
    ys = centre[0] - 0.5 + dy + np.cos(theta) * u - np.sin(theta) * v + bend[0]
    xs = centre[1] - 0.5 + dx + np.sin(theta) * u + np.cos(theta) * v + bend[1]
    out = np.stack([ndimage.map_coordinates(work[..., c], [ys, xs], order=3, mode="reflect") for c in range(3)], -1)
    return np.clip(out, 0, 1).astype(np.float32)


def _photometric(img: np.ndarray, rng: np.random.Generator, gray: bool) -> np.ndarray:
    """A camera's frame-to-frame variation: contrast x0.95-1.05, brightness +-0.03, sensor noise
    of std 0.01 (the same in all channels for a grayscale camera)."""
    contrast, brightness = rng.uniform(0.95, 1.05), rng.uniform(-0.03, 0.03)
    mean = img.mean()
    noise = rng.normal(0, 0.01, img.shape[:2] + ((1,) if gray else (3,)))
    return np.clip((img - mean) * contrast + mean + brightness + noise, 0, 1).astype(np.float32)


def _benchmark_normal(name: str, photo: np.ndarray, work: np.ndarray, size: int,
                      rng: np.random.Generator) -> np.ndarray:
    src = _SOURCES[name]
    if src.kind == "texture":
        crop = _texture_crop(photo, size)
        if src.flip:
            img = _crop(photo, crop, rng)
        else:
            y, x = rng.integers(0, photo.shape[0] - crop + 1), rng.integers(0, photo.shape[1] - crop + 1)
            img = photo[y:y + crop, x:x + crop]
        img = _resize(img, size, size)
    else:
        y0, x0, h, w = src.window
        sy, sx = work.shape[0] / photo.shape[0], work.shape[1] / photo.shape[1]
        img = _aligned_object(work, ((y0 + h / 2) * sy, (x0 + w / 2) * sx), size, rng)
    return _photometric(img, rng, _is_gray(photo))


def build_benchmark_dataset(root, classes: Sequence[str] = BENCHMARK_CLASSES, image_size: int = 256,
                            n_train: int = 40, n_test_good: int = 20, n_test_defect: int = 32, seed: int = 0,
                            defects: Sequence[str] = BENCHMARK_DEFECTS) -> Path:
    """Write (or reuse, when ``root/manifest.json`` has the same parameters) the accuracy
    benchmark's data set in the MVTec layout under ``root``; returns ``root`` as a Path.

    Classes come from scikit-image's photographs (BENCHMARK_PHOTOS; default BENCHMARK_CLASSES).
    How normal variation is made, as in real inspection data:
    - textures (brick, grass, gravel: stationary surfaces; text, page: writing, crops not
      mirrored) are random crops of 1.25x the image side (the whole height for the smaller text
      and page), resampled to ``image_size`` with a Lanczos filter, as the demo does;
    - objects (astronaut, camera, cell, chelsea, coffee, coins, microaneurysms, motorcycle_left,
      retina, rocket) are one fixed window of the photograph, aligned as in MVTec's object
      classes, each image shifted by at most 1.5% of its side, turned by at most 2 degrees and
      bent by a smooth displacement of at most 1.5 px at 256 (instances differ a little);
      the photograph is first resampled with a Lanczos filter (small ones such as the 102-pixel
      microaneurysms are upscaled) so that its window spans 6% more than the image, which keeps
      the shifted and turned view on real pixels;
    - every image then gets a camera's variation: contrast x0.95-1.05, brightness +-0.03 and
      noise of std 0.01; grayscale photographs stay grayscale (noise, pasted content too).
    Test image i of ``n_test_defect`` gets defect kind ``defects[i % len(defects)]`` (any of
    BENCHMARK_DEFECTS: a caller can keep kinds out, e.g. those used to train ResAD), with its
    exact mask; 'cut', 'perlin' and 'foreign' paste from the other fourteen photographs.
    Each image has its own random stream (seed, class, split, index), so a class's images do not
    depend on which other classes are built, and a smaller count gives a prefix of a larger one.
    A rebuild removes every benchmark class folder under ``root`` first (also of classes no
    longer asked for), so that the folder holds exactly the classes of its manifest.
    """
    root = Path(root)
    classes, defects = list(classes), list(defects)
    for cls in classes:
        if cls not in _SOURCES:
            raise ValueError(f"unknown benchmark class {cls!r}; choose from {', '.join(BENCHMARK_PHOTOS)}")
    if not classes or len(set(classes)) != len(classes):
        raise ValueError(f"benchmark classes must be given once each, at least one: {classes}")
    for kind in defects:
        if kind not in BENCHMARK_DEFECTS:
            raise ValueError(f"unknown defect kind {kind!r}; choose from {', '.join(BENCHMARK_DEFECTS)}")
    if n_test_defect and (not defects or len(set(defects)) != len(defects)):
        raise ValueError(f"defect kinds must be given once each, at least one: {defects}")
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32, got {image_size}")
    params = {"version": _BENCH_VERSION, "dataset": "benchmark", "classes": classes, "image_size": image_size,
              "n_train": n_train, "n_test_good": n_test_good, "n_test_defect": n_test_defect, "seed": seed,
              "defects": defects}
    manifest = root / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text()) == params:
        return root
    if manifest.is_file():
        manifest.unlink()  # the files below are about to change
    for cls in BENCHMARK_PHOTOS:  # also classes of an earlier build that this one does not have
        shutil.rmtree(root / cls, ignore_errors=True)
    photos = {name: _skimage_photo(name) for name in BENCHMARK_PHOTOS}
    work = {name: _working_image(name, photo, image_size) for name, photo in photos.items()}
    for cls in classes:
        cid = BENCHMARK_PHOTOS.index(cls)
        gray = _is_gray(photos[cls])
        others = [work[n] for n in BENCHMARK_PHOTOS if n != cls]
        if gray:  # a grayscale camera sees foreign material in gray too
            others = [np.repeat((o @ np.float32([0.299, 0.587, 0.114]))[..., None], 3, axis=2) for o in others]

        def normal(split: int, i: int):
            rng = np.random.default_rng([seed, cid, split, i])
            return _benchmark_normal(cls, photos[cls], work[cls], image_size, rng), rng

        for i in range(n_train):
            _save(root / cls / "train" / "good" / f"{i:03d}.png", normal(0, i)[0])
        for i in range(n_test_good):
            _save(root / cls / "test" / "good" / f"{i:03d}.png", normal(1, i)[0])
        for i in range(n_test_defect):
            kind = defects[i % len(defects)]
            clean, rng = normal(2, i)
            img, mask = add_defect(clean, rng, others, kind)
            _save(root / cls / "test" / kind / f"{i:03d}.png", img)
            _save(root / cls / "ground_truth" / kind / f"{i:03d}_mask.png", mask)
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(manifest, params)  # last: its presence means every file above is whole
    return root
