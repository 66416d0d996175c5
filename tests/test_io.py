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


class _FakeKernel32:
    """kernel32's OpenProcess / GetExitCodeProcess / CloseHandle over a table pid -> exit code."""

    def __init__(self, exit_codes):
        self.exit_codes, self.closed = exit_codes, []

    def OpenProcess(self, access, inherit, pid):
        return pid if pid in self.exit_codes else 0

    def GetExitCodeProcess(self, handle, code_ref):
        code_ref._obj.value = self.exit_codes[handle]
        return 1

    def CloseHandle(self, handle):
        self.closed.append(handle)


def test_liveness_on_windows_reads_the_exit_code_and_never_signals(monkeypatch):
    import rlr_fast.io as io

    still_active, access_denied, invalid_parameter = 259, 5, 87
    k32 = _FakeKernel32({101: still_active, 102: 0})
    assert io._pid_alive_windows(101, k32, lambda: 0) is True
    assert io._pid_alive_windows(102, k32, lambda: 0) is False  # exited with code 0
    assert k32.closed == [101, 102]
    assert io._pid_alive_windows(103, k32, lambda: invalid_parameter) is False  # no such process
    assert io._pid_alive_windows(104, k32, lambda: access_denied) is True  # exists, not ours

    # on Windows, os.kill(pid, 0) would send CTRL_C_EVENT: _pid_alive must not call it there
    def no_signals(*args):
        raise AssertionError("os.kill called on Windows")

    monkeypatch.setattr(io.os, "kill", no_signals)
    monkeypatch.setattr(io, "_pid_alive_windows", lambda pid: pid == 101)
    monkeypatch.setattr(io.os, "name", "nt")
    alive = [io._pid_alive(101), io._pid_alive(102)]
    monkeypatch.undo()
    assert alive == [True, False]
