"""Fused Triton kernels of windowed attention on a token grid, shared by both ops.

The two ops differ only in which keys a query may see: LCA the keys inside its window
(``COMPLEMENT=False``), MLKA the keys outside it (``COMPLEMENT=True``). Everything else, the
online softmax, the shared (batch stride 0) keys and values, and the backward, is the same, so
one set of kernels serves both and each op's file holds its launch code and autograd Function.

Layout: q, o (B, H, L, D); k, v (B, H, L, D) or shared (H, L, D), passed with batch stride 0.
Tokens are row-major on a GRID_H x GRID_W grid: token i sits at (y, x) = (i // W, i % W).

2D tiles. A program owns a *tile*: TILE_H x TILE_W tokens of the grid (a 2D patch, not a run of
consecutive tokens). The windows of a tile's tokens reach exactly the *patch* of tokens
``[y0 - RY, y0 + TILE_H + RY) x [x0 - RX, x0 + TILE_W + RX)`` clipped to the grid, and, the
window being symmetric, the same patch holds every token whose window reaches the tile. The
other side is swept in *blocks*, BLOCK_H x BLOCK_W tokens each:

- LCA sweeps only the blocks that cover the patch, starting at its corner.
- MLKA sweeps every block of the grid; only blocks that overlap the patch (or the grid's edge)
  compute the window mask, all the others run unmasked.

The forward and dQ kernels own query tiles and sweep key blocks; the dK/dV kernel owns a key
tile and sweeps query blocks. Masks are computed from grid coordinates, never loaded.

Autotuning. Each kernel is autotuned (``tuning.autotuned``) over the small config space defined
next to it: tile and block sizes, num_warps and num_stages. The space holds every default of
`block_config` (the largest tiles that compile without spills, per dtype and head dim) and a few
alternatives; the key is the grid, the window, the head dim, the batch and heads (plus the flags
that select a variant of the kernel, LCA's batch fold and dK/dV's batch splits), the dtype being
in Triton's autotuning key already. Every kernel writes its outputs rather than accumulating into
them, so the autotuner may run any config any number of times on the same buffers: no
``reset_to_zero`` or ``restore_value`` is needed.
"""
import triton
import triton.language as tl

from . import tuning

LOG2E = 1.4426950408889634

# What every kernel's tuning key holds: the grid, the window (its radii), the head dim, and the batch
# and heads (with the grid they set the programs launched, hence which tiles fill the GPU).
_KEY = ["GRID_H", "GRID_W", "RY", "RX", "HEAD_DIM", "B", "H"]


def _tile_config(tile, block, num_warps, num_stages):
    """A config of a 2D-tile kernel: the TILE_H x TILE_W tokens a program owns and the
    BLOCK_H x BLOCK_W tokens of the other side it takes per step."""
    return triton.Config(dict(TILE_H=tile[0], TILE_W=tile[1], BLOCK_H=block[0], BLOCK_W=block[1]),
                         num_warps=num_warps, num_stages=num_stages)


@triton.jit
def _mm(a, b, DOT: tl.constexpr):
    """a @ b with fp32 accumulation. DOT "native": on b's dtype (fp16/bf16 tensor cores);
    "tf32x3": fp32 operands as three compensated TF32 tensor-core products, about as exact as
    fp32; "ieee": fp32 FMA, exact and lightest on registers, no tensor cores."""
    if DOT == "native":
        out = tl.dot(a.to(b.dtype), b)
    else:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=DOT)
    return out


@triton.jit
def _tokens(y0, x0, GRID_H, GRID_W, TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    """The TILE_H x TILE_W tokens whose top-left is (y0, x0), flattened row by row: their grid
    coordinates, token indices and whether they lie on the grid (a tile may overhang its edge)."""
    r = tl.arange(0, TILE_H * TILE_W)
    y = y0 + r // TILE_W
    x = x0 + r % TILE_W
    on_grid = (y < GRID_H) & (x < GRID_W)
    return y, x, y * GRID_W + x, on_grid


@triton.jit
def _tile_origin(tile, GRID_W, TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    """Top-left (y0, x0) of tile number `tile`, tiles numbered row by row over the grid."""
    tiles_x = tl.cdiv(GRID_W, TILE_W)
    return (tile // tiles_x) * TILE_H, (tile % tiles_x) * TILE_W


@triton.jit
def _tile_corner(tile, GRID_W, TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    """`_tile_origin` without an integer division (some 20 instructions): the tile's row is
    floor((tile + 0.5) / tiles_x) in fp32, exact while the grid has fewer than 2**22 tiles (the
    quotient lies at least 0.5 / tiles_x from an integer, the fp32 one within half an ulp)."""
    tiles_x = tl.cdiv(GRID_W, TILE_W)
    ty = tl.floor((tile.to(tl.float32) + 0.5) / tiles_x.to(tl.float32)).to(tl.int32)
    return ty * TILE_H, (tile - ty * tiles_x) * TILE_W


@triton.jit
def _head(ptr, b, h, stride_b, stride_h):
    """Pointer to the (L, D) rows of batch element b and head h. The offset is computed in 64
    bits: b * stride_b passes 2**31 elements once B * heads * L * D does."""
    return ptr + tl.cast(b, tl.int64) * stride_b + tl.cast(h, tl.int64) * stride_h


@triton.jit
def _lse_row(b, h, H, GRID_H, GRID_W):
    """Offset of the first log-sum-exp (or delta) of batch element b and head h, in 64 bits."""
    return (tl.cast(b, tl.int64) * H + h) * (GRID_H * GRID_W)


@triton.jit
def _load_rows(base, idx, ok, stride_l, offs_d):
    """The (len idx, HEAD_DIM) rows of tokens `idx` at `base` (zeros where not `ok`)."""
    return tl.load(base + idx[:, None] * stride_l + offs_d[None, :], mask=ok[:, None], other=0.0)


@triton.jit
def _patch(y0, x0, GRID_H, GRID_W, RY, RX, TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    """Rows [y_lo, y_hi) and columns [x_lo, x_hi) of the tokens that the windows of the tile at
    (y0, x0) reach (clipped to the grid); by symmetry also those whose windows reach the tile."""
    y_lo = tl.maximum(y0 - RY, 0)
    y_hi = tl.minimum(y0 + TILE_H + RY, GRID_H)
    x_lo = tl.maximum(x0 - RX, 0)
    x_hi = tl.minimum(x0 + TILE_W + RX, GRID_W)
    return y_lo, y_hi, x_lo, x_hi


@triton.jit
def _sweep(y_lo, y_hi, x_lo, x_hi, GRID_H, GRID_W,
           BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, COMPLEMENT: tl.constexpr):
    """The blocks a tile visits: top-left (oy, ox) of the first, blocks per row, and their count.
    LCA: the blocks that cover the patch; MLKA: every block of the grid."""
    if COMPLEMENT:
        oy, ox = y_lo * 0, x_lo * 0
        n_y, n_x = tl.cdiv(GRID_H, BLOCK_H), tl.cdiv(GRID_W, BLOCK_W)
    else:
        oy, ox = y_lo, x_lo
        n_y, n_x = tl.cdiv(y_hi - y_lo, BLOCK_H), tl.cdiv(x_hi - x_lo, BLOCK_W)
    return oy, ox, n_x, n_y * n_x


@triton.jit
def _needs_mask(by, bx, y_lo, y_hi, x_lo, x_hi, GRID_H, GRID_W,
                BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, COMPLEMENT: tl.constexpr):
    """Whether the block at (by, bx) needs the mask: LCA always; MLKA only where the block
    overlaps the patch (some pair is inside a window) or overhangs the grid."""
    overlaps = (by < y_hi) & (by + BLOCK_H > y_lo) & (bx < x_hi) & (bx + BLOCK_W > x_lo)
    overhangs = (by + BLOCK_H > GRID_H) | (bx + BLOCK_W > GRID_W)
    return overlaps | overhangs | (COMPLEMENT == 0)


@triton.jit
def _visible(ay, ax, a_ok, by, bx, b_ok, RY, RX, COMPLEMENT: tl.constexpr):
    """(len a, len b) mask: token b is visible to token a (symmetric) and both are on the grid."""
    dy = ay[:, None] - by[None, :]
    dx = ax[:, None] - bx[None, :]
    inside = (dy <= RY) & (dy >= -RY) & (dx <= RX) & (dx >= -RX)
    if COMPLEMENT:
        visible = inside == 0
    else:
        visible = inside
    return visible & a_ok[:, None] & b_ok[None, :]


@triton.jit
def _softmax_step(q, k, v, m_i, l_i, acc, qk_scale, visible, MASKED: tl.constexpr, DOT: tl.constexpr):
    """One key block of the online softmax (base 2, scale folded into one FMA per score). The
    unmasked step assumes every key visible; the masked one takes `visible` and rows that have
    seen no key yet (a running max of -inf)."""
    qk = _mm(q, tl.trans(k), DOT)
    if MASKED:
        qk = tl.where(visible, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    m_ref = m_new
    if MASKED:
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet
    p = tl.math.exp2(qk * qk_scale - m_ref[:, None])
    alpha = tl.math.exp2(m_i - m_ref)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _mm(p, v, DOT)
    return m_new, l_i, acc


# LCA forward: the defaults, then 8 x 8 blocks on 8 warps (fewer, larger steps over the patch), and
# the 16-bit default with 3 pipeline stages.
# FOLD > 1 shrinks each config's tile as `fold_tile` says (the rows per product stay the same).
LCA_FWD_CONFIGS = [
    _tile_config((8, 8), (4, 8), 4, 1),  # 16-bit, head dim <= 64
    _tile_config((4, 8), (4, 8), 4, 3),  # 16-bit, head dim 128
    _tile_config((4, 4), (4, 8), 4, 3),  # fp32, head dim 16
    _tile_config((4, 4), (4, 4), 4, 3),  # fp32, head dim 32
    _tile_config((4, 4), (4, 4), 8, 3),  # fp32, head dim 64 and 128
    _tile_config((8, 8), (8, 8), 8, 3),
    _tile_config((8, 8), (4, 8), 4, 3),
]


@tuning.autotuned("lca_fwd", LCA_FWD_CONFIGS, _KEY + ["FOLD"], lambda args: forward_candidates(args, False))
@triton.jit
def _lca_fwd_kernel(Q, K, V, O, LSE,
                    stride_qb, stride_qh, stride_ql,
                    stride_kb, stride_kh, stride_kl,
                    stride_vb, stride_vh, stride_vl,
                    stride_ob, stride_oh, stride_ol,
                    B, H, GRID_H, GRID_W, RY, RX, qk_scale,
                    FOLD: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
                    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, HEAD_DIM: tl.constexpr,
                    DOT: tl.constexpr):
    """LCA forward: O and the row log-sum-exp for one query tile and head, for FOLD batch
    elements at once, sweeping only the key blocks that cover the tile's key patch.

    The rows of the program's products are FOLD batch elements x the tile's tokens. FOLD > 1
    only with a shared k and v (RLR's reference): the key patch and its mask are then loaded and
    computed once for all of them, and at the same rows per product the tile, hence its patch,
    is smaller, so fewer keys are visited per useful key. Programs are ordered batch group
    first: those that read the same key patch run side by side (read once, then from L2)."""
    pid, h = tl.program_id(0), tl.program_id(1)
    groups = tl.cdiv(B, FOLD)
    b0, tile = (pid % groups) * FOLD, pid // groups
    y0, x0 = _tile_origin(tile, GRID_W, TILE_H, TILE_W)
    r = tl.arange(0, FOLD * TILE_H * TILE_W)
    bb = b0 + r // (TILE_H * TILE_W)  # each row's batch element
    qy = y0 + (r % (TILE_H * TILE_W)) // TILE_W
    qx = x0 + r % TILE_W
    q_ok = (qy < GRID_H) & (qx < GRID_W) & (bb < B)
    q_idx = qy * GRID_W + qx
    offs_d = tl.arange(0, HEAD_DIM)
    q = _load_rows(_head(Q, bb, h, stride_qb, stride_qh)[:, None], q_idx, q_ok, stride_ql, offs_d)
    k_base = _head(K, b0, h, stride_kb, stride_kh)  # FOLD > 1: k and v shared, batch stride 0
    v_base = _head(V, b0, h, stride_vb, stride_vh)
    # online softmax state, base 2 with the scale folded in: m (running max), l (running sum)
    m_i = tl.full([FOLD * TILE_H * TILE_W], float("-inf"), tl.float32)
    l_i = tl.zeros([FOLD * TILE_H * TILE_W], tl.float32)
    acc = tl.zeros([FOLD * TILE_H * TILE_W, HEAD_DIM], tl.float32)
    y_lo, y_hi, x_lo, x_hi = _patch(y0, x0, GRID_H, GRID_W, RY, RX, TILE_H, TILE_W)
    oy, ox, blocks_x, n_blocks = _sweep(y_lo, y_hi, x_lo, x_hi, GRID_H, GRID_W, BLOCK_H, BLOCK_W, False)
    by, bx, x_end = oy, ox, ox + blocks_x * BLOCK_W  # the block's corner, moved row by row
    for i in range(0, n_blocks):
        ky, kx, k_idx, k_ok = _tokens(by, bx, GRID_H, GRID_W, BLOCK_H, BLOCK_W)  # BLOCK_N = BLOCK_H * BLOCK_W
        k = _load_rows(k_base, k_idx, k_ok, stride_kl, offs_d)
        v = _load_rows(v_base, k_idx, k_ok, stride_vl, offs_d)
        visible = _visible(qy, qx, q_ok, ky, kx, k_ok, RY, RX, False)
        m_i, l_i, acc = _softmax_step(q, k, v, m_i, l_i, acc, qk_scale, visible, True, DOT)
        bx += BLOCK_W
        by = tl.where(bx >= x_end, by + BLOCK_H, by)
        bx = tl.where(bx >= x_end, ox, bx)
    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # tokens off the grid: never stored
    acc = acc / l_i[:, None]
    tl.store(_head(O, bb, h, stride_ob, stride_oh)[:, None] + q_idx[:, None] * stride_ol + offs_d[None, :],
             acc.to(O.dtype.element_ty), mask=q_ok[:, None])
    # log-sum-exp in base 2 (of the scaled scores), for the backward
    tl.store(LSE + _lse_row(bb, h, H, GRID_H, GRID_W) + q_idx, m_i + tl.math.log2(l_i), mask=q_ok)


# MLKA forward: runs of BLOCK_M queries x BLOCK_N keys; the defaults, then 128-query runs on 8
# warps (FlashAttention's Hopper tile).
MLKA_FWD_CONFIGS = [
    triton.Config(dict(BLOCK_M=64, BLOCK_N=64), num_warps=4, num_stages=3),  # 16-bit, head dim <= 64
    triton.Config(dict(BLOCK_M=64, BLOCK_N=64), num_warps=4, num_stages=2),  # 16-bit, head dim 128
    triton.Config(dict(BLOCK_M=32, BLOCK_N=32), num_warps=4, num_stages=1),  # fp32, head dim 16
    triton.Config(dict(BLOCK_M=32, BLOCK_N=32), num_warps=4, num_stages=2),  # fp32, head dim 32 and 64
    triton.Config(dict(BLOCK_M=32, BLOCK_N=32), num_warps=8, num_stages=2),  # fp32, head dim 128
    triton.Config(dict(BLOCK_M=128, BLOCK_N=64), num_warps=8, num_stages=3),
]


@tuning.autotuned("mlka_fwd", MLKA_FWD_CONFIGS, _KEY, lambda args: forward_candidates(args, True))
@triton.jit
def _mlka_fwd_kernel(Q, K, V, O, LSE,
                     stride_qb, stride_qh, stride_ql,
                     stride_kb, stride_kh, stride_kl,
                     stride_vb, stride_vh, stride_vl,
                     stride_ob, stride_oh, stride_ol,
                     B, H, GRID_H, GRID_W, RY, RX, qk_scale,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                     DOT: tl.constexpr):
    """MLKA forward, FlashAttention-2 style: a program owns BLOCK_M consecutive query tokens
    and sweeps the keys in runs of BLOCK_N consecutive tokens.

    Only the keys in the grid rows within RY of the tile's rows (the *band*) can be inside a
    query's window. Key blocks wholly outside the band (and on the grid) need no mask: the fast
    loop runs them with plain unmasked, pipelined loads and no index arithmetic per key. The
    band's blocks and a partial last block run in the masked loop. Programs are ordered batch
    element first (a shared k is read once per tile from memory, then from L2)."""
    pid, h = tl.program_id(0), tl.program_id(1)
    b, tile = pid % B, pid // B
    length = GRID_H * GRID_W
    q_idx = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    q_ok = q_idx < length
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    q = _load_rows(_head(Q, b, h, stride_qb, stride_qh), q_idx, q_ok, stride_ql, offs_d)
    k_base = _head(K, b, h, stride_kb, stride_kh)
    v_base = _head(V, b, h, stride_vb, stride_vh)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    # the band [band_lo, band_hi) in tokens, widened to whole blocks, and the whole blocks
    # [0, full) of the grid; the fast loop skips the band
    first_row = (tile * BLOCK_M) // GRID_W
    last_row = (tl.minimum(tile * BLOCK_M + BLOCK_M, length) - 1) // GRID_W
    full = (length // BLOCK_N) * BLOCK_N
    band_lo = (tl.maximum(first_row - RY, 0) * GRID_W) // BLOCK_N * BLOCK_N
    band_hi = tl.minimum(tl.cdiv(tl.minimum(last_row + RY + 1, GRID_H) * GRID_W, BLOCK_N) * BLOCK_N, full)
    band_hi = tl.maximum(band_hi, band_lo)
    n_before = band_lo // BLOCK_N
    for j in range(0, n_before + (full - band_hi) // BLOCK_N):
        start = j * BLOCK_N + tl.where(j >= n_before, band_hi - band_lo, 0)
        k = tl.load(k_base + (start + offs_n)[:, None] * stride_kl + offs_d[None, :])
        v = tl.load(v_base + (start + offs_n)[:, None] * stride_vl + offs_d[None, :])
        m_i, l_i, acc = _softmax_step(q, k, v, m_i, l_i, acc, qk_scale, None, False, DOT)
    qy, qx = q_idx // GRID_W, q_idx % GRID_W
    n_band = (band_hi - band_lo) // BLOCK_N
    for j in range(0, n_band + tl.cdiv(length - full, BLOCK_N)):
        k_idx = tl.where(j < n_band, band_lo + j * BLOCK_N, full) + offs_n
        k_ok = k_idx < length
        k = _load_rows(k_base, k_idx, k_ok, stride_kl, offs_d)
        v = _load_rows(v_base, k_idx, k_ok, stride_vl, offs_d)
        visible = _visible(qy, qx, q_ok, k_idx // GRID_W, k_idx % GRID_W, k_ok, RY, RX, True)
        m_i, l_i, acc = _softmax_step(q, k, v, m_i, l_i, acc, qk_scale, visible, True, DOT)
    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # tokens off the grid: never stored
    acc = acc / l_i[:, None]
    tl.store(_head(O, b, h, stride_ob, stride_oh) + q_idx[:, None] * stride_ol + offs_d[None, :],
             acc.to(O.dtype.element_ty), mask=q_ok[:, None])
    tl.store(LSE + _lse_row(b, h, H, GRID_H, GRID_W) + q_idx, m_i + tl.math.log2(l_i), mask=q_ok)


# dQ: the defaults, then 8 x 8 blocks on 8 warps.
DQ_CONFIGS = [
    _tile_config((8, 8), (4, 8), 4, 2),  # 16-bit, head dim <= 64
    _tile_config((4, 4), (4, 8), 4, 2),  # 16-bit, head dim 128
    _tile_config((4, 8), (4, 8), 4, 2),  # fp32, head dim 16
    _tile_config((4, 4), (4, 4), 4, 2),  # fp32, head dim 32 and 64
    _tile_config((4, 4), (4, 4), 8, 2),  # fp32, head dim 128
    _tile_config((8, 8), (8, 8), 8, 2),
]


@tuning.autotuned("dq", DQ_CONFIGS, _KEY + ["COMPLEMENT"], lambda args: backward_candidates(args, "dq"))
@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA,
                   stride_qb, stride_qh, stride_ql,
                   stride_kb, stride_kh, stride_kl,
                   stride_vb, stride_vh, stride_vl,
                   stride_ob, stride_oh, stride_ol,
                   stride_dqb, stride_dqh, stride_dql,
                   B, H, GRID_H, GRID_W, RY, RX, qk_scale, sm_scale,
                   COMPLEMENT: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
                   BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, HEAD_DIM: tl.constexpr,
                   DOT: tl.constexpr):
    """dQ = scale * dS K for one query tile, dS = P * (dO V^T - delta), P recomputed."""
    pid, h = tl.program_id(0), tl.program_id(1)
    b, tile = pid % B, pid // B
    y0, x0 = _tile_origin(tile, GRID_W, TILE_H, TILE_W)
    qy, qx, q_idx, q_ok = _tokens(y0, x0, GRID_H, GRID_W, TILE_H, TILE_W)
    offs_d = tl.arange(0, HEAD_DIM)
    q = _load_rows(_head(Q, b, h, stride_qb, stride_qh), q_idx, q_ok, stride_ql, offs_d)
    do = _load_rows(_head(DO, b, h, stride_ob, stride_oh), q_idx, q_ok, stride_ol, offs_d)
    row = _lse_row(b, h, H, GRID_H, GRID_W)
    lse = tl.load(LSE + row + q_idx, mask=q_ok, other=0.0)
    delta = tl.load(DELTA + row + q_idx, mask=q_ok, other=0.0)
    k_base = _head(K, b, h, stride_kb, stride_kh)
    v_base = _head(V, b, h, stride_vb, stride_vh)
    dq = tl.zeros([TILE_H * TILE_W, HEAD_DIM], tl.float32)
    y_lo, y_hi, x_lo, x_hi = _patch(y0, x0, GRID_H, GRID_W, RY, RX, TILE_H, TILE_W)
    oy, ox, blocks_x, n_blocks = _sweep(y_lo, y_hi, x_lo, x_hi, GRID_H, GRID_W, BLOCK_H, BLOCK_W, COMPLEMENT)
    for i in range(0, n_blocks):
        by, bx = oy + (i // blocks_x) * BLOCK_H, ox + (i % blocks_x) * BLOCK_W
        ky, kx, k_idx, k_ok = _tokens(by, bx, GRID_H, GRID_W, BLOCK_H, BLOCK_W)
        k = _load_rows(k_base, k_idx, k_ok, stride_kl, offs_d)
        v = _load_rows(v_base, k_idx, k_ok, stride_vl, offs_d)
        qk = _mm(q, tl.trans(k), DOT) * qk_scale
        p = tl.math.exp2(qk - lse[:, None])
        if _needs_mask(by, bx, y_lo, y_hi, x_lo, x_hi, GRID_H, GRID_W, BLOCK_H, BLOCK_W, COMPLEMENT):
            p = tl.where(_visible(qy, qx, q_ok, ky, kx, k_ok, RY, RX, COMPLEMENT), p, 0.0)
        dp = _mm(do, tl.trans(v), DOT)
        ds = p * (dp - delta[:, None])
        dq += _mm(ds, k, DOT)
    tl.store(_head(DQ, b, h, stride_dqb, stride_dqh) + q_idx[:, None] * stride_dql + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_ok[:, None])


# dK/dV (both gradients in one launch, or one per launch, and the batch-split reduction of a
# shared k or v): the defaults, each an alternative to the others at its dtype and head dim.
DKDV_CONFIGS = [
    _tile_config((4, 4), (4, 4), 8, 2),  # fp32, head dim <= 64
    _tile_config((4, 4), (4, 4), 8, 1),  # fp32, head dim 128 (one launch per gradient)
    _tile_config((4, 8), (4, 8), 4, 2),  # 16-bit, head dim 16
    _tile_config((4, 8), (4, 4), 4, 2),  # 16-bit, head dim 32
    _tile_config((4, 4), (4, 8), 4, 2),  # 16-bit, head dim 64
    _tile_config((4, 4), (4, 8), 8, 1),  # 16-bit, head dim 128 (one launch per gradient)
]


@tuning.autotuned("dkdv", DKDV_CONFIGS, _KEY + ["COMPLEMENT", "K_SHARED", "V_SHARED", "WITH_DK", "WITH_DV", "SPLITS"],
                  lambda args: backward_candidates(args, "dkdv"))
@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA,
                     stride_qb, stride_qh, stride_ql,
                     stride_kb, stride_kh, stride_kl,
                     stride_vb, stride_vh, stride_vl,
                     stride_ob, stride_oh, stride_ol,
                     stride_dkb, stride_dkh, stride_dkl,
                     stride_dvb, stride_dvh, stride_dvl,
                     B, H, GRID_H, GRID_W, RY, RX, qk_scale, sm_scale, SPLITS,
                     K_SHARED: tl.constexpr, V_SHARED: tl.constexpr,
                     WITH_DK: tl.constexpr, WITH_DV: tl.constexpr, COMPLEMENT: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
                     BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, HEAD_DIM: tl.constexpr,
                     DOT: tl.constexpr):
    """dK = scale * dS^T Q and dV = P^T dO for one key tile and head (TILE_H x TILE_W keys),
    sweeping the query blocks (BLOCK_H x BLOCK_W) whose windows can reach it.

    A shared k or v is reduced over a run of the batch inside the program (it loops over the run
    and keeps the sum in registers); with SPLITS runs, each program writes its run's fp32 partial
    sum to split `split` of DK/DV (a (SPLITS, H, L, D) buffer) and the launcher adds the splits
    in a fixed order: deterministic, no atomics, SPLITS (not B) copies. Batched ones are written per
    batch element. WITH_DK / WITH_DV select the gradients computed: both in one pass, or, where
    the two accumulators do not fit in registers, one per launch (P is then recomputed)."""
    pid, h = tl.program_id(0), tl.program_id(1)
    if K_SHARED or V_SHARED:  # split `split` of SPLITS runs of the batch
        split, tile = pid % SPLITS, pid // SPLITS
        b_lo = split * tl.cdiv(B, SPLITS)
        b_hi = tl.minimum(b_lo + tl.cdiv(B, SPLITS), B)
    else:
        b_lo, tile = pid % B, pid // B
        b_hi = b_lo + 1
    y0, x0 = _tile_origin(tile, GRID_W, TILE_H, TILE_W)
    ky, kx, k_idx, k_ok = _tokens(y0, x0, GRID_H, GRID_W, TILE_H, TILE_W)
    offs_d = tl.arange(0, HEAD_DIM)
    y_lo, y_hi, x_lo, x_hi = _patch(y0, x0, GRID_H, GRID_W, RY, RX, TILE_H, TILE_W)
    oy, ox, blocks_x, n_blocks = _sweep(y_lo, y_hi, x_lo, x_hi, GRID_H, GRID_W, BLOCK_H, BLOCK_W, COMPLEMENT)
    # One accumulator each: a shared k or v keeps summing over the batch, a batched one restarts
    # per batch element and is written out at its end.
    dk = tl.zeros([TILE_H * TILE_W, HEAD_DIM], tl.float32)
    dv = tl.zeros([TILE_H * TILE_W, HEAD_DIM], tl.float32)
    for b in range(b_lo, b_hi):
        k = _load_rows(_head(K, b, h, stride_kb, stride_kh), k_idx, k_ok, stride_kl, offs_d)
        if WITH_DK:
            v = _load_rows(_head(V, b, h, stride_vb, stride_vh), k_idx, k_ok, stride_vl, offs_d)
        if not K_SHARED:
            dk = tl.zeros([TILE_H * TILE_W, HEAD_DIM], tl.float32)
        if not V_SHARED:
            dv = tl.zeros([TILE_H * TILE_W, HEAD_DIM], tl.float32)
        row = _lse_row(b, h, H, GRID_H, GRID_W)
        for i in range(0, n_blocks):
            by, bx = oy + (i // blocks_x) * BLOCK_H, ox + (i % blocks_x) * BLOCK_W
            qy, qx, q_idx, q_ok = _tokens(by, bx, GRID_H, GRID_W, BLOCK_H, BLOCK_W)
            q = _load_rows(_head(Q, b, h, stride_qb, stride_qh), q_idx, q_ok, stride_ql, offs_d)
            do = _load_rows(_head(DO, b, h, stride_ob, stride_oh), q_idx, q_ok, stride_ol, offs_d)
            lse = tl.load(LSE + row + q_idx, mask=q_ok, other=0.0)
            if WITH_DK:
                delta = tl.load(DELTA + row + q_idx, mask=q_ok, other=0.0)
            qk_t = _mm(k, tl.trans(q), DOT) * qk_scale  # (keys, queries)
            p_t = tl.math.exp2(qk_t - lse[None, :])
            if _needs_mask(by, bx, y_lo, y_hi, x_lo, x_hi, GRID_H, GRID_W, BLOCK_H, BLOCK_W, COMPLEMENT):
                p_t = tl.where(_visible(ky, kx, k_ok, qy, qx, q_ok, RY, RX, COMPLEMENT), p_t, 0.0)
            if WITH_DV:
                dv += _mm(p_t, do, DOT)
            if WITH_DK:
                ds_t = p_t * (_mm(v, tl.trans(do), DOT) - delta[None, :])
                dk += _mm(ds_t, q, DOT)
        if WITH_DK and not K_SHARED:
            tl.store(_head(DK, b, h, stride_dkb, stride_dkh) + k_idx[:, None] * stride_dkl + offs_d[None, :],
                     (dk * sm_scale).to(DK.dtype.element_ty), mask=k_ok[:, None])
        if WITH_DV and not V_SHARED:
            tl.store(_head(DV, b, h, stride_dvb, stride_dvh) + k_idx[:, None] * stride_dvl + offs_d[None, :],
                     dv.to(DV.dtype.element_ty), mask=k_ok[:, None])
    if WITH_DK and K_SHARED:
        tl.store(_head(DK, split, h, stride_dkb, stride_dkh) + k_idx[:, None] * stride_dkl + offs_d[None, :],
                 (dk * sm_scale).to(DK.dtype.element_ty), mask=k_ok[:, None])
    if WITH_DV and V_SHARED:
        tl.store(_head(DV, split, h, stride_dvb, stride_dvh) + k_idx[:, None] * stride_dvl + offs_d[None, :],
                 dv.to(DV.dtype.element_ty), mask=k_ok[:, None])


# ------------------------------------------------------------------------------------------------
# MLKA's backward, FlashAttention-2 style: runs of consecutive tokens and the forward's band split
# ------------------------------------------------------------------------------------------------

@triton.jit
def _mlka_band(tile, GRID_H, GRID_W, RY, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The band of a run of BLOCK_M tokens (tokens [tile * BLOCK_M, +BLOCK_M)): the tokens of the
    other side in the grid rows within RY of the run's rows, the only ones a window of the run
    reaches (and, the window being symmetric, the only ones whose windows reach the run). Returns
    (full, band_lo, band_hi) in tokens: [0, full) the whole BLOCK_N blocks of the grid and
    [band_lo, band_hi) the band widened to whole blocks and clipped to them. Blocks of [0, full)
    outside the band need no mask; the band and the partial block [full, L) do."""
    length = GRID_H * GRID_W
    first_row = (tile * BLOCK_M) // GRID_W
    last_row = (tl.minimum(tile * BLOCK_M + BLOCK_M, length) - 1) // GRID_W
    full = (length // BLOCK_N) * BLOCK_N
    band_lo = (tl.maximum(first_row - RY, 0) * GRID_W) // BLOCK_N * BLOCK_N
    band_hi = tl.minimum(tl.cdiv(tl.minimum(last_row + RY + 1, GRID_H) * GRID_W, BLOCK_N) * BLOCK_N, full)
    band_hi = tl.maximum(band_hi, band_lo)
    return full, band_lo, band_hi


@triton.jit
def _window_coords(t, inv_w, GRID_W, RY, RX):
    """Scaled grid coordinates (Y, X) = (y (2 RX + 1), x (2 RY + 1)) of token indices `t` (a
    vector), in fp32, for `_outside_bias`. No integer division per token (about 20 instructions
    each): y = floor(t / W + 0.5 / W) in fp32 (`inv_w` = 1 / W), exact while L < 2**21 (the
    fraction is at least 0.5 / W from an integer, the fp32 result errs by under 2 H 2**-24);
    the products are integers below 2**24, exact too."""
    tf = t.to(tl.float32)
    y = tl.floor(tf * inv_w + 0.5 * inv_w)
    x = tf - y * GRID_W.to(tl.float32)
    return y * (2 * RX + 1).to(tl.float32), x * (2 * RY + 1).to(tl.float32)


@triton.jit
def _outside_bias(ay, ax, by, bx, RY, RX):
    """(len a, len b) exponent bound that keeps MLKA's mask without boolean tensors: >= 512
    where token b lies outside token a's window (visible), <= -512 inside it. With the scaled
    coordinates of `_window_coords`, |dy| <= RY and |dx| <= RX are both
    max(|dY|, |dX|) < T = (2 RY + 1)(2 RX + 1) / 2 (a half-integer, never reached), so the bound
    is 1024 (max(|dY|, |dX|) - T): four instructions per pair and one more where it is applied
    (p = exp2(min(s, bound))), where a select on a boolean mask cost more in the SASS."""
    t = tl.maximum(tl.abs(ay[:, None] - by[None, :]), tl.abs(ax[:, None] - bx[None, :]))
    half = ((2 * RY + 1) * (2 * RX + 1)).to(tl.float32) * 512.0
    return t * 1024.0 - half


@triton.jit
def _mlka_dq_step(q, do, k, v, lse, delta, dq, qk_scale, bound, MASKED: tl.constexpr, DOT: tl.constexpr):
    """One key block of dQ: P recomputed from the log-sum-exp (base 2), dS = P * (dO V^T - delta),
    dQ += dS K (unscaled). The masked step bounds the exponent by `bound` (`_outside_bias`): P is
    0 inside the windows."""
    qk = _mm(q, tl.trans(k), DOT)
    if MASKED:
        p = tl.math.exp2(tl.minimum(qk * qk_scale - lse[:, None], bound))
    else:
        p = tl.math.exp2(qk * qk_scale - lse[:, None])
    dp = _mm(do, tl.trans(v), DOT)
    ds = p * (dp - delta[:, None])
    return dq + _mm(ds, k, DOT)


# MLKA dQ (_mlka_dq_kernel, 16-bit only): runs of BLOCK_M queries x BLOCK_N keys; the defaults
# (`_MLKA_BWD`), then alternatives. 64-row runs: one wgmma warpgroup per 4 warps on sm_90.
MLKA_DQ_CONFIGS = [
    triton.Config(dict(BLOCK_M=64, BLOCK_N=64), num_warps=4, num_stages=2),  # sm_90 head dim 16, sm_80 <= 32
    triton.Config(dict(BLOCK_M=64, BLOCK_N=64), num_warps=4, num_stages=1),  # sm_90 head dim 32
    triton.Config(dict(BLOCK_M=64, BLOCK_N=32), num_warps=4, num_stages=1),  # sm_90 head dim 64
    triton.Config(dict(BLOCK_M=64, BLOCK_N=32), num_warps=4, num_stages=2),  # sm_90 128, sm_80 64
    triton.Config(dict(BLOCK_M=32, BLOCK_N=32), num_warps=4, num_stages=2),
    triton.Config(dict(BLOCK_M=128, BLOCK_N=32), num_warps=8, num_stages=2),
]


@tuning.autotuned("mlka_dq", MLKA_DQ_CONFIGS, _KEY + ["DELTA_FROM_O"],
                  lambda args: backward_candidates(args, "dq"))
@triton.jit
def _mlka_dq_kernel(Q, K, V, O, DO, DQ, LSE, DELTA,
                    stride_qb, stride_qh, stride_ql,
                    stride_kb, stride_kh, stride_kl,
                    stride_vb, stride_vh, stride_vl,
                    stride_ob, stride_oh, stride_ol,
                    stride_dob, stride_doh, stride_dol,
                    stride_dqb, stride_dqh, stride_dql,
                    B, H, GRID_H, GRID_W, RY, RX, qk_scale, sm_scale,
                    DELTA_FROM_O: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    HEAD_DIM: tl.constexpr, DOT: tl.constexpr):
    """MLKA dQ = scale * dS K for a run of BLOCK_M consecutive queries and one head, sweeping the
    keys in runs of BLOCK_N with the forward's band split: blocks outside the band run an
    unmasked, pipelined loop; the band and a partial last block the masked one.

    DELTA_FROM_O: the program also computes delta = rowsum(dO * O) (fp32) of its queries, uses it
    and writes it to DELTA for the dK/dV launch that follows (no separate preprocess launch);
    else it reads DELTA."""
    pid, h = tl.program_id(0), tl.program_id(1)
    b, tile = pid % B, pid // B
    length = GRID_H * GRID_W
    q_idx = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    q_ok = q_idx < length
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    q = _load_rows(_head(Q, b, h, stride_qb, stride_qh), q_idx, q_ok, stride_ql, offs_d)
    do = _load_rows(_head(DO, b, h, stride_dob, stride_doh), q_idx, q_ok, stride_dol, offs_d)
    row = _lse_row(b, h, H, GRID_H, GRID_W)
    lse = tl.load(LSE + row + q_idx, mask=q_ok, other=0.0)
    if DELTA_FROM_O:
        o = _load_rows(_head(O, b, h, stride_ob, stride_oh), q_idx, q_ok, stride_ol, offs_d)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        tl.store(DELTA + row + q_idx, delta, mask=q_ok)
    else:
        delta = tl.load(DELTA + row + q_idx, mask=q_ok, other=0.0)
    k_base = _head(K, b, h, stride_kb, stride_kh)
    v_base = _head(V, b, h, stride_vb, stride_vh)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    full, band_lo, band_hi = _mlka_band(tile, GRID_H, GRID_W, RY, BLOCK_M, BLOCK_N)
    n_before = band_lo // BLOCK_N
    for j in range(0, n_before + (full - band_hi) // BLOCK_N):
        start = j * BLOCK_N + tl.where(j >= n_before, band_hi - band_lo, 0)
        k = tl.load(k_base + (start + offs_n)[:, None] * stride_kl + offs_d[None, :])
        v = tl.load(v_base + (start + offs_n)[:, None] * stride_vl + offs_d[None, :])
        dq = _mlka_dq_step(q, do, k, v, lse, delta, dq, qk_scale, None, False, DOT)
    # the band's whole blocks: the window mask only (queries off the grid need none, their rows
    # are never stored)
    inv_w = 1.0 / GRID_W.to(tl.float32)
    qy, qx = _window_coords(q_idx, inv_w, GRID_W, RY, RX)
    for start in range(band_lo, band_hi, BLOCK_N):
        k = tl.load(k_base + (start + offs_n)[:, None] * stride_kl + offs_d[None, :])
        v = tl.load(v_base + (start + offs_n)[:, None] * stride_vl + offs_d[None, :])
        ky, kx = _window_coords(start + offs_n, inv_w, GRID_W, RY, RX)
        bound = _outside_bias(qy, qx, ky, kx, RY, RX)
        dq = _mlka_dq_step(q, do, k, v, lse, delta, dq, qk_scale, bound, True, DOT)
    if full < length:  # the partial last block: keys off the grid are zeros, P must be 0 there too
        k_idx = full + offs_n
        k_ok = k_idx < length
        k = _load_rows(k_base, k_idx, k_ok, stride_kl, offs_d)
        v = _load_rows(v_base, k_idx, k_ok, stride_vl, offs_d)
        ky, kx = _window_coords(k_idx, inv_w, GRID_W, RY, RX)
        bound = tl.where(k_ok[None, :], _outside_bias(qy, qx, ky, kx, RY, RX), float("-inf"))
        dq = _mlka_dq_step(q, do, k, v, lse, delta, dq, qk_scale, bound, True, DOT)
    tl.store(_head(DQ, b, h, stride_dqb, stride_dqh) + q_idx[:, None] * stride_dql + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_ok[:, None])


@triton.jit
def _mlka_dkdv_step(k, v, q, do, lse, delta, dk, dv, qk_scale, bound, MASKED: tl.constexpr, DOT: tl.constexpr):
    """One query block of dK/dV, transposed (rows are the program's keys): P^T recomputed from
    the log-sum-exp, dV += P^T dO, dS^T = P^T * (V dO^T - delta), dK += dS^T Q (unscaled). The
    masked step bounds the exponent by `bound` (`_outside_bias`)."""
    qk_t = _mm(k, tl.trans(q), DOT)  # (keys, queries)
    if MASKED:
        p_t = tl.math.exp2(tl.minimum(qk_t * qk_scale - lse[None, :], bound))
    else:
        p_t = tl.math.exp2(qk_t * qk_scale - lse[None, :])
    dv = dv + _mm(p_t, do, DOT)
    dp_t = _mm(v, tl.trans(do), DOT)
    ds_t = p_t * (dp_t - delta[None, :])
    return dk + _mm(ds_t, q, DOT), dv


# MLKA dK/dV (_mlka_dkdv_kernel, 16-bit only): runs of BLOCK_M keys x BLOCK_N queries; the
# defaults (`_MLKA_BWD`), then alternatives. 64 x 32 keeps dK, dV and the scores of a warpgroup
# in 128 registers at head dim <= 32 on sm_90 (16 warps per H100 SM); 64 x 64 spilled there.
MLKA_DKDV_CONFIGS = [
    triton.Config(dict(BLOCK_M=64, BLOCK_N=32), num_warps=4, num_stages=2),  # 16-bit, head dim <= 64
    triton.Config(dict(BLOCK_M=64, BLOCK_N=16), num_warps=4, num_stages=1),  # sm_90 head dim 128
    triton.Config(dict(BLOCK_M=64, BLOCK_N=32), num_warps=4, num_stages=1),
    triton.Config(dict(BLOCK_M=128, BLOCK_N=32), num_warps=8, num_stages=2),
    triton.Config(dict(BLOCK_M=64, BLOCK_N=16), num_warps=4, num_stages=3),
]


@tuning.autotuned("mlka_dkdv", MLKA_DKDV_CONFIGS, _KEY + ["K_SHARED", "V_SHARED", "SPLITS", "RUN"],
                  lambda args: backward_candidates(args, "dkdv"))
@triton.jit
def _mlka_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA,
                      stride_qb, stride_qh, stride_ql,
                      stride_kb, stride_kh, stride_kl,
                      stride_vb, stride_vh, stride_vl,
                      stride_ob, stride_oh, stride_ol,
                      stride_dkb, stride_dkh, stride_dkl,
                      stride_dvb, stride_dvh, stride_dvl,
                      B, H, GRID_H, GRID_W, RY, RX, qk_scale, sm_scale, SPLITS,
                      K_SHARED: tl.constexpr, V_SHARED: tl.constexpr, RUN: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, DOT: tl.constexpr):
    """MLKA dK = scale * dS^T Q and dV = P^T dO for a run of BLOCK_M consecutive keys and one head,
    sweeping the queries in runs of BLOCK_N with the forward's band split (the queries whose
    windows reach the key run lie in the grid rows within RY of it: only those blocks, and a
    partial last one, are masked; the others run an unmasked, pipelined loop). dK and dV
    accumulate in fp32 registers and are stored once (per batch element, or per run of the batch).

    A shared k or v is reduced over a run of RUN batch elements inside the program (SPLITS runs,
    RUN * SPLITS >= B, the loop over the run unrolled); with SPLITS > 1, each program writes its
    run's fp32 partial sum to split `split` of DK/DV (a (SPLITS, H, L, D) buffer) and the
    launcher adds the splits in a fixed order: deterministic, no atomics. Batched: RUN = 1.
    DELTA (rowsum(dO * O)) is read, written by the dQ launch before this one."""
    pid, h = tl.program_id(0), tl.program_id(1)
    if K_SHARED or V_SHARED:  # split `split` of SPLITS runs of RUN batch elements
        split, tile = pid % SPLITS, pid // SPLITS
        b_lo = split * RUN
        b_hi = tl.minimum(b_lo + RUN, B)
    else:
        b_lo, tile = pid % B, pid // B
        b_hi = b_lo + 1
    length = GRID_H * GRID_W
    k_idx = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    k_ok = k_idx < length
    inv_w = 1.0 / GRID_W.to(tl.float32)
    ky, kx = _window_coords(k_idx, inv_w, GRID_W, RY, RX)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    full, band_lo, band_hi = _mlka_band(tile, GRID_H, GRID_W, RY, BLOCK_M, BLOCK_N)
    n_before = band_lo // BLOCK_N
    n_fast = n_before + (full - band_hi) // BLOCK_N
    # a shared k or v keeps summing over the batch run, a batched one restarts per element
    dk = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for r in tl.static_range(RUN):  # unrolled: a loop over the run cost ~100 registers (sm_90)
        b = b_lo + r
        if b < b_hi:
            k = _load_rows(_head(K, b, h, stride_kb, stride_kh), k_idx, k_ok, stride_kl, offs_d)
            v = _load_rows(_head(V, b, h, stride_vb, stride_vh), k_idx, k_ok, stride_vl, offs_d)
            if not K_SHARED:
                dk = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
            if not V_SHARED:
                dv = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
            q_base = _head(Q, b, h, stride_qb, stride_qh)
            do_base = _head(DO, b, h, stride_ob, stride_oh)
            row = _lse_row(b, h, H, GRID_H, GRID_W)
            for j in range(0, n_fast):
                start = j * BLOCK_N + tl.where(j >= n_before, band_hi - band_lo, 0)
                q = tl.load(q_base + (start + offs_n)[:, None] * stride_ql + offs_d[None, :])
                do = tl.load(do_base + (start + offs_n)[:, None] * stride_ol + offs_d[None, :])
                lse = tl.load(LSE + row + start + offs_n)
                delta = tl.load(DELTA + row + start + offs_n)
                dk, dv = _mlka_dkdv_step(k, v, q, do, lse, delta, dk, dv, qk_scale, None, False, DOT)
            # the band's whole blocks: the window mask only (keys off the grid need none, their rows
            # are never stored)
            for start in range(band_lo, band_hi, BLOCK_N):
                q = tl.load(q_base + (start + offs_n)[:, None] * stride_ql + offs_d[None, :])
                do = tl.load(do_base + (start + offs_n)[:, None] * stride_ol + offs_d[None, :])
                lse = tl.load(LSE + row + start + offs_n)
                delta = tl.load(DELTA + row + start + offs_n)
                qy, qx = _window_coords(start + offs_n, inv_w, GRID_W, RY, RX)
                bound = _outside_bias(ky, kx, qy, qx, RY, RX)
                dk, dv = _mlka_dkdv_step(k, v, q, do, lse, delta, dk, dv, qk_scale, bound, True, DOT)
            if full < length:  # the partial last block: queries off the grid (q, dO zeros) get a
                q_idx = full + offs_n  # log-sum-exp of +inf, so P = 0 there with no extra mask
                q_ok = q_idx < length
                q = _load_rows(q_base, q_idx, q_ok, stride_ql, offs_d)
                do = _load_rows(do_base, q_idx, q_ok, stride_ol, offs_d)
                lse = tl.load(LSE + row + q_idx, mask=q_ok, other=float("inf"))
                delta = tl.load(DELTA + row + q_idx, mask=q_ok, other=0.0)
                qy, qx = _window_coords(q_idx, inv_w, GRID_W, RY, RX)
                bound = _outside_bias(ky, kx, qy, qx, RY, RX)
                dk, dv = _mlka_dkdv_step(k, v, q, do, lse, delta, dk, dv, qk_scale, bound, True, DOT)
            if not K_SHARED:
                tl.store(_head(DK, b, h, stride_dkb, stride_dkh) + k_idx[:, None] * stride_dkl + offs_d[None, :],
                         (dk * sm_scale).to(DK.dtype.element_ty), mask=k_ok[:, None])
            if not V_SHARED:
                tl.store(_head(DV, b, h, stride_dvb, stride_dvh) + k_idx[:, None] * stride_dvl + offs_d[None, :],
                         dv.to(DV.dtype.element_ty), mask=k_ok[:, None])
    if K_SHARED:
        tl.store(_head(DK, split, h, stride_dkb, stride_dkh) + k_idx[:, None] * stride_dkl + offs_d[None, :],
                 (dk * sm_scale).to(DK.dtype.element_ty), mask=k_ok[:, None])
    if V_SHARED:
        tl.store(_head(DV, split, h, stride_dvb, stride_dvh) + k_idx[:, None] * stride_dvl + offs_d[None, :],
                 dv.to(DV.dtype.element_ty), mask=k_ok[:, None])


# ------------------------------------------------------------------------------------------------
# LCA's backward with the batch folded: the forward's 2D tiles, FOLD batch elements per query tile
# ------------------------------------------------------------------------------------------------

@triton.jit
def _lca_coords(y, x, ok, far, RY, RX):
    """Scaled fp32 grid coordinates (Y, X) = (y (2 RX + 1), x (2 RY + 1)) of tokens for
    `_inside_bound`; a token not `ok` (off the grid, or a batch element past B) gets Y = `far`,
    so that no window holds it (queries and keys take sentinels of opposite signs)."""
    yy = tl.where(ok, y * (2 * RX + 1), far)
    return yy.to(tl.float32), (x * (2 * RY + 1)).to(tl.float32)


@triton.jit
def _inside_bound(ay, ax, by, bx, RY, RX):
    """(len a, len b) exponent bound that keeps LCA's window mask without boolean tensors: >= 512
    where token b lies inside token a's window (and both are valid), <= -512 elsewhere: with the
    scaled coordinates of `_lca_coords`, inside is max(|dY|, |dX|) < T = (2 RY + 1)(2 RX + 1) / 2
    (a half-integer, never reached), so the bound is 1024 (T - max(|dY|, |dX|)). Applied as
    p = exp2(min(s, bound)): p = 0 outside (the opposite sign of MLKA's `_outside_bias`)."""
    t = tl.maximum(tl.abs(ay[:, None] - by[None, :]), tl.abs(ax[:, None] - bx[None, :]))
    half = ((2 * RY + 1) * (2 * RX + 1)).to(tl.float32) * 512.0
    return half - t * 1024.0


# LCA dQ (_lca_dq_kernel): the forward's tiles (TILE_H x TILE_W, shrunk by `fold_tile` for FOLD
# batch elements, so FOLD x TILE_H x TILE_W rows per product) x BLOCK_H x BLOCK_W key blocks; the
# defaults (`_LCA_BWD`), then alternatives.
LCA_DQ_CONFIGS = [
    _tile_config((8, 8), (4, 8), 4, 1),  # 16-bit, head dim <= 64
    _tile_config((4, 4), (4, 8), 4, 2),  # 16-bit, head dim 128
    _tile_config((8, 8), (4, 8), 4, 2),
    _tile_config((8, 8), (8, 8), 8, 2),
    _tile_config((8, 8), (8, 8), 4, 2),
]


@tuning.autotuned("lca_dq", LCA_DQ_CONFIGS, _KEY + ["FOLD", "DELTA_FROM_O"],
                  lambda args: lca_backward_candidates(args, "dq"))
@triton.jit
def _lca_dq_kernel(Q, K, V, O, DO, DQ, LSE, DELTA,
                   stride_qb, stride_qh, stride_ql,
                   stride_kb, stride_kh, stride_kl,
                   stride_vb, stride_vh, stride_vl,
                   B, H, GRID_H, GRID_W, RY, RX, qk_scale, sm_scale,
                   DELTA_FROM_O: tl.constexpr, FOLD: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
                   BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, HEAD_DIM: tl.constexpr, DOT: tl.constexpr):
    """LCA dQ = scale * dS K, dS = P * (dO V^T - delta), P recomputed from the log-sum-exp, for one
    query tile and head and FOLD batch elements at once, as the forward folds them (FOLD > 1 only
    with a shared k and v: the key blocks are loaded and the window mask computed once for all of
    them), sweeping the key blocks that cover the tile's key patch.

    DELTA_FROM_O: the program also computes delta = rowsum(dO * O) (fp32) of its rows, uses it and
    writes it to DELTA for the dK/dV launch that follows (no torch glue); else it reads DELTA.
    O, DO and DQ are contiguous (B, H, L, D) (the launcher's own buffers and dO made contiguous):
    their rows share one offset with the log-sum-exp's, row x HEAD_DIM (fewer 64-bit products
    per row than a set of strides each)."""
    # grid (tiles, groups of FOLD batch elements, heads): no integer division for the group
    tile, b0, h = tl.program_id(0), tl.program_id(1) * FOLD, tl.program_id(2)
    y0, x0 = _tile_corner(tile, GRID_W, TILE_H, TILE_W)
    r = tl.arange(0, FOLD * TILE_H * TILE_W)
    bb = b0 + r // (TILE_H * TILE_W)  # each row's batch element
    qy = y0 + (r % (TILE_H * TILE_W)) // TILE_W
    qx = x0 + r % TILE_W
    q_ok = (qy < GRID_H) & (qx < GRID_W) & (bb < B)
    q_idx = qy * GRID_W + qx
    offs_d = tl.arange(0, HEAD_DIM)
    q = _load_rows(_head(Q, bb, h, stride_qb, stride_qh)[:, None], q_idx, q_ok, stride_ql, offs_d)
    row = _lse_row(bb, h, H, GRID_H, GRID_W) + q_idx
    do = _load_rows(DO, row, q_ok, HEAD_DIM, offs_d)
    lse = tl.load(LSE + row, mask=q_ok, other=float("inf"))  # rows not on the grid: P = 0
    if DELTA_FROM_O:
        o = _load_rows(O, row, q_ok, HEAD_DIM, offs_d)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        tl.store(DELTA + row, delta, mask=q_ok)
    else:
        delta = tl.load(DELTA + row, mask=q_ok, other=0.0)
    k_base = _head(K, b0, h, stride_kb, stride_kh)  # FOLD > 1: k and v shared, batch stride 0
    v_base = _head(V, b0, h, stride_vb, stride_vh)
    dq = tl.zeros([FOLD * TILE_H * TILE_W, HEAD_DIM], tl.float32)
    y_lo, y_hi, x_lo, x_hi = _patch(y0, x0, GRID_H, GRID_W, RY, RX, TILE_H, TILE_W)
    oy, ox, blocks_x, n_blocks = _sweep(y_lo, y_hi, x_lo, x_hi, GRID_H, GRID_W, BLOCK_H, BLOCK_W, False)
    by, bx, x_end = oy, ox, ox + blocks_x * BLOCK_W  # the block's corner, moved row by row
    for i in range(0, n_blocks):
        ky, kx, k_idx, k_ok = _tokens(by, bx, GRID_H, GRID_W, BLOCK_H, BLOCK_W)
        k = _load_rows(k_base, k_idx, k_ok, stride_kl, offs_d)
        v = _load_rows(v_base, k_idx, k_ok, stride_vl, offs_d)
        p = tl.math.exp2(_mm(q, tl.trans(k), DOT) * qk_scale - lse[:, None])
        p = tl.where(_visible(qy, qx, q_ok, ky, kx, k_ok, RY, RX, False), p, 0.0)
        ds = p * (_mm(do, tl.trans(v), DOT) - delta[:, None])
        dq += _mm(ds, k, DOT)
        bx += BLOCK_W
        by = tl.where(bx >= x_end, by + BLOCK_H, by)
        bx = tl.where(bx >= x_end, ox, bx)
    tl.store(DQ + row[:, None] * HEAD_DIM + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=q_ok[:, None])


# LCA dK/dV (_lca_dkdv_kernel): TILE_H x TILE_W keys owned x query blocks of FOLD batch elements x
# BLOCK_H x BLOCK_W tokens (the block shrunk by `fold_tile`, so FOLD x BLOCK_H x BLOCK_W rows per
# product); the defaults (`_LCA_BWD`), then alternatives.
LCA_DKDV_CONFIGS = [
    _tile_config((4, 4), (8, 8), 4, 2),  # 16-bit, head dim 64
    _tile_config((4, 4), (8, 8), 4, 1),  # 16-bit, head dims 16, 32 and 128
    _tile_config((4, 8), (8, 8), 4, 2),
    _tile_config((4, 4), (8, 8), 8, 2),
]


@tuning.autotuned("lca_dkdv", LCA_DKDV_CONFIGS, _KEY + ["FOLD", "K_SHARED", "V_SHARED"],
                  lambda args: lca_backward_candidates(args, "dkdv"))
@triton.jit
def _lca_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA,
                     stride_qb, stride_qh, stride_ql,
                     stride_kb, stride_kh, stride_kl,
                     stride_vb, stride_vh, stride_vl,
                     stride_ob, stride_oh, stride_ol,
                     stride_dkb, stride_dkh, stride_dkl,
                     stride_dvb, stride_dvh, stride_dvl,
                     B, H, GRID_H, GRID_W, RY, RX, qk_scale, sm_scale,
                     K_SHARED: tl.constexpr, V_SHARED: tl.constexpr, FOLD: tl.constexpr,
                     TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
                     HEAD_DIM: tl.constexpr, DOT: tl.constexpr):
    """LCA dK = scale * dS^T Q and dV = P^T dO for one key tile (TILE_H x TILE_W keys) and head,
    sweeping the query blocks that cover its patch (the queries whose windows reach it), each block
    FOLD batch elements x BLOCK_H x BLOCK_W tokens: the queries are the rows of the products
    (S = Q K^T, dP = dO V^T), and the sum of a shared k/v's gradient over the batch elements of a
    block is part of the products dV += P^T dO, dK += dS^T Q. The key tile being small, its patch
    is too, so few keys are visited per useful key; a block of FOLD x BLOCK_H x BLOCK_W rows keeps
    the products large.

    k and v both shared: a program loops over the groups of FOLD batch elements and stores the sum
    once (deterministic, no atomics, no partial sums in memory). Otherwise FOLD = 1: both batched,
    a program per key tile and batch element; one shared, a program per key tile loops over the
    batch, summing the shared gradient and storing the batched one per element. DELTA is read
    (written by the dQ launch before this one)."""
    pid, h = tl.program_id(0), tl.program_id(1)
    if K_SHARED or V_SHARED:
        g_lo, g_hi, tile = 0, tl.cdiv(B, FOLD), pid
    else:
        g_lo, tile = pid % B, pid // B
        g_hi = g_lo + 1
    y0, x0 = _tile_origin(tile, GRID_W, TILE_H, TILE_W)
    ky, kx, k_idx, k_ok = _tokens(y0, x0, GRID_H, GRID_W, TILE_H, TILE_W)
    cy, cx = _lca_coords(ky, kx, k_ok, 1 << 20, RY, RX)
    offs_d = tl.arange(0, HEAD_DIM)
    y_lo, y_hi, x_lo, x_hi = _patch(y0, x0, GRID_H, GRID_W, RY, RX, TILE_H, TILE_W)
    oy, ox, blocks_x, n_blocks = _sweep(y_lo, y_hi, x_lo, x_hi, GRID_H, GRID_W, BLOCK_H, BLOCK_W, False)
    r = tl.arange(0, FOLD * BLOCK_H * BLOCK_W)
    r_b = r // (BLOCK_H * BLOCK_W)  # each row's batch element within the group
    r_y = (r % (BLOCK_H * BLOCK_W)) // BLOCK_W  # and its place in the block
    r_x = r % BLOCK_W
    rel = r_y * GRID_W + r_x
    # scaled coordinates (`_lca_coords`) of the rows, relative to the block's corner
    sy, sx = (2 * RX + 1).to(tl.float32), (2 * RY + 1).to(tl.float32)
    rel_y, rel_x = r_y.to(tl.float32) * sy, r_x.to(tl.float32) * sx
    x_end = ox + blocks_x * BLOCK_W
    dk = tl.zeros([TILE_H * TILE_W, HEAD_DIM], tl.float32)
    dv = tl.zeros([TILE_H * TILE_W, HEAD_DIM], tl.float32)
    for g in range(g_lo, g_hi):
        b0 = g * FOLD
        k = _load_rows(_head(K, b0, h, stride_kb, stride_kh), k_idx, k_ok, stride_kl, offs_d)
        v = _load_rows(_head(V, b0, h, stride_vb, stride_vh), k_idx, k_ok, stride_vl, offs_d)
        if not K_SHARED:
            dk = tl.zeros([TILE_H * TILE_W, HEAD_DIM], tl.float32)
        if not V_SHARED:
            dv = tl.zeros([TILE_H * TILE_W, HEAD_DIM], tl.float32)
        bb = b0 + r_b
        b_ok = bb < B
        q_rows = _head(Q, bb, h, stride_qb, stride_qh)[:, None]
        do_rows = _head(DO, bb, h, stride_ob, stride_oh)[:, None]
        lse_rows = _lse_row(bb, h, H, GRID_H, GRID_W)
        by, bx = oy, ox  # the block's corner, moved row by row
        for i in range(0, n_blocks):
            q_ok = (by + r_y < GRID_H) & (bx + r_x < GRID_W) & b_ok
            q_idx = by * GRID_W + bx + rel
            q = _load_rows(q_rows, q_idx, q_ok, stride_ql, offs_d)
            do = _load_rows(do_rows, q_idx, q_ok, stride_ol, offs_d)
            # rows not on the grid (or past the batch) get a log-sum-exp of +inf: P = 0 there
            lse = tl.load(LSE + lse_rows + q_idx, mask=q_ok, other=float("inf"))
            delta = tl.load(DELTA + lse_rows + q_idx, mask=q_ok, other=0.0)
            ay = by.to(tl.float32) * sy + rel_y
            ax = bx.to(tl.float32) * sx + rel_x
            bound = _inside_bound(ay, ax, cy, cx, RY, RX)  # (queries, keys)
            p = tl.math.exp2(tl.minimum(_mm(q, tl.trans(k), DOT) * qk_scale - lse[:, None], bound))
            dv += _mm(tl.trans(p), do, DOT)
            ds = p * (_mm(do, tl.trans(v), DOT) - delta[:, None])
            dk += _mm(tl.trans(ds), q, DOT)
            bx += BLOCK_W
            by = tl.where(bx >= x_end, by + BLOCK_H, by)
            bx = tl.where(bx >= x_end, ox, bx)
        if not K_SHARED:
            tl.store(_head(DK, b0, h, stride_dkb, stride_dkh) + k_idx[:, None] * stride_dkl + offs_d[None, :],
                     (dk * sm_scale).to(DK.dtype.element_ty), mask=k_ok[:, None])
        if not V_SHARED:
            tl.store(_head(DV, b0, h, stride_dvb, stride_dvh) + k_idx[:, None] * stride_dvl + offs_d[None, :],
                     dv.to(DV.dtype.element_ty), mask=k_ok[:, None])
    if K_SHARED:
        tl.store(_head(DK, 0, h, stride_dkb, stride_dkh) + k_idx[:, None] * stride_dkl + offs_d[None, :],
                 (dk * sm_scale).to(DK.dtype.element_ty), mask=k_ok[:, None])
    if V_SHARED:
        tl.store(_head(DV, 0, h, stride_dvb, stride_dvh) + k_idx[:, None] * stride_dvl + offs_d[None, :],
                 dv.to(DV.dtype.element_ty), mask=k_ok[:, None])


# ------------------------------------------------------------------------------------------------
# Launch code and the autograd Function (each op's file binds COMPLEMENT)
# ------------------------------------------------------------------------------------------------

import contextlib  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Callable, Optional  # noqa: E402

import torch  # noqa: E402

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# The defaults (the config the interpreter runs, and the first the autotuner tries): tiles,
# blocks (in tokens), warps, product precision and whether dK/dV take one launch each, per
# kernel, dtype ("fp32", or "16" for fp16/bf16) and head dim. Chosen by compiling every kernel
# for sm_80 and sm_90 (`rlr-fast kernels`) and keeping the largest tiles with which none spills
# registers. fp32 tiles are small (a tf32x3 product keeps three operand splits live) and the
# backward keeps more tiles live than the forward. At head dim 128 the fp32 backward multiplies
# with fp32 FMA ("ieee": tf32x3 spills at every tile size tried) and dK/dV take two launches.
_CONFIGS = {
    #  kind   dtype  D      tile    block  warps  DOT      split
    ("fwd", "fp32", 16): ((4, 4), (4, 8), 4, "tf32x3", False),
    ("fwd", "fp32", 32): ((4, 4), (4, 4), 4, "tf32x3", False),
    ("fwd", "fp32", 64): ((4, 4), (4, 4), 8, "tf32x3", False),
    ("fwd", "fp32", 128): ((4, 4), (4, 4), 8, "tf32x3", False),
    ("dq", "fp32", 16): ((4, 8), (4, 8), 4, "tf32x3", False),
    ("dq", "fp32", 32): ((4, 4), (4, 4), 4, "tf32x3", False),
    ("dq", "fp32", 64): ((4, 4), (4, 4), 4, "tf32x3", False),
    ("dq", "fp32", 128): ((4, 4), (4, 4), 8, "ieee", False),
    ("dkdv", "fp32", 16): ((4, 4), (4, 4), 8, "tf32x3", False),
    ("dkdv", "fp32", 32): ((4, 4), (4, 4), 8, "tf32x3", False),
    ("dkdv", "fp32", 64): ((4, 4), (4, 4), 8, "tf32x3", False),
    ("dkdv", "fp32", 128): ((4, 4), (4, 4), 8, "ieee", True),
    ("fwd", "16", 16): ((8, 8), (4, 8), 4, "native", False),
    ("fwd", "16", 32): ((8, 8), (4, 8), 4, "native", False),
    ("fwd", "16", 64): ((8, 8), (4, 8), 4, "native", False),
    ("fwd", "16", 128): ((4, 8), (4, 8), 4, "native", False),
    ("dq", "16", 16): ((8, 8), (4, 8), 4, "native", False),
    ("dq", "16", 32): ((8, 8), (4, 8), 4, "native", False),
    ("dq", "16", 64): ((8, 8), (4, 8), 4, "native", False),
    ("dq", "16", 128): ((4, 4), (4, 8), 4, "native", False),
    ("dkdv", "16", 16): ((4, 8), (4, 8), 4, "native", False),
    ("dkdv", "16", 32): ((4, 8), (4, 4), 4, "native", False),
    ("dkdv", "16", 64): ((4, 4), (4, 8), 4, "native", False),
    ("dkdv", "16", 128): ((4, 4), (4, 8), 8, "native", True),
}
# The blocks above hug LCA's key patch (a 4 x 8 block wastes fewer keys around it than 8 x 8).


# MLKA's forward (_mlka_fwd_kernel), defaults: runs of BLOCK_M queries x BLOCK_N keys, warps,
# pipeline stages, per dtype and head dim; the largest tiles that compile with no spills.
_MLKA_FWD = {
    #  dtype  D      M    N   warps stages DOT
    ("fp32", 16): (32, 32, 4, 1, "tf32x3"),
    ("fp32", 32): (32, 32, 4, 2, "tf32x3"),
    ("fp32", 64): (32, 32, 4, 2, "tf32x3"),
    ("fp32", 128): (32, 32, 8, 2, "tf32x3"),
    ("16", 16): (64, 64, 4, 3, "native"),
    ("16", 32): (64, 64, 4, 3, "native"),
    ("16", 64): (64, 64, 4, 3, "native"),
    ("16", 128): (64, 64, 4, 2, "native"),
}


# MLKA's backward (_mlka_dq_kernel, _mlka_dkdv_kernel), 16-bit defaults per head dim and target
# ("sm90": wgmma, also without a known target; "sm80": mma, sm_80 to sm_89): runs of BLOCK_M
# tokens owned (queries for dQ, keys for dK/dV) x BLOCK_N swept per step, warps, stages, product
# precision and register budget (the default config's own: the alternatives of the space compile
# without one), each compiled for its target with no spills. 64-row runs: one
# wgmma warpgroup per 4 warps. sm_90 keeps 128 registers (4 blocks of 4 warps per SM) where that
# does not spill; mma on sm_80 holds more operands in registers, so no budget there (3 blocks at
# 168). One pipeline stage where two spill at 128 registers (sm_90 dQ at head dim 32 and 64, dK/dV
# at 64: 16 warps per SM hide the load latency instead). sm_90 dK/dV at head dim 64 sweeps 16
# queries per step: 64 x 32 costs ~10% fewer instructions per score but needs 163-241 registers
# (8-12 warps per SM). Head dim 128 on sm_80 spills in every run tried
# (dK, dV and K, V of 64 rows live in registers): the 2D-tile kernels there (no entry).
_MLKA_BWD = {
    #  kind   D    target   M    N  warps stages DOT   maxnreg
    ("dq", 16, "sm90"): (64, 64, 4, 2, "native", 128),
    ("dq", 32, "sm90"): (64, 64, 4, 1, "native", 128),
    ("dq", 64, "sm90"): (64, 32, 4, 1, "native", 128),
    ("dq", 128, "sm90"): (64, 32, 4, 2, "native", None),
    ("dkdv", 16, "sm90"): (64, 32, 4, 2, "native", 128),
    ("dkdv", 32, "sm90"): (64, 32, 4, 2, "native", 128),
    ("dkdv", 64, "sm90"): (64, 16, 4, 1, "native", 128),
    ("dkdv", 128, "sm90"): (64, 16, 4, 1, "native", None),
    ("dq", 16, "sm80"): (64, 64, 4, 2, "native", 128),
    ("dq", 32, "sm80"): (64, 64, 4, 2, "native", None),
    ("dq", 64, "sm80"): (64, 32, 4, 2, "native", None),
    ("dkdv", 16, "sm80"): (64, 32, 4, 2, "native", 128),
    ("dkdv", 32, "sm80"): (64, 32, 4, 2, "native", None),
    ("dkdv", 64, "sm80"): (64, 32, 4, 2, "native", None),
}

# MLKA's backward in 16 bits: the FlashAttention-2 style kernels above (True, the default) or the
# 2D-tile dQ and dK/dV kernels it shares with LCA (False; RLR_FAST_MLKA_BACKWARD=tiles at import).
# fp32 keeps the 2D-tile kernels: its tf32x3 products on runs of 16-32 rows spill registers.
MLKA_FA2_BACKWARD = os.environ.get("RLR_FAST_MLKA_BACKWARD", "fa2") != "tiles"


# LCA's backward with the batch folded (_lca_dq_kernel, _lca_dkdv_kernel), 16-bit defaults per head
# dim: dQ the forward's tile (shrunk for FOLD batch elements, `fold_tile`: 2 x 4 tokens x 8 at
# FOLD 8) x BLOCK key blocks; dK/dV a TILE of keys x query blocks of FOLD batch elements (BLOCK
# shrunk by `fold_tile`), warps, stages, register budget (None: the compiler's). Chosen by the
# weighted report (`rlr-fast kernels`, sm_90): one pipeline stage where the loops are short (a 2 x 4
# tile's patch is 4 key blocks at 32 x 32 window 7) and two cost more in their first loads than they
# hide; 16-key tiles for dK/dV keep its keys visited per useful key at 2.4 (32 keys: 3.0).
_LCA_BWD = {
    #  kind   D      tile    block  warps stages maxnreg
    ("dq", 16): ((8, 8), (4, 8), 4, 1, None),
    ("dq", 32): ((8, 8), (4, 8), 4, 1, None),
    ("dq", 64): ((8, 8), (4, 8), 4, 1, None),
    ("dq", 128): ((4, 4), (4, 8), 4, 2, None),
    ("dkdv", 16): ((4, 4), (8, 8), 4, 1, None),
    ("dkdv", 32): ((4, 4), (8, 8), 4, 1, None),
    ("dkdv", 64): ((4, 4), (8, 8), 4, 2, None),
    ("dkdv", 128): ((4, 4), (8, 8), 4, 1, None),
}

# LCA's backward in 16 bits: the batch-folded kernels above (True, the default; two launches, delta
# computed by the dQ kernel, a shared k/v's batch sum inside dK/dV's products) or the 2D-tile dQ and
# dK/dV kernels it shares with MLKA and their torch glue (False; RLR_FAST_LCA_BACKWARD=tiles at
# import). The sums run in another order, so the gradients differ in their last bits.
LCA_FUSED_BACKWARD = os.environ.get("RLR_FAST_LCA_BACKWARD", "fold") != "tiles"


def lca_fused_backward(dtype: torch.dtype, head_dim: int) -> bool:
    """Whether LCA's backward in `dtype` at `head_dim` runs the batch-folded kernels."""
    return LCA_FUSED_BACKWARD and dtype != torch.float32 and ("dq", head_dim) in _LCA_BWD


# MLKA's FlashAttention-2 style backward finds grid coordinates in fp32 (`_window_coords`): exact
# for fewer tokens than this; the forward refuses longer grids where that backward would run.
MLKA_FA2_MAX_TOKENS = 2 ** 21


def _target_family(arch: Optional[int]) -> str:
    """`_MLKA_BWD`'s target for compute capability `arch`: "sm80" below sm_90, else (or unknown) "sm90"."""
    return "sm80" if arch is not None and arch < 90 else "sm90"


def mlka_fa2_backward(dtype: torch.dtype, head_dim: int, arch: Optional[int] = None) -> bool:
    """Whether MLKA's backward in `dtype` at `head_dim` on compute capability `arch` (None: unknown,
    as sm_90) runs the FlashAttention-2 style kernels (`_MLKA_BWD` has defaults for it)."""
    return (MLKA_FA2_BACKWARD and dtype != torch.float32
            and ("dq", head_dim, _target_family(arch)) in _MLKA_BWD)


def block_config(kind: str, head_dim: int, dtype: torch.dtype, complement: bool = False,
                 arch: Optional[int] = None) -> dict:
    """Default configuration of a kernel ("fwd", "dq" or "dkdv") for a head dim, dtype, op (MLKA if
    `complement`) and compute capability `arch` (`tuning.target_arch`; only MLKA's 16-bit backward
    depends on it): its constexprs
    TILE_H/TILE_W (the tile a program owns), BLOCK_H/BLOCK_W (the blocks it sweeps) and DOT, plus
    num_warps and, for dK/dV, ``split`` (one launch per gradient).

    Square-ish tiles keep a tile's key patch small: a 4 x 4 tile with a 7 x 7 window reaches
    10 x 10 keys, where 16 consecutive tokens of a 32-wide grid reach 7 x 32."""
    key = (kind, "fp32" if dtype == torch.float32 else "16", head_dim)
    if kind == "fwd" and complement:
        m, n, warps, stages, dot = _MLKA_FWD[key[1:]]
        return dict(BLOCK_M=m, BLOCK_N=n, DOT=dot, num_warps=warps, num_stages=stages)
    if complement and kind != "fwd" and mlka_fa2_backward(dtype, head_dim, arch):
        m, n, warps, stages, dot, maxnreg = _MLKA_BWD[(kind, head_dim, _target_family(arch))]
        return dict(BLOCK_M=m, BLOCK_N=n, DOT=dot, num_warps=warps, num_stages=stages, split=False,
                    maxnreg=maxnreg)
    if not complement and kind != "fwd" and lca_fused_backward(dtype, head_dim):
        return lca_backward_config(kind, head_dim)
    tile, block, warps, dot, split = _CONFIGS[key]
    # Pipeline stages: 3 in the forward, 2 in the backward, none in a split dK/dV. ptxas, left to
    # itself, keeps the dK/dV kernels (and the fp32-FMA ones) to fewer registers than they need
    # and spills; an explicit register budget does not (232, or 128 for those with one launch per
    # gradient and fp32 FMA, each the budget with which every layout and arch compiled clean).
    maxnreg = 128 if dot == "ieee" or split else (232 if kind == "dkdv" else None)
    # the forward pipelines 3 stages, but LCA's 16-bit one at head dim <= 64 none: its patch is a few
    # key blocks (4 at 32 x 32 window 7), and the pipeline's first loads cost more than they hide
    # (66.5 weighted instructions per useful score against 76.5 with 3 stages, sm_90, head dim 32)
    stages = 1 if (kind == "fwd" and dot == "native" and head_dim <= 64) else 3
    return dict(TILE_H=tile[0], TILE_W=tile[1], BLOCK_H=block[0], BLOCK_W=block[1], DOT=dot,
                num_warps=warps, num_stages=1 if split else (stages if kind == "fwd" else 2), split=split,
                maxnreg=maxnreg)


def lca_backward_config(kind: str, head_dim: int) -> dict:
    """Default config of LCA's batch-folded dQ or dK/dV kernel (`_LCA_BWD`), unfolded (the launch
    shrinks the dQ tile or the dK/dV query block for its FOLD)."""
    tile, block, warps, stages, maxnreg = _LCA_BWD[(kind, head_dim)]
    return dict(TILE_H=tile[0], TILE_W=tile[1], BLOCK_H=block[0], BLOCK_W=block[1], DOT="native",
                num_warps=warps, num_stages=stages, split=False, maxnreg=maxnreg)


def product_precision(dot: str, dtype: torch.dtype) -> str:
    """The DOT constexpr a launch passes for a config's product precision. Triton's CPU
    interpreter computes bf16 products wrongly, so there (testing only) bf16 tiles are
    multiplied in fp32."""
    if dtype == torch.bfloat16 and tuning.interpreting():
        return "ieee"
    return dot


_TUNED = ("TILE_H", "TILE_W", "BLOCK_H", "BLOCK_W", "BLOCK_M", "BLOCK_N")


def as_config(cfg: dict) -> triton.Config:
    """A `block_config` as the autotuner's config: its tuned constexprs, num_warps and num_stages."""
    return triton.Config({name: cfg[name] for name in _TUNED if name in cfg}, num_warps=cfg["num_warps"],
                         num_stages=cfg["num_stages"])


def tile_rows(args) -> int:
    """Queries (or, for dK/dV, keys) a program owns: a 2D tile (times FOLD) or a run of BLOCK_M tokens."""
    return args["BLOCK_M"] if "BLOCK_M" in args else args.get("FOLD", 1) * args["TILE_H"] * args["TILE_W"]


def tile_cols(args) -> int:
    """Keys (for dK/dV, queries) per iteration of its loop: a 2D block or a run of BLOCK_N tokens."""
    return args["BLOCK_N"] if "BLOCK_N" in args else args["BLOCK_H"] * args["BLOCK_W"]


def _candidates(space: list, default: triton.Config, args: dict, complement: bool, fold: int = 1) -> list:
    """`space` as a call with these arguments runs it (tiles shrunk for `fold` batch elements),
    each config with the reason it does not fit the call: a tile or block larger than the grid,
    or than LCA's key patch, needs; or too many pipeline stages for the device's shared memory."""
    gh, gw, ry, rx, d = (args[name] for name in ("GRID_H", "GRID_W", "RY", "RX", "HEAD_DIM"))
    element_bytes = args["Q"].element_size()

    def folded(config):
        if fold == 1 or "TILE_H" not in config.kwargs:
            return config
        th, tw = fold_tile(config.kwargs["TILE_H"], config.kwargs["TILE_W"], fold)
        return triton.Config({**config.kwargs, "TILE_H": th, "TILE_W": tw}, num_warps=config.num_warps,
                             num_stages=config.num_stages)

    def sides(kw):
        if "BLOCK_M" in kw:
            return [(kw["BLOCK_M"], gh * gw), (kw["BLOCK_N"], gh * gw)]
        # LCA's blocks cover the key patch of a tile, MLKA's the whole grid
        patch_h, patch_w = (gh, gw) if complement else (kw["TILE_H"] + 2 * ry, kw["TILE_W"] + 2 * rx)
        return [(kw["TILE_H"], gh), (kw["TILE_W"], gw), (kw["BLOCK_H"], min(gh, patch_h)),
                (kw["BLOCK_W"], min(gw, patch_w))]

    out = []
    for config in space:
        is_default = config == default
        config = folded(config)
        kw = {**config.kwargs, "FOLD": fold}
        reason = None if is_default else tuning.misfit(sides(kw), tile_rows(kw), tile_cols(kw), d, element_bytes,
                                                       config)
        out.append(tuning.Candidate(config, is_default, reason))
    return out


def forward_candidates(args: dict, complement: bool) -> list:
    """The forward kernel's config space for a call (MLKA's if `complement`, else LCA's)."""
    default = as_config(block_config("fwd", args["HEAD_DIM"], args["Q"].dtype, complement))
    space = MLKA_FWD_CONFIGS if complement else LCA_FWD_CONFIGS
    return _candidates(space, default, args, complement, 1 if complement else args["FOLD"])


def lca_backward_candidates(args: dict, kind: str) -> list:
    """LCA's batch-folded dQ (`kind` "dq") or dK/dV ("dkdv") config space for a call: each config with
    its tile (dQ) or its query block (dK/dV) shrunk for FOLD batch elements (`fold_tile`), and the
    reason it does not fit the call; the register budget belongs to the default."""
    gh, gw, ry, rx, d, fold = (args[name] for name in ("GRID_H", "GRID_W", "RY", "RX", "HEAD_DIM", "FOLD"))
    cfg = lca_backward_config(kind, d)  # (the kernels also run in fp32, where tested directly)
    default = as_config(cfg)
    out = []
    for config in LCA_DQ_CONFIGS if kind == "dq" else LCA_DKDV_CONFIGS:
        is_default = config == default
        kw = dict(config.kwargs)
        side = ("TILE_H", "TILE_W") if kind == "dq" else ("BLOCK_H", "BLOCK_W")
        kw[side[0]], kw[side[1]] = fold_tile(kw[side[0]], kw[side[1]], fold)
        config = triton.Config(kw, num_warps=config.num_warps, num_stages=config.num_stages,
                               maxnreg=cfg["maxnreg"] if is_default else None)
        sides = [(kw["TILE_H"], gh), (kw["TILE_W"], gw), (kw["BLOCK_H"], min(gh, kw["TILE_H"] + 2 * ry)),
                 (kw["BLOCK_W"], min(gw, kw["TILE_W"] + 2 * rx))]
        tile, block = kw["TILE_H"] * kw["TILE_W"], kw["BLOCK_H"] * kw["BLOCK_W"]
        rows, cols = (fold * tile, block) if kind == "dq" else (tile, fold * block)
        reason = None if is_default else tuning.misfit(sides, rows, cols, d, args["Q"].element_size(), config)
        if (reason is None and not is_default and kind == "dkdv" and d >= 128 and config.num_stages > 1
                and config.num_warps == 4):
            # (compiled for sm_80 and sm_90: dK, dV and the staged query blocks of 4 warps exceed 255
            # registers per thread in some layout; 8 warps share them)
            reason = "two pipeline stages on 4 warps spill registers at head dim 128"
        out.append(tuning.Candidate(config, is_default, reason))
    return out


def backward_candidates(args: dict, kind: str) -> list:
    """The dQ (`kind` "dq") or dK/dV ("dkdv") kernel's config space for a call: the 2D-tile
    kernels' (which take COMPLEMENT), or MLKA's FlashAttention-2 style ones."""
    if "COMPLEMENT" not in args:
        # MLKA's: the register budget belongs to the default it was chosen with (no spills there);
        # the other configs compile with none (a budget tight for one tile spills another)
        cfg = block_config(kind, args["HEAD_DIM"], args["Q"].dtype, True, tuning.target_arch(args["Q"].device))
        out = _candidates(MLKA_DQ_CONFIGS if kind == "dq" else MLKA_DKDV_CONFIGS, as_config(cfg), args, True)
        return [tuning.Candidate(triton.Config(c.config.kwargs, num_warps=c.config.num_warps,
                                               num_stages=c.config.num_stages,
                                               maxnreg=cfg["maxnreg"] if c.default else None), c.default, c.reason)
                for c in out]
    default = as_config(block_config(kind, args["HEAD_DIM"], args["Q"].dtype, args["COMPLEMENT"],
                                     tuning.target_arch(args["Q"].device)))
    return _candidates(DQ_CONFIGS if kind == "dq" else DKDV_CONFIGS, default, args, args["COMPLEMENT"])


def _tiles(grid, cfg) -> int:
    """Number of tiles that cover the grid: TILE_H x TILE_W patches, or runs of BLOCK_M tokens."""
    if "BLOCK_M" in cfg:
        return triton.cdiv(grid[0] * grid[1], cfg["BLOCK_M"])
    return triton.cdiv(grid[0], cfg["TILE_H"]) * triton.cdiv(grid[1], cfg["TILE_W"])


def _strides(t: torch.Tensor):
    """(batch, head, token) strides of a (B, H, L, D) or shared (H, L, D) tensor; batch 0 if shared."""
    if t.dim() == 3:
        return 0, t.stride(0), t.stride(1)
    return t.stride(0), t.stride(1), t.stride(2)


def _check(q, k, v):
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the triton backend supports float32, float16 and bfloat16, not {q.dtype}; "
                        f"use backend='torch'")
    d = q.shape[-1]
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"the triton backend supports head dims {SUPPORTED_HEAD_DIMS}, got D={d}; "
                         f"use backend='torch'")


def _on_device(t: torch.Tensor):
    """The context to launch kernels on t in: Triton launches on the current CUDA device, so
    make it t's (a tensor on cuda:1 otherwise runs on cuda:0). Nothing to do on the CPU."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@dataclass
class Launch:
    """One launch of an autotuned kernel (by its name in ``tuning.KERNELS``): its grid of programs
    as a function of the config, every argument by name but the tuned ones, and the register
    budget. The autograd Function runs it (the autotuner picks the config); `rlr-fast kernels`
    compiles every config of it ahead of time with the same arguments, so the report describes
    the kernels that run."""
    name: str
    grid: Callable
    args: dict
    maxnreg: Optional[int] = None

    @property
    def kernel(self):
        """The autotuner."""
        return tuning.KERNELS[self.name].kernel

    def candidates(self) -> list:
        """Every config of the kernel's space as this launch runs it (`tuning.Candidate`)."""
        return tuning.KERNELS[self.name].candidates(self.args)

    @property
    def default(self) -> triton.Config:
        """The config the interpreter runs and the autotuner tries first."""
        candidates = self.candidates()
        return candidates[tuning.default_index(candidates)].config

    def arguments(self, config: triton.Config) -> dict:
        """Every argument of the kernel by name, constexprs too, with `config`'s."""
        return {**self.args, **config.kwargs}

    def options(self, config: triton.Config) -> dict:
        """Compiler options of the launch with `config` (a register budget: the launch's, or the
        config's own)."""
        maxnreg = self.maxnreg if self.maxnreg is not None else config.maxnreg
        extra = {} if maxnreg is None else dict(maxnreg=maxnreg)
        return dict(num_warps=config.num_warps, num_stages=config.num_stages, **extra)

    def programs_with(self, config: triton.Config) -> int:
        return math.prod(self.grid(config.kwargs))

    @property
    def programs(self) -> int:
        """Programs launched with the default config."""
        return self.programs_with(self.default)

    def __call__(self):
        extra = {} if self.maxnreg is None else dict(maxnreg=self.maxnreg)
        self.kernel[self.grid](**self.args, **extra)


def _named(kernel, *args, **constexprs) -> dict:
    """The kernel's positional arguments by parameter name, plus its constexprs."""
    return {**dict(zip(kernel.arg_names, args)), **constexprs}


def forward_launch(q, k, v, o, lse, grid, radius, scale, complement: bool) -> Launch:
    """The forward launch of one op (MLKA if `complement`) on checked, unit-last tensors."""
    b, h, _, d = q.shape
    dot = product_precision(block_config("fwd", d, q.dtype, complement)["DOT"], q.dtype)
    extra = {}
    if complement:
        name, kernel, groups = "mlka_fwd", _mlka_fwd_kernel, b
    else:
        fold = lca_fold(b, k, v)
        name, kernel, groups, extra = "lca_fwd", _lca_fwd_kernel, triton.cdiv(b, fold), dict(FOLD=fold)
    args = _named(kernel, q, k, v, o, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
                  b, h, *grid, *radius, scale * LOG2E, HEAD_DIM=d, DOT=dot, **extra)
    return Launch(name, lambda meta: (_tiles(grid, meta) * groups, h), args)


def lca_fold(batch: int, k: torch.Tensor, v: torch.Tensor) -> int:
    """Batch elements LCA's forward folds into one query tile: with a shared k and v in 16 bits,
    the batch rounded up to a power of two, at most 8; else 1. (fp32 tiles are too small to
    split further.)"""
    if k.dim() != 3 or v.dim() != 3 or k.dtype == torch.float32:
        return 1
    return min(8, 1 << (batch - 1).bit_length())


def fold_tile(tile_h: int, tile_w: int, fold: int):
    """The tile of `fold` batch elements per program: it shrinks by as much (halving its
    height, then its width, then its height) so that the rows per product stay the same."""
    for step in range(fold.bit_length() - 1):
        if step % 2 == 0:
            tile_h //= 2
        else:
            tile_w //= 2
    return max(tile_h, 1), max(tile_w, 1)


# Programs the dK/dV launch of a shared k/v aims at: 4 per SM of an H100 (132 SMs), so that the
# batch splits fill the GPU even where one program per key tile and head would leave it idle.
_DKDV_PROGRAMS = 4 * 132
# Batch elements a program of MLKA's dK/dV sums a shared k/v over, at most (its loop over them is
# unrolled, each element a copy of the kernel's loops).
_MLKA_RUN = 2


def dkdv_splits(batch: int, grid, heads: int, head_dim: int, dtype: torch.dtype, complement: bool,
                shared: bool, arch: Optional[int] = None) -> int:
    """Runs of the batch the dK/dV launch splits a shared k/v's reduction into (1 if neither
    is shared: then every batch element has its own programs), from the default config's tiles
    whatever config the autotuner picks. Depends on shapes only, so the sum is the same from
    run to run."""
    if not shared or (not complement and lca_fused_backward(dtype, head_dim)):  # LCA's sums in its kernel
        return 1
    programs = _tiles(grid, block_config("dkdv", head_dim, dtype, complement, arch)) * heads
    splits = max(1, min(batch, triton.cdiv(_DKDV_PROGRAMS, programs)))
    if complement and mlka_fa2_backward(dtype, head_dim, arch):  # its runs are unrolled: at most _MLKA_RUN elements each
        splits = max(splits, triton.cdiv(batch, _MLKA_RUN))
    return splits


def kv_gradient_buffers(k: torch.Tensor, v: torch.Tensor, splits: int):
    """The dK and dV the dK/dV launch writes: a shared one reduced in several splits gets an
    fp32 partial sum per split, (splits, H, L, D); the others their own shape and dtype."""
    def buffer(t):
        if t.dim() == 3 and splits > 1:
            return torch.empty((splits, *t.shape), device=t.device, dtype=torch.float32)
        return torch.empty(t.shape, device=t.device, dtype=t.dtype)
    return buffer(k), buffer(v)


def backward_launches(q, k, v, do, dq, dk, dv, lse, delta, grid, radius, scale, complement: bool,
                      splits: int = 1, o=None) -> list:
    """The backward launches: dQ, then dK/dV in one launch or, where the config splits them,
    one launch each (`dk`, `dv` from ``kv_gradient_buffers(k, v, splits)``). MLKA (with
    `MLKA_FA2_BACKWARD`): its own dQ and dK/dV kernels; given the forward's output `o`, the dQ
    launch computes delta = rowsum(dO * O) into `delta` (a (B * H * L,) fp32 buffer) for the
    dK/dV launch, else `delta` must hold it already. The 2D-tile kernels always read `delta`."""
    b, h, _, d = q.shape
    arch = tuning.target_arch(q.device)
    if complement and mlka_fa2_backward(q.dtype, d, arch):
        return _mlka_backward_launches(q, k, v, do, dq, dk, dv, lse, delta, grid, radius, scale, splits, o, arch)
    if not complement and lca_fused_backward(q.dtype, d):
        return _lca_backward_launches(q, k, v, do, dq, dk, dv, lse, delta, grid, radius, scale, o)
    cfg = block_config("dq", d, q.dtype, complement, arch)
    common = (b, h, *grid, *radius, scale * LOG2E, scale)
    launches = [Launch("dq", lambda meta: (_tiles(grid, meta) * b, h), _named(
        _bwd_dq_kernel, q, k, v, do, dq, lse, delta, *_strides(q), *_strides(k), *_strides(v), *_strides(do),
        *_strides(dq), *common, COMPLEMENT=complement, HEAD_DIM=d, DOT=product_precision(cfg["DOT"], q.dtype)),
        cfg["maxnreg"])]
    k_shared, v_shared = k.dim() == 3, v.dim() == 3
    per_tile = splits if (k_shared or v_shared) else b  # a shared k/v: a program sums a run of the batch
    cfg = block_config("dkdv", d, q.dtype, complement, arch)
    for with_dk, with_dv in ((True, False), (False, True)) if cfg["split"] else ((True, True),):
        launches.append(Launch("dkdv", lambda meta: (_tiles(grid, meta) * per_tile, h), _named(
            _bwd_dkdv_kernel, q, k, v, do, dk, dv, lse, delta, *_strides(q), *_strides(k), *_strides(v),
            *_strides(do), *_strides(dk), *_strides(dv), *common, splits,
            K_SHARED=k_shared, V_SHARED=v_shared, WITH_DK=with_dk, WITH_DV=with_dv,
            COMPLEMENT=complement, HEAD_DIM=d, DOT=product_precision(cfg["DOT"], q.dtype)), cfg["maxnreg"]))
    return launches


def _mlka_backward_launches(q, k, v, do, dq, dk, dv, lse, delta, grid, radius, scale, splits, o, arch) -> list:
    """MLKA's FlashAttention-2 style backward: the dQ launch (which writes delta when given `o`),
    then the dK/dV launch, each over runs of BLOCK_M tokens."""
    b, h, _, d = q.shape
    common = (b, h, *grid, *radius, scale * LOG2E, scale)
    cfg = block_config("dq", d, q.dtype, True, arch)
    from_o = o is not None
    launches = [Launch("mlka_dq", lambda meta: (_tiles(grid, meta) * b, h), _named(
        _mlka_dq_kernel, q, k, v, o if from_o else do, do, dq, lse, delta, *_strides(q), *_strides(k),
        *_strides(v), *_strides(o if from_o else do), *_strides(do), *_strides(dq), *common,
        DELTA_FROM_O=from_o, HEAD_DIM=d, DOT=product_precision(cfg["DOT"], q.dtype)))]  # budget: per config
    k_shared, v_shared = k.dim() == 3, v.dim() == 3
    per_tile = splits if (k_shared or v_shared) else b
    run = triton.cdiv(b, splits) if (k_shared or v_shared) else 1
    cfg = block_config("dkdv", d, q.dtype, True, arch)
    launches.append(Launch("mlka_dkdv", lambda meta: (_tiles(grid, meta) * per_tile, h), _named(
        _mlka_dkdv_kernel, q, k, v, do, dk, dv, lse, delta, *_strides(q), *_strides(k), *_strides(v),
        *_strides(do), *_strides(dk), *_strides(dv), *common, splits, K_SHARED=k_shared, V_SHARED=v_shared,
        RUN=run, HEAD_DIM=d, DOT=product_precision(cfg["DOT"], q.dtype))))
    return launches


def _lca_backward_launches(q, k, v, do, dq, dk, dv, lse, delta, grid, radius, scale, o) -> list:
    """LCA's batch-folded backward: the dQ launch (FOLD batch elements per query tile, as the
    forward; it writes delta when given `o`), then the dK/dV launch (a key tile per program, query
    blocks of FOLD batch elements; a shared k/v's batch sum in its products: `dk`, `dv` in their own
    shape and dtype, no splits)."""
    b, h, _, d = q.shape
    fold = lca_fold(b, k, v)
    common = (b, h, *grid, *radius, scale * LOG2E, scale)
    from_o = o is not None
    for t in (o, do, dq):  # the dQ kernel indexes them as contiguous (B, H, L, D)
        assert t is None or t.is_contiguous(), "LCA's dQ kernel takes a contiguous O, dO and dQ"
    launches = [Launch("lca_dq", lambda meta: (_tiles(grid, meta), triton.cdiv(b, fold), h), _named(
        _lca_dq_kernel, q, k, v, o if from_o else do, do, dq, lse, delta, *_strides(q), *_strides(k),
        *_strides(v), *common,
        DELTA_FROM_O=from_o, FOLD=fold, HEAD_DIM=d, DOT=product_precision("native", q.dtype)))]
    k_shared, v_shared = k.dim() == 3, v.dim() == 3
    per_tile = 1 if (k_shared or v_shared) else b
    launches.append(Launch("lca_dkdv", lambda meta: (_tiles(grid, meta) * per_tile, h), _named(
        _lca_dkdv_kernel, q, k, v, do, dk, dv, lse, delta, *_strides(q), *_strides(k), *_strides(v),
        *_strides(do), *_strides(dk), *_strides(dv), *common, K_SHARED=k_shared, V_SHARED=v_shared,
        FOLD=fold, HEAD_DIM=d, DOT=product_precision("native", q.dtype))))
    return launches


class WindowAttentionFunction(torch.autograd.Function):
    COMPLEMENT = False  # set by each op

    @classmethod
    def forward(cls, ctx, q, k, v, grid, window, scale):
        _check(q, k, v)
        q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
        b, h, length, d = q.shape
        if (cls.COMPLEMENT and length >= MLKA_FA2_MAX_TOKENS
                and mlka_fa2_backward(q.dtype, d, tuning.target_arch(q.device))):
            raise ValueError(f"the triton backend's 16-bit MLKA backward supports grids of fewer than 2**21 "
                             f"tokens (its window coordinates are exact in fp32 below that), got {length}; "
                             f"use float32 or backend='torch'")
        radius = (window[0] // 2, window[1] // 2)
        o = torch.empty(b, h, length, d, device=q.device, dtype=q.dtype)
        lse = torch.empty(b * h * length, device=q.device, dtype=torch.float32)
        with _on_device(q):
            forward_launch(q, k, v, o, lse, grid, radius, scale, cls.COMPLEMENT)()
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.geometry = (grid, radius, scale)
        return o

    @classmethod
    def backward(cls, ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        grid, radius, scale = ctx.geometry
        do = do.contiguous()
        arch = tuning.target_arch(q.device)
        fused_delta = (mlka_fa2_backward(q.dtype, q.shape[-1], arch) if cls.COMPLEMENT
                       else lca_fused_backward(q.dtype, q.shape[-1]))  # the dQ kernel computes it
        if fused_delta:
            delta = torch.empty(lse.shape, device=q.device, dtype=torch.float32)
        else:
            delta = (o.float() * do.float()).sum(-1).reshape(-1)  # rowsum(O * dO), (B * H * L,)
        dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)  # dense, its own strides
        b, h, _, d = q.shape
        splits = dkdv_splits(b, grid, h, d, q.dtype, cls.COMPLEMENT, k.dim() == 3 or v.dim() == 3, arch)
        dk, dv = kv_gradient_buffers(k, v, splits)
        with _on_device(q):
            for launch in backward_launches(q, k, v, do, dq, dk, dv, lse, delta, grid, radius, scale,
                                            cls.COMPLEMENT, splits, o.contiguous() if fused_delta else None):
                launch()
        # the splits' partial sums of a shared gradient, added in a fixed order
        dk, dv = (g.sum(0).to(t.dtype) if t.dim() == 3 and splits > 1 else g for g, t in ((dk, k), (dv, v)))
        return dq, dk, dv, None, None, None
