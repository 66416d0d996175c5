"""Where RLRModel's time goes on this device, fp32 and bf16: inference (batch 16) and a training
step (batch 8, on cached features, as training runs), each timed and broken down by part with
`rlr_fast.profiling.breakdown` (backbone, LCA, MLKA, linear + FFN, LayerNorm, score map, other).
bf16 is `model.precision = "bf16"` for inference (autocast to bfloat16, score maps in float32) and
autocast around the loss for training, as `--amp bf16` does.
Backbone weights are random: speed does not depend on them."""
import contextlib

import pytest
import torch

from rlr_fast.models.rlr import PAPER_NETWORK, RLRModel
from rlr_fast.profiling import breakdown

# full size: the paper's network (4 layers, d 256/512), as the figures recorded in BENCHMARKS.md
FULL = dict(image_size=256, inference_batch=16, train_batch=8, model=dict(PAPER_NETWORK))
SMALL = dict(image_size=64, inference_batch=2, train_batch=2, model=dict(num_layers=1, dims=(32, 64), num_heads=4))


def _autocast(device, precision):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["inference", "train"])
def test_profile(benchmark, device, full, mode, precision):
    cfg = FULL if full else SMALL
    torch.manual_seed(0)
    model = RLRModel(image_size=cfg["image_size"], backbone_weights="random", **cfg["model"]).to(device)
    size = cfg["image_size"]
    if mode == "inference":
        batch = cfg["inference_batch"]
        model.eval()
        model.precision = precision
        images = torch.randn(batch, 3, size, size, device=device)

        def step():
            with torch.no_grad():
                model(images)
    else:
        batch = cfg["train_batch"]
        model.train()
        feats = model.features(torch.randn(batch, 3, size, size, device=device))
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step():
            optimizer.zero_grad(set_to_none=True)
            with _autocast(device, precision):
                loss = model.loss(feats)
            loss.backward()
            optimizer.step()

    def timed():
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # one-time costs (plans, caches) are not profiled
    parts = breakdown(model, timed)
    benchmark.group = f"profile rlr {mode} {size}px batch {batch}"
    benchmark.extra_info.update(kind="profile", model="rlr", mode=mode, precision=precision, batch=batch,
                                image_size=size, parts={k: v for k, v in parts.items() if k != "total"},
                                profiled_seconds=parts["total"])
    benchmark.pedantic(timed, rounds=3 if full else 1, iterations=1, warmup_rounds=0)
    benchmark.extra_info["images_per_s"] = batch / benchmark.stats.stats.median
