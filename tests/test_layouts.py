"""The data layouts users' data comes in (issue 19, part 3): Folder, VisA as published, MVTec AD 2
and MVTec LOCO AD, each read into the same items as MVTec AD.

Every tree is made from one tiny MVTec AD tree (the demo generator's), so the MVTec reader of
the source is the independent reference: each test image of a converted tree must come back with
its source's label and mask (LOCO's split into two mask files, VisA's stored with value 1).
"""
import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from rlr_fast.cli import main
from rlr_fast.data import MVTecDataset, load_image
from rlr_fast.errors import DataError
from rlr_fast.layouts import FolderLayout, detect
from rlr_fast.metrics import class_metrics
from rlr_fast.models.base import AnomalyOutput

from helpers import CLASSES, build_tree, make_parent

LAYOUTS = ("mvtec", "folder", "visa", "mvtec-ad2", "mvtec-loco")


@pytest.fixture(scope="module")
def src(data):
    assert tuple(sorted(p.name for p in data.iterdir() if p.is_dir())) == CLASSES
    return data


@pytest.fixture(scope="module")
def trees(src, tmp_path_factory):
    base = tmp_path_factory.mktemp("trees")
    return {name: build_tree(src, name, base / name.replace("-", "_")) for name in LAYOUTS}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_is_detected_and_gives_its_sources_labels_and_masks(src, trees, layout):
    root, source = trees[layout]
    assert detect(root) == layout
    test = MVTecDataset(root, split="test", image_size=64)
    reference = MVTecDataset(src, split="test", image_size=64, layout="mvtec")
    by_path = {s[0]: i for i, s in enumerate(reference.samples)}
    assert test.classes == (["folder"] if layout == "folder" else list(CLASSES))
    covered = set()
    for i, (path, _, label, cls, defect) in enumerate(test.samples):
        if path not in source:  # the folder layout: a normal image of the training folder held out for the test
            assert layout == "folder" and label == 0 and path.parent.name == "normal"
            continue
        covered.add(source[path])
        ref = reference[by_path[source[path]]]
        item = test[i]
        assert item["label"] == ref["label"] == label
        assert torch.equal(item["mask"], ref["mask"]), path
        assert (defect == "good") == (label == 0)
        if layout != "visa":  # VisA's images are JPEGs
            assert torch.equal(item["image"], ref["image"])
    anomalous = {s for p, s in source.items() if "good" not in s.parent.name}
    assert anomalous and anomalous <= covered
    if layout != "folder":
        assert covered == set(source.values())
    train = MVTecDataset(root, split="train", image_size=64)
    assert {s[4] for s in train.samples} == {"good"} and not {s[0] for s in train.samples} & {s[0] for s in test.samples}


def test_folder_layout_splits_normals_by_ratio_and_seed(trees, tmp_path):
    root, _ = trees["folder"]
    normals = sorted(p.name for p in (root / "normal").iterdir())
    for seed in (0, 1):
        layout = FolderLayout(root, split_ratio=0.5, seed=seed)
        train, test = layout.train("folder"), [s.path for s in layout.test("folder") if s.label == 0]
        assert len(test) == round(0.5 * len(normals)) and not set(train) & set(test)
        assert sorted(p.name for p in train + test) == normals
        assert layout.train("folder") == train  # the same split every time
    assert FolderLayout(root, seed=0).train("x") != FolderLayout(root, split_ratio=0.5, seed=0).train("x")
    copy = tmp_path / "own"
    shutil.copytree(root, copy)
    shutil.move(str(copy / "normal" / "test_000.png"), make_parent(copy / "normal_test" / "a.png"))
    layout = FolderLayout(copy)
    assert [s.path.name for s in layout.test("own") if s.label == 0] == ["a.png"]
    assert len(layout.train("own")) == len(normals) - 1  # given test normals: no split


def test_loco_masks_are_the_union_and_metrics_are_per_anomaly_type(trees):
    from rlr_fast.evaluation import evaluate

    root, _ = trees["mvtec-loco"]

    class Mean(torch.nn.Module):  # a stand-in model: the map is the image's brightness
        image_size = 64

        def forward(self, images):
            maps = images.mean(1, keepdim=True)
            return AnomalyOutput(maps, maps.flatten(1).amax(1))

    summary = evaluate(Mean(), root, progress=False)
    data = MVTecDataset(root, split="test", image_size=64)
    for cls in CLASSES:
        assert set(summary["types"][cls]) == {"logical_anomalies", "structural_anomalies"}
        for kind in ("logical_anomalies", "structural_anomalies"):
            items = [data[i] for i, s in enumerate(data.samples) if s[3] == cls and s[4] in ("good", kind)]
            maps = [it["image"].mean(0).numpy() for it in items]
            expected = class_metrics([it["label"] for it in items], [m.max() for m in maps],
                                     [it["mask"][0].numpy() > 0.5 for it in items], maps)
            for metric, value in expected.items():
                assert summary["types"][cls][kind][metric] == pytest.approx(value, abs=1e-6)


def _error(capsys, argv, *expected):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for text in expected:
        assert text in err, err


def test_a_missing_file_or_an_unreadable_csv_row_is_one_line_naming_it(trees, tmp_path, capsys):
    def broken(layout):
        copy = tmp_path / layout
        shutil.copytree(trees[layout][0], copy)
        return copy

    visa = broken("visa")
    table = (visa / "split_csv" / "1cls.csv").read_text().splitlines()
    table[2] = table[2].replace(",train,normal,", ",train,maybe,")
    (visa / "split_csv" / "1cls.csv").write_text("\n".join(table) + "\n")
    with pytest.raises(DataError, match=r"1cls.csv line 3: unreadable row .*label 'maybe'"):
        MVTecDataset(visa, split="train", image_size=64)
    table[2] = table[2].replace(",train,maybe,", ",train,normal,")
    anomaly = next(i for i, r in enumerate(table) if ",anomaly," in r)
    mask = table[anomaly].rsplit(",", 1)[1]
    (visa / mask).unlink()
    (visa / "split_csv" / "1cls.csv").write_text("\n".join(table) + "\n")
    with pytest.raises(DataError, match=f"line {anomaly + 1}: mask file of .* not found: .*{Path(mask).name}"):
        MVTecDataset(visa, split="test", image_size=64)
    (visa / "split_csv" / "1cls.csv").write_text("object,split,image\n")
    with pytest.raises(DataError, match="lacks the column"):
        MVTecDataset(visa, split="test", image_size=64)

    loco = broken("mvtec-loco")
    gt = next((loco / "brick" / "ground_truth" / "logical_anomalies").iterdir())
    shutil.rmtree(gt)
    with pytest.raises(DataError, match=f"has no ground-truth masks; expected a folder of them: {gt}"):
        MVTecDataset(loco, split="test", image_size=64)

    ad2 = broken("mvtec-ad2")
    mask = next((ad2 / "gravel" / "test_public" / "ground_truth" / "bad").iterdir())
    mask.unlink()
    with pytest.raises(DataError, match=f"expected {mask}"):
        MVTecDataset(ad2, split="test", image_size=64)

    folder = broken("folder")
    mask = next((folder / "mask").rglob("*.png"))
    mask.unlink()
    with pytest.raises(DataError, match=f"has no mask in {folder / 'mask'}"):
        MVTecDataset(folder, split="test", image_size=64)
    # the command line: one line, before any model is loaded
    model_run = tmp_path / "run"
    _error(capsys, ["train", "--data", str(folder), "--out", str(model_run), "--layout", "visa"],
           "VisA split file not found", "1cls.csv")


def _train_test(root, layout, run, model, capsys, *extra):
    common = ["--image-size", "64", "--backbone-weights", "random", "--batch-size", "4", "--no-progress", "--epochs",
              "1", "--model", model, "--layout", layout, *extra]
    assert main(["train", "--data", str(root), "--out", str(run), *common]) == 0
    test_extra = ["--shots", "2", "--shot-seed", "1"] if model == "resad" else []
    assert main(["test", "--data", str(root), "--run", str(run), "--layout", layout, "--no-progress",
                 *test_extra]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("layout", LAYOUTS)
def test_train_and_test_on_each_layout(trees, tmp_path, capsys, layout):
    root, _ = trees[layout]
    out = _train_test(root, layout, tmp_path / "run", "rlr", capsys)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    classes = ["folder"] if layout == "folder" else list(CLASSES)
    assert list(metrics["classes"]) == classes and "image AUROC" in out
    assert all(0 <= metrics["classes"][c]["image_auroc"] <= 1 for c in classes)
    if layout == "mvtec-loco":
        assert set(metrics["types"]["brick"]) == {"logical_anomalies", "structural_anomalies"}
        assert "  logical_anomalies" in out
    # predict on the layout's test images (--data), deciding with the thresholds just fitted
    pred = tmp_path / "pred"
    assert main(["predict", "--run", str(tmp_path / "run"), "--data", str(root), "--layout", layout, "--out",
                 str(pred), "--no-heatmaps", "--no-progress"]) == 0
    with open(pred / "scores.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(MVTecDataset(root, split="test", image_size=64))
    assert all(r["label"] in ("normal", "anomalous") for r in rows)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_resad_references_and_shots_work_with_each_layout(trees, tmp_path, capsys, layout):
    root, _ = trees[layout]
    run = tmp_path / "run"
    out = _train_test(root, layout, run, "resad", capsys, "--shots", "2")
    reader = MVTecDataset(root, split="train", image_size=64).layout
    cls = reader.classes()[0]
    from rlr_fast.fewshot import reference_paths

    chosen = reference_paths(None, 2, 1, paths=reader.train(cls))  # what --shots 2 --shot-seed 1 draws
    assert f"{cls}: 2 reference images ({', '.join(p.name for p in chosen)})" in out
    assert len(set(chosen) & set(reader.train(cls))) == 2
    # predict: each class's references from --data, or a folder given with --reference
    for name, extra in (("data", ["--data", str(root), "--layout", layout, "--shots", "2"]),
                        ("reference", [str(chosen[0].parent), "--reference", str(chosen[0].parent), "--shots", "3"])):
        pred = tmp_path / name
        assert main(["predict", "--run", str(run), *extra, "--out", str(pred), "--no-heatmaps",
                     "--no-progress"]) == 0
        assert (pred / "scores.csv").is_file()
    # the references are the model's input: with --data they are the class's, so the scores
    # are those of the model with that class's references set
    from rlr_fast.fewshot import class_references, load_references
    from rlr_fast.training import load_model

    model = load_model(run)
    model.set_reference(load_references(class_references(root, cls, 2, None, layout=layout), 64))
    with open(tmp_path / "data" / "scores.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh)]
    first = next(r for r in rows if Path(r["path"]) in {s[0] for s in MVTecDataset(root, classes=[cls], split="test",
                                                                                   image_size=64).samples})
    with torch.no_grad():
        score = float(model(load_image(first["path"], 64)[None]).score[0])
    assert float(first["score"]) == pytest.approx(score, rel=1e-4)
