"""A run folder never serves a stale model (issue 19, part 1).

Each sequence a new user runs: train -> test (thresholds.json) -> export (model.onnx, model.xml)
-> train again (--force, or --resume for more epochs) -> a consumer (load_model's thresholds,
predict with the torch, onnxruntime or openvino engine). Before run fingerprints, --force left
thresholds.json and the exports in place and --resume kept them, and every consumer used them
with the new weights, silently. Now --force removes them, and after --resume they are refused
in one line naming the command that makes them again, until they are remade.
"""
import csv
import json
import os
import shutil

import pytest
import torch

from rlr_fast.cli import main
from rlr_fast.demo_data import build_demo_dataset
from rlr_fast.errors import DataError
from rlr_fast.training import load_model, read_checkpoint

ENGINE_FORMAT = {"onnxruntime": "onnx", "openvino": "openvino"}
CONSUMERS = ("load_model", "torch", "onnxruntime", "openvino")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_demo_dataset(tmp_path_factory.mktemp("data"), classes=("brick",), image_size=64, n_train=4,
                              n_test_good=2, n_test_defect=2)


def _train(data, run, *extra):
    return main(["train", "--data", str(data), "--out", str(run), "--image-size", "64", "--backbone-weights",
                 "random", "--batch-size", "2", "--no-progress", *extra])


@pytest.fixture(scope="module")
def base(data, tmp_path_factory):
    """A run as a new user leaves it: trained 1 epoch, tested, exported to ONNX and OpenVINO."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("openvino")
    run = tmp_path_factory.mktemp("base") / "run"
    assert _train(data, run, "--epochs", "1") == 0
    assert main(["test", "--data", str(data), "--run", str(run), "--no-progress"]) == 0
    for fmt in ("onnx", "openvino"):
        assert main(["export", "--run", str(run), "--format", fmt]) == 0
    return run


def _served(run):
    path = run / "best.pt" if (run / "best.pt").is_file() else run / "checkpoint.pt"
    return read_checkpoint(path)["state_dict"]


@pytest.fixture(scope="module")
def retrained(data, base, tmp_path_factory):
    """sequence ("force" or "resume") -> a copy of the base run (file times kept) trained again
    that way, made once for the module; asserts the served weights changed."""
    runs = {}
    for sequence in ("force", "resume"):
        run = tmp_path_factory.mktemp(sequence) / "run"
        shutil.copytree(base, run)
        before = _served(run)
        if sequence == "force":
            assert _train(data, run, "--epochs", "1", "--seed", "1", "--force") == 0
        else:
            assert _train(data, run, "--epochs", "3", "--resume") == 0
        after = _served(run)
        assert any(not torch.equal(before[k], after[k]) for k in before), "the retrained run serves the same weights"
        runs[sequence] = run
    return runs


def _retrain(retrained, tmp_path, sequence):
    """This test's own copy of the run retrained by `sequence` (the test may change it)."""
    run = tmp_path / "run"
    shutil.copytree(retrained[sequence], run)
    return run


def _predict(run, data, engine, out):
    return main(["predict", "--run", str(run), str(data / "brick" / "test" / "good"), "--engine", engine,
                 "--out", str(out), "--no-progress", "--no-heatmaps"])


def _rows(folder):
    with open(folder / "scores.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("consumer", CONSUMERS)
def test_force_removes_what_was_made_from_the_old_model(data, retrained, tmp_path, capsys, consumer):
    run = _retrain(retrained, tmp_path, "force")
    capsys.readouterr()
    if consumer == "load_model":
        assert load_model(run).thresholds is None  # no thresholds of the old model
        return
    code = _predict(run, data, consumer, tmp_path / "pred")
    err = capsys.readouterr().err
    if consumer == "torch":  # scores of the new model, and no decisions from the old one
        assert code == 0 and "no thresholds.json" in err
        assert all(r["label"] == "" for r in _rows(tmp_path / "pred"))
    else:  # the old export is gone: say how to make one
        fmt = ENGINE_FORMAT[consumer]
        assert code == 2 and f"no exported model at {run}" in err and f"rlr-fast export --run {run} --format {fmt}" in err


@pytest.mark.parametrize("consumer", CONSUMERS)
def test_resume_keeps_derived_files_but_they_are_refused_until_remade(data, retrained, tmp_path, capsys, consumer):
    run = _retrain(retrained, tmp_path, "resume")
    assert (run / "thresholds.json").is_file() and (run / "model.onnx").is_file()  # left in place
    capsys.readouterr()
    remake_thresholds = f"rlr-fast test --data DATA --run {run}"
    if consumer == "load_model":
        with pytest.raises(DataError) as err:
            load_model(run)
        message = str(err.value)
        assert "thresholds.json was made from another model" in message and remake_thresholds in message
        assert "\n" not in message
        assert main(["test", "--data", str(data), "--run", str(run), "--no-progress"]) == 0  # remade
        model = load_model(run)
        assert model.thresholds is not None and model.thresholds.fingerprint == model.fingerprint
        return
    out = tmp_path / "pred"
    assert _predict(run, data, consumer, out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    if consumer == "torch":
        assert "thresholds.json was made from another model" in err and remake_thresholds in err
    else:
        fmt = ENGINE_FORMAT[consumer]
        assert "was made from another model" in err and f"rlr-fast export --run {run} --format {fmt}" in err
    # remade: the thresholds alone are not enough for an engine whose export is stale
    assert main(["test", "--data", str(data), "--run", str(run), "--no-progress"]) == 0
    if consumer != "torch":
        assert _predict(run, data, consumer, out) == 2
        assert f"--format {ENGINE_FORMAT[consumer]}" in capsys.readouterr().err
        assert main(["export", "--run", str(run), "--format", ENGINE_FORMAT[consumer]]) == 0
    assert _predict(run, data, consumer, out) == 0
    rows = _rows(out)
    assert rows and all(r["label"] in ("normal", "anomalous") for r in rows)
    # the decisions are the new model's: its scores against its thresholds
    model = load_model(run)
    for r in rows:
        assert float(r["score"]) == pytest.approx(_score(model, r["path"]), rel=1e-4)
        assert (r["label"] == "anomalous") == (float(r["score"]) >= model.thresholds.image.threshold)
    assert json.loads((out / "source.json").read_text())["fingerprint"] == model.fingerprint


def _score(model, path):
    from rlr_fast.data import load_image

    with torch.no_grad():
        return float(model(load_image(path, 64)[None]).score[0])


def test_fingerprint_is_of_the_weights_and_recorded_by_every_derived_file(base, tmp_path):
    model = load_model(base)
    assert model.thresholds.fingerprint == model.fingerprint
    assert json.loads((base / "metrics.json").read_text())["fingerprint"] == model.fingerprint
    assert json.loads((base / "overlays" / "source.json").read_text())["fingerprint"] == model.fingerprint
    import onnxruntime as ort

    meta = ort.InferenceSession(str(base / "model.onnx")).get_modelmeta().custom_metadata_map
    assert meta["fingerprint"] == model.fingerprint
    # the weights alone have the fingerprint of the checkpoint they came from
    assert main(["export", "--run", str(base), "--format", "weights", "--out", str(tmp_path / "w.pt")]) == 0
    assert torch.load(tmp_path / "w.pt", weights_only=True)["fingerprint"] == model.fingerprint
    assert load_model(tmp_path / "w.pt", thresholds=False).fingerprint == model.fingerprint
    # one changed weight changes it
    from rlr_fast.runs import fingerprint

    state = {k: v.clone() for k, v in _served(base).items()}
    key = next(k for k, v in state.items() if v.is_floating_point() and v.numel())
    state[key].view(-1)[0] += 1
    assert fingerprint(state) != model.fingerprint


def test_legacy_thresholds_are_used_when_newer_than_the_model_and_refused_when_older(base, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(base, run)
    stored = json.loads((run / "thresholds.json").read_text())
    del stored["fingerprint"]  # as an older rlr-fast wrote it
    (run / "thresholds.json").write_text(json.dumps(stored))
    model_file = run / "best.pt" if (run / "best.pt").is_file() else run / "checkpoint.pt"
    stamp = model_file.stat().st_mtime_ns
    os.utime(run / "thresholds.json", ns=(stamp + 10**9, stamp + 10**9))  # written after the model: used
    assert load_model(run).thresholds.image.threshold == stored["image"]["threshold"]
    os.utime(run / "thresholds.json", ns=(stamp - 10**9, stamp - 10**9))  # the model was written after it
    with pytest.raises(DataError, match="records no model fingerprint .* older than"):
        load_model(run)
