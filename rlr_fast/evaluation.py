"""Evaluate a trained model on the test split of a data folder (any layout of
:mod:`rlr_fast.layouts`): metrics per class, and per anomaly type where the layout asks for it
(MVTec LOCO AD: logical and structural anomalies, each against the class's normal images)."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .data import DataErrorLoader, MVTecDataset
from .decisions import Thresholds
from .metrics import class_metrics, summarize
from .progress import progress as progress_bar
from .timing import clock


@torch.no_grad()
def evaluate(model, root, classes=None, batch_size: int = 8, device="cpu", overlays_dir: Optional[Path] = None,
             max_overlays_per_class: int = 6, progress: bool = True, records: Optional[dict] = None,
             layout=None) -> dict:
    """Per-class image AUROC, pixel AUROC, pixel AUPRO and image F1-max, and their mean, and
    the F1-optimal image and pixel thresholds over all the classes evaluated ("thresholds", a
    :class:`~rlr_fast.decisions.Thresholds`: one model scores every class, so one decision rule).

    `root` is a data folder (in `layout`, detected when None) or an MVTecDataset of its test
    split. When the layout reports metrics per anomaly type (MVTec LOCO AD) the summary has
    "types": class -> anomaly type -> the metrics of that type's images and the class's normal ones.

    Writes up to `max_overlays_per_class` overlays per class (defective images first) to
    `overlays_dir`. The summary also records the inference speed ("images_per_s"). ``records``,
    if given, receives per class the raw "labels", "scores", "masks" and "maps"."""
    model = model.to(device).eval()
    if isinstance(root, MVTecDataset):  # already indexed, e.g. to check the data before loading a model
        dataset = root
        if dataset.split != "test" or dataset.image_size != model.image_size:
            raise ValueError(f"evaluate needs the test split at the model's size {model.image_size}, got the "
                             f"{dataset.split} split at {dataset.image_size}")
    else:
        dataset = MVTecDataset(root, classes=classes, split="test", image_size=model.image_size, layout=layout)
    loader = DataErrorLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=min(2, len(dataset) // batch_size))
    per = defaultdict(lambda: {"labels": [], "scores": [], "masks": [], "maps": [], "items": []})
    seconds, seen = 0.0, 0
    for batch in progress_bar(loader, desc="test", unit="batch", enabled=progress):
        t0 = clock(device)
        out = model(batch["image"].to(device))
        seconds += clock(device) - t0
        seen += len(batch["label"])
        maps, scores = out.anomaly_map.float().cpu(), out.score.float().cpu()
        for i, cls in enumerate(batch["cls"]):
            rec = per[cls]
            rec["labels"].append(int(batch["label"][i]))
            rec["scores"].append(float(scores[i]))
            rec["masks"].append(batch["mask"][i, 0].numpy() > 0.5)
            rec["maps"].append(maps[i, 0].numpy())
            rec["items"].append((batch["image"][i], batch["path"][i], batch["defect"][i]))
    results = {}
    for cls in dataset.classes:
        rec = per[cls]
        results[cls] = class_metrics(rec["labels"], rec["scores"], rec["masks"], rec["maps"])
        if overlays_dir is not None:
            _overlays(Path(overlays_dir) / cls, rec, max_overlays_per_class)
    summary = summarize(results)
    if dataset.layout.per_type_metrics:
        summary["types"] = {cls: type_metrics(per[cls]) for cls in dataset.classes}
    if records is not None:
        records.update({cls: per[cls] for cls in dataset.classes})
    summary["thresholds"] = fit_thresholds([per[cls] for cls in dataset.classes])
    summary["images_per_s"] = seen / seconds if seconds else float("nan")
    return summary


def type_metrics(rec: dict) -> dict:
    """Per anomaly type of one class's raw records: the metrics of that type's images together
    with the class's normal ("good") images."""
    defects = [item[2] for item in rec["items"]]
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


def _overlays(folder: Path, rec: dict, limit: int) -> None:
    from .viz import save_overlay

    order = sorted(range(len(rec["labels"])), key=lambda i: -rec["labels"][i])[:limit]
    vmax = max(float(m.max()) for m in rec["maps"])  # one colour scale per class
    for i in order:
        image, path, defect = rec["items"][i]
        save_overlay(folder / f"{defect}_{Path(path).stem}.png", image, rec["masks"][i], rec["maps"][i],
                     title=f"{defect} {Path(path).name}  score {rec['scores'][i]:.3f}", vmax=vmax)
