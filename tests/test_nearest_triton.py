"""nearest_reference's fused Triton kernel against the dense reference, in Triton's interpreter when
there is no GPU (conftest sets TRITON_INTERPRET=1): small shapes, the interpreter is slow."""
import os

import pytest
import torch

from rlr_fast.kernels.nearest_reference import block_config
from rlr_fast.ops import nearest_reference
from helpers import agree, brute_force

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs CUDA or TRITON_INTERPRET=1")
N, M = 150, 150  # tokens and reference rows of the agreement tests: see the first test


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_shapes_below_cover_the_tiling(dtype):
    """N and M span several tiles, the last one partial; C = 24 keeps x in one chunk, C = 100
    takes one chunk or several, C = 200 several, the last one partial."""
    cfg = block_config(24, dtype)
    assert N > cfg["BLOCK_N"] and N % cfg["BLOCK_N"] and M > cfg["BLOCK_M"] and M % cfg["BLOCK_M"]
    assert cfg["ONE_CHUNK"]
    cfg = block_config(200, dtype)
    assert not cfg["ONE_CHUNK"] and 200 % cfg["BLOCK_C"]


def _triton(x, ref):
    index, sim = nearest_reference(x.to(DEVICE), ref.to(DEVICE), backend="triton")
    return index.cpu(), sim.cpu()


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "batched"])
@pytest.mark.parametrize("channels", [24, 100, 200])  # none a power of two
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_agrees_with_reference(dtype, channels, shared):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, N, channels, generator=g).to(dtype)
    ref = torch.randn(*(() if shared else (2,)), M, channels, generator=g).to(dtype)
    index, sim = _triton(x, ref)
    # the oracle sees the same rounded inputs, in float64: products and sums are fp32 in the kernel
    oi, osim = nearest_reference(x.double(), ref.double(), backend="dense")
    assert index.shape == sim.shape == (2, N) and sim.dtype == torch.float32
    agree(x, ref, index, sim, oi, osim, atol=1e-5)


def test_triton_matches_brute_force():
    x, ref = torch.randn(1, 20, 5), torch.randn(70, 5)
    index, sim = _triton(x, ref)
    bi, bs = brute_force(x, ref)
    assert torch.equal(index, bi)
    torch.testing.assert_close(sim.double(), bs, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_ties_go_to_the_lowest_index(dtype):
    """Equal directions (scaled by powers of two, so the scores are equal bit for bit) within a
    tile, across tiles, and with the lowest index not in the first tile."""
    ref = torch.randn(150, 16)
    ref[40] = ref[6]           # same tile as 6
    ref[100] = 2 * ref[6]      # second tile
    ref[130] = 0.5 * ref[6]    # third tile: 6 must win over all
    ref[90] = ref[70]          # both in the second tile: 70
    ref[140] = 4 * ref[70]     # third tile: still 70
    x = torch.randn(2, 5, 16)
    x[0, 1] = 0.5 * ref[6]
    x[1, 4] = ref[130]
    x[1, 0] = ref[90]
    index, sim = _triton(x.to(dtype), ref.to(dtype))
    assert index[0, 1] == 6 and index[1, 4] == 6 and index[1, 0] == 70
    torch.testing.assert_close(sim[[0, 1, 1], [1, 4, 0]], torch.ones(3), atol=1e-5, rtol=0)


def test_zero_rows_have_similarity_zero():
    ref = torch.randn(80, 8)
    ref[3] = 0
    ref[70] = 0
    x = torch.randn(1, 3, 8)
    x[0, 2] = 0
    index, sim = _triton(x, ref)
    assert index[0, 2] == 0 and sim[0, 2] == 0  # zero against everything: the first index
    assert torch.isfinite(sim).all() and not ((index == 3) | (index == 70)).any()


@pytest.mark.parametrize("channels", [20, 200])  # one channel chunk / several
@pytest.mark.parametrize("layout", ["token stride", "channel stride", "batch stride 0"])
def test_non_contiguous_inputs(layout, channels):
    """Strided x read in place: every other token, channels-first features seen as (B, N, C)
    (channel stride N, as a conv map flattened and transposed), and a batched ref that is an
    expanded shared one (batch stride 0)."""
    c = channels
    ref = torch.randn(3, 90, c)
    if layout == "token stride":
        x = torch.randn(3, 80, c)[:, ::2]
    elif layout == "channel stride":
        x = torch.randn(3, c, 40).transpose(1, 2)
        ref = torch.randn(3, c, 90).transpose(1, 2)  # copied to unit channel stride by the launcher
    else:
        x = torch.randn(3, 40, c)
        ref = torch.randn(90, c).expand(3, 90, c)
    index, sim = _triton(x, ref)
    oi, osim = nearest_reference(x.double(), ref.double(), backend="dense")
    agree(x, ref, index, sim, oi, osim, atol=1e-5)


def test_no_tokens():
    index, sim = _triton(torch.randn(2, 0, 8), torch.randn(5, 8))
    assert index.shape == sim.shape == (2, 0)


def test_float64_is_a_clear_error():
    x = torch.randn(1, 4, 8, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="float32, float16 and bfloat16, not torch.float64; use backend='torch'"):
        nearest_reference(x, x[0], backend="triton")


# metric="l2": the same kernel with a per-row offset, against the explicit-difference cdist oracle
from helpers import agree_l2, cdist_oracle  # noqa: E402


def _triton_l2(x, ref):
    index, dist = nearest_reference(x.to(DEVICE), ref.to(DEVICE), metric="l2", backend="triton")
    return index.cpu(), dist.cpu()


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "batched"])
@pytest.mark.parametrize("channels", [24, 200])  # one channel chunk / several, the last partial
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_l2_agrees_with_cdist(dtype, channels, shared):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, N, channels, generator=g).to(dtype)
    ref = (torch.randn(*(() if shared else (2,)), M, channels, generator=g) * 1.5 + 0.3).to(dtype)
    index, dist = _triton_l2(x, ref)
    assert index.shape == dist.shape == (2, N) and dist.dtype == torch.float32
    agree_l2(x, ref, index, dist, atol=1e-3)  # fp32 ||x||^2 - 2 max: absolute rounding ~ ulp(||x||^2)


def test_triton_l2_matches_cdist_index_and_ties():
    ref = torch.randn(150, 16)
    ref[100] = ref[6]          # second tile: 6 must win
    ref[130] = ref[70]         # third tile: 70
    x = torch.randn(2, 30, 16)
    x[0, 1] = ref[100]
    x[1, 4] = ref[130]
    index, dist = _triton_l2(x, ref)
    oi, od, _ = cdist_oracle(x, ref)
    assert index[0, 1] == 6 and index[1, 4] == 70
    assert torch.equal(index, oi)
    torch.testing.assert_close(dist.double(), od, atol=2e-3, rtol=1e-5)
