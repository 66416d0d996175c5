"""Fused Triton kernels of the two ops (installed as ``rlr_fast.kernels``)."""
