"""The triton backend against the dense reference, in Triton's interpreter when there is no GPU
(conftest sets TRITON_INTERPRET=1): forward and all three gradients."""
import itertools
import os

import pytest
import torch

from rlr_fast import local_cross_attention, neighbor_masked_attention

from helpers import assert_within_flash_rule

OPS = {"lca": local_cross_attention, "mlka": neighbor_masked_attention}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs CUDA or TRITON_INTERPRET=1")


def _inputs(b, heads, grid, dim, k_shared, v_shared, dtype):
    length = grid[0] * grid[1]
    g = torch.Generator().manual_seed(0)

    def t(shared):
        shape = (heads, length, dim) if shared else (b, heads, length, dim)
        return torch.randn(shape, generator=g).to(DEVICE, dtype).requires_grad_()

    q = t(False)
    grad = torch.randn(q.shape, generator=g).to(DEVICE, dtype)
    return q, t(k_shared), t(v_shared), grad


def _run(op, q, k, v, grad, grid, window, backend):
    out = OPS[op](q, k, v, grid, window, backend=backend)
    return (out, *torch.autograd.grad(out, (q, k, v), grad))


CASES = [("lca", (5, 7), 1), ("lca", (5, 7), 3), ("lca", (6, 4), (1, 3)), ("lca", (4, 4), 9),
         ("lca", (3, 5), 15), ("lca", (17, 13), 5), ("lca", (20, 9), (7, 3)),
         ("mlka", (5, 7), 3), ("mlka", (6, 4), (1, 3)), ("mlka", (17, 13), 5), ("mlka", (20, 9), (3, 7)),
         ("mlka", (9, 12), 1)]


LAYOUTS = list(itertools.product([True, False], repeat=2))  # (k shared, v shared)
# Pairwise, not the full product: case i with layouts i and i + 2 (mod 4), so each op meets every
# layout and every case two of them; the random-shape sweep below mixes layouts with shapes too.
PAIRWISE = [(*case, *LAYOUTS[(i + j) % 4]) for i, case in enumerate(CASES) for j in (0, 2)]


@pytest.mark.parametrize("op,grid,window,k_shared,v_shared", PAIRWISE)
def test_triton_matches_reference_float32(op, grid, window, k_shared, v_shared):
    q, k, v, grad = _inputs(2, 2, grid, 16, k_shared, v_shared, torch.float32)
    ref = _run(op, q, k, v, grad, grid, window, "dense")
    got = _run(op, q, k, v, grad, grid, window, "triton")
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"{op} {name}")


@pytest.mark.parametrize("dim", [16, 32, 64, 128])
@pytest.mark.parametrize("op", ["lca", "mlka"])
def test_triton_head_dims(op, dim):
    """Every supported head dim; at 128 the fp32 backward multiplies in fp32 FMA and dK/dV take
    one launch each (block_config), so that path is checked too."""
    q, k, v, grad = _inputs(2, 2, (9, 10), dim, True, op == "lca", torch.float32)
    for a, b in zip(_run(op, q, k, v, grad, (9, 10), 3, "triton"), _run(op, q, k, v, grad, (9, 10), 3, "dense")):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# 16-bit MLKA runs the FlashAttention-2 style backward (runs of 64 tokens, band split): small odd
# grids with a partial last run, square and non-square windows, every shared/batched layout
LOW_PRECISION_CASES = [("lca", (10, 9), 3, 32, True, False), ("lca", (10, 9), 3, 128, True, False),
                       ("mlka", (10, 9), 3, 32, True, False), ("mlka", (10, 9), 3, 128, True, False),
                       ("mlka", (5, 7), 3, 16, True, True), ("mlka", (9, 6), 5, 32, False, False),
                       ("mlka", (12, 12), (3, 5), 16, False, True), ("mlka", (12, 12), 5, 32, True, False),
                       ("mlka", (9, 6), (5, 3), 16, True, False), ("mlka", (5, 7), (1, 3), 64, True, False)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("op,grid,window,dim,k_shared,v_shared", LOW_PRECISION_CASES)
def test_triton_low_precision_error_is_bounded(op, grid, window, dim, k_shared, v_shared, dtype):
    """Error against an fp64 oracle at most twice that of the reference in the same dtype (+ slack)."""
    q, k, v, grad = _inputs(2, 2, grid, dim, k_shared, v_shared, torch.float64)
    oracle = _run(op, q, k, v, grad, grid, window, "dense")
    low = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    ref = _run(op, *low, grad.to(dtype), grid, window, "dense")
    got = _run(op, *low, grad.to(dtype), grid, window, "triton")
    for name, o, r, g in zip(("out", "dq", "dk", "dv"), oracle, ref, got):
        assert_within_flash_rule(f"{op} {name}", o, r, g, dtype)


def test_triton_non_contiguous_and_deterministic():
    grid = (7, 6)
    q = torch.randn(16, 42, 2, 2).permute(3, 2, 1, 0).to(DEVICE).requires_grad_()  # (B, H, L, D), strided
    k = torch.randn(42, 2, 16).transpose(0, 1).to(DEVICE).requires_grad_()  # shared, strided
    v = torch.randn(2, 2, 42, 32)[..., ::2].to(DEVICE).requires_grad_()  # batched, D stride 2
    grad = torch.randn(2, 2, 42, 16).to(DEVICE)
    first = _run("mlka", q, k, v, grad, grid, 3, "triton")
    second = _run("mlka", q, k, v, grad, grid, 3, "triton")
    for a, b in zip(first, second):
        assert torch.equal(a, b)  # no atomics: bitwise repeatable
    ref = _run("mlka", q, k, v, grad, grid, 3, "dense")
    for a, b in zip(first, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_triton_mlka_16bit_backward_is_deterministic():
    """The 16-bit MLKA backward (shared k summed over runs of the batch in a fixed order, no
    atomics) gives bitwise equal gradients run after run; B=5 makes an uneven last run."""
    q, k, v, grad = (t.detach().half() for t in _inputs(5, 1, (9, 8), 16, True, False, torch.float32))
    runs = [_run("mlka", *(t.clone().requires_grad_() for t in (q, k, v)), grad, (9, 8), 3, "triton")
            for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_triton_clear_errors():
    q = torch.randn(1, 1, 16, 16, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="float32, float16 and bfloat16.*use backend='torch'"):
        local_cross_attention(q, q[0], q[0], (4, 4), 3, backend="triton")
    q = torch.randn(1, 1, 16, 24, device=DEVICE)
    with pytest.raises(ValueError, match=r"head dims \(16, 32, 64, 128\), got D=24"):
        local_cross_attention(q, q[0], q[0], (4, 4), 3, backend="triton")


def test_triton_mlka_16bit_refuses_grids_its_backward_cannot_index(monkeypatch):
    """16-bit MLKA's backward finds grid coordinates in fp32, exact below 2**21 tokens: a longer grid
    is refused up front with the way out; one grid row fewer, or fp32 (other kernels), is not (meta
    tensors, the forward launch stubbed: nothing is allocated or run)."""
    from rlr_fast.kernels import window_attention as wa
    from rlr_fast.kernels.neighbor_masked_attention import NeighborMaskedAttentionFunction

    monkeypatch.setattr(wa, "forward_launch", lambda *args: (lambda: None))

    gh, gw = 2 ** 11, 2 ** 10  # 2**21 tokens
    q = torch.empty(1, 1, gh * gw, 16, device="meta", dtype=torch.float16)
    with pytest.raises(ValueError, match=r"fewer than 2\*\*21 tokens.*got 2097152.*use float32 or backend='torch'"):
        NeighborMaskedAttentionFunction.apply(q, q[0], q, (gh, gw), (3, 3), 0.25)
    q32 = torch.empty(1, 1, gh * gw, 16, device="meta")
    assert NeighborMaskedAttentionFunction.apply(q32, q32[0], q32, (gh, gw), (3, 3), 0.25).shape == q32.shape
    q = torch.empty(1, 1, gh * gw - gw, 16, device="meta", dtype=torch.float16)  # one grid row fewer
    assert NeighborMaskedAttentionFunction.apply(q, q[0], q, (gh - 1, gw), (3, 3), 0.25).shape == q.shape


def test_triton_lca_reads_only_the_key_patch_of_its_tile():
    """2D tiles: a program of LCA reads only the key blocks that cover its tile's windows. A NaN
    value in the same grid row as a query, but far from it, must not reach it (a block of
    consecutive tokens spanning whole key rows would read it, and 0 * NaN is NaN)."""
    grid = (12, 24)
    q, k, v, _ = _inputs(1, 1, grid, 16, True, True, torch.float32)
    v = v.detach().clone()
    v[:, 6 * 24] = float("nan")  # the value of token (6, 0)
    out = local_cross_attention(q, k, v, grid, 3, backend="triton")[0, 0].cpu()
    y, x = torch.arange(12 * 24) // 24, torch.arange(12 * 24) % 24
    holds_it = ((y - 6).abs() <= 1) & (x <= 1)  # the queries whose windows hold that token
    assert out[holds_it].isnan().all()
    assert torch.isfinite(out[x >= 12]).all()  # rows 5-7 included: their tiles' patches end far from x = 0


def _random_cases(n, seed=7):
    """Seeded random shapes, as NATTEN sweeps them: grids from 1 to 13 a side, odd windows up to
    past the grid, batch and heads 1-3, shared or batched k and v, fp32 or fp16."""
    import random

    rng, cases = random.Random(seed), []
    while len(cases) < n:
        gh, gw = rng.randint(1, 13), rng.randint(1, 13)
        op = rng.choice(["lca", "mlka"])
        kh, kw = rng.randrange(1, gh + 4, 2), rng.randrange(1, gw + 4, 2)
        if op == "mlka" and kh // 2 >= gh // 2 and kw // 2 >= gw // 2:
            continue  # the central query would see no key: refused up front (test_ops covers the error)
        cases.append((op, (gh, gw), (kh, kw), rng.randint(1, 3), rng.randint(1, 3), rng.random() < 0.5,
                      rng.random() < 0.5, rng.choice([torch.float32, torch.float16])))
    return cases


@pytest.mark.parametrize("op,grid,window,batch,heads,k_shared,v_shared,dtype", _random_cases(16))
def test_triton_random_shapes(op, grid, window, batch, heads, k_shared, v_shared, dtype):
    q, k, v, grad = _inputs(batch, heads, grid, 16, k_shared, v_shared, torch.float64)
    oracle = _run(op, q, k, v, grad, grid, window, "dense")
    low = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    got = _run(op, *low, grad.to(dtype), grid, window, "triton")
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for name, g, o in zip(("out", "dq", "dk", "dv"), got, oracle):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), o, rtol=tol, atol=tol, msg=f"{op} {grid} {window} {name}")


# ------------------------------------------------------------------------------------------------
# Hazards: non-dense q, offsets past 2**31 elements, the device the kernels launch on
# ------------------------------------------------------------------------------------------------

def _grads_against_reference(op, q, leaf, k, v, grid, window):
    """Forward and the gradients of (leaf, k, v) of the triton backend against the reference."""
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    for backend in ("dense", "triton"):
        out = OPS[op](q, k, v, grid, window, backend=backend)
        yield (out, *torch.autograd.grad(out, (leaf, k, v), grad))


@pytest.mark.parametrize("op", ["lca", "mlka"])
def test_triton_q_slice_of_a_fused_projection(op):
    """q = qkv[..., :D] has token stride 3D: dQ is written with its own (dense) strides, not
    q's (which wrote past the end of dQ: the interpreter died in malloc)."""
    grid = (5, 6)
    qkv = torch.randn(2, 2, 30, 48).to(DEVICE).requires_grad_()
    k = torch.randn(2, 30, 16).to(DEVICE).requires_grad_()
    v = torch.randn(2, 2, 30, 16).to(DEVICE).requires_grad_()
    ref, got = _grads_against_reference(op, qkv[..., :16], qkv, k, v, grid, 3)
    for name, a, b in zip(("out", "dqkv", "dk", "dv"), got, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"{op} {name}")


@pytest.mark.parametrize("op", ["lca", "mlka"])
def test_triton_batch_expanded_q(op):
    """A q expanded over the batch (batch stride 0): each batch element's dQ lands in its own
    rows (with q's strides they all landed on the first) and autograd sums them."""
    grid = (5, 6)
    base = torch.randn(1, 2, 30, 16).to(DEVICE).requires_grad_()
    k = torch.randn(3, 2, 30, 16).to(DEVICE).requires_grad_()
    v = torch.randn(2, 30, 16).to(DEVICE).requires_grad_()
    ref, got = _grads_against_reference(op, base.expand(3, -1, -1, -1), base, k, v, grid, 3)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"{op} {name}")


_OFFSETS_PAST_INT32 = """
import torch
from rlr_fast import {op}
B, H, L, D, grid = 3, 1, 16, 16, (4, 4)
stride_b = 2**30 + 2**20  # batch element 2 starts past 2**31 elements (an int32 wraps negative)
store = torch.empty(stride_b * (B - 1) + H * L * D, dtype=torch.float16)  # 6 GB, never touched but here
q = store.as_strided((B, H, L, D), (stride_b, L * D, D, 1))
g = torch.Generator().manual_seed(0)
dense = torch.randn(B, H, L, D, generator=g).half()
q.copy_(dense)
q.requires_grad_()
dense.requires_grad_()
k, v = (torch.randn(H, L, D, generator=g).half().requires_grad_() for _ in range(2))
grad = torch.randn(B, H, L, D, generator=g).half()
got = {op}(q, k, v, grid, 3, backend="triton")
got = (got, *torch.autograd.grad(got, (q, k, v), grad))
ref = {op}(dense.double(), k.double(), v.double(), grid, 3, backend="dense")
ref = (ref, *torch.autograd.grad(ref, (dense, k, v), grad.double()))
for a, b in zip(got, ref):
    torch.testing.assert_close(a.double(), b.double(), rtol=2e-2, atol=2e-2)
print("ok")
"""


@pytest.mark.parametrize("op", ["local_cross_attention", "neighbor_masked_attention"])
def test_triton_offsets_past_int32(op):
    """Base offsets b * stride computed in 64 bits: a batch element starting past 2**31 elements
    is read and its gradients computed right (in 32 bits the offset wrapped: a segfault). The
    6 GB tensor is virtual memory; only its few touched pages are resident. Run in a child
    process so that a crash fails this test only."""
    import subprocess
    import sys

    if DEVICE != "cpu":
        pytest.skip("the virtual-memory trick is for the interpreter on the CPU")
    result = subprocess.run([sys.executable, "-c", _OFFSETS_PAST_INT32.format(op=op)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "ok" in result.stdout, (result.returncode, result.stderr[-2000:])


class _DeviceGuardSpy:
    """Stands in for torch.cuda.device: records the devices entered (a stack)."""
    stack = []

    def __init__(self, device):
        self.device = torch.device(device)

    def __enter__(self):
        self.stack.append(self.device)

    def __exit__(self, *exc):
        self.stack.pop()


def test_triton_launches_on_the_inputs_device(monkeypatch):
    """Every kernel launches under torch.cuda.device(q.device): Triton launches on the current
    device, so a tensor on cuda:1 ran on cuda:0. No GPU needed: fake cuda:1 tensors, a spy for
    torch.cuda.device and kernels that record the device current at their launch."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from rlr_fast.kernels import window_attention as wa
    from rlr_fast.kernels.local_cross_attention import LocalCrossAttentionFunction

    launched = []
    monkeypatch.setattr(torch.cuda, "device", _DeviceGuardSpy)
    monkeypatch.setattr(wa.Launch, "__call__",
                        lambda launch: launched.append((launch.name, list(_DeviceGuardSpy.stack))))
    class Ctx:  # the autograd context, without autograd's engine (which would look for a GPU)
        def save_for_backward(self, *tensors):
            self.saved_tensors = tensors

    ctx = Ctx()
    with FakeTensorMode():
        q = torch.empty(2, 2, 16, 16, device="cuda:1")
        k = torch.empty(2, 16, 16, device="cuda:1")
        out = LocalCrossAttentionFunction.forward(ctx, q, k, k, (4, 4), (3, 3), 0.25)
        LocalCrossAttentionFunction.backward(ctx, torch.empty_like(out))
    assert {name for name, _ in launched} == {"lca_fwd", "dq", "dkdv"}
    for name, stack in launched:
        assert stack and stack[-1] == torch.device("cuda:1"), f"{name} launched under {stack}"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_triton_on_the_second_gpu():
    grid = (5, 6)
    q, k, v, grad = (t.detach().to("cuda:1").requires_grad_() for t in _inputs(2, 2, grid, 16, True, False, torch.float32))
    grad = grad.detach()
    got = _run("lca", q, k, v, grad, grid, 3, "triton")
    ref = _run("lca", q, k, v, grad, grid, 3, "dense")
    for a, b in zip(got, ref):
        assert a.device == torch.device("cuda:1")
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("batch", [3, 8])
def test_triton_lca_folds_the_batch_into_the_query_tile(batch):
    """16-bit LCA with a shared k and v folds batch elements into one query tile (4 for B=3,
    with a padding batch row, 8 for B=8): against the fp64 oracle, forward and gradients."""
    from rlr_fast.kernels.window_attention import lca_fold

    grid = (7, 9)
    q, k, v, grad = _inputs(batch, 2, grid, 16, True, True, torch.float64)
    assert lca_fold(batch, k.half(), v.half()) == {3: 4, 8: 8}[batch]
    oracle = _run("lca", q, k, v, grad, grid, 5, "dense")
    low = [t.detach().half().requires_grad_() for t in (q, k, v)]
    got = _run("lca", *low, grad.half(), grid, 5, "triton")
    for name, g, o in zip(("out", "dq", "dk", "dv"), got, oracle):
        torch.testing.assert_close(g.double(), o, rtol=2e-2, atol=2e-2, msg=f"B={batch} {name}")


@pytest.mark.parametrize("grid,window,k_shared,v_shared", [((20, 16), 3, True, False), ((9, 40), (5, 3), True, False),
                                                            ((20, 16), (3, 5), False, True), ((17, 13), 3, True, True)])
def test_triton_mlka_fast_loop_16bit(grid, window, k_shared, v_shared):
    """16-bit MLKA forward and backward run runs of 64 tokens: grids large enough for blocks outside
    the band (the unmasked fast loops), a band in the middle, and a partial last block."""
    q, k, v, grad = _inputs(2, 1, grid, 32, k_shared, v_shared, torch.float64)
    oracle = _run("mlka", q, k, v, grad, grid, window, "dense")
    low = [t.detach().half().requires_grad_() for t in (q, k, v)]
    got = _run("mlka", *low, grad.half(), grid, window, "triton")
    for name, g, o in zip(("out", "dq", "dk", "dv"), got, oracle):
        torch.testing.assert_close(g.double(), o, rtol=2e-2, atol=2e-2, msg=f"{grid} {name}")


# ------------------------------------------------------------------------------------------------
# LCA's backward with the batch folded (issue 18 part 4): its dQ and dK/dV kernels
# ------------------------------------------------------------------------------------------------

class _LaunchSpy:
    """Counts the launches of a backward: every Triton kernel launch (`Launch.__call__`, by name) and
    every torch operation that computes (a dispatch spy; allocations and views launch nothing), the
    torch work inside a Triton launch (the interpreter's copies) not counted."""
    FREE = ("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "view", "_unsafe_view",
            "reshape", "detach", "alias", "as_strided", "t", "transpose", "permute", "expand", "unsqueeze",
            "squeeze", "select", "slice", "_reshape_alias", "lift_fresh")

    def __init__(self, monkeypatch):
        from torch.utils._python_dispatch import TorchDispatchMode

        from rlr_fast.kernels import window_attention as wa

        self.kernels, self.torch_ops, inside = [], [], [False]
        call = wa.Launch.__call__

        def launch(launch_self):
            self.kernels.append(launch_self.name)
            inside[0] = True
            try:
                call(launch_self)
            finally:
                inside[0] = False

        monkeypatch.setattr(wa.Launch, "__call__", launch)
        spy = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
                if not inside[0] and func.overloadpacket.__name__ not in _LaunchSpy.FREE:
                    spy.torch_ops.append(func.overloadpacket.__name__)
                return func(*args, **(kwargs or {}))

        self.mode = Mode

    def backward(self, out, inputs, grad):
        """The gradients of `out` with respect to `inputs`, the launches of the backward recorded."""
        self.kernels.clear()
        self.torch_ops.clear()
        with self.mode():
            return torch.autograd.grad(out, inputs, grad)

    @property
    def launches(self) -> int:
        return len(self.kernels) + len(self.torch_ops)


def _low(dtype, *tensors):
    return [t.detach().to(dtype).requires_grad_() for t in tensors]


@pytest.mark.parametrize("batch", [3, 8])
def test_triton_lca_16bit_backward_takes_at_most_three_launches(batch, monkeypatch):
    """Issue 18 part 4: 16-bit LCA's backward in RLR's layout (k and v shared) is two Triton launches,
    the dQ kernel computing delta = rowsum(dO * O) and the dK/dV kernel summing the shared gradients
    over the batch inside its products: no torch glue. The 2D-tile path (RLR_FAST_LCA_BACKWARD=tiles)
    takes more (delta's casts, product and sum, the splits' sums and casts): the spy counts them."""
    from rlr_fast.kernels import window_attention as wa

    spy = _LaunchSpy(monkeypatch)
    grid = (9, 7)
    q, k, v, grad = _inputs(batch, 2, grid, 16, True, True, torch.float32)
    low = _low(torch.float16, q, k, v)
    out = local_cross_attention(*low, grid, 5, backend="triton")
    spy.backward(out, low, grad.half())
    assert spy.kernels == ["lca_dq", "lca_dkdv"] and spy.torch_ops == []
    assert spy.launches <= 3
    monkeypatch.setattr(wa, "LCA_FUSED_BACKWARD", False)  # the 2D-tile kernels and their glue
    out = local_cross_attention(*low, grid, 5, backend="triton")
    spy.backward(out, low, grad.half())
    assert spy.kernels[0] == "dq" and spy.launches > 3, (spy.kernels, spy.torch_ops)


# (batch, grid, window, head dim, k shared, v shared): folds of 8 (B=8), 4 with a padding batch row
# (B=3), 2 and 1 (B=1, a window larger than the grid); odd grids, square and non-square windows;
# batched k and v (no fold: a program per key tile and batch element) and mixed layouts (a program
# loops over the batch, summing the shared gradient)
LCA_BACKWARD_CASES = [(8, (9, 6), (5, 3), 16, True, True), (3, (10, 9), 3, 32, True, True),
                      (2, (5, 7), (1, 3), 64, True, True), (1, (4, 5), 9, 16, True, True),
                      (2, (7, 5), 5, 16, False, False), (3, (6, 11), 3, 16, True, False),
                      (2, (6, 5), (3, 5), 16, False, True), (2, (5, 6), 3, 128, True, True)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch,grid,window,dim,k_shared,v_shared", LCA_BACKWARD_CASES)
def test_triton_lca_folded_backward_matches_the_fp64_reference(batch, grid, window, dim, k_shared, v_shared,
                                                               dtype, monkeypatch):
    """16-bit LCA runs the batch-folded dQ and dK/dV kernels: each gradient's error against the fp64
    reference at most twice that of the reference backend in the same dtype (+ slack)."""
    spy = _LaunchSpy(monkeypatch)
    q, k, v, grad = _inputs(batch, 2, grid, dim, k_shared, v_shared, torch.float64)
    oracle = _run("lca", q, k, v, grad, grid, window, "dense")
    ref = _run("lca", *_low(dtype, q, k, v), grad.to(dtype), grid, window, "dense")
    low = _low(dtype, q, k, v)
    out = local_cross_attention(*low, grid, window, backend="triton")
    got = (out, *spy.backward(out, low, grad.to(dtype)))
    assert spy.kernels == ["lca_dq", "lca_dkdv"]
    for name, o, r, g in zip(("out", "dq", "dk", "dv"), oracle, ref, got):
        assert_within_flash_rule(name, o, r, g, dtype)


@pytest.mark.parametrize("batch,grid,window,dim,k_shared,v_shared", LCA_BACKWARD_CASES)
def test_triton_lca_folded_backward_kernels_in_fp32(batch, grid, window, dim, k_shared, v_shared, monkeypatch):
    """The batch-folded kernels launched directly on fp32 tensors (fp32 LCA keeps the 2D-tile kernels:
    this checks the kernels' arithmetic without 16-bit rounding), folded as 16-bit LCA would be:
    dQ, dK, dV against the fp64 reference (the interpreter multiplies in fp32; a GPU in TF32)."""
    from rlr_fast.kernels import window_attention as wa

    q, k, v, grad = _inputs(batch, 2, grid, dim, k_shared, v_shared, torch.float64)
    oracle = _run("lca", q, k, v, grad, grid, window, "dense")
    fold = wa.lca_fold
    monkeypatch.setattr(wa, "lca_fold", lambda b, k_, v_: fold(b, k_.half(), v_.half()))
    q32, k32, v32, g32 = (t.detach().float() for t in (q, k, v, grad))
    b, h, length, d = q32.shape
    radius, scale = (window // 2, window // 2) if isinstance(window, int) else (window[0] // 2, window[1] // 2), d ** -0.5
    o = torch.empty_like(q32)
    lse = torch.empty(b * h * length, device=q32.device)
    wa.forward_launch(q32, k32, v32, o, lse, grid, radius, scale, False)()
    dq, delta = torch.full_like(q32, float("nan")), torch.full_like(lse, float("nan"))
    dk, dv = (t.fill_(float("nan")) for t in wa.kv_gradient_buffers(k32, v32, 1))
    launches = wa._lca_backward_launches(q32, k32, v32, g32, dq, dk, dv, lse, delta, grid, radius, scale, o)
    assert [launch.name for launch in launches] == ["lca_dq", "lca_dkdv"]
    assert launches[0].args["FOLD"] == fold(b, k32.half(), v32.half())
    for launch in launches:
        launch()
    torch.testing.assert_close(delta.double(), (oracle[0] * grad).sum(-1).reshape(-1), rtol=1e-4, atol=1e-4)
    tol = 1e-4 if os.environ.get("TRITON_INTERPRET") == "1" else 5e-3
    for name, g, o_ in zip(("dq", "dk", "dv"), (dq, dk, dv), oracle[1:]):
        torch.testing.assert_close(g.double(), o_, rtol=tol, atol=tol, msg=name)


def test_triton_lca_16bit_backward_is_deterministic():
    """The batch-folded backward (no atomics, a shared k/v summed over the batch in a fixed order
    inside one program) gives bitwise equal gradients run after run; B=5 pads a fold of 8."""
    q, k, v, grad = (t.detach().half() for t in _inputs(5, 1, (9, 8), 16, True, True, torch.float32))
    runs = [_run("lca", *(t.clone().requires_grad_() for t in (q, k, v)), grad, (9, 8), 3, "triton")
            for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


_LCA_TILES_BACKWARD = """
import torch
from rlr_fast import local_cross_attention
from rlr_fast.kernels import window_attention as wa
q = torch.empty(2, 1, 64, 16, device="meta", dtype=torch.float16)
lse = torch.empty(128, device="meta")
print(",".join(l.name for l in wa.backward_launches(q, q[0], q[0], q, q, q[0], q[0], lse, lse, (8, 8), (1, 1), 1.0,
                                                    False)))
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(2, 1, 72, 16, generator=g) for _ in range(3))
grads = []
for backend in ("triton", "dense"):
    t = [x.to(torch.float16 if backend == "triton" else torch.float64).requires_grad_() for x in (q, k[0], v[0])]
    out = local_cross_attention(*t, (9, 8), 3, backend=backend)
    grads.append(torch.autograd.grad(out, t, torch.ones_like(out)))
for a, b in zip(*grads):
    torch.testing.assert_close(a.double(), b, rtol=2e-2, atol=2e-2)
print("ok")
"""


@pytest.mark.parametrize("mode,names", [("tiles", "dq,dkdv"), ("fold", "lca_dq,lca_dkdv")])
def test_triton_lca_backward_switch_through_the_environment(mode, names):
    """RLR_FAST_LCA_BACKWARD=tiles (read at import) keeps 16-bit LCA on the 2D-tile dQ and dK/dV
    kernels (the numerics before issue 18 part 4); the default runs the batch-folded ones; both
    match the fp64 reference."""
    import subprocess
    import sys

    env = {**os.environ, "RLR_FAST_LCA_BACKWARD": mode}
    if DEVICE == "cpu":
        env["TRITON_INTERPRET"] = "1"
    result = subprocess.run([sys.executable, "-c", _LCA_TILES_BACKWARD], capture_output=True, text=True, env=env,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == [names, "ok"]
