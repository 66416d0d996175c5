"""Decisions: F1-optimal thresholds, anomalib's min-max normalisation, model.predict, and
`rlr-fast test` / `rlr-fast predict` writing and using them."""
import csv
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from rlr_fast.cli import main
from rlr_fast.data import load_image
from rlr_fast.decisions import Threshold, Thresholds
from rlr_fast.demo_data import build_demo_dataset
from rlr_fast.metrics import f1_max_threshold
from rlr_fast.models.rlr import RLRModel
from rlr_fast.training import load_model

TINY = dict(image_size=64, backbone_weights="random", num_layers=1, dims=(32, 64), num_heads=4)


def brute_f1_threshold(labels, scores):
    """Try every distinct score t as the rule `score >= t`, counting true and false positives
    by binary search; the best F1, the lowest t on ties."""
    labels, scores = np.asarray(labels, bool).ravel(), np.asarray(scores, np.float64).ravel()
    pos, neg = np.sort(scores[labels]), np.sort(scores[~labels])
    candidates = np.unique(scores)
    tp = len(pos) - np.searchsorted(pos, candidates, side="left")
    fp = len(neg) - np.searchsorted(neg, candidates, side="left")
    f1 = 2 * tp / (2 * tp + fp + (len(pos) - tp))
    best = int(np.argmax(f1))
    return float(f1[best]), float(candidates[best])


def test_f1_optimal_threshold_matches_brute_force():
    rng = np.random.default_rng(1)
    for _ in range(5):
        labels = rng.integers(0, 2, 50).tolist()
        scores = np.round(rng.normal(size=50) + np.array(labels), 1).tolist()  # many ties
        f1, t = f1_max_threshold(labels, scores)
        ref_f1, ref_t = brute_f1_threshold(labels, scores)
        assert f1 == pytest.approx(ref_f1) and t == ref_t


def test_threshold_without_anomalies_is_the_highest_score():
    with pytest.warns(RuntimeWarning, match="no anomalous sample"):
        t = Threshold.fit([0, 0, 0], [0.2, 0.9, 0.5])
    assert (t.threshold, t.min, t.max) == (0.9, 0.2, 0.9)


def test_normalisation_is_anomalibs_min_max():
    t = Threshold(threshold=2.0, min=0.0, max=4.0)
    # (x - threshold) / (max - min) + 0.5, clipped to [0, 1]
    got = t.normalize(torch.tensor([2.0, 3.0, 4.0, 0.0, 1.0, 9.0, -5.0]))
    assert got.tolist() == pytest.approx([0.5, 0.75, 1.0, 0.0, 0.25, 1.0, 0.0])


def test_thresholds_round_trip_and_override(tmp_path):
    th = Thresholds(Threshold(1.5, 0.25, 3.0), Threshold(0.75, 0.0, 2.0))
    th.save(tmp_path / "t.json")
    assert Thresholds.load(tmp_path / "t.json") == th
    moved = th.override(image=2.0)
    assert moved.image == Threshold(2.0, 0.25, 3.0) and moved.pixel == th.pixel
    for bad in ("{not json", '{"image": {"threshold": "high", "min": 0, "max": 1}}',
                '{"image": {"threshold": null, "min": 0, "max": 1}}', '{"image": {"min": 0}}', "[1]"):
        (tmp_path / "bad.json").write_text(bad)
        with pytest.raises(ValueError, match="cannot read thresholds from .*bad.json"):
            Thresholds.load(tmp_path / "bad.json")
    by_hand = Thresholds().override(image=3.0)  # no statistics: no normalised score
    assert by_hand.image.threshold == 3.0 and not by_hand.image.has_statistics
    with pytest.raises(ValueError, match="finite"):
        Thresholds().override(image=float("nan"))


def test_model_predict_decides_with_its_thresholds():
    torch.manual_seed(0)
    model = RLRModel(**TINY).eval()
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        raw = model(images)
    plain = model.predict(images)
    assert torch.equal(plain.scores, raw.score) and torch.equal(plain.anomaly_maps, raw.anomaly_map)
    assert plain.labels is None and plain.masks is None and plain.normalized_scores is None

    t_img = float(raw.score.median())
    t_pix = float(raw.anomaly_map.median())
    model.thresholds = Thresholds(Threshold(t_img, float(raw.score.min()), float(raw.score.max())),
                                  Threshold(t_pix, 0.0, 1.0))
    model.train()  # predict runs in eval mode and gives the mode back
    pred = model.predict(images)
    assert model.training
    assert pred.labels.tolist() == [s >= t_img for s in raw.score.tolist()]
    assert torch.equal(pred.masks, raw.anomaly_map >= t_pix)
    span = float(raw.score.max() - raw.score.min())
    expected = ((raw.score - t_img) / span + 0.5).clamp(0, 1)
    assert torch.allclose(pred.normalized_scores, expected)
    # an override moves the decision; the normalised score is 0.5 at the new threshold
    top = float(raw.score.max())
    over = model.predict(images, image_threshold=top)
    assert over.labels.tolist() == [s >= top for s in raw.score.tolist()]
    assert over.normalized_scores[raw.score.argmax()] == pytest.approx(0.5)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    data = build_demo_dataset(tmp_path_factory.mktemp("data"), classes=("brick",), image_size=64, n_train=4,
                              n_test_good=3, n_test_defect=3)
    run = tmp_path_factory.mktemp("run")
    assert main(["train", "--data", str(data), "--out", str(run), "--image-size", "64", "--backbone-weights",
                 "random", "--epochs", "1", "--batch-size", "4", "--no-progress"]) == 0
    return data, run


def _rows(folder):
    with open(folder / "scores.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_predict_without_thresholds_says_to_run_test(trained, tmp_path, capsys):
    data, trained_run = trained
    run = tmp_path / "run"  # a copy of the run as `rlr-fast train` left it: no thresholds
    run.mkdir()
    shutil.copy(trained_run / "checkpoint.pt", run)
    out = tmp_path / "pred"
    assert main(["predict", "--run", str(run), str(data / "brick" / "test" / "good"), "--out", str(out),
                 "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "Run `rlr-fast test" in err and "--threshold" in err
    rows = _rows(out)
    assert len(rows) == 3 and all(float(r["score"]) > 0 and r["label"] == "" and r["mask"] == "" for r in rows)
    assert len(list(out.glob("*_heatmap.png"))) == 3 and not list(out.glob("*_mask.png"))
    assert "predict: " not in err and "batch/s" not in err  # --no-progress: no progress bar


def test_test_stores_f1_optimal_thresholds_and_predict_decides(trained, tmp_path, capsys):
    data, run = trained
    assert main(["test", "--data", str(data), "--run", str(run), "--no-progress"]) == 0
    stored = json.loads((run / "thresholds.json").read_text())

    # Independently: the model's scores and maps on the test images, and brute-force F1 thresholds.
    model = load_model(run)
    paths = sorted((data / "brick" / "test").glob("*/*.png"))
    images = torch.stack([load_image(p, 64) for p in paths])
    with torch.no_grad():
        out = model(images)
    labels = [p.parent.name != "good" for p in paths]
    scores = out.score.tolist()
    f1, t_img = brute_f1_threshold(labels, scores)
    assert stored["image"]["threshold"] == pytest.approx(t_img, rel=1e-6)
    assert stored["image"]["min"] == pytest.approx(min(scores), rel=1e-6)
    assert stored["image"]["max"] == pytest.approx(max(scores), rel=1e-6)
    masks = [np.asarray(Image.open(data / "brick" / "ground_truth" / p.parent.name / f"{p.stem}_mask.png")
                        .resize((64, 64), Image.Resampling.NEAREST)) > 127 if p.parent.name != "good"
             else np.zeros((64, 64), bool) for p in paths]
    _, t_pix = brute_f1_threshold(np.stack(masks), out.anomaly_map[:, 0].numpy())
    assert stored["pixel"]["threshold"] == pytest.approx(t_pix, rel=1e-6)

    pred_dir = tmp_path / "pred"
    folders = sorted(str(d) for d in (data / "brick" / "test").iterdir())
    assert main(["predict", "--run", str(run), *folders, str(paths[0]),
                 "--out", str(pred_dir), "--no-progress"]) == 0
    rows = {r["path"]: r for r in _rows(pred_dir)}
    assert len(rows) == len(paths)  # the file given twice (in its folder and alone) is predicted once
    n_anomalous = sum(s >= stored["image"]["threshold"] for s in scores)
    assert f"{len(paths)} images scored, {n_anomalous} anomalous" in capsys.readouterr().out
    for i, p in enumerate(paths):
        r = rows[str(p)]
        assert float(r["score"]) == pytest.approx(scores[i], rel=1e-5)
        assert r["label"] == ("anomalous" if scores[i] >= stored["image"]["threshold"] else "normal")
        span = stored["image"]["max"] - stored["image"]["min"]
        norm = min(1.0, max(0.0, (scores[i] - stored["image"]["threshold"]) / span + 0.5))
        assert float(r["normalized_score"]) == pytest.approx(norm, abs=1e-4)
        # the mask beside the heat map is the map at or above the pixel threshold, as 0/255
        assert r["heatmap"] == f"{p.parent.name}/{p.stem}_heatmap.png"
        assert r["mask"] == f"{p.parent.name}/{p.stem}_mask.png"
        mask = np.asarray(Image.open(pred_dir / r["mask"]))
        assert set(np.unique(mask)) <= {0, 255}
        expected = out.anomaly_map[i, 0].numpy() >= stored["pixel"]["threshold"]
        assert np.array_equal(mask == 255, expected)
        assert (pred_dir / r["heatmap"]).is_file()

    # --threshold overrides the stored one
    top = max(scores)
    over = tmp_path / "over"
    assert main(["predict", "--run", str(run), *folders, "--out", str(over), "--threshold",
                 str(top), "--no-heatmaps", "--no-progress"]) == 0
    labels = [r["label"] for r in _rows(over)]
    assert labels.count("anomalous") == 1 and len(labels) == len(paths)


def test_predict_names_outputs_uniquely_and_never_overwrites_silently(trained, tmp_path, capsys):
    data, run = trained
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    src = sorted((data / "brick" / "test" / "good").glob("*.png"))
    Image.open(src[0]).save(a / "x.png")
    Image.open(src[1]).convert("RGB").save(a / "x.jpg")  # same stem, other extension
    Image.open(src[2]).save(b / "x.png")  # same name, other folder
    out = tmp_path / "pred"
    assert main(["predict", "--run", str(run), str(a), str(b), "--out", str(out), "--no-progress"]) == 0
    heatmaps = sorted(p.relative_to(out).as_posix() for p in out.rglob("*_heatmap.png"))
    assert heatmaps == ["a/x_jpg_heatmap.png", "a/x_png_heatmap.png", "b/x_heatmap.png"]
    assert len({r["heatmap"] for r in _rows(out)}) == 3

    before = (out / "scores.csv").read_bytes()
    assert main(["predict", "--run", str(run), str(b), "--out", str(out), "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "scores.csv").read_bytes() == before
    assert main(["predict", "--run", str(run), str(b), "--out", str(out), "--overwrite", "--no-progress"]) == 0
    assert len(_rows(out)) == 1
