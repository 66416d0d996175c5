"""Evaluation in bounded memory (issue 19 part 2): the binned pixel metrics against the exact ones,
the choice between them, and memory that does not grow with the number of test images."""
import io
import json
import math
import tracemalloc

import numpy as np
import pytest
import torch
from scipy import ndimage

from rlr_fast import evaluation
from rlr_fast.binned import PixelHistograms
from rlr_fast.cli import main
from rlr_fast.data import MVTecDataset
from rlr_fast.decisions import Thresholds
from rlr_fast.demo_data import build_demo_dataset
from rlr_fast.evaluation import evaluate
from rlr_fast.metrics import class_metrics, f1_max_threshold, pixel_aupro, pixel_auroc, pro_curve
from rlr_fast.models.base import AnomalyOutput


def _maps_and_masks(seed, n=24, side=48, tail=False):
    """Smooth random maps, higher inside elliptic defects of varied size (several per image)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:side, :side]
    masks = np.zeros((n, side, side), bool)
    for i in range(n // 2, n):  # half the images defective, 1-3 regions each
        for _ in range(rng.integers(1, 4)):
            cy, cx, ry, rx = rng.uniform(8, side - 8, 2).tolist() + rng.uniform(1, 7, 2).tolist()
            masks[i] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    noise = ndimage.gaussian_filter(rng.normal(size=(n, side, side)), sigma=(0, 2, 2))
    bump = ndimage.gaussian_filter(masks.astype(float), sigma=(0, 1.5, 1.5))
    maps = noise + 0.8 * bump * rng.uniform(0.3, 2, (n, 1, 1))
    if tail:  # a few very high scores: the bulk of the pixels in a small part of the range
        maps = np.exp(2 * maps)
    return masks, maps.astype(np.float32)


@pytest.mark.parametrize("bins", [4096, 65536])
@pytest.mark.parametrize("tail", [False, True])
def test_binned_pixel_metrics_are_within_1e3_of_the_exact_ones_and_the_threshold_within_one_bin(tail, bins):
    # 196 k pixels: the F1 curve is smooth enough at the scale of a bin (with a few pixels per bin, the
    # noise of single pixels can move the best F1 to a bin further away)
    masks, maps = _maps_and_masks(0, n=48, side=64, tail=tail)
    h = PixelHistograms(float(maps.min()), float(maps.max()), bins)
    h.add(masks[:10], maps[:10])  # any grouping of the images gives the same counts
    for m, a in zip(masks[10:], maps[10:]):
        h.add(m, a)
    assert abs(h.auroc() - pixel_auroc(masks, maps)) <= 1e-3
    assert abs(h.aupro() - pixel_aupro(masks, maps)) <= 1e-3
    f1, threshold = f1_max_threshold(masks, maps)
    binned_f1, binned_threshold = h.f1_threshold()
    assert abs(binned_threshold - threshold) <= h.width
    assert abs(binned_f1 - f1) <= 1e-3


def test_binned_metrics_with_one_score_per_bin_equal_the_exact_ones():
    # scores on a grid with one value per bin: the histogram loses nothing, so the curves are the exact ones
    masks, maps = _maps_and_masks(1, n=6, side=16)
    values = np.round(maps.astype(np.float64) * 200) / 200
    lo, hi = float(values.min()), float(values.max())
    bins = int(round((hi - lo) * 200)) + 1
    h = PixelHistograms(lo - 0.5 / 200, hi + 0.5 / 200, bins)  # bin b holds exactly the value lo + b / 200
    h.add(masks, values)
    assert h.auroc() == pytest.approx(pixel_auroc(masks, values), abs=1e-12)
    assert h.aupro() == pytest.approx(pixel_aupro(masks, values), abs=1e-12)
    f1, threshold = f1_max_threshold(masks, values)
    assert h.f1_threshold()[0] == pytest.approx(f1, abs=1e-12)
    assert h.f1_threshold()[1] == pytest.approx(threshold - 0.5 / 200, abs=1e-9)  # the lower edge of its bin


def test_region_weights_are_the_per_region_histograms_summed():
    # two regions in one image (sizes 4 and 1): PRO at a threshold is the mean over regions of the share above it
    mask = np.zeros((6, 6), bool)
    mask[0:2, 0:2] = True
    mask[4, 4] = True
    amap = np.zeros((6, 6))
    amap[0:2, 0:2] = [[0.95, 0.15], [0.65, 0.35]]  # mid-bin values: no rounding at an edge
    amap[4, 4] = 0.75
    h = PixelHistograms(0.0, 1.0, 10)
    h.add(mask, amap)
    assert h.regions == 2
    fpr, pro = h.pro_curve()
    # threshold 0.6 (the lower edge of bin 6: the top 4 bins): region A 2/4 above, region B 1/1
    assert pro[4] == pytest.approx((2 / 4 + 1) / 2)
    assert pro[-1] == pytest.approx(1.0) and fpr[-1] == pytest.approx(1.0)


def test_histograms_refuse_bad_ranges_and_mixing():
    with pytest.raises(ValueError, match="finite lo <= hi"):
        PixelHistograms(1.0, 0.0)
    with pytest.raises(ValueError, match="finite lo <= hi"):
        PixelHistograms(0.0, math.nan)
    with pytest.raises(ValueError, match="different bins"):
        h = PixelHistograms(0.0, 1.0, 8)
        h += PixelHistograms(0.0, 2.0, 8)
    with pytest.raises(ValueError, match="differ in shape"):
        PixelHistograms(0.0, 1.0).add(np.zeros((4, 4)), np.zeros((4, 5)))


class Sharp(torch.nn.Module):
    """A stand-in model: the map is the local contrast of the image (defects stand out a little)."""

    image_size = 64

    def forward(self, images):
        d = (images - torch.nn.functional.avg_pool2d(images, 9, 1, 4)).abs().mean(1, keepdim=True)
        maps = torch.nn.functional.avg_pool2d(d, 5, 1, 2)
        return AnomalyOutput(maps, maps.flatten(1).amax(1))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_demo_dataset(tmp_path_factory.mktemp("data"), classes=("brick", "gravel"), image_size=64,
                              n_train=4, n_test_good=4, n_test_defect=8)


def _reference(root):
    """Per class: labels, scores, masks and maps of the stand-in model, item by item (independent of evaluate)."""
    data, model, per = MVTecDataset(root, split="test", image_size=64), Sharp(), {}
    for i, s in enumerate(data.samples):
        item = data[i]
        out = model(item["image"][None])
        rec = per.setdefault(s[3], ([], [], [], []))
        rec[0].append(item["label"]), rec[1].append(float(out.score[0]))
        rec[2].append(item["mask"][0].numpy() > 0.5), rec[3].append(out.anomaly_map[0, 0].numpy())
    return per


def test_small_sets_are_evaluated_exactly_as_before(data, tmp_path):
    per = _reference(data)
    summary = evaluate(Sharp(), data, progress=False, overlays_dir=tmp_path / "ov")
    assert summary["pixel_metrics"] == "exact"
    for cls, rec in per.items():
        assert summary["classes"][cls] == pytest.approx(class_metrics(*rec), abs=1e-6)
    everything = [sum((per[c][k] for c in per), []) for k in range(4)]
    expected = Thresholds.fit(everything[0], everything[1], np.stack(everything[2]), np.stack(everything[3]))
    assert summary["thresholds"].image.threshold == pytest.approx(expected.image.threshold, abs=1e-6)
    assert summary["thresholds"].pixel.threshold == pytest.approx(expected.pixel.threshold, abs=1e-6)
    # overlays: the defective images first, in test order, six per class
    assert len(list((tmp_path / "ov" / "brick").glob("*.png"))) == 6


def test_binned_evaluate_matches_the_exact_one(data, tmp_path):
    exact = evaluate(Sharp(), data, progress=False, exact=True, overlays_dir=tmp_path / "a")
    binned = evaluate(Sharp(), data, progress=False, exact=False, overlays_dir=tmp_path / "b")
    assert binned["pixel_metrics"] == "binned (65536 bins)"
    for cls in exact["classes"]:
        e, b = exact["classes"][cls], binned["classes"][cls]
        assert b["image_auroc"] == e["image_auroc"] and b["image_f1max"] == e["image_f1max"]  # exact from the scores
        assert abs(b["pixel_auroc"] - e["pixel_auroc"]) <= 1e-3
        assert abs(b["pixel_aupro"] - e["pixel_aupro"]) <= 1e-3
    te, tb = exact["thresholds"], binned["thresholds"]
    assert tb.image == te.image
    assert (tb.pixel.min, tb.pixel.max) == pytest.approx((te.pixel.min, te.pixel.max))
    assert abs(tb.pixel.threshold - te.pixel.threshold) <= (te.pixel.max - te.pixel.min) / 65536
    names = lambda d: sorted(p.relative_to(d).as_posix() for p in d.rglob("*.png"))
    assert names(tmp_path / "a") == names(tmp_path / "b") and len(names(tmp_path / "a")) == 12


def test_the_exact_metrics_are_the_default_up_to_the_pixel_limit(data, monkeypatch):
    n = len(MVTecDataset(data, split="test", image_size=64))
    monkeypatch.setattr(evaluation, "EXACT_MAX_PIXELS", n * 64 * 64)
    assert evaluate(Sharp(), data, progress=False)["pixel_metrics"] == "exact"
    monkeypatch.setattr(evaluation, "EXACT_MAX_PIXELS", n * 64 * 64 - 1)
    assert evaluate(Sharp(), data, progress=False)["pixel_metrics"].startswith("binned")
    with pytest.raises(ValueError, match="only kept by the exact"):
        evaluate(Sharp(), data, progress=False, exact=False, records={})


def _peak_traced(root, exact):
    tracemalloc.start()
    try:
        evaluate(Sharp(), root, progress=False, exact=exact, batch_size=4)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_binned_memory_does_not_grow_with_the_number_of_images(tmp_path):
    # numpy's allocations (masks, histograms, the exact path's sorted pixels) are traced; torch's are not,
    # so the exact path's growth here is a lower bound of its real one
    small = build_demo_dataset(tmp_path / "small", classes=("brick",), image_size=64, n_train=1, n_test_good=4,
                               n_test_defect=4)
    large = build_demo_dataset(tmp_path / "large", classes=("brick",), image_size=64, n_train=1, n_test_good=32,
                               n_test_defect=32)
    binned = _peak_traced(small, False), _peak_traced(large, False)
    exact = _peak_traced(small, True), _peak_traced(large, True)
    assert binned[1] <= 1.2 * binned[0], binned
    assert exact[1] > 3 * exact[0], exact  # 8x the pixels: the exact path grows


def test_cli_exact_metrics_flag(data, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(run), "--image-size", "64", "--backbone-weights", "random",
                 "--batch-size", "4", "--epochs", "1", "--val-fraction", "0", "--no-progress"]) == 0
    monkeypatch.setattr(evaluation, "EXACT_MAX_PIXELS", 0)  # every set is "large": binned by default
    assert main(["test", "--data", str(data), "--run", str(run), "--no-progress",
                 "--json", str(tmp_path / "b.json")]) == 0
    assert main(["test", "--data", str(data), "--run", str(run), "--no-progress", "--exact-metrics",
                 "--json", str(tmp_path / "e.json")]) == 0
    assert "pixel metrics: exact" in capsys.readouterr().out
    b, e = (json.loads((tmp_path / f"{k}.json").read_text()) for k in "be")
    assert b["pixel_metrics"].startswith("binned") and e["pixel_metrics"] == "exact"
    assert set(b) == set(e) == {"classes", "mean", "pixel_metrics", "fingerprint"}
    for cls in e["classes"]:
        for metric in ("pixel_auroc", "pixel_aupro"):
            assert abs(b["classes"][cls][metric] - e["classes"][cls][metric]) <= 1e-3


def test_binned_per_type_metrics_match_the_exact_ones(tmp_path):
    # MVTec LOCO AD: metrics per anomaly type, each type's images with the class's normal ones
    from helpers import build_tree

    src = build_demo_dataset(tmp_path / "src", classes=("brick", "gravel"), image_size=64, n_train=1,
                             n_test_good=4, n_test_defect=8)
    root, _ = build_tree(src, "mvtec-loco", tmp_path / "loco")
    exact = evaluate(Sharp(), root, progress=False, exact=True)
    binned = evaluate(Sharp(), root, progress=False, exact=False)
    for cls in ("brick", "gravel"):
        assert set(binned["types"][cls]) == set(exact["types"][cls]) == {"logical_anomalies", "structural_anomalies"}
        for kind, e in exact["types"][cls].items():
            b = binned["types"][cls][kind]
            assert b["image_auroc"] == e["image_auroc"]
            assert abs(b["pixel_auroc"] - e["pixel_auroc"]) <= 1e-3
            assert abs(b["pixel_aupro"] - e["pixel_aupro"]) <= 1e-3


def test_resad_binned_evaluation_fits_one_threshold_over_its_classes(data, tmp_path, monkeypatch):
    # ResAD evaluates class by class, each with its own references: the binned path's first passes
    # give one range over the classes, so the pixel threshold is fitted over all of them as the exact one is
    run = tmp_path / "run"
    assert main(["train", "--model", "resad", "--data", str(data), "--out", str(run), "--image-size", "64",
                 "--backbone-weights", "random", "--batch-size", "4", "--shots", "2", "--epochs", "1",
                 "--no-progress"]) == 0
    test = ["test", "--data", str(data), "--run", str(run), "--shots", "2", "--shot-seed", "1", "--no-progress"]
    assert main([*test, "--exact-metrics", "--json", str(tmp_path / "e.json")]) == 0
    exact = Thresholds.load(run / "thresholds.json")
    monkeypatch.setattr(evaluation, "EXACT_MAX_PIXELS", 0)
    assert main([*test, "--json", str(tmp_path / "b.json")]) == 0
    binned = Thresholds.load(run / "thresholds.json")
    # the report page of the binned path, gathered class by class (each with its references): every test image
    page = (run / "report.html").read_text()
    shown = json.loads(page.split('id="report-data">', 1)[1].split("</script>", 1)[0])
    for cls in shown["classes"]:
        assert sorted(im["name"] for im in cls["images"]) == sorted(p.name for p in (data / cls["name"] / "test").rglob("*.png"))
    assert sorted(c["name"] for c in shown["classes"]) == ["brick", "gravel"] and page.count("pixel PRO</title>") == 2
    b, e = (json.loads((tmp_path / f"{k}.json").read_text()) for k in "be")
    assert b["pixel_metrics"].startswith("binned") and e["pixel_metrics"] == "exact"
    for cls in ("brick", "gravel"):
        assert b["classes"][cls]["image_auroc"] == e["classes"][cls]["image_auroc"]
        for metric in ("pixel_auroc", "pixel_aupro"):
            assert abs(b["classes"][cls][metric] - e["classes"][cls][metric]) <= 1e-3
    assert binned.image == exact.image
    assert (binned.pixel.min, binned.pixel.max) == pytest.approx((exact.pixel.min, exact.pixel.max))
    assert abs(binned.pixel.threshold - exact.pixel.threshold) <= (exact.pixel.max - exact.pixel.min) / 65536


# ------------------------------------------------------------------ the report page (issue 21)
def _collect(root, exact, thumb_size=32):
    from rlr_fast.report import ReportCollector, ReportConfig

    shown = ReportCollector(ReportConfig(thumb_size=thumb_size))
    summary = evaluate(Sharp(), root, progress=False, exact=exact, batch_size=4, report=shown)
    return summary, shown


def test_report_is_gathered_alike_in_the_exact_and_binned_paths_from_thumbnails_only(data):
    from PIL import Image

    from rlr_fast.report import PRO_MAX_FPR, build_report

    per = _reference(data)
    for exact in (True, False):
        summary, shown = _collect(data, exact)
        assert sorted(shown.classes) == sorted(per)
        for cls, (labels, scores, masks, maps) in per.items():
            rec = shown.classes[cls]
            assert [im.label for im in rec.images] == labels
            assert [im.score for im in rec.images] == pytest.approx(scores, abs=1e-6)
            assert [im.mask is not None for im in rec.images] == [m.any() for m in masks]
            for im, amap in zip(rec.images, maps):  # 32 px pictures of 64 px images; the map's own range
                assert Image.open(io.BytesIO(im.thumb)).size == (32, 32)
                q = np.asarray(Image.open(io.BytesIO(im.map)))
                assert q.shape == (32, 32) and q.min() == 0 and q.max() == 255
                assert amap.min() - 1e-6 <= im.lo < im.hi <= amap.max() + 1e-6
            # the PRO curve: the exact one (independent reference), or the binned one within a bin's worth
            fpr, pro = pro_curve(np.stack(masks), np.stack(maps))
            grid, got = rec.pro
            assert grid[-1] == PRO_MAX_FPR
            assert np.abs(got - np.interp(grid, fpr, pro)).max() <= (1e-9 if exact else 1e-2)
        page = build_report(summary, shown, summary["thresholds"], "0" * 16)
        assert page.count('"thumb":"data:image/jpeg') == sum(len(r[0]) for r in per.values())


def test_binned_memory_with_the_report_grows_only_by_the_pages_thumbnails(tmp_path):
    # the same pattern as the test above: 8 vs 64 test images, numpy and Python allocations traced. The
    # report keeps per image only its encoded thumbnails (32 px here), which the page holds anyway
    small = build_demo_dataset(tmp_path / "small", classes=("brick",), image_size=64, n_train=1, n_test_good=4,
                               n_test_defect=4)
    large = build_demo_dataset(tmp_path / "large", classes=("brick",), image_size=64, n_train=1, n_test_good=32,
                               n_test_defect=32)

    def peak(root):
        tracemalloc.start()
        try:
            _collect(root, exact=False)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    binned = peak(small), peak(large)
    assert binned[1] <= 1.2 * binned[0], binned
    full = 64 * 64 * (4 + 1)  # one full-size float32 map and bool mask: what keeping them would cost per image
    assert (binned[1] - binned[0]) / 56 < full / 4, binned
