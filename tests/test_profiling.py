"""The profile breakdown puts known, injected time into the right part, forward and backward."""
import time

import pytest
import torch

from rlr_fast import modules
from rlr_fast.models.rlr import RLRModel
from rlr_fast.profiling import PARTS, breakdown

SLEEP = 0.05


class _SlowBackward(torch.autograd.Function):
    """Identity whose backward sleeps: time that only the backward spends."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        time.sleep(SLEEP)
        return grad


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return RLRModel(image_size=64, backbone_weights="random", num_layers=1, dims=(32, 64), num_heads=4)


def _slow_op(op, forward_sleep=0.0, backward=False):
    def slow(*args, **kwargs):
        time.sleep(forward_sleep)
        out = op(*args, **kwargs)
        return _SlowBackward.apply(out) if backward else out
    return staticmethod(slow)


def test_inference_time_lands_in_its_part(tiny, monkeypatch):
    monkeypatch.setattr(modules.NeighborMaskedAttention, "_op",
                        _slow_op(modules.NeighborMaskedAttention._op, forward_sleep=SLEEP))
    tiny.eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        parts = breakdown(tiny, lambda: tiny(images))
    assert set(parts) == set(PARTS) | {"total"}
    calls = len(tiny.levels) * 1  # one MLKA call per layer and level
    assert parts["MLKA"] >= calls * SLEEP
    assert parts["LCA"] < SLEEP and parts["other"] < parts["MLKA"]
    for part in ("backbone", "linear + FFN", "LayerNorm", "score map"):
        assert parts[part] > 0, part
    assert sum(v for k, v in parts.items() if k != "total") <= parts["total"] * 1.05
    # the wrappers are gone after profiling
    assert "forward" not in vars(tiny.backbone) and "predict_features" not in vars(tiny)
    assert all("forward" not in vars(net) for net in tiny.levels)


def test_backward_time_follows_its_forward(tiny, monkeypatch):
    original = modules.LocalCrossAttention._op
    monkeypatch.setattr(modules.LocalCrossAttention, "_op", _slow_op(original, backward=True))
    tiny.train()
    feats = tiny.features(torch.randn(2, 3, 64, 64))
    parts = breakdown(tiny, lambda: tiny.loss(feats).backward())
    assert parts["LCA"] >= len(tiny.levels) * SLEEP  # spent only in backward, credited to LCA
    assert parts["other"] < len(tiny.levels) * SLEEP and parts["MLKA"] < SLEEP
    # breakdown puts back what was there before it (here the slow op), not the original
    assert modules.LocalCrossAttention.__dict__["_op"] is not original
