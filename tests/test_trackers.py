"""`--logger tensorboard|mlflow`: what train and test send, read back with each tool's own reader
(TensorBoard's EventAccumulator, MLflow's MlflowClient on the file store), against the run's own
log.jsonl and metrics.json."""
import io
import json
import sys

import numpy as np
import pytest
from PIL import Image

from rlr_fast.cli import main
from rlr_fast.demo_data import build_demo_dataset



def tensorboard_reader():
    """TensorBoard's event reader, or skip the test that needs it, saying why."""
    return pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator",
        reason="TensorBoard is not installed (pip install rlr-fast[trackers]): its read-back cannot run")


def mlflow_tracking():
    """MLflow's client, or skip the test that needs it, saying why."""
    return pytest.importorskip(
        "mlflow.tracking",
        reason="MLflow is not installed (pip install rlr-fast[trackers]): its read-back cannot run")


def installed(reader) -> bool:
    try:
        reader()
    except pytest.skip.Exception:
        return False
    return True


CLASSES = ("brick", "gravel")
BATCH = 4
N_TRAIN = 4  # per class: 8 images, no held-out one (10 % of 4 rounds to 0), 2 steps per epoch
STEPS_PER_EPOCH = len(CLASSES) * N_TRAIN // BATCH
EPOCHS = 2
LR = 1e-3  # the fast recipe's, warmed up linearly over its 2 warm-up epochs
WARMUP_STEPS = 2 * STEPS_PER_EPOCH


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_demo_dataset(tmp_path_factory.mktemp("data"), classes=CLASSES, image_size=64, n_train=N_TRAIN,
                              n_test_good=2, n_test_defect=4)


def train_args(data, run, *extra):
    return ["train", "--data", str(data), "--out", str(run), "--image-size", "64", "--backbone-weights", "random",
            "--batch-size", str(BATCH), "--no-progress", *extra]


def accumulator(run):
    acc = tensorboard_reader().EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0,
                                                                             "tensors": 0})
    acc.Reload()
    return acc


def mlflow_client(run, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses its file store without it
    return mlflow_tracking().MlflowClient(tracking_uri=(run / "mlruns").resolve().as_uri())


def only_mlflow_run(client):
    experiment = client.get_experiment_by_name("rlr-fast")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1  # train, its resume and test all log into the one MLflow run
    return runs[0]


class Crash(RuntimeError):
    pass


@pytest.fixture(scope="module")
def tracked(data, tmp_path_factory):
    """A run trained with both loggers (those installed) for 3 epochs that crashes in epoch 2
    (before its checkpoint), is resumed for 2 epochs in all (so its settings change: MLflow's
    parameters are write-once), and tested; with what the trackers held right after the crash."""
    loggers = ",".join(name for name, reader in (("tensorboard", tensorboard_reader), ("mlflow", mlflow_tracking))
                       if installed(reader))
    if not loggers:
        pytest.skip("neither TensorBoard nor MLflow is installed (pip install rlr-fast[trackers])")
    run = tmp_path_factory.mktemp("tracked") / "run"
    args = train_args(data, run, "--logger", loggers)

    def crash_in_epoch_2(history, record, cfg):
        if record["epoch"] == 2:
            raise Crash("killed in epoch 2")
        return None

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("rlr_fast.training._rise_warning", crash_in_epoch_2)
        with pytest.raises(Crash):
            main([*args, "--epochs", str(EPOCHS + 1)])
        after_crash = {}
        if "tensorboard" in loggers:
            after_crash["tb_loss_steps"] = [e.step for e in accumulator(run).Scalars("train/loss")]
        if "mlflow" in loggers:
            client = mlflow_client(run, mp)
            first = only_mlflow_run(client)
            after_crash["mlflow_status"] = first.info.status
            after_crash["mlflow_loss_steps"] = [m.step for m in
                                                client.get_metric_history(first.info.run_id, "train/loss")]
    assert main([*args, "--epochs", str(EPOCHS), "--resume"]) == 0
    assert main(["test", "--data", str(data), "--run", str(run), "--no-progress", "--logger", loggers]) == 0
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    metrics = json.loads((run / "metrics.json").read_text())
    return {"run": run, "log": log, "metrics": metrics, "after_crash": after_crash}


@pytest.mark.parametrize("logger", ["tensorboard", "mlflow"])
def test_a_crash_keeps_every_checkpointed_epoch_and_nothing_more(tracked, logger):
    crash = tracked["after_crash"]
    if logger == "tensorboard":
        tensorboard_reader()  # (or skip)
        assert crash["tb_loss_steps"] == list(range(STEPS_PER_EPOCH))  # epoch 1's steps, none of epoch 2's
    else:
        mlflow_tracking()  # (or skip)
        assert crash["mlflow_loss_steps"] == list(range(STEPS_PER_EPOCH))
        assert crash["mlflow_status"] == "FAILED"


def expected_lr(step):
    return LR * (step + 1) / WARMUP_STEPS


def epoch_step_losses(values):
    """Each epoch's mean step loss (equal batches: the epoch loss log.jsonl records)."""
    return [float(np.mean(values[e * STEPS_PER_EPOCH:(e + 1) * STEPS_PER_EPOCH])) for e in range(EPOCHS)]


def test_tensorboard_read_back(tracked):
    tensorboard_reader()  # (or skip)
    run, log, metrics = tracked["run"], tracked["log"], tracked["metrics"]
    acc = accumulator(run)
    steps = EPOCHS * STEPS_PER_EPOCH
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(steps))  # resumed at epoch 2's first step, none twice
    assert epoch_step_losses([e.value for e in loss]) == pytest.approx([r["loss"] for r in log], rel=1e-5)
    lr = acc.Scalars("train/lr")
    assert [e.step for e in lr] == list(range(steps))
    assert [e.value for e in lr] == pytest.approx([expected_lr(s) for s in range(steps)], rel=1e-6)
    epoch_ends = [(e + 1) * STEPS_PER_EPOCH - 1 for e in range(EPOCHS)]
    for tag, key in (("train/images_per_s", "images_per_s"), ("train/epoch_loss", "loss"),
                     ("train/grad_norm", "grad_norm")):
        events = acc.Scalars(tag)
        assert [e.step for e in events] == epoch_ends
        assert [e.value for e in events] == pytest.approx([r[key] for r in log], rel=1e-5)
    for name, value in log[-1]["terms"].items():  # RLR's loss terms
        assert acc.Scalars(f"train/term/{name}")[-1].value == pytest.approx(value, rel=1e-5)

    # test: metrics.json's values per class and mean, at the training's last step
    for cls in CLASSES:
        for name, value in metrics["classes"][cls].items():
            (event,) = acc.Scalars(f"test/{cls}/{name}")
            assert event.value == pytest.approx(value, rel=1e-6) and event.step == steps - 1
    for name, value in metrics["mean"].items():
        assert acc.Scalars(f"test/mean/{name}")[0].value == pytest.approx(value, rel=1e-6)
    thresholds = json.loads((run / "thresholds.json").read_text())
    assert acc.Scalars("test/threshold/image")[0].value == pytest.approx(thresholds["image"]["threshold"], rel=1e-6)

    # a few overlays as images: the PNGs test wrote, two per class
    images = acc.Tags()["images"]
    assert len(images) == 2 * len(CLASSES) and all(t.startswith("overlays/") for t in images)
    tag = images[0]
    _, cls, name = tag.split("/")
    written = np.asarray(Image.open(run / "overlays" / cls / f"{name}.png").convert("RGB"))
    (event,) = acc.Images(tag)
    assert (event.height, event.width) == written.shape[:2]
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB")), written)


def test_mlflow_read_back(tracked, monkeypatch):
    mlflow_tracking()  # (or skip)
    run, log, metrics = tracked["run"], tracked["log"], tracked["metrics"]
    client = mlflow_client(run, monkeypatch)
    found = only_mlflow_run(client)
    run_id = found.info.run_id
    assert found.info.status == "FINISHED"
    steps = EPOCHS * STEPS_PER_EPOCH
    loss = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in loss) == list(range(steps))
    values = [m.value for m in sorted(loss, key=lambda m: m.step)]
    assert epoch_step_losses(values) == pytest.approx([r["loss"] for r in log], rel=1e-9)
    lr = sorted(client.get_metric_history(run_id, "train/lr"), key=lambda m: m.step)
    assert [m.value for m in lr] == pytest.approx([expected_lr(s) for s in range(steps)], rel=1e-12)
    speed = sorted(client.get_metric_history(run_id, "train/images_per_s"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in speed] == [((e + 1) * STEPS_PER_EPOCH - 1, r["images_per_s"])
                                                  for e, r in enumerate(log)]
    latest = found.data.metrics
    for cls in CLASSES:
        for name, value in metrics["classes"][cls].items():
            assert latest[f"test/{cls}/{name}"] == pytest.approx(value, rel=1e-12)
    for name, value in metrics["mean"].items():
        assert latest[f"test/mean/{name}"] == pytest.approx(value, rel=1e-12)
    params = found.data.params
    assert params["model"] == "rlr" and float(params["train.lr"]) == LR and params["classes"] == "brick,gravel"
    assert params["config.image_size"] == "64"
    assert params["train.epochs"] == str(EPOCHS + 1)  # write-once: the value the MLflow run started with
    logged = [a.path for cls in CLASSES for a in client.list_artifacts(run_id, f"overlays/{cls}")]
    assert len(logged) == 2 * len(CLASSES)
    for path in logged:
        assert path.endswith(".png") and (run / path).is_file()  # overlays/<class>/<file>.png, as test wrote it


def test_default_run_writes_no_tracker_files_and_force_removes_them(data, tmp_path, capsys):
    tensorboard_reader()  # (or skip)
    run = tmp_path / "run"
    assert main(train_args(data, run, "--epochs", "1", "--logger", "tensorboard")) == 0
    assert (run / "tensorboard").is_dir() and (run / "trackers.json").is_file()
    capsys.readouterr()
    assert main(train_args(data, run, "--epochs", "2", "--resume")) == 0  # no --logger: says so, logs nothing
    assert "note: this run logged to tensorboard before; add --logger tensorboard" in capsys.readouterr().out
    assert [e.step for e in accumulator(run).Scalars("train/loss")] == list(range(STEPS_PER_EPOCH))
    assert main(train_args(data, run, "--epochs", "1", "--force")) == 0
    assert "tensorboard" in capsys.readouterr().out  # named among what --force removed
    for name in ("tensorboard", "mlruns", "trackers.json"):
        assert not (run / name).exists()
    assert (run / "log.jsonl").is_file()


def test_patchcore_fit_and_a_custom_mlflow_store(data, tmp_path, monkeypatch):
    mlflow_tracking()  # (or skip)
    run, store = tmp_path / "run", tmp_path / "store"
    assert main(train_args(data, run, "--model", "patchcore", "--logger", "mlflow",
                           "--mlflow-uri", store.as_uri(), "--mlflow-experiment", "bank")) == 0
    assert not (run / "mlruns").exists()
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = mlflow_tracking().MlflowClient(tracking_uri=store.as_uri())
    (found,) = client.search_runs([client.get_experiment_by_name("bank").experiment_id])
    (record,) = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert found.data.metrics["fit/bank"] == record["bank"] and found.data.metrics["fit/images"] == record["images"]
    assert found.data.params["model"] == "patchcore"


@pytest.mark.parametrize("logger, package", [("tensorboard", "tensorboard"), ("mlflow", "mlflow-skinny")])
def test_a_missing_package_is_one_line_naming_its_install(data, tmp_path, monkeypatch, capsys, logger, package):
    monkeypatch.setitem(sys.modules, logger, None)  # `import tensorboard` / `import mlflow` now fails
    run = tmp_path / "run"
    assert main(train_args(data, run, "--logger", logger)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"--logger {logger} needs the {package} package" in err and f"pip install {package}" in err
    assert "rlr-fast[trackers]" in err
    assert not run.exists()  # refused before any work
    assert main(["test", "--data", str(data), "--run", str(run), "--logger", logger]) == 2
    assert f"pip install {package}" in capsys.readouterr().err


def test_bad_logger_options_are_refused(data, tmp_path, capsys):
    assert main(train_args(data, tmp_path / "run", "--logger", "wandb")) == 2
    assert "unknown logger 'wandb'" in capsys.readouterr().err
    assert main(train_args(data, tmp_path / "run", "--mlflow-uri", "file:/x")) == 2
    assert "--mlflow-uri is for --logger mlflow" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def _ddp_worker(rank, world, port, data, run):
    """One torchrun-like process running `rlr-fast train --logger tensorboard,mlflow`."""
    import os

    import torch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), MLFLOW_ALLOW_FILE_STORE="true")
    torch.set_num_threads(1)
    code = main(["train", "--data", data, "--out", run, "--image-size", "64", "--backbone-weights", "random",
                 "--epochs", "2", "--batch-size", "1", "--val-fraction", "0", "--no-progress",
                 "--logger", "tensorboard,mlflow"])
    assert code == 0
    torch.distributed.destroy_process_group()


def test_under_ddp_only_rank_0_logs(tmp_path, monkeypatch):
    import socket

    import torch.multiprocessing as mp

    tensorboard_reader(), mlflow_tracking()  # (or skip)
    data = build_demo_dataset(tmp_path / "data", classes=("brick",), image_size=64, n_train=6, n_test_good=1,
                              n_test_defect=1)
    run = tmp_path / "run"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(data), str(run)), nprocs=2, join=True)
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1  # one writer: rank 0's
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    acc = accumulator(run)
    steps = 3  # 6 images, 3 per rank, batch 1: 3 steps per epoch on each rank
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(2 * steps))
    # an epoch's values are of both ranks together, as log.jsonl's
    assert [(e.step, e.value) for e in acc.Scalars("train/epoch_loss")] == [
        (steps - 1, pytest.approx(log[0]["loss"], rel=1e-5)), (2 * steps - 1, pytest.approx(log[1]["loss"], rel=1e-5))]
    client = mlflow_client(run, monkeypatch)
    found = only_mlflow_run(client)
    assert len(client.get_metric_history(found.info.run_id, "train/loss")) == 2 * steps  # no rank 1 values
