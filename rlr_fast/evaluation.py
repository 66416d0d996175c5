"""Evaluate a trained model on the test split of a data folder (any layout of
:mod:`rlr_fast.layouts`): metrics per class, and per anomaly type where the layout asks for it
(MVTec LOCO AD: logical and structural anomalies, each against the class's normal images).

Two ways to the pixel metrics (pixel AUROC, AUPRO, the F1-optimal pixel threshold):

- **exact** (:mod:`rlr_fast.metrics`): every map and mask is kept and all pixels sorted, about
  60 bytes per test pixel at the peak. The default up to ``EXACT_MAX_PIXELS`` test pixels, and
  on request (``exact=True``, ``rlr-fast test --exact-metrics``) at any size.
- **binned** (:mod:`rlr_fast.binned`): memory that does not grow with the test set. A first
  pass runs the model for the image scores and the exact range of the maps (per class, and over
  all classes for the threshold); a second pass runs it again and adds each map to fixed-size
  histograms over that range. The first pass costs a second inference of the test set; the
  alternative, a range from the training images, is not recorded in a run and would not cover
  the anomalous pixels, which score above the normal ones: exactly where the threshold and the
  AUROC's positives are, so out-of-range scores would share one bin.

Image-level metrics come from the per-image scores (a few numbers per image) and stay exact in
both. Overlays are chosen as the images arrive: only the few that will be drawn are kept. The
report page (``report``, a :class:`rlr_fast.report.ReportCollector`) is gathered the same way:
thumbnails and a few numbers per image, as the images are evaluated (the exact path's pass, the
binned path's second pass), and the PRO curve each path computes anyway.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from .binned import DEFAULT_BINS, PixelHistograms
from .data import DataErrorLoader, MVTecDataset
from .decisions import Threshold, Thresholds
from .metrics import (_area_to, class_metrics, image_auroc, image_f1max, pixel_aupro, pixel_auroc, pro_curve,
                      summarize)
from .progress import progress as progress_bar
from .timing import clock

# Up to this many test pixels (images x side^2), the exact metrics are the default: 16.8 M pixels,
# e.g. 256 images at 256 px or 64 at 512 px, about 1 GB at the exact computation's peak.
EXACT_MAX_PIXELS = 1 << 24


@dataclass
class ClassScores:
    """One class's per-image records, in test order: a few numbers per image, kept whole."""

    labels: List[int] = field(default_factory=list)
    scores: List[float] = field(default_factory=list)
    defects: List[str] = field(default_factory=list)
    paths: List[str] = field(default_factory=list)
    lo: float = math.inf  # the lowest and highest value of the class's maps
    hi: float = -math.inf


class OverlayPicker:
    """The images an overlay is drawn for, chosen as they arrive: the first ``limit`` in the order
    defective first, then test order (kept: at most ``limit`` defective and ``limit`` normal)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.kept = {0: [], 1: []}  # label -> [(index, image, mask, map, path, defect, score)]

    def offer(self, index: int, label: int, make) -> None:
        """``make()`` gives the entry; it is only called (and copied) when the image is kept."""
        group = self.kept[1 if label else 0]
        if len(group) < self.limit:
            group.append((index, *make()))

    def chosen(self) -> list:
        return (self.kept[1] + self.kept[0])[:self.limit]


class _Timer:
    def __init__(self):
        self.seconds, self.seen = 0.0, 0


def _batches(model, dataset, batch_size: int, device, desc: str, progress: bool, timer: _Timer):
    """Run the model over the dataset: (batch, maps (B, H, W) float32 numpy, scores (B,) numpy)."""
    loader = DataErrorLoader(dataset, batch_size=batch_size, shuffle=False,
                             num_workers=min(2, len(dataset) // batch_size))
    for batch in progress_bar(loader, desc=desc, unit="batch", enabled=progress):
        t0 = clock(device)
        out = model(batch["image"].to(device))
        timer.seconds += clock(device) - t0
        timer.seen += len(batch["label"])
        maps, scores = out.anomaly_map.float().cpu(), out.score.float().cpu()
        yield batch, maps[:, 0].numpy(), scores.numpy()


def _dataset(model, root, classes, layout) -> MVTecDataset:
    if isinstance(root, MVTecDataset):  # already indexed, e.g. to check the data before loading a model
        if root.split != "test" or root.image_size != model.image_size:
            raise ValueError(f"evaluate needs the test split at the model's size {model.image_size}, got the "
                             f"{root.split} split at {root.image_size}")
        return root
    return MVTecDataset(root, classes=classes, split="test", image_size=model.image_size, layout=layout)


def use_exact(n_images: int, image_size: int) -> bool:
    """Whether the exact metrics are the default for this many test images of this side."""
    return n_images * image_size * image_size <= EXACT_MAX_PIXELS


@torch.no_grad()
def score_pass(model, dataset: MVTecDataset, batch_size: int = 8, device="cpu", progress: bool = True,
               timer: Optional[_Timer] = None) -> Dict[str, ClassScores]:
    """The binned evaluation's first pass: per class, the per-image records and the maps' range."""
    model, timer = model.to(device).eval(), timer or _Timer()
    per: Dict[str, ClassScores] = defaultdict(ClassScores)
    for batch, maps, scores in _batches(model, dataset, batch_size, device, "test (score range)", progress, timer):
        for i, cls in enumerate(batch["cls"]):
            rec = per[cls]
            rec.labels.append(int(batch["label"][i]))
            rec.scores.append(float(scores[i]))
            rec.defects.append(batch["defect"][i])
            rec.paths.append(batch["path"][i])
            rec.lo, rec.hi = min(rec.lo, float(maps[i].min())), max(rec.hi, float(maps[i].max()))
    return dict(per)


@torch.no_grad()
def evaluate(model, root, classes=None, batch_size: int = 8, device="cpu", overlays_dir: Optional[Path] = None,
             max_overlays_per_class: int = 6, progress: bool = True, records: Optional[dict] = None,
             layout=None, exact: Optional[bool] = None, bins: int = DEFAULT_BINS,
             first_pass: Optional[Dict[str, ClassScores]] = None,
             threshold_curves: Optional[PixelHistograms] = None, report=None) -> dict:
    """Per-class image AUROC, pixel AUROC, pixel AUPRO and image F1-max, and their mean, and
    the F1-optimal image and pixel thresholds over all the classes evaluated ("thresholds", a
    :class:`~rlr_fast.decisions.Thresholds`: one model scores every class, so one decision rule).

    `root` is a data folder (in `layout`, detected when None) or an MVTecDataset of its test
    split. When the layout reports metrics per anomaly type (MVTec LOCO AD) the summary has
    "types": class -> anomaly type -> the metrics of that type's images and the class's normal ones.

    ``exact``: the exact pixel metrics (True), the binned ones in bounded memory with ``bins``
    bins (False), or the exact ones up to ``EXACT_MAX_PIXELS`` test pixels (None). The summary's
    "pixel_metrics" says which ("exact" or "binned (N bins)"). For the binned path, ``first_pass`` (from
    :func:`score_pass`) saves running it again, and ``threshold_curves``, when given, receives
    the pixels for the pixel threshold over its own range (to fit one over several evaluations).

    Writes up to `max_overlays_per_class` overlays per class (defective images first) to
    `overlays_dir`. The summary also records the inference speed ("images_per_s"). ``records``,
    if given, receives per class the raw "labels", "scores", "defects", "masks" and "maps" (the
    exact path only). ``report``, a :class:`rlr_fast.report.ReportCollector`, receives what the
    report page shows of each image (thumbnails, score, label) and each class's PRO curve, in
    either path, keeping nothing of full size."""
    model = model.to(device).eval()
    dataset = _dataset(model, root, classes, layout)
    if exact is None:
        exact = use_exact(len(dataset), model.image_size)
    if records is not None and not exact:
        raise ValueError("records (every raw map) are only kept by the exact evaluation")
    timer = _Timer()
    common = dict(batch_size=batch_size, device=device, progress=progress, timer=timer)
    if exact:
        summary, pickers, vmax = _exact(model, dataset, max_overlays_per_class, records, report, **common)
    else:
        summary, pickers, vmax = _binned(model, dataset, max_overlays_per_class, bins, first_pass,
                                         threshold_curves, report, **common)
    if overlays_dir is not None:
        for cls in dataset.classes:
            _overlays(Path(overlays_dir) / cls, pickers[cls].chosen(), vmax[cls])
    summary["pixel_metrics"] = "exact" if exact else f"binned ({bins} bins)"
    summary["images_per_s"] = timer.seen / timer.seconds if timer.seconds else float("nan")
    return summary


def _exact(model, dataset, limit, records, report, **common):
    """Every map and mask kept, metrics by metrics.class_metrics (one pass)."""
    per = defaultdict(lambda: {"labels": [], "scores": [], "masks": [], "maps": [], "defects": []})
    pickers = defaultdict(lambda: OverlayPicker(limit))
    for batch, maps, scores in _batches(model, dataset, common["batch_size"], common["device"], "test",
                                        common["progress"], common["timer"]):
        for i, cls in enumerate(batch["cls"]):
            rec, label = per[cls], int(batch["label"][i])
            mask, amap = batch["mask"][i, 0].numpy() > 0.5, maps[i]
            pickers[cls].offer(len(rec["labels"]), label, lambda: (
                batch["image"][i].clone(), mask, amap, batch["path"][i], batch["defect"][i], float(scores[i])))
            rec["labels"].append(label)
            rec["scores"].append(float(scores[i]))
            rec["masks"].append(mask)
            rec["maps"].append(amap)
            rec["defects"].append(batch["defect"][i])
            if report is not None:
                report.add(cls, batch["image"][i], mask, amap, float(scores[i]), label, batch["defect"][i],
                           batch["path"][i])
    if report is None:
        results = {cls: class_metrics(per[cls]["labels"], per[cls]["scores"], per[cls]["masks"], per[cls]["maps"])
                   for cls in dataset.classes}
    else:
        results = {cls: _exact_metrics_with_curve(cls, per[cls], report) for cls in dataset.classes}
    summary = summarize(results)
    if dataset.layout.per_type_metrics:
        summary["types"] = {cls: type_metrics(per[cls]) for cls in dataset.classes}
    if records is not None:
        records.update({cls: per[cls] for cls in dataset.classes})
    summary["thresholds"] = fit_thresholds([per[cls] for cls in dataset.classes])
    vmax = {cls: max(float(m.max()) for m in per[cls]["maps"]) for cls in dataset.classes}  # one colour scale per class
    return summary, pickers, vmax


def _binned(model, dataset, limit, bins, first_pass, threshold_curves, report, **common):
    """Two passes: the per-image records and the maps' range, then the maps into histograms."""
    first = first_pass if first_pass is not None else score_pass(model, dataset, **common)
    per_type = dataset.layout.per_type_metrics
    curves = {}  # (class, anomaly type or None) -> PixelHistograms over the class's range
    if threshold_curves is None:
        threshold_curves = PixelHistograms(min(first[c].lo for c in dataset.classes),
                                           max(first[c].hi for c in dataset.classes), bins, regions=False)
    pickers = {cls: OverlayPicker(limit) for cls in dataset.classes}
    seen = defaultdict(int)
    for batch, maps, scores in _batches(model, dataset, common["batch_size"], common["device"], "test",
                                        common["progress"], common["timer"]):
        for i, cls in enumerate(batch["cls"]):
            rec, index, label = first[cls], seen[cls], int(batch["label"][i])
            if index >= len(rec.paths) or rec.paths[index] != batch["path"][i]:
                raise RuntimeError(f"the test images changed between the two passes at {batch['path'][i]}")
            seen[cls] += 1
            defect = batch["defect"][i]
            key = (cls, defect if per_type else None)
            if key not in curves:
                curves[key] = PixelHistograms(rec.lo, rec.hi, bins)
            mask = batch["mask"][i, 0].numpy() > 0.5
            curves[key].add(mask, maps[i])
            threshold_curves.add(mask, maps[i])
            pickers[cls].offer(index, label, lambda: (
                batch["image"][i].clone(), mask.copy(), maps[i].copy(), batch["path"][i], defect, float(scores[i])))
            if report is not None:
                report.add(cls, batch["image"][i], mask, maps[i], float(scores[i]), label, defect, batch["path"][i])
    results, types = {}, {}
    for cls in dataset.classes:
        rec = first[cls]
        parts = [h for (c, _), h in curves.items() if c == cls]
        total = parts[0].copy()
        for h in parts[1:]:
            total += h
        results[cls] = _binned_metrics(rec.labels, rec.scores, total)
        if report is not None:  # the binned PRO curve the AUPRO above integrates (undefined: NaN there)
            report.set_pro(cls, total.pro_curve() if not math.isnan(results[cls]["pixel_aupro"]) else None)
        if per_type:
            types[cls] = {}
            for kind in sorted(set(rec.defects) - {"good"}):
                pixels = curves[(cls, kind)].copy()
                if (cls, "good") in curves:
                    pixels += curves[(cls, "good")]
                keep = [i for i, d in enumerate(rec.defects) if d in ("good", kind)]
                types[cls][kind] = _binned_metrics([rec.labels[i] for i in keep], [rec.scores[i] for i in keep], pixels)
    summary = summarize(results)
    if per_type:
        summary["types"] = types
    image = Threshold.fit([x for c in dataset.classes for x in first[c].labels],
                          [x for c in dataset.classes for x in first[c].scores])
    summary["thresholds"] = Thresholds(image, binned_threshold(threshold_curves))
    return summary, pickers, {cls: first[cls].hi for cls in dataset.classes}


def _exact_metrics_with_curve(cls: str, rec: dict, report) -> Dict[str, float]:
    """``metrics.class_metrics`` of one class's raw records, its PRO curve computed once and
    handed to the report too."""
    masks, maps = np.stack(rec["masks"]), np.stack(rec["maps"])  # (N, H, W)
    curve = pro_curve(masks, maps)
    report.set_pro(cls, curve)
    return {"image_auroc": image_auroc(rec["labels"], rec["scores"]), "pixel_auroc": pixel_auroc(masks, maps),
            # as metrics.pixel_aupro (max_fpr 0.3); without a curve, that one's NaN and warning
            "pixel_aupro": _area_to(*curve, 0.3) if curve is not None else pixel_aupro(masks, maps),
            "image_f1max": image_f1max(rec["labels"], rec["scores"])}


def binned_threshold(curves: PixelHistograms) -> Threshold:
    """The F1-optimal pixel threshold from histograms, with the range as min-max statistics."""
    return Threshold(curves.f1_threshold()[1], curves.lo, curves.hi)


def _binned_metrics(labels, scores, pixels: PixelHistograms) -> Dict[str, float]:
    return {"image_auroc": image_auroc(labels, scores), "pixel_auroc": pixels.auroc(),
            "pixel_aupro": pixels.aupro(), "image_f1max": image_f1max(labels, scores)}


def type_metrics(rec: dict) -> dict:
    """Per anomaly type of one class's raw records: the metrics of that type's images together
    with the class's normal ("good") images."""
    defects = rec["defects"]
    out = {}
    for kind in sorted(set(defects) - {"good"}):
        keep = [i for i, d in enumerate(defects) if d in ("good", kind)]
        out[kind] = class_metrics(*([rec[k][i] for i in keep] for k in ("labels", "scores", "masks", "maps")))
    return out


def fit_thresholds(records) -> Thresholds:
    """The F1-optimal image and pixel thresholds over the raw records of several classes."""
    return Thresholds.fit(
        [x for r in records for x in r["labels"]], [x for r in records for x in r["scores"]],
        np.stack([m for r in records for m in r["masks"]]), np.stack([m for r in records for m in r["maps"]]))


def _overlays(folder: Path, chosen: list, vmax: float) -> None:
    from .viz import save_overlay

    for _, image, mask, amap, path, defect, score in chosen:
        save_overlay(folder / f"{defect}_{Path(path).stem}.png", image, mask, amap,
                     title=f"{defect} {Path(path).name}  score {score:.3f}", vmax=vmax)
