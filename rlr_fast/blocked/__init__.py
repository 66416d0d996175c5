"""The ``torch`` backend: memory-efficient attention for any device, and the fast CPU paths.

One implementation per module:

- :mod:`.chunked`: both ops as a loop over chunks of query blocks whose scores live only for
  their chunk (LCA: 2D query tiles and the key patch covering their windows; MLKA: bands of query
  rows against every key), on any device, any dtype, with a recomputing backward;
- :mod:`.flash`: MLKA on the CPU from PyTorch's fused flash-attention kernel on key ranges,
  merged by log-sum-exp;
- :mod:`.low_precision`: MLKA in bfloat16 on CPUs with native bfloat16, as dense 16-bit
  products one band of query rows at a time;
- :mod:`.autocast`: how their autograd Functions carry the autocast state to the backward.

Which one runs is decided in one place, :func:`mlka_implementation` (LCA always runs chunked).
"""
from __future__ import annotations

from . import chunked, flash, low_precision
from .chunked import BlockedAttention, compute_dtype, lca_plan, lca_tile, mlka_plan

__all__ = ["local_cross_attention", "neighbor_masked_attention", "backward", "lca_tile", "mlka_implementation"]


def mlka_implementation(q):
    """The MLKA implementation for these queries, with the dtype it computes in:

    - bfloat16 (q's own, or autocast's for float32 q) on a CPU with native bfloat16:
      ``low_precision.DenseLowPrecisionAttention`` in bfloat16;
    - otherwise on a CPU whose PyTorch has the fused flash kernel:
      ``flash.FlashComplementAttention`` in q's dtype;
    - otherwise (GPUs without Triton, other devices): ``chunked.BlockedAttention`` in q's dtype.
    """
    low = low_precision.low_precision_dtype(q)
    if low is not None:
        return low_precision.DenseLowPrecisionAttention, low
    if q.device.type == "cpu" and flash.flash_forward is not None and flash.flash_backward is not None:
        return flash.FlashComplementAttention, q.dtype
    return chunked.BlockedAttention, q.dtype


def _lca_tile(q, k, grid, window):
    return lca_tile(tuple(grid), tuple(window), batch=q.shape[0], shared=k.dim() == 3)


def local_cross_attention(q, k, v, grid, window, scale):
    """LCA on checked inputs (see ``rlr_fast.ops``)."""
    plan = lca_plan(tuple(grid), tuple(window), q.device, compute_dtype(q.dtype), _lca_tile(q, k, grid, window))
    return BlockedAttention.apply(q, k, v, plan, scale)


def neighbor_masked_attention(q, k, v, grid, window, scale):
    """MLKA on checked inputs (see ``rlr_fast.ops``); every query has a key (check_inputs refuses
    a window that covers the grid)."""
    plan = mlka_plan(tuple(grid), tuple(window), q.device)
    function, dtype = mlka_implementation(q)
    if dtype != q.dtype:
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    return function.apply(q, k, v, plan, scale)


def backward(op: str, grad_out, out, q, k, v, grid, window, scale):
    """(dq, dk, dv) of either op from its output, on any device: the chunked backward, which
    needs nothing from the forward but ``out`` (the custom op's autograd formula, see
    ``rlr_fast.custom_ops``). A shared k or v gets a shared gradient."""
    compute = compute_dtype(q.dtype)
    if op == "local_cross_attention":
        plan = lca_plan(tuple(grid), tuple(window), q.device, compute, _lca_tile(q, k, grid, window))
    else:
        plan = mlka_plan(tuple(grid), tuple(window), q.device)
    return chunked.chunked_backward(plan, q, k, v, out, grad_out, scale, compute)
