"""benchmarks/resad_generalization.py: its paired bootstrap against an exact enumeration of the
bootstrap distribution, and a tiny leave-one-class-out run (random backbone weights, 64 px, one
epoch) that records every (class, K, draw), keeps the test defect kinds out of training and
resumes without redoing anything."""
import itertools
import json
from collections import Counter

import numpy as np
import pytest
import torch

import rlr_fast.demo_data as demo_data
from rlr_fast.fewshot import residual_cache
from rlr_fast.models.resad import ResADModel

from helpers import load_script

DATA = {"classes": ["brick", "coins"], "image_size": 64, "n_train": 6, "n_test_good": 3, "n_test_defect": 4}
TINY = ["--classes", "brick,coins", "--image-size", "64", "--epochs", "1", "--backbone-weights", "random",
        "--n-train", "6", "--n-test-good", "3", "--n-test-defect", "4", "--shots", "2", "--draws", "0,1"]


@pytest.fixture(scope="module")
def bench():
    return load_script("resad_generalization")


def _exact_quantile(units):
    """The exact bootstrap distribution of the pooled mean when the ``len(units)`` units (each a
    list of differences) are drawn with replacement, every ordered draw equally likely (by
    enumeration): returns its inverted-CDF quantile function."""
    n = len(units)
    stats = Counter()
    for draw in itertools.product(range(n), repeat=n):
        total = sum(sum(units[i]) for i in draw)
        count = sum(len(units[i]) for i in draw)
        stats[round(total / count, 12)] += 1
    atoms = sorted(stats)
    cdf = np.cumsum([stats[a] for a in atoms]) / n ** n
    return lambda q: atoms[int(np.argmax(cdf >= q - 1e-12))]


def _check_interval(got, quantile, slack=0.004):
    """Each end of a Monte Carlo interval lies between the exact quantiles at its probability -+
    ``slack`` (over 5 standard deviations of the empirical CDF with 40,000 resamples)."""
    for end, q in (("lo", 0.025), ("hi", 0.975)):
        assert quantile(q - slack) - 1e-9 <= got[end] <= quantile(q + slack) + 1e-9, (end, got[end])
    assert quantile(0.025 + 0.004) < quantile(0.975 - 0.004)  # the check is not empty


def test_paired_difference_matches_the_exact_bootstrap_distribution(bench):
    # four classes, two or three draws each: differences a - b per (class, draw) pair
    a = [0.90, 0.80, 0.70, 0.72, 0.65, 0.99, 0.97, 0.50, 0.58]
    b = [0.85, 0.82, 0.60, 0.70, 0.69, 0.90, 0.91, 0.55, 0.50]
    groups = ["x", "x", "y", "y", "y", "z", "z", "w", "w"]
    d = np.subtract(a, b)
    units = [[float(v) for v, h in zip(d, groups) if h == g] for g in dict.fromkeys(groups)]
    got = bench.paired_difference(a, b, groups, unit="class", resamples=40_000, seed=3)
    assert got["mean"] == pytest.approx(d.mean(), abs=1e-12)
    _check_interval(got, _exact_quantile(units))
    assert got["unit"] == "class" and got["units"] == 4 and got["pairs"] == 9

    # unit "pair": every pair is its own unit (six pairs: 6^6 ordered draws enumerated)
    got = bench.paired_difference(a[:6], b[:6], groups[:6], unit="pair", resamples=40_000, seed=3)
    assert got["mean"] == pytest.approx(d[:6].mean(), abs=1e-12) and got["units"] == 6
    _check_interval(got, _exact_quantile([[float(v)] for v in d[:6]]))
    # and the class unit differs from it on the same data (a class's pairs move together)
    by_class = bench.paired_difference(a[:6], b[:6], groups[:6], unit="class", resamples=40_000, seed=3)
    _check_interval(by_class, _exact_quantile([[float(v) for v, h in zip(d[:6], groups[:6]) if h == g]
                                               for g in ("x", "y", "z")]))


def test_class_unit_keeps_a_class_draws_together(bench):
    # every class has the same mean difference (0.1) but its draws differ: resampling classes
    # cannot move the mean, resampling pairs can
    a = [0.3, -0.1, 0.5, -0.3, 0.2, 0.0]
    b = [0.0] * 6
    groups = ["p", "p", "q", "q", "r", "r"]
    by_class = bench.paired_difference(a, b, groups, unit="class")
    by_pair = bench.paired_difference(a, b, groups, unit="pair")
    assert by_class["lo"] == pytest.approx(0.1) and by_class["hi"] == pytest.approx(0.1)
    assert by_pair["lo"] < 0.05 and by_pair["hi"] > 0.15
    again = bench.paired_difference(a, b, groups, unit="pair")
    assert again == by_pair  # seeded
    with pytest.raises(ValueError):
        bench.paired_difference([0.1], [0.1, 0.2], ["p"])


def test_defect_share_makes_a_quarter_of_the_items_anomalous(tmp_path):
    root = demo_data.build_benchmark_dataset(tmp_path / "data", **DATA, defects=["hole"])
    model = ResADModel(image_size=64, shots=2, backbone_weights="random")
    cache = residual_cache(model, root, classes=["brick", "coins"], progress=False, log=lambda *a: None,
                           defect_kinds=["perlin", "tint"], defect_share=0.25)
    anomalous = cache.masks[cache.items].flatten(1).amax(1) > 0.5
    for cls in (0, 1):  # 6 normal images, round(6 / 3) = 2 defective copies per class
        assert int(anomalous[cache.item_class == cls].sum()) == 2
        assert int((~anomalous)[cache.item_class == cls].sum()) == 6


def test_tiny_run_records_keeps_test_kinds_out_and_resumes(bench, tmp_path, capsys, monkeypatch):
    out = tmp_path / "gen"
    demo_data.build_benchmark_dataset(out / "data", **DATA, defects=list(bench.TEST_DEFECTS))  # reused by the run
    kinds = []
    real = demo_data.add_defect

    def recording(image, rng, others, kind=None, **kw):
        kinds.append(kind)
        return real(image, rng, others, kind=kind, **kw)

    monkeypatch.setattr(demo_data, "add_defect", recording)
    torch.manual_seed(0)
    assert bench.main(["--out", str(out), "--variants", *TINY]) == 0
    assert kinds and set(kinds) <= set(bench.TRAIN_DEFECTS)  # training anomalies only of the training kinds
    assert not set(bench.TRAIN_DEFECTS) & set(bench.TEST_DEFECTS)
    test_kinds = {p.name for c in DATA["classes"] for p in (out / "data" / c / "test").iterdir()} - {"good"}
    assert test_kinds == set(bench.TEST_DEFECTS)

    results = json.loads((out / bench.RESULTS).read_text())
    assert set(results["runs"]) == {f"{c}/K2/draw{d}" for c in ("brick", "coins") for d in (0, 1)}
    assert results["folds"]["brick"]["seen"] == ["coins"] and results["folds"]["coins"]["seen"] == ["brick"]
    assert len(results["folds"]["brick"]["history"]) == 1
    refs = {k: r["references"] for k, r in results["runs"].items()}
    assert refs["brick/K2/draw0"] != refs["brick/K2/draw1"] and len(refs["brick/K2/draw0"]) == 2
    for r in results["runs"].values():
        for s in ("knn", "resad", "resad_nomatch", "resad_nocalib"):
            assert all(0.0 <= r[s][m] <= 1.0 for m in bench.METRICS)
    # the summary's difference is the bootstrap of the recorded pairs
    runs = list(results["runs"].values())
    want = bench.paired_difference([r["resad"]["pixel_auroc"] for r in runs], [r["knn"]["pixel_auroc"] for r in runs],
                                   [r["unseen"] for r in runs])
    assert results["summary"]["2"]["difference_to_knn"]["resad"]["pixel_auroc"]["class"] == want
    want = bench.paired_difference([r["resad"]["pixel_aupro"] for r in runs],
                                   [r["resad_nomatch"]["pixel_aupro"] for r in runs], [r["unseen"] for r in runs])
    assert results["summary"]["2"]["resad_minus_variant"]["resad_nomatch"]["pixel_aupro"]["class"] == want
    text = (out / bench.TABLE).read_text()
    assert "K = 2: 2 unseen classes" in text and "resad_nomatch" in text
    assert str(tmp_path) not in (out / bench.RESULTS).read_text()  # no machine paths in the record

    # run again: everything recorded is skipped, nothing is trained again
    capsys.readouterr()
    kinds.clear()
    assert bench.main(["--out", str(out), "--variants", *TINY]) == 0
    printed = capsys.readouterr().out
    assert printed.count("already done, skipped") == 4 and "training on" not in printed
    assert json.loads((out / bench.RESULTS).read_text())["runs"] == results["runs"]
    # other settings in the same folder are refused
    assert bench.main(["--out", str(out), *TINY]) == 2
    assert "other settings" in capsys.readouterr().err

    # a stopped run's last class with fewer draws is left out of the summary and named
    del results["runs"]["coins/K2/draw1"]
    (out / bench.RESULTS).write_text(json.dumps(results))
    assert bench.main(["--out", str(out), "--report"]) == 0
    k2 = json.loads((out / bench.RESULTS).read_text())["summary"]["2"]
    assert k2["classes"] == ["brick"] and k2["incomplete"] == ["coins"]
    assert k2["difference_to_knn"]["resad"]["image_auroc"]["class"]["pairs"] == 2
    assert "left out, draws incomplete: coins" in (out / bench.TABLE).read_text()


def test_bad_arguments(bench, tmp_path):
    with pytest.raises(SystemExit):
        bench.main(["--out", str(tmp_path), "--train-defects", "hole,perlin"])  # hole is a test kind
    with pytest.raises(SystemExit):
        bench.main(["--out", str(tmp_path), "--classes", "brick"])
    with pytest.raises(SystemExit):
        bench.main(["--out", str(tmp_path), "--classes", "brick,marble"])
