"""The ops as torch.library custom ops: opcheck, values and gradients against the reference,
shared k/v passed through without a batch copy, torch.compile(fullgraph=True), and the backward the
compiled graph runs (Triton's with the triton backend, the chunked one with torch)."""
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
    out, _ = _CUSTOM_OPS[op](q, k, v, list(GRID), list(WINDOW), 0.3, "torch")
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
    out, _ = _CUSTOM_OPS[op](q, k, v, list(GRID), list(WINDOW), 0.3, "torch")
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


def _compiled_graphs(module, *inputs):
    """The forward and backward graphs AOTAutograd builds for ``torch.compile(module)``, captured by
    a backend whose compilers record them, after one forward and backward."""
    from torch._dynamo.backends.common import aot_autograd

    graphs = {}

    def capture(kind):
        def compiler(gm, example_inputs):
            graphs[kind] = gm
            return gm
        return compiler

    torch._dynamo.reset()
    compiled = torch.compile(module, backend=aot_autograd(fw_compiler=capture("forward"),
                                                          bw_compiler=capture("backward")), fullgraph=True)
    out = compiled(*inputs)
    out.float().sum().backward()
    return {kind: [str(n.target) for n in gm.graph.nodes if n.op == "call_function"] for kind, gm in graphs.items()}


def test_compiled_rlr_layer_backward_runs_the_triton_backward(monkeypatch):
    """torch.compile of an RLRLayer on the backend that ``auto`` picks on CUDA (triton): the backward
    graph AOTAutograd builds calls the Triton backward op of both attention ops (dQ and dK/dV kernels
    from the saved log-sum-exp), not the chunked torch backward. Traced on meta tensors (shapes only):
    fake CUDA tensors cannot pass through the autograd engine on a machine without a CUDA driver."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from rlr_fast.models.rlr import RLRLayer

    with FakeTensorMode(allow_non_fake_inputs=True):  # on CUDA, auto is the triton backend
        assert ops.resolve_backend("auto", torch.empty(1, device="cuda").device, torch.float16, 32) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets the triton backend take non-CUDA (meta) tensors
    layer = RLRLayer(64, 2, (4, 4), (3, 3), backend="triton").to("meta", torch.float16)
    y = torch.empty(2, 16, 64, device="meta", dtype=torch.float16, requires_grad=True)
    ref_heads = layer.reference_heads(torch.empty(16, 64, device="meta", dtype=torch.float16))
    graphs = _compiled_graphs(layer, y, ref_heads)
    for op in OPS:
        assert f"rlr_fast.{op}.default" in graphs["forward"]
        assert f"rlr_fast.{op}_triton_backward.default" in graphs["backward"], graphs["backward"]
        assert f"rlr_fast.{op}_backward.default" not in graphs["backward"]


def test_compiled_torch_backend_keeps_the_chunked_backward():
    from rlr_fast.models.rlr import RLRLayer

    layer = RLRLayer(32, 2, (4, 4), (3, 3), backend="torch")
    y = torch.randn(2, 16, 32, requires_grad=True)
    graphs = _compiled_graphs(layer, y, layer.reference_heads(torch.randn(16, 32)))
    for op in OPS:
        assert f"rlr_fast.{op}_backward.default" in graphs["backward"]
        assert f"rlr_fast.{op}_triton_backward.default" not in graphs["backward"]


@pytest.mark.skipif(not torch.cuda.is_available() and __import__("os").environ.get("TRITON_INTERPRET") != "1",
                    reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("op", OPS)
def test_triton_custom_op_compiled_gradients_match_eager(op):
    """The triton backend's custom op under torch.compile (Triton forward and backward, here in the
    interpreter) gives eager autograd's values and gradients, a shared k and batched v; and opcheck
    passes on the op with the triton backend (its lse output, its registered backward)."""
    q, k, v = _inputs(True, False, b=2, h=2, d=16)
    fn = getattr(ops, op)
    call = lambda q, k, v: fn(q, k, v, GRID, WINDOW, backend="triton")  # noqa: E731
    grad = torch.randn(q.shape)
    eager = call(q, k, v)
    eager_grads = torch.autograd.grad(eager, (q, k, v), grad)
    torch._dynamo.reset()
    compiled = torch.compile(call, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, eager_grads):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    expected = torch.autograd.grad(getattr(reference, op)(q.double(), k.double(), v.double(), GRID, WINDOW,
                                                          16 ** -0.5), (q, k, v), grad.double())
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-3, atol=1e-3)
    _, lse = _CUSTOM_OPS[op](q, k, v, list(GRID), list(WINDOW), 0.25, "triton")
    assert lse.shape == (2 * 2 * GRID[0] * GRID[1],) and lse.dtype == torch.float32
    torch.library.opcheck(_CUSTOM_OPS[op], (q, k, v, list(GRID), list(WINDOW), 0.25, "triton"))
