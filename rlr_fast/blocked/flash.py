"""MLKA on the CPU: PyTorch's fused flash-attention kernel on key ranges, merged by log-sum-exp.

MLKA costs as much as dense attention (no key is skipped), so on the CPU it is built from the
fastest dense kernel there is, PyTorch's fused flash attention, which also returns the row
log-sum-exp. The (query row, key row) pairs of the grid split into the diagonal band that the
windows touch (an additive mask, built once per band shape) and the rest (no mask at all, which
spares the kernel a pass over the scores and the reading of a mask).

Forward: bands of query rows; for each, three ranges of whole key rows: the band of key rows the
band's windows touch (masked), the rows above and the rows below (unmasked). The three partial
softmaxes merge exactly through their log-sum-exps.
Backward: bands of *key* rows; for each, three ranges of query rows: those whose windows touch
the band (masked), those above and those below (unmasked). Given the merged output and
log-sum-exp, the flash backward of each (queries, keys) block is that block's exact share of the
gradient. Cutting the keys rather than the queries lets every call run over many queries (the
kernel parallelises over batch and heads, tiles the queries and accumulates dK and dV over them),
finishes each band's dK and dV in its own calls, and leaves a single accumulator, dQ.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch

from .autocast import autocast_declared
from .chunked import MLKAPlan, window_bias

flash_forward = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
flash_backward = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
# Queries per forward band: the kernel tiles queries by 256 from 768 queries up, and is markedly
# slower on fewer; more rows per band, on the other hand, widen the share of keys that needs a mask.
FLASH_BAND_QUERIES = 768
# Keys per backward band: the masked queries of a band are its rows and ry rows on either side, so
# thin bands mask fewer pairs but make more calls and more additions into dQ.
FLASH_BAND_KEYS = 1024


class _Range(NamedTuple):
    tokens: slice  # the other side's token range: keys of a query band, queries of a key band
    mask: Optional[torch.Tensor]  # additive (queries, keys) mask, None where no pair is masked
    empty: Optional[torch.Tensor]  # (queries,) rows whose every key here is masked, None if none


class _Band(NamedTuple):
    tokens: slice  # the band's own token range (queries in the forward, keys in the backward)
    ranges: Tuple[_Range, ...]


def _flash_bands(plan: MLKAPlan, dtype, of: str) -> Tuple[_Band, ...]:
    """Bands of grid rows of the queries (``of="queries"``) or of the keys (``of="keys"``), each
    with its ranges of the other side, built once per plan and dtype.

    Interior bands share one mask (the window is translation invariant), so masks are cached by
    the band's shape relative to its first row.
    """
    per_band = FLASH_BAND_QUERIES if of == "queries" else FLASH_BAND_KEYS
    rows = max(1, math.ceil(per_band / plan.W))
    if rows * 2 > plan.H:
        # Two or fewer bands leave too few pairs unmasked to pay for the extra calls: one band.
        rows = plan.H
    cached = plan.flash_cache.get((dtype, of, rows))
    if cached is not None:
        return cached
    w, masks, bands = plan.W, {}, []
    for chunk in plan.band_chunks(rows):
        o0, o1 = max(0, chunk.start - plan.ry), min(plan.H, chunk.stop + plan.ry)
        key = (chunk.stop - chunk.start, o0 - chunk.start, o1 - chunk.start)
        if key not in masks:
            others = slice(o0, o1)
            inside, mask = window_bias(plan, *((chunk, others) if of == "queries" else (others, chunk)), dtype)
            empty = inside.all(-1)
            masks[key] = (mask, empty if bool(empty.any()) else None)
        ranges = [_Range(slice(o0 * w, o1 * w), *masks[key])]  # the rows the windows touch: masked
        if o0 > 0:
            ranges.append(_Range(slice(0, o0 * w), None, None))  # rows above: no mask
        if o1 < plan.H:
            ranges.append(_Range(slice(o1 * w, plan.H * w), None, None))  # rows below: no mask
        bands.append(_Band(plan.tokens(chunk), tuple(ranges)))
    plan.flash_cache[(dtype, of, rows)] = tuple(bands)
    return plan.flash_cache[(dtype, of, rows)]


def _batched(t: torch.Tensor, b: int) -> torch.Tensor:
    """(B, h, L, D) with unit stride along D, as the kernel reads it; a shared (h, L, D) tensor
    becomes a view with batch stride 0, not a copy."""
    t = t if t.stride(-1) == 1 else t.contiguous()
    return t.expand(b, *t.shape) if t.dim() == 3 else t


def _token_major(t: torch.Tensor) -> torch.Tensor:
    """(B, h, L, D) as a view of (B, L, h, D) memory: the kernel's own layout for the gradients it
    returns and for the gradient of the output it reads (which it copies otherwise, every call)."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def _empty_token_major(shape, dtype, device) -> torch.Tensor:
    """An uninitialised (B, h, L, D) tensor in (B, L, h, D) memory, as the kernel's gradients."""
    b, h, length, d = shape
    return torch.empty(b, length, h, d, dtype=dtype, device=device).transpose(1, 2)


@autocast_declared
class FlashComplementAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan, scale):
        b, h, length, d = q.shape
        q, kb, vb = _batched(q, b), _batched(k, b), _batched(v, b)
        bands = _flash_bands(plan, q.dtype, "queries")
        lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        if len(bands) > 1:
            out = torch.empty_like(q, memory_format=torch.contiguous_format)
            lse = q.new_empty(b, h, length, dtype=lse_dtype)
        for rows, ranges in bands:
            qc = q[:, :, rows]
            acc, lse_c = None, None
            for keys, mask, empty in ranges:
                o_p, lse_p = flash_forward(qc, kb[:, :, keys], vb[:, :, keys], attn_mask=mask, scale=scale)
                lse_p = lse_p.to(lse_dtype)
                if empty is not None:
                    # The kernel reports a row with no key as lse 0; it contributes nothing.
                    lse_p = lse_p.masked_fill(empty, float("-inf"))
                if acc is None:
                    acc, lse_c = o_p.to(lse_dtype), lse_p
                    continue
                new_lse = torch.logaddexp(lse_c, lse_p)
                acc.mul_(torch.exp(lse_c - new_lse).unsqueeze(-1))
                acc.add_(o_p.to(lse_dtype).mul_(torch.exp(lse_p - new_lse).unsqueeze(-1)))
                lse_c = new_lse
            if len(bands) == 1:  # the band is the whole grid: no copy
                out, lse = acc.to(q.dtype), lse_c
            else:
                out[:, :, rows] = acc
                lse[:, :, rows] = lse_c
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.scale = plan, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        plan, scale = ctx.plan, ctx.scale
        b, acc = q.shape[0], lse.dtype
        q, kb, vb = _batched(q, b), _batched(k, b), _batched(v, b)
        grad_out = _token_major(grad_out)
        bands = _flash_bands(plan, q.dtype, "keys")
        if len(bands) == 1 and len(bands[0].ranges) == 1:  # one call: its gradients are the result
            mask = bands[0].ranges[0].mask
            dq, dk, dv = flash_backward(grad_out, q, kb, vb, out, lse, 0.0, False, attn_mask=mask, scale=scale)
            dk, dv = (dk.sum(0) if k.dim() == 3 else dk), (dv.sum(0) if v.dim() == 3 else dv)
            return dq, dk.to(k.dtype), dv.to(v.dtype), None, None
        dq = _empty_token_major(q.shape, acc, q.device)
        dk = torch.empty(k.shape, dtype=acc, device=k.device) if k.dim() == 3 else \
            _empty_token_major(k.shape, acc, k.device)
        dv = torch.empty(v.shape, dtype=acc, device=v.device) if v.dim() == 3 else \
            _empty_token_major(v.shape, acc, v.device)
        for n, (keys, ranges) in enumerate(bands):
            # The ranges of every band cover each query once: the first band writes dQ, the
            # others add to it. The band's dK and dV are complete after its own ranges.
            dk_band = dv_band = None
            for queries, mask, _ in ranges:
                dq_p, dk_p, dv_p = flash_backward(
                    grad_out[:, :, queries], q[:, :, queries], kb[:, :, keys], vb[:, :, keys],
                    out[:, :, queries], lse[:, :, queries], 0.0, False, attn_mask=mask, scale=scale)
                if n == 0:
                    dq[:, :, queries] = dq_p
                else:
                    dq[:, :, queries] += dq_p
                # (B, h, band, D), fresh from the kernel: accumulated in place (in float32).
                dk_band = dk_p.to(acc) if dk_band is None else dk_band.add_(dk_p)
                dv_band = dv_p.to(acc) if dv_band is None else dv_band.add_(dv_p)
            # A shared k or v gets one gradient per batch element: its gradient is their sum.
            dk[..., keys, :] = dk_band.sum(0) if k.dim() == 3 else dk_band
            dv[..., keys, :] = dv_band.sum(0) if v.dim() == 3 else dv_band
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


