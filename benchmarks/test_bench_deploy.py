"""Deployment engines side by side on the CPU, one run: eager PyTorch fp32, torch.compile
(fullgraph, the ops as custom ops), onnxruntime and OpenVINO (fp32) running the graph of
`rlr-fast export`. RLRModel at 256 px (full) or a tiny model at 64 px (default), inference at
batch 1 and 16: images/s. Backbone weights are random: speed does not depend on them.

Peak memory is not recorded here: onnxruntime and OpenVINO allocate outside PyTorch, where the
suite's tensor-memory measurement cannot see.
"""
import pytest
import torch

from rlr_fast.engines import load_engine
from rlr_fast.export import export
from rlr_fast.models.rlr import PAPER_NETWORK, RLRModel
from rlr_fast.training import save_checkpoint

# full size: the paper's network (4 layers, d 256/512), as the figures recorded in BENCHMARKS.md
FULL = dict(image_size=256, batches=(1, 16), model=dict(PAPER_NETWORK))
SMALL = dict(image_size=64, batches=(1, 2), model=dict(num_layers=1, dims=(32, 64), num_heads=4))
ENGINES = ("eager", "compile", "onnxruntime", "openvino")


@pytest.fixture(scope="module")
def cfg(full):
    return FULL if full else SMALL


@pytest.fixture(scope="module")
def run(cfg, tmp_path_factory):
    """A run folder with the model's checkpoint and its ONNX and OpenVINO exports."""
    torch.manual_seed(0)
    model = RLRModel(image_size=cfg["image_size"], backbone_weights="random", backend="torch", **cfg["model"]).eval()
    folder = tmp_path_factory.mktemp("deploy")
    save_checkpoint(folder / "checkpoint.pt", model)
    export(model, "onnx", folder / "model.onnx")
    try:
        export(model, "openvino", folder / "model.xml")
    except ImportError:
        pass  # the openvino case skips
    return folder


def _engine(name, run):
    if name in ("eager", "compile"):
        engine = load_engine("torch", run)
        if name == "compile":
            engine.model = torch.compile(engine.model, fullgraph=True)
        return engine
    pytest.importorskip(name)
    return load_engine(name, run)


@pytest.mark.parametrize("batch_index", [0, 1], ids=["batch_small", "batch_large"])
@pytest.mark.parametrize("engine", ENGINES)
def test_deploy_inference(benchmark, device, cfg, run, engine, batch_index):
    if device.type != "cpu":
        pytest.skip("the deployment comparison runs on the CPU")
    batch = cfg["batches"][batch_index]
    infer = _engine(engine, run)
    images = torch.randn(batch, 3, cfg["image_size"], cfg["image_size"])
    infer(images)  # warm-up: compilation, the engines' first-call allocations
    benchmark.group = f"deploy {cfg['image_size']}px batch {batch}"
    benchmark.extra_info.update(kind="deploy", engine=engine, batch=batch, image_size=cfg["image_size"])
    benchmark.pedantic(lambda: infer(images), rounds=3, iterations=1, warmup_rounds=0)
    benchmark.extra_info["images_per_s"] = batch / benchmark.stats.stats.median
