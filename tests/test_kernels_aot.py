"""`rlr-fast kernels`: every kernel (the attention ops' and nearest_reference's) compiles for sm_80
and sm_90 with no GPU and nothing spills, in its default config and (sm_90, fp16, head dim 32:
the whole matrix of configs would take several times the defaults' compile time) in every config
of its autotuning space; the report compiles what the JIT runs and reads the SASS right."""
import itertools
import json
import os
import subprocess
import sys

import pytest

from rlr_fast.kernels import aot

FIELDS = {"op", "kernel", "dtype", "head_dim", "arch", "registers", "spill_bytes", "smem_bytes", "blocks_per_sm",
          "tensor_core", "loop_instructions", "instructions_per_score", "programs", "config", "default", "pruned"}


def _no_interpreter_env():
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def test_kernels_compile_for_sm80_and_sm90_without_spills(tmp_path):
    out = tmp_path / "kernels.json"
    result = subprocess.run([sys.executable, "-m", "rlr_fast", "kernels", "--arch", "sm_80,sm_90", "--default-only",
                             "--json", str(out)], capture_output=True, text=True, env=_no_interpreter_env(), timeout=3600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert all(r["default"] and r["pruned"] is None for r in rows)
    nearest = [r for r in rows if r["op"] == "nn"]
    rows = [r for r in rows if r["op"] != "nn"]
    # nearest_reference's kernel: every arch x dtype x channel count, on tensor cores, no spills
    assert sorted((r["arch"], r["dtype"], r["head_dim"]) for r in nearest) == sorted(itertools.product(
        ("sm_80", "sm_90"), ("fp32", "fp16", "bf16"), (24, 64, 128, 256, 512)))
    assert all(r["ok"] and r["spill_bytes"] == 0 and r["registers"] > 0 for r in nearest)
    assert all(r["tensor_core"] == ("wgmma" if r["arch"] == "sm_90" else "mma") for r in nearest)
    # every arch x op x dtype x head dim x (forward, dq, dk/dv in each shared/batched layout) is there
    expected = {(arch, op, dtype, dim, kernel, layout)
                for arch, op, dtype, dim in itertools.product(("sm_80", "sm_90"), ("lca", "mlka"),
                                                              ("fp32", "fp16", "bf16"), (16, 32, 64, 128))
                for kernel, layout in [("forward", ""), ("dq", "")] +
                [("dkdv", f"k {k}, v {v}") for k, v in itertools.product(("shared", "batched"), repeat=2)]}
    assert {(r["arch"], r["op"], r["dtype"], r["head_dim"], r["kernel"], r["layout"]) for r in rows} == expected
    # dK/dV: one launch computing both, or two launches (dK, dV) where the config splits them
    for key in expected:
        if key[4] == "dkdv":
            grads = sorted(r["grads"] for r in rows if (r["arch"], r["op"], r["dtype"], r["head_dim"], r["kernel"],
                                                        r["layout"]) == key)
            # (16-bit MLKA's FlashAttention-2 style kernel always computes both: no WITH_DK/WITH_DV)
            fa2 = key[1] == "mlka" and key[2] != "fp32"
            assert grads in ([[""]] if fa2 else (["dK+dV"], ["dK", "dV"])), (key, grads)
    assert all(FIELDS <= set(r) for r in rows)
    assert all(r["ok"] and r["spill_bytes"] == 0 and r["registers"] > 0 for r in rows)
    assert all(r["loop_instructions"] > 0 and r["blocks_per_sm"] >= 1 for r in rows)
    assert all(r["keys_visited_per_useful_key"] >= 1 for r in rows if r["op"] == "lca")
    # every product on tensor cores, but where the config asks for fp32 FMA ("ieee": fp32 at head dim 128)
    assert all(r["tensor_core"] in ("mma", "wgmma") for r in rows if r["dot"] != "ieee")
    assert {(r["dtype"], r["head_dim"]) for r in rows if r["dot"] == "ieee"} <= {("fp32", 128)}
    # MLKA's 16-bit forward (64-query tiles) runs on Hopper's wgmma; LCA's folds batch elements into
    # tiles of 32 rows at head dim 128 (fewer keys visited), below wgmma's 64: mma there
    assert all(r["tensor_core"] == "wgmma" for r in rows if r["arch"] == "sm_90" and r["dtype"] != "fp32"
               and r["kernel"] == "forward" and (r["op"] == "mlka" or r["head_dim"] < 128))
    assert "spilling registers" in result.stdout and "ins/sc" in result.stdout


_JIT_MATCH = """
import torch, triton
from triton.compiler import make_backend
from triton.runtime.jit import create_function_from_signature
from rlr_fast.kernels import aot
backend = make_backend(aot._target("sm_90"))
checked = 0
for op, dtype, dim, kind, layout in [("lca", torch.float16, 32, "forward", (True, True)),
                                     ("mlka", torch.bfloat16, 64, "dq", (True, False)),
                                     ("mlka", torch.float32, 16, "dkdv", (True, False)),
                                     ("lca", torch.float16, 128, "dkdv", (False, False))]:
    for launch in aot.typical_launches(op, dtype, dim, kind, *layout):
        kernel, config = launch.kernel.fn, launch.default
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        bound, specialization, options = binder(**launch.arguments(config), num_warps=config.num_warps)
        _, jit_sig, jit_const, jit_attrs = kernel._pack_args(backend, {"num_warps": config.num_warps}, bound,
                                                             specialization, options)
        sig, const, attrs = aot.jit_specialization(kernel, launch.arguments(config), "sm_90")
        assert sig == jit_sig, (sig, jit_sig)
        assert const == jit_const, (const, jit_const)
        assert attrs == jit_attrs, (attrs, jit_attrs)
        # the hints are there: pointers aligned, token strides and grid sides divisible by 16
        names = [p.name for p in kernel.params]
        for name in ("Q", "K", "stride_ql", "GRID_W"):
            assert attrs[(names.index(name),)] == [["tt.divisibility", 16]], name
        checked += 1
print("checked", checked)
"""


def test_aot_specialisation_is_the_jits():
    """The report compiles each kernel with the signature, constants and divisibility hints that
    Triton's JIT derives for the same call (its own binder is the oracle here)."""
    result = subprocess.run([sys.executable, "-c", _JIT_MATCH], capture_output=True, text=True,
                            env=_no_interpreter_env(), timeout=600)
    assert result.returncode == 0 and "checked" in result.stdout, result.stderr[-3000:]
    assert int(result.stdout.split()[-1]) >= 4


SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_TID.X ;
        /*0020*/                   HMMA.16816.F32 R4, R8, R12, R4 ;
        /*0030*/                   IADD3 R0, R0, 0x1, RZ ;
        /*0040*/               @P0 BRA 0x20 ;
        /*0050*/                   FFMA R2, R2, R3, R2 ;
        /*0060*/                   FFMA R2, R2, R3, R2 ;
        /*0070*/               @P1 BRA 0x50 ;
        /*0080*/                   HGMMA.64x64x16.F32 R24, gdesc[UR32], RZ, !UPT ;
        /*0090*/                   HGMMA.64x64x16.F32 R24, gdesc[UR32], R24 ;
        /*00a0*/                   ISETP.GE.AND P2, PT, R0, 0x8, PT ;
        /*00b0*/               @P2 BRA 0x80 ;
        /*00c0*/               @P3 BRA 0x20 ;
        /*00d0*/                   EXIT ;
        /*00e0*/                   BRA 0xe0;
"""


def test_sass_loops_are_the_innermost_backward_branches():
    # loops 0x20-0x40 (3 instructions, mma), 0x50-0x70 (3, no mma), 0x80-0xb0 (4, wgmma); the loop
    # 0x20-0xc0 holds others, the branch to itself at 0xe0 is the end-of-kernel trap
    assert aot.sass_loops(SASS) == [(3, True), (3, False), (4, True)]
    assert aot.main_loop_instructions(SASS) == 3
    assert aot.main_loop_instructions(SASS.replace("HMMA", "IMAD").replace("HGMMA", "IMAD")) == 4
    assert aot.main_loop_instructions("        /*0000*/   EXIT ;") is None


def test_blocks_per_sm_on_an_h100():
    assert aot.blocks_per_sm(128, 0, 4) == 4  # 65536 / (128 x 32 x 4)
    assert aot.blocks_per_sm(128, 100 * 1024, 4) == 2  # 228 KB / 100 KB
    assert aot.blocks_per_sm(32, 0, 8) == 8  # 64 warps / 8
    assert aot.blocks_per_sm(16, 0, 1) == 32  # the block limit


@pytest.mark.parametrize("grid,window,tile,block,expected", [
    ((8, 8), (1, 1), (4, 4), (4, 4), 16.0),  # each query needs 1 key; a tile sweeps its own 16
    ((4, 4), (3, 3), (4, 4), (4, 4), 256 / 100),  # one block of the whole grid; windows hold 100 pairs
    ((4, 4), (3, 3), (4, 4), (2, 4), 256 / 100),  # two 2 x 4 blocks cover the same patch
    ((4, 4), (3, 3), (4, 4), (3, 4), 2 * 12 * 16 / 100),  # 2 blocks of 3 rows over 4 rows: 24 keys
])
def test_keys_visited_per_useful_key(grid, window, tile, block, expected):
    cfg = dict(TILE_H=tile[0], TILE_W=tile[1], BLOCK_H=block[0], BLOCK_W=block[1])
    assert aot.keys_visited_per_useful_key(cfg, grid, window) == pytest.approx(expected)


def test_bad_arch_is_a_clear_error():
    result = subprocess.run([sys.executable, "-m", "rlr_fast", "kernels", "--arch", "ampere"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "--arch takes targets like sm_80,sm_90" in result.stderr


def test_shared_kv_backward_fills_an_h100():
    """The dK/dV launch of a shared k or v at B=8, 32x32, 8 heads has at least four programs per
    H100 SM (4 x 132), in every dtype and head dim: the batch is split into runs, not walked by
    one program per key tile and head (256 programs at 16-bit, head dim 32, before)."""
    import torch

    for dtype, dim, op, layout in itertools.product((torch.float32, torch.float16), (16, 32, 64, 128), aot.OPS,
                                                    ((True, True), (True, False), (False, True))):
        for launch in aot.typical_launches(op, dtype, dim, "dkdv", *layout):
            assert launch.programs >= 4 * 132, (op, dtype, dim, layout, launch.programs)


_TARGETS = """
import json
from rlr_fast.kernels import aot
mlka = aot._compile_one(("sm_90", "mlka", "fp16", 32, "forward", None, True))
lca = aot._compile_one(("sm_90", "lca", "bf16", 64, "forward", None, True))
print(json.dumps(mlka + lca))
"""


def test_sm90_targets_of_the_redesign():
    """On sm_90: MLKA's 16-bit forward runs its unmasked loop on wgmma at <= 12 instructions per
    score; LCA's 16-bit forward with a shared k/v visits <= 3 keys per useful key; no spills."""
    result = subprocess.run([sys.executable, "-c", _TARGETS], capture_output=True, text=True,
                            env=_no_interpreter_env(), timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    mlka, lca = json.loads(result.stdout.strip().splitlines()[-1])
    assert mlka["ok"] and mlka["spill_bytes"] == 0 and mlka["tensor_core"] == "wgmma", mlka
    assert mlka["instructions_per_score"] <= 12, mlka
    assert lca["ok"] and lca["spill_bytes"] == 0 and lca["keys_visited_per_useful_key"] <= 3, lca


def test_every_config_compiles_for_sm90_without_spills_or_is_pruned_with_a_reason(tmp_path):
    """Every config of every kernel's autotuning space, at fp16 and head dim 32 (nearest_reference
    at each of its channel counts), compiles for sm_90 with no spills, or is reported as pruned
    for the typical call with its reason; one row per config, the default marked once per launch."""
    import importlib

    from rlr_fast.kernels import window_attention as wa

    nr = importlib.import_module("rlr_fast.kernels.nearest_reference")  # the package exports the function
    sizes = {("lca", "forward"): len(wa.LCA_FWD_CONFIGS), ("mlka", "forward"): len(wa.MLKA_FWD_CONFIGS),
             ("lca", "dq"): len(wa.DQ_CONFIGS), ("mlka", "dq"): len(wa.MLKA_DQ_CONFIGS),
             ("lca", "dkdv"): len(wa.DKDV_CONFIGS), ("mlka", "dkdv"): len(wa.MLKA_DKDV_CONFIGS),
             ("nn", "nearest"): len(nr.NEAREST_CONFIGS)}
    out = tmp_path / "kernels.json"
    result = subprocess.run([sys.executable, "-m", "rlr_fast", "kernels", "--arch", "sm_90", "--dtypes", "fp16",
                             "--head-dims", "32", "--json", str(out)],
                            capture_output=True, text=True, env=_no_interpreter_env(), timeout=3600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads(out.read_text())
    launches = {}
    for r in rows:
        launches.setdefault((r["op"], r["kernel"], r["layout"], r["grads"], r["head_dim"]), []).append(r)
    assert len(launches) == 2 * (2 + 4) + len(aot.NEAREST_CHANNELS)
    for key, configs in launches.items():
        assert [r["config_index"] for r in configs] == list(range(sizes[key[:2]])), key
        assert sum(r["default"] for r in configs) == 1, key
        for r in configs:
            assert {"num_warps", "num_stages"} <= set(r["config"])
            assert any(name.startswith("BLOCK") for name in r["config"])
            if r["pruned"]:
                assert not r["default"] and r["pruned"].strip(), (key, r)
            else:
                assert r["ok"] and r["spill_bytes"] == 0 and r["registers"] > 0, (key, r)
    assert sum(1 for r in rows if not r["pruned"]) > len(launches)  # alternatives compiled, not only defaults
    assert "(* the default)" in result.stdout and "pruned" in result.stdout
