"""The Triton kernels against the GPU's best dense and masked attention: per op, dtype and mode.

Providers:
- ``triton``: this package's fused kernels;
- ``sdpa_flash``: ``scaled_dot_product_attention`` on the FlashAttention backend, with no mask
  (it takes none): dense attention over every key, the speed MLKA should reach (MLKA is dense
  attention minus a band) and an upper bound on LCA's work; 16-bit only (the backend's dtypes);
- ``flex``: FlexAttention (compiled) with a block mask built from the window predicate, which
  skips the blocks no query sees and masks the others: the general-purpose masked kernel.

RLR's layouts: LCA with k and v shared, MLKA with k shared and v batched (SDPA and FlexAttention
get them expanded to the batch, a view). GPU only: on a machine without CUDA every case skips.
Small by default, the paper's sizes with ``--benchmark``; see ``benchmarks/gpu.md``.
"""
import pytest
import torch
import torch.nn.functional as F

from rlr_fast import local_cross_attention, neighbor_masked_attention

FULL = [(16, 5, 8), (32, 7, 8), (64, 11, 8)]  # (grid, window, batch)
SMALL = [(16, 5, 2)]
HEADS, DIM = 8, 32
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def pytest_generate_tests(metafunc):
    if "size" in metafunc.fixturenames:
        sizes = FULL if metafunc.config.getoption("--benchmark") else SMALL
        metafunc.parametrize("size", sizes, ids=[f"grid{g}" for g, _, _ in sizes])


def _window_mask_mod(grid: int, window: int, complement: bool):
    """FlexAttention's mask_mod: key `kv` visible to query `q` (inside the window for LCA,
    outside it for MLKA)."""
    r = window // 2

    def mask_mod(b, h, q, kv):
        inside = ((q // grid - kv // grid).abs() <= r) & ((q % grid - kv % grid).abs() <= r)
        return ~inside if complement else inside

    return mask_mod


def _call(op, provider, q, k, v, grid, window):
    expand = lambda t: t.expand(q.shape[0], *t.shape[-3:]) if t.dim() == 3 else t  # noqa: E731
    if provider == "triton":
        fn = local_cross_attention if op == "lca" else neighbor_masked_attention
        return lambda: fn(q, k, v, (grid, grid), window, backend="triton")
    if provider == "sdpa_flash":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def call():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, expand(k), expand(v))
        return call
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    length = grid * grid
    block_mask = create_block_mask(_window_mask_mod(grid, window, op == "mlka"), None, None, length, length,
                                   device=q.device)
    flex = torch.compile(flex_attention)
    return lambda: flex(q, expand(k), expand(v), block_mask=block_mask)


@pytest.mark.parametrize("mode", ["inference", "fwd+bwd"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("provider", ["triton", "sdpa_flash", "flex"])
@pytest.mark.parametrize("op", ["lca", "mlka"])
def test_gpu_op(benchmark, measure, device, full, op, provider, dtype, mode, size):
    if device.type != "cuda":
        pytest.skip("GPU benchmark: needs CUDA")
    if provider == "sdpa_flash" and dtype == "fp32":
        pytest.skip("SDPA's FlashAttention backend takes fp16 and bf16 only")
    grid, window, batch = size
    length = grid * grid
    torch.manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, HEADS, length, DIM, device=device, dtype=DTYPES[dtype], requires_grad=True)

    q, k = t(batch), t()
    v = t() if op == "lca" else t(batch)
    call = _call(op, provider, q, k, v, grid, window)
    grad = torch.randn_like(q)
    if mode == "inference":
        def fn():
            with torch.no_grad():
                call()
    else:
        def fn():
            torch.autograd.grad(call(), (q, k, v), grad)
    benchmark.group = f"gpu {op} grid {grid} window {window} batch {batch} {dtype} {mode}"
    measure(fn, 20 if full else 3, kind="gpu_op", op=op, provider=provider, dtype=dtype, mode=mode, grid=grid,
            window=window, batch=batch, heads=HEADS, head_dim=DIM)
