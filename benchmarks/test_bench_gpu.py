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

from gpu_check import window_mask_mod
from rlr_fast import local_cross_attention, neighbor_masked_attention

FULL = [(16, 5, 8), (32, 7, 8), (64, 11, 8)]  # (grid, window, batch)
SMALL = [(16, 5, 2)]
HEADS, DIM = 8, 32
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def pytest_generate_tests(metafunc):
    if "size" in metafunc.fixturenames:
        sizes = FULL if metafunc.config.getoption("--benchmark") else SMALL
        metafunc.parametrize("size", sizes, ids=[f"grid{g}" for g, _, _ in sizes])


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
    block_mask = create_block_mask(window_mask_mod(grid, window, op == "mlka"), None, None, length, length,
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


# ------------------------------------------------------------------------------------------------
# benchmarks/gpu_check.py: its pure-Python parts on any machine, its refusal without a GPU
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("complement", [False, True])
def test_gpu_check_mask_is_the_window(complement):
    """The mask_mod given to FlexAttention is the package's window mask (or its complement) on a grid."""
    import gpu_check
    from rlr_fast.windows import window_mask

    grid, window = 9, 5
    q, kv = torch.meshgrid(torch.arange(grid * grid), torch.arange(grid * grid), indexing="ij")
    got = gpu_check.window_mask_mod(grid, window, complement)(0, 0, q, kv)
    expected = window_mask((grid, grid), (window, window))
    assert torch.equal(got, ~expected if complement else expected)


@pytest.mark.parametrize("complement", [False, True])
def test_gpu_check_block_mask_skips_exactly_the_blocks_without_a_visible_key(complement):
    import gpu_check
    from rlr_fast.windows import window_mask

    grid, window, block = 16, 5, 32  # 256 tokens, 8 x 8 blocks of 32 (two grid rows)
    bm = gpu_check.block_mask(grid, window, complement, "cpu", block=block)
    dense = window_mask((grid, grid), (window, window))
    dense = ~dense if complement else dense
    n = grid * grid // block
    expected = dense.reshape(n, block, n, block).any(3).any(1)
    assert torch.equal(bm.to_dense()[0, 0].bool(), expected)
    if not complement:  # LCA's window reaches two blocks of rows at most on either side: most are skipped
        assert expected.float().mean() < 0.6


def test_gpu_check_tables():
    import gpu_check

    rows = [dict(op="mlka", dtype="fp16", launch="32x32", mode="forward", ours=0.5, sdpa=1.0, flex=0.25),
            dict(op="lca", dtype="bf16", launch="64x64", mode="forward+backward", ours=2.0, sdpa=None, flex=4.0)]
    floors = {("mlka", "fp16", "32x32", "forward"): dict(issue_floor_us=100.0, fa2_dense_floor_us=16.0)}
    lines = gpu_check.format_op_table(rows, floors).splitlines()
    assert lines[0].split() == list(gpu_check.OP_HEAD)
    assert lines[1].split() == ["mlka", "fp16", "32x32", "forward", "0.500", "1.000", "0.250", "2.00", "0.50",
                                "0.100", "0.016", "5.00"]
    assert lines[2].split() == ["lca", "bf16", "64x64", "forward+backward", "2.000", "-", "4.000", "0.50", "-",
                                "-", "-", "-"]
    model = gpu_check.format_model_table({"ours eager": 10.0, "ours compiled": 5.0, "naive": 40.0}, 8).splitlines()
    assert model[1].split() == ["ours", "eager", "10.000", "800.0", "4.00"]
    assert model[2].split() == ["ours", "compiled", "5.000", "1600.0", "8.00"]


def test_gpu_check_floors_from_the_report(tmp_path):
    import gpu_check

    rows = [dict(arch="sm_90", op="lca", dtype="fp16", head_dim=32, launch="32x32", mode="forward",
                 issue_floor_us=4.0, fa2_dense_floor_us=16.0),
            dict(arch="sm_90", op="lca", dtype="fp16", head_dim=64, launch="32x32", mode="forward",
                 issue_floor_us=9.0, fa2_dense_floor_us=16.0)]
    path = tmp_path / "ops.json"
    path.write_text(__import__("json").dumps(rows))
    floors = gpu_check.load_floors(path, 32)
    assert list(floors) == [("lca", "fp16", "32x32", "forward")] and floors[("lca", "fp16", "32x32", "forward")][
        "issue_floor_us"] == 4.0
    assert gpu_check.load_floors(tmp_path / "missing.json", 32) == {}


def test_gpu_check_without_cuda_says_so(monkeypatch, capsys):
    import gpu_check

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--skip-model"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
