"""The two ops, inference and forward+backward, per provider: triton (CUDA), torch, reference,
SDPA given the dense mask (k/v expanded to the batch) either as a boolean (`sdpa`) or as a
prebuilt additive float mask (`sdpa_float`, built once outside the timed call: a boolean mask is
converted to a float one inside SDPA on every call), and the eager dense path (matmul, additive
float mask, softmax, matmul, as nn.MultiheadAttention computes it). The report compares against
the faster of the two SDPA providers.

RLR's layouts: LCA with k and v shared (the reference), MLKA with k shared and v batched.
FLOPs counted: 4 * B * heads * D * (allowed query-key pairs), the useful work of the masked
problem (QK^T and PV); forward+backward counts 3.5 times that (backward = 2.5 forwards).

Each case runs in float32 and in bfloat16 (inputs in bf16, as a bf16 model passes them; on a CPU
without native bf16 the bf16 cases are skipped), except the reference backend, timed in float32.
"""
import time

import pytest
import torch
import torch.nn.functional as F

from rlr_fast import local_cross_attention, neighbor_masked_attention
from rlr_fast.precision import bf16_supported
from rlr_fast.windows import window_mask

FULL = [(16, 5, 8), (32, 7, 8), (64, 11, 2)]  # (grid, window, batch)
SMALL = [(8, 3, 2)]
HEADS, DIM = 8, 32
PROVIDERS = ["triton", "torch", "reference", "sdpa", "sdpa_float", "eager"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CASES = [(provider, dtype) for dtype in DTYPES for provider in PROVIDERS
         if not (provider == "reference" and dtype == "bf16")]  # the reference is timed in fp32


def _additive_mask(allowed, dtype):
    """0 where a key is allowed, -inf where it is not: the float mask SDPA adds to the scores."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def _eager(q, k, v, allowed):
    bias = _additive_mask(allowed, q.dtype)
    return torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + bias, -1) @ v


def _case(op, grid, window, batch, provider, device, dtype=torch.float32):
    length = grid * grid
    torch.manual_seed(0)
    q = torch.randn(batch, HEADS, length, DIM, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(HEADS, length, DIM, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(*((batch,) if op == "mlka" else ()), HEADS, length, DIM, device=device, dtype=dtype,
                    requires_grad=True)
    allowed = window_mask((grid, grid), (window, window), device)
    allowed = allowed if op == "lca" else ~allowed
    expand = lambda t: t.expand(batch, *t.shape[-3:]) if t.dim() == 3 else t  # noqa: E731
    if provider in ("triton", "torch", "reference"):
        fn = local_cross_attention if op == "lca" else neighbor_masked_attention
        # "reference" stays the dense backend's provider label, as in the recorded results
        backend = "dense" if provider == "reference" else provider
        call = lambda: fn(q, k, v, (grid, grid), window, backend=backend)  # noqa: E731
    elif provider == "sdpa":
        call = lambda: F.scaled_dot_product_attention(q, expand(k), expand(v), attn_mask=allowed)  # noqa: E731
    elif provider == "sdpa_float":
        bias = _additive_mask(allowed, q.dtype)  # prebuilt once: not part of the call
        call = lambda: F.scaled_dot_product_attention(q, expand(k), expand(v), attn_mask=bias)  # noqa: E731
    else:
        call = lambda: _eager(q, expand(k), expand(v), allowed)  # noqa: E731
    grad = torch.randn(batch, HEADS, length, DIM, device=device, dtype=dtype)
    flops = 4 * batch * HEADS * DIM * int(allowed.sum())
    return call, (q, k, v), grad, flops


def _matmul_gflops(device, dtype, n: int = 2048):
    """This machine's matmul rate in `dtype`, measured in the same run (best of 5, n^3)."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b
    best = float("inf")
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


@pytest.fixture(scope="module")
def matmul_peak_gflops(device, full):
    """rate(dtype name): the matmul rate, measured on a dtype's first use only (a bf16 matmul on a
    CPU without native bf16 takes minutes, and no case runs there to need it); 2048^3 with
    --benchmark, 512^3 in the small run, whose figures are not speed figures."""
    measured = {}

    def rate(name: str) -> float:
        if name not in measured:
            measured[name] = _matmul_gflops(device, DTYPES[name], 2048 if full else 512)
        return measured[name]

    return rate


def pytest_generate_tests(metafunc):
    if "size" in metafunc.fixturenames:
        sizes = FULL if metafunc.config.getoption("--benchmark") else SMALL
        metafunc.parametrize("size", sizes, ids=[f"grid{g}" for g, _, _ in sizes])


@pytest.mark.parametrize("mode", ["inference", "fwd+bwd"])
@pytest.mark.parametrize("provider,dtype", CASES)
@pytest.mark.parametrize("op", ["lca", "mlka"])
def test_op(benchmark, measure, device, full, matmul_peak_gflops, op, provider, mode, size, dtype):
    grid, window, batch = size
    if provider == "triton" and device.type != "cuda":
        pytest.skip("triton runs on CUDA (its CPU interpreter checks correctness, not speed)")
    if dtype == "bf16" and not bf16_supported(device):
        pytest.skip(f"this {device.type} has no native bf16")
    call, inputs, grad, flops = _case(op, grid, window, batch, provider, device, DTYPES[dtype])
    if mode == "inference":
        def fn():
            with torch.no_grad():
                call()
    else:
        flops = int(3.5 * flops)

        def fn():
            torch.autograd.grad(call(), inputs, grad)
    benchmark.group = f"{op} grid {grid} window {window} batch {batch} {mode} {dtype}"
    rounds = 5 if full else 2  # the torch and SDPA cells differ by 0-25%: medians of 5 to see it
    measure(fn, rounds, kind="op", op=op, provider=provider, mode=mode, grid=grid, window=window, batch=batch,
            heads=HEADS, head_dim=DIM, dtype=dtype, flops=flops,
            matmul_peak_gflops=round(matmul_peak_gflops(dtype), 1))
