import json
import os

import pytest
import torch

from rlr_fast.io import (atomic_open, atomic_torch_save, atomic_write_json, clean_stale_temporaries,
                         temporary_path)


def test_json_is_strict_nan_becomes_null(tmp_path):
    atomic_write_json(tmp_path / "m.json", {"auroc": float("nan"), "per_class": [0.5, float("inf")]})
    assert json.loads((tmp_path / "m.json").read_text()) == {"auroc": None, "per_class": [0.5, None]}
    assert "NaN" not in (tmp_path / "m.json").read_text()


def test_failed_write_keeps_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "ckpt.pt"
    atomic_torch_save({"epoch": 1}, target)
    with pytest.raises(RuntimeError):
        with atomic_open(target, "wb") as fh:
            fh.write(b"half a checkpoint")
            raise RuntimeError("killed")
    assert torch.load(target) == {"epoch": 1}
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    dead = tmp_path / ".ckpt.pt.999999999.tmp"  # no process has this pid
    dead.write_bytes(b"x" * 100)
    mine = temporary_path(tmp_path / "other.pt")  # this process's own: still being written
    mine.write_bytes(b"y")
    unrelated = tmp_path / ".hidden.tmp"
    unrelated.write_bytes(b"z")
    assert clean_stale_temporaries(tmp_path) == [dead]
    assert mine.exists() and unrelated.exists() and not dead.exists()


def test_atomic_open_refuses_read_modes(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        with atomic_open(tmp_path / "x", "rb"):
            pass
