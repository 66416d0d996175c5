"""Metrics against hand-computed cases and brute-force implementations."""
import math
import warnings

import numpy as np
import pytest
from scipy import ndimage

from rlr_fast.metrics import (class_metrics, format_table, image_auroc, image_f1max, pixel_aupro, pixel_auroc,
                              summarize)


def brute_auroc(labels, scores):
    """P(score of a positive > score of a negative) + half the ties, by counting pairs."""
    pos = [s for l, s in zip(labels, scores) if l]
    neg = [s for l, s in zip(labels, scores) if not l]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_image_auroc_matches_pair_counting():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 60)
    scores = np.round(rng.normal(size=60) + labels, 1)  # rounded: many ties
    assert image_auroc(labels, scores) == pytest.approx(brute_auroc(labels, scores), abs=1e-12)


def test_pixel_auroc_hand_case():
    masks = np.array([[[1, 0], [0, 0]]])
    maps = np.array([[[0.9, 0.8], [0.1, 0.95]]])
    # one positive (0.9) against three negatives: it beats 0.8 and 0.1, loses to 0.95 -> 2/3
    assert pixel_auroc(masks, maps) == pytest.approx(2 / 3)


def test_image_f1max_hand_case():
    # thresholds: >=0.8 -> P=1, R=1/2, F1=2/3; >=0.4 -> P=1/2, R=1/2; >=0.35 -> P=2/3, R=1, F1=0.8;
    # >=0.1 -> P=1/2, R=1, F1=2/3. The maximum is 0.8.
    assert image_f1max([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.8)


def test_aupro_hand_case():
    # One image, one 2-pixel defect region {0.9, 0.5}; normal pixels 0.7, 0.6, 0.4, 0.3, 0.2, 0.1.
    # Curve (fpr, pro): (0, 0) -> 0.9: (0, 1/2) -> 0.7: (1/6, 1/2) -> 0.6: (2/6, 1/2) -> 0.5: (2/6, 1).
    # Up to FPR 0.3 the PRO is 1/2 everywhere after 0: area 0.3 * 1/2, normalised by 0.3 -> 0.5.
    masks = np.array([[[1, 1, 0, 0], [0, 0, 0, 0]]])
    maps = np.array([[[0.9, 0.5, 0.7, 0.1], [0.2, 0.3, 0.4, 0.6]]])
    assert pixel_aupro(masks, maps) == pytest.approx(0.5)
    # With the whole range (max_fpr 1): 0.5 on [0, 1/3], then 1 on [1/3, 1] -> 1/6 + 2/3 = 5/6.
    assert pixel_aupro(masks, maps, max_fpr=1.0) == pytest.approx(5 / 6)


def brute_aupro(masks, maps, max_fpr=0.3):
    """PRO and FPR evaluated directly at every distinct threshold, regions by scipy labelling."""
    regions = []
    for m, a in zip(masks, maps):
        lab, n = ndimage.label(m, structure=np.ones((3, 3)))
        regions += [a[lab == r] for r in range(1, n + 1)]
    normal = maps[masks == 0]
    pts = [(0.0, 0.0)]
    for t in sorted(set(maps.ravel().tolist()), reverse=True):
        pts.append(((normal >= t).mean(), np.mean([(r >= t).mean() for r in regions])))
    x, y = map(np.array, zip(*pts))
    keep = x <= max_fpr
    xs, ys = list(x[keep]), list(y[keep])
    if xs[-1] < max_fpr:
        j = np.argmax(x > max_fpr)
        xs.append(max_fpr)
        ys.append(y[j - 1] + (y[j] - y[j - 1]) * (max_fpr - x[j - 1]) / (x[j] - x[j - 1]))
    return np.trapezoid(ys, xs) / max_fpr


def test_aupro_matches_brute_force_with_regions_of_different_sizes():
    rng = np.random.default_rng(1)
    masks = np.zeros((3, 12, 12), int)
    masks[0, 2:4, 2:4] = 1  # small region
    masks[0, 6:12, 5:11] = 1  # large region
    masks[1, 0:1, 0:3] = 1
    maps = np.round(rng.random((3, 12, 12)) + 0.6 * masks, 2)
    assert pixel_aupro(masks, maps) == pytest.approx(brute_aupro(masks, maps), abs=1e-9)


def test_perfect_and_constant_maps():
    masks = np.zeros((2, 8, 8), int)
    masks[1, 2:5, 3:6] = 1
    assert class_metrics([0, 1], [0.0, 1.0], masks, masks.astype(float)) == {
        "image_auroc": 1.0, "pixel_auroc": 1.0, "pixel_aupro": pytest.approx(1.0), "image_f1max": 1.0}
    constant = class_metrics([0, 1], [0.5, 0.5], masks, np.ones((2, 8, 8)))
    assert constant["image_auroc"] == 0.5 and constant["pixel_auroc"] == 0.5


def test_single_label_gives_nan_with_warning():
    with pytest.warns(RuntimeWarning, match="single label"):
        assert math.isnan(image_auroc([1, 1], [0.2, 0.3]))
    with pytest.warns(RuntimeWarning, match="AUPRO"):
        assert math.isnan(pixel_aupro(np.zeros((1, 4, 4)), np.random.rand(1, 4, 4)))


def test_summary_and_table():
    per = {"a": {"image_auroc": 1.0, "pixel_auroc": 0.9, "pixel_aupro": 0.8, "image_f1max": 1.0},
           "b": {"image_auroc": 0.5, "pixel_auroc": 0.7, "pixel_aupro": math.nan, "image_f1max": 0.5}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = summarize(per)
    assert s["mean"] == {"image_auroc": 0.75, "pixel_auroc": pytest.approx(0.8), "pixel_aupro": 0.8,
                         "image_f1max": 0.75}
    table = format_table(s).splitlines()
    assert table[0].split()[:3] == ["class", "image", "AUROC"]
    assert table[-1].split() == ["mean", "75.0", "80.0", "80.0", "75.0"]
    assert "n/a" in table[3]
