"""Benchmark suite options and peak-memory measurement.

`pytest benchmarks/ --benchmark` runs the full-size suite; without the flag the same cases run at
a small size, so the test command exercises them quickly. Each case records its time
(pytest-benchmark) and peak memory in `extra_info`:

- CUDA: `torch.cuda.max_memory_allocated()` after a reset, minus what was allocated before.
- CPU: the process's peak resident memory during one call, minus the resident memory before it.
  The peak is reset through /proc/self/clear_refs, and during that one call glibc is told to
  return freed blocks of 64 KiB and more to the system at once (mallopt), so that the resident
  size follows live memory and the peaks of successive cases do not mask each other. For the
  timed rounds malloc caches freed blocks again, as usual. The call is made once before measuring, so
  one-time costs (code pages, cached plans) are not counted.
"""
from __future__ import annotations

import ctypes
import gc
import os
import platform

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--benchmark", action="store_true", default=False,
                     help="run the benchmark suite at full size (default: a small size, quickly)")


@pytest.fixture(scope="session")
def full(request) -> bool:
    return request.config.getoption("--benchmark")


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _mallopt(mmap_threshold: int, trim_threshold: int) -> bool:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and \
            bool(libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    except (OSError, AttributeError):
        return False


def _return_memory_at_once():
    """While measuring: blocks of 64 KiB and more are mmap-ed and freed memory is trimmed at once,
    so the resident size follows live memory; what malloc still caches is given back first (else
    the call reuses it and its peak is not seen)."""
    ok = _mallopt(1 << 16, 1 << 16)
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return ok


def _cache_memory_again():
    """While timing: large thresholds, as glibc's own dynamic ones grow to, so that freed blocks
    are reused as usual (mmap-ing every block would slow down code with many temporaries)."""
    _mallopt(32 << 20, 64 << 20)


def _status(field: str):
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def peak_bytes(fn, device, warm: bool = True) -> int | None:
    """Peak memory of one call of `fn` above what was in use before it (bytes), or None."""
    if warm:
        fn()  # plans, caches, code pages: one-time costs, not counted
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    _return_memory_at_once()
    try:
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # reset the peak resident size (VmHWM)
        except OSError:
            return None
        before = _status("VmRSS")
        fn()
        peak = _status("VmHWM")
    finally:
        _cache_memory_again()
    return None if before is None or peak is None else max(0, peak - before)


@pytest.fixture(scope="session")
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _machine(benchmark, device):
    benchmark.extra_info.update({
        "device": torch.cuda.get_device_name() if device.type == "cuda" else (platform.processor() or platform.machine()),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "memory_method": "cuda max_memory_allocated" if device.type == "cuda" else "VmHWM - VmRSS (procfs)",
    })
    yield


@pytest.fixture
def measure(benchmark, device):
    """measure(fn, rounds, warm=True, **info): benchmark `fn`, record its peak memory and `info`
    (what the case is: kind, op, provider, grid, ...) in extra_info. warm=False skips the warm-up
    call before the memory measurement (for cases that take minutes; their one-time costs, a few
    MiB, are then counted)."""

    def run(fn, rounds: int, warm: bool = True, **info):
        peak = peak_bytes(fn, device, warm)
        benchmark.extra_info.update(info)
        benchmark.extra_info["peak_bytes"] = peak

        def call():
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()

        benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=0)
        return peak

    return run
