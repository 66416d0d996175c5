"""Checkpoints and trained models: what a run folder's ``checkpoint.pt`` and ``best.pt`` hold,
reading them back safely (``weights_only``, checked format), and the model of a run
(:func:`load_model`). Models are found by name in rlr_fast.models.registry.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from .backbone import input_norm_of, set_input_norm
from .errors import CheckpointError, UsageError
from .io import atomic_torch_save
from .runs import Run, fingerprint

CHECKPOINT = Run.CHECKPOINT  # the latest state: model, optimizer, schedule, RNG (what --resume reads)
BEST = Run.BEST  # the model of the best epoch by a criterion on training data (what load_model reads)
FORMAT = "rlr-fast/1"
# What the commands write into a run folder (rlr_fast.runs.Run names them all): `--force` removes
# these, and only these.
RUN_FILES = Run.TRAINING_FILES + Run.DERIVED_FILES
RUN_FOLDERS = Run.FOLDERS


def model_class(name: str):
    """The model class of a model's name (rlr_fast.models.registry: a short name or a variant)."""
    from .models.registry import model_class as lookup

    return lookup(name)


def build_model(name: str, config: dict):
    """The model `name` built with `config` over its variant's defaults (rlr_fast.models.create_model)."""
    from .models.registry import create_model

    return create_model(name, **config)


def default_image_size(name: str) -> int:
    """The input side a model is built with when no image size is given."""
    return model_class(name).default_image_size()


def run_entries(out_dir) -> list:
    """The names of what a run left in `out_dir` (checkpoint, config, log, metrics, exports...)."""
    return Run(out_dir).entries()


def clear_run(out_dir) -> list:
    """Remove what a run wrote in `out_dir` (and nothing else); returns the names removed."""
    return Run(out_dir).clear()


def save_checkpoint(path, model, optimizer=None, scheduler=None, epoch: int = 0, train_config=None,
                    history=None, extra=None) -> None:
    """Write model (config and weights), optimizer, schedule, epoch and RNG state, atomically."""
    state = {
        "format": FORMAT,
        "model": model.name,
        "config": asdict(model.config),
        "state_dict": model.state_dict(),
        "epoch": epoch,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "train_config": asdict(train_config) if train_config is not None else None,
        "history": history or [],
        "rng": torch.get_rng_state(),
        "cuda_rng": _cuda_rng_state(),
        "extra": extra or {},
        "input_norm": input_norm_of(model),
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(state, path)


def read_checkpoint(path) -> dict:
    """A checkpoint file, or a run folder's latest checkpoint (``checkpoint.pt``)."""
    path = Path(path)
    if path.is_dir():
        path = Run(path).checkpoint
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path} (train a model with `rlr-fast train` first)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # truncated, empty, random bytes, or a pickle that would run code: never run it
        raise CheckpointError(f"{path} is not a readable rlr-fast checkpoint (truncated, empty, "
                              f"or not written by rlr-fast)") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an rlr-fast checkpoint (no {FORMAT!r} format tag)")
    missing = [key for key in ("model", "config", "state_dict") if key not in state]
    if missing:
        raise CheckpointError(f"{path} is not a readable rlr-fast checkpoint (it lacks {', '.join(missing)})")
    try:
        model_class(state["model"])
    except UsageError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return state


def model_from_checkpoint(state: dict, device="cpu", source="the checkpoint"):
    """The trained model of a checkpoint read by :func:`read_checkpoint`, in eval mode on `device`;
    `source` names the checkpoint in errors."""
    config = {**model_class(state["model"]).legacy_config, **state["config"]}
    if config.get("backbone_weights") not in ("random",):
        # The checkpoint holds the backbone's weights: build it without loading them again.
        config["backbone_weights"] = "random"
    model = build_model(state["model"], config)
    try:
        model.load_state_dict(state["state_dict"])
    except RuntimeError as e:  # missing, unexpected or misshapen tensors
        first = str(e).strip().splitlines()[-1].strip()
        raise CheckpointError(f"{source}: its weights do not fit the {state['model']} model it "
                              f"describes ({first})") from None
    model.config.backbone_weights = state["config"].get("backbone_weights", "default")
    set_input_norm(model, checkpoint_input_norm(state))
    model.fingerprint = fingerprint(state["state_dict"])  # what files derived from this model record
    return model.to(device).eval()


def checkpoint_input_norm(state: dict) -> str:
    """What the checkpoint's backbone was fed: checkpoints written before backbones got their own
    normalisation lack the key and were fed the ImageNet normalisation (see rlr_fast.backbone)."""
    return state.get("input_norm", "imagenet")


def model_file(run_or_checkpoint) -> Path:
    """The file that holds a run's model: ``best.pt`` (its best epoch) when the run has one, else
    its latest ``checkpoint.pt``; a file is itself."""
    return Run(run_or_checkpoint).model_file()


def load_model(run_or_checkpoint, device="cpu", thresholds: bool = True):
    """The trained model of a run folder (its best epoch's, ``best.pt``, when the run has one) or
    of a checkpoint file, in eval mode on `device`, with the run's decision thresholds
    (``model.thresholds``; None before `rlr-fast test` has run, or with ``thresholds=False``).
    Thresholds fitted for another model (the run was trained again since `rlr-fast test`) are
    refused with :class:`~rlr_fast.errors.StaleRunError`, which names the command that remakes them."""
    run = Run(run_or_checkpoint)
    path = run.model_file()
    model = model_from_checkpoint(read_checkpoint(path), device, source=path)
    model.thresholds = run.thresholds(expected=model.fingerprint) if thresholds else None
    return model



def save_best(path, model, record: dict, extra=None) -> None:
    """The model of the best epoch so far (no optimizer: ``load_model`` reads it)."""
    atomic_torch_save({"format": FORMAT, "model": model.name, "config": asdict(model.config),
                       "state_dict": model.state_dict(), "epoch": record["epoch"], "record": record,
                       "extra": extra or {}, "input_norm": input_norm_of(model)}, path)



def _cuda_rng_state():
    """Every GPU's generator state (None without CUDA), for the checkpoint."""
    return torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None


def _restore_cuda_rng(states) -> None:
    """The CUDA generators' states of a checkpoint, on as many GPUs as both have."""
    if states is not None and torch.cuda.is_available():
        for index, state in enumerate(states[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, index)

