"""Neighbour-masked attention (MLKA) on the GPU: each query attends to the keys outside its window.

The fused forward and backward kernels are in ``window_attention.py`` (shared with LCA): key
blocks outside the band of rows a query block's windows touch run without a mask.
"""
from .window_attention import WindowAttentionFunction


class NeighborMaskedAttentionFunction(WindowAttentionFunction):
    COMPLEMENT = True


def neighbor_masked_attention(q, k, v, grid, window, scale):
    """MLKA on checked inputs (see ``rlr_fast.ops``): (B, H, L, D) in q's dtype."""
    return NeighborMaskedAttentionFunction.apply(q, k, v, tuple(grid), tuple(window), float(scale))
