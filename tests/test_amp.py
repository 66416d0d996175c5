"""Mixed precision on the CPU: the torch backend's autograd Functions under autocast, and
`rlr-fast train --amp bf16` end to end."""
import json

import pytest
import torch

from rlr_fast import local_cross_attention, neighbor_masked_attention
from rlr_fast.cli import main
from rlr_fast.demo_data import build_demo_dataset
from rlr_fast.training import read_checkpoint


@pytest.mark.parametrize("op", [local_cross_attention, neighbor_masked_attention])
@pytest.mark.parametrize("grid,window", [((8, 8), 3), ((40, 40), 7)])  # 40x40: MLKA in several bands
def test_torch_backend_under_bf16_autocast_computes_in_float32(op, grid, window):
    length = grid[0] * grid[1]
    q = torch.randn(2, 2, length, 16, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(2, length, 16, dtype=torch.bfloat16, requires_grad=True)  # shared
    v = torch.randn(2, 2, length, 16, dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = op(q, k, v, grid=grid, window=window, backend="torch")
        out.float().square().sum().backward()  # backward called inside the region too
    # The reference on the same values in float64: float32 accuracy, not bfloat16's (~4e-3).
    wide = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = op(*wide, grid=grid, window=window, backend="reference")
    ref.square().sum().backward()
    assert (out.double() - ref).abs().max().item() < 1e-5
    assert out.dtype == torch.float32
    for t, r in zip((q, k, v), wide):  # gradients arrive in the inputs' dtype, rounded once
        assert t.grad.dtype == torch.bfloat16
        torch.testing.assert_close(t.grad.double(), r.grad, rtol=1e-2, atol=1e-2)


def test_train_with_bf16_amp_end_to_end(tmp_path):
    data = build_demo_dataset(tmp_path / "data", classes=("brick",), image_size=64, n_train=4, n_test_good=2,
                              n_test_defect=2)
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(run), "--image-size", "64", "--backbone-weights",
                 "random", "--epochs", "3", "--batch-size", "2", "--lr", "3e-3", "--amp", "bf16",
                 "--no-progress"]) == 0
    state = read_checkpoint(run)
    assert state["train_config"]["amp"] == "bf16"
    assert all(v.dtype == torch.float32 for v in state["state_dict"].values() if v.is_floating_point())
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    assert log[-1]["loss"] < log[0]["loss"]
    assert main(["test", "--data", str(data), "--run", str(run), "--no-progress"]) == 0
