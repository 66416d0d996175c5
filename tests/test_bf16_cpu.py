"""MLKA in bfloat16 on CPUs with native bfloat16 (forced here, so it is tested on any CPU): dense 16-bit products band by band (the CPU
flash kernel computes bfloat16 in float32, no faster), against an fp64 oracle."""
import pytest
import torch

import rlr_fast.blocked as blocked
import rlr_fast.precision as prec
from rlr_fast import neighbor_masked_attention

from helpers import assert_within_flash_rule


@pytest.fixture(autouse=True)
def _native_bf16(monkeypatch):
    """These paths run on every machine: the capability check is forced (PyTorch computes
    bfloat16 on any CPU, natively or not; only the speed differs)."""
    monkeypatch.setattr(prec, "_cpu_bf16_supported", lambda: True)

GRID, WINDOW = (7, 6), (3, 5)


def _inputs(b, heads, dim, k_shared, v_shared):
    length = GRID[0] * GRID[1]
    shape = lambda shared: (heads, length, dim) if shared else (b, heads, length, dim)  # noqa: E731
    return torch.randn(shape(False)), torch.randn(shape(k_shared)), torch.randn(shape(v_shared))


def _run(inputs, grad_out, dtype, backend, autocast=False):
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = neighbor_masked_attention(q, k, v, GRID, WINDOW, backend=backend)
    out.backward(grad_out.to(out.dtype))
    return out, q.grad, k.grad, v.grad


@pytest.fixture
def dense_calls(monkeypatch):
    """Counts the calls of the dense 16-bit path; bands of 2 grid rows (several per grid)."""
    monkeypatch.setattr(blocked.low_precision, "LOW_PRECISION_BAND_SCORES", 2 * GRID[1] * GRID[0] * GRID[1])
    calls = []
    original = blocked.low_precision.DenseLowPrecisionAttention.forward

    def counting(ctx, *args):
        calls.append(args[0].dtype)
        return original(ctx, *args)

    monkeypatch.setattr(blocked.low_precision.DenseLowPrecisionAttention, "forward", staticmethod(counting))
    return calls


@pytest.mark.parametrize("k_shared,v_shared", [(True, False), (False, False), (True, True)])
def test_dense_bf16_error_is_within_twice_the_bf16_reference(dense_calls, k_shared, v_shared):
    """FlashAttention's rule: error against fp64 at most twice that of the reference computed in
    bfloat16 (plus a small slack), for the output and every gradient."""
    torch.manual_seed(0)
    inputs = _inputs(3, 2, 16, k_shared, v_shared)
    grad_out = torch.randn(3, 2, GRID[0] * GRID[1], 16)
    oracle = _run(inputs, grad_out, torch.float64, "dense")
    low_ref = _run(inputs, grad_out, torch.bfloat16, "dense")
    got = _run(inputs, grad_out, torch.bfloat16, "torch")
    assert dense_calls == [torch.bfloat16]
    for name, o, r, g in zip(("out", "dq", "dk", "dv"), oracle, low_ref, got):
        assert_within_flash_rule(name, o, r, g, torch.bfloat16)


def test_float32_inputs_under_bf16_autocast_take_the_dense_path(dense_calls):
    torch.manual_seed(1)
    inputs = _inputs(2, 2, 8, True, False)
    grad_out = torch.randn(2, 2, GRID[0] * GRID[1], 8)
    out, *grads = _run(inputs, grad_out, torch.float32, "torch", autocast=True)
    assert dense_calls == [torch.bfloat16] and out.dtype == torch.bfloat16
    oracle = _run(inputs, grad_out, torch.float64, "dense")
    torch.testing.assert_close(out.double(), oracle[0], rtol=3e-2, atol=3e-2)
    for g, o in zip(grads, oracle[1:]):
        assert g.dtype == torch.float32  # the inputs' gradients in the inputs' dtype
        torch.testing.assert_close(g.double(), o, rtol=5e-2, atol=5e-2 * o.abs().max().item())


def test_without_native_bf16_or_in_float16_the_flash_path_serves(dense_calls, monkeypatch):
    inputs = _inputs(1, 2, 8, True, False)
    grad_out = torch.randn(1, 2, GRID[0] * GRID[1], 8)
    _run(inputs, grad_out, torch.float16, "torch")
    monkeypatch.setattr(blocked.low_precision, "bf16_supported", lambda device: False)
    _run(inputs, grad_out, torch.bfloat16, "torch")
    assert dense_calls == []

