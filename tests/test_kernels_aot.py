"""`rlr-fast kernels` compiles every kernel (the attention ops' and nearest_reference's) for sm_80
and sm_90 with no GPU, and nothing spills."""
import itertools
import json
import os
import subprocess
import sys


def test_kernels_compile_for_sm80_and_sm90_without_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "kernels.json"
    result = subprocess.run([sys.executable, "-m", "rlr_fast", "kernels", "--arch", "sm_80,sm_90", "--json", str(out)],
                            capture_output=True, text=True, env=env, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads(out.read_text())
    nearest = [r for r in rows if r["op"] == "nn"]
    rows = [r for r in rows if r["op"] != "nn"]
    # nearest_reference's kernel: every arch x dtype x channel count, on tensor cores, no spills
    assert sorted((r["arch"], r["dtype"], r["head_dim"]) for r in nearest) == sorted(itertools.product(
        ("sm_80", "sm_90"), ("fp32", "fp16", "bf16"), (24, 64, 128, 256, 512)))
    assert all(r["ok"] and r["spill_bytes"] == 0 and r["registers"] > 0 for r in nearest)
    assert all(r["tensor_cores"] == ("wgmma" if r["arch"] == "sm_90" else "mma") for r in nearest)
    # every arch x op x dtype x head dim x (forward, dq, dk/dv in each shared/batched layout) is there
    expected = {(arch, op, dtype, dim, kernel, layout)
                for arch, op, dtype, dim in itertools.product(("sm_80", "sm_90"), ("lca", "mlka"),
                                                              ("fp32", "fp16", "bf16"), (16, 32, 64, 128))
                for kernel, layout in [("fwd_kernel", ""), ("bwd_dq_kernel", "")] +
                [("bwd_dkdv_kernel", f"k {k}, v {v}") for k, v in itertools.product(("shared", "batched"), repeat=2)]}
    assert {(r["arch"], r["op"], r["dtype"], r["head_dim"], r["kernel"], r["layout"]) for r in rows} == expected
    # dK/dV: one launch computing both, or two launches (dK, dV) where the config splits them
    for key in expected:
        if key[4] == "bwd_dkdv_kernel":
            grads = sorted(r["grads"] for r in rows if (r["arch"], r["op"], r["dtype"], r["head_dim"], r["kernel"],
                                                        r["layout"]) == key)
            assert grads in (["dK+dV"], ["dK", "dV"]), (key, grads)
    assert all(r["ok"] and r["spill_bytes"] == 0 and r["registers"] > 0 for r in rows)
    # every product on tensor cores, but where the config asks for fp32 FMA ("ieee": fp32 at head dim 128)
    assert all(r["tensor_cores"] in ("mma", "wgmma") for r in rows if r["dot"] != "ieee")
    assert {(r["dtype"], r["head_dim"]) for r in rows if r["dot"] == "ieee"} <= {("fp32", 128)}
    assert "spilling registers" in result.stdout and "kernel" in result.stdout


def test_bad_arch_is_a_clear_error():
    result = subprocess.run([sys.executable, "-m", "rlr_fast", "kernels", "--arch", "ampere"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "--arch takes targets like sm_80,sm_90" in result.stderr
