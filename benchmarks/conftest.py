"""Benchmark suite options and peak-memory measurement.

`pytest benchmarks/ --benchmark` runs the full-size suite; without the flag the same cases run at
a small size, so the test command exercises them quickly. Each case records its time
(pytest-benchmark) and peak memory in `extra_info`:

- CUDA: `torch.cuda.max_memory_allocated()` after a reset, minus what was allocated before.
- CPU: the same quantity for CPU tensors, exactly: one call runs under the PyTorch profiler with
  `profile_memory=True`, which records every allocation and free of tensor memory with its size
  and time; the peak is the maximum of their running sum, in time order. Unlike the process's
  resident size, this does not depend on what malloc caches or on what ran before. What is not
  tensor memory (malloc'd scratch inside BLAS or oneDNN, Python objects) is not counted, as on
  CUDA; neither is freeing a tensor that existed before the call.

The call is made once before measuring, so one-time costs (cached plans and masks) are not counted.
"""
from __future__ import annotations

import gc

import pytest
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from rlr_fast.timing import cpu_name


def pytest_addoption(parser):
    parser.addoption("--benchmark", action="store_true", default=False,
                     help="run the benchmark suite at full size (default: a small size, quickly)")


@pytest.fixture(scope="session")
def full(request) -> bool:
    return request.config.getoption("--benchmark")


_CALL = "peak_bytes: measured call"


def _cpu_peak_bytes(fn) -> int:
    """Peak live CPU tensor memory of one call of `fn` above what was live before it (bytes)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with record_function(_CALL):
            fn()
    events = prof.profiler.kineto_results.events()
    call = next(e for e in events if e.name() == _CALL)
    # "[memory]" events: + size at each allocation, - size at each free, with their time stamps.
    changes = sorted(
        (e.start_ns(), i, e.nbytes()) for i, e in enumerate(events)
        if e.name() == "[memory]" and e.device_type() == DeviceType.CPU
        and call.start_ns() <= e.start_ns() <= call.end_ns())
    live = peak = 0
    for _, _, nbytes in changes:
        live += nbytes
        peak = max(peak, live)
    return peak


def peak_bytes(fn, device, warm: bool = True) -> int | None:
    """Peak memory of one call of `fn` above what was in use before it (bytes), or None."""
    if warm:
        fn()  # plans, caches: one-time costs, not counted
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    return _cpu_peak_bytes(fn) if device.type == "cpu" else None


MEMORY_METHOD = {"cuda": "cuda max_memory_allocated",
                 "cpu": "peak live CPU tensor bytes (torch.profiler profile_memory)"}


@pytest.fixture(scope="session")
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _machine(benchmark, device):
    benchmark.extra_info.update({
        "device": torch.cuda.get_device_name() if device.type == "cuda" else cpu_name(),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "memory_method": MEMORY_METHOD.get(device.type, "?"),
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
