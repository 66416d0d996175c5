"""The installed package is the product: build the sdist and the wheel from a copy of the source,
install the wheel into a fresh virtual environment and use it from a folder outside the checkout.

The new environment is created with ``--system-site-packages`` from the base interpreter, and a
``.pth`` file makes the running interpreter's site-packages (torch, timm, ...) visible to it, so
nothing is downloaded; the wheel itself is installed with ``--no-deps``.
"""
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from rlr_fast.demo_data import build_demo_dataset

ROOT = Path(__file__).resolve().parents[1]
# Not part of the source: local environments, build products, results, caches.
IGNORED = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "results", "*.egg-info", "__pycache__",
                                 ".pytest_cache", ".benchmarks")


def _run(cmd, **kwargs):
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    """(sdist, wheel built from that sdist, wheel built from the source tree)."""
    if not ROOT.joinpath("setup.py").is_file():
        pytest.fail("tests/test_wheel.py must run from a source checkout (setup.py not found)")
    tmp = tmp_path_factory.mktemp("dist")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=IGNORED)  # a clean copy: the build writes nothing into the checkout
    _run([sys.executable, "setup.py", "-q", "sdist", "-d", tmp / "sdist"], cwd=src)
    (sdist,) = (tmp / "sdist").glob("rlr_fast-*.tar.gz")
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    _run([*pip_wheel, "-w", tmp / "from_sdist", sdist], cwd=tmp)
    _run([*pip_wheel, "-w", tmp / "from_tree", src], cwd=tmp)
    (wheel,) = (tmp / "from_sdist").glob("rlr_fast-*.whl")
    (tree_wheel,) = (tmp / "from_tree").glob("rlr_fast-*.whl")
    return sdist, wheel, tree_wheel


def _python_files(wheel: Path) -> set:
    with zipfile.ZipFile(wheel) as z:
        return {n for n in z.namelist() if n.endswith(".py")}


def test_wheel_holds_every_subpackage_and_no_top_level_kernels(dists):
    _, wheel, tree_wheel = dists
    files = _python_files(wheel)
    expected = {f"rlr_fast/{p.relative_to(ROOT / 'rlr_fast').as_posix()}" for p in (ROOT / "rlr_fast").rglob("*.py")}
    expected |= {f"rlr_fast/kernels/{p.relative_to(ROOT / 'kernels').as_posix()}" for p in (ROOT / "kernels").rglob("*.py")}
    assert expected <= files, f"missing from the wheel: {sorted(expected - files)}"
    assert not any(n.startswith("kernels/") for n in files), "a top-level 'kernels' package was installed"
    assert files == _python_files(tree_wheel), "the wheel built from the sdist differs from the source tree's"
    with zipfile.ZipFile(wheel) as z:
        meta = next(z.read(n).decode() for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    assert "License :: OSI Approved :: MIT License" in meta
    assert "Requires-Dist: torch>=2.4" in meta


@pytest.fixture(scope="module")
def venv(dists, tmp_path_factory):
    """A fresh virtual environment with the wheel (built from the sdist) installed, no deps."""
    env = tmp_path_factory.mktemp("venv") / "env"
    base = getattr(sys, "_base_executable", sys.executable)
    _run([base, "-m", "venv", "--system-site-packages", env])
    python = env / "bin" / "python"
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    _run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", dists[1]])
    # Then (so that pip never sees the checkout's own editable install) the running interpreter's
    # packages, torch and the other dependencies, after the new environment's own.
    ours = [p for p in site.getsitepackages() + [sysconfig.get_paths()["purelib"]] if os.path.isdir(p)]
    Path(purelib, "zz_parent_site_packages.pth").write_text("\n".join(dict.fromkeys(ours)) + "\n")
    return env


def _env(venv_dir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PATH=f"{venv_dir / 'bin'}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1")
    return env


def test_installed_wheel_imports_and_runs_outside_the_checkout(venv, tmp_path):
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = _env(venv)
    python, cli = venv / "bin" / "python", venv / "bin" / "rlr-fast"
    help_text = _run([cli, "--help"], cwd=cwd, env=env).stdout
    for command in ("train", "test", "predict", "demo", "kernels"):
        assert command in help_text
    code = ("import rlr_fast, rlr_fast.models, rlr_fast.kernels, rlr_fast.commands, rlr_fast.commands.train\n"
            "from rlr_fast import RLRModel\n"
            "print(rlr_fast.__file__); print(rlr_fast.kernels.__file__)")
    files = _run([python, "-c", code], cwd=cwd, env=env).stdout.split()
    for f in files:  # the installed copy, not the checkout
        assert Path(f).resolve().is_relative_to(venv.resolve()), f

    data = build_demo_dataset(tmp_path / "data", classes=("brick",), image_size=64, n_train=4, n_test_good=2,
                              n_test_defect=2)
    run = tmp_path / "run"
    _run([cli, "train", "--data", data, "--out", run, "--image-size", "64", "--epochs", "1", "--batch-size", "2",
          "--no-progress"], cwd=cwd, env=env)
    assert (run / "checkpoint.pt").is_file()
    out = _run([cli, "test", "--data", data, "--run", run, "--no-progress"], cwd=cwd, env=env).stdout
    assert "image AUROC" in out and (run / "metrics.json").is_file()


def test_import_names_the_torch_it_needs():
    from rlr_fast import TORCH_MIN, _check_torch

    assert TORCH_MIN == (2, 4)
    _check_torch("2.14.1+cpu")  # compared as numbers: 2.14 is newer than 2.4
    _check_torch("2.4.0")
    with pytest.raises(ImportError, match=r"needs torch >= 2\.4, found torch 2\.3\.1"):
        _check_torch("2.3.1")


def test_package_works_without_triton():
    # `import triton` fails as on a machine without it; everything but `rlr-fast kernels` works.
    code = """
import sys
sys.modules["triton"] = None
import torch
import rlr_fast, rlr_fast.models, rlr_fast.commands
from rlr_fast import local_cross_attention, neighbor_masked_attention
from rlr_fast.cli import main
q, k, v = torch.randn(1, 2, 64, 8), torch.randn(2, 64, 8), torch.randn(1, 2, 64, 8)
for op in (local_cross_attention, neighbor_masked_attention):
    ref = op(q, k, v, grid=(8, 8), window=3, backend="dense")
    assert (op(q, k, v, grid=(8, 8), window=3, backend="torch") - ref).abs().max() < 1e-5
assert main(["kernels"]) == 2
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
    assert "`rlr-fast kernels` is unavailable here" in result.stderr
