"""The accuracy benchmark's data set (rlr_fast.demo_data.build_benchmark_dataset) and its new
defect kinds: deterministic, exact masks, the MVTec layout that rlr_fast.data reads."""
import numpy as np
import pytest
from PIL import Image

from rlr_fast.data import MVTecDataset
from rlr_fast.demo_data import (BENCHMARK_CLASSES, BENCHMARK_DEFECTS, BENCHMARK_PHOTOS, DEFECTS, add_defect,
                                build_benchmark_dataset)

NEW_KINDS = [k for k in BENCHMARK_DEFECTS if k not in DEFECTS]


def _read(path):
    return np.asarray(Image.open(path))


def test_kinds_and_default_classes():
    assert DEFECTS == ("scratch", "stain", "cut", "hole")  # the demo cycles through exactly these
    assert BENCHMARK_DEFECTS[:4] == DEFECTS and {"perlin", "foreign", "blur", "tint"} <= set(NEW_KINDS)
    assert len(BENCHMARK_CLASSES) >= 8 and set(BENCHMARK_CLASSES) <= set(BENCHMARK_PHOTOS)
    assert len(BENCHMARK_PHOTOS) == 15


def test_build_is_deterministic_and_reused(tmp_path):
    kw = dict(classes=("gravel", "coffee"), image_size=48, n_train=2, n_test_good=1, n_test_defect=8)
    a = build_benchmark_dataset(tmp_path / "a", **kw)
    b = build_benchmark_dataset(tmp_path / "b", **kw)
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.png"))
    assert len(files) == 2 * (2 + 1 + 8 + 8)
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    stamp = (a / "manifest.json").stat().st_mtime_ns
    build_benchmark_dataset(tmp_path / "a", **kw)  # same parameters: reused, not rebuilt
    assert (a / "manifest.json").stat().st_mtime_ns == stamp
    # another seed gives other images; a class does not depend on the other classes built
    c = build_benchmark_dataset(tmp_path / "c", **{**kw, "seed": 1})
    assert (c / "gravel/train/good/000.png").read_bytes() != (a / "gravel/train/good/000.png").read_bytes()
    d = build_benchmark_dataset(tmp_path / "d", **{**kw, "classes": ("coffee",)})
    assert (d / "coffee/test/blur/006.png").read_bytes() == (a / "coffee/test/blur/006.png").read_bytes()
    assert not (d / "gravel").exists()
    e = build_benchmark_dataset(tmp_path / "e", **{**kw, "n_train": 1, "n_test_defect": 4})  # fewer: a prefix
    assert sorted(p.relative_to(e) for p in e.rglob("*.png")) == [
        f for f in files if int(f.stem[:3]) < (1 if f.parts[1] == "train" else 4)]  # test/good has 1 anyway
    for f in sorted(p.relative_to(e) for p in e.rglob("*.png")):
        assert (e / f).read_bytes() == (a / f).read_bytes(), f


@pytest.mark.parametrize("cls", ["grass", "coins", "chelsea"])  # a texture, a grayscale and a colour object
@pytest.mark.parametrize("kind", NEW_KINDS)
def test_new_defects_change_exactly_their_mask(tmp_path_factory, cls, kind):
    root = tmp_path_factory.getbasetemp() / "clean"
    if not (root / "manifest.json").is_file():
        build_benchmark_dataset(root, classes=("grass", "coins", "chelsea", "retina"), image_size=128, n_train=4,
                                n_test_good=0, n_test_defect=0)
    others = [_read(root / c / "train" / "good" / "000.png").astype(np.float32) / 255
              for c in ("grass", "coins", "chelsea", "retina") if c != cls]
    for i in range(4):
        clean = _read(root / cls / "train" / "good" / f"{i:03d}.png").astype(np.float32) / 255  # (H, W, 3)
        img, mask = add_defect(clean, np.random.default_rng([7, i]), others, kind)
        assert img.shape == clean.shape and mask.shape == clean.shape[:2] and mask.dtype == bool
        assert 0.003 < mask.mean() < 0.15, (kind, i, mask.mean())  # visible, of a realistic size
        # what a saved PNG shows: the 8-bit image differs from the clean one only inside the mask ...
        changed = (np.round(img * 255) != np.round(clean * 255)).any(axis=2)
        assert not (changed & ~mask).any(), (kind, i)
        # ... and almost everywhere inside it (a blur leaves flat pixels as they were)
        assert changed[mask].mean() > (0.5 if kind == "blur" else 0.9), (kind, i, changed[mask].mean())


def test_add_defect_draws_from_the_kinds_given(tmp_path):
    rng = np.random.default_rng(0)
    clean, other = rng.random((2, 64, 64, 3), dtype=np.float32)
    for seed in range(6):
        img, mask = add_defect(clean, np.random.default_rng(seed), [other], kinds=("foreign",))
        expected_rng = np.random.default_rng(seed)
        expected_rng.integers(0, 1)  # the draw of the kind, from a list of one
        ref_img, ref_mask = add_defect(clean, expected_rng, [other], "foreign")
        assert np.array_equal(mask, ref_mask) and np.array_equal(img, ref_img)
    with pytest.raises(ValueError, match="unknown defect kind 'dent'"):
        add_defect(clean, rng, [other], "dent")
    with pytest.raises(ValueError, match="'perlin' defect needs at least one other image"):
        add_defect(clean, rng, [], "perlin")


def test_chosen_defect_kinds_and_bad_arguments(tmp_path):
    root = build_benchmark_dataset(tmp_path / "d", classes=("rocket",), image_size=32, n_train=1, n_test_good=1,
                                   n_test_defect=4, defects=("blur", "tint"))
    assert sorted(p.name for p in (root / "rocket" / "test").iterdir()) == ["blur", "good", "tint"]
    assert len(list((root / "rocket" / "test" / "tint").glob("*.png"))) == 2
    with pytest.raises(ValueError, match="unknown benchmark class 'bottle'"):
        build_benchmark_dataset(tmp_path / "e", classes=("bottle",))
    with pytest.raises(ValueError, match="unknown defect kind 'dent'"):
        build_benchmark_dataset(tmp_path / "e", classes=("rocket",), defects=("dent",))
    with pytest.raises(ValueError, match="at least 32"):
        build_benchmark_dataset(tmp_path / "e", classes=("rocket",), image_size=16)


def test_every_class_builds_small_and_loads_as_mvtec(tmp_path):
    n_defect = len(BENCHMARK_DEFECTS)
    root = build_benchmark_dataset(tmp_path / "all", classes=BENCHMARK_PHOTOS, image_size=32, n_train=2,
                                   n_test_good=1, n_test_defect=n_defect)
    train = MVTecDataset(root, split="train", image_size=32)
    assert train.classes == sorted(BENCHMARK_PHOTOS) and len(train) == 2 * len(BENCHMARK_PHOTOS)
    test = MVTecDataset(root, classes=["coins", "text"], split="test", image_size=32)
    items = [test[i] for i in range(len(test))]
    assert len(items) == 2 * (1 + n_defect)
    defects = [it for it in items if it["label"] == 1]
    assert sorted({it["defect"] for it in defects}) == sorted(BENCHMARK_DEFECTS)
    assert all(it["mask"].sum() > 0 for it in defects)
    assert all(it["mask"].sum() == 0 for it in items if it["label"] == 0)
    for cls in BENCHMARK_PHOTOS:
        for kind in BENCHMARK_DEFECTS:
            (mask_path,) = (root / cls / "ground_truth" / kind).glob("*_mask.png")
            mask = _read(mask_path)
            assert set(np.unique(mask)) == {0, 255}, (cls, kind)
        img = _read(root / cls / "train" / "good" / "000.png")
        assert img.shape == (32, 32, 3) and img.std() > 5, cls  # a picture, not a flat field
