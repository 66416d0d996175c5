"""Issue 12: bad input gets one clear line and nothing is lost or silently wrong.

These tests drive the command line (``rlr_fast.cli.main``) and the public loaders as a user
would, on a tiny generated data set, and check the files the commands leave behind.
"""
import json
import os
import pickle
import shutil
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from rlr_fast.cli import main
from rlr_fast.data import denormalize, load_image, load_mask
from rlr_fast.demo_data import build_demo_dataset

RANDOM = ["--backbone-weights", "random", "--batch-size", "4", "--image-size", "64", "--no-progress"]


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A run trained one epoch on brick and gravel; tests copy it before changing it."""
    run = tmp_path_factory.mktemp("trained") / "run"
    assert main(["train", "--data", str(data), "--out", str(run), "--epochs", "1", *RANDOM]) == 0
    return run


def _copy(run, tmp_path):
    return shutil.copytree(run, tmp_path / "run")


def _one_line_error(capsys, *fragments):
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], err
    assert "Traceback" not in err
    return lines[0]


# ---------------------------------------------------------------------------------------------
# Data loss and wrong results
# ---------------------------------------------------------------------------------------------

def test_train_refuses_to_overwrite_a_run_and_force_clears_it(data, trained, tmp_path, capsys):
    run = _copy(trained, tmp_path)
    checkpoint = (run / "checkpoint.pt").read_bytes()
    (run / "metrics.json").write_text("{}")
    (run / "overlays" / "brick").mkdir(parents=True)
    (run / "notes.txt").write_text("mine")  # not the run's: --force leaves it
    capsys.readouterr()
    assert main(["train", "--data", str(data), "--out", str(run), "--epochs", "2", *RANDOM]) == 2
    _one_line_error(capsys, str(run), "already holds a run", "--resume", "--force")
    assert (run / "checkpoint.pt").read_bytes() == checkpoint and (run / "metrics.json").exists()

    assert main(["train", "--data", str(data), "--out", str(run), "--epochs", "2", "--force", *RANDOM]) == 0
    assert not (run / "metrics.json").exists() and not (run / "overlays").exists()
    assert (run / "notes.txt").read_text() == "mine"
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]


def _png16_gray(path, values: np.ndarray) -> None:
    Image.fromarray(values.astype(np.uint16)).save(path)


def test_16_bit_grayscale_png_is_scaled_not_clipped_to_white(tmp_path):
    values = np.linspace(0, 65535, 32 * 32).reshape(32, 32)
    _png16_gray(tmp_path / "g16.png", values)
    rgb = denormalize(load_image(tmp_path / "g16.png", 32)).astype(int)
    expected = np.round(values / 257).astype(int)  # 65535 -> 255, the standard 16 -> 8 bit scale
    for c in range(3):
        assert np.abs(rgb[..., c] - expected).max() <= 1
    mask_values = np.zeros((32, 32))
    mask_values[8:16, 8:16] = 65535
    _png16_gray(tmp_path / "m16.png", mask_values)
    assert torch.equal(load_mask(tmp_path / "m16.png", 32)[0], torch.from_numpy(mask_values > 0).float())


def test_16_bit_rgb_png_matches_its_8_bit_version(tmp_path):
    rng = np.random.default_rng(0)
    values = rng.integers(0, 65536, (16, 16, 3)).astype(">u2")
    raw = b"".join(b"\x00" + values[y].tobytes() for y in range(16))  # filter 0 per row

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    (tmp_path / "rgb16.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 16, 16, 16, 2, 0, 0, 0))
                                         + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    rgb = denormalize(load_image(tmp_path / "rgb16.png", 16)).astype(int)
    assert np.abs(rgb - values.astype(int) / 257).max() <= 1


def test_32_bit_float_image_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "float.tif"
    Image.fromarray(np.full((16, 16), 0.5, dtype=np.float32)).save(path)
    with pytest.raises(ValueError, match=r"^cannot read image .*float\.tif: its pixels are 32-bit floats"):
        load_image(path, 16)


@pytest.mark.parametrize("option, value, message", [
    ("--image-size", "0", "argument --image-size: must be an integer >= 32, got 0"),
    ("--image-size", "-64", "argument --image-size: must be an integer >= 32, got -64"),
    ("--image-size", "8", "argument --image-size: must be an integer >= 32, got 8"),
    ("--epochs", "0", "argument --epochs: must be an integer >= 1, got 0"),
    ("--epochs", "-3", "argument --epochs: must be an integer >= 1, got -3"),
    ("--batch-size", "0", "argument --batch-size: must be an integer >= 1, got 0"),
    ("--lr", "0", "argument --lr: must be a finite number > 0, got 0"),
    ("--lr", "nan", "argument --lr: must be a finite number > 0, got nan"),
])
def test_numeric_options_are_checked_at_parse_time(data, tmp_path, capsys, option, value, message):
    args = ["train", "--data", str(data), "--out", str(tmp_path / "run"), "--backbone-weights", "random",
            "--no-progress", "--epochs", "1", option, value]
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_an_image_size_too_small_for_the_model_is_refused_when_it_is_built():
    from rlr_fast.models import RLRModel, UniADModel

    with pytest.raises(ValueError, match="image size 16 is too small.*at least 17"):
        RLRModel(image_size=16, backbone_weights="random")
    RLRModel(image_size=17, backbone_weights="random")
    # UniAD's 7x7 neighbour mask needs a 16-stride grid of at least 8 x 8
    with pytest.raises(ValueError, match="image size 112 is too small.*7x7.*at least 113"):
        UniADModel(image_size=112, backbone_weights="random")


@pytest.mark.parametrize("option, value, kept", [
    ("--lr", "0.5", "--lr 0.001"), ("--model", "uniad", "--model rlr"), ("--image-size", "96", "--image-size 64"),
    ("--batch-size", "2", "--batch-size 4"), ("--seed", "3", "--seed 0"),
])
def test_resume_refuses_an_option_that_contradicts_the_run(data, trained, tmp_path, capsys, option, value, kept):
    run = _copy(trained, tmp_path)
    checkpoint = (run / "checkpoint.pt").read_bytes()
    args = ["train", "--data", str(data), "--out", str(run), "--resume", "--epochs", "2", "--no-progress",
            option, value]
    capsys.readouterr()
    assert main(args) == 2
    _one_line_error(capsys, f"{option} {value} conflicts", kept, str(run))
    assert (run / "checkpoint.pt").read_bytes() == checkpoint


def test_resume_without_a_checkpoint_keeps_what_the_folder_holds(data, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"model": "rlr"}')  # a run killed before its first checkpoint
    assert main(["train", "--data", str(data), "--out", str(run), "--resume", "--epochs", "1", *RANDOM]) == 2
    _one_line_error(capsys, f"cannot resume {run}: it has no checkpoint.pt (only config.json)", "--force")
    assert (run / "config.json").read_text() == '{"model": "rlr"}'
    with pytest.raises(SystemExit):
        main(["train", "--data", str(data), "--out", str(run), "--resume", "--force", *RANDOM])
    assert "argument --force: not allowed with argument --resume" in capsys.readouterr().err


def test_resume_uses_the_runs_settings_and_counts_epochs(data, trained, tmp_path, capsys):
    run = _copy(trained, tmp_path)
    capsys.readouterr()
    # the run's own values given again are no conflict
    assert main(["train", "--data", str(data), "--out", str(run), "--resume", "--epochs", "3", "--lr", "0.001",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "image size 64" in out and "lr=0.001" in out and "batch_size=4" in out
    assert "trained epochs 2-3 of 3" in out
    assert main(["train", "--data", str(data), "--out", str(run), "--resume", "--epochs", "2"]) == 2
    _one_line_error(capsys, "--epochs 2 is fewer than the 3 epochs")


def test_test_warns_about_classes_the_run_was_not_trained_on(trained, tmp_path, capsys):
    three = build_demo_dataset(tmp_path / "data3", classes=("brick", "grass"), image_size=64, n_train=2,
                               n_test_good=2, n_test_defect=2)
    assert json.loads((trained / "config.json").read_text())["classes"] == ["brick", "gravel"]
    run = _copy(trained, tmp_path)
    capsys.readouterr()
    assert main(["test", "--data", str(three), "--run", str(run), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "warning: the run was trained on brick, gravel, not on grass" in err
    assert main(["test", "--data", str(three), "--run", str(run), "--classes", "brick", "--no-progress"]) == 0
    assert "warning" not in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Clear errors instead of tracebacks
# ---------------------------------------------------------------------------------------------

class _Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("content", ["truncated", "empty", "random", "malicious"])
def test_unreadable_checkpoint_is_one_line_naming_the_file(data, trained, tmp_path, capsys, content):
    path = tmp_path / f"{content}.pt"
    path.write_bytes({
        "truncated": (trained / "checkpoint.pt").read_bytes()[:1000],
        "empty": b"",
        "random": np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes(),
        "malicious": pickle.dumps(_Boom()),
    }[content])
    capsys.readouterr()
    assert main(["test", "--data", str(data), "--run", str(path), "--no-progress"]) == 2
    line = _one_line_error(capsys, str(path), "is not a readable rlr-fast checkpoint")
    assert "weights_only" not in line and "pwned" not in capsys.readouterr().out


@pytest.mark.parametrize("out", ["afile", "afile/run"])
def test_out_pointing_to_a_file_is_refused_before_any_work(data, tmp_path, capsys, out):
    (tmp_path / "afile").write_text("keep me")
    with pytest.raises(SystemExit):
        main(["train", "--data", str(data), "--out", str(tmp_path / out), *RANDOM])
    assert f"argument --out: {tmp_path / 'afile'} is a file, not a folder" in capsys.readouterr().err
    assert (tmp_path / "afile").read_text() == "keep me"


def test_device_cuda_without_a_gpu_is_refused_at_parse_time(data, tmp_path, capsys, monkeypatch):
    import rlr_fast.training

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(rlr_fast.training, "build_model", _no_model)
    with pytest.raises(SystemExit):
        main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--device", "cuda", *RANDOM])
    assert "argument --device: 'cuda': no CUDA GPU is available" in capsys.readouterr().err


def _no_model(*args, **kwargs):
    raise AssertionError("a model was built before the input was checked")


def test_unknown_backbone_is_one_line(data, tmp_path, capsys):
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--backbone", "no_such_net",
                 *RANDOM]) == 2
    _one_line_error(capsys, "unknown backbone 'no_such_net': not a timm model name")


def test_triton_backend_off_cuda_is_refused_before_a_model_is_built(data, tmp_path, capsys, monkeypatch):
    import rlr_fast.training

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(rlr_fast.training, "build_model", _no_model)
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--backend", "triton",
                 "--device", "cpu", *RANDOM]) == 2
    _one_line_error(capsys, "--backend triton needs --device cuda (got cpu)")


def test_missing_data_folder_is_reported_before_a_model_is_built(tmp_path, capsys, monkeypatch):
    import rlr_fast.training

    monkeypatch.setattr(rlr_fast.training, "build_model", _no_model)
    with pytest.raises(SystemExit):
        main(["train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run"), *RANDOM])
    assert f"argument --data: folder not found: {tmp_path / 'nowhere'}" in capsys.readouterr().err


def test_empty_class_is_reported_before_a_model_is_built(tmp_path, capsys, monkeypatch):
    import rlr_fast.training

    monkeypatch.setattr(rlr_fast.training, "build_model", _no_model)
    (tmp_path / "cls" / "train" / "good").mkdir(parents=True)
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), *RANDOM]) == 2
    _one_line_error(capsys, "class 'cls' has no training images")


@pytest.mark.parametrize("count", [5, 20])  # 20 > 16: the feature extraction reads with workers
def test_corrupt_image_is_the_same_one_line_with_or_without_workers(data, tmp_path, capsys, count):
    folder = tmp_path / "images"
    folder.mkdir()
    normal = sorted((data / "brick" / "train" / "good").iterdir())
    for i in range(count):
        shutil.copy(normal[i % len(normal)], folder / f"{i:03d}.png")
    (folder / "003.png").write_bytes(b"not a png")
    capsys.readouterr()
    assert main(["train", "--data", str(folder), "--out", str(tmp_path / "run"), "--epochs", "1", *RANDOM]) == 2
    line = _one_line_error(capsys, f"cannot read image {folder / '003.png'}")
    assert line.startswith("rlr-fast train: error: cannot read image")


def test_temporaries_of_a_killed_checkpoint_write_are_removed_at_start(data, trained, tmp_path):
    run = _copy(trained, tmp_path)
    orphan = run / ".checkpoint.pt.999999999.tmp"  # a writer with this pid cannot be alive
    orphan.write_bytes(b"\0" * (run / "checkpoint.pt").stat().st_size)
    assert main(["train", "--data", str(data), "--out", str(run), "--resume", "--epochs", "2", "--no-progress"]) == 0
    assert not orphan.exists()
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []


def test_metrics_json_is_strict_with_null_for_undefined_metrics(data, trained, tmp_path):
    only_good = tmp_path / "only_good"
    shutil.copytree(data / "brick" / "train", only_good / "brick" / "train")
    shutil.copytree(data / "brick" / "test" / "good", only_good / "brick" / "test" / "good")
    run = _copy(trained, tmp_path)
    with pytest.warns(RuntimeWarning, match="undefined"):
        assert main(["test", "--data", str(only_good), "--run", str(run), "--no-progress"]) == 0

    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")

    metrics = json.loads((run / "metrics.json").read_text(), parse_constant=refuse)
    assert metrics["classes"]["brick"]["image_auroc"] is None and metrics["mean"]["pixel_aupro"] is None


def test_cli_keeps_the_traceback_of_a_bug(monkeypatch):
    import rlr_fast.commands.test

    def bug(args):
        raise ValueError("an internal bug, not the user's input")

    monkeypatch.setattr(rlr_fast.commands.test, "run", bug)
    with pytest.raises(ValueError, match="internal bug"):
        main(["test", "--data", ".", "--run", "nowhere"])


# ---------------------------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------------------------

def test_no_progress_keeps_the_per_epoch_loss_lines(data, tmp_path, capsys):
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--epochs", "2", *RANDOM]) == 0
    captured = capsys.readouterr()
    lines = [line for line in captured.out.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in lines] == ["1/2", "2/2"] and all("loss" in line for line in lines)
    assert captured.err == ""


def test_progress_is_written_as_lines_when_stderr_is_not_a_terminal(data, tmp_path, capsys):
    args = [a for a in RANDOM if a != "--no-progress"]
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--epochs", "1", *args]) == 0
    main(["test", "--data", str(data), "--run", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert "\r" not in err
    assert "features: 8/8 img (100%)" in err and "test: 2/2 batch (100%)" in err


def test_line_progress_writes_whole_lines_at_most_every_interval():
    import io

    from rlr_fast.progress import progress

    out = io.StringIO()
    for _ in progress(range(3), desc="features", unit="img", file=out, interval=0):
        pass
    lines = out.getvalue().splitlines()
    assert [line.split(" in ")[0] for line in lines] == [
        "features: 1/3 img (33%)", "features: 2/3 img (67%)", "features: 3/3 img (100%)"]
    out = io.StringIO()
    bar = progress(total=4, desc="epoch 1/2", unit="step", file=out, interval=3600)
    bar.update(2)
    bar.set_postfix(loss="0.5")
    bar.update(2)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("epoch 1/2: 4/4 step (100%) in ") and lines[0].endswith(", loss=0.5")
    out = io.StringIO()
    for _ in progress(range(3), file=out, enabled=False, interval=0):
        pass
    assert out.getvalue() == ""
