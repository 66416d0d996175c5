"""Neighbour-masked attention (MLKA) on the GPU: each query attends to the keys outside its window.

The fused forward and backward kernels are in ``window_attention.py`` (shared with LCA): every
key block is visited, and those that do not overlap the key patch of a query tile (the union of
its windows) run without a mask.
"""
from .window_attention import WindowAttentionFunction


class NeighborMaskedAttentionFunction(WindowAttentionFunction):
    COMPLEMENT = True


def neighbor_masked_attention(q, k, v, grid, window, scale):
    """MLKA on checked inputs (see ``rlr_fast.ops``): (B, H, L, D) in q's dtype."""
    return NeighborMaskedAttentionFunction.apply(q, k, v, tuple(grid), tuple(window), float(scale))
