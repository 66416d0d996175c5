"""The command line end to end on a tiny generated data set: train, resume, test, predict."""
import csv
import json
import subprocess
import sys

import pytest

from rlr_fast.cli import main
from rlr_fast.demo_data import build_demo_dataset


def test_train_resume_test_predict(data, tmp_path, capsys):
    run = tmp_path / "run"
    common = ["--data", str(data), "--out", str(run), "--image-size", "64", "--backbone-weights", "random",
              "--batch-size", "4", "--no-progress"]
    assert main(["train", *common, "--epochs", "1"]) == 0
    assert main(["train", *common, "--epochs", "2", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "resuming" in out and "8 images of 2 classes (brick, gravel)" in out
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]

    assert main(["test", "--data", str(data), "--run", str(run), "--no-progress"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["classes"]) == {"brick", "gravel"}
    for values in [*metrics["classes"].values(), metrics["mean"]]:
        assert set(values) == {"image_auroc", "pixel_auroc", "pixel_aupro", "image_f1max"}
    for key in ("image_auroc", "pixel_auroc"):
        assert metrics["mean"][key] == pytest.approx(sum(m[key] for m in metrics["classes"].values()) / 2)
    assert len(list((run / "overlays" / "brick").glob("*.png"))) == 6
    table = capsys.readouterr().out
    assert "image AUROC" in table and "mean" in table
    # the image AUROC that `test` reports is sklearn's on the scores `predict` gives the same images
    from sklearn.metrics import roc_auc_score

    assert main(["predict", "--run", str(run), "--data", str(data), "--out", str(tmp_path / "all"),
                 "--no-heatmaps"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "all" / "scores.csv")))
    assert len(rows) == 12
    for cls in ("brick", "gravel"):
        mine = [r for r in rows if f"/{cls}/" in r["path"].replace("\\", "/")]
        truth = [0 if "/good/" in r["path"].replace("\\", "/") else 1 for r in mine]
        assert sorted(truth) == [0, 0, 1, 1, 1, 1]
        auroc = roc_auc_score(truth, [float(r["score"]) for r in mine])
        assert metrics["classes"][cls]["image_auroc"] == pytest.approx(auroc, abs=1e-9)

    assert main(["predict", "--run", str(run), str(data / "brick" / "test" / "good"), "--out",
                 str(tmp_path / "pred")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "pred" / "scores.csv")))
    assert len(rows) == 2 and all(float(r["score"]) >= 0 for r in rows)
    assert len(list((tmp_path / "pred").glob("*_heatmap.png"))) == 2


def test_bad_data_folder_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "cls" / "train" / "good").mkdir(parents=True)
    code = main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--backbone-weights", "random"])
    assert code == 2
    assert "class 'cls' has no training images" in capsys.readouterr().err


def test_module_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "rlr_fast", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("train", "test", "predict", "demo", "kernels"):
        assert command in result.stdout


@pytest.fixture(scope="module")
def unseen(tmp_path_factory):
    return build_demo_dataset(tmp_path_factory.mktemp("unseen"), classes=("grass",), image_size=64, n_train=4,
                              n_test_good=2, n_test_defect=4)


def test_recipe_paper_trains_the_papers_network(data, tmp_path, capsys):
    common = ["--data", str(data), "--image-size", "64", "--backbone-weights", "random", "--batch-size", "4",
              "--epochs", "1", "--no-progress", "--val-fraction", "0"]
    assert main(["train", *common, "--out", str(tmp_path / "paper"), "--recipe", "paper"]) == 0
    config = json.loads((tmp_path / "paper" / "config.json").read_text())["config"]
    assert (config["num_layers"], config["dims"], config["feature_norm"]) == (4, [256, 512], "none")
    # an explicit --feature-norm still wins over the recipe's
    assert main(["train", *common, "--out", str(tmp_path / "mixed"), "--recipe", "paper",
                 "--feature-norm", "channel"]) == 0
    config = json.loads((tmp_path / "mixed" / "config.json").read_text())["config"]
    assert (config["num_layers"], config["feature_norm"]) == (4, "channel")
    assert main(["train", *common, "--out", str(tmp_path / "fast")]) == 0
    config = json.loads((tmp_path / "fast" / "config.json").read_text())
    assert (config["config"]["num_layers"], config["config"]["dims"]) == (2, [128, 256])


def test_resad_train_resume_test_predict(data, unseen, tmp_path, capsys):
    """ResAD trains on brick and gravel, then inspects grass from 2 of its normal images."""
    run = tmp_path / "run"
    common = ["--model", "resad", "--data", str(data), "--out", str(run), "--image-size", "64",
              "--backbone-weights", "random", "--batch-size", "4", "--shots", "2", "--no-progress"]
    assert main(["train", *common, "--epochs", "1"]) == 0
    assert main(["train", *common, "--epochs", "2", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "resuming" in out
    assert "brick: 4 normal images, 2 references redrawn per batch, 4 with a synthetic defect" in out

    assert main(["test", "--data", str(unseen), "--run", str(run), "--shots", "2", "--shot-seed", "5",
                 "--json", str(tmp_path / "m.json"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "grass: 2 reference images" in out
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert set(metrics["classes"]) == {"grass"}
    assert set(metrics["mean"]) == {"image_auroc", "pixel_auroc", "pixel_aupro", "image_f1max"}
    assert metrics["mean"] == pytest.approx(metrics["classes"]["grass"])  # one class: its mean is itself

    images = str(unseen / "grass" / "test" / "good")
    assert main(["predict", "--run", str(run), images, "--reference", str(unseen / "grass" / "train" / "good"),
                 "--out", str(tmp_path / "pred"), "--no-heatmaps"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "pred" / "scores.csv")))
    assert len(rows) == 2

    assert main(["predict", "--run", str(run), images]) == 2
    assert "needs --reference DIR" in capsys.readouterr().err
    assert main(["test", "--data", str(unseen), "--run", str(run), "--shots", "5", "--no-progress"]) == 2
    assert "class 'grass' has 4 normal image(s)" in capsys.readouterr().err


def test_rlr_says_it_ignores_shots(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(run), "--image-size", "64", "--backbone-weights",
                 "random", "--epochs", "1", "--batch-size", "4", "--shots", "4", "--no-progress"]) == 0
    assert "--shots ignored: only ResAD uses it (reference images); this is a rlr model" in capsys.readouterr().out
    assert main(["test", "--data", str(data), "--run", str(run), "--shot-seed", "1", "--no-progress"]) == 0
    assert "--shot-seed ignored" in capsys.readouterr().out


def test_resume_of_a_finished_run_fits_its_score_when_it_stopped_before(data, tmp_path, capsys):
    import torch

    from rlr_fast.training import BEST, load_model

    run = tmp_path / "run"
    common = ["--data", str(data), "--out", str(run), "--image-size", "64", "--backbone-weights", "random",
              "--batch-size", "4", "--epochs", "1", "--no-progress"]
    assert main(["train", *common, "--score", "whitened"]) == 0
    assert "fitted the score's statistics on 8 training images" in capsys.readouterr().out
    fitted = load_model(run, thresholds=False)
    assert fitted.whitened()
    # as a run killed between its last epoch and the fit leaves best.pt
    state = torch.load(run / BEST, weights_only=True)
    for key in [k for k in state["state_dict"] if k.startswith("scores.") and k.endswith(".fitted")]:
        state["state_dict"][key] = torch.tensor(False)
    torch.save(state, run / BEST)
    assert not load_model(run, thresholds=False).whitened()
    assert main(["train", *common, "--resume"]) == 0
    assert "its model's score is not fitted (the run stopped before the end): fitting it" in capsys.readouterr().out
    again = load_model(run, thresholds=False)
    assert again.whitened()
    for a, b in zip(fitted.scores, again.scores):
        torch.testing.assert_close(a.precision, b.precision)
    assert main(["train", *common, "--resume"]) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_anomaly_map_option_is_kept_by_the_run_and_refused_for_other_models(data, tmp_path, capsys):
    from rlr_fast.training import load_model

    run = tmp_path / "run"
    common = ["--data", str(data), "--out", str(run), "--image-size", "64", "--backbone-weights", "random",
              "--batch-size", "4", "--epochs", "1", "--no-progress"]
    assert main(["train", *common, "--anomaly-map", "all"]) == 0
    assert load_model(run, thresholds=False).config.anomaly_map == "all"
    capsys.readouterr()
    assert main(["train", *common, "--epochs", "2", "--resume", "--anomaly-map", "finest"]) == 2
    assert "--anomaly-map finest conflicts with the run being resumed" in capsys.readouterr().err
    assert main(["train", *common[:-3], "--force", "--model", "patchcore", "--anomaly-map", "all",
                 "--no-progress"]) == 2
    assert "--anomaly-map is an option of the rlr model, not of patchcore" in capsys.readouterr().err
    assert main(["train", *common, "--force", "--recipe", "paper", "--epochs", "1"]) == 0
    assert load_model(run, thresholds=False).config.anomaly_map == "all"  # the paper's, with its network


def test_resume_reads_the_runs_classes_in_their_order_and_refuses_other_classes(data, tmp_path, capsys):
    import torch

    from rlr_fast.training import CHECKPOINT

    run = tmp_path / "run"
    common = ["--data", str(data), "--out", str(run), "--image-size", "64", "--backbone-weights", "random",
              "--batch-size", "4", "--no-progress"]
    # the classes in another order than the data folder's sorted listing (brick, gravel)
    assert main(["train", *common, "--classes", "gravel,brick", "--epochs", "1"]) == 0
    capsys.readouterr()
    assert main(["train", *common, "--epochs", "2", "--resume"]) == 0  # no --classes: the run's own
    assert torch.load(run / CHECKPOINT, weights_only=True)["epoch"] == 2
    capsys.readouterr()
    assert main(["train", *common, "--epochs", "3", "--resume", "--classes", "brick"]) == 2
    assert ("the run being resumed in" in (err := capsys.readouterr().err) and "trains on gravel,brick, but "
            "--data/--classes now give brick" in err)
