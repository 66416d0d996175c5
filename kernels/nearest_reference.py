"""``nearest_reference`` on the GPU: one fused kernel, nothing of size N x M in memory.

For each token of x (B, N, C), the index of its most cosine-similar row of ref ((M, C) shared by
the batch, or (B, M, C)) and that similarity; or (``metric="l2"``) the index of the row at the
smallest Euclidean distance and that distance. A program owns BLOCK_N consecutive tokens of one
batch element and streams ref in tiles of BLOCK_M rows; each tile's dot products run on tensor
cores and are reduced at once to a running maximum and argmax in registers.

Norms. Both metrics are an argmax over rows m of ``a_m (x . r_m) + b_m`` with constants per
reference row: cosine ``a_m = 1 / max(||r_m||, eps)``, ``b_m = 0`` (the token's norm scales its
whole row of scores by one positive number, so the argmax does not need it); l2 ``a_m = 1``,
``b_m = -||r_m||^2 / 2`` (``||x - r||^2 = ||x||^2 - 2 (x . r - ||r||^2 / 2)``). The per-row scale
and offset come from one cheap torch op before the launch (M floats each, B*M if batched):
computed in the kernel they would be recomputed by every program, (B*N / BLOCK_N) times over, on
CUDA cores rather than tensor cores. The token's squared norm is computed in the kernel from the
x tile it loads anyway, and turns the best score into the output at the end: cosine
``best / max(||x||, eps)``, l2 ``sqrt(max(||x||^2 - 2 best, 0))`` (the constexpr L2).

Ties go to the lowest index: within a tile the lowest column among those equal to the tile's
maximum, and a later tile replaces the running best only when strictly greater.

Channels: when C fits one BLOCK_C chunk (ONE_CHUNK) the x tile stays in registers for the whole
sweep; otherwise each ref tile's scores are accumulated over BLOCK_C chunks of x and ref.

Autotuned (see ``tuning.py``) over BLOCK_N, BLOCK_M, num_warps and num_stages, keyed on the
tokens, reference rows and channels (and the dtype, in Triton's key already); BLOCK_C and
ONE_CHUNK follow from C and the dtype. The kernel writes its outputs, so re-runs are harmless.
"""
import triton
import triton.language as tl

from . import tuning
from .window_attention import _mm, product_precision


@triton.jit
def _load_tile(base, rows, rows_ok, stride_row, cols, cols_ok, stride_col):
    """The (len rows, len cols) tile at `base` (int64 offsets; zeros outside the masks)."""
    offsets = rows.to(tl.int64)[:, None] * stride_row + cols.to(tl.int64)[None, :] * stride_col
    return tl.load(base + offsets, mask=rows_ok[:, None] & cols_ok[None, :], other=0.0)


# The default (128 tokens a program, 64 reference rows a step, 8 warps, 3 stages), then 64 tokens
# against 128 rows, and two pipeline stages instead of three.
NEAREST_CONFIGS = [
    triton.Config(dict(BLOCK_N=128, BLOCK_M=64), num_warps=8, num_stages=3),
    triton.Config(dict(BLOCK_N=64, BLOCK_M=128), num_warps=8, num_stages=3),
    triton.Config(dict(BLOCK_N=128, BLOCK_M=64), num_warps=8, num_stages=2),
]


@tuning.autotuned("nearest", NEAREST_CONFIGS, ["N", "M", "C"], lambda args: candidates(args))
@triton.jit
def _nearest_kernel(X, R, R_SCALE, R_OFFSET, INDEX, SIM,
                    stride_xb, stride_xn, stride_xc,
                    stride_rb, stride_rm, stride_ib,
                    N, M, C, eps,
                    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                    ONE_CHUNK: tl.constexpr, DOT: tl.constexpr, L2: tl.constexpr):
    """Index and similarity (distance if L2) of the nearest ref row for BLOCK_N tokens of one
    batch element.

    R has unit channel stride; a shared ref (and its per-row scale and offset, contiguous, of one
    layout) is passed with batch stride 0.
    Programs are numbered batch element first, so those reading the same batched ref run together."""
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    b = (pid // tiles_n).to(tl.int64)
    offs_n = (pid % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_c = tl.arange(0, BLOCK_C)
    x_base = X + b * stride_xb
    r_base = R + b * stride_rb
    scale_base = R_SCALE + b * stride_ib
    offset_base = R_OFFSET + b * stride_ib

    # the token's squared norm (fp32), and with one chunk the x tile itself, kept for the sweep
    if ONE_CHUNK:
        x = _load_tile(x_base, offs_n, n_ok, stride_xn, offs_c, offs_c < C, stride_xc)
        x_sq = tl.sum(x.to(tl.float32) * x.to(tl.float32), 1)
    else:
        x_sq = tl.zeros([BLOCK_N], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            xc = _load_tile(x_base, offs_n, n_ok, stride_xn, c0 + offs_c, c0 + offs_c < C, stride_xc)
            x_sq += tl.sum(xc.to(tl.float32) * xc.to(tl.float32), 1)

    best = tl.full([BLOCK_N], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_N], tl.int32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        if ONE_CHUNK:
            r = _load_tile(r_base, offs_m, m_ok, stride_rm, offs_c, offs_c < C, 1)
            dots = _mm(x, tl.trans(r), DOT)  # (BLOCK_N, BLOCK_M), fp32
        else:
            dots = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
            for c0 in range(0, C, BLOCK_C):
                c_ok = c0 + offs_c < C
                xc = _load_tile(x_base, offs_n, n_ok, stride_xn, c0 + offs_c, c_ok, stride_xc)
                r = _load_tile(r_base, offs_m, m_ok, stride_rm, c0 + offs_c, c_ok, 1)
                dots += _mm(xc, tl.trans(r), DOT)
        scale = tl.load(scale_base + offs_m, mask=m_ok, other=0.0)
        offset = tl.load(offset_base + offs_m, mask=m_ok, other=0.0)
        scores = tl.where(m_ok[None, :], dots * scale[None, :] + offset[None, :], float("-inf"))
        tile_best = tl.max(scores, 1)
        # the lowest column holding the tile's maximum (M where none: cannot happen, m0 < M)
        tile_idx = tl.min(tl.where(scores == tile_best[:, None], offs_m[None, :], M), 1)
        better = tile_best > best  # strictly: an equal score in a later tile keeps the earlier index
        best_idx = tl.where(better, tile_idx, best_idx)
        best = tl.where(better, tile_best, best)

    if L2:
        sim = tl.sqrt(tl.maximum(x_sq - 2.0 * best, 0.0))
    else:
        sim = best / tl.maximum(tl.sqrt(x_sq), eps)
    out = b * N + offs_n
    tl.store(INDEX + out, best_idx.to(tl.int64), mask=n_ok)
    tl.store(SIM + out, sim, mask=n_ok)


# ------------------------------------------------------------------------------------------------
# Launch code
# ------------------------------------------------------------------------------------------------

import contextlib  # noqa: E402

import torch  # noqa: E402

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Tokens per program (BLOCK_N), reference rows per tile (BLOCK_M), channels per chunk (BLOCK_C),
# warps and product precision, per dtype ("fp32", or "16" for fp16/bf16) and path: with C up to
# the "one chunk" BLOCK_C (rounded up to a power of two, at least 16 for tl.dot) the x tile stays
# in registers; larger C loop over chunks of the "chunks" BLOCK_C. Chosen by compiling the kernel
# for sm_80 and sm_90 (`rlr-fast kernels`, specialised as the JIT specialises a call) at
# C = 24 ... 512 and keeping the largest tiles that leave registers to spare and never spill:
# 128 tokens a program halve the reads of ref against 64. fp32 multiplies as three compensated
# TF32 products ("tf32x3", about fp32's accuracy) as the attention kernels do, which keeps more
# operand splits live: its chunks are narrower.
_CONFIGS = {
    #  dtype  path          BLOCK_N  BLOCK_M  BLOCK_C  warps  DOT
    ("fp32", "one chunk"): (128, 64, 32, 8, "tf32x3"),
    ("fp32", "chunks"): (128, 64, 16, 8, "tf32x3"),
    ("16", "one chunk"): (128, 64, 128, 8, "native"),
    ("16", "chunks"): (128, 64, 64, 8, "native"),
}


def block_config(channels: int, dtype: torch.dtype) -> dict:
    """The kernel's constexprs (block sizes, ONE_CHUNK, DOT) and num_warps for C = `channels`."""
    family = "fp32" if dtype == torch.float32 else "16"
    block_c = max(16, triton.next_power_of_2(channels))
    one_chunk = block_c <= _CONFIGS[(family, "one chunk")][2]
    block_n, block_m, max_c, warps, dot = _CONFIGS[(family, "one chunk" if one_chunk else "chunks")]
    return dict(BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_C=min(block_c, max_c), ONE_CHUNK=one_chunk,
                DOT=dot, num_warps=warps, num_stages=3)


def candidates(args: dict) -> list:
    """NEAREST_CONFIGS as a call with these arguments runs them (`tuning.Candidate`): the default
    of `block_config`, and why each other config does not fit (tiles larger than N or M need,
    too many stages for the device's shared memory)."""
    cfg = block_config(args["C"], args["X"].dtype)
    default = triton.Config(dict(BLOCK_N=cfg["BLOCK_N"], BLOCK_M=cfg["BLOCK_M"]), num_warps=cfg["num_warps"],
                            num_stages=cfg["num_stages"])
    depth, element_bytes = args["BLOCK_C"], args["X"].element_size()
    out = []
    for config in NEAREST_CONFIGS:
        rows, cols = config.kwargs["BLOCK_N"], config.kwargs["BLOCK_M"]
        reason = None if config == default else tuning.misfit(
            [(rows, args["N"]), (cols, args["M"])], rows, cols, depth, element_bytes, config)
        out.append(tuning.Candidate(config, config == default, reason))
    return out


def launch_arguments(x, ref, scale, offset, index, sim, shared: bool, eps: float, l2: bool = False) -> dict:
    """Every argument of the kernel by name but the tuned ones (checked x, ref of unit channel
    stride, per-row `scale` and `offset` contiguous, (M,) or (B, M))."""
    b, n, c = x.shape
    cfg = block_config(c, x.dtype)
    return dict(X=x, R=ref, R_SCALE=scale, R_OFFSET=offset, INDEX=index, SIM=sim, stride_xb=x.stride(0),
                stride_xn=x.stride(1), stride_xc=x.stride(2), stride_rb=0 if shared else ref.stride(0),
                stride_rm=ref.stride(-2), stride_ib=0 if shared else scale.stride(0), N=n, M=ref.shape[-2], C=c,
                eps=eps, BLOCK_C=cfg["BLOCK_C"], ONE_CHUNK=cfg["ONE_CHUNK"],
                DOT=product_precision(cfg["DOT"], x.dtype), L2=l2)


def row_constants(ref: torch.Tensor, eps: float, l2: bool):
    """(scale, offset) per reference row in fp32, (M,) or (B, M), without an fp32 copy of ref:
    cosine (1 / max(||r||, eps), 0), l2 (1, -||r||^2 / 2)."""
    norm = torch.linalg.vector_norm(ref, dim=-1, dtype=torch.float32)
    if l2:
        return torch.ones_like(norm), norm.square_().mul_(-0.5)
    return norm.clamp_min_(eps).reciprocal_(), torch.zeros_like(norm)


def _check(x: torch.Tensor) -> None:
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the triton backend of nearest_reference supports float32, float16 and bfloat16, "
                        f"not {x.dtype}; use backend='torch' (or 'auto', which takes torch for float64)")


@torch.no_grad()
def nearest_reference(x: torch.Tensor, ref: torch.Tensor, eps: float, metric: str = "cosine"):
    """``(index, similarity)`` (``(index, distance)`` for metric "l2"), each (B, N), of checked
    inputs (see ``rlr_fast.ops``), one kernel launch.

    x may have any strides. ref is read with unit channel stride (its tiles are the loads every
    program repeats, so they must vectorise): a ref without one is copied once, O(M*C)."""
    _check(x)
    b, n, c = x.shape
    if ref.stride(-1) != 1:
        ref = ref.contiguous()
    l2 = metric == "l2"
    scale, offset = row_constants(ref, eps, l2)
    shared = ref.dim() == 2
    index = torch.empty(b, n, dtype=torch.int64, device=x.device)
    sim = torch.empty(b, n, dtype=torch.float32, device=x.device)
    if b * n == 0:
        return index, sim
    args = launch_arguments(x, ref, scale, offset, index, sim, shared, eps, l2)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _nearest_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * b,)](**args)
    return index, sim
