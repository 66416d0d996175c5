"""Fused Triton kernels of windowed attention on a token grid, shared by both ops.

The two ops differ only in which keys a query may see: LCA the keys inside its window
(``COMPLEMENT=False``), MLKA the keys outside it (``COMPLEMENT=True``). Everything else, the
online softmax, the shared (batch stride 0) keys and values, and the backward, is the same, so
one set of kernels serves both and each op's file holds its launch code and autograd Function.

Layout: q, o (B, H, L, D); k, v (B, H, L, D) or shared (H, L, D), passed with batch stride 0.
Tokens are row-major on a grid of W columns: token i sits at (i // W, i % W). Query blocks are
BLOCK_M consecutive tokens: their windows span a band of whole key rows, so for LCA only the
key rows ``[row(first query) - RY, row(last query) + RY]`` are visited; MLKA visits every key
block and applies the window mask only to the blocks inside that band (the others run
unmasked). Masks are computed from token indices, never loaded.
"""
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
# fp32 products: three TF32 tensor-core products with error compensation, about as exact as
# ieee fp32 and much lighter on registers than FMA tiles.
FP32_PRECISION: tl.constexpr = tl.constexpr("tf32x3")


@triton.jit
def _mm(a, b, FP32_DOT: tl.constexpr):
    """a @ b with fp32 accumulation: at fp32 accuracy (tf32x3) when FP32_DOT, else on b's dtype
    (fp16/bf16 tensor cores)."""
    if FP32_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=FP32_PRECISION)
    return tl.dot(a.to(b.dtype), b)


@triton.jit
def _allowed(offs_m, offs_n, L, W, RY, RX, COMPLEMENT: tl.constexpr):
    """(BLOCK_M, BLOCK_N) mask: key n is visible to query m (and both are real tokens)."""
    qy, qx = offs_m // W, offs_m % W
    ky, kx = offs_n // W, offs_n % W
    dy = qy[:, None] - ky[None, :]
    dx = qx[:, None] - kx[None, :]
    inside = (dy <= RY) & (dy >= -RY) & (dx <= RX) & (dx >= -RX)
    if COMPLEMENT:
        visible = inside == 0
    else:
        visible = inside
    return visible & (offs_m[:, None] < L) & (offs_n[None, :] < L)


@triton.jit
def _key_range(q_lo, q_hi, L, W, RY, BLOCK_N: tl.constexpr, COMPLEMENT: tl.constexpr):
    """Key blocks to visit for queries [q_lo, q_hi), and the band [band_lo, band_hi) that needs a mask."""
    row_lo = tl.maximum(q_lo // W - RY, 0)
    row_hi = tl.minimum((q_hi - 1) // W + RY + 1, (L + W - 1) // W)
    band_lo = (row_lo * W) // BLOCK_N * BLOCK_N
    band_hi = tl.minimum(row_hi * W, L)
    if COMPLEMENT:
        lo, hi = 0, L
    else:
        lo, hi = band_lo, band_hi
    return lo, hi, band_lo, band_hi


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE,
                stride_qb, stride_qh, stride_ql,
                stride_kb, stride_kh, stride_kl,
                stride_vb, stride_vh, stride_vl,
                stride_ob, stride_oh, stride_ol,
                H, L, W, RY, RX, qk_scale,
                COMPLEMENT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                HEAD_DIM: tl.constexpr, FP32_DOT: tl.constexpr):
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_ql + offs_d[None, :],
                mask=offs_m[:, None] < L, other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    # online softmax state, base 2 with the scale folded in: m (running max), l (running sum)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    q_lo = pid_m * BLOCK_M
    lo, hi, band_lo, band_hi = _key_range(q_lo, tl.minimum(q_lo + BLOCK_M, L), L, W, RY, BLOCK_N, COMPLEMENT)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = tl.load(k_base + offs_n[:, None] * stride_kl + offs_d[None, :], mask=offs_n[:, None] < L, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vl + offs_d[None, :], mask=offs_n[:, None] < L, other=0.0)
        qk = _mm(q, tl.trans(k), FP32_DOT) * qk_scale
        if (start_n + BLOCK_N > band_lo) & (start_n < band_hi):  # the band: the window decides
            visible = _allowed(offs_m, offs_n, L, W, RY, RX, COMPLEMENT)
        else:  # outside the band only the grid's end matters
            visible = (offs_n[None, :] < L) & (offs_m[:, None] >= 0)
        qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _mm(p, v, FP32_DOT)
        m_i = m_new
    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # rows past the end of the grid: never stored
    acc = acc / l_i[:, None]
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ol + offs_d[None, :],
             acc.to(O.dtype.element_ty), mask=offs_m[:, None] < L)
    # log-sum-exp in base 2 (of the scaled scores), for the backward
    tl.store(LSE + pid_bh * L + offs_m, m_i + tl.math.log2(l_i), mask=offs_m < L)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA,
                   stride_qb, stride_qh, stride_ql,
                   stride_kb, stride_kh, stride_kl,
                   stride_vb, stride_vh, stride_vl,
                   stride_ob, stride_oh, stride_ol,
                   H, L, W, RY, RX, qk_scale, sm_scale,
                   COMPLEMENT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   HEAD_DIM: tl.constexpr, FP32_DOT: tl.constexpr):
    """dQ = scale * dS K for one query block, dS = P * (dO V^T - delta), P recomputed."""
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_mask = offs_m[:, None] < L
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_ql + offs_d[None, :], mask=row_mask,
                other=0.0)
    do = tl.load(DO + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ol + offs_d[None, :], mask=row_mask,
                 other=0.0)
    lse = tl.load(LSE + pid_bh * L + offs_m, mask=offs_m < L, other=0.0)
    delta = tl.load(DELTA + pid_bh * L + offs_m, mask=offs_m < L, other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    q_lo = pid_m * BLOCK_M
    lo, hi, band_lo, band_hi = _key_range(q_lo, tl.minimum(q_lo + BLOCK_M, L), L, W, RY, BLOCK_N, COMPLEMENT)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = tl.load(k_base + offs_n[:, None] * stride_kl + offs_d[None, :], mask=offs_n[:, None] < L, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vl + offs_d[None, :], mask=offs_n[:, None] < L, other=0.0)
        qk = _mm(q, tl.trans(k), FP32_DOT) * qk_scale
        dp = _mm(do, tl.trans(v), FP32_DOT)
        if (start_n + BLOCK_N > band_lo) & (start_n < band_hi):
            visible = _allowed(offs_m, offs_n, L, W, RY, RX, COMPLEMENT)
        else:
            visible = (offs_n[None, :] < L) & (offs_m[:, None] >= 0)
        p = tl.where(visible, tl.math.exp2(qk - lse[:, None]), 0.0)
        ds = p * (dp - delta[:, None])
        dq += _mm(ds, k, FP32_DOT)
    tl.store(DQ + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_ql + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_mask)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA,
                     stride_qb, stride_qh, stride_ql,
                     stride_kb, stride_kh, stride_kl,
                     stride_vb, stride_vh, stride_vl,
                     stride_ob, stride_oh, stride_ol,
                     stride_dkb, stride_dkh, stride_dkl,
                     stride_dvb, stride_dvh, stride_dvl,
                     B, H, L, W, RY, RX, qk_scale, sm_scale,
                     K_SHARED: tl.constexpr, V_SHARED: tl.constexpr,
                     COMPLEMENT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     HEAD_DIM: tl.constexpr, FP32_DOT: tl.constexpr):
    """dK = scale * dS^T Q and dV = P^T dO for one key block and head.

    A shared k or v is reduced over the batch inside the program (it loops over the batch and
    keeps the sum in registers): no atomics, no B-times scratch. Batched ones are written per
    batch element. The queries visited are those whose windows can touch the key block."""
    pid_n, pid_hb = tl.program_id(0), tl.program_id(1)
    h = pid_hb % H
    if K_SHARED or V_SHARED:
        b_lo, b_hi = 0, B
    else:
        b_lo = pid_hb // H
        b_hi = b_lo + 1
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col_mask = offs_n[:, None] < L
    # queries that may see this key block: same band logic with the roles exchanged
    lo, hi, band_lo, band_hi = _key_range(pid_n * BLOCK_N, tl.minimum(pid_n * BLOCK_N + BLOCK_N, L), L, W, RY,
                                          BLOCK_M, COMPLEMENT)
    # One accumulator each: a shared k or v keeps summing over the batch, a batched one restarts
    # per batch element and is written out at its end.
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    for b in range(b_lo, b_hi):
        k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kl + offs_d[None, :],
                    mask=col_mask, other=0.0)
        v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vl + offs_d[None, :],
                    mask=col_mask, other=0.0)
        if not K_SHARED:
            dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        if not V_SHARED:
            dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        row = (b * H + h) * L
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_ql + offs_d[None, :],
                        mask=offs_m[:, None] < L, other=0.0)
            do = tl.load(DO + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ol + offs_d[None, :],
                         mask=offs_m[:, None] < L, other=0.0)
            lse = tl.load(LSE + row + offs_m, mask=offs_m < L, other=0.0)
            delta = tl.load(DELTA + row + offs_m, mask=offs_m < L, other=0.0)
            qk_t = _mm(k, tl.trans(q), FP32_DOT) * qk_scale  # (BLOCK_N, BLOCK_M)
            dp_t = _mm(v, tl.trans(do), FP32_DOT)
            if (start_m + BLOCK_M > band_lo) & (start_m < band_hi):
                visible = tl.trans(_allowed(offs_m, offs_n, L, W, RY, RX, COMPLEMENT))
            else:
                visible = (offs_n[:, None] < L) & (offs_m[None, :] < L)
            p_t = tl.where(visible, tl.math.exp2(qk_t - lse[None, :]), 0.0)
            ds_t = p_t * (dp_t - delta[None, :])
            dv += _mm(p_t, do, FP32_DOT)
            dk += _mm(ds_t, q, FP32_DOT)
        if not K_SHARED:
            tl.store(DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkl + offs_d[None, :],
                     (dk * sm_scale).to(DK.dtype.element_ty), mask=col_mask)
        if not V_SHARED:
            tl.store(DV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvl + offs_d[None, :],
                     dv.to(DV.dtype.element_ty), mask=col_mask)
    if K_SHARED:
        tl.store(DK + h * stride_dkh + offs_n[:, None] * stride_dkl + offs_d[None, :],
                 (dk * sm_scale).to(DK.dtype.element_ty), mask=col_mask)
    if V_SHARED:
        tl.store(DV + h * stride_dvh + offs_n[:, None] * stride_dvl + offs_d[None, :],
                 dv.to(DV.dtype.element_ty), mask=col_mask)


# ------------------------------------------------------------------------------------------------
# Launch code and the autograd Function (each op's file binds COMPLEMENT)
# ------------------------------------------------------------------------------------------------

import os  # noqa: E402

import torch  # noqa: E402

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def block_config(kind: str, head_dim: int, dtype: torch.dtype) -> dict:
    """Block sizes and warps of a kernel ("fwd", "dq" or "dkdv") for a head dim and dtype, chosen
    by compiling for sm_80/sm_90 so that no kernel spills registers at head dims 16 to 64 (checked
    by `rlr-fast kernels`; at 128, the fp32 backward still spills a little). fp32 tiles
    are small (each product is three tf32 products); the backward keeps more tiles live than the
    forward (dK/dV the most), hence smaller blocks."""
    if dtype == torch.float32:
        if kind == "fwd":
            return dict(BLOCK_M=16, BLOCK_N=16 if head_dim >= 128 else 32, num_warps=4)
        if kind == "dq":
            return dict(BLOCK_M=16, BLOCK_N=32 if head_dim == 64 else 16, num_warps=4)
        return dict(BLOCK_M=32, BLOCK_N=16, num_warps=8) if head_dim == 32 else dict(BLOCK_M=16, BLOCK_N=16,
                                                                                   num_warps=4)
    if kind == "fwd":
        return dict(BLOCK_M=16, BLOCK_N=32, num_warps=4) if head_dim >= 128 else dict(BLOCK_M=64, BLOCK_N=64,
                                                                                    num_warps=4)
    if kind == "dq":
        return dict(BLOCK_M=16, BLOCK_N=32, num_warps=4) if head_dim >= 128 else dict(BLOCK_M=32, BLOCK_N=32,
                                                                                    num_warps=4)
    return dict(BLOCK_M=16, BLOCK_N=32 if head_dim == 64 else 16, num_warps=4)


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


def _fp32_dot(dtype) -> bool:
    """fp32 inputs multiply in full fp32 (not tf32). Triton's CPU interpreter computes bf16
    products wrongly, so there (testing only) bf16 blocks are multiplied in fp32 as well."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1")


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class WindowAttentionFunction(torch.autograd.Function):
    COMPLEMENT = False  # set by each op

    @classmethod
    def forward(cls, ctx, q, k, v, grid, window, scale):
        _check(q, k, v)
        q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
        b, h, length, d = q.shape
        (_, w), (kh, kw) = grid, window
        cfg = block_config("fwd", d, q.dtype)
        o = torch.empty(b, h, length, d, device=q.device, dtype=q.dtype)
        lse = torch.empty(b * h * length, device=q.device, dtype=torch.float32)
        launch = (triton.cdiv(length, cfg["BLOCK_M"]), b * h)
        _fwd_kernel[launch](q, k, v, o, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
                            h, length, w, kh // 2, kw // 2, scale * LOG2E,
                            COMPLEMENT=cls.COMPLEMENT, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                            HEAD_DIM=d, FP32_DOT=_fp32_dot(q.dtype), num_warps=cfg["num_warps"])
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.geometry = (w, kh // 2, kw // 2, scale)
        return o

    @classmethod
    def backward(cls, ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        w, ry, rx, scale = ctx.geometry
        b, h, length, d = q.shape
        do = do.contiguous()
        delta = (o.float() * do.float()).sum(-1).reshape(-1)  # rowsum(O * dO), (B * H * L,)
        dq = torch.empty_like(q)
        dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
        dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
        fp32_dot = _fp32_dot(q.dtype)
        cfg = block_config("dq", d, q.dtype)
        _bwd_dq_kernel[(triton.cdiv(length, cfg["BLOCK_M"]), b * h)](
            q, k, v, do, dq, lse, delta, *_strides(q), *_strides(k), *_strides(v), *_strides(do),
            h, length, w, ry, rx, scale * LOG2E, scale, COMPLEMENT=cls.COMPLEMENT, BLOCK_M=cfg["BLOCK_M"],
            BLOCK_N=cfg["BLOCK_N"], HEAD_DIM=d, FP32_DOT=fp32_dot, num_warps=cfg["num_warps"])
        k_shared, v_shared = k.dim() == 3, v.dim() == 3
        per_batch = 1 if (k_shared or v_shared) else b
        cfg = block_config("dkdv", d, q.dtype)
        _bwd_dkdv_kernel[(triton.cdiv(length, cfg["BLOCK_N"]), h * per_batch)](
            q, k, v, do, dk, dv, lse, delta, *_strides(q), *_strides(k), *_strides(v), *_strides(do),
            *_strides(dk), *_strides(dv), b, h, length, w, ry, rx, scale * LOG2E, scale,
            K_SHARED=k_shared, V_SHARED=v_shared, COMPLEMENT=cls.COMPLEMENT, BLOCK_M=cfg["BLOCK_M"],
            BLOCK_N=cfg["BLOCK_N"], HEAD_DIM=d, FP32_DOT=fp32_dot, num_warps=cfg["num_warps"])
        return dq, dk, dv, None, None, None
