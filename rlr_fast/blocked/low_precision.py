"""MLKA on CPUs with native bfloat16: dense 16-bit products, one band of query rows at a time.

PyTorch's CPU flash kernel runs bfloat16 no faster than float32 (measured: BENCHMARKS.md), while
oneDNN's bfloat16 matrix products run at several times the float32 rate on CPUs with AVX-512 BF16
or AMX. So in bfloat16 MLKA is computed as plain attention on bands of query rows of one batch
element: S = scale Q K^T + mask (one baddbmm, the mask an additive bias over the band's rows), P =
softmax(S), O = P V, each product in bfloat16 with float32 accumulation inside oneDNN, as autocast
computes attention. The scores of a band stay in the cache. Backward recomputes P band by band;
dS = P (dP - rowsum(O dO)) is formed in bfloat16 (dP arrives rounded to bfloat16 from its product,
so a float32 difference would add only passes over the band, not accuracy); dK and dV accumulate
in float32.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..precision import bf16_supported
from .autocast import autocast_declared
from .chunked import MLKAPlan, window_bias

# Scores per head in a band (queries x L): 256 queries (8 rows) of a 32x32 grid, 64 (one row) of a
# 64x64 grid, measured best on this project's CPU; more leave the cache, fewer make smaller products.
LOW_PRECISION_BAND_SCORES = 1 << 18
LOW_PRECISION_DTYPES = (torch.bfloat16,)


def low_precision_dtype(q: torch.Tensor) -> Optional[torch.dtype]:
    """The 16-bit dtype MLKA computes in on this CPU (q's own, or autocast's for float32 inputs),
    when the CPU has native bfloat16; None otherwise."""
    if q.device.type != "cpu":
        return None
    dtype = q.dtype
    if dtype == torch.float32 and torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
    return dtype if dtype in LOW_PRECISION_DTYPES and bf16_supported(q.device) else None


def _dense_bands(plan: MLKAPlan, dtype) -> Tuple[Tuple[slice, torch.Tensor], ...]:
    """(query tokens, additive mask (band queries, L)) per band of query rows, built once per dtype."""
    key = (dtype, "dense")
    if key not in plan.flash_cache:
        rows = max(1, LOW_PRECISION_BAND_SCORES // (plan.W * plan.H * plan.W))
        bands = []
        for chunk in plan.band_chunks(rows):
            bands.append((plan.tokens(chunk), window_bias(plan, chunk, slice(0, plan.H), dtype)[1]))
        plan.flash_cache[key] = tuple(bands)
    return plan.flash_cache[key]


def _band_probabilities(q_band, k_t, mask, scale):
    """softmax(scale q k^T + mask): q_band (h, M, D), k_t (h, D, L), mask (M, L) -> (h, M, L)."""
    scores = torch.baddbmm(mask.expand(q_band.shape[0], *mask.shape), q_band, k_t, alpha=scale)
    return torch.softmax(scores, dim=-1)


def _element(t: torch.Tensor, b: int) -> torch.Tensor:
    """Batch element b of a (B, h, L, D) tensor; a shared (h, L, D) tensor is its own element."""
    return t if t.dim() == 3 else t[b]


@autocast_declared
class DenseLowPrecisionAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan, scale):
        bands = _dense_bands(plan, q.dtype)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        for b in range(q.shape[0]):
            k_t, v_b = _element(k, b).transpose(-1, -2), _element(v, b)
            for rows, mask in bands:
                p = _band_probabilities(q[b, :, rows], k_t, mask, scale)
                out[b, :, rows] = torch.bmm(p, v_b)
        ctx.save_for_backward(q, k, v, out)
        ctx.plan, ctx.scale = plan, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out = ctx.saved_tensors
        plan, scale = ctx.plan, ctx.scale
        bands = _dense_bands(plan, q.dtype)
        grad_out = grad_out.to(q.dtype)
        # rowsum(O dO), (B, h, L, 1), summed in float32 and rounded once, as dP is
        delta = (out.float() * grad_out.float()).sum(-1, keepdim=True).to(q.dtype)
        dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        for b in range(q.shape[0]):
            k_b, v_b = _element(k, b), _element(v, b)
            dk_b, dv_b = _element(dk, b), _element(dv, b)
            for rows, mask in bands:
                q_band, do_band = q[b, :, rows], grad_out[b, :, rows]
                p = _band_probabilities(q_band, k_b.transpose(-1, -2), mask, scale)  # (h, M, L)
                dv_b += torch.bmm(p.transpose(-1, -2), do_band)  # dV = P^T dO
                ds = torch.bmm(do_band, v_b.transpose(-1, -2))  # dP = dO V^T
                ds = ds.sub_(delta[b, :, rows]).mul_(p)  # dS = P (dP - delta)
                dk_b += torch.bmm(ds.transpose(-1, -2), q_band).mul_(scale)  # dK = scale dS^T Q
                dq[b, :, rows] = torch.bmm(ds, k_b).mul_(scale)  # dQ = scale dS K
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None

