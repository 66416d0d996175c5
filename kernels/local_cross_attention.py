"""Local cross attention (LCA) on the GPU: each query attends to the keys inside its window.

The fused forward and backward kernels are in ``window_attention.py`` (shared with MLKA, which
differs only in the mask predicate); this file binds them to the op.
"""
from .window_attention import WindowAttentionFunction


class LocalCrossAttentionFunction(WindowAttentionFunction):
    COMPLEMENT = False


def local_cross_attention(q, k, v, grid, window, scale):
    """LCA on checked inputs (see ``rlr_fast.ops``): (B, H, L, D) in q's dtype."""
    return LocalCrossAttentionFunction.apply(q, k, v, tuple(grid), tuple(window), float(scale))
