"""Pixel metrics from fixed-size histograms: memory that does not grow with the test set.

The exact pixel metrics (:mod:`rlr_fast.metrics`) sort every pixel of every map: tens of bytes
per test pixel, gigabytes for a full benchmark. Here the score range ``[lo, hi]`` is known in
advance (``evaluation`` takes it from a first pass over the test set) and cut into ``bins`` equal
bins; each (mask, map) pair only adds counts to three arrays of ``bins`` numbers:

- ``normal[b]``: normal pixels whose score falls in bin b (FPR of every curve),
- ``anomalous[b]``: anomalous pixels in bin b (TPR of the ROC curve, recall and precision),
- ``pro[b]``: the sum, over the anomalous pixels in bin b, of ``1 / |region|`` (the size of the
  pixel's 8-connected ground-truth region). Summing a per-region histogram of scores, each
  divided by its region's size, gives exactly this array, so the mean per-region overlap at the
  threshold of bin b is ``sum(pro[b:]) / regions``: no per-region storage is needed.

Each curve then has one point per bin edge instead of one per distinct score: pixel AUROC (ties
inside a bin count half, as tied scores do), AUPRO to FPR 0.3 with the same integration as the
exact one, and the F1-optimal pixel threshold as the lower edge of the best bin (within one bin
of the exact one when the F1 curve is smooth at the scale of a bin, as it is with many pixels per bin).
"""
from __future__ import annotations

import math
import warnings
from typing import Tuple

import numpy as np
from scipy import ndimage

from .metrics import _area_to

DEFAULT_BINS = 1 << 16  # 3 arrays of 64 Ki numbers: 1.5 MB per histogram set


class PixelHistograms:
    """Per-bin counts of normal and anomalous pixels (and per-region weights) over ``[lo, hi]``."""

    def __init__(self, lo: float, hi: float, bins: int = DEFAULT_BINS, regions: bool = True):
        if not (math.isfinite(lo) and math.isfinite(hi)) or hi < lo:
            raise ValueError(f"a score range needs finite lo <= hi, got [{lo}, {hi}]")
        if bins < 1:
            raise ValueError(f"bins must be >= 1, got {bins}")
        self.lo, self.hi, self.bins = float(lo), float(hi), int(bins)
        self.width = (self.hi - self.lo) / self.bins if self.hi > self.lo else 1.0  # one value: all in bin 0
        self.normal = np.zeros(self.bins, np.int64)  # (bins,)
        self.anomalous = np.zeros(self.bins, np.int64)  # (bins,)
        self.pro = np.zeros(self.bins, np.float64) if regions else None  # (bins,) sum of 1/|region|
        self.regions = 0

    def index(self, maps: np.ndarray) -> np.ndarray:
        """The bin of each score (same shape, int64); scores outside the range go to the end bins."""
        x = (np.asarray(maps, dtype=np.float64) - self.lo) / self.width
        return np.clip(x, 0, self.bins - 1).astype(np.int64)  # non-negative: truncation is floor

    def edge(self, b) -> float:
        """The lower edge of bin b: the threshold whose decision ``score >= t`` keeps bins >= b."""
        return self.lo + b * self.width

    def add(self, masks, maps) -> None:
        """Count the pixels of (H, W) or (N, H, W) binary masks and their anomaly maps."""
        masks = np.asarray(masks) > 0.5
        maps = np.asarray(maps)
        if masks.shape != maps.shape:
            raise ValueError(f"masks {masks.shape} and maps {maps.shape} differ in shape")
        masks, maps = masks.reshape(-1, *masks.shape[-2:]), maps.reshape(-1, *maps.shape[-2:])
        for m, a in zip(masks, maps):
            idx = self.index(a)  # (H, W)
            self.normal += np.bincount(idx[~m], minlength=self.bins)
            if not m.any():
                continue
            self.anomalous += np.bincount(idx[m], minlength=self.bins)
            if self.pro is not None:
                labelled, count = ndimage.label(m, structure=np.ones((3, 3)))  # as metrics.pro_curve
                sizes = np.bincount(labelled.ravel())
                self.pro += np.bincount(idx[m], weights=1.0 / sizes[labelled[m]], minlength=self.bins)
                self.regions += count

    def __iadd__(self, other: "PixelHistograms") -> "PixelHistograms":
        if (other.lo, other.hi, other.bins) != (self.lo, self.hi, self.bins):
            raise ValueError("cannot add histograms over different bins")
        self.normal += other.normal
        self.anomalous += other.anomalous
        if self.pro is not None:
            if other.pro is None:
                raise ValueError("cannot add histograms without region weights to one with them")
            self.pro += other.pro
            self.regions += other.regions
        return self

    def copy(self) -> "PixelHistograms":
        out = PixelHistograms(self.lo, self.hi, self.bins, regions=self.pro is not None)
        out += self
        return out

    def auroc(self) -> float:
        """Pixel AUROC: P(anomalous > normal) + half P(same bin)."""
        n_pos, n_neg = int(self.anomalous.sum()), int(self.normal.sum())
        if n_pos == 0 or n_neg == 0:
            warnings.warn("pixel AUROC is undefined with a single label: NaN", RuntimeWarning, stacklevel=2)
            return math.nan
        pos, neg = self.anomalous.astype(np.float64), self.normal.astype(np.float64)
        above = np.cumsum(pos[::-1])[::-1] - pos  # anomalous pixels in higher bins
        return float(np.sum(neg * (above + 0.5 * pos)) / (float(n_pos) * float(n_neg)))

    def pro_curve(self) -> Tuple[np.ndarray, np.ndarray]:
        """(fpr, pro) at every bin edge, highest threshold first, starting at (0, 0)."""
        fpr = np.cumsum(self.normal[::-1]) / max(1, int(self.normal.sum()))
        pro = np.cumsum(self.pro[::-1]) / max(1, self.regions)
        return np.r_[0.0, fpr], np.r_[0.0, pro]

    def aupro(self, max_fpr: float = 0.3) -> float:
        """Area under the binned PRO curve up to FPR `max_fpr`, divided by `max_fpr`."""
        if self.pro is None:
            raise ValueError("these histograms were made without region weights (regions=False)")
        if self.regions == 0 or int(self.normal.sum()) == 0:
            warnings.warn("pixel AUPRO needs both defect regions and normal pixels: NaN", RuntimeWarning, stacklevel=2)
            return math.nan
        return _area_to(*self.pro_curve(), max_fpr)

    def f1_threshold(self) -> Tuple[float, float]:
        """(F1-max, threshold) for ``score >= threshold`` over the bin edges: the lower edge of the
        lowest non-empty bin reaching the best F1. With no anomalous pixel: (NaN, hi), as
        metrics.f1_max_threshold."""
        n_pos = int(self.anomalous.sum())
        if n_pos == 0:
            warnings.warn("no anomalous sample: the threshold is the highest score", RuntimeWarning, stacklevel=2)
            return math.nan, self.hi
        tp = np.cumsum(self.anomalous[::-1])[::-1].astype(np.float64)  # (bins,) anomalous pixels >= edge b
        fp = np.cumsum(self.normal[::-1])[::-1].astype(np.float64)
        f1 = np.where(tp + fp > 0, 2 * tp / np.maximum(tp + fp + n_pos, 1), 0.0)
        best = int(np.argmax(f1))  # the first maximum
        # the empty bins just above it decide alike: the bin of the lowest pixel kept gives the threshold, as
        # the exact one is the lowest score kept (so it lies in that bin)
        best += int(np.argmax((self.normal[best:] + self.anomalous[best:]) > 0))
        return float(f1[best]), self.edge(best)
