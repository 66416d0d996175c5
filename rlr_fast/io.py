"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never half of one.

Every file rlr-fast writes (checkpoints, JSON, CSV, pictures) goes through :func:`atomic_open`:
the data goes to a temporary file beside the target (same folder, so the rename stays on one file
system), is flushed and fsync'ed, then renamed over the target; the folder is fsync'ed too, so the
rename itself survives a power loss. A temporary left behind by a killed process is named
``.<target>.<pid>.tmp`` and :func:`clean_stale_temporaries` removes those of dead processes.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from pathlib import Path
from typing import IO, Iterator

TMP_SUFFIX = ".tmp"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. a platform that cannot open folders: the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temporary_path(path: Path) -> Path:
    """The temporary file beside ``path`` that this process writes before renaming."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")


@contextlib.contextmanager
def atomic_open(path, mode: str = "wb", **kwargs) -> Iterator[IO]:
    """Open ``path`` for writing; on a clean exit the file appears whole, on an error not at all."""
    if not mode.startswith("w"):
        raise ValueError(f"atomic_open writes files: mode must start with 'w', got {mode!r}")
    path = Path(path)
    tmp = temporary_path(path)
    try:
        with open(tmp, mode, **kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path, data: bytes) -> None:
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def atomic_write_text(path, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8", newline="") as fh:
        fh.write(text)


def _strict(obj):
    """NaN and infinities are not JSON: they become ``null``."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    return obj


def atomic_write_json(path, obj, *, indent: int | None = 2) -> None:
    """Strict JSON (undefined numbers written as ``null``), written atomically."""
    atomic_write_text(path, json.dumps(_strict(obj), indent=indent, allow_nan=False) + "\n")


def atomic_torch_save(obj, path) -> None:
    import torch

    with atomic_open(path, "wb") as fh:
        torch.save(obj, fh)


def atomic_savefig(fig, path, **kwargs) -> None:
    """``fig.savefig`` through a temporary file; the format comes from ``path``'s suffix."""
    path = Path(path)
    kwargs.setdefault("format", path.suffix.lstrip(".") or "png")
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, **kwargs)


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs. On POSIX, signal 0 checks without sending anything;
    on Windows ``os.kill(pid, 0)`` would send CTRL_C_EVENT (signal 0 there) and stop the
    process, so the process is opened and its exit code read instead."""
    if pid == os.getpid():
        return True
    if os.name == "nt":
        return _pid_alive_windows(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _pid_alive_windows(pid: int, kernel32=None, last_error=None) -> bool:
    import ctypes

    query_limited_information, still_active, access_denied = 0x1000, 259, 5
    if kernel32 is None:
        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
        last_error = ctypes.get_last_error
    handle = kernel32.OpenProcess(query_limited_information, False, pid)
    if not handle:  # no such process, or one we may not open (which exists)
        return last_error() == access_denied
    try:
        code = ctypes.c_ulong()
        if not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)):
            return True  # cannot tell: keep its temporary
        return code.value == still_active
    finally:
        kernel32.CloseHandle(handle)


def clean_stale_temporaries(folder) -> list[Path]:
    """Remove the temporaries that killed writers left in ``folder``; returns what was removed."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for p in folder.glob(f".*{TMP_SUFFIX}"):
        stem = p.name[: -len(TMP_SUFFIX)]
        pid = stem.rsplit(".", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
    return removed


def _try_lock(fh) -> bool:
    """Take an exclusive, non-blocking OS lock on an open file; False if another process holds it.
    The OS releases it when the holder's file is closed or the holder dies, however it dies."""
    if os.name == "nt":
        import msvcrt

        try:
            fh.seek(0)
            msvcrt.locking(fh.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as e:  # a file system without locks (some network mounts): ENOLCK, EOPNOTSUPP
        raise LockUnsupported(str(e)) from e
    return True


class LockUnsupported(OSError):
    """The file system of a lock file does not support OS locks."""


class LockHeld(BlockingIOError):
    """Another process holds the lock; ``holder`` is the record it wrote (a dict, possibly empty)."""

    def __init__(self, path: Path, holder: dict):
        super().__init__(f"{path} is locked")
        self.holder = holder


def _same_file(fh, path: Path) -> bool:
    """Whether the open file ``fh`` is still the file at ``path`` (a holder that was releasing may
    have removed it after we opened it: then our lock guards nothing)."""
    try:
        here = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fh.fileno())
    return (mine.st_dev, mine.st_ino) == (here.st_dev, here.st_ino)


@contextlib.contextmanager
def exclusive_lock(path, holder: dict) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the ``with`` block, or raise
    :class:`LockHeld` carrying the holder's record when another process holds it. ``holder`` (this process's pid, host, command, start time) is
    written into the file while it is held, for that message, and the file is removed on release.
    The lock is the OS's (``flock``, or ``msvcrt.locking`` on Windows), so a killed holder leaves
    at most the file, never a lock: the next holder takes it over."""
    path = Path(path)
    while True:
        fh = open(path, "a+")
        try:
            locked = _try_lock(fh)
        except LockUnsupported as e:
            fh.close()
            with contextlib.suppress(OSError):
                path.unlink()
            warnings.warn(f"{path.parent} is on a file system without file locks ({e}): nothing stops a second "
                          f"process from using it at the same time", RuntimeWarning, stacklevel=3)
            yield
            return
        if not locked:
            fh.seek(0)
            try:
                record = json.loads(fh.read() or "{}")
            except (OSError, ValueError):  # Windows refuses to read a locked byte; a half-written record
                record = {}
            fh.close()
            raise LockHeld(path, record if isinstance(record, dict) else {})
        if os.name == "nt" or _same_file(fh, path):
            break
        fh.close()  # we locked a file its holder removed on release: lock the one at path now
    try:
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps(holder))
        fh.flush()
        yield
    finally:
        if os.name != "nt":
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # still holding it: whoever opens the path next gets a new file
        fh.close()  # releases the lock
        if os.name == "nt":
            with contextlib.suppress(OSError):  # another process may have it open: it stays
                path.unlink()
