"""Mixed precision on the CPU: the torch backend's autograd Functions under autocast, and
`rlr-fast train --amp bf16` end to end."""
import json

import pytest
import torch

from rlr_fast import local_cross_attention, neighbor_masked_attention
from rlr_fast.cli import main
from rlr_fast.demo_data import build_demo_dataset
from rlr_fast.training import read_checkpoint


def _grads(op, inputs, grid, window, backward_in_autocast: bool):
    q, k, v = (t.detach().clone().requires_grad_() for t in inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = op(q, k, v, grid=grid, window=window, backend="torch")
        loss = out.float().square().sum()
        if backward_in_autocast:
            loss.backward()
    if not backward_in_autocast:  # the usual place: after the autocast region
        loss.backward()
    return out, [t.grad for t in (q, k, v)]


@pytest.mark.parametrize("op", [local_cross_attention, neighbor_masked_attention])
@pytest.mark.parametrize("grid,window", [((8, 8), 3), ((40, 40), 7)])  # 40x40: MLKA in several bands
def test_torch_backend_backward_runs_in_the_forwards_autocast_state(op, grid, window):
    length = grid[0] * grid[1]
    inputs = (torch.randn(2, 2, length, 16), torch.randn(2, length, 16), torch.randn(2, 2, length, 16))  # k shared
    out, inside = _grads(op, inputs, grid, window, backward_in_autocast=True)
    _, after = _grads(op, inputs, grid, window, backward_in_autocast=False)
    # The backward recomputes the probabilities: in the forward's autocast state wherever
    # backward() is called, so the gradients are the same, bit for bit.
    for a, b in zip(inside, after):
        assert torch.equal(a, b)
    # And they are those of attention, to bfloat16 accuracy.
    wide = [t.double().requires_grad_() for t in inputs]
    ref = op(*wide, grid=grid, window=window, backend="dense")
    ref.square().sum().backward()
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)
    for g, r in zip(after, wide):
        torch.testing.assert_close(g.double(), r.grad, rtol=5e-2, atol=5e-2 * r.grad.abs().max().item())


@pytest.mark.parametrize("op,inner", [(local_cross_attention, "chunked.chunked_backward"),
                                      (neighbor_masked_attention, "flash.flash_backward")])
def test_torch_backend_declares_its_autocast_state_to_the_backward(op, inner, monkeypatch):
    import rlr_fast.blocked as blocked

    module, name = inner.split(".")
    module = getattr(blocked, module)
    states, original = [], getattr(module, name)

    def recording(*args, **kwargs):
        states.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, recording)
    # MLKA's flash path: the one bf16 takes on CPUs without native bf16 (test_bf16_cpu.py has the other).
    monkeypatch.setattr(blocked.low_precision, "LOW_PRECISION_DTYPES", ())
    inputs = (torch.randn(1, 2, 64, 8), torch.randn(2, 64, 8), torch.randn(1, 2, 64, 8))
    _grads(op, inputs, (8, 8), 3, backward_in_autocast=False)
    assert states and all(s == (True, torch.bfloat16) for s in states)  # the forward's state
    states.clear()
    q = inputs[0].clone().requires_grad_()
    op(q, *inputs[1:], grid=(8, 8), window=3, backend="torch").sum().backward()  # no autocast at all
    assert states and not any(enabled for enabled, _ in states)


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


def test_bf16_amp_without_native_bf16_trains_fp32_and_says_so(tmp_path, monkeypatch):
    import rlr_fast.precision as prec
    from rlr_fast.models.rlr import RLRModel

    data = build_demo_dataset(tmp_path / "data", classes=("brick",), image_size=64, n_train=2, n_test_good=1,
                              n_test_defect=1)
    monkeypatch.setattr(prec, "bf16_supported", lambda device: False)
    states = []
    original = RLRModel.loss

    def recording(self, *args, **kwargs):  # was the loss computed under autocast?
        states.append(torch.is_autocast_enabled("cpu"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(RLRModel, "loss", recording)
    with pytest.warns(UserWarning, match="no native bfloat16 .*running fp32"):
        assert main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--image-size", "64",
                     "--backbone-weights", "random", "--epochs", "1", "--batch-size", "2", "--amp", "bf16",
                     "--no-progress"]) == 0
    assert states == [False]
