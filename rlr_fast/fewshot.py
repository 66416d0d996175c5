"""Few-shot data for ResAD: reference images, training sets of seen classes, per-class evaluation.

ResAD inspects a class from K normal reference images of it. ``reference_paths`` picks them from
``<root>/<class>/train/good`` (the first K by sorted name, or a seeded draw). Training on seen
classes uses, per class, its K references (for the residuals) and its other normal images, each
also with one synthetic defect from the demo data's generator (``SyntheticDefects``) for the
second training stage; every image's residuals against its class's references are computed
once and cached (``residual_cache``), as RLR caches its features.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .data import (IMAGENET_MEAN, IMAGENET_STD, DataError, FolderDataset, MVTecDataset, denormalize,
                   discover_classes, list_images, load_image)
from .errors import UsageError
from .features import FeatureCache, extract_features


def reference_paths(folder, shots: int, seed: Optional[int] = None, what: str = "") -> List[Path]:
    """K normal images of ``folder``: the first ``shots`` by sorted name, or, with ``seed``, a
    draw of ``shots`` distinct images by ``numpy.random.default_rng(seed)`` (returned sorted).
    Fewer images than ``shots`` is a DataError naming the folder."""
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise UsageError(f"--shots must be a positive integer, got {shots!r}")
    paths = list_images(folder)
    if len(paths) < shots:
        raise DataError(f"{what or 'the reference folder'} has {len(paths)} normal image(s) in {folder} "
                        f"but {shots} shots were asked for")
    if seed is None:
        return paths[:shots]
    chosen = np.random.default_rng(seed).choice(len(paths), size=shots, replace=False)
    return [paths[i] for i in sorted(chosen)]


def class_references(root, cls: str, shots: int, seed: Optional[int] = None) -> List[Path]:
    return reference_paths(Path(root) / cls / "train" / "good", shots, seed, what=f"class {cls!r}")


def load_references(paths: Sequence[Path], image_size: int) -> torch.Tensor:
    """The reference images as one (K, 3, S, S) normalised batch."""
    return torch.stack([load_image(p, image_size) for p in paths])


_MEAN = np.asarray(IMAGENET_MEAN, dtype=np.float32)
_STD = np.asarray(IMAGENET_STD, dtype=np.float32)


class SyntheticDefects(Dataset):
    """Normal images, each with one synthetic defect (``rlr_fast.demo_data.add_defect``) and its
    mask. The same (paths, seed) always give the same images. ``others``: images of other
    classes that a 'cut' defect pastes from (the item's own image, rotated, when empty)."""

    def __init__(self, paths: Sequence[Path], image_size: int, others: Sequence[Path] = (), seed: int = 0):
        self.paths, self.image_size, self.seed = list(paths), image_size, seed
        self.others = list(others)

    def __len__(self) -> int:
        return len(self.paths)

    def _rgb(self, path) -> np.ndarray:
        return denormalize(load_image(path, self.image_size)).astype(np.float32) / 255

    def __getitem__(self, index: int) -> dict:
        from .demo_data import add_defect

        rng = np.random.default_rng([self.seed, index])
        image = self._rgb(self.paths[index])
        others = [self._rgb(p) for p in self.others] or [np.ascontiguousarray(np.rot90(image))]
        image, mask = add_defect(image, rng, others)
        x = torch.from_numpy(((np.clip(image, 0, 1) - _MEAN) / _STD).transpose(2, 0, 1).copy())
        return {"image": x.float(), "mask": torch.from_numpy(mask[None].astype(np.float32)),
                "path": str(self.paths[index])}


class _WithMask(Dataset):
    """A dataset of normal images with an all-zero mask."""

    def __init__(self, dataset: Dataset, image_size: int):
        self.dataset, self.size = dataset, image_size

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return {**self.dataset[index], "mask": torch.zeros(1, self.size, self.size)}


def residual_cache(model, root, classes=None, shots: Optional[int] = None, shot_seed: Optional[int] = None,
                   anomalies: bool = True, device="cpu", progress: bool = True, log=print) -> FeatureCache:
    """ResAD's training cache over the seen classes of an MVTec-style ``root``: per class, the
    residuals of its normal training images (its K references left out) against those references,
    and, with ``anomalies``, of the same images with a synthetic defect each, with their masks.
    Levels: the model's residual maps, then the (N, 1, S, S) masks."""
    shots = shots or model.config.shots
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    if not discover_classes(root):
        raise DataError(f"ResAD trains on the classes of an MVTec-style folder (<class>/train/good); "
                        f"{root} has none")
    classes = MVTecDataset(root, classes=classes, split="train", image_size=model.image_size).classes
    caches = []
    for ci, cls in enumerate(classes):
        refs = class_references(root, cls, shots, shot_seed)
        rest = [p for p in list_images(root / cls / "train" / "good") if p not in refs]
        if not rest:
            raise DataError(f"class {cls!r} has only its {shots} reference images in {root / cls / 'train' / 'good'}: "
                            f"ResAD needs more normal images to train on")
        model.set_reference(load_references(refs, model.image_size))
        parts = [_WithMask(FolderDataset(rest, image_size=model.image_size), model.image_size)]
        if anomalies:
            others = [list_images(root / c / "train" / "good")[0] for c in classes if c != cls]
            parts.append(SyntheticDefects(rest, model.image_size, others, seed=ci))
        for part in parts:
            caches.append(extract_features(model, part, device=device, progress=progress, desc=f"residuals {cls}",
                                           with_masks=True))
        log(f"{cls}: {len(refs)} references, {len(rest)} normal training images"
            + (f" and {len(rest)} with a synthetic defect" if anomalies else ""))
    levels = [torch.cat([torch.as_tensor(c.levels[i]) for c in caches]) for i in range(len(caches[0].levels))]
    return FeatureCache(levels, sum(c.seconds for c in caches))


def evaluate_fewshot(model, root, shots: int, shot_seed: Optional[int] = None, classes=None, log=print,
                     **evaluate_kwargs) -> dict:
    """Per class of ``root``: set the model's reference to K images of ``<class>/train/good``, then
    the usual evaluation of that class's test split. Same summary as ``evaluation.evaluate``,
    thresholds included (fitted over all the classes evaluated, as there)."""
    from .evaluation import evaluate, fit_thresholds
    from .metrics import summarize

    names = MVTecDataset(root, classes=classes, split="test", image_size=model.image_size).classes
    refs = {cls: class_references(root, cls, shots, shot_seed) for cls in names}  # all checked up front
    per_class, images_per_s, records = {}, [], {}
    for cls in names:
        model.set_reference(load_references(refs[cls], model.image_size))
        log(f"{cls}: {shots} reference images ({', '.join(p.name for p in refs[cls])})")
        summary = evaluate(model, root, classes=[cls], records=records, **evaluate_kwargs)
        per_class[cls] = summary["classes"][cls]
        images_per_s.append(summary["images_per_s"])
    summary = summarize(per_class)
    summary["thresholds"] = fit_thresholds(list(records.values()))
    summary["images_per_s"] = float(np.mean(images_per_s))
    return summary
