"""Helpers shared by several test files (imported as ``from helpers import ...``; pytest puts
tests/ on the path): the error rule for low-precision paths, the nearest_reference oracles, and
the data-layout trees made from one MVTec AD tree, and the benchmark scripts as modules."""
import csv
import importlib.util
import math
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image


# ---------------------------------------------------------------------------- low precision
def low_precision_errors(oracle, low_ref, got, dtype):
    """Max absolute errors against the fp64 `oracle` of `low_ref` (the dense reference computed in
    `dtype`) and of `got` (the path under test, in `dtype`), and the slack the rule allows: one
    unit in the last place of `dtype` at the oracle's largest magnitude."""
    oracle = oracle.double()
    ref_err = (low_ref.double() - oracle).abs().max().item()
    got_err = (got.double() - oracle).abs().max().item()
    ulp = torch.finfo(dtype).eps * max(oracle.abs().max().item(), 1e-30)
    return ref_err, got_err, ulp


def assert_within_flash_rule(name, oracle, low_ref, got, dtype):
    """FlashAttention's rule for a path in a 16-bit `dtype`: its error against the fp64 oracle is
    at most twice that of the dense reference computed in the same dtype, plus one ulp of the
    dtype at the oracle's scale (an absolute slack would let a path 10x worse than the
    reference pass when the reference is accurate)."""
    assert got.dtype == dtype and got.shape == oracle.shape, f"{name}: {got.dtype} {tuple(got.shape)}"
    ref_err, got_err, ulp = low_precision_errors(oracle, low_ref, got, dtype)
    assert got_err <= 2 * ref_err + ulp, (f"{name}: error {got_err:.3g} against fp64, the {dtype} reference's "
                                          f"{ref_err:.3g} (bound {2 * ref_err + ulp:.3g})")


# ---------------------------------------------------------------------------- nearest_reference
def brute_force(x, ref):
    """Loops over tokens in float64 with Python's max: first index among equals."""
    b, n, _ = x.shape
    index = torch.empty(b, n, dtype=torch.int64)
    sim = torch.empty(b, n, dtype=torch.float64)
    for i in range(b):
        r = ref if ref.dim() == 2 else ref[i]
        for t in range(n):
            best, arg = -math.inf, 0
            for j in range(r.shape[0]):
                u, w = x[i, t].double(), r[j].double()
                c = float(u @ w) / (max(float(u.norm()), 1e-12) * max(float(w.norm()), 1e-12))
                if c > best:
                    best, arg = c, j
            index[i, t], sim[i, t] = arg, best
    return index, sim


def agree(x, ref, index, sim, oracle_index, oracle_sim, atol):
    """Indices equal, except where two reference tokens are within rounding of each other."""
    assert index.dtype == torch.int64 and index.shape == x.shape[:2]
    torch.testing.assert_close(sim.double(), oracle_sim.double(), atol=atol, rtol=0)
    differ = index != oracle_index
    if differ.any():  # a near-tie: the chosen token's true similarity must equal the best one's
        xn = torch.nn.functional.normalize(x.double(), dim=-1)
        rn = torch.nn.functional.normalize(ref.double(), dim=-1)
        r = rn.expand(x.shape[0], *rn.shape[-2:])
        chosen = torch.einsum("bnc,bnc->bn", xn, r.gather(1, index[..., None].expand(-1, -1, x.shape[-1])))
        torch.testing.assert_close(chosen[differ], oracle_sim.double()[differ], atol=atol, rtol=0)
        assert differ.float().mean() < 0.01


def cdist_oracle(x, ref):
    """torch.cdist in float64 with the explicit (x - r)^2 sum (no matrix-product expansion)."""
    r = ref.double().expand(x.shape[0], *ref.shape[-2:])
    dist = torch.cdist(x.double(), r, compute_mode="donot_use_mm_for_euclid_dist")  # (B, N, M)
    best, index = dist.min(dim=-1)  # the first minimum
    return index, best, dist


def agree_l2(x, ref, index, dist, atol):
    """Distances equal to the oracle's; indices too, except where two rows are within rounding
    of the same distance (then the chosen row's true distance must be the smallest one)."""
    oracle_index, oracle_dist, all_dist = cdist_oracle(x, ref)
    assert index.dtype == torch.int64 and index.shape == x.shape[:2]
    torch.testing.assert_close(dist.double(), oracle_dist, atol=atol, rtol=1e-5)
    differ = index != oracle_index
    if differ.any():
        chosen = all_dist.gather(-1, index.unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(chosen[differ], oracle_dist[differ], atol=atol, rtol=1e-5)
        assert differ.float().mean() < 0.01


# ---------------------------------------------------------------------------- data layouts
CLASSES = ("brick", "gravel")  # the classes of the source tree build_tree converts


def copy_file(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst


def mask_array(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L")) >= 128


def save_mask(array: np.ndarray, path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((array * value).astype(np.uint8)).save(path)


def source_tests(src: Path, cls: str):
    """(image, defect, mask or None) of a source class's test split, sorted."""
    out = []
    for folder in sorted((src / cls / "test").iterdir()):
        for image in sorted(folder.glob("*.png")):
            mask = None if folder.name == "good" else src / cls / "ground_truth" / folder.name / f"{image.stem}_mask.png"
            out.append((image, folder.name, mask))
    return out


def build_tree(src: Path, layout: str, root: Path):
    """`src` (MVTec AD, CLASSES) rewritten in `layout` under `root`; returns (root, source of each
    converted test image: converted path -> source path)."""
    source = {}
    if layout == "mvtec":
        shutil.copytree(src, root)
        return root, {root / p.relative_to(src): p for c in CLASSES for p, _, _ in source_tests(src, c)}
    if layout == "folder":  # one class: brick
        cls = "brick"
        for image in sorted((src / cls / "train" / "good").glob("*.png")):
            copy_file(image, root / "normal" / f"train_{image.name}")
        for image, defect, mask in source_tests(src, cls):
            if defect == "good":
                source[copy_file(image, root / "normal" / f"test_{image.name}")] = image
            else:
                source[copy_file(image, root / defect / image.name)] = image
                copy_file(mask, root / "mask" / defect / f"{image.stem}_mask.png")
        return root, source
    rows = []
    for cls in CLASSES:
        for image in sorted((src / cls / "train" / "good").glob("*.png")):
            if layout == "visa":
                rel = Path(cls) / "Data" / "Images" / "Normal" / f"t{image.stem}.JPG"
                Image.open(image).convert("RGB").save(make_parent(root / rel), "JPEG", quality=95)
                rows.append([cls, "train", "normal", rel.as_posix(), ""])
            else:
                copy_file(image, root / cls / "train" / "good" / image.name)
        if layout != "visa":
            copy_file(next((src / cls / "train" / "good").glob("*.png")), root / cls / "validation" / "good" / "000.png")
        tests = source_tests(src, cls)
        for n, (image, defect, mask) in enumerate(tests):
            if layout == "visa":
                kind = "Normal" if defect == "good" else "Anomaly"
                rel = Path(cls) / "Data" / "Images" / kind / f"{image.stem}.JPG"
                Image.open(image).convert("RGB").save(make_parent(root / rel), "JPEG", quality=95)
                mask_rel = ""
                if mask is not None:
                    mask_rel = (Path(cls) / "Data" / "Masks" / "Anomaly" / f"{image.stem}.png").as_posix()
                    save_mask(mask_array(mask), root / mask_rel, 1)  # VisA's masks: any non-zero value
                rows.append([cls, "test", "normal" if mask is None else "anomaly", rel.as_posix(), mask_rel])
                source[root / rel] = image
            elif layout == "mvtec-ad2":
                where = "good" if defect == "good" else "bad"
                source[copy_file(image, root / cls / "test_public" / where / image.name)] = image
                if mask is not None:
                    copy_file(mask, root / cls / "test_public" / "ground_truth" / "bad" / f"{image.stem}_mask.png")
            else:  # mvtec-loco: defects alternate between the two types; each mask split in two files
                kind = "good" if defect == "good" else ("logical_anomalies" if n % 2 else "structural_anomalies")
                source[copy_file(image, root / cls / "test" / kind / image.name)] = image
                if mask is not None:
                    m = mask_array(mask)
                    half = np.zeros_like(m)
                    half[: m.shape[0] // 2] = True
                    save_mask(m & half, root / cls / "ground_truth" / kind / image.stem / "000.png", 255)
                    save_mask(m & ~half, root / cls / "ground_truth" / kind / image.stem / "001.png", 255)
    if layout == "visa":
        with open(make_parent(root / "split_csv" / "1cls.csv"), "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["object", "split", "label", "image", "mask"])
            writer.writerows(rows)
    return root, source


def make_parent(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------------------- benchmark scripts

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(name: str):
    """benchmarks/<name>.py as a module (the scripts are not a package), e.g. load_script("accuracy")."""
    spec = importlib.util.spec_from_file_location(f"benchmark_script_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
