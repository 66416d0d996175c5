"""The ops as torch.library custom ops: opcheck, values and gradients against the reference,
shared k/v passed through without a batch copy, and torch.compile(fullgraph=True)."""
import pytest
import torch

from rlr_fast import blocked, ops, reference
from rlr_fast.ops import _CUSTOM_OPS

OPS = ("local_cross_attention", "neighbor_masked_attention")
GRID, WINDOW = (6, 5), (3, 3)


def _inputs(k_shared, v_shared, dtype=torch.float32, b=2, h=2, d=8):
    length = GRID[0] * GRID[1]
    make = lambda shared: torch.randn(*(() if shared else (b,)), h, length, d, dtype=dtype, requires_grad=True)
    return torch.randn(b, h, length, d, dtype=dtype, requires_grad=True), make(k_shared), make(v_shared)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("k_shared,v_shared", [(True, True), (True, False), (False, False)])
def test_opcheck(op, k_shared, v_shared):
    q, k, v = _inputs(k_shared, v_shared)
    torch.library.opcheck(_CUSTOM_OPS[op], (q, k, v, list(GRID), list(WINDOW), 0.3, "torch"))


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("k_shared,v_shared", [(True, True), (True, False), (False, False)])
def test_custom_op_matches_the_reference_in_value_and_gradient(op, k_shared, v_shared):
    q, k, v = _inputs(k_shared, v_shared, torch.float64)
    grad = torch.randn(q.shape, dtype=q.dtype)
    out = _CUSTOM_OPS[op](q, k, v, list(GRID), list(WINDOW), 0.3, "torch")
    got = torch.autograd.grad(out, (q, k, v), grad)
    expected_out = getattr(reference, op)(q, k, v, GRID, WINDOW, 0.3)
    expected = torch.autograd.grad(expected_out, (q, k, v), grad)
    torch.testing.assert_close(out, expected_out)
    for a, b in zip(got, expected):
        assert a.shape == b.shape  # a shared k or v gets a shared gradient
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("op", OPS)
def test_shared_k_and_v_reach_the_backend_shared(op, monkeypatch):
    seen = []
    original = getattr(blocked, op)
    monkeypatch.setattr(blocked, op, lambda q, k, v, *a: seen.append((k.shape, v.shape)) or original(q, k, v, *a))
    q, k, v = _inputs(True, True)
    out = _CUSTOM_OPS[op](q, k, v, list(GRID), list(WINDOW), 0.3, "torch")
    out.sum().backward()
    assert seen == [(k.shape, v.shape)] and k.dim() == 3 and v.dim() == 3
    assert k.grad.shape == k.shape and v.grad.shape == v.shape


@pytest.mark.parametrize("op", OPS)
def test_compiled_op_is_one_graph_and_matches_eager(op):
    q, k, v = _inputs(True, False)
    fn = getattr(ops, op)
    call = lambda q, k, v: fn(q, k, v, GRID, WINDOW, backend="torch")
    torch._dynamo.reset()
    compiled = torch.compile(call, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    eager = call(q, k, v)
    eager_grads = torch.autograd.grad(eager.square().sum(), (q, k, v))
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    explanation = torch._dynamo.explain(call)(q, k, v)
    assert explanation.graph_break_count == 0
    assert any(f"rlr_fast.{op}" in str(node.target) for g in explanation.graphs for node in g.graph.nodes)


@pytest.mark.parametrize("shared", [True, False])
def test_nearest_reference_custom_op(shared):
    x = torch.randn(2, 7, 5)
    ref = torch.randn(*(() if shared else (2,)), 9, 5)
    torch.library.opcheck(ops._NEAREST_OP, (x, ref, "torch"))
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, r: ops.nearest_reference(x, r, backend="torch"), fullgraph=True,
                             backend="aot_eager")
    index, similarity = compiled(x, ref)
    expected = reference.nearest_reference(x, ref, ops.NEAREST_EPS)
    assert torch.equal(index, expected[0])
    torch.testing.assert_close(similarity, expected[1])


@pytest.mark.parametrize("shared", [True, False])
def test_nearest_reference_l2_custom_op(shared):
    """The metric passes through the custom op (after the backend, with its default)."""
    x = torch.randn(2, 7, 5)
    ref = torch.randn(*(() if shared else (2,)), 9, 5)
    torch.library.opcheck(ops._NEAREST_OP, (x, ref, "torch", "l2"))
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, r: ops.nearest_reference(x, r, metric="l2", backend="torch"), fullgraph=True,
                             backend="aot_eager")
    index, distance = compiled(x, ref)
    expected = reference.nearest_reference(x, ref, ops.NEAREST_EPS, "l2")
    assert torch.equal(index, expected[0])
    torch.testing.assert_close(distance, expected[1])
    assert not torch.equal(index, reference.nearest_reference(x, ref, ops.NEAREST_EPS)[0])  # not cosine's
