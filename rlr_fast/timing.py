"""Wall-clock reads that include the device's queued work.

CUDA launches return before the GPU has run them, so a clock read right after a call times the
launch, not the work: :func:`clock` waits for the device first (a no-op on the CPU).
"""
from __future__ import annotations

import time

import torch


def clock(device="cpu") -> float:
    """``time.perf_counter()`` once every kernel queued on ``device`` has finished."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
