"""Wall-clock reads that include the device's queued work, and the name of the CPU they ran on.

CUDA launches return before the GPU has run them, so a clock read right after a call times the
launch, not the work: :func:`clock` waits for the device first (a no-op on the CPU).
:func:`cpu_name` is what every speed record of this project says about the CPU.
"""
from __future__ import annotations

import platform
import time
from pathlib import Path

import torch


def clock(device="cpu") -> float:
    """``time.perf_counter()`` once every kernel queued on ``device`` has finished."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def cpu_name() -> str:
    """The CPU's model name ("AMD EPYC ...") from /proc/cpuinfo where there is one (Linux, whose
    ``platform.processor()`` is empty), else what ``platform`` knows, else the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
