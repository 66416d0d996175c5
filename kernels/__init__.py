"""Fused Triton kernels of the package's ops (installed as ``rlr_fast.kernels``)."""
from .local_cross_attention import local_cross_attention
from .nearest_reference import nearest_reference
from .neighbor_masked_attention import neighbor_masked_attention

__all__ = ["local_cross_attention", "nearest_reference", "neighbor_masked_attention"]
