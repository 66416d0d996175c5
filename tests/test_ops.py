"""The two ops: semantics, the torch backend against the dense reference, errors, module API."""
import importlib.util
import itertools
import math
import warnings

import pytest
import torch
from torch import nn

import rlr_fast.blocked as blocked
from rlr_fast import (LocalCrossAttention, NeighborMaskedAttention, local_cross_attention,
                      neighbor_masked_attention)
from rlr_fast.ops import resolve_backend
from rlr_fast.windows import complement_is_empty

from helpers import assert_within_flash_rule

OPS = {"lca": local_cross_attention, "mlka": neighbor_masked_attention}


def make_inputs(b, heads, grid, dim, k_shared, v_shared, dtype=torch.float64, requires_grad=True):
    length = grid[0] * grid[1]

    def t(shared):
        shape = (heads, length, dim) if shared else (b, heads, length, dim)
        return torch.randn(shape, dtype=dtype).requires_grad_(requires_grad)

    return t(False), t(k_shared), t(v_shared)


def loop_oracle(q, k, v, grid, window, complement, scale=None):
    """Attention written from the definition, one query at a time, in float64."""
    h, w = grid
    kh, kw = (window, window) if isinstance(window, int) else window
    b, heads, length, dim = q.shape
    scale = dim ** -0.5 if scale is None else scale
    k = k.expand(b, *k.shape[-3:]) if k.dim() == 3 else k
    v = v.expand(b, *v.shape[-3:]) if v.dim() == 3 else v
    out = torch.zeros(b, heads, length, dim, dtype=torch.float64)
    for i in range(length):
        yi, xi = divmod(i, w)
        keys = [j for j in range(length)
                if (abs(yi - j // w) <= kh // 2 and abs(xi - j % w) <= kw // 2) != complement]
        s = torch.einsum("bhd,bhjd->bhj", q[:, :, i].double(), k[:, :, keys].double()) * scale
        out[:, :, i] = torch.einsum("bhj,bhjd->bhd", torch.softmax(s, -1), v[:, :, keys].double())
    return out


def forward_backward(op, q, k, v, grid, window, backend, grad_out):
    out = op(q, k, v, grid, window, backend=backend)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    return (out, *grads)


# ------------------------------------------------------------------------------------------------
# The reference against the definition
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("op", ["lca", "mlka"])
@pytest.mark.parametrize("grid,window", [((5, 7), 3), ((6, 4), (1, 3)), ((4, 9), (3, 5))])
def test_reference_matches_definition(op, grid, window):
    q, k, v = make_inputs(2, 2, grid, 4, k_shared=True, v_shared=False, requires_grad=False)
    out = OPS[op](q, k, v, grid, window, backend="dense")
    torch.testing.assert_close(out, loop_oracle(q, k, v, grid, window, op == "mlka"), rtol=1e-12, atol=1e-12)


def test_window_is_clipped_not_shifted():
    # With v = one-hot token ids, the output is the attention distribution over keys: a corner
    # query of a 5x5 grid with a 3x3 window must spread over exactly its 4 in-grid neighbours.
    grid, length = (5, 5), 25
    probs = local_cross_attention(torch.zeros(1, 1, length, length), torch.zeros(1, length, length),
                                  torch.eye(length).unsqueeze(0), grid, 3, backend="torch")[0, 0]
    corner = probs[0].reshape(5, 5)
    expected = torch.zeros(5, 5)
    expected[:2, :2] = 0.25
    torch.testing.assert_close(corner, expected)
    centre = probs[12].reshape(5, 5)
    expected = torch.zeros(5, 5)
    expected[1:4, 1:4] = 1 / 9
    torch.testing.assert_close(centre, expected)


def test_complement_is_empty_matches_brute_force():
    for h, w, kh, kw in itertools.product(range(1, 7), range(1, 7), (1, 3, 5, 7, 9), (1, 3, 5, 7, 9)):
        brute = any(all(abs(y - yy) <= kh // 2 and abs(x - xx) <= kw // 2 for yy in range(h) for xx in range(w))
                    for y in range(h) for x in range(w))
        assert complement_is_empty((h, w), (kh, kw)) == brute, (h, w, kh, kw)


# ------------------------------------------------------------------------------------------------
# torch backend against the reference
# ------------------------------------------------------------------------------------------------

LCA_CASES = [((5, 7), 1), ((5, 7), 3), ((6, 4), (1, 3)), ((4, 4), 9), ((9, 9), 5), ((3, 8), (5, 1)),
             ((7, 5), (3, 7)), ((2, 3), 15), ((11, 6), (7, 3))]
MLKA_CASES = [((5, 7), 1), ((5, 7), 3), ((6, 4), (1, 3)), ((9, 9), 5), ((3, 8), 1), ((7, 5), (3, 1)),
              ((11, 6), (5, 3)), ((2, 5), 3)]


@pytest.fixture(params=["default", "tiny_chunks"])
def chunking(request, monkeypatch):
    """Run each case as shipped and with one group / one query row per chunk."""
    if request.param == "tiny_chunks":
        monkeypatch.setattr(blocked.chunked, "CHUNK_ELEMENTS", 1)
        monkeypatch.setattr(blocked.flash, "FLASH_BAND_QUERIES", 1)
        monkeypatch.setattr(blocked.flash, "FLASH_BAND_KEYS", 1)
    return request.param


@pytest.mark.parametrize("k_shared,v_shared", list(itertools.product([True, False], repeat=2)))
@pytest.mark.parametrize("op,grid,window",
                         [("lca", g, w) for g, w in LCA_CASES] + [("mlka", g, w) for g, w in MLKA_CASES])
def test_torch_matches_reference_float64(op, grid, window, k_shared, v_shared, chunking):
    q, k, v = make_inputs(3, 2, grid, 8, k_shared, v_shared)
    grad_out = torch.randn(q.shape, dtype=q.dtype)
    ref = forward_backward(OPS[op], q, k, v, grid, window, "dense", grad_out)
    got = forward_backward(OPS[op], q, k, v, grid, window, "torch", grad_out)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"{op} {name}")


@pytest.mark.parametrize("tile", [(1, 1), (2, 2), (2, 4), (4, 4), (3, 5)])
@pytest.mark.parametrize("k_shared", [True, False])
def test_torch_lca_matches_reference_with_every_query_tile(tile, k_shared, monkeypatch):
    """The chunked LCA is exact whatever tile its rule picks (lca_tile: by batch and sharing),
    on grids the tile does not divide, with windows smaller and larger than the tile."""
    monkeypatch.setattr(blocked, "lca_tile", lambda grid, window, batch, shared: tile)
    for grid, window in [((9, 9), 5), ((11, 6), (7, 3)), ((5, 7), 1)]:
        q, k, v = make_inputs(8, 2, grid, 8, k_shared, k_shared)
        grad_out = torch.randn(q.shape, dtype=q.dtype)
        ref = forward_backward(local_cross_attention, q, k, v, grid, window, "dense", grad_out)
        got = forward_backward(local_cross_attention, q, k, v, grid, window, "torch", grad_out)
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"tile {tile} grid {grid} {name}")


def test_lca_tiles_follow_the_batch_folded_into_their_rows():
    """4 x 4 query tiles, except 2 x 4 where a shared k folds 8 or more batch elements into the
    rows (benchmarks/results/lca-tiles.json); never larger than the grid."""
    assert blocked.lca_tile((32, 32), (7, 7), batch=2, shared=True) == (4, 4)
    assert blocked.lca_tile((32, 32), (7, 7), batch=8, shared=True) == (2, 4)
    assert blocked.lca_tile((32, 32), (7, 7), batch=8, shared=False) == (4, 4)
    assert blocked.lca_tile((3, 2), (3, 3), batch=1, shared=True) == (3, 2)


@pytest.mark.parametrize("op", ["lca", "mlka"])
@pytest.mark.parametrize("dim", [16, 32, 64])
def test_torch_matches_reference_float32(op, dim):
    grid = (12, 10)
    q, k, v = make_inputs(2, 4, grid, dim, True, op == "lca", dtype=torch.float32)
    grad_out = torch.randn(q.shape)
    ref = forward_backward(OPS[op], q, k, v, grid, 5, "dense", grad_out)
    got = forward_backward(OPS[op], q, k, v, grid, 5, "torch", grad_out)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_low_precision_rule_rejects_a_path_ten_times_worse_than_the_reference(dtype):
    """The rule's slack is one ulp at the output's scale, not an absolute 1e-2: a path whose error
    is 10x the same-dtype reference's fails it, one as accurate as the reference passes."""
    oracle = 0.25 * torch.randn(2, 4, 64, 32, dtype=torch.float64)  # an attention output's scale
    low_ref = oracle.to(dtype)  # the error of rounding once to dtype
    step = (low_ref.double() - oracle).abs().max()
    worse = (oracle + 10 * step * torch.sign(torch.randn_like(oracle))).to(dtype)
    if dtype == torch.float16:  # what the former absolute slack let through
        assert (worse.double() - oracle).abs().max() <= 2 * step + 1e-2
    assert_within_flash_rule("as accurate", oracle, low_ref, low_ref.clone(), dtype)
    with pytest.raises(AssertionError, match="bound"):
        assert_within_flash_rule("10x worse", oracle, low_ref, worse, dtype)


@pytest.mark.parametrize("op", ["lca", "mlka"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torch_low_precision_error_is_bounded(op, dtype):
    """FlashAttention's rule: error against an fp64 oracle at most twice that of the reference
    computed in the same low precision, plus a small slack."""
    grid = (8, 8)
    q64, k64, v64 = make_inputs(2, 2, grid, 32, True, False)
    grad_out = torch.randn(q64.shape, dtype=torch.float64)
    oracle = forward_backward(OPS[op], q64, k64, v64, grid, 3, "dense", grad_out)
    low = [t.detach().to(dtype).requires_grad_() for t in (q64, k64, v64)]
    ref_low = forward_backward(OPS[op], *low, grid, 3, "dense", grad_out.to(dtype))
    got_low = forward_backward(OPS[op], *low, grid, 3, "torch", grad_out.to(dtype))
    for name, o, r, g in zip(("out", "dq", "dk", "dv"), oracle, ref_low, got_low):
        assert_within_flash_rule(f"{op} {name}", o, r, g, dtype)


@pytest.mark.parametrize("backend", ["dense", "torch"])
@pytest.mark.parametrize("op,k_shared,v_shared", [("lca", True, True), ("lca", False, True),
                                                  ("mlka", True, False), ("mlka", False, False)])
def test_gradcheck_float64(op, backend, k_shared, v_shared, monkeypatch):
    monkeypatch.setattr(blocked.chunked, "CHUNK_ELEMENTS", 64)  # several chunks
    monkeypatch.setattr(blocked.flash, "FLASH_BAND_QUERIES", 4)  # several bands
    monkeypatch.setattr(blocked.flash, "FLASH_BAND_KEYS", 4)
    grid = (4, 5)
    q, k, v = make_inputs(2, 2, grid, 4, k_shared, v_shared)
    assert torch.autograd.gradcheck(
        lambda q, k, v: OPS[op](q, k, v, grid, 3, backend=backend), (q, k, v), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("op", ["lca", "mlka"])
def test_non_contiguous_inputs(op):
    grid = (6, 5)
    base_q = torch.randn(6, 30, 2, 3, dtype=torch.float64)  # (D', L, heads, B) then permuted
    q = base_q.permute(3, 2, 1, 0)[..., :4]
    k = torch.randn(30, 2, 4, dtype=torch.float64).transpose(0, 1)
    v = torch.randn(3, 2, 30, 8, dtype=torch.float64)[..., ::2]
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    ref = OPS[op](q.contiguous(), k.contiguous(), v.contiguous(), grid, 3, backend="dense")
    torch.testing.assert_close(OPS[op](q, k, v, grid, 3, backend="torch"), ref, rtol=1e-10, atol=1e-10)


def test_scale_is_applied():
    grid = (4, 4)
    q, k, v = make_inputs(1, 1, grid, 8, True, True, requires_grad=False)
    for backend in ("dense", "torch"):
        torch.testing.assert_close(local_cross_attention(q, k, v, grid, 3, scale=0.5, backend=backend),
                                   local_cross_attention(q * 0.5 * math.sqrt(8), k, v, grid, 3, backend=backend))


def test_auto_backend_is_torch_on_cpu():
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("auto", torch.device("cuda")) == "triton"


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------

def _good():
    return torch.randn(2, 2, 12, 4), torch.randn(2, 12, 4), torch.randn(2, 2, 12, 4)


@pytest.mark.parametrize("mutate,error,pattern", [
    (lambda q, k, v: (q, k, v, (3, 5), 3), ValueError, "grid 3x5 has 15 tokens"),
    (lambda q, k, v: (q, k, v, (3, 4), 2), ValueError, "odd"),
    (lambda q, k, v: (q, k, v, (3, 4), (3, 0)), ValueError, "odd and positive"),
    (lambda q, k, v: (q, k, v, (3, 4), -1), ValueError, "odd and positive"),
    (lambda q, k, v: (q, k, v, (3, 4), 3.0), TypeError, "window"),
    (lambda q, k, v: (q, k, v, (3, 4, 1), 3), TypeError, "grid"),
    (lambda q, k, v: (q, k[:1], v, (3, 4), 3), ValueError, "heads mismatch"),
    (lambda q, k, v: (q, k[:, :6], v, (3, 4), 3), ValueError, "length mismatch"),
    (lambda q, k, v: (q, k, v[..., :3], (3, 4), 3), ValueError, "head dim mismatch"),
    (lambda q, k, v: (q, k, torch.randn(3, 2, 12, 4), (3, 4), 3), ValueError, "batch mismatch"),
    (lambda q, k, v: (q, k.double(), v, (3, 4), 3), TypeError, "dtype mismatch"),
    (lambda q, k, v: (q, k, v.to("meta"), (3, 4), 3), ValueError, "device mismatch"),
    (lambda q, k, v: (q[0], k, v, (3, 4), 3), ValueError, r"q must have shape \(B, heads, L, D\)"),
    (lambda q, k, v: (q.int(), k.int(), v.int(), (3, 4), 3), TypeError, "dtype"),
    (lambda q, k, v: (q, k.numpy(), v, (3, 4), 3), TypeError, "k must be a torch.Tensor"),
])
@pytest.mark.parametrize("op", ["lca", "mlka"])
def test_bad_input_is_named(op, mutate, error, pattern):
    args = mutate(*_good())
    for backend in ("dense", "torch"):
        with pytest.raises(error, match=pattern):
            OPS[op](*args, backend=backend)


def test_bad_backend_and_scale():
    q, k, v = _good()
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        local_cross_attention(q, k, v, (3, 4), 3, backend="fast")
    with pytest.raises(ValueError, match="scale must be a positive number"):
        local_cross_attention(q, k, v, (3, 4), 3, scale=-1.0)


def test_triton_backend_needs_cuda_or_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = _good()
    with pytest.raises(ValueError, match="backend 'triton' needs CUDA tensors"):
        local_cross_attention(q, k, v, (3, 4), 3, backend="triton")


def test_mlka_window_covering_the_grid_fails_before_compute(monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("computed before validating")

    monkeypatch.setattr(blocked, "neighbor_masked_attention", must_not_run)
    q, k, v = _good()
    with pytest.raises(ValueError, match="window 7x5 covers the whole 3x4 grid"):
        neighbor_masked_attention(q, k, v, (3, 4), (7, 5), backend="torch")
    # A window that leaves at least one key for every query is accepted (3x4 grid, 3x3 window).
    neighbor_masked_attention(q, k, v, (3, 4), (1, 3), backend="dense")


def test_lca_window_larger_than_grid_is_dense_attention():
    q, k, v = make_inputs(2, 2, (3, 4), 8, True, False, requires_grad=False)
    dense = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1) @ v
    torch.testing.assert_close(local_cross_attention(q, k, v, (3, 4), 99, backend="torch"), dense)


# ------------------------------------------------------------------------------------------------
# Module API against nn.MultiheadAttention with the same weights and a float mask
# ------------------------------------------------------------------------------------------------

def _as_mha(module):
    mha = nn.MultiheadAttention(module.embed_dim, module.num_heads, batch_first=True, dtype=torch.float64)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([module.q_proj.weight, module.k_proj.weight, module.v_proj.weight]))
        mha.in_proj_bias.copy_(torch.cat([module.q_proj.bias, module.k_proj.bias, module.v_proj.bias]))
        mha.out_proj.weight.copy_(module.out_proj.weight)
        mha.out_proj.bias.copy_(module.out_proj.bias)
    return mha


@pytest.mark.parametrize("cls,complement", [(LocalCrossAttention, False), (NeighborMaskedAttention, True)])
@pytest.mark.parametrize("shared_key,shared_value", [(True, True), (True, False), (False, False)])
def test_module_matches_multihead_attention(cls, complement, shared_key, shared_value):
    grid, e, heads, b = (5, 6), 16, 4, 3
    module = cls(e, heads, grid, 3, backend="torch").double()
    for p in module.parameters():  # non-zero biases, so that they are checked too
        nn.init.normal_(p, std=0.3)
    x = torch.randn(b, 30, e, dtype=torch.float64)
    key = torch.randn(30, e, dtype=torch.float64) if shared_key else torch.randn(b, 30, e, dtype=torch.float64)
    value = torch.randn(30, e, dtype=torch.float64) if shared_value else x
    got = module(x, key, value)
    from rlr_fast.windows import window_mask
    allowed = window_mask(grid, (3, 3)) != complement
    mask = torch.zeros(30, 30, dtype=torch.float64).masked_fill(~allowed, float("-inf"))
    expected, _ = _as_mha(module)(x, key.expand(b, 30, e), value.expand(b, 30, e), attn_mask=mask,
                                   need_weights=False)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_module_rejects_bad_shapes():
    module = LocalCrossAttention(16, 4, (5, 6), 3)
    with pytest.raises(ValueError, match="embed_dim 16 is not divisible by num_heads 3"):
        LocalCrossAttention(16, 3, (5, 6), 3)
    with pytest.raises(ValueError, match=r"key must be \(B, L, 16\) or shared \(L, 16\)"):
        module(torch.randn(2, 30, 16), torch.randn(2, 30, 8), torch.randn(2, 30, 16))
    with pytest.raises(ValueError, match=r"query must be batched \(B, L, 16\)"):
        module(torch.randn(30, 16), torch.randn(30, 16), torch.randn(30, 16))


# ------------------------------------------------------------------------------------------------
# backend="auto" falls back to torch where the kernels cannot serve; "triton" raises there
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,head_dim,pattern", [
    (torch.float64, 32, "float32, float16 and bfloat16, not torch.float64"),
    (torch.float32, 24, r"head dims \(16, 32, 64, 128\), got D=24"),
])
def test_auto_falls_back_to_torch_with_one_warning(monkeypatch, dtype, head_dim, pattern):
    cuda = torch.device("cuda")
    with pytest.warns(RuntimeWarning, match="backend 'auto' uses 'torch' here: .*" + pattern):
        assert resolve_backend("auto", cuda, dtype, head_dim) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        assert resolve_backend("auto", cuda, dtype, head_dim) == "torch"
    with pytest.raises((TypeError, ValueError), match=pattern + ".*use backend='torch'"):
        resolve_backend("triton", cuda, dtype, head_dim)
    assert resolve_backend("auto", cuda, torch.float16, 64) == "triton"


def test_auto_falls_back_to_torch_without_triton(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else find_spec(name, *a))
    with pytest.warns(RuntimeWarning, match="needs the triton package"):
        assert resolve_backend("auto", torch.device("cuda"), torch.float32, 32) == "torch"
    with pytest.raises(ImportError, match="needs the triton package.*use backend='torch'"):
        resolve_backend("triton", torch.device("cuda"), torch.float32, 32)


def test_auto_on_other_devices_is_torch_silently():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for device in ("cpu", "meta"):
            assert resolve_backend("auto", torch.device(device), torch.float64, 24) == "torch"


def test_the_torch_backend_chooses_one_mlka_implementation_per_input(monkeypatch):
    from rlr_fast.blocked import chunked, flash, low_precision, mlka_implementation

    q = torch.randn(1, 2, 16, 8)
    monkeypatch.setattr(low_precision, "bf16_supported", lambda device: True)
    assert mlka_implementation(q.bfloat16()) == (low_precision.DenseLowPrecisionAttention, torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float32 inputs under bf16 autocast compute in bf16
        assert mlka_implementation(q) == (low_precision.DenseLowPrecisionAttention, torch.bfloat16)
    assert mlka_implementation(q) == (flash.FlashComplementAttention, torch.float32)
    monkeypatch.setattr(low_precision, "bf16_supported", lambda device: False)
    assert mlka_implementation(q.bfloat16()) == (flash.FlashComplementAttention, torch.bfloat16)
    monkeypatch.setattr(flash, "flash_forward", None)  # a PyTorch without the CPU flash kernel
    assert mlka_implementation(q.double()) == (chunked.BlockedAttention, torch.float64)


def test_the_dense_backends_former_name_reference_still_works_and_warns_once(monkeypatch):
    from rlr_fast import ops
    from rlr_fast.modules import NeighborMaskedAttention

    monkeypatch.setattr(ops, "_warned", set())
    q, k, v = (torch.randn(2, 2, 12, 8) for _ in range(3))
    dense = neighbor_masked_attention(q, k, v, (3, 4), 3, backend="dense")
    with pytest.warns(FutureWarning, match="backend 'reference' is now called 'dense'"):
        old = neighbor_masked_attention(q, k, v, (3, 4), 3, backend="reference")
    torch.testing.assert_close(old, dense, rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process: the second use is silent
        neighbor_masked_attention(q, k, v, (3, 4), 3, backend="reference")
        assert NeighborMaskedAttention(16, 2, (3, 4), 3, backend="reference").backend == "dense"
    with pytest.raises(ValueError, match="unknown backend 'oracle'; choose one of auto, dense, torch, triton"):
        neighbor_masked_attention(q, k, v, (3, 4), 3, backend="oracle")
