"""benchmarks/accuracy.py on a tiny configuration: it trains and tests through the CLI, records
per-class metrics, loss history and times, resumes without redoing what is recorded."""
import json
import math

import pytest

from rlr_fast.data import MVTecDataset

from helpers import load_script

TINY = ["--classes", "brick,coins", "--image-size", "128", "--epochs", "1", "--backbone-weights", "random",
        "--n-train", "4", "--n-test-good", "2", "--n-test-defect", "4"]


@pytest.fixture(scope="module")
def accuracy():
    return load_script("accuracy")


def test_tiny_benchmark_records_and_resumes(accuracy, tmp_path, capsys):
    out = tmp_path / "acc"
    assert accuracy.main(["--out", str(out), "--models", "rlr,uniad", "--seeds", "0", *TINY]) == 0
    results = json.loads((out / "accuracy.json").read_text())
    assert set(results["runs"]) == {"rlr/seed0", "uniad/seed0"}
    assert results["settings"]["data"]["classes"] == ["brick", "coins"]
    n_test = len(MVTecDataset(out / "data", split="test", image_size=128))
    assert n_test == 2 * (2 + 4)
    for key, run in results["runs"].items():
        model = key.split("/")[0]
        # the metrics are those `rlr-fast test` wrote for this run
        written = json.loads((out / "runs" / f"{model}-seed0" / "metrics.json").read_text())
        assert run["classes"] == written["classes"] and set(run["classes"]) == {"brick", "coins"}
        for metrics in run["classes"].values():
            for m in ("image_auroc", "pixel_auroc", "pixel_aupro"):
                assert 0.0 <= metrics[m] <= 1.0
        assert len(run["loss"]) == 1 and math.isfinite(run["loss"][0]) and run["loss"][0] > 0
        assert run["log"][0]["epoch"] == 1
        assert run["train_wall_s"] > 0 and run["test_wall_s"] > 0 and not run["resumed"]
        assert run["train_options"][:2] == ["--model", model] and "--seed" not in run["train_options"]
    assert "tf_efficientnet_lite0" in results["runs"]["uniad/seed0"]["train_options"]  # the embedded backbone
    table = (out / "accuracy.md").read_text()
    assert "| rlr | 0 |" in table and "| **mean** |" in table and "| coins |" in table
    assert table.strip() in capsys.readouterr().out

    # run again with one more seed: seed 0 is skipped (not retrained), seed 1 added
    stamp = (out / "runs" / "rlr-seed0" / "checkpoint.pt").stat().st_mtime_ns
    assert accuracy.main(["--out", str(out), "--models", "rlr", "--seeds", "0,1", *TINY]) == 0
    again = json.loads((out / "accuracy.json").read_text())
    assert set(again["runs"]) == {"rlr/seed0", "rlr/seed1", "uniad/seed0"}
    assert again["runs"]["rlr/seed0"] == results["runs"]["rlr/seed0"]
    assert (out / "runs" / "rlr-seed0" / "checkpoint.pt").stat().st_mtime_ns == stamp
    assert "rlr/seed0: already done, skipped" in capsys.readouterr().out
    assert "| rlr | 0,1 | " in (out / "accuracy.md").read_text() and " ± " in (out / "accuracy.md").read_text()

    # other settings into the same folder: refused, the results kept
    assert accuracy.main(["--out", str(out), "--models", "rlr", "--seeds", "0", *TINY[:-2], "--n-test-defect", "8"]) == 2
    assert "holds results of other settings" in capsys.readouterr().err
    assert accuracy.main(["--out", str(out), "--models", "rlr", "--seeds", "0", *TINY[:5], "2", *TINY[6:]]) == 2
    assert "trained with" in capsys.readouterr().err
    assert json.loads((out / "accuracy.json").read_text()) == again


def test_unknown_model_and_class_are_refused(accuracy, tmp_path, capsys):
    with pytest.raises(SystemExit):
        accuracy.main(["--out", str(tmp_path / "x"), "--models", "nope"])
    assert "unknown model nope" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        accuracy.main(["--out", str(tmp_path / "x"), "--classes", "bottle"])
    assert "unknown class bottle" in capsys.readouterr().err
    assert set(accuracy.cli_models()) >= {"rlr", "uniad"}


def test_train_options_pass_model_specific_args(accuracy):
    args = accuracy.parse_args(["--out", "o", "--models", "rlr,uniad", "--train-args", "rlr:--lr 1e-4 --amp bf16",
                                "--train-args", "--batch-size 4"])
    assert accuracy.train_options(args, "rlr") == ["--model", "rlr", "--image-size", "256", "--lr", "1e-4",
                                                   "--amp", "bf16", "--batch-size", "4"]
    assert accuracy.train_options(args, "uniad") == ["--model", "uniad", "--image-size", "256", "--backbone",
                                                     "tf_efficientnet_lite0", "--batch-size", "4"]
