"""Whole models, fast (backend auto: triton on CUDA, torch elsewhere) against naive (backend
reference): RLRModel and UniADModel at the same input size. Inference images/s at batch 1 and
16, training step images/s (on cached features, as training runs), peak memory.
Backbone weights are random: speed does not depend on them."""
import pytest
import torch

from rlr_fast.models.rlr import PAPER_NETWORK, RLRModel
from rlr_fast.models.uniad import UniADModel

FULL = dict(image_size=256, inference_batches=(1, 16), train_batch=8)
SMALL = dict(image_size=64, inference_batches=(1, 4), train_batch=2)
SMALL_MODEL = {"rlr": dict(num_layers=1, dims=(32, 64), num_heads=4),
               "uniad": dict(hidden=32, num_heads=4, ffn_dim=64, num_encoder_layers=1, num_decoder_layers=1,
                             window=3)}


def _model(name, path, size, full):
    kwargs = dict(image_size=size, backbone_weights="random", backend="auto" if path == "fast" else "dense")
    if name == "uniad":
        kwargs["backbone"] = "efficientnet_b4"
    if full and name == "rlr":  # the paper's network, as the recorded figures (BENCHMARKS.md)
        kwargs.update(PAPER_NETWORK)
    if not full:
        kwargs.update(SMALL_MODEL[name])
        if name == "uniad":
            kwargs["backbone"] = "tf_efficientnet_lite0"
    torch.manual_seed(0)
    return (RLRModel if name == "rlr" else UniADModel)(**kwargs)


def pytest_generate_tests(metafunc):
    if "batch" in metafunc.fixturenames:
        cfg = FULL if metafunc.config.getoption("--benchmark") else SMALL
        metafunc.parametrize("batch", cfg["inference_batches"], ids=lambda b: f"batch{b}")


@pytest.mark.parametrize("path", ["fast", "naive"])
@pytest.mark.parametrize("name", ["rlr", "uniad"])
def test_inference(benchmark, measure, device, full, name, path, batch):
    cfg = FULL if full else SMALL
    model = _model(name, path, cfg["image_size"], full).to(device).eval()
    images = torch.randn(batch, 3, cfg["image_size"], cfg["image_size"], device=device)

    def fn():
        with torch.no_grad():
            model(images)

    benchmark.group = f"models inference {cfg['image_size']}px batch {batch}"
    measure(fn, 2, kind="model", model=name, path=path, mode="inference", batch=batch,
            image_size=cfg["image_size"])
    benchmark.extra_info["images_per_s"] = batch / benchmark.stats.stats.median


@pytest.mark.parametrize("path", ["fast", "naive"])
@pytest.mark.parametrize("name", ["rlr", "uniad"])
def test_training_step(benchmark, measure, device, full, name, path):
    cfg = FULL if full else SMALL
    batch = cfg["train_batch"]
    model = _model(name, path, cfg["image_size"], full).to(device).train()
    feats = model.features(torch.randn(batch, 3, cfg["image_size"], cfg["image_size"], device=device))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def fn():
        optimizer.zero_grad(set_to_none=True)
        model.loss(feats).backward()
        optimizer.step()

    benchmark.group = f"models training step {cfg['image_size']}px batch {batch}"
    measure(fn, 2, kind="model", model=name, path=path, mode="train", batch=batch,
            image_size=cfg["image_size"])
    benchmark.extra_info["images_per_s"] = batch / benchmark.stats.stats.median
