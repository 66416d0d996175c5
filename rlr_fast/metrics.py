"""Anomaly detection metrics: image AUROC, pixel AUROC, pixel AUPRO, image F1-max.

All take numpy arrays (or tensors) and return fractions in [0, 1]; a metric that is undefined
for the data (one label only) is NaN, with a warning.
"""
from __future__ import annotations

import math
import warnings
from typing import Dict

import numpy as np
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score

METRICS = ("image_auroc", "pixel_auroc", "pixel_aupro", "image_f1max")


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _both_labels(labels: np.ndarray, what: str) -> bool:
    if labels.size == 0 or labels.min() == labels.max():
        warnings.warn(f"{what} is undefined with a single label: NaN", RuntimeWarning, stacklevel=3)
        return False
    return True


def image_auroc(labels, scores) -> float:
    labels, scores = _np(labels).ravel().astype(int), _np(scores).ravel().astype(np.float64)
    return float(roc_auc_score(labels, scores)) if _both_labels(labels, "image AUROC") else math.nan


def pixel_auroc(masks, maps) -> float:
    masks, maps = _np(masks).ravel() > 0.5, _np(maps).ravel().astype(np.float64)
    return float(roc_auc_score(masks, maps)) if _both_labels(masks, "pixel AUROC") else math.nan


def image_f1max(labels, scores) -> float:
    labels = _np(labels).ravel()
    if not _both_labels(labels, "image F1-max"):
        return math.nan
    return f1_max_threshold(labels, scores)[0]


def f1_max_threshold(labels, scores):
    """(F1-max, the lowest score reaching it): the F1-optimal threshold, as anomalib's adaptive
    threshold, for the decision ``score >= threshold``. With no positive label, F1 is undefined
    and the threshold is the highest score (anomalib's choice: every seen sample stays normal)."""
    labels, scores = _np(labels).ravel() > 0.5, _np(scores).ravel().astype(np.float64)
    if not labels.any():
        warnings.warn("no anomalous sample: the threshold is the highest score", RuntimeWarning, stacklevel=2)
        return math.nan, float(scores.max())
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best = int(np.argmax(f1[:-1]))  # the last point (recall 0) has no threshold
    return float(f1[best]), float(thresholds[best])


def pro_curve(masks, maps):
    """Exact per-region-overlap curve: (fpr, pro) at every distinct threshold, highest first.

    PRO(t) = mean over ground-truth regions (8-connected components of each mask) of the share
    of the region scoring >= t; FPR(t) = share of normal pixels scoring >= t. Sorting all pixels
    by score once makes both cumulative sums: an anomalous pixel of region r adds
    1 / (R |r|) to PRO, a normal pixel adds 1 / N_normal to FPR.
    """
    masks, maps = _np(masks) > 0.5, _np(maps).astype(np.float64)
    masks = masks.reshape(-1, *masks.shape[-2:])
    maps = maps.reshape(-1, *maps.shape[-2:])
    weights = np.zeros(masks.shape, dtype=np.float64)
    regions = []
    for i, m in enumerate(masks):
        labelled, count = ndimage.label(m, structure=np.ones((3, 3)))
        if count:
            sizes = np.bincount(labelled.ravel())
            regions.append(count)
            weights[i] = np.where(labelled > 0, 1.0 / sizes[labelled], 0.0)
    n_regions, n_normal = sum(regions), int((~masks).sum())
    if n_regions == 0 or n_normal == 0:
        return None
    scores = maps.ravel()
    order = np.argsort(-scores, kind="stable")
    s = scores[order]
    pro = np.cumsum(weights.ravel()[order]) / n_regions
    fpr = np.cumsum(~masks.ravel()[order]) / n_normal
    last = np.r_[s[1:] != s[:-1], True]  # the last pixel of each group of tied scores
    return np.r_[0.0, fpr[last]], np.r_[0.0, pro[last]]


def pixel_aupro(masks, maps, max_fpr: float = 0.3) -> float:
    """Area under the PRO curve up to FPR `max_fpr`, divided by `max_fpr` (1.0 is perfect)."""
    curve = pro_curve(masks, maps)
    if curve is None:
        warnings.warn("pixel AUPRO needs both defect regions and normal pixels: NaN", RuntimeWarning, stacklevel=2)
        return math.nan
    return _area_to(*curve, max_fpr)


def _area_to(fpr: np.ndarray, pro: np.ndarray, max_fpr: float) -> float:
    """Normalised area under a (fpr, pro) curve, fpr ascending from 0, up to `max_fpr`."""
    cut = np.searchsorted(fpr, max_fpr, side="right")  # points with fpr <= max_fpr
    x, y = fpr[:cut], pro[:cut]
    if cut < len(fpr) and x[-1] < max_fpr:  # interpolate the point at exactly max_fpr
        x0, x1, y0, y1 = fpr[cut - 1], fpr[cut], pro[cut - 1], pro[cut]
        x = np.r_[x, max_fpr]
        y = np.r_[y, y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)]
    return float(np.trapezoid(y, x) / max_fpr)


def class_metrics(labels, scores, masks, maps) -> Dict[str, float]:
    return {"image_auroc": image_auroc(labels, scores), "pixel_auroc": pixel_auroc(masks, maps),
            "pixel_aupro": pixel_aupro(masks, maps), "image_f1max": image_f1max(labels, scores)}


def summarize(per_class: Dict[str, Dict[str, float]]) -> dict:
    """{"classes": per_class, "mean": mean of each metric over classes (NaNs ignored)}."""
    mean = {}
    for m in METRICS:
        vals = [v[m] for v in per_class.values() if not math.isnan(v[m])]
        mean[m] = float(np.mean(vals)) if vals else math.nan
    return {"classes": per_class, "mean": mean}


def format_table(summary: dict) -> str:
    """Aligned text table, percentages with one decimal, a mean row (and, under each class, a row
    per anomaly type when the summary has "types")."""
    heads = ["class", "image AUROC", "pixel AUROC", "pixel AUPRO", "image F1-max"]
    cell = lambda v, m: f"{100 * v[m]:.1f}" if not math.isnan(v[m]) else "n/a"
    rows = []
    for name, v in summary["classes"].items():
        rows.append([name] + [cell(v, m) for m in METRICS])
        # per anomaly type (MVTec LOCO AD), under its class and not in the mean
        rows += [[f"  {kind}"] + [cell(t, m) for m in METRICS] for kind, t in summary.get("types", {}).get(name, {}).items()]
    rows.append(["mean"] + [f"{100 * summary['mean'][m]:.1f}" if not math.isnan(summary["mean"][m]) else "n/a"
                            for m in METRICS])
    widths = [max(len(r[i]) for r in rows + [heads]) for i in range(len(heads))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    rule = "-" * len(line(heads))
    return "\n".join([line(heads), rule] + [line(r) for r in rows[:-1]] + [rule, line(rows[-1])])
