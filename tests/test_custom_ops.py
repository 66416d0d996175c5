"""The ops as torch.library custom ops: opcheck, values and gradients against the reference,
shared k/v passed through without a batch copy, torch.compile(fullgraph=True), and the backward the
compiled graph runs (Triton's with the triton backend, the chunked one with torch)."""
import pytest
import torch

from rlr_fast import blocked, dense, ops
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
    expected_out = getattr(dense, op)(q, k, v, GRID, WINDOW, 0.3)
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
    expected = dense.nearest_reference(x, ref, ops.NEAREST_EPS)
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
    expected = dense.nearest_reference(x, ref, ops.NEAREST_EPS, "l2")
    assert torch.equal(index, expected[0])
    torch.testing.assert_close(distance, expected[1])
    assert not torch.equal(index, dense.nearest_reference(x, ref, ops.NEAREST_EPS)[0])  # not cosine's


def _graph_recorder():
    """A dict of recorded graphs and a maker of AOTAutograd compilers that record into it by kind."""
    graphs = {}

    def capture(kind):
        def compiler(gm, example_inputs):
            graphs[kind] = gm
            return gm
        return compiler
    return graphs, capture


def _compiled_graphs(module, *inputs, grad=None):
    """The forward and backward graphs AOTAutograd builds for ``torch.compile(module)``, captured by
    a backend whose compilers record them, after one forward and backward (of ``out.backward(grad)``,
    ones without it)."""
    from torch._dynamo.backends.common import aot_autograd

    graphs, capture = _graph_recorder()

    torch._dynamo.reset()
    compiled = torch.compile(module, backend=aot_autograd(fw_compiler=capture("forward"),
                                                          bw_compiler=capture("backward")), fullgraph=True)
    out = compiled(*inputs)
    out.backward(torch.ones_like(out) if grad is None else grad)
    return {kind: [str(n.target) for n in gm.graph.nodes if n.op == "call_function"] for kind, gm in graphs.items()}


def _fake_cuda_compiled_graphs(module, *inputs):
    """The forward and backward graphs ``torch.compile(module)`` gets on a GPU, built without one.

    Dynamo traces the module on fake CUDA tensors (so every device decision, e.g. what backend
    ``auto`` picks, is the one made on CUDA) into the graph it hands to its backend; AOTAutograd
    then builds the forward and backward graphs of that very graph from meta tensors of the same
    shapes, strides and dtypes. (AOTAutograd cannot trace the joint on fake CUDA tensors here: the
    autograd engine asks the CUDA driver for the device's primary context.) ``module`` and
    ``inputs`` are made inside the caller's FakeTensorMode on "cuda"."""
    from torch._functorch.aot_autograd import aot_module_simplified

    dynamo = {}

    def dynamo_backend(gm, example_inputs):
        dynamo.update(gm=gm, inputs=example_inputs)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(module, backend=dynamo_backend, fullgraph=True)(*inputs)
    assert all(t.device.type == "cuda" for t in dynamo["inputs"])
    graphs, capture = _graph_recorder()

    meta = [torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta").requires_grad_(t.requires_grad)
            for t in dynamo["inputs"]]
    compiled = aot_module_simplified(dynamo["gm"], meta, fw_compiler=capture("forward"),
                                     bw_compiler=capture("backward"))
    out = compiled(*meta)
    (out[0] if isinstance(out, (list, tuple)) else out).float().sum().backward()
    return graphs


def test_compiled_rlr_layer_on_cuda_runs_the_triton_backward():
    """torch.compile of an RLRLayer with its default backend on (fake) CUDA tensors: the forward
    graph calls both attention ops with the triton backend, and the backward graph AOTAutograd
    builds calls their Triton backward ops (dQ and dK/dV kernels) with the forward's log-sum-exp,
    float32 (B * heads * L,), and never the chunked torch backward."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from rlr_fast.models.rlr import RLRLayer

    pytest.importorskip("triton")  # without it (off Linux) auto on CUDA is the torch backend
    b, heads, length = 2, 2, 16
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)  # fake parameters cannot be converted by .half()
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), torch.device("cuda"):
            layer = RLRLayer(64, heads, (4, 4), (3, 3))  # backend "auto"
            y = torch.empty(b, length, 64, requires_grad=True)
            ref_heads = layer.reference_heads(torch.empty(length, 64))
            assert y.dtype == layer.lca.q_proj.weight.dtype == torch.float16
            graphs = _fake_cuda_compiled_graphs(layer, y, ref_heads)
    finally:
        torch.set_default_dtype(default_dtype)
    calls = {kind: {str(n.target): n for n in gm.graph.nodes if n.op == "call_function"}
             for kind, gm in graphs.items()}
    for op in OPS:
        assert calls["forward"][f"rlr_fast.{op}.default"].args[-1] == "triton"
        assert f"rlr_fast.{op}_backward.default" not in calls["backward"], list(calls["backward"])
        fused = calls["backward"].get(f"rlr_fast.{op}_triton_backward.default")
        assert fused is not None, list(calls["backward"])
        lse = fused.args[2].meta["val"]  # (grad_out, out, lse, q, k, v, grid, window, scale)
        assert lse.shape == (b * heads * length,) and lse.dtype == torch.float32


def test_compiled_rlr_layer_on_cpu_keeps_the_chunked_backward_and_trains_like_the_reference():
    """On the CPU the default backend is torch: the compiled backward graph calls the chunked
    backward of both ops (no Triton), and the compiled layer's gradients (input, reference heads,
    every parameter) equal those of an eager layer with the dense reference backend."""
    from rlr_fast.models.rlr import RLRLayer

    torch.manual_seed(0)
    layer = RLRLayer(32, 2, (4, 4), (3, 3))  # backend "auto"
    oracle = RLRLayer(32, 2, (4, 4), (3, 3), backend="dense")
    oracle.load_state_dict(layer.state_dict())
    y, ref = torch.randn(2, 16, 32, requires_grad=True), torch.randn(16, 32, requires_grad=True)
    grad = torch.randn(2, 16, 32)  # not ones: the sum of a LayerNorm's output has no gradient upstream
    graphs = _compiled_graphs(layer, y, layer.reference_heads(ref), grad=grad)  # one forward and backward
    got = [t.grad.clone() for t in (y, ref, *layer.parameters())]
    y.grad = ref.grad = None
    oracle(y, oracle.reference_heads(ref)).backward(grad)
    expected = [t.grad for t in (y, ref, *oracle.parameters())]
    for op in OPS:
        assert f"rlr_fast.{op}_backward.default" in graphs["backward"]
        assert f"rlr_fast.{op}_triton_backward.default" not in graphs["backward"]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


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
    expected = torch.autograd.grad(getattr(dense, op)(q.double(), k.double(), v.double(), GRID, WINDOW,
                                                          16 ** -0.5), (q, k, v), grad.double())
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-3, atol=1e-3)
    _, lse = _CUSTOM_OPS[op](q, k, v, list(GRID), list(WINDOW), 0.25, "triton")
    assert lse.shape == (2 * 2 * GRID[0] * GRID[1],) and lse.dtype == torch.float32
    torch.library.opcheck(_CUSTOM_OPS[op], (q, k, v, list(GRID), list(WINDOW), 0.25, "triton"))
