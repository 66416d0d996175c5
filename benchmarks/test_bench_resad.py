"""ResAD on the demo data: the time to build the training cache (residuals of the seen classes'
images and of their synthetic-defect copies against 4 references per class), two training
epochs on it (one of each stage; images_per_s counts both), and the test of the unseen class (4 references, every test image, metrics).

Full size (``--benchmark``): the demo data as ``rlr-fast demo`` builds it, trained on brick and
grass, tested on gravel, at the demo's 128 px with the default ResAD (lite0, 10 couplings).
Without the flag: 64 px, a few images, a small flow and random backbone weights."""
import pytest
import torch

from rlr_fast.demo_data import build_demo_dataset
from rlr_fast.fewshot import evaluate_fewshot, residual_cache
from rlr_fast.models.resad import ResADModel
from rlr_fast.training import TrainConfig, train

SEEN, UNSEEN, SHOTS = ["brick", "grass"], "gravel", 4
FULL = dict(image_size=128, data={}, model={}, rounds=3)
SMALL = dict(image_size=64, data=dict(image_size=64, n_train=6, n_test_good=2, n_test_defect=4),
             model=dict(backbone_weights="random", coupling_layers=2, pos_embed_dim=16), rounds=1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, request):
    cfg = FULL if request.config.getoption("--benchmark") else SMALL
    data = build_demo_dataset(tmp_path_factory.mktemp("resad_demo"), **cfg["data"])
    torch.manual_seed(0)
    model = ResADModel(image_size=cfg["image_size"], shots=SHOTS, **cfg["model"])
    cache = residual_cache(model, data, classes=SEEN, progress=False, log=lambda msg: None)
    return cfg, data, model, cache


def _info(benchmark, cfg, mode, images):
    benchmark.group = f"resad demo {cfg['image_size']}px"
    benchmark.extra_info.update(kind="resad", mode=mode, image_size=cfg["image_size"],
                                images=images)
    benchmark.extra_info["images_per_s"] = images / benchmark.stats.stats.median


def test_resad_residual_cache(benchmark, measure, setup):
    cfg, data, model, cache = setup
    measure(lambda: residual_cache(model, data, classes=SEEN, progress=False, log=lambda msg: None),
            cfg["rounds"], warm=False)
    _info(benchmark, cfg, "residual cache", len(cache))


def test_resad_training_epoch(benchmark, measure, setup, tmp_path):
    cfg, _, model, cache = setup
    two_epochs = TrainConfig(epochs=2, batch_size=8, lr=1e-4, warmup_epochs=0)
    model.config.first_stage = 0.5  # one epoch of each stage (stage 2 adds the anomalous tokens)

    def fn():
        train(model, cache, tmp_path, two_epochs, progress=False, log=lambda msg: None)

    measure(fn, cfg["rounds"], warm=False)
    _info(benchmark, cfg, "train 2 epochs (stage 1 + 2)", 2 * len(cache))


def test_resad_test_unseen_class(benchmark, measure, setup):
    cfg, data, model, _ = setup
    model.eval()
    summary = {}

    def fn():
        summary.update(evaluate_fewshot(model, data, SHOTS, classes=[UNSEEN], progress=False, log=lambda msg: None))

    measure(fn, cfg["rounds"], warm=False)
    from rlr_fast.data import MVTecDataset

    _info(benchmark, cfg, "test", len(MVTecDataset(data, classes=[UNSEEN], split="test")))
    assert 0.0 <= summary["mean"]["image_auroc"] <= 1.0
