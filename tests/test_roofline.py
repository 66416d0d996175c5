"""benchmarks/roofline.py's FLOP split on a tiny RLR model, against counts made another way: the
linear layers by forward hooks (2 x input elements x output features), the backbone called alone,
and MLKA's formula against the products the counter sees where MLKA runs as plain bf16 products
(native bf16 forced, as tests/test_bf16_cpu.py does), LCA's count the same in both modes."""

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import rlr_fast.precision as prec
from rlr_fast.models.rlr import RLRModel

from helpers import load_script

SIZE, BATCH = 64, 2


@pytest.fixture(scope="module")
def roofline():
    return load_script("roofline")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return RLRModel(image_size=SIZE, backbone_weights="random", num_layers=1, dims=(32, 64), num_heads=4).eval()


def _linear_flops(model) -> float:
    """2 x input elements x output features over every nn.Linear of the reconstruction networks, in
    a call after a first one (which computes the reference's heads that later calls reuse)."""
    with torch.no_grad():
        model(torch.rand(BATCH, 3, SIZE, SIZE))
    total, handles = [0], []
    for module in model.levels.modules():
        if isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(
                lambda m, inputs, out: total.__setitem__(0, total[0] + 2 * inputs[0].numel() * m.out_features)))
    with torch.no_grad():
        model(torch.rand(BATCH, 3, SIZE, SIZE))
    for h in handles:
        h.remove()
    return total[0] / BATCH


def test_flops_by_part_against_independent_counts(roofline, model, monkeypatch):
    figures = {}
    for native in (False, True):
        monkeypatch.setattr(prec, "_cpu_bf16_supported", lambda native=native: native)
        figures[native] = roofline.flops_by_part(model, SIZE, BATCH)
    for record in figures.values():
        parts = record["per_image"]
        assert sum(parts.values()) == pytest.approx(record["total_per_image"])
        assert all(v >= 0 for v in parts.values()), parts
        assert parts["linear + FFN"] == pytest.approx(_linear_flops(model))
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model.backbone(torch.rand(BATCH, 3, SIZE, SIZE))
    assert figures[False]["per_image"]["backbone"] == pytest.approx(counter.get_total_flops() / BATCH)
    # MLKA's formula, 4 L^2 d per layer and image: in bf16 it is what the counter saw as products
    # (LCA = the products less MLKA), so LCA comes out the same as in float32, where MLKA is unseen
    mlka = sum(4 * (net.grid[0] * net.grid[1]) ** 2 * net.embed.out_features * len(net.layers) for net in model.levels)
    assert figures[False]["per_image"]["MLKA"] == figures[True]["per_image"]["MLKA"] == mlka
    assert figures[True]["per_image"]["LCA"] == pytest.approx(figures[False]["per_image"]["LCA"])
    assert figures[True]["per_image"]["LCA"] > 0
