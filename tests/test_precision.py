"""precision="bf16": maps close to fp32, score maps in float32, a clear fallback without bf16."""
import pytest
import torch

from rlr_fast import precision as prec
from rlr_fast.models.rlr import RLRModel


@pytest.fixture
def pair():
    torch.manual_seed(0)
    kw = dict(image_size=64, backbone_weights="random", num_layers=1, dims=(32, 64), num_heads=4)
    fp32, bf16 = RLRModel(**kw).eval(), RLRModel(**kw).eval()
    bf16.load_state_dict(fp32.state_dict())
    bf16.precision = "bf16"
    return fp32, bf16


def test_bf16_maps_follow_fp32_and_stay_float32(pair, monkeypatch):
    monkeypatch.setattr(prec, "_cpu_bf16_supported", lambda: True)  # tested on every CPU
    fp32, bf16 = pair
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        a, b = fp32(images), bf16(images)
    assert b.anomaly_map.dtype == b.score.dtype == torch.float32
    rel = (a.anomaly_map - b.anomaly_map).abs().max() / a.anomaly_map.abs().max()
    assert 0 < rel < 0.05  # bf16 really ran (not bitwise fp32) and stayed close
    # the same images rank alike
    assert torch.equal(a.score.argsort(), b.score.argsort())


def test_bf16_without_native_support_runs_fp32_and_says_so(pair, monkeypatch):
    fp32, bf16 = pair
    monkeypatch.setattr(prec, "bf16_supported", lambda device: False)
    images = torch.randn(2, 3, 64, 64)
    with pytest.warns(UserWarning, match="no native bfloat16"), torch.no_grad():
        b = bf16(images)
    with torch.no_grad():
        a = fp32(images)
    torch.testing.assert_close(a.anomaly_map, b.anomaly_map, rtol=0, atol=0)


def test_unknown_precision_is_refused(pair):
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        pair[0].precision = "fp16"
    assert pair[0].precision == "fp32"
