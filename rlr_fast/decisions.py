"""Decisions from anomaly scores: thresholds, normalised scores, labels and masks.

``rlr-fast test`` fits, on the labelled data it evaluates, what a user of anomalib expects:

- an image threshold and a pixel threshold, each the F1-optimal one (anomalib's adaptive
  threshold): the score maximising F1 over the image labels, resp. over every pixel of the
  ground-truth masks. A score at or above the threshold is anomalous;
- min-max normalisation statistics (the lowest and highest image score and map value), used as
  anomalib normalises: ``clip((x - threshold) / (max - min) + 0.5, 0, 1)``, so 0.5 is the threshold.

They are stored in the run as ``thresholds.json``; ``rlr-fast predict`` and ``model.predict``
turn raw scores and maps into normalised scores, labels and binary masks with them.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .errors import DataError, UsageError
from .io import atomic_write_json
from .metrics import f1_max_threshold

THRESHOLDS_FILE = "thresholds.json"  # kept for older imports; rlr_fast.runs.Run names the run's files


@dataclass
class Threshold:
    """A decision threshold and the min-max statistics of the scores it was fitted on."""

    threshold: float
    min: float  # NaN (null in the file) when unknown: a threshold given by hand
    max: float

    def __post_init__(self):
        self.threshold = float(self.threshold)
        if not math.isfinite(self.threshold):
            raise UsageError(f"a threshold must be a finite number, got {self.threshold}")
        self.min, self.max = (math.nan if v is None else float(v) for v in (self.min, self.max))

    @classmethod
    def fit(cls, labels, scores) -> "Threshold":
        """The F1-optimal threshold of ``scores`` against binary ``labels`` (any shapes, flattened)."""
        scores = np.asarray(scores, dtype=np.float64).ravel()
        if scores.size == 0:
            raise ValueError("cannot fit a threshold on no scores")
        _, threshold = f1_max_threshold(labels, scores)
        return cls(float(threshold), float(scores.min()), float(scores.max()))

    @property
    def has_statistics(self) -> bool:
        """False for a threshold given by hand with no fitted min-max statistics."""
        return math.isfinite(self.min) and math.isfinite(self.max)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """anomalib's min-max normalisation: 0.5 at the threshold, clipped to [0, 1]."""
        span = max(self.max - self.min, np.finfo(np.float32).eps)
        return ((x.float() - self.threshold) / span + 0.5).clamp_(0.0, 1.0)


@dataclass
class Thresholds:
    """Image and pixel thresholds of a run (either may be None when it is not known)."""

    image: Optional[Threshold] = None
    pixel: Optional[Threshold] = None
    # the fingerprint of the model they were fitted for (rlr_fast.runs); None: not recorded
    fingerprint: Optional[str] = None

    @classmethod
    def fit(cls, labels, scores, masks, maps) -> "Thresholds":
        """Image threshold from image labels and scores, pixel threshold from masks and maps."""
        return cls(Threshold.fit(labels, scores), Threshold.fit(masks, maps))

    def override(self, image: Optional[float] = None, pixel: Optional[float] = None) -> "Thresholds":
        """These thresholds with the given values replacing the fitted ones (the statistics stay,
        so a normalised score is still 0.5 at the new threshold)."""
        def one(old: Optional[Threshold], value: Optional[float]) -> Optional[Threshold]:
            if value is None:
                return old
            if old is None:
                return Threshold(value, math.nan, math.nan)
            return Threshold(value, old.min, old.max)

        return Thresholds(one(self.image, image), one(self.pixel, pixel), self.fingerprint)

    def save(self, path) -> None:
        record = {"image": self.image and asdict(self.image), "pixel": self.pixel and asdict(self.pixel)}
        if self.fingerprint is not None:
            record["fingerprint"] = self.fingerprint
        atomic_write_json(path, record)

    @classmethod
    def load(cls, path) -> "Thresholds":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
            return cls(*(Threshold(**raw[k]) if raw.get(k) else None for k in ("image", "pixel")),
                       fingerprint=raw.get("fingerprint"))
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
            raise DataError(f"cannot read thresholds from {path}: {e}") from e

    @classmethod
    def of_run(cls, run_dir) -> Optional["Thresholds"]:
        """The thresholds stored in a run folder, or None if `rlr-fast test` has not run there.
        Not checked against the run's model: ``rlr_fast.runs.Run(run).thresholds()`` is."""
        from .runs import Run

        return Run(run_dir).thresholds(check=False)


@dataclass
class DecisionCounts:
    """How an image threshold decides a labelled set of images (``score >= threshold`` is
    flagged anomalous, as ``model.predict``): the confusion counts and the rates from them.
    A rate whose denominator is zero is NaN (precision with nothing flagged, recall with no
    anomalous image, FPR with no normal image; F1 when precision or recall is)."""

    tp: int
    fp: int
    tn: int
    fn: int
    precision: float
    recall: float
    f1: float
    fpr: float


def decision_counts(labels, scores, threshold: float) -> DecisionCounts:
    """The :class:`DecisionCounts` of image ``scores`` (any shape, flattened) against binary
    ``labels`` (1 = anomalous) at ``threshold``: what the report page shows live for its slider."""
    labels = np.asarray(labels).ravel() > 0.5
    flagged = np.asarray(scores, dtype=np.float64).ravel() >= float(threshold)
    if labels.shape != flagged.shape:
        raise ValueError(f"{labels.size} labels for {flagged.size} scores")
    tp, fp = int((flagged & labels).sum()), int((flagged & ~labels).sum())
    fn, tn = int((~flagged & labels).sum()), int((~flagged & ~labels).sum())
    ratio = lambda a, b: a / b if b else math.nan
    precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
    if math.isnan(precision) or math.isnan(recall):
        f1 = math.nan
    else:  # 0 when precision and recall are both 0 (nothing right flagged)
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return DecisionCounts(tp, fp, tn, fn, precision, recall, f1, ratio(fp, fp + tn))
