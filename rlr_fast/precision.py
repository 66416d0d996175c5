"""Inference precision: ``"fp32"`` or ``"bf16"`` (autocast to bfloat16 where the device has it).

bf16 runs the backbone, the projections, the FFN and the attention ops' products in bfloat16
(oneDNN's bf16 kernels on CPUs with AVX-512 BF16 or AMX, tensor cores on GPUs); the ops keep
their softmax statistics and accumulation in float32, and the models compute their score maps
in float32. A device without native bf16 would emulate it, slower than fp32: there a request for
bf16 runs fp32 and says so once.
"""
from __future__ import annotations

import contextlib
import functools
import warnings

import torch

PRECISIONS = ("fp32", "bf16")
_warned = set()


def bf16_supported(device) -> bool:
    """Whether ``device`` computes bfloat16 natively (the check PyTorch's own CPU paths use)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return _cpu_bf16_supported()
    return False


@functools.lru_cache(maxsize=None)
def _cpu_bf16_supported() -> bool:  # asked on every MLKA call in 16 bits: asked of the CPU once
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return precision


def effective_precision(precision: str, device) -> str:
    """``precision`` if ``device`` runs it natively, else ``"fp32"`` (with a one-time warning)."""
    check_precision(precision)
    if precision == "bf16" and not bf16_supported(device):
        key = torch.device(device).type
        if key not in _warned:
            _warned.add(key)
            warnings.warn(f"precision 'bf16' requested but this {key} has no native bfloat16 support "
                          f"(AVX-512 BF16 or AMX on a CPU): running fp32", stacklevel=3)
        return "fp32"
    return precision


def autocast(precision: str, device):
    """The context that runs a model's forward at ``precision`` on ``device``."""
    device = torch.device(device)
    if effective_precision(precision, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def full_precision(device):
    """The context for what must stay float32 inside a bf16 forward (score maps)."""
    return torch.autocast(torch.device(device).type, enabled=False)
