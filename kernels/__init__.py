"""Fused Triton kernels of the two ops (installed as ``rlr_fast.kernels``)."""
from .local_cross_attention import local_cross_attention
from .neighbor_masked_attention import neighbor_masked_attention

__all__ = ["local_cross_attention", "neighbor_masked_attention"]
