"""A run folder: every file it holds, named in one place, and the fingerprints that keep it whole.

A run folder holds what training wrote (``checkpoint.pt``, ``best.pt``, ``config.json``,
``log.jsonl``, the ``features`` cache) and what was made from its model afterwards: the
decision thresholds, metrics and report page of ``rlr-fast test`` (``thresholds.json``,
``metrics.json``, ``report.html``, ``overlays/``), the exports of ``rlr-fast export`` (``model.onnx``, ``model.xml`` + ``model.bin``,
``weights.pt``) and the output of ``rlr-fast predict`` (``predictions/``); with ``--logger``
(:mod:`rlr_fast.trackers`), ``tensorboard/``, ``mlruns/`` and ``trackers.json`` too. :class:`Run` is
the only code that names these files.

Why fingerprints: after ``train --force`` or ``--resume`` the run serves new weights, and a
threshold or an export made from the old ones would decide with one model while another scores.
So every derived file records the **fingerprint** of the model it was made from (a content hash
of its weights, :func:`fingerprint`), and every consumer (``load_model``, ``rlr-fast predict``,
each engine) compares it with the fingerprint of the model the run serves now (``best.pt`` when
the run has one, else ``checkpoint.pt``, as :meth:`Run.model_file`) and refuses a mismatch with
:class:`~rlr_fast.errors.StaleRunError`, one line naming the command that makes the file again.
``train --force`` removes every derived file; ``--resume`` leaves them, and they are refused from
the moment the served weights change until they are remade.

Files written before fingerprints were recorded (legacy runs) are used as they are when they are
newer than the served model file (``test`` and ``export`` write them after reading the model), and
refused as possibly stale when they are older (the model was written again after them).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import torch

from .errors import RunBusyError, StaleRunError

__all__ = ["Run", "fingerprint", "model_fingerprint"]


def fingerprint(state_dict: Dict[str, torch.Tensor]) -> str:
    """A content hash of a model's weights (names, dtypes, shapes and bytes of every tensor of its
    state dict, in sorted order): 16 hex digits. Two files holding the same weights (a checkpoint
    and the ``weights.pt`` exported from it) have the same fingerprint."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        value = state_dict[name]
        if not torch.is_tensor(value):
            h.update(f"{name}={value!r};".encode())
            continue
        t = value.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # raw bytes, whatever the dtype
    return h.hexdigest()[:16]


def model_fingerprint(model) -> str:
    """The fingerprint of a model's current weights."""
    return fingerprint(model.state_dict())


class Run:
    """A run folder (``Run("RUN")``) or a model file in one (``Run("RUN/weights.pt")``: then
    :meth:`model_file` is that file and the derived files are looked up beside it)."""

    CHECKPOINT = "checkpoint.pt"  # the latest state: model, optimizer, schedule, RNG (what --resume reads)
    BEST = "best.pt"  # the model of the best epoch (what load_model, test, predict and export serve)
    CONFIG = "config.json"
    LOG = "log.jsonl"
    METRICS = "metrics.json"
    THRESHOLDS = "thresholds.json"
    REPORT = "report.html"  # the test report page (rlr_fast.report); records its fingerprint in a meta tag
    EXPORTS = {"onnx": "model.onnx", "openvino": "model.xml", "weights": "weights.pt"}
    INT8 = "model-int8.xml"  # `rlr-fast export --format openvino --int8` (weights in model-int8.bin)
    ENGINES = "engines.json"  # `python -m rlr_fast.measure`: speed and accuracy of each engine and precision
    FEATURES = "features"
    OVERLAYS = "overlays"
    PREDICTIONS = "predictions"
    SOURCE = "source.json"  # inside a derived folder (overlays, predictions): the fingerprint it was made from
    # --logger (rlr_fast.trackers): TensorBoard's event files, MLflow's file store, and the step and
    # MLflow run id they have reached
    TENSORBOARD = "tensorboard"
    MLRUNS = "mlruns"
    TRACKERS = "trackers.json"
    # held by `rlr-fast train` from its start to its end (an OS lock, gone with the process): a
    # second training of the same folder (--force, --resume, or a new run) is refused while it is
    LOCK = ".training.lock"

    TRAINING_FILES = (CHECKPOINT, BEST, CONFIG, LOG, TRACKERS)
    DERIVED_FILES = (METRICS, THRESHOLDS, REPORT, "model.onnx", "model.xml", "model.bin", "weights.pt",
                     INT8, "model-int8.bin", ENGINES)
    FOLDERS = (FEATURES, OVERLAYS, PREDICTIONS, TENSORBOARD, MLRUNS)

    def __init__(self, path):
        path = Path(path)
        self.file: Optional[Path] = path if path.is_file() else None
        self.dir: Path = path.parent if self.file is not None else path
        self._fingerprints: dict = {}

    def __repr__(self) -> str:
        return f"Run({str(self.file or self.dir)!r})"

    # ---------------------------------------------------------------------------------- paths
    def path(self, name: str) -> Path:
        return self.dir / name

    @property
    def checkpoint(self) -> Path:
        return self.dir / self.CHECKPOINT

    @property
    def best(self) -> Path:
        return self.dir / self.BEST

    @property
    def config(self) -> Path:
        return self.dir / self.CONFIG

    @property
    def log(self) -> Path:
        return self.dir / self.LOG

    @property
    def metrics(self) -> Path:
        return self.dir / self.METRICS

    @property
    def thresholds_file(self) -> Path:
        return self.dir / self.THRESHOLDS

    @property
    def report(self) -> Path:
        return self.dir / self.REPORT

    @property
    def features(self) -> Path:
        return self.dir / self.FEATURES

    @property
    def overlays(self) -> Path:
        return self.dir / self.OVERLAYS

    @property
    def predictions(self) -> Path:
        return self.dir / self.PREDICTIONS

    @property
    def tensorboard(self) -> Path:
        return self.dir / self.TENSORBOARD

    def export_file(self, fmt: str, int8: bool = False) -> Path:
        """Where ``rlr-fast export --format fmt`` writes by default (onnx, openvino, weights);
        ``int8``: the INT8 OpenVINO model (``--format openvino --int8``)."""
        return self.dir / (self.INT8 if int8 else self.EXPORTS[fmt])

    @property
    def engines_record(self) -> Path:
        """The speed and accuracy of each engine and precision (``python -m rlr_fast.measure``)."""
        return self.dir / self.ENGINES

    def model_file(self) -> Path:
        """The file that holds the model this run serves: the given file, else ``best.pt`` (its
        best epoch) when the run has one, else its latest ``checkpoint.pt``."""
        if self.file is not None:
            return self.file
        return self.best if self.best.is_file() else self.checkpoint

    @contextlib.contextmanager
    def training_lock(self, command: str = "rlr-fast train") -> Iterator[None]:
        """Hold the run folder for one training (created if missing): raises
        :class:`~rlr_fast.errors.RunBusyError`, naming the process that holds it, while another
        process trains in this folder. Two trainings of one folder would mix their checkpoints,
        logs and feature caches, or one would remove the other's files (``--force``)."""
        from .io import LockHeld, exclusive_lock

        created = not self.dir.exists()
        self.dir.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        try:
            with exclusive_lock(self.dir / self.LOCK, me):
                yield
        except LockHeld as e:
            holder = e.holder
            who = (f"process {holder['pid']} on {holder.get('host', '?')} ({holder.get('command', '?')}, "
                   f"since {holder.get('started', '?')})" if "pid" in holder else "another process")
            raise RunBusyError(f"{self.dir} is being trained by {who}; wait for it to end or stop it, or "
                               f"give another --out: two trainings in one run folder would mix their "
                               f"checkpoints and logs") from None
        finally:
            if created:  # a training refused before it wrote anything leaves no empty folder
                with contextlib.suppress(OSError):
                    self.dir.rmdir()  # only if empty

    # ------------------------------------------------------------------------ what is there
    def entries(self) -> List[str]:
        """The names of what a run left in the folder (training files, derived files, folders)."""
        names = self.TRAINING_FILES + self.DERIVED_FILES + self.FOLDERS
        return [name for name in names if (self.dir / name).exists()]

    def clear(self) -> List[str]:
        """Remove everything a run wrote in the folder (and nothing else): what ``train --force``
        does. Returns the names removed."""
        removed = self.entries()
        for name in removed:
            path = self.dir / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        return removed

    # -------------------------------------------------------------------------- fingerprints
    def served_fingerprint(self) -> Optional[str]:
        """The fingerprint of the model the run serves (:meth:`model_file`), or None when the folder
        holds no model file (e.g. a deployment folder with only an export and its thresholds)."""
        path = self.model_file()
        if not path.is_file() or path.suffix != ".pt":
            return None
        stat = path.stat()
        key = (str(path), stat.st_mtime_ns, stat.st_size)
        if key not in self._fingerprints:
            from .checkpoints import read_checkpoint

            self._fingerprints[key] = fingerprint(read_checkpoint(path)["state_dict"])
        return self._fingerprints[key]

    def remake_command(self, derived: Path) -> str:
        """The command that makes a derived file again."""
        name = derived.name
        if name == self.INT8 or name.endswith("-int8.xml"):
            out = "" if derived == self.dir / self.INT8 else f" --out {derived}"
            return f"`rlr-fast export --run {self.dir} --format openvino --int8 --data DATA{out}`"
        if name == self.ENGINES:
            return f"`python -m rlr_fast.measure --run {self.dir} --data DATA`"
        for fmt, default in self.EXPORTS.items():
            if name == default or (fmt == "openvino" and derived.suffix == ".xml"):
                out = "" if derived == self.dir / default else f" --out {derived}"
                return f"`rlr-fast export --run {self.dir} --format {fmt}{out}`"
        if name in (self.THRESHOLDS, self.METRICS, self.REPORT, self.OVERLAYS):
            return f"`rlr-fast test --data DATA --run {self.dir}`"
        return f"`rlr-fast predict --run {self.dir} ...`"

    def check(self, derived: Path, recorded: Optional[str], expected: Optional[str]) -> None:
        """Refuse ``derived`` (a file made from a model) when the fingerprint it records is not
        ``expected`` (the model it is used with). A legacy file (``recorded`` None) is refused when
        it is older than the run's checkpoint (``best.pt``, else ``checkpoint.pt``), else used as
        it is; with no ``expected`` (no model file to compare with) nothing can be checked."""
        derived = Path(derived)
        remake = self.remake_command(derived)
        if recorded is not None and expected is not None:
            if recorded != expected:
                raise StaleRunError(f"{derived} was made from another model (fingerprint {recorded}) than the one "
                                    f"{self.model_file()} holds now ({expected}): it was trained again since; "
                                    f"make it again with {remake}")
            return
        if recorded is None:
            # the checkpoint the served model came from (an export or weights.pt given as the run
            # is itself derived from it)
            source = next((p for p in (self.best, self.checkpoint) if p.is_file()), self.model_file())
            if source.is_file() and derived.exists() and derived.stat().st_mtime_ns < source.stat().st_mtime_ns:
                raise StaleRunError(f"{derived} records no model fingerprint (written by an older rlr-fast) and is "
                                    f"older than {source}, so it may come from an earlier model; make it again "
                                    f"with {remake}")

    # ------------------------------------------------------------------------- derived files
    def thresholds(self, expected: Optional[str] = None, check: bool = True):
        """The run's decision thresholds (:class:`~rlr_fast.decisions.Thresholds`), or None before
        ``rlr-fast test`` has run; refused (:class:`StaleRunError`) when made from another model
        than the one with fingerprint ``expected`` (default: the model the run serves)."""
        from .decisions import Thresholds

        path = self.thresholds_file
        if not path.is_file():
            return None
        thresholds = Thresholds.load(path)
        if check:
            self.check(path, thresholds.fingerprint, expected if expected is not None else self.served_fingerprint())
        return thresholds

    def save_thresholds(self, thresholds, fingerprint: str) -> Path:
        """Store the decision thresholds, recording the fingerprint of the model they were fitted for."""
        from dataclasses import replace

        replace(thresholds, fingerprint=fingerprint).save(self.thresholds_file)
        return self.thresholds_file

    @classmethod
    def write_source(cls, folder, fingerprint: str, made_by: str) -> None:
        """Record in a derived folder (overlays, predictions) the model it was made from."""
        from .io import atomic_write_json

        Path(folder).mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(folder) / cls.SOURCE, {"fingerprint": fingerprint, "made_by": made_by})

    @classmethod
    def read_source(cls, folder) -> Optional[str]:
        """The fingerprint a derived folder records (None: none recorded)."""
        path = Path(folder) / cls.SOURCE
        try:
            return json.loads(path.read_text()).get("fingerprint")
        except (OSError, ValueError, AttributeError):
            return None
