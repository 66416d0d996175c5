"""`rlr-fast kernels` compiles every kernel for sm_80 and sm_90 with no GPU, and nothing spills."""
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
    # per arch: 2 ops x 3 dtypes x 2 head dims x (forward + dq + 4 dk/dv layouts)
    assert len(rows) == 2 * 2 * 3 * 2 * 6
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}
    assert {r["kernel"] for r in rows} == {"fwd_kernel", "bwd_dq_kernel", "bwd_dkdv_kernel"}
    assert all(r["ok"] and r["spill_bytes"] == 0 and r["registers"] > 0 for r in rows)
    assert all(r["tensor_cores"] in ("mma", "wgmma") for r in rows)  # every product on tensor cores
    assert "spilling registers" in result.stdout and "kernel" in result.stdout


def test_bad_arch_is_a_clear_error():
    result = subprocess.run([sys.executable, "-m", "rlr_fast", "kernels", "--arch", "ampere"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "--arch takes targets like sm_80,sm_90" in result.stderr
