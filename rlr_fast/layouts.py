"""Readers of the folder layouts that anomaly-detection data comes in.

Each reader lists, per class, the normal training images and the test samples (image, mask
files, label, defect type) of one layout; :class:`~rlr_fast.data.MVTecDataset` turns them into
the same items whatever the layout. The layout of a folder is detected (:func:`detect`) or
named (``--layout``, ``layout=``):

``mvtec`` (MVTec AD, and VisA converted to it)::

    <root>/<class>/train/good/*.png
    <root>/<class>/test/<defect or good>/*.png
    <root>/<class>/ground_truth/<defect>/<name>_mask.png

``folder`` (one class of a user's own images, as anomalib's Folder data module)::

    <root>/normal/*            normal images; a share (``split_ratio``, 0.2, drawn with ``seed``)
                               is held out for the test unless <root>/normal_test/ is given
    <root>/normal_test/*       optional: the normal test images
    <root>/<defect>/*          every other folder: anomalous images of that defect type
    <root>/mask/[<defect>/]*   optional: their masks, matched by file name (``<name>.*`` or
                               ``<name>_mask.*``); without it pixel metrics are n/a

``visa`` (VisA as published; the split is the authority)::

    <root>/split_csv/1cls.csv  columns object,split,label,image,mask (split train|test, label
                               normal|anomaly, paths relative to <root>)
    <root>/<object>/Data/Images/{Normal,Anomaly}/*.JPG, <root>/<object>/Data/Masks/Anomaly/*.png

``mvtec-ad2`` (MVTec AD 2)::

    <root>/<class>/train/good/*.png, <root>/<class>/validation/good/*.png (not used to train)
    <root>/<class>/test_public/{good,bad}/*.png
    <root>/<class>/test_public/ground_truth/bad/<name>_mask.png

``mvtec-loco`` (MVTec LOCO AD; metrics are also given per anomaly type)::

    <root>/<class>/train/good/*.png, <root>/<class>/validation/good/*.png (not used to train)
    <root>/<class>/test/{good,logical_anomalies,structural_anomalies}/*.png
    <root>/<class>/ground_truth/<type>/<name>/*.png   every mask of one image: their union

VisA's and LOCO's masks mark a defect by any non-zero value (``mask_nonzero``); MVTec's, MVTec
AD 2's and the folder layout's by a value of at least 128 (or non-zero in 0/1 masks). Every
problem (a missing folder or file, an unreadable CSV row) is a one-line
:class:`~rlr_fast.errors.DataError` naming it.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple

import numpy as np

from .errors import DataError

__all__ = ["Sample", "Layout", "MVTecLayout", "FolderLayout", "VisALayout", "MVTecAD2Layout", "MVTecLOCOLayout",
           "LAYOUTS", "detect", "resolve_layout"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")  # as rlr_fast.data, compared lower-case


class Sample(NamedTuple):
    """One test image: its mask files (their union is its mask; empty for a normal image or an
    image without a mask), label (0 normal, 1 anomalous), class and defect type ("good": normal)."""

    path: Path
    masks: Tuple[Path, ...]
    label: int
    cls: str
    defect: str


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def images_in(folder: Path) -> List[Path]:
    """Image files directly inside ``folder``, sorted by name ([] when it is not a folder)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and _is_image(p))


def find_mask(folder: Path, stem: str) -> Optional[Path]:
    """``<stem>_mask.<ext>`` (MVTec) or ``<stem>.<ext>`` in ``folder``, any image extension."""
    for name in (f"{stem}_mask", stem):
        for ext in IMAGE_EXTENSIONS:
            for cand in (folder / (name + ext), folder / (name + ext.upper())):
                if cand.is_file():
                    return cand
    return None


def _subfolders(folder: Path) -> List[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


class Layout:
    """A data layout's reader: ``classes()``, ``train(cls)`` (normal training images) and
    ``test(cls)`` (:class:`Sample` list). ``per_type_metrics``: metrics are also reported per
    anomaly type; ``mask_nonzero``: any non-zero mask value is a defect."""

    name = ""
    per_type_metrics = False
    mask_nonzero = False

    def __init__(self, root):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"data folder not found: {self.root}")

    @classmethod
    def detect(cls, root: Path) -> bool:
        raise NotImplementedError

    def classes(self) -> List[str]:
        raise NotImplementedError

    def train(self, cls: str) -> List[Path]:
        raise NotImplementedError

    def test(self, cls: str) -> List[Sample]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r})"


class MVTecLayout(Layout):
    """MVTec AD: ``<class>/train/good``, ``<class>/test/<defect>``, ``<class>/ground_truth/<defect>``."""

    name = "mvtec"

    @classmethod
    def detect(cls, root: Path) -> bool:
        return any((p / "train").is_dir() or (p / "test").is_dir() for p in _subfolders(root))

    def classes(self) -> List[str]:
        return [p.name for p in _subfolders(self.root) if (p / "train").is_dir() or (p / "test").is_dir()]

    def train(self, cls: str) -> List[Path]:
        return images_in(self.root / cls / "train" / "good")

    def test(self, cls: str) -> List[Sample]:
        cdir = self.root / cls
        test_dir = cdir / "test"
        if not test_dir.is_dir():
            raise DataError(f"class {cls!r} has no test folder: {test_dir}")
        out = []
        for ddir in _subfolders(test_dir):
            for p in images_in(ddir):
                if ddir.name == "good":
                    out.append(Sample(p, (), 0, cls, "good"))
                    continue
                mask = find_mask(cdir / "ground_truth" / ddir.name, p.stem)
                if mask is None:
                    expected = cdir / "ground_truth" / ddir.name / f"{p.stem}_mask.png"
                    raise DataError(f"test image {p} has no ground-truth mask; expected {expected}")
                out.append(Sample(p, (mask,), 1, cls, ddir.name))
        return out


class MVTecAD2Layout(Layout):
    """MVTec AD 2: ``train/good``, ``validation/good``, ``test_public/{good,bad}`` with masks in
    ``test_public/ground_truth/bad/<name>_mask.png`` (the private test sets have no ground truth
    and are not read)."""

    name = "mvtec-ad2"

    @classmethod
    def detect(cls, root: Path) -> bool:
        return any((p / "test_public").is_dir() for p in _subfolders(root))

    def classes(self) -> List[str]:
        return [p.name for p in _subfolders(self.root) if (p / "train").is_dir() or (p / "test_public").is_dir()]

    def train(self, cls: str) -> List[Path]:
        return images_in(self.root / cls / "train" / "good")

    def validation(self, cls: str) -> List[Path]:
        return images_in(self.root / cls / "validation" / "good")

    def test(self, cls: str) -> List[Sample]:
        test_dir = self.root / cls / "test_public"
        if not test_dir.is_dir():
            raise DataError(f"class {cls!r} has no public test folder: {test_dir}")
        out = [Sample(p, (), 0, cls, "good") for p in images_in(test_dir / "good")]
        for p in images_in(test_dir / "bad"):
            mask = find_mask(test_dir / "ground_truth" / "bad", p.stem)
            if mask is None:
                raise DataError(f"test image {p} has no ground-truth mask; expected "
                                f"{test_dir / 'ground_truth' / 'bad' / (p.stem + '_mask.png')}")
            out.append(Sample(p, (mask,), 1, cls, "bad"))
        return out


class MVTecLOCOLayout(Layout):
    """MVTec LOCO AD: ``test/{good,logical_anomalies,structural_anomalies}``; an anomalous image's
    ground truth is a folder ``ground_truth/<type>/<name>/`` of masks (one per defect), unioned."""

    name = "mvtec-loco"
    per_type_metrics = True
    mask_nonzero = True
    TYPES = ("logical_anomalies", "structural_anomalies")

    @classmethod
    def detect(cls, root: Path) -> bool:
        return any((p / "test" / t).is_dir() for p in _subfolders(root) for t in cls.TYPES)

    def classes(self) -> List[str]:
        return [p.name for p in _subfolders(self.root) if (p / "train").is_dir() or (p / "test").is_dir()]

    def train(self, cls: str) -> List[Path]:
        return images_in(self.root / cls / "train" / "good")

    def validation(self, cls: str) -> List[Path]:
        return images_in(self.root / cls / "validation" / "good")

    def test(self, cls: str) -> List[Sample]:
        cdir = self.root / cls
        if not (cdir / "test").is_dir():
            raise DataError(f"class {cls!r} has no test folder: {cdir / 'test'}")
        out = []
        for ddir in _subfolders(cdir / "test"):
            for p in images_in(ddir):
                if ddir.name == "good":
                    out.append(Sample(p, (), 0, cls, "good"))
                    continue
                folder = cdir / "ground_truth" / ddir.name / p.stem
                masks = tuple(images_in(folder))
                if not masks:
                    raise DataError(f"test image {p} has no ground-truth masks; expected a folder of them: {folder}")
                out.append(Sample(p, masks, 1, cls, ddir.name))
        return out


class VisALayout(Layout):
    """VisA as published: ``split_csv/1cls.csv`` (object, split, label, image, mask) decides
    which image is in which split; paths in it are relative to the root."""

    name = "visa"
    mask_nonzero = True
    CSV = Path("split_csv") / "1cls.csv"
    COLUMNS = ("object", "split", "label", "image", "mask")

    def __init__(self, root):
        super().__init__(root)
        self._rows: Optional[Dict[str, Dict[str, list]]] = None

    @classmethod
    def detect(cls, root: Path) -> bool:
        return (root / cls.CSV).is_file()

    def _read(self) -> Dict[str, Dict[str, list]]:
        """object -> {"train": [Path], "test": [Sample]}, every row checked."""
        if self._rows is not None:
            return self._rows
        path = self.root / self.CSV
        if not path.is_file():
            raise DataError(f"VisA split file not found: {path}")
        rows: Dict[str, Dict[str, list]] = {}
        try:
            with open(path, newline="") as fh:
                reader = csv.DictReader(fh)
                missing = [c for c in self.COLUMNS if c not in (reader.fieldnames or [])]
                if missing:
                    raise DataError(f"{path} lacks the column(s) {', '.join(missing)} (expected "
                                    f"{','.join(self.COLUMNS)})")
                for row in reader:
                    line = reader.line_num
                    obj, split, label, image, mask = ((row.get(c) or "").strip() for c in self.COLUMNS)
                    where = f"{path} line {line}"
                    if not obj or split not in ("train", "test") or label not in ("normal", "anomaly") or not image:
                        raise DataError(f"{where}: unreadable row (object {obj!r}, split {split!r}, label "
                                        f"{label!r}, image {image!r}); expected split train|test, label normal|anomaly")
                    image_path = self.root / image
                    if not image_path.is_file():
                        raise DataError(f"{where}: image file not found: {image_path}")
                    entry = rows.setdefault(obj, {"train": [], "test": []})
                    if split == "train":
                        if label != "normal":
                            raise DataError(f"{where}: an anomalous image in the train split: {image_path}")
                        entry["train"].append(image_path)
                    elif label == "normal":
                        entry["test"].append(Sample(image_path, (), 0, obj, "good"))
                    else:
                        mask_path = self.root / mask if mask else None
                        if mask_path is None or not mask_path.is_file():
                            raise DataError(f"{where}: mask file of {image_path} not found: "
                                            f"{mask_path or '(no mask given)'}")
                        entry["test"].append(Sample(image_path, (mask_path,), 1, obj, "anomaly"))
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise DataError(f"cannot read {path}: {e}") from None
        self._rows = rows
        return rows

    def classes(self) -> List[str]:
        return sorted(self._read())

    def train(self, cls: str) -> List[Path]:
        return sorted(self._read()[cls]["train"])

    def test(self, cls: str) -> List[Sample]:
        return sorted(self._read()[cls]["test"], key=lambda s: (s.label, str(s.path)))


class FolderLayout(Layout):
    """One class of a user's own images (as anomalib's Folder data module): a folder of normal
    images, one or more folders of anomalous ones (each a defect type), an optional mask folder
    matched by name and an optional folder of normal test images; without it, ``split_ratio`` of
    the normal images (drawn with ``seed``) is the normal part of the test split and never
    trained on. The class is named after the root folder."""

    name = "folder"

    def __init__(self, root, normal_dir: str = "normal", abnormal_dirs=None, mask_dir: Optional[str] = None,
                 normal_test_dir: Optional[str] = None, split_ratio: float = 0.2, seed: int = 0):
        super().__init__(root)
        if not 0.0 <= split_ratio < 1.0:
            raise DataError(f"split_ratio must be in [0, 1), got {split_ratio}")
        self.normal_dir = self.root / normal_dir
        if not self.normal_dir.is_dir():
            raise DataError(f"folder layout: no folder of normal images at {self.normal_dir}")
        if mask_dir is None:
            mask_dir = next((n for n in ("mask", "masks") if (self.root / n).is_dir()), None)
        self.mask_dir = self.root / mask_dir if mask_dir is not None else None
        if normal_test_dir is None and (self.root / "normal_test").is_dir():
            normal_test_dir = "normal_test"
        self.normal_test_dir = self.root / normal_test_dir if normal_test_dir is not None else None
        if abnormal_dirs is None:
            taken = {self.normal_dir, self.mask_dir, self.normal_test_dir}
            abnormal_dirs = [p.name for p in _subfolders(self.root) if p not in taken and images_in(p)]
        elif isinstance(abnormal_dirs, (str, os.PathLike)):
            abnormal_dirs = [abnormal_dirs]
        self.abnormal_dirs = [self.root / d for d in abnormal_dirs]
        for folder in [self.normal_test_dir, self.mask_dir, *self.abnormal_dirs]:
            if folder is not None and not folder.is_dir():
                raise DataError(f"folder layout: folder not found: {folder}")
        self.split_ratio, self.seed = split_ratio, seed

    @classmethod
    def detect(cls, root: Path) -> bool:
        return (root / "normal").is_dir()

    def classes(self) -> List[str]:
        return [self.root.resolve().name]

    def _normal_split(self) -> Tuple[List[Path], List[Path]]:
        normals = images_in(self.normal_dir)
        if not normals:
            raise DataError(f"folder layout: no normal images in {self.normal_dir}")
        if self.normal_test_dir is not None:
            return normals, images_in(self.normal_test_dir)
        n_test = int(round(self.split_ratio * len(normals)))
        n_test = min(n_test, len(normals) - 1)  # keep at least one image to train on
        held = set(np.random.default_rng(self.seed).permutation(len(normals))[:n_test].tolist())
        return ([p for i, p in enumerate(normals) if i not in held], [p for i, p in enumerate(normals) if i in held])

    def train(self, cls: str) -> List[Path]:
        return self._normal_split()[0]

    def _masks_of(self, folder: Path, image: Path) -> Tuple[Path, ...]:
        if self.mask_dir is None:
            return ()
        for where in (self.mask_dir / folder.name, self.mask_dir):
            mask = find_mask(where, image.stem)
            if mask is not None:
                return (mask,)
        raise DataError(f"anomalous image {image} has no mask in {self.mask_dir} (expected {image.stem}.png or "
                        f"{image.stem}_mask.png there or in {self.mask_dir / folder.name})")

    def test(self, cls: str) -> List[Sample]:
        out = [Sample(p, (), 0, cls, "good") for p in self._normal_split()[1]]
        for folder in self.abnormal_dirs:
            out.extend(Sample(p, self._masks_of(folder, p), 1, cls, folder.name) for p in images_in(folder))
        return out


LAYOUTS = {"mvtec": MVTecLayout, "folder": FolderLayout, "visa": VisALayout, "mvtec-ad2": MVTecAD2Layout,
           "mvtec-loco": MVTecLOCOLayout}
# Detection order: the most specific marks first (a VisA root or a folder root can hold folders
# that look like MVTec classes; AD 2 and LOCO classes have a train/ folder like MVTec's).
DETECTION_ORDER = ("visa", "folder", "mvtec-ad2", "mvtec-loco", "mvtec")


def detect(root) -> Optional[str]:
    """The name of the layout of ``root`` (None: no known layout, e.g. a plain folder of images)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    return next((name for name in DETECTION_ORDER if LAYOUTS[name].detect(root)), None)


def resolve_layout(root, layout=None) -> Layout:
    """The reader of ``root``: ``layout`` as a reader, a name of LAYOUTS, or None/"auto" (detected)."""
    if isinstance(layout, Layout):
        return layout
    if layout in (None, "auto"):
        layout = detect(root)
        if layout is None:
            raise DataError(f"no known data layout in {root}: expected MVTec AD class folders (<class>/train/good), "
                            f"a folder layout (normal/ and anomalous folders), VisA (split_csv/1cls.csv), "
                            f"MVTec AD 2 (<class>/test_public) or MVTec LOCO AD (<class>/test/logical_anomalies)")
    if layout not in LAYOUTS:
        raise DataError(f"unknown data layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    return LAYOUTS[layout](root)
