"""Few-shot data for ResAD: reference images, training sets of seen classes, per-class evaluation.

ResAD inspects a class from K normal reference images of it. ``reference_paths`` picks them from
the class's normal training images in any layout of :mod:`rlr_fast.layouts` (MVTec AD:
``<root>/<class>/train/good``; the first K by sorted name, or a seeded draw). Training on seen
classes uses, per class, its normal images and copies of them with a synthetic defect from the
demo data's generator (``SyntheticDefects``) for the second training stage; their backbone
features are cached once (``residual_cache``), and each batch's residuals are taken against K
references drawn anew from the class's normal images (``ReferencePoolCache``), as the official
training does.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .data import (IMAGENET_MEAN, IMAGENET_STD, DataError, FolderDataset, MVTecDataset, denormalize, list_images,
                   load_image)
from .errors import UsageError
from .features import extract_features


def reference_paths(folder, shots: int, seed: Optional[int] = None, what: str = "", paths=None) -> List[Path]:
    """K normal images of ``folder`` (or of the list ``paths``, ``folder`` then only naming them
    in errors): the first ``shots`` by sorted name, or, with ``seed``, a draw of ``shots``
    distinct images by ``numpy.random.default_rng(seed)`` (returned sorted). Fewer images than
    ``shots`` is a DataError naming the folder."""
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise UsageError(f"--shots must be a positive integer, got {shots!r}")
    paths = list_images(folder) if paths is None else sorted(paths)
    if len(paths) < shots:
        raise DataError(f"{what or 'the reference folder'} has {len(paths)} normal image(s) in {folder} "
                        f"but {shots} shots were asked for")
    if seed is None:
        return paths[:shots]
    chosen = np.random.default_rng(seed).choice(len(paths), size=shots, replace=False)
    return [paths[i] for i in sorted(chosen)]


def class_references(root, cls: str, shots: int, seed: Optional[int] = None, layout=None) -> List[Path]:
    """K of the normal training images of class ``cls`` of ``root`` (in ``layout``, detected when
    None; MVTec AD: its ``train/good``)."""
    from .layouts import resolve_layout

    reader = resolve_layout(root, layout)
    where = f"{reader.root} ({reader.name} layout, class {cls})"
    return reference_paths(where, shots, seed, what=f"class {cls!r}", paths=reader.train(cls))


def load_references(paths: Sequence[Path], image_size: int) -> torch.Tensor:
    """The reference images as one (K, 3, S, S) normalised batch."""
    return torch.stack([load_image(p, image_size) for p in paths])


_MEAN = np.asarray(IMAGENET_MEAN, dtype=np.float32)
_STD = np.asarray(IMAGENET_STD, dtype=np.float32)


class SyntheticDefects(Dataset):
    """Normal images, each with one synthetic defect (``rlr_fast.demo_data.add_defect``) and its
    mask. The same (paths, seed) always give the same images. ``others``: images of other
    classes that 'cut', 'perlin' and 'foreign' defects paste from (the item's own image, rotated,
    when empty). ``kinds``: the defect kinds to draw from, any of the benchmark generator's
    (``rlr_fast.demo_data.BENCHMARK_DEFECTS``; None: the demo's four)."""

    def __init__(self, paths: Sequence[Path], image_size: int, others: Sequence[Path] = (), seed: int = 0,
                 kinds: Optional[Sequence[str]] = None):
        from .demo_data import BENCHMARK_DEFECTS as DEFECTS

        self.paths, self.image_size, self.seed = list(paths), image_size, seed
        self.others = list(others)
        self.kinds = list(kinds) if kinds is not None else None
        unknown = [k for k in self.kinds or () if k not in DEFECTS]
        if unknown or self.kinds == []:
            raise UsageError(f"defect kinds must be some of {', '.join(DEFECTS)}, got {', '.join(self.kinds) or 'none'}")

    def __len__(self) -> int:
        return len(self.paths)

    def _rgb(self, path) -> np.ndarray:
        return denormalize(load_image(path, self.image_size)).astype(np.float32) / 255

    def __getitem__(self, index: int) -> dict:
        from .demo_data import add_defect

        rng = np.random.default_rng([self.seed, index])
        image = self._rgb(self.paths[index])
        others = [self._rgb(p) for p in self.others] or [np.ascontiguousarray(np.rot90(image))]
        kind = None if self.kinds is None else self.kinds[int(rng.integers(0, len(self.kinds)))]
        image, mask = add_defect(image, rng, others, kind=kind)
        x = torch.from_numpy(((np.clip(image, 0, 1) - _MEAN) / _STD).transpose(2, 0, 1).copy())
        return {"image": x.float(), "mask": torch.from_numpy(mask[None].astype(np.float32)),
                "path": str(self.paths[index])}


class _Backbone:
    """``extract_features``'s view of a few-shot model: its backbone levels as the features."""

    def __init__(self, model):
        self.model = model

    def features(self, images: torch.Tensor) -> List[torch.Tensor]:
        return self.model.converter.levels(images)


class ReferencePoolCache:
    """ResAD's training set, cached as backbone features, with the residuals computed per batch.

    Per seen class a pool of normal images; the training items are those images and synthetic-
    defect copies of them. For each batch and each class in it, K references are drawn from the
    class's pool (``torch``'s global generator, whose state the checkpoints keep, so a resumed run
    draws the same), leaving out the images the batch's items come from (unless fewer than K
    would remain), and each item's residual is taken against the tokens of those K images, as the
    official training draws K new references per batch. With ``fixed`` (class -> K pool
    positions) the references never change (and are not training items).

    ``batch(indices, device)`` gives the model's residual maps per level, then the (B, 1, S, S)
    masks: what ``ResADModel.loss`` takes, like a FeatureCache of residuals."""

    def __init__(self, model, feats: List[torch.Tensor], masks: torch.Tensor, items: torch.Tensor,
                 item_class: torch.Tensor, item_source: torch.Tensor, pools: List[torch.Tensor], shots: int,
                 fixed: Optional[List[torch.Tensor]] = None, seconds: float = 0.0):
        self.residual, self.backend = model.residual, model.config.backend
        self.feats, self.masks = feats, masks  # per level (N, C, H, W); (N, 1, S, S)
        self.items, self.item_class, self.item_source = items, item_class, item_source  # (I,) each
        self.pools, self.shots, self.fixed, self.seconds = pools, shots, fixed, seconds  # pools[c]: feature rows

    def __len__(self) -> int:
        return len(self.items)

    @property
    def nbytes(self) -> int:
        return sum(f.numel() * 4 for f in self.feats) + self.masks.numel() * 4

    def draw(self, cls: int, sources: torch.Tensor) -> torch.Tensor:
        """K positions in class ``cls``'s pool, none of ``sources`` where the pool allows."""
        if self.fixed is not None:
            return self.fixed[cls]
        allowed = torch.ones(len(self.pools[cls]), dtype=torch.bool)
        allowed[sources] = False
        candidates = allowed.nonzero().flatten()
        if len(candidates) < self.shots:
            candidates = torch.arange(len(self.pools[cls]))
        return candidates[torch.randperm(len(candidates))[:self.shots]].sort().values

    @torch.no_grad()
    def batch(self, indices, device="cpu") -> List[torch.Tensor]:
        from .models.resad import match_level

        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        rows, classes, sources = self.items[idx], self.item_class[idx], self.item_source[idx]
        out = [torch.empty(len(idx), *f.shape[1:], device=device) for f in self.feats]
        for cls in classes.unique().tolist():
            picked = (classes == cls).nonzero().flatten()
            refs = self.pools[cls][self.draw(cls, sources[picked])]
            for level, f in enumerate(self.feats):
                x = f[rows[picked]].to(device)
                bank = f[refs].to(device).flatten(2).transpose(1, 2).reshape(-1, f.shape[1])  # (K * H * W, C)
                matched, _ = match_level(x, bank, self.backend)
                out[level][picked.to(device)] = self.residual(x, matched)
        return out + [self.masks[rows].to(device)]


def residual_cache(model, root, classes=None, shots: Optional[int] = None, shot_seed: Optional[int] = None,
                   anomalies: bool = True, device="cpu", progress: bool = True, log=print, redraw: bool = True,
                   defect_kinds: Optional[Sequence[str]] = None, defect_copies: int = 1,
                   defect_share: Optional[float] = None, layout=None) -> ReferencePoolCache:
    """ResAD's training set over the seen classes of ``root`` (any layout of
    :mod:`rlr_fast.layouts`, detected when ``layout`` is None; their normal training images)
    (:class:`ReferencePoolCache`): per class, the backbone features of its normal training images
    (the pool) and, with ``anomalies``, of ``defect_copies`` copies of each with a synthetic defect
    of ``defect_kinds`` (any of ``rlr_fast.demo_data.BENCHMARK_DEFECTS``; None: the demo's four
    kinds of ``rlr_fast.demo_data.add_defect``), with masks. ``defect_share`` (in (0, 1), instead
    of ``defect_copies``): that share of each class's training items is defective, the copies
    made of its normal images in order, cycling (0.25: a defective copy of every third image).

    ``redraw`` (default): K references are drawn anew for every batch from the class's pool,
    other than the batch's own images. ``redraw=False``: K fixed references per class (the first K
    by name, or drawn with ``shot_seed``), left out of training."""
    from .layouts import detect, resolve_layout

    shots = shots or model.config.shots
    root = Path(root)
    if layout in (None, "auto") and detect(root) is None:  # raises DataError for a missing folder
        raise DataError(f"ResAD trains on the classes of a data folder (e.g. MVTec's <class>/train/good); "
                        f"{root} has none")
    if defect_copies < 1:
        raise UsageError(f"defect_copies must be at least 1, got {defect_copies}")
    if defect_share is not None and not 0 < defect_share < 1:
        raise UsageError(f"defect_share must be in (0, 1), got {defect_share}")
    reader = resolve_layout(root, layout)
    classes = MVTecDataset(root, classes=classes, split="train", image_size=model.image_size, layout=reader).classes
    backbone, size = _Backbone(model), model.image_size
    feats, masks, seconds = [], [], 0.0
    items, item_class, item_source, pools, fixed = [], [], [], [], []
    offset = 0

    def add(cache, with_masks: bool):
        nonlocal offset, seconds
        levels = [torch.as_tensor(level) for level in cache.levels]
        n = len(levels[0])
        feats.append(levels[:-1] if with_masks else levels)
        masks.append(levels[-1] if with_masks else torch.zeros(n, 1, size, size))
        seconds += cache.seconds
        offset += n
        return torch.arange(offset - n, offset)

    for ci, cls in enumerate(classes):
        pool_paths = sorted(reader.train(cls))
        where = f"{reader.root} ({reader.name} layout, class {cls})"
        refs = class_references(root, cls, shots, None if redraw else shot_seed, layout=reader)
        if redraw:
            train_at = list(range(len(pool_paths)))
            if len(pool_paths) < shots + 1:
                raise DataError(f"class {cls!r} has {len(pool_paths)} normal image(s) in {where}: "
                                f"ResAD needs more than the {shots} references to train on")
        else:
            train_at = [i for i, p in enumerate(pool_paths) if p not in refs]
            if not train_at:
                raise DataError(f"class {cls!r} has only its {shots} reference images in "
                                f"{where}: ResAD needs more normal images to train on")
            fixed.append(torch.tensor([pool_paths.index(p) for p in refs]))
        pool_rows = add(extract_features(backbone, FolderDataset(pool_paths, image_size=size), device=device,
                                         progress=progress, desc=f"features {cls}"), False)
        pools.append(pool_rows)
        at = torch.tensor(train_at)
        items.append(pool_rows[at]), item_class.append(torch.full((len(at),), ci)), item_source.append(at)
        if anomalies:
            others = [sorted(reader.train(c))[0] for c in classes if c != cls]
            if defect_share is None:
                sources = at.repeat(defect_copies)
            else:  # n_defective / (n_normal + n_defective) = share
                n_defective = max(1, round(len(at) * defect_share / (1 - defect_share)))
                sources = at[torch.arange(n_defective) % len(at)]
            defective = SyntheticDefects([pool_paths[i] for i in sources.tolist()], size, others, seed=ci,
                                         kinds=defect_kinds)
            rows = add(extract_features(backbone, defective, device=device, progress=progress,
                                        desc=f"defects {cls}", with_masks=True), True)
            items.append(rows), item_class.append(torch.full((len(rows),), ci))
            item_source.append(sources)
        log(f"{cls}: {len(pool_paths)} normal images, "
            + (f"{shots} references redrawn per batch" if redraw else f"{shots} fixed references, {len(train_at)} to train on")
            + (f", {len(rows)} with a synthetic defect" if anomalies else ""))
    levels = [torch.cat([f[i] for f in feats]) for i in range(len(feats[0]))]
    return ReferencePoolCache(model, levels, torch.cat(masks), torch.cat(items), torch.cat(item_class),
                              torch.cat(item_source), pools, shots, fixed if not redraw else None, seconds)


def evaluate_fewshot(model, root, shots: int, shot_seed: Optional[int] = None, classes=None, log=print,
                     layout=None, exact: Optional[bool] = None, **evaluate_kwargs) -> dict:
    """Per class of ``root`` (in ``layout``, detected when None): set the model's reference to K of
    the class's normal training images (MVTec AD: ``<class>/train/good``), then the usual
    evaluation of that class's test split. Same summary as ``evaluation.evaluate``, thresholds
    included (fitted over all the classes evaluated, as there). ``exact`` as there, decided once
    for all the classes' test images: the binned path runs every class's first pass (its
    reference set) before the second passes, so that the pixel threshold has one range."""
    from .binned import DEFAULT_BINS, PixelHistograms
    from .decisions import Threshold, Thresholds
    from .evaluation import binned_threshold, evaluate, fit_thresholds, score_pass, use_exact
    from .layouts import resolve_layout
    from .metrics import summarize

    reader = resolve_layout(root, layout)
    test = MVTecDataset(root, classes=classes, split="test", image_size=model.image_size, layout=reader)
    names = test.classes
    refs = {cls: class_references(root, cls, shots, shot_seed, layout=reader) for cls in names}  # checked up front
    if exact is None:
        exact = use_exact(len(test), model.image_size)
    first, curves = {}, None
    if not exact:  # first passes: per-image records and the maps' range, each class with its references
        for cls in names:
            model.set_reference(load_references(refs[cls], model.image_size))
            log(f"{cls}: {shots} reference images ({', '.join(p.name for p in refs[cls])})")
            data = MVTecDataset(root, classes=[cls], split="test", image_size=model.image_size, layout=reader)
            first.update(score_pass(model, data, **{k: v for k, v in evaluate_kwargs.items()
                                                           if k in ("batch_size", "device", "progress")}))
        curves = PixelHistograms(min(first[c].lo for c in names), max(first[c].hi for c in names),
                                 evaluate_kwargs.get("bins", DEFAULT_BINS), regions=False)
    per_class, types, images_per_s, records = {}, {}, [], {}
    for cls in names:
        model.set_reference(load_references(refs[cls], model.image_size))
        if exact:
            log(f"{cls}: {shots} reference images ({', '.join(p.name for p in refs[cls])})")
            summary = evaluate(model, root, classes=[cls], records=records, layout=reader, exact=True,
                               **evaluate_kwargs)
        else:
            summary = evaluate(model, root, classes=[cls], layout=reader, exact=False, first_pass={cls: first[cls]},
                               threshold_curves=curves, **evaluate_kwargs)
        per_class[cls] = summary["classes"][cls]
        types.update(summary.get("types", {}))
        images_per_s.append(summary["images_per_s"])
    summary = summarize(per_class)
    if types:
        summary["types"] = types
    if exact:
        summary["thresholds"] = fit_thresholds(list(records.values()))
    else:
        image = Threshold.fit([x for c in names for x in first[c].labels], [x for c in names for x in first[c].scores])
        summary["thresholds"] = Thresholds(image, binned_threshold(curves))
    summary["pixel_metrics"] = "exact" if exact else f"binned ({curves.bins} bins)"
    summary["images_per_s"] = float(np.mean(images_per_s))
    return summary
