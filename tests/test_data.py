"""Data loading: the MVTec layout, plain folders, and clear errors for bad folders."""
import numpy as np
import pytest
import torch
from PIL import Image

from rlr_fast.data import (IMAGENET_MEAN, IMAGENET_STD, DataError, FolderDataset, MVTecDataset, denormalize,
                           discover_classes, load_image)
from rlr_fast.demo_data import DEFECTS, build_demo_dataset


def _png(path, size=(20, 20), value=128, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((size[1], size[0], 3) if mode == "RGB" else (size[1], size[0]), value, np.uint8)
    Image.fromarray(arr).save(path)
    return path


def _mvtec(root, cls="bottle"):
    _png(root / cls / "train" / "good" / "000.png")
    _png(root / cls / "train" / "good" / "001.png")
    _png(root / cls / "test" / "good" / "000.png")
    _png(root / cls / "test" / "crack" / "000.png")
    mask = np.zeros((20, 20), np.uint8)
    mask[5:10, 5:10] = 255
    (root / cls / "ground_truth" / "crack").mkdir(parents=True)
    Image.fromarray(mask).save(root / cls / "ground_truth" / "crack" / "000_mask.png")
    return root


def test_image_normalisation_and_round_trip(tmp_path):
    path = _png(tmp_path / "a.png", value=200)
    x = load_image(path, 16)
    assert x.shape == (3, 16, 16)
    expected = (200 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(x[:, 0, 0], expected)
    assert (denormalize(x) == 200).all()
    gray = load_image(_png(tmp_path / "g.png", mode="L", value=50), 8)  # grayscale -> RGB
    assert gray.shape == (3, 8, 8)


def test_mvtec_dataset(tmp_path):
    root = _mvtec(tmp_path)
    _mvtec(tmp_path, "cable")
    assert discover_classes(root) == ["bottle", "cable"]
    train = MVTecDataset(root, split="train", image_size=16)
    assert len(train) == 4 and train.classes == ["bottle", "cable"]
    test = MVTecDataset(root, classes="cable", split="test", image_size=10)
    items = [test[i] for i in range(len(test))]
    defect = next(it for it in items if it["label"] == 1)
    assert defect["defect"] == "crack" and defect["cls"] == "cable"
    assert defect["mask"].shape == (1, 10, 10)
    # rows/cols 5..9 of 20, halved with nearest neighbour (PIL samples 1, 3, 5, ...): 3 x 3 pixels
    assert defect["mask"].sum() == 9
    good = next(it for it in items if it["label"] == 0)
    assert good["mask"].sum() == 0


def test_mask_of_another_size_is_resized(tmp_path):
    root = _mvtec(tmp_path)
    mask = np.zeros((40, 40), np.uint8)  # twice the image's size
    mask[10:20, 10:20] = 255
    Image.fromarray(mask).save(root / "bottle" / "ground_truth" / "crack" / "000_mask.png")
    item = [it for it in MVTecDataset(root, split="test", image_size=20) if it["label"] == 1][0]
    assert item["mask"].sum() == 25


def test_folder_dataset(tmp_path):
    _png(tmp_path / "imgs" / "b.jpg")
    _png(tmp_path / "imgs" / "a.png")
    (tmp_path / "imgs" / "notes.txt").write_text("x")
    ds = FolderDataset(tmp_path / "imgs", image_size=8)
    assert [p.name for p in ds.paths] == ["a.png", "b.jpg"]
    assert ds[0]["image"].shape == (3, 8, 8)


@pytest.mark.parametrize("breakage,pattern", [
    (lambda r: r / "missing", "data folder not found"),
    (lambda r: ((r / "bottle" / "train" / "good" / "000.png").write_bytes(b"not a png"), r)[1],
     "000.png"),
    (lambda r: [p.unlink() for p in (r / "bottle" / "train" / "good").iterdir()] and r,
     "class 'bottle' has no training images"),
])
def test_bad_train_folders(tmp_path, breakage, pattern):
    root = breakage(_mvtec(tmp_path))
    with pytest.raises(DataError, match=pattern):
        ds = MVTecDataset(root, split="train", image_size=8)
        [ds[i] for i in range(len(ds))]


def test_bad_test_folders_and_classes(tmp_path):
    root = _mvtec(tmp_path)
    with pytest.raises(DataError, match="unknown class.*nope.*available: bottle"):
        MVTecDataset(root, classes=["nope"], split="train")
    (root / "bottle" / "ground_truth" / "crack" / "000_mask.png").unlink()
    with pytest.raises(DataError, match=r"000.png has no ground-truth mask; expected .*crack.000_mask.png"):
        MVTecDataset(root, split="test")
    with pytest.raises(DataError, match="no such image file or folder"):
        FolderDataset(tmp_path / "nothing")


def test_demo_dataset_is_deterministic_with_exact_masks(tmp_path):
    kw = dict(classes=("grass",), image_size=48, n_train=2, n_test_good=1, n_test_defect=4)
    a = build_demo_dataset(tmp_path / "a", **kw)
    b = build_demo_dataset(tmp_path / "b", **kw)
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.png"))
    assert len(files) == 2 + 1 + 4 + 4
    for f in files:
        assert np.array_equal(np.asarray(Image.open(a / f)), np.asarray(Image.open(b / f))), f
    for kind in DEFECTS:
        (img,) = (a / "grass" / "test" / kind).glob("*.png")
        mask = np.asarray(Image.open(a / "grass" / "ground_truth" / kind / f"{img.stem}_mask.png")) > 0
        assert 0.002 < mask.mean() < 0.1, kind  # a visible defect of realistic size
        assert set(np.unique(np.asarray(Image.open(a / "grass" / "ground_truth" / kind / f"{img.stem}_mask.png")))) \
            <= {0, 255}
    stamp = (a / "manifest.json").stat().st_mtime_ns
    build_demo_dataset(tmp_path / "a", **kw)  # same parameters: reused, not rebuilt
    assert (a / "manifest.json").stat().st_mtime_ns == stamp
