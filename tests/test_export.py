"""Export for deployment: ONNX (onnxruntime) and OpenVINO against PyTorch, weights alone, and
`rlr-fast predict --engine`."""
import csv
import sys

import numpy as np
import pytest
import torch

from rlr_fast.cli import main
from rlr_fast.data import IMAGENET_MEAN, IMAGENET_STD
from rlr_fast.features import FeatureCache
from rlr_fast.models.rlr import RLRModel
from rlr_fast.runs import model_fingerprint
from rlr_fast.training import load_model, save_checkpoint

TINY = dict(image_size=64, backbone_weights="random", num_layers=2, dims=(32, 64), num_heads=4)
RTOL = 1e-4  # fp32: the bound on the relative error


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder holding a checkpoint with optimizer state, as `rlr-fast train` writes."""
    torch.manual_seed(0)
    model = RLRModel(**TINY)
    with torch.no_grad():  # a trained-looking model: references away from their initialisation
        for level in model.levels:
            level.reference.mul_(0.5)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 3, 64, 64)).backward()
    optimizer.step()
    # the statistics training fits last: the exported graph reads both fitted scores, the map's
    # (balanced levels) and the image score's (whitened residuals)
    model.eval()
    model.fit_score(FeatureCache(model.features(torch.randn(6, 3, 64, 64))))
    assert model.balanced() and model.whitened()
    model.train()
    folder = tmp_path_factory.mktemp("run")
    save_checkpoint(folder / "checkpoint.pt", model, optimizer)
    return folder


@pytest.fixture(scope="module")
def images():
    """Images as the data pipeline gives them: pixels in [0, 1], ImageNet-normalised."""
    g = torch.Generator().manual_seed(1)
    pixels = torch.rand(5, 3, 64, 64, generator=g)
    return (pixels - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)


@pytest.fixture(scope="module")
def onnx_model(run):
    """RUN/model.onnx, exported once for the module (exporting takes a while)."""
    pytest.importorskip("onnxruntime")
    assert main(["export", "--run", str(run), "--format", "onnx"]) == 0
    return run / "model.onnx"


@pytest.fixture(scope="module")
def openvino_model(run):
    pytest.importorskip("openvino")
    assert main(["export", "--run", str(run), "--format", "openvino", "--out", str(run / "ov" / "rlr.xml")]) == 0
    assert (run / "ov" / "rlr.bin").is_file()
    return run / "ov" / "rlr.xml"


def _errors(got, expected):
    """(max abs error, max abs error / max |expected|) of map and score together."""
    abs_err = max(float(np.abs(g - e).max()) for g, e in zip(got, expected))
    scale = max(float(np.abs(e).max()) for e in expected)
    return abs_err, abs_err / scale


def _pytorch(run, images):
    with torch.no_grad():
        out = load_model(run)(images)
    return out.anomaly_map.numpy(), out.score.numpy()


def test_onnx_export_matches_pytorch_in_onnxruntime(run, onnx_model, images):
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_model), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == ["batch", 3, 64, 64]  # one graph, dynamic batch
    assert [o.name for o in session.get_outputs()] == ["anomaly_map", "score"]
    for batch in (1, 5):
        got = session.run(None, {"images": images[:batch].numpy()})
        abs_err, rel_err = _errors(got, _pytorch(run, images[:batch]))
        print(f"onnxruntime vs PyTorch, batch {batch}: max abs error {abs_err:.2e}, relative {rel_err:.2e}")
        assert rel_err <= RTOL


def test_openvino_export_matches_pytorch(run, openvino_model, images):
    import openvino as ov

    compiled = ov.Core().compile_model(str(openvino_model), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    for batch in (1, 5):
        result = compiled([images[:batch].numpy()])
        got = [result[compiled.outputs[i]] for i in range(2)]
        abs_err, rel_err = _errors(got, _pytorch(run, images[:batch]))
        print(f"OpenVINO vs PyTorch, batch {batch}: max abs error {abs_err:.2e}, relative {rel_err:.2e}")
        assert rel_err <= RTOL


def test_weights_export_is_the_model_alone(run, images):
    assert main(["export", "--run", str(run), "--format", "weights", "--out", str(run / "w" / "weights.pt")]) == 0
    path = run / "w" / "weights.pt"
    state = torch.load(path, weights_only=True)
    assert "optimizer" not in state
    assert set(state) == {"format", "model", "config", "state_dict", "input_norm", "fingerprint"}
    assert state["fingerprint"] == model_fingerprint(load_model(run))  # the weights of the run it came from
    assert path.stat().st_size < (run / "checkpoint.pt").stat().st_size
    with torch.no_grad():
        torch.testing.assert_close(load_model(path)(images).anomaly_map, load_model(run)(images).anomaly_map)


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_predict_with_an_exported_model_gives_the_pytorch_scores(run, tmp_path, engine, request):
    from PIL import Image

    exported = request.getfixturevalue("onnx_model" if engine == "onnxruntime" else "openvino_model")
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (80, 70, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    scores = {}
    # the run folder for torch; for the exported engines the run folder (RUN/model.onnx) or the file
    for name, source in (("torch", run), (engine, run if engine == "onnxruntime" else exported)):
        out = tmp_path / name
        assert main(["predict", "--run", str(source), str(folder), "--engine", name, "--out", str(out)]) == 0
        scores[name] = {r["path"]: float(r["score"]) for r in csv.DictReader(open(out / "scores.csv"))}
        assert len(list(out.glob("*_heatmap.png"))) == 3
    assert scores[engine].keys() == scores["torch"].keys() and len(scores["torch"]) == 3
    for path, score in scores["torch"].items():
        assert scores[engine][path] == pytest.approx(score, rel=RTOL)


def test_export_and_engine_errors(run, tmp_path, capsys):
    assert main(["export", "--run", str(run), "--format", "onnx", "--image-size", "128"]) == 2
    assert "--image-size 128: this run was trained at 64 px" in capsys.readouterr().err
    empty = tmp_path / "empty_run"
    empty.mkdir()
    save_checkpoint(empty / "checkpoint.pt", RLRModel(**TINY))
    assert main(["predict", "--run", str(empty), str(tmp_path), "--engine", "onnxruntime"]) == 2
    err = capsys.readouterr().err
    assert f"no exported model at {empty / 'model.onnx'}" in err and f"rlr-fast export --run {empty}" in err


def test_a_missing_deploy_package_is_a_one_line_error(run, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if not installed: importing it raises
    assert main(["export", "--run", str(run), "--format", "openvino"]) == 2
    assert "--format openvino needs the openvino package: pip install 'rlr-fast[deploy]'" in capsys.readouterr().err
