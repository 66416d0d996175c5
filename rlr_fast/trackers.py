"""Experiment trackers: what `rlr-fast train/test --logger tensorboard|mlflow` writes.

A run always keeps its own record (``log.jsonl``, ``metrics.json``); a tracker also sends the
numbers to a tool users already watch, offline:

- ``tensorboard``: event files in ``RUN/tensorboard/`` (``tensorboard --logdir RUN/tensorboard``);
- ``mlflow``: an MLflow run in a file store, ``RUN/mlruns/`` by default (``--mlflow-uri`` names
  another tracking URI, e.g. a server), one MLflow run per rlr-fast run: ``train --resume`` and
  ``test`` log into the run that ``train`` started (its id is kept in ``RUN/trackers.json``).

What is logged (the tags are the same for both; :data:`TRAIN_TAGS`, :data:`TEST_TAGS`):
training, per optimizer step, ``train/loss`` and ``train/lr``; per epoch, at its last step,
``train/epoch_loss``, ``train/images_per_s``, ``train/grad_norm``, ``train/val_loss`` (with
held-out images) and the model's loss terms ``train/term/<name>``; the run's settings as
parameters. `rlr-fast test`: ``test/<class>/<metric>`` and ``test/mean/<metric>`` (the values of
metrics.json), the thresholds and throughput, at the training's last step, and a few of the
overlay pictures as images (``overlays/<class>/<file>``).

Nothing reaches the tracker before the epoch that produced it is checkpointed: the values are
buffered and written by :meth:`flush`, which training calls after each epoch's checkpoint. So a
crash loses nothing a checkpoint holds, and ``--resume`` (which redoes the unfinished epoch, at
the same global steps ``epoch * steps_per_epoch + step``) logs no step twice. Under torchrun
only rank 0 logs (a per-step loss is rank 0's; an epoch's is of every rank).

The packages are optional (``pip install rlr-fast[trackers]``) and imported only when asked for.
"""
from __future__ import annotations

import importlib
import json
import os
import re
import time
from pathlib import Path
from typing import Dict, List, Optional, Protocol, Sequence, Tuple

import numpy as np

from .errors import UsageError
from .io import atomic_write_json
from .runs import Run

__all__ = ["LOGGERS", "Tracker", "NullTracker", "TensorBoardTracker", "MLflowTracker", "MultiTracker",
           "make_tracker", "check_loggers", "parse_loggers", "read_state", "overlay_images", "DEFAULT_EXPERIMENT"]

LOGGERS = ("tensorboard", "mlflow")
DEFAULT_EXPERIMENT = "rlr-fast"
# the package each logger needs: (module imported, pip name)
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow-skinny")}
# What the trackers are sent (for the README and the tests): per step, per epoch, after `test`.
STEP_TAGS = ("train/loss", "train/lr")
EPOCH_TAGS = ("train/epoch_loss", "train/images_per_s", "train/grad_norm")  # + train/val_loss, train/term/<name>
TRAIN_TAGS = STEP_TAGS + EPOCH_TAGS
TEST_TAGS = ("test/<class>/<metric>", "test/mean/<metric>", "test/threshold/image", "test/threshold/pixel",
             "test/images_per_s")
MLFLOW_BATCH = 1000  # MLflow's most metrics in one log_batch call
MLFLOW_PARAM_BATCH = 100  # and parameters


class Tracker(Protocol):
    """What training and `rlr-fast test` call; every call but :meth:`flush` and :meth:`close`
    only buffers."""

    def log_params(self, params: Dict[str, object]) -> None: ...

    def log_scalars(self, step: int, values: Dict[str, float]) -> None: ...

    def log_metrics(self, values: Dict[str, float], step: Optional[int] = None) -> None: ...

    def log_image(self, tag: str, image: np.ndarray, step: Optional[int] = None) -> None: ...

    def flush(self) -> None: ...  # write what is buffered (training: after each epoch's checkpoint)

    def close(self, failed: bool = False) -> None: ...  # failed: drop what is buffered


class NullTracker:
    """The default: the run's own log.jsonl and metrics.json only; writes nothing."""

    def log_params(self, params):
        pass

    def log_scalars(self, step, values):
        pass

    def log_metrics(self, values, step=None):
        pass

    def log_image(self, tag, image, step=None):
        pass

    def flush(self):
        pass

    def close(self, failed=False):
        pass


def _require(logger: str):
    """Import the package a logger needs, or a one-line UsageError naming what to install."""
    module, package = PACKAGES[logger]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UsageError(f"--logger {logger} needs the {package} package, which is not installed: "
                         f"pip install {package} (or pip install rlr-fast[trackers])") from None


def read_state(run_dir) -> dict:
    """``RUN/trackers.json``: the loggers the run has used (``loggers``), the last global step
    logged (``step``) and the MLflow run's address (``mlflow``: tracking URI and run id); {} when
    the run has none."""
    try:
        state = json.loads((Path(run_dir) / Run.TRACKERS).read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _update_state(run_dir, **changes) -> None:
    path = Path(run_dir) / Run.TRACKERS
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {**read_state(run_dir), **changes})


def _scalar(value) -> Optional[float]:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value


def _rgb(image: np.ndarray) -> np.ndarray:
    """An image as H x W x 3 uint8 (grey and RGBA are converted)."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"an image to log must be H x W x 3 (or x 4, or H x W), got shape {image.shape}")
    if image.dtype != np.uint8:
        image = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    return np.ascontiguousarray(image[..., :3])


class _Buffered:
    """What both trackers share: buffered values, written by :meth:`flush`, and the step the run
    has reached (kept in RUN/trackers.json so `test` logs at the training's last step)."""

    def __init__(self, run_dir):
        self.run_dir = Path(run_dir)
        self.params: Dict[str, str] = {}
        self.scalars: List[Tuple[int, str, float, int]] = []  # (step, tag, value, time in ms)
        self.images: List[Tuple[int, str, np.ndarray]] = []  # (step, tag, H x W x 3 uint8)
        self.last_step: Optional[int] = read_state(run_dir).get("step")

    def log_params(self, params):
        self.params.update({str(k): str(v) for k, v in params.items()})

    def log_scalars(self, step, values):
        now = int(time.time() * 1000)
        for tag, value in values.items():
            value = _scalar(value)
            if value is not None:
                self.scalars.append((int(step), tag, value, now))
        self.last_step = max(int(step), self.last_step if self.last_step is not None else int(step))

    def log_metrics(self, values, step=None):
        self.log_scalars((self.last_step or 0) if step is None else step, values)

    def log_image(self, tag, image, step=None):
        self.images.append(((self.last_step or 0) if step is None else int(step), tag, _rgb(image)))

    def flush(self):
        if self.params or self.scalars or self.images:
            self._write()
        self.params, self.scalars, self.images = {}, [], []
        if self.last_step is not None:
            _update_state(self.run_dir, step=self.last_step)

    def close(self, failed=False):
        """Write what is buffered and close; after a failure (``failed``) what is buffered is
        dropped instead: it belongs to an epoch no checkpoint holds, which a resume redoes."""
        if failed:
            self.params, self.scalars, self.images = {}, [], []
        else:
            self.flush()
        self._close(failed)

    def _write(self):  # pragma: no cover - every tracker has its own
        raise NotImplementedError

    def _close(self, failed):
        pass


class TensorBoardTracker(_Buffered):
    """Event files in ``RUN/tensorboard/`` (torch.utils.tensorboard's SummaryWriter): scalars,
    images, and the run's settings as a text table."""

    def __init__(self, run_dir):
        super().__init__(run_dir)
        _require("tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.folder = Run(run_dir).tensorboard
        self.writer = SummaryWriter(log_dir=str(self.folder))

    def _write(self):
        for step, tag, value, ms in self.scalars:
            self.writer.add_scalar(tag, value, step, walltime=ms / 1000)
        if self.params:
            rows = "".join(f"| {k} | {v} |\n" for k, v in sorted(self.params.items()))
            table = "| parameter | value |\n|---|---|\n" + rows
            self.writer.add_text("params", table, self.last_step or 0)
        for step, tag, image in self.images:
            self.writer.add_image(tag, image, step, dataformats="HWC")
        self.writer.flush()

    def _close(self, failed):
        self.writer.close()


_MLFLOW_KEY = re.compile(r"[^A-Za-z0-9_\-. :/]")


def mlflow_key(tag: str) -> str:
    """A tag as an MLflow metric or parameter name (letters, digits and ``_-. :/`` only)."""
    return _MLFLOW_KEY.sub("_", tag)


def default_mlflow_uri(run_dir) -> str:
    """The file store inside the run: ``file:`` URI of ``RUN/mlruns``."""
    return Path(run_dir).resolve().joinpath(Run.MLRUNS).as_uri()


class MLflowTracker(_Buffered):
    """One MLflow run per rlr-fast run, in the tracking store ``uri`` (default: the file store
    ``RUN/mlruns``), experiment ``experiment``: scalars as metrics with their step, the settings
    as parameters, images as artifacts (``<tag>.png``). A run resumed, or tested, logs into the
    MLflow run its training started when the store is the same.

    MLflow 3 keeps its file store in maintenance mode and refuses it unless
    ``MLFLOW_ALLOW_FILE_STORE`` is true: it is set (when unset) for a ``file:`` store, which
    needs no database packages."""

    def __init__(self, run_dir, uri: Optional[str] = None, experiment: str = DEFAULT_EXPERIMENT):
        super().__init__(run_dir)
        _require("mlflow")
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self.uri = uri or default_mlflow_uri(run_dir)
        if self.uri.startswith("file:") or "://" not in self.uri:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        try:
            self.client = MlflowClient(tracking_uri=self.uri)
            self.run_id = self._open_run(experiment)
        except MlflowException as e:
            raise UsageError(f"cannot log to the MLflow store {self.uri}: {e.message.splitlines()[0]}") from None
        # parameters are write-once in MLflow: a resumed run keeps the values it started with
        self.logged_params = set(self.client.get_run(self.run_id).data.params)

    def _open_run(self, experiment: str) -> str:
        kept = read_state(self.run_dir).get("mlflow") or {}
        if kept.get("uri") == self.uri and kept.get("run_id"):
            try:
                run = self.client.get_run(kept["run_id"])
                if run.info.lifecycle_stage == "active":
                    self.client.update_run(run.info.run_id, status="RUNNING")
                    return run.info.run_id
            except Exception:  # deleted or lost: start a new one
                pass
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found is not None else self.client.create_experiment(experiment)
        run = self.client.create_run(experiment_id, run_name=self.run_dir.resolve().name,
                                     tags={"rlr_fast.run": str(self.run_dir.resolve())})
        _update_state(self.run_dir, mlflow={"uri": self.uri, "run_id": run.info.run_id,
                                            "experiment_id": experiment_id})
        return run.info.run_id

    def _write(self):
        from mlflow.entities import Metric, Param

        params = [Param(mlflow_key(k), v[:6000]) for k, v in sorted(self.params.items())
                  if mlflow_key(k) not in self.logged_params]
        for start in range(0, len(params), MLFLOW_PARAM_BATCH):
            self.client.log_batch(self.run_id, params=params[start:start + MLFLOW_PARAM_BATCH])
        self.logged_params.update(p.key for p in params)
        metrics = [Metric(mlflow_key(tag), value, ms, step) for step, tag, value, ms in self.scalars]
        for start in range(0, len(metrics), MLFLOW_BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[start:start + MLFLOW_BATCH])
        for step, tag, image in self.images:
            self.client.log_image(self.run_id, image, artifact_file=f"{mlflow_key(tag)}.png")

    def _close(self, failed):
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


class MultiTracker:
    """Several trackers at once (``--logger tensorboard,mlflow``)."""

    def __init__(self, trackers: Sequence[Tracker]):
        self.trackers = list(trackers)

    def __getattr__(self, name):
        def each(*args, **kwargs):
            for tracker in self.trackers:
                getattr(tracker, name)(*args, **kwargs)

        return each


def parse_loggers(text: Optional[str]) -> Tuple[str, ...]:
    """``--logger``: none (the default), tensorboard, mlflow, or both comma-separated."""
    if text is None:
        return ()
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if names in ((), ("none",)):
        return ()
    unknown = [n for n in names if n not in LOGGERS]
    if unknown:
        raise UsageError(f"--logger {text}: unknown logger {', '.join(map(repr, unknown))}; "
                         f"choose none, {', '.join(LOGGERS)} or both comma-separated")
    return names


def check_loggers(loggers, mlflow_uri: Optional[str] = None) -> Tuple[str, ...]:
    """The logger names of ``--logger`` (text or names), checked before any work: known names,
    ``--mlflow-uri`` only with mlflow, and each one's package installed (else a UsageError that
    says what to install)."""
    names = parse_loggers(loggers) if loggers is None or isinstance(loggers, str) else tuple(loggers)
    if mlflow_uri is not None and "mlflow" not in names:
        raise UsageError("--mlflow-uri is for --logger mlflow; add --logger mlflow or leave it out")
    for name in names:
        _require(name)
    return names


def make_tracker(loggers, run_dir, *, mlflow_uri: Optional[str] = None,
                 mlflow_experiment: str = DEFAULT_EXPERIMENT, rank: int = 0) -> Tracker:
    """The tracker a command logs to: a :class:`NullTracker` without loggers (or on a rank other
    than 0 under torchrun), else the named ones for the run folder ``run_dir``. ``loggers``: a
    tuple of names or the text of ``--logger``."""
    names = check_loggers(loggers, mlflow_uri)
    if not names or rank != 0:
        return NullTracker()
    used = read_state(run_dir).get("loggers") or []
    _update_state(run_dir, loggers=[*used, *(n for n in names if n not in used)])  # for resume's note
    made = [TensorBoardTracker(run_dir) if name == "tensorboard"
            else MLflowTracker(run_dir, mlflow_uri, mlflow_experiment) for name in names]
    return made[0] if len(made) == 1 else MultiTracker(made)


def overlay_images(folder, per_class: int = 2) -> List[Tuple[str, np.ndarray]]:
    """A few of the overlay pictures `rlr-fast test` wrote (``folder/<class>/<defect>_<image>.png``):
    up to ``per_class`` per class, defective images first, as (``overlays/<class>/<name>``,
    H x W x 3 uint8)."""
    from PIL import Image

    chosen = []
    folder = Path(folder)
    if not folder.is_dir():
        return chosen
    for cls in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = sorted(cls.glob("*.png"), key=lambda p: (p.name.startswith("good_"), p.name))
        for path in files[:per_class]:
            with Image.open(path) as image:
                chosen.append((f"overlays/{cls.name}/{path.stem}", np.asarray(image.convert("RGB"))))
    return chosen
