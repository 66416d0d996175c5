"""The benchmarks' CPU peak-memory measurement (benchmarks/conftest.py) on hand-made cases whose
peak is known exactly: live tensor bytes, independent of malloc's cache and of earlier calls."""
import importlib.util
from pathlib import Path

import pytest
import torch

MIB = 1 << 20
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def peak_bytes():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "conftest.py"
    spec = importlib.util.spec_from_file_location("rlr_fast_bench_conftest", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.peak_bytes


def _alloc_free_alloc():
    a = torch.ones(100 * MIB, dtype=torch.uint8)
    del a
    b = torch.ones(50 * MIB, dtype=torch.uint8)
    return b


def _two_alive():
    a = torch.zeros(10 * MIB // 4)  # float32: 10 MiB each
    b = torch.zeros(10 * MIB // 4)
    return a, b


def _nothing():
    return None


def _grad_of_product():
    # x (4 MiB) and x * 2 (4 MiB, not saved for backward, freed after the sum), then the
    # gradient (4 MiB) while x lives: 8 MiB and a few scalars, backward included.
    x = torch.zeros(4 * MIB // 4, requires_grad=True)
    (g,) = torch.autograd.grad((x * 2).sum(), x)
    return g


@pytest.mark.parametrize("warm", [True, False])
def test_alloc_free_alloc(peak_bytes, warm):
    assert peak_bytes(_alloc_free_alloc, CPU, warm) == 100 * MIB


def test_tensors_kept_alive(peak_bytes):
    assert peak_bytes(_two_alive, CPU) == 20 * MIB


def test_no_allocation(peak_bytes):
    assert peak_bytes(_nothing, CPU) == 0


def test_independent_of_earlier_calls(peak_bytes):
    big = torch.ones(200 * MIB, dtype=torch.uint8)
    del big  # malloc may keep this block: the next peak must still count its 100 MiB tensor
    first = peak_bytes(_alloc_free_alloc, CPU)
    second = peak_bytes(_alloc_free_alloc, CPU)
    assert first == second == 100 * MIB
    assert peak_bytes(_two_alive, CPU) == 20 * MIB  # a smaller peak after a larger one


def test_live_memory_before_is_not_counted(peak_bytes):
    held = torch.ones(64 * MIB, dtype=torch.uint8)
    assert peak_bytes(_two_alive, CPU) == 20 * MIB
    assert held.numel() == 64 * MIB


def test_backward(peak_bytes):
    peak = peak_bytes(_grad_of_product, CPU)
    assert 8 * MIB <= peak < 8 * MIB + 1024
