"""Training on cached features, checkpoints and resume, single process or DistributedDataParallel.

A run folder holds ``checkpoint.pt`` (the latest state), ``config.json`` and ``log.jsonl`` (one
line per epoch), all written atomically (:mod:`rlr_fast.io`) at the end of every epoch.
``resume=True`` continues from the checkpoint with the optimizer, schedule, epoch and random
state restored, so a killed run ends with the same weights as an uninterrupted one.

Under torchrun each rank trains on its own shard of the data (``features.shard``) and its own
feature cache; DistributedDataParallel keeps the weights identical, rank 0 writes the run, and an
epoch's loss and throughput are those of all ranks together.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .backbone import input_norm_of, set_input_norm
from .decisions import Thresholds
from .errors import CheckpointError, TrainingDiverged, UsageError
from .features import FeatureCache
from .io import atomic_torch_save, atomic_write_json, atomic_write_text
from .precision import bf16_supported, effective_precision
from .progress import progress as progress_bar
from .runs import Run, fingerprint
from .timing import clock
from .trackers import NullTracker

CHECKPOINT = Run.CHECKPOINT  # the latest state: model, optimizer, schedule, RNG (what --resume reads)
BEST = Run.BEST  # the model of the best epoch by a criterion on training data (what load_model reads)
FORMAT = "rlr-fast/1"
# What the commands write into a run folder (rlr_fast.runs.Run names them all): `--force` removes
# these, and only these.
RUN_FILES = Run.TRAINING_FILES + Run.DERIVED_FILES
# An epoch loss above this multiple of the best epoch's (after warm-up) is reported as a rise.
RISE_FACTOR = 1.25
RUN_FOLDERS = Run.FOLDERS


@dataclass
class TrainConfig:
    epochs: int = 20
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_epochs: int = 2
    schedule: str = "cosine"  # "cosine" (after warm-up) or "constant"
    grad_clip: float = 0.0  # 0: none
    optimizer: str = "adam"  # "adam" or "adamw"
    amp: str = "auto"  # "auto" (bf16 where the device has it natively, else none), "none", "bf16", "fp16"
    seed: int = 0
    # the share of each class's training images held out for the validation loss that picks the
    # best epoch (RLR and UniAD; 0: none, the training loss picks it)
    val_fraction: float = 0.1


# "fast" is for minutes on a CPU with a few dozen images per class (README: "A training that says
# when it does not learn" and the accuracy benchmark). "paper" is the recipe of the RLR paper: Adam,
# lr 1e-4, batch 4, 200 epochs, fp32; "uniad" UniAD's: AdamW 1e-4, weight decay 1e-4, gradient
# clipping 0.1.
# RLR's network (2 layers, d 128/256 at 256 px) costs a quarter of the paper's per epoch; it gets
# twice the epochs, which measured better than the paper's network with 20 (README, accuracy), and
# batches of 4: twice the optimizer steps for the same images, since the network underfits (its
# held-out error equals its training error); measured better on the accuracy benchmark.
RLR_FAST_EPOCHS = 40
RLR_FAST_BATCH = 4
RECIPES = {
    "fast": TrainConfig(),
    "rlr-fast": TrainConfig(epochs=RLR_FAST_EPOCHS, batch_size=RLR_FAST_BATCH),
    "paper": TrainConfig(epochs=200, batch_size=4, lr=1e-4, warmup_epochs=0, schedule="constant", amp="none"),
    "uniad": TrainConfig(epochs=1000, batch_size=8, lr=1e-4, weight_decay=1e-4, warmup_epochs=0,
                         schedule="constant", grad_clip=0.1, optimizer="adamw", amp="none"),
    # ResAD's official code: Adam, lr 1e-5, weight decay 5e-4, batch 32, 100 epochs (its step decay
    # at epochs 70 and 90 is left out); "resad-fast" is for minutes on a CPU (see the README).
    "resad": TrainConfig(epochs=100, batch_size=32, lr=1e-5, weight_decay=5e-4, warmup_epochs=0,
                         schedule="constant", amp="none"),
    "resad-fast": TrainConfig(epochs=8, batch_size=8, lr=1e-3, weight_decay=5e-4, warmup_epochs=1, amp="none"),
}


def recipe(name: str, **overrides) -> TrainConfig:
    if name not in RECIPES:
        raise UsageError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return replace(RECIPES[name], **{k: v for k, v in overrides.items() if v is not None})


# ------------------------------------------------------------------------------------------------
# Models and checkpoints
# ------------------------------------------------------------------------------------------------

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


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------

class _LossOf(nn.Module):
    """DDP synchronises gradients through forward(): route the loss through it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, feats):
        return self.model.loss(feats)


def _lr_lambda(cfg: TrainConfig, steps_per_epoch: int):
    warm = cfg.warmup_epochs * steps_per_epoch
    total = max(1, cfg.epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - warm) / max(1, total - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def distributed_context(device=None):
    """(rank, world size) when launched by torchrun, else (0, 1). The process group uses nccl
    for a CUDA ``device`` (None: CUDA when available) and gloo otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if not dist.is_initialized():
            cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
            dist.init_process_group("nccl" if cuda else "gloo")
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_device(device, world: int) -> torch.device:
    """This process's device: under torchrun on GPU, ``cuda:LOCAL_RANK`` (a plain "cuda" would put
    every rank on the first GPU); otherwise ``device`` as given."""
    device = torch.device(device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device


def _cuda_rng_state():
    """Every GPU's generator state (None without CUDA), for the checkpoint."""
    return torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None


def _restore_cuda_rng(states) -> None:
    """The CUDA generators' states of a checkpoint, on as many GPUs as both have."""
    if states is not None and torch.cuda.is_available():
        for index, state in enumerate(states[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, index)


def _epoch_totals(loss_sum: float, seen: int, seconds: float, world: int, device, terms=None):
    """(loss sum, images, seconds, term sums) of the epoch over every rank: images and sums
    summed, the time of the slowest rank, so images / seconds is the throughput of the whole job.
    ``terms``: the model's named loss terms, each summed over the epoch's images (or None)."""
    terms = dict(terms or {})
    if world == 1:
        return loss_sum, seen, seconds, terms
    sums = torch.tensor([loss_sum, seen, *terms.values()], dtype=torch.float64, device=device)
    slowest = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(sums)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return float(sums[0]), int(sums[1]), float(slowest), dict(zip(terms, sums[2:].tolist()))


def _add_terms(sums: dict, model, images: int) -> None:
    """Add a model's named loss terms of the last step (``model.last_terms``: name -> float, set
    by its ``loss``; absent for a model with a single term) to ``sums``, weighted by images."""
    for name, value in (getattr(model, "last_terms", None) or {}).items():
        sums[name] = sums.get(name, 0.0) + float(value) * images


def _start_run(out_dir: Path, model, cfg: TrainConfig, extra: Optional[dict]) -> None:
    """A new run's folder: config.json (model, its config, the training config, `extra`), no old log."""
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(Run(out_dir).config, {"model": model.name, "config": asdict(model.config),
                                                "train": asdict(cfg), **(extra or {})})
    with contextlib.suppress(FileNotFoundError):  # a new run starts a new log
        Run(out_dir).log.unlink()


def _write_log(out_dir: Path, history: list) -> None:
    atomic_write_text(Run(out_dir).log, "".join(json.dumps(r) + "\n" for r in history))


def resolve_amp(amp: str, device) -> str:
    """The mixed precision a run trains with: "auto" is bf16 where the device computes it natively
    (CPUs with AVX-512 BF16 or AMX, recent GPUs) and none elsewhere; "bf16" on a device without
    it trains fp32 and says so (emulated bf16 is slower than fp32)."""
    if amp == "auto":
        return "bf16" if bf16_supported(device) else "none"
    return "none" if amp == "bf16" and effective_precision("bf16", device) == "fp32" else amp


def validation_loss(model, cache: FeatureCache, device, amp_dtype=None, batch_size: int = 16) -> float:
    """The model's loss on held-out training images, in eval mode (RLR and UniAD: no jitter), as
    the mean over images."""
    was_training = model.training
    model.eval()
    total, seen = 0.0, 0
    with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        for start in range(0, len(cache), batch_size):
            idx = np.arange(start, min(len(cache), start + batch_size))
            total += float(model.loss(cache.batch(idx, device))) * len(idx)
            seen += len(idx)
    model.train(was_training)
    return total / max(1, seen)


def selection_loss(record: dict) -> float:
    """What picks the best epoch: the held-out loss when there is one, else the training loss."""
    return record.get("val_loss", record["loss"])


def save_best(path, model, record: dict, extra=None) -> None:
    """The model of the best epoch so far (no optimizer: ``load_model`` reads it)."""
    atomic_torch_save({"format": FORMAT, "model": model.name, "config": asdict(model.config),
                       "state_dict": model.state_dict(), "epoch": record["epoch"], "record": record,
                       "extra": extra or {}, "input_norm": input_norm_of(model)}, path)


def _check_finite(value: float, epoch: int, step: int, world: int, device, out_dir: Path, lr: float,
                  what: str = "loss") -> None:
    """Stop the run on a non-finite loss or gradient norm (on every rank when any rank has one),
    before the optimizer step, so the last checkpoint keeps finite weights."""
    bad = not math.isfinite(value)
    if world > 1:
        flag = torch.tensor([float(bad)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        bad = bool(flag.item())
    if bad:
        kept = (f"the last checkpoint, {out_dir / CHECKPOINT}, holds epoch {epoch - 1}" if epoch > 1
                else "no checkpoint was written")
        raise TrainingDiverged(f"training diverged: the {what} became {value} at epoch {epoch}, step {step + 1}; "
                               f"{kept}. Train again with a lower --lr (this run's was {lr:g}) or --force "
                               f"a new run")


def _rise_warning(history: list, record: dict, cfg: TrainConfig) -> Optional[str]:
    """A training loss well above the best epoch's after warm-up: the sign of a collapse."""
    if record["epoch"] <= cfg.warmup_epochs or not history:
        return None
    best = min(history, key=lambda r: r["loss"])
    if record["loss"] > RISE_FACTOR * best["loss"]:
        return (f"loss {record['loss']:.4g} is {record['loss'] / best['loss']:.2f}x its best "
                f"({best['loss']:.4g} at epoch {best['epoch']}): the training may be diverging; "
                f"try a lower --lr")
    return None


def run_params(model, cfg: TrainConfig, extra: Optional[dict] = None) -> dict:
    """The settings of a run as flat name -> value pairs, for a tracker's parameters."""
    params = {"model": model.name, **{f"config.{k}": v for k, v in asdict(model.config).items()},
              **{f"train.{k}": v for k, v in asdict(cfg).items()}}
    for key, value in (extra or {}).items():
        params[key] = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value
    return params


def _epoch_scalars(record: dict) -> dict:
    """An epoch's record as tracker scalars (rlr_fast.trackers: the per-epoch tags)."""
    values = {"train/epoch_loss": record["loss"], "train/images_per_s": record["images_per_s"],
              "train/grad_norm": record["grad_norm"]}
    if "val_loss" in record:
        values["train/val_loss"] = record["val_loss"]
    values.update({f"train/term/{k}": v for k, v in record.get("terms", {}).items()})
    return values


def train(model, cache: FeatureCache, out_dir, cfg: TrainConfig, *, resume: bool = False, device="cpu",
          progress: bool = True, log=print, on_epoch_end=None, extra: Optional[dict] = None,
          val_cache: Optional[FeatureCache] = None, tracker=None) -> list:
    """Train `model` on cached features; checkpoint every epoch into `out_dir`. Returns the history
    (one dict per epoch: epoch, loss, lr, grad_norm (mean over the epoch's steps, before any
    clipping), images (of every rank), seconds, images_per_s; ``terms``, the epoch means of the
    model's named loss terms when its loss sets ``last_terms``; val_loss with a `val_cache`;
    warning when the loss rose well above its best).

    The run keeps two files: ``checkpoint.pt``, the latest state (for --resume), and
    ``best.pt``, the model of the best epoch by the held-out loss on `val_cache` (images held
    out of the training set, never the test set), or by the training loss without one;
    ``load_model`` reads ``best.pt``. A non-finite loss stops the run with
    :class:`~rlr_fast.errors.TrainingDiverged` before the weights are touched.
    `on_epoch_end(model, record)`, if given, runs after each epoch's checkpoint (e.g. a
    validation); the model is put back in train mode after it. `extra` (e.g. the training
    classes) goes into the checkpoint and config.json. `progress=False` hides the bars; each
    epoch's loss line is always logged.

    `tracker` (rlr_fast.trackers; None: none) is sent, on rank 0, the run's settings, each step's
    loss and learning rate at the global step ``epoch * steps_per_epoch + step`` (a resumed run
    continues the count) and each epoch's record at its last step, and is flushed after each
    epoch's checkpoint; the caller closes it.

    A training-free model (``model.training_free``, PatchCore) is fitted instead, in one pass
    over the cached features: see :func:`fit`."""
    if model.training_free:
        return fit(model, cache, out_dir, cfg, device=device, progress=progress, log=log, extra=extra,
                   tracker=tracker)
    out_dir = Path(out_dir)
    rank, world = distributed_context(device)
    tracker = tracker if tracker is not None and rank == 0 else NullTracker()
    device = torch.device(device)
    model.to(device).train()
    ckpt_path = out_dir / CHECKPOINT
    if not (resume and ckpt_path.is_file()):  # a resumed run has what prepare() fits in its checkpoint
        model.prepare(cache)
    params = [p for p in model.parameters() if p.requires_grad]
    opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    optimizer = opt_cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = len(cache)
    steps_per_epoch = max(1, n // cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg, steps_per_epoch))
    history, start_epoch = [], 0
    if resume and ckpt_path.is_file():
        state = read_checkpoint(ckpt_path)
        if state["model"] != model.name or {**model.legacy_config, **state["config"]} != asdict(model.config):
            raise UsageError(f"cannot resume {ckpt_path}: it holds a different model or configuration")
        if checkpoint_input_norm(state) != input_norm_of(model):
            raise UsageError(f"cannot resume {ckpt_path}: it was trained on features of a backbone fed the "
                             f"{checkpoint_input_norm(state)!r} normalisation, this model's is fed "
                             f"{input_norm_of(model)!r}; start a new run with --force")
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, history = state["epoch"], list(state["history"])
        torch.set_rng_state(state["rng"])
        _restore_cuda_rng(state.get("cuda_rng"))
        extra = {**state.get("extra", {}), **(extra or {})}
        if rank == 0:  # the checkpoint's history is the record: rewrite the log from it
            _write_log(out_dir, history)
        log(f"resuming {ckpt_path} at epoch {start_epoch}/{cfg.epochs}")
    elif rank == 0:
        _start_run(out_dir, model, cfg, extra)
    tracker.log_params(run_params(model, cfg, extra))
    runner = _LossOf(model)
    if world > 1:
        runner = nn.parallel.DistributedDataParallel(runner, device_ids=[device.index] if device.type == "cuda" else None)
    amp = resolve_amp(cfg.amp, device)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    for epoch in range(start_epoch, cfg.epochs):
        model.begin_epoch(epoch, cfg.epochs)  # a model whose loss changes over training (ResAD's stages)
        # The order of an epoch depends only on (seed, epoch): a resumed run sees the same batches.
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch))
        t0, total, seen, term_sums = clock(device), 0.0, 0, {}
        bar = progress_bar(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step",
                           enabled=progress and rank == 0, leave=False)
        grad_norms = []
        for step in bar:
            idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            feats = cache.batch(idx.numpy(), device)
            lr = optimizer.param_groups[0]["lr"]  # this step's (the scheduler steps after it)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = runner(feats)
            value = loss.item()
            _check_finite(value, epoch + 1, step, world, device, out_dir, cfg.lr)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)  # the gradient norm is logged in the loss's own scale
            grad_norms.append(float(nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)))
            if not scaler.is_enabled():  # (fp16's scaler skips the steps whose gradients overflow)
                _check_finite(grad_norms[-1], epoch + 1, step, world, device, out_dir, cfg.lr, what="gradient norm")
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            tracker.log_scalars(epoch * steps_per_epoch + step, {"train/loss": value, "train/lr": lr})
            total += value * len(idx)
            _add_terms(term_sums, model, len(idx))
            seen += len(idx)
            bar.set_postfix(loss=f"{total / seen:.4f}", img_per_s=f"{seen * world / (time.perf_counter() - t0):.1f}")
        total, seen, seconds, term_sums = _epoch_totals(total, seen, clock(device) - t0, world, device, term_sums)
        finite_norms = [g for g in grad_norms if math.isfinite(g)]  # fp16 scaler steps it skipped are inf
        record = {"epoch": epoch + 1, "loss": total / max(1, seen), "lr": optimizer.param_groups[0]["lr"],
                  "grad_norm": round(sum(finite_norms) / max(1, len(finite_norms)), 4),
                  "images": seen, "seconds": round(seconds, 3), "images_per_s": round(seen / seconds, 2)}
        if term_sums:
            record["terms"] = {k: v / max(1, seen) for k, v in term_sums.items()}
        if val_cache is not None:
            record["val_loss"] = validation_loss(model, val_cache, device, amp_dtype)
        warning = _rise_warning(history, record, cfg)
        if warning:
            record["warning"] = warning
        best = min(history, key=selection_loss) if history else None
        history.append(record)
        if rank == 0:
            save_checkpoint(ckpt_path, model, optimizer, scheduler, epoch + 1, cfg, history, extra)
            if model.select_best_epoch and (best is None or selection_loss(record) <= selection_loss(best)
                                            or not (out_dir / BEST).is_file()):
                save_best(out_dir / BEST, model, record, extra)
            _write_log(out_dir, history)
            terms = "".join(f"  {k} {v:.4g}" for k, v in record.get("terms", {}).items())
            val = f"  held-out {record['val_loss']:.4f}" if "val_loss" in record else ""
            log(f"epoch {epoch + 1}/{cfg.epochs}  loss {record['loss']:.4f}{terms}{val}  "
                f"{record['images_per_s']:.1f} img/s" + (f"  warning: {warning}" if warning else ""))
            # after the checkpoint: what the tracker holds is what a resume continues from
            tracker.log_scalars((epoch + 1) * steps_per_epoch - 1, _epoch_scalars(record))
            tracker.flush()
        if on_epoch_end is not None:
            on_epoch_end(model, record)
            model.train()
    model.eval()
    if model.score_is_fitted_after_training():
        _fit_score(model, cache, out_dir, rank, world, log,
                   lambda: save_checkpoint(ckpt_path, model, optimizer, scheduler, cfg.epochs, cfg, history, extra))
    return history


def _fit_score(model, cache: FeatureCache, out_dir: Path, rank: int, world: int, log, save_last) -> None:
    """After the last epoch: load the weights the run serves (``best.pt``'s when it keeps its
    best epoch) into `model`, fit its score's statistics on the training features
    (``model.fit_score``, every rank on its share) and write them into that file. A run stopped
    before this point serves a model whose score falls back to the unfitted one (RLR: the paper's)."""
    if world > 1:
        dist.barrier()  # rank 0 has written best.pt
    best_path = out_dir / BEST
    state = read_checkpoint(best_path) if model.select_best_epoch and best_path.is_file() else None
    if state is not None:
        model.load_state_dict(state["state_dict"])
    t0 = time.perf_counter()
    model.fit_score(cache)
    if rank == 0:
        if state is not None:
            save_best(best_path, model, state["record"], state.get("extra"))
        else:
            save_last()
        log(f"fitted the score's statistics on {len(cache)} training images "
            f"({time.perf_counter() - t0:.1f} s; epoch {state['epoch'] if state else 'last'}'s weights)")


def fit(model, cache: FeatureCache, out_dir, cfg: TrainConfig, *, device="cpu", progress: bool = True, log=print,
        extra: Optional[dict] = None, tracker=None) -> list:
    """Fit a training-free model (PatchCore: its memory bank) on cached features, with no
    gradient step, and write the run as a training does: ``config.json``, ``log.jsonl`` (one
    record) and ``checkpoint.pt`` (no optimizer state, so it cannot be resumed, only redone with
    --force). ``cfg.seed`` seeds the model's random choices (the coreset's start and projection);
    the rest of the recipe does not apply. Returns the history, one record: the epoch (1), the
    training tokens, the bank size, the coreset ratio, images and seconds. `tracker`
    (rlr_fast.trackers) is sent the settings and the record's numbers (``fit/<name>``, step 0)."""
    out_dir = Path(out_dir)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError(f"{model.name} is fitted in one pass over every training image: run it in one process, "
                         f"not under torchrun")
    device = torch.device(device)
    model.to(device).eval()
    _start_run(out_dir, model, cfg, extra)
    t0 = clock(device)
    info = model.fit(cache, seed=cfg.seed, progress=progress, log=log)
    seconds = clock(device) - t0
    history = [{"epoch": 1, **info, "images": len(cache), "seconds": round(seconds, 3)}]
    save_checkpoint(out_dir / CHECKPOINT, model, None, None, 1, cfg, history, extra)
    _write_log(out_dir, history)
    if tracker is not None:
        tracker.log_params(run_params(model, cfg, extra))
        tracker.log_scalars(0, {f"fit/{k}": v for k, v in history[0].items() if k != "epoch"}
                            | {"fit/images_per_s": len(cache) / seconds if seconds else float("nan")})
        tracker.flush()
    return history
