"""Image data: anomaly-detection data sets in the layouts of :mod:`rlr_fast.layouts` (MVTec AD,
a folder of normal and anomalous images, VisA, MVTec AD 2, MVTec LOCO AD) and plain folders of
images.

:class:`MVTecDataset` reads any of those layouts (detected, or ``layout=``) into the same items;
the MVTec AD layout is::

    <root>/<class>/train/good/*.png
    <root>/<class>/test/<defect or good>/*.png
    <root>/<class>/ground_truth/<defect>/<name>_mask.png

Images are resized to ``image_size`` x ``image_size`` with PIL's antialiased bicubic filter and
normalised with the ImageNet mean/std; masks are resized with nearest neighbour and binarised.
Every problem with the data raises :class:`DataError` (a ``ValueError``) naming the file or
folder at fault, also when DataLoader workers read the files (:class:`DataErrorLoader`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, default_collate

from .errors import DataError

__all__ = [
    "DataError",
    "DataErrorLoader",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "load_image",
    "load_mask",
    "denormalize",
    "discover_classes",
    "list_images",
    "MVTecDataset",
    "FolderDataset",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")  # compared lower-case

_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)
PathLike = Union[str, os.PathLike]


def _check_size(size) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size <= 0:
        raise ValueError(f"image size must be a positive int, got {size!r}")
    return int(size)


def _open(path: PathLike, mode: str, size: int, resample) -> Image.Image:
    """Decode ``path``, convert to ``mode`` and resize to size x size."""
    try:
        with Image.open(path) as img:
            if img.format == "JPEG":
                img.draft(mode, (size, size))  # let libjpeg decode at a reduced scale (fast)
            img = _to_8_bit(img).convert(mode)  # forces the full decode: errors surface here
    except FileNotFoundError:
        raise DataError(f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from exc
    if img.size != (size, size):
        img = img.resize((size, size), resample)  # PIL resize is antialiased when shrinking
    return img


def _to_8_bit(img: Image.Image) -> Image.Image:
    """16-bit grayscale scaled to 8 bits (x / 257, so 65535 -> 255); PIL's own conversion would
    clip it to 255, i.e. white. Pixels without a standard range (32-bit integer, float) are
    refused (ValueError, which :func:`_open` reports with the file). Other modes (8-bit, and
    16-bit RGB, which PIL already reads as 8-bit) pass as they are."""
    if img.mode.startswith("I;16") or (img.mode == "I" and img.format == "PNG"):  # PNG's "I" is 16-bit
        pixels = np.asarray(img, dtype=np.float64) / 257.0
        return Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8))
    if img.mode in ("I", "F"):
        kind = "integers" if img.mode == "I" else "floats"
        raise ValueError(f"its pixels are 32-bit {kind} with no standard range; save it as an 8- or 16-bit image")
    return img


def load_image(path: PathLike, size: int) -> torch.Tensor:
    """Read an image as a normalised float tensor (3, size, size).

    Grayscale, palette and RGBA images are converted to RGB (16-bit ones scaled to 8 bits);
    resizing uses PIL's antialiased bicubic filter; then ``(x / 255 - IMAGENET_MEAN) / IMAGENET_STD`` per channel.
    """
    size = _check_size(size)
    img = _open(path, "RGB", size, Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())  # (S, S, 3) uint8
    x = x.permute(2, 0, 1).float().div_(255.0)  # (3, S, S) in [0, 1]
    return x.sub_(_MEAN).div_(_STD)


def load_mask(path: PathLike, size: int, nonzero: bool = False) -> torch.Tensor:
    """Read a ground-truth mask as a float tensor (1, size, size) with values in {0, 1}.

    Resized with nearest neighbour (whatever its original size). A pixel is defective when its
    gray value is >= 128, or > 0 for masks stored with values {0, 1}; with ``nonzero`` (VisA's
    and MVTec LOCO AD's masks, whose values number the defects) whenever it is > 0.
    """
    size = _check_size(size)
    img = _open(path, "L", size, Image.Resampling.NEAREST)
    m = np.asarray(img, dtype=np.uint8)  # (S, S)
    m = m > 0 if nonzero or m.max() <= 1 else m >= 128
    return torch.from_numpy(m.astype(np.float32))[None]


def denormalize(image: torch.Tensor) -> np.ndarray:
    """Normalised (3, H, W) tensor -> uint8 array (H, W, 3)."""
    image = torch.as_tensor(image).detach().float().cpu()
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a normalised image of shape (3, H, W), got {tuple(image.shape)}")
    x = (image * _STD + _MEAN).clamp_(0, 1).mul_(255).round_()
    return x.to(torch.uint8).permute(1, 2, 0).numpy()


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def list_images(folder: PathLike) -> List[Path]:
    """Image files directly inside ``folder`` (not recursive), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and _is_image(p))


def discover_classes(root: PathLike) -> List[str]:
    """Sorted names of the class folders under ``root`` (sub-folders holding train/ or test/)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    return sorted(p.name for p in root.iterdir()
                  if p.is_dir() and ((p / "train").is_dir() or (p / "test").is_dir()))


def _parse_classes(classes) -> Optional[List[str]]:
    if classes is None:
        return None
    if isinstance(classes, str):
        classes = classes.split(",")
    names = [str(c).strip() for c in classes if str(c).strip()]
    if not names:
        raise DataError("empty list of classes")
    return list(dict.fromkeys(names))  # drop duplicates, keep order


class MVTecDataset(Dataset):
    """Images of one or more classes of a data folder, as one dataset, in any layout of
    :mod:`rlr_fast.layouts` (named by its historical first layout, MVTec AD's).

    Args:
        root: the data folder.
        classes: class names (list or comma-separated string); None = every class found.
        split: "train" (the normal training images) or "test" (normal and anomalous test images).
        image_size: side S of the square images and masks.
        layout: a layout name of ``rlr_fast.layouts.LAYOUTS``, a reader, or None / "auto" (detected).

    Each item is a dict: ``image`` (3, S, S) normalised float, ``mask`` (1, S, S) float {0, 1}
    (the union of the image's masks), ``label`` int (0 normal, 1 defective), ``cls`` str,
    ``defect`` str ("good" for normal), ``path`` str. Every file is checked here, up front.
    """

    def __init__(self, root: PathLike, classes=None, split: str = "train", image_size: int = 256, layout=None):
        from .layouts import resolve_layout

        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        self.layout = resolve_layout(root, layout)
        self.root = self.layout.root
        self.split = split
        self.image_size = _check_size(image_size)
        available = self.layout.classes()
        wanted = _parse_classes(classes)
        if wanted is None:
            if not available:
                raise DataError(f"no classes found in {self.root} (read as the {self.layout.name} layout)")
            wanted = available
        unknown = [c for c in wanted if c not in available]
        if unknown:
            raise DataError(f"unknown class(es) {', '.join(unknown)} in {self.root}; "
                            f"available: {', '.join(available) or 'none'}")
        self.classes = wanted
        # samples: (image path, tuple of mask paths (their union; empty: none), label, class, defect)
        self.samples: List[tuple] = []
        for cls in wanted:
            self.samples.extend(self._index_class(cls))

    def _index_class(self, cls: str) -> List[tuple]:
        if self.split == "train":
            paths = self.layout.train(cls)
            if not paths:
                raise DataError(f"class {cls!r} has no training images in {self.root} "
                                f"(read as the {self.layout.name} layout)")
            return [(p, (), 0, cls, "good") for p in paths]
        out = [tuple(s) for s in self.layout.test(cls)]
        if not out:
            raise DataError(f"class {cls!r} has no test images in {self.root} (read as the {self.layout.name} layout)")
        return out

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        path, mask_paths, label, cls, defect = self.samples[index]
        s = self.image_size
        image = load_image(path, s)
        mask = torch.zeros(1, s, s)
        for mask_path in mask_paths:  # the union of the image's masks (one per defect in MVTec LOCO AD)
            mask = torch.maximum(mask, load_mask(mask_path, s, nonzero=self.layout.mask_nonzero))
        return {"image": image, "mask": mask, "label": label, "cls": cls, "defect": defect,
                "path": str(path)}


class FolderDataset(Dataset):
    """Plain images (no labels): a folder, an image file, or a list of folders and files.

    Folders are read non-recursively (image files directly inside, sorted). Items are dicts
    ``{"image": (3, S, S) normalised float, "path": str}``. Used for training on a folder of
    normal images and for ``rlr-fast predict``.
    """

    def __init__(self, paths_or_folder: Union[PathLike, Sequence[PathLike]], image_size: int = 256):
        self.image_size = _check_size(image_size)
        if isinstance(paths_or_folder, (str, os.PathLike)):
            paths_or_folder = [paths_or_folder]
        self.paths: List[Path] = []
        for entry in paths_or_folder:
            entry = Path(entry)
            if entry.is_dir():
                found = list_images(entry)
                if not found:
                    raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {entry}")
                self.paths.extend(found)
            elif entry.is_file():
                if not _is_image(entry):
                    raise DataError(f"not an image file (extension {entry.suffix!r}): {entry}")
                self.paths.append(entry)
            else:
                raise DataError(f"no such image file or folder: {entry}")
        if not self.paths:
            raise DataError("no images given")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        path = self.paths[index]
        return {"image": load_image(path, self.image_size), "path": str(path)}


class _ErrorAsItem(Dataset):
    """Runs inside DataLoader workers: a DataError becomes the item instead of being raised."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        try:
            return self.dataset[index]
        except DataError as exc:
            return exc


def _collate(items):
    errors = [item for item in items if isinstance(item, DataError)]
    return errors[0] if errors else default_collate(items)


class DataErrorLoader(DataLoader):
    """A DataLoader that raises a DataError of the data set as it is, with or without workers.

    A worker's exception reaches the main process re-created from its formatted traceback, so
    the one-line message would become a multi-line one (and differ with the number of images,
    which decides whether workers run). Here the worker returns the error as a batch and the
    main process raises it.
    """

    def __init__(self, dataset: Dataset, **kwargs):
        super().__init__(_ErrorAsItem(dataset), collate_fn=_collate, **kwargs)

    def __iter__(self):
        for batch in super().__iter__():
            if isinstance(batch, DataError):
                raise batch
            yield batch
