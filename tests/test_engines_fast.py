"""The fast engines: OpenVINO in bf16 and INT8 (NNCF), the engines record of
`python -m rlr_fast.measure`, and `rlr-fast predict --engine auto`.

A tiny run (64 px, random backbone weights, one epoch on a generated data set): what the
engines are compared on is the model's arithmetic, not its accuracy.
"""
import importlib.util
import json
import shutil
import sys

import numpy as np
import pytest
import torch

from rlr_fast.cli import main
from rlr_fast.engines import DEFAULT_TOLERANCE, load_engine, openvino_bf16_supported, rank_engines
from rlr_fast.runs import Run

# Run by `make test` in a pytest process of their own (-m engines): see the Makefile.
pytestmark = pytest.mark.engines

BF16_RTOL = 0.05  # bf16 maps against fp32: largest difference / largest fp32 value (as tests/test_precision.py)
# INT8 against fp32: the Pearson correlation of the anomaly maps over all test pixels. Measured on
# tiny runs of random-backbone models (this one: 0.956; the same data trained 2 epochs on 8 images per
# class: 0.926; another: 0.997, 0.988 for its worst image); with the backbone's convolutions quantised
# too it was 0.07, which is why they stay float32 (rlr_fast/quantize.py). These toy models spread
# widely, hence the margin; a trained run's INT8 accuracy is what python -m rlr_fast.measure records.
INT8_MIN_CORRELATION = 0.85


def _installed(package):
    return importlib.util.find_spec(package) is not None


needs_openvino = pytest.mark.skipif(not _installed("openvino"), reason="openvino not installed (rlr-fast[deploy])")
needs_nncf = pytest.mark.skipif(not (_installed("nncf") and _installed("openvino")),
                                reason="nncf not installed (pip install 'rlr-fast[int8]')")


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("runs") / "run"
    assert main(["train", "--data", str(data), "--out", str(folder), "--image-size", "64", "--backbone-weights",
                 "random", "--batch-size", "4", "--epochs", "1", "--no-progress"]) == 0
    return folder


@pytest.fixture(scope="module")
def images(data):
    from rlr_fast.data import MVTecDataset

    dataset = MVTecDataset(data, split="test", image_size=64)
    return torch.stack([dataset[i]["image"] for i in range(len(dataset))])


@pytest.fixture(scope="module")
def openvino_export(run):
    pytest.importorskip("openvino")
    assert main(["export", "--run", str(run), "--format", "openvino"]) == 0
    return run / "model.xml"


@pytest.fixture(scope="module")
def int8_export(run, data):
    if not (_installed("nncf") and _installed("openvino")):
        pytest.skip("nncf not installed (pip install 'rlr-fast[int8]')")
    assert main(["export", "--run", str(run), "--format", "openvino", "--int8", "--data", str(data)]) == 0
    return run / "model-int8.xml"


def _fp32(run, images):
    with torch.no_grad():
        return load_engine("torch", run)(images)


def _rel(got, expected):
    return float((got - expected).abs().max() / expected.abs().max())


# ------------------------------------------------------------------------------------ OpenVINO bf16
@needs_openvino
def test_openvino_bf16_maps_are_within_the_bf16_tolerance(run, openvino_export, images):
    import openvino as ov

    if not openvino_bf16_supported(ov.Core()):
        pytest.skip("this CPU has no native bfloat16 (AVX-512 BF16 or AMX): OpenVINO refuses --precision bf16 "
                    "here (test_openvino_bf16_is_refused_without_native_bf16 checks the message)")
    engine = load_engine("openvino", run, precision="bf16")
    assert engine.precision == "bf16"
    got, expected = engine(images), _fp32(run, images)
    rel_map, rel_score = _rel(got.anomaly_map, expected.anomaly_map), _rel(got.score, expected.score)
    print(f"OpenVINO bf16 vs torch fp32: map {rel_map:.2e}, score {rel_score:.2e}")
    assert 0 < rel_map < BF16_RTOL  # bf16 really ran (not f32) and stayed close
    assert rel_score < BF16_RTOL


@needs_openvino
def test_openvino_bf16_is_refused_without_native_bf16(run, openvino_export, tmp_path, monkeypatch, capsys):
    import rlr_fast.engines as engines

    monkeypatch.setattr(engines, "openvino_bf16_supported", lambda core: False)
    assert main(["predict", "--run", str(run), str(tmp_path), "--engine", "openvino", "--precision", "bf16"]) == 2
    err = capsys.readouterr().err
    assert "--precision bf16: this CPU has no native bfloat16 (AVX-512 BF16 or AMX)" in err
    assert "use --precision fp32" in err


def test_a_precision_the_engine_does_not_run_is_refused(run, tmp_path, capsys):
    for engine, precision in (("onnxruntime", "bf16"), ("onnxruntime", "int8"), ("torch", "int8")):
        assert main(["predict", "--run", str(run), str(tmp_path), "--engine", engine, "--precision", precision]) == 2
        err = capsys.readouterr().err
        assert f"the {engine} engine does not run precision {precision}" in err
        assert "--engine openvino" in err


def test_missing_openvino_is_a_one_line_error(run, data, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if not installed
    assert main(["predict", "--run", str(run), str(tmp_path), "--engine", "openvino", "--precision", "bf16"]) == 2
    assert "--engine openvino needs the openvino package: pip install 'rlr-fast[deploy]'" in capsys.readouterr().err
    assert main(["export", "--run", str(run), "--format", "openvino", "--int8", "--data", str(data)]) == 2
    assert "--format openvino needs the openvino package: pip install 'rlr-fast[deploy]'" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------- INT8
@needs_nncf
def test_int8_export_round_trip_gives_maps_correlated_with_fp32(run, data, int8_export, images, tmp_path):
    import openvino as ov

    assert int8_export.is_file() and int8_export.with_suffix(".bin").is_file()
    model = ov.Core().read_model(int8_export)
    assert str(model.get_rt_info(["rlr_fast", "precision"]).astype(str)) == "int8"
    assert any(op.get_type_name() == "FakeQuantize" for op in model.get_ordered_ops())  # really quantised
    engine = load_engine("openvino", run, precision="int8")
    assert engine.fingerprint == load_engine("torch", run).fingerprint
    got, expected = engine(images), _fp32(run, images)
    corr = float(np.corrcoef(got.anomaly_map.numpy().ravel(), expected.anomaly_map.numpy().ravel())[0, 1])
    print(f"INT8 vs torch fp32: map correlation {corr:.4f}, largest relative map difference "
          f"{_rel(got.anomaly_map, expected.anomaly_map):.2e}")
    assert corr >= INT8_MIN_CORRELATION
    good = data / "brick" / "test" / "good"
    assert main(["predict", "--run", str(run), str(good), "--engine", "openvino", "--precision", "int8", "--out",
                 str(tmp_path / "p"), "--no-heatmaps"]) == 0
    assert (tmp_path / "p" / "scores.csv").read_text().count("\n") == 3  # header and two images


@needs_nncf
def test_int8_model_is_run_only_as_int8(run, int8_export, tmp_path, capsys):
    assert main(["predict", "--run", str(int8_export), str(tmp_path), "--engine", "openvino"]) == 2
    assert "is the INT8 model: run it with --precision int8" in capsys.readouterr().err


def test_int8_export_errors(run, data, tmp_path, monkeypatch, capsys):
    assert main(["export", "--run", str(run), "--format", "onnx", "--int8", "--data", str(data)]) == 2
    assert "--int8 is for --format openvino" in capsys.readouterr().err
    assert main(["export", "--run", str(run), "--format", "openvino", "--int8"]) == 2
    assert "--int8 needs --data DATA" in capsys.readouterr().err
    assert main(["export", "--run", str(run), "--format", "onnx", "--data", str(data)]) == 2
    assert "--data and --classes are for --int8" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "nncf", None)  # as if not installed: found nowhere
    if _installed("openvino"):
        assert main(["export", "--run", str(run), "--format", "openvino", "--int8", "--data", str(data)]) == 2
        assert "--int8 needs the nncf package: pip install 'rlr-fast[int8]'" in capsys.readouterr().err


# ------------------------------------------------------------------------------ the engines record
RECORD_KEYS = {"format", "fingerprint", "device", "data", "classes", "images", "image_size", "batch_size", "rounds",
               "threads", "cpu", "cpu_bf16", "versions", "created", "command", "engines"}
ROW_KEYS = {"engine", "precision", "status", "images_per_s", "batch_seconds", "image_auroc", "pixel_auroc",
            "classes", "image_auroc_change", "pixel_auroc_change", "max_map_difference", "max_score_difference"}


@needs_openvino
def test_measure_writes_the_engines_record(run, data, monkeypatch, capsys):
    import rlr_fast.engines as engines
    from rlr_fast import measure

    pytest.importorskip("onnxruntime")
    monkeypatch.setattr(engines, "openvino_bf16_supported", lambda core: False)  # a skipped row, on every CPU
    candidates = (("torch", "fp32"), ("onnxruntime", "fp32"), ("openvino", "fp32"), ("openvino", "bf16"))
    record = measure.measure(run, data, batch_size=4, rounds=1, candidates=candidates, say=lambda *a: None)
    assert set(record) == RECORD_KEYS
    assert record["format"] == 1 and record["device"] == "cpu" and record["images"] == 12
    assert record["fingerprint"] == load_engine("torch", run).fingerprint
    assert record["classes"] == ["brick", "gravel"] and record["batch_size"] == 4
    rows = {(r["engine"], r["precision"]): r for r in record["engines"]}
    assert list(rows) == list(candidates)
    ref = rows["torch", "fp32"]
    for key, row in rows.items():
        if key == ("openvino", "bf16"):
            assert row["status"] == "skipped" and "no native bfloat16" in row["reason"]
            continue
        assert set(row) == ROW_KEYS and row["status"] == "ok"
        assert row["images_per_s"] > 0 and len(row["batch_seconds"]) == 1
        assert set(row["classes"]) == {"brick", "gravel"}
        for metric in ("image_auroc", "pixel_auroc"):
            assert 0 <= row[metric] <= 1
            assert row[metric + "_change"] == pytest.approx(row[metric] - ref[metric])
        assert row["max_map_difference"] < (0 if key == ("torch", "fp32") else 1e-4) + 1e-12  # fp32 engines
    json.dumps(record)  # all plain JSON
    table = measure.markdown(record)
    assert "| torch | fp32 |" in table and "| openvino | bf16 | skipped: " in table
    assert (run / "model.onnx").is_file() and (run / "model.xml").is_file()  # made where missing


# ------------------------------------------------------------------------------------- --engine auto
@pytest.fixture
def auto_run(run, tmp_path):
    """A copy of the run (model files only), with its ONNX export."""
    pytest.importorskip("onnxruntime")
    folder = tmp_path / "auto"
    folder.mkdir()
    for name in ("checkpoint.pt", "best.pt", "config.json"):
        if (run / name).is_file():
            shutil.copy2(run / name, folder / name)
    assert main(["export", "--run", str(folder), "--format", "onnx"]) == 0
    return folder


def _row(engine, precision, speed, image, pixel):
    return {"engine": engine, "precision": precision, "status": "ok", "images_per_s": speed,
            "image_auroc": image, "pixel_auroc": pixel}


def _write_record(folder, rows, fingerprint=None):
    fingerprint = fingerprint or load_engine("torch", folder).fingerprint
    record = {"format": 1, "fingerprint": fingerprint, "device": "cpu", "engines": rows}
    Run(folder).engines_record.write_text(json.dumps(record))


ROWS = [_row("torch", "fp32", 10.0, 0.900, 0.950),
        _row("openvino", "int8", 40.0, 0.850, 0.949),  # fastest, but its image AUROC dropped by 0.05
        _row("openvino", "bf16", 30.0, 0.899, 0.951),  # within 0.005, but no export in auto_run
        _row("onnxruntime", "fp32", 12.0, 0.900, 0.950),
        {"engine": "torch", "precision": "bf16", "status": "skipped", "reason": "no native bf16"}]


def test_rank_engines_keeps_those_within_the_tolerance_fastest_first():
    record = {"engines": ROWS}
    assert [(r["engine"], r["precision"]) for r in rank_engines(record, 0.005)] == [
        ("openvino", "bf16"), ("onnxruntime", "fp32"), ("torch", "fp32")]
    assert [r["engine"] for r in rank_engines(record, 0.05)][0] == "openvino"  # int8 now within
    assert rank_engines(record, 0.0)[0]["engine"] == "onnxruntime"  # higher AUROC is no loss; lower is
    assert rank_engines({"engines": ROWS[1:]}, 1.0) == []  # no reference: nothing to compare with


def test_predict_engine_auto_picks_from_the_record_and_says_why(auto_run, tmp_path, capsys, monkeypatch):
    from PIL import Image

    import rlr_fast.engines

    # as on a CPU with native bf16, so that what stops OpenVINO bf16 is the missing export on every
    # machine (without native bf16 the engine refuses bf16 before it looks for model.xml)
    monkeypatch.setattr(rlr_fast.engines, "openvino_bf16_supported", lambda core: True)

    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / "a.png")
    _write_record(auto_run, ROWS)
    assert DEFAULT_TOLERANCE == 0.005
    assert main(["predict", "--run", str(auto_run), str(folder), "--engine", "auto", "--out", str(tmp_path / "p"),
                 "--no-heatmaps"]) == 0
    out = capsys.readouterr().out
    first = out.splitlines()[0]
    # openvino bf16 is faster and within the tolerance but cannot run here (no export): the next one
    assert first.startswith("engine auto: onnxruntime fp32, the fastest measured within tolerance 0.005 of "
                            "torch fp32's AUROC: 12.00 images/s (1.20x torch fp32), image AUROC 0.9000 "
                            "(torch fp32 0.9000), pixel AUROC 0.9500 (0.9500)")
    assert "faster but outside the tolerance: openvino int8 (40.00 images/s, image AUROC 0.8500" in first
    assert "openvino bf16 not usable here: " in first and "model.xml" in first
    source = json.loads((tmp_path / "p" / Run.SOURCE).read_text())
    assert source["made_by"] == "rlr-fast predict --engine auto (onnxruntime fp32)"
    # a tolerance that takes no engine but the reference, from a record without the others
    _write_record(auto_run, [ROWS[0], _row("onnxruntime", "fp32", 12.0, 0.80, 0.95)])
    assert main(["predict", "--run", str(auto_run), str(folder), "--engine", "auto", "--tolerance", "0.01",
                 "--out", str(tmp_path / "q"), "--no-heatmaps"]) == 0
    assert capsys.readouterr().out.startswith("engine auto: torch fp32, the fastest measured within tolerance 0.01")


def test_engine_auto_without_a_record_uses_torch_and_says_how_to_make_one(auto_run, tmp_path, capsys):
    engine = load_engine("auto", auto_run)
    assert engine.kind == "torch" and engine.precision == "fp32"
    assert engine.choice == (f"engine auto: torch fp32 (no engine measurements ({auto_run / 'engines.json'}): make "
                             f"one with `python -m rlr_fast.measure --run {auto_run} --data DATA` (DATA: the run's "
                             f"test data))")
    _write_record(auto_run, ROWS, fingerprint="0123456789abcdef")  # measured on another model
    engine = load_engine("auto", auto_run)
    assert engine.kind == "torch" and "was measured on another model (fingerprint 0123456789abcdef)" in engine.choice


def test_engine_auto_option_errors(auto_run, tmp_path, capsys):
    assert main(["predict", "--run", str(auto_run), str(tmp_path), "--engine", "auto", "--precision", "bf16"]) == 2
    assert "--engine auto chooses the precision too" in capsys.readouterr().err
    assert main(["predict", "--run", str(auto_run), str(tmp_path), "--tolerance", "0.01"]) == 2
    assert "--tolerance is for --engine auto" in capsys.readouterr().err
    assert main(["predict", "--run", str(auto_run), str(tmp_path), "--engine", "auto", "--tolerance", "-1"]) == 2
    assert "--tolerance must be >= 0" in capsys.readouterr().err
