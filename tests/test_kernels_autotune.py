"""Autotuning of the Triton kernels (kernels/tuning.py), in Triton's interpreter when there is no GPU
(conftest sets TRITON_INTERPRET=1): every config of every kernel's space against the reference
backend, the pruning rules, pinning a config, and re-runs on the same buffers (what the autotuner
does while it times configs on a GPU) leaving the outputs right."""
import importlib
import itertools
import os
import subprocess
import sys

import pytest
import torch
import triton

from rlr_fast import local_cross_attention, neighbor_masked_attention
from rlr_fast.kernels import aot, tuning
from rlr_fast.kernels import window_attention as wa
from rlr_fast.ops import nearest_reference
from helpers import agree

nr = importlib.import_module("rlr_fast.kernels.nearest_reference")  # the package exports the function

OPS = {"lca": local_cross_attention, "mlka": neighbor_masked_attention}
SPACES = {"lca_fwd": wa.LCA_FWD_CONFIGS, "mlka_fwd": wa.MLKA_FWD_CONFIGS, "dq": wa.DQ_CONFIGS,
          "dkdv": wa.DKDV_CONFIGS, "mlka_dq": wa.MLKA_DQ_CONFIGS, "mlka_dkdv": wa.MLKA_DKDV_CONFIGS,
          "lca_dq": wa.LCA_DQ_CONFIGS, "lca_dkdv": wa.LCA_DKDV_CONFIGS, "nearest": nr.NEAREST_CONFIGS}


def _kernels(op, dtype):
    """The forward, dQ and dK/dV kernels (names in `SPACES`) a call of the op runs in `dtype` at
    head dim 16 (`_inputs`): 16-bit MLKA has its own FlashAttention-2 style backward, 16-bit LCA its
    batch-folded one."""
    if op == "mlka" and wa.mlka_fa2_backward(dtype, 16, tuning.target_arch(torch.device(DEVICE))):
        return ("mlka_fwd", "mlka_dq", "mlka_dkdv")
    if op == "lca" and wa.lca_fused_backward(dtype, 16):
        return ("lca_fwd", "lca_dq", "lca_dkdv")
    return (f"{op}_fwd", "dq", "dkdv")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs CUDA or TRITON_INTERPRET=1")
# 18 x 14 tokens, window 3: several 2D tiles and blocks of every size in the spaces (up to 8 x 8),
# the last ones partial; for MLKA's runs of up to 128 queries, a band of masked key blocks, an
# unmasked one before it and a partial last block.
GRID, WINDOW = (18, 14), 3


@pytest.fixture
def pin():
    """pin(name, index) for the test's duration; every pin is lifted afterwards."""
    pinned = []

    def _pin(name, index):
        tuning.pin_config(name, index)
        pinned.append(name)

    yield _pin
    for name in pinned:
        tuning.pin_config(name, None)


def _inputs(op, dtype, batch=2, grid=GRID):
    """q, k, v, grad in RLR's layouts (LCA: k and v shared, MLKA: k shared, v batched)."""
    g = torch.Generator().manual_seed(0)
    length = grid[0] * grid[1]
    q = torch.randn(batch, 1, length, 16, generator=g)
    k = torch.randn(1, length, 16, generator=g)
    v = torch.randn(1, length, 16, generator=g) if op == "lca" else torch.randn(batch, 1, length, 16, generator=g)
    grad = torch.randn(q.shape, generator=g)
    return [t.to(DEVICE, dtype) for t in (q, k, v, grad)]


def _run(op, q, k, v, grad, backend, grid=GRID):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = OPS[op](q, k, v, grid, WINDOW, backend=backend)
    return (out, *torch.autograd.grad(out, (q, k, v), grad))


def _chosen(name):
    """The config the autotuner ran last for kernel `name`."""
    return tuning.KERNELS[name].kernel.best_config


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("op", ["lca", "mlka"])
@pytest.mark.parametrize("index", range(6))
def test_every_config_matches_the_reference(index, op, dtype, pin):
    """Config `index` of the op's forward and of dQ and dK/dV (the batch-split reduction of the
    shared k) pinned (modulo the size of a smaller space): forward and gradients against the
    reference backend in fp64."""
    names = _kernels(op, dtype)
    for name in names:
        pin(name, index % len(SPACES[name]))
    q, k, v, grad = _inputs(op, dtype)
    got = _run(op, q, k, v, grad, "triton")
    oracle = _run(op, q.double(), k.double(), v.double(), grad.double(), "dense")
    for name in names:
        space, chosen = SPACES[name][index % len(SPACES[name])], _chosen(name)
        assert (chosen.num_warps, chosen.num_stages) == (space.num_warps, space.num_stages), name
        tile = (space.kwargs.get("TILE_H"), space.kwargs.get("TILE_W"))
        block = (space.kwargs.get("BLOCK_H"), space.kwargs.get("BLOCK_W"))
        if name in ("lca_fwd", "lca_dq") and dtype == torch.float16:  # k and v shared: 2 batch elements folded
            tile = wa.fold_tile(*tile, 2)
        if name == "lca_dkdv":  # into the query tile; dK/dV's query blocks
            block = wa.fold_tile(*block, 2)
        assert {**space.kwargs, "TILE_H": tile[0], "TILE_W": tile[1], "BLOCK_H": block[0], "BLOCK_W": block[1]} == {
            "TILE_H": None, "TILE_W": None, "BLOCK_H": None, "BLOCK_W": None, **chosen.kwargs}, name
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for name, g, o in zip(("out", "dq", "dk", "dv"), got, oracle):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), o, rtol=tol, atol=tol, msg=f"{op} config {index} {name}")


@pytest.mark.parametrize("channels", [24, 200])  # x in one channel chunk / in several
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("index", range(len(nr.NEAREST_CONFIGS)))
def test_every_nearest_config_matches_the_reference(index, dtype, channels, pin):
    pin("nearest", index)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 150, channels, generator=g).to(dtype)  # 150 tokens, 150 rows: partial tiles of 64 and 128
    ref = torch.randn(150, channels, generator=g).to(dtype)
    index_, sim = (t.cpu() for t in nearest_reference(x.to(DEVICE), ref.to(DEVICE), backend="triton"))
    assert _chosen("nearest") == nr.NEAREST_CONFIGS[index]
    oi, osim = nearest_reference(x.double(), ref.double(), backend="dense")
    agree(x, ref, index_, sim, oi, osim, atol=1e-5)


@pytest.mark.parametrize("op", ["lca", "mlka"])
def test_reruns_on_the_same_buffers_leave_the_outputs_right(op, pin):
    """On a GPU the autotuner runs every config, several times, on the call's own buffers before
    the chosen one. Outputs that start as NaN and see every config of every kernel in turn end
    as the reference's: the kernels write every output element, none accumulates into them."""
    dtype, grid = torch.float16, (9, 10)
    q, k, v, grad = _inputs(op, dtype, batch=3, grid=grid)
    oracle = _run(op, q.double(), k.double(), v.double(), grad.double(), "dense", grid)
    radius, scale, complement = (WINDOW // 2, WINDOW // 2), 16 ** -0.5, op == "mlka"
    o = torch.full(q.shape, float("nan"), dtype=dtype, device=DEVICE)
    lse = torch.full((q.numel() // 16,), float("nan"), device=DEVICE)
    forward = wa.forward_launch(q, k, v, o, lse, grid, radius, scale, complement)
    splits = wa.dkdv_splits(3, grid, 1, 16, dtype, complement, True)
    # MLKA: the batch-split partial sums of the shared k are among the outputs; LCA sums its shared k
    # and v over the batch inside its dK/dV kernel (no splits)
    assert splits > 1 if complement else splits == 1
    dq = torch.full(q.shape, float("nan"), dtype=dtype, device=DEVICE)
    dk, dv = (t.fill_(float("nan")) for t in wa.kv_gradient_buffers(k, v, splits))
    for index in range(6):
        for name in _kernels(op, dtype):
            pin(name, index % len(SPACES[name]))
        forward()
        # 16-bit: the dQ kernel computes delta from O itself (into a NaN buffer here)
        delta = torch.full_like(lse, float("nan"))
        for launch in wa.backward_launches(q, k, v, grad, dq, dk, dv, lse, delta, grid, radius, scale,
                                           complement, splits, o):
            launch()
    dk, dv = (g.sum(0).to(t.dtype) if t.dim() == 3 and splits > 1 else g for g, t in ((dk, k), (dv, v)))
    for name, g, ref in zip(("out", "dq", "dk", "dv"), (o, dq, dk, dv), oracle):
        torch.testing.assert_close(g.double(), ref, rtol=2e-2, atol=2e-2, msg=f"{op} {name}")


# ------------------------------------------------------------------------------------------------
# Which configs a call runs: the default, pruning, pinning
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,dim", list(itertools.product((torch.float32, torch.float16), (16, 32, 64, 128))))
def test_the_default_is_in_the_space_and_is_block_configs(dtype, dim, monkeypatch):
    """Every kernel's space holds its default (`block_config`) at every dtype and head dim, and
    under the interpreter a call runs that config and nothing else."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # what _prune sees in the interpreter (also on a GPU machine)
    for op, kind, layout in itertools.product(aot.OPS, aot.KINDS, ((True, True), (True, False), (False, False))):
        for launch in aot.typical_launches(op, dtype, dim, kind, *layout):
            cfg = wa.block_config("fwd" if kind == "forward" else kind, dim, dtype, aot.OPS[op])
            expected = wa.as_config(cfg)
            if launch.name == "lca_dkdv":  # its query blocks hold FOLD batch elements
                expected.kwargs["BLOCK_H"], expected.kwargs["BLOCK_W"] = wa.fold_tile(
                    cfg["BLOCK_H"], cfg["BLOCK_W"], launch.args["FOLD"])
            elif "FOLD" in launch.args:
                expected.kwargs["TILE_H"], expected.kwargs["TILE_W"] = wa.fold_tile(
                    cfg["TILE_H"], cfg["TILE_W"], launch.args["FOLD"])
            if launch.name in ("mlka_dq", "mlka_dkdv"):  # the default carries its own register budget
                expected.maxnreg = cfg["maxnreg"]
                assert launch.maxnreg is None
                assert all(c.config.maxnreg is None for c in launch.candidates() if not c.default)
            assert launch.default == expected, (op, kind, layout)
            assert tuning._prune(launch.name, launch.args) == [expected]
    for channels in aot.NEAREST_CHANNELS:
        launch = aot._nearest_launch(dtype, channels)
        assert tuning._prune("nearest", launch.args) == [launch.default] == [nr.NEAREST_CONFIGS[0]]


def _mlka_forward(grid, dtype, dim):
    q = torch.empty(8, 8, grid[0] * grid[1], dim, device="meta", dtype=dtype)
    lse = torch.empty(q.numel() // dim, device="meta")
    return wa.forward_launch(q, q[0], q, q, lse, grid, (3, 3), 1.0, True)


def test_on_a_gpu_the_default_comes_first_then_the_configs_that_fit(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # what _prune sees on a GPU (the kernels stay interpreted)
    launch = _mlka_forward((32, 32), torch.float16, 32)
    assert all(c.reason is None for c in launch.candidates())  # RLR's 32 x 32 level: every config fits
    assert tuning._prune("mlka_fwd", launch.args) == wa.MLKA_FWD_CONFIGS  # the default is the first already
    # fp32 at head dim 64: the default is config 3 (32 x 32 runs); the larger tiles (64- and 128-query
    # runs) are tried too, after it: the default is where timing starts, not a bound
    launch = _mlka_forward((32, 32), torch.float32, 64)
    candidates = launch.candidates()
    assert [c.default for c in candidates] == [False, False, False, True, False, False]
    assert all(c.reason is None for c in candidates)
    assert tuning._prune("mlka_fwd", launch.args) == [wa.MLKA_FWD_CONFIGS[i] for i in (3, 0, 1, 2, 4, 5)]


def test_deterministic_mode_runs_the_default_alone(monkeypatch):
    """RLR_FAST_DETERMINISTIC=1, or torch.use_deterministic_algorithms(True), pins every kernel's
    default config on a GPU (no timing, the same config in every process and rank)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv(tuning.DETERMINISTIC_ENV, raising=False)
    launches = [aot._nearest_launch(torch.float16, 64)] + [
        launch for op, kind in itertools.product(aot.OPS, aot.KINDS)
        for launch in aot.typical_launches(op, torch.float16, 32, kind, True, op == "lca")]
    assert any(len(tuning._prune(launch.name, launch.args)) > 1 for launch in launches)  # autotuned otherwise
    monkeypatch.setenv(tuning.DETERMINISTIC_ENV, "1")
    for launch in launches:
        assert tuning._prune(launch.name, launch.args) == [launch.default], launch.name
    monkeypatch.setenv(tuning.DETERMINISTIC_ENV, "0")
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for launch in launches:
            assert tuning._prune(launch.name, launch.args) == [launch.default], launch.name
    finally:
        torch.use_deterministic_algorithms(previous)


def test_autotune_keys_hold_what_changes_the_best_config():
    """The batch and heads (with the grid: the programs launched), LCA's batch fold and dK/dV's batch
    splits are in the autotuning keys, beside the grid, window and head dim."""
    for name in ("lca_fwd", "mlka_fwd", "dq", "dkdv", "mlka_dq", "mlka_dkdv", "lca_dq", "lca_dkdv"):
        keys = set(tuning.KERNELS[name].kernel.keys)
        assert {"GRID_H", "GRID_W", "RY", "RX", "HEAD_DIM", "B", "H"} <= keys, name
    assert "FOLD" in tuning.KERNELS["lca_fwd"].kernel.keys and "SPLITS" in tuning.KERNELS["dkdv"].kernel.keys
    # MLKA's 16-bit dK/dV: its batch splits and the run of batch elements a program sums over
    assert {"SPLITS", "RUN"} <= set(tuning.KERNELS["mlka_dkdv"].kernel.keys)
    # LCA's batch-folded backward: the fold, and for dK/dV the layout (which loop it runs)
    assert "FOLD" in tuning.KERNELS["lca_dq"].kernel.keys
    assert {"FOLD", "K_SHARED", "V_SHARED"} <= set(tuning.KERNELS["lca_dkdv"].kernel.keys)


def _dq(radius, complement):
    """The dQ launch of a 16-bit call at head dim 16 on a 32 x 32 grid."""
    q = torch.empty(8, 8, 32 * 32, 16, device="meta", dtype=torch.float16)
    lse = torch.empty(q.numel() // 16, device="meta")
    return wa.backward_launches(q, q[0], q, q, q, q[0], q, lse, lse, (32, 32), radius, 1.0, complement)[0]


def test_tiles_larger_than_the_grid_or_key_patch_needs_are_pruned(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    too_large = "tile larger than the grid (or key patch) needs"
    # a 4 x 4 grid (16 tokens): 128-query runs are pruned, the default's 64 still runs
    launch = _mlka_forward((4, 4), torch.float16, 32)
    reasons = [c.reason for c in launch.candidates()]
    assert reasons[0] is None and reasons[5] == too_large
    assert wa.MLKA_FWD_CONFIGS[5] not in tuning._prune("mlka_fwd", launch.args)
    # LCA's key blocks cover a tile's key patch: with window 1 the 4 x 4 tile of dQ's config 1 has a
    # 4 x 4 patch, narrower than its 4 x 8 blocks; with window 3 a 6 x 6 one (8 wide, rounded up).
    # MLKA's blocks sweep the whole grid: no patch to exceed.
    assert _dq((0, 0), False).candidates()[1].reason == too_large
    assert _dq((1, 1), False).candidates()[1].reason is None
    assert _dq((0, 0), True).candidates()[1].reason is None


def test_pipeline_stages_beyond_shared_memory_are_pruned():
    """By the shared memory of the device (or of the report's target): 128-query runs of 64 keys at head
    dim 128 with 3 stages take (3 x 2 x 64 + 128) x 128 x 2 bytes = 128 KB in 16 bits: they fit an
    sm_90 or sm_80 SM, not an sm_86 or sm_89 one (99 KB); in fp32 (256 KB) none."""
    config = triton.Config(dict(BLOCK_M=128, BLOCK_N=64), num_warps=8, num_stages=3)
    try:
        for arch, fits16 in ((90, True), (80, True), (86, False), (89, False)):
            tuning.target_shared_memory(arch)
            assert (tuning.misfit([], 128, 64, 128, 2, config) is None) == fits16, arch
            assert tuning.misfit([], 128, 64, 128, 4, config).startswith("pipeline stages need more shared memory")
    finally:
        tuning.target_shared_memory(None)


def test_shared_memory_is_read_from_the_device(monkeypatch):
    class Properties:
        shared_memory_per_block_optin = 99 * 1024  # an sm_86 card

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Properties())
    assert tuning.shared_memory_limit() == 99 * 1024
    config = triton.Config(dict(BLOCK_M=128, BLOCK_N=64), num_warps=8, num_stages=3)
    assert "99 KB" in tuning.misfit([], 128, 64, 128, 2, config)


def test_pinned_config_is_the_only_one(pin, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    launch = _mlka_forward((4, 4), torch.float16, 32)
    pin("mlka_fwd", 5)  # pruned for this grid, but pinned: runs anyway
    assert tuning._prune("mlka_fwd", launch.args) == [wa.MLKA_FWD_CONFIGS[5]]
    pin("mlka_fwd", 6)
    with pytest.raises(ValueError, match="mlka_fwd has configs 0 to 5, 6 is pinned"):
        tuning._prune("mlka_fwd", launch.args)
    with pytest.raises(ValueError, match="unknown kernel 'mlka'"):
        tuning.pin_config("mlka", 0)


def test_pins_from_the_environment():
    assert tuning._parse_pins(" mlka_fwd=5, dkdv=0 ") == {"mlka_fwd": 5, "dkdv": 0}
    assert tuning._parse_pins("") == {}
    for bad in ("mlka=1", "dq=fast", "dq"):
        with pytest.raises(ValueError, match="RLR_FAST_KERNEL_CONFIG: expected name=index"):
            tuning._parse_pins(bad)


_PINNED_RUN = """
import torch
from rlr_fast import neighbor_masked_attention
from rlr_fast.kernels import tuning, window_attention as wa
q = torch.randn(2, 1, 16 * 12, 16)
out = neighbor_masked_attention(q, q[0], q, (16, 12), 3, backend="triton")
ref = neighbor_masked_attention(q, q[0], q, (16, 12), 3, backend="dense")
torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
print(wa.MLKA_FWD_CONFIGS.index(tuning.KERNELS["mlka_fwd"].kernel.best_config))
"""


def test_pin_through_the_environment_variable():
    """RLR_FAST_KERNEL_CONFIG, set before the import, pins the config a call runs (not the default, 2)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", tuning.PIN_ENV: "mlka_fwd=5"}
    result = subprocess.run([sys.executable, "-c", _PINNED_RUN], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == "5"


def _mlka_backward_names(dtype, dim):
    """The kernel names of MLKA's backward launches for a call on meta tensors (B=2, 1 head, 8 x 8)."""
    q = torch.empty(2, 1, 64, dim, device="meta", dtype=dtype)
    lse = torch.empty(q.numel() // dim, device="meta")
    return [launch.name for launch in wa.backward_launches(q, q[0], q, q, q, q[0], q, lse, lse, (8, 8), (1, 1), 1.0,
                                                           True, 1, q)]


def test_mlka_backward_kernels_and_defaults_per_target():
    """16-bit MLKA runs its FlashAttention-2 style backward, fp32 the 2D-tile kernels; the defaults
    depend on the target: sm_90 keeps 128 registers where that compiles without spills, sm_80 takes
    none and keeps the 2D-tile kernels at head dim 128 (the report's target sets the arch)."""
    assert _mlka_backward_names(torch.float16, 32) == ["mlka_dq", "mlka_dkdv"]
    assert _mlka_backward_names(torch.float32, 32) == ["dq", "dkdv"]
    assert wa.mlka_fa2_backward(torch.bfloat16, 128, 90) and not wa.mlka_fa2_backward(torch.bfloat16, 128, 80)
    assert wa.mlka_fa2_backward(torch.float16, 64, 86) and not wa.mlka_fa2_backward(torch.float32, 64, 90)
    assert wa.block_config("dq", 32, torch.float16, True, 90)["maxnreg"] == 128
    assert wa.block_config("dq", 32, torch.float16, True, 80)["maxnreg"] is None
    assert wa.block_config("dq", 32, torch.float16, True) == wa.block_config("dq", 32, torch.float16, True, 90)
    assert "TILE_H" in wa.block_config("dkdv", 128, torch.float16, True, 80)  # the 2D-tile kernel's config
    try:
        tuning.target_shared_memory(80)
        assert tuning.target_arch() == 80 and tuning.target_arch(torch.device("cpu")) == 80
        assert _mlka_backward_names(torch.float16, 128) == ["dq", "dkdv", "dkdv"]  # split dK, dV launches
        assert _mlka_backward_names(torch.float16, 64) == ["mlka_dq", "mlka_dkdv"]
    finally:
        tuning.target_shared_memory(None)
    assert tuning.target_arch(torch.device("cpu")) is None and tuning.target_arch() is None


def test_target_arch_of_a_cuda_device(monkeypatch):
    """A CUDA device's compute capability; None where there is no CUDA (a traced graph's fake CUDA
    tensors on a machine without a GPU) instead of an error."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    got = tuning.target_arch(torch.device("cuda", 0))
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        assert got == 10 * major + minor
    else:
        assert got is None


_TILES_BACKWARD = """
import torch
from rlr_fast import neighbor_masked_attention
from rlr_fast.kernels import window_attention as wa
q = torch.empty(2, 1, 64, 16, device="meta", dtype=torch.float16)
lse = torch.empty(128, device="meta")
print(",".join(l.name for l in wa.backward_launches(q, q[0], q, q, q, q[0], q, lse, lse, (8, 8), (1, 1), 1.0, True)))
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(2, 1, 72, 16, generator=g) for _ in range(3))
grads = []
for backend in ("triton", "dense"):
    t = [x.to(torch.float16 if backend == "triton" else torch.float64).requires_grad_() for x in (q, k[0], v)]
    out = neighbor_masked_attention(*t, (9, 8), 3, backend=backend)
    grads.append(torch.autograd.grad(out, t, torch.ones_like(out)))
for a, b in zip(*grads):
    torch.testing.assert_close(a.double(), b, rtol=2e-2, atol=2e-2)
print("ok")
"""


def test_mlka_tiles_backward_through_the_environment_variable():
    """RLR_FAST_MLKA_BACKWARD=tiles (set before import) runs MLKA's 16-bit backward on the 2D-tile
    kernels it shares with LCA, with gradients still matching the fp64 reference."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "RLR_FAST_MLKA_BACKWARD": "tiles"}
    result = subprocess.run([sys.executable, "-c", _TILES_BACKWARD], capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    names, ok = result.stdout.split()[-2:]
    assert names == "dq,dkdv" and ok == "ok"
