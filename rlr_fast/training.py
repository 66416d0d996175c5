"""Training on cached features, checkpoints and resume, single process or DistributedDataParallel.

A run folder holds ``checkpoint.pt`` (the latest state), ``config.json`` and ``log.jsonl`` (one
line per epoch), all written atomically (:mod:`rlr_fast.io`) at the end of every epoch.
``resume=True`` continues from the checkpoint with the optimizer, schedule, epoch and random
state restored, so a killed run ends with the same weights as an uninterrupted one.

Under torchrun each rank trains on its own shard of the data (``features.shard``) and its own
feature cache; DistributedDataParallel keeps the weights identical, rank 0 writes the run, and an
epoch's loss and throughput are those of all ranks together.

This module is the training loop; the recipes (rlr_fast.recipes), checkpoints and trained models
(rlr_fast.checkpoints) and the DistributedDataParallel helpers (rlr_fast.distributed) have their
own modules, and their names are importable from here as before.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .backbone import input_norm_of
from .checkpoints import (BEST, CHECKPOINT, FORMAT, RUN_FILES, RUN_FOLDERS, _restore_cuda_rng,
                          build_model, checkpoint_input_norm, clear_run, default_image_size, load_model, model_class,
                          model_file, model_from_checkpoint, read_checkpoint, run_entries, save_best, save_checkpoint)
from .distributed import any_rank, distributed_context, epoch_totals, rank_device
from .errors import TrainingDiverged, UsageError
from .features import FeatureCache
from .io import atomic_write_json, atomic_write_text
from .precision import bf16_supported, effective_precision
from .progress import progress as progress_bar
from .recipes import RECIPES, RLR_FAST_BATCH, RLR_FAST_EPOCHS, TrainConfig, recipe
from .runs import Run
from .timing import clock
from .trackers import NullTracker

# The names this module held before its split, importable from here as before.
__all__ = ["BEST", "CHECKPOINT", "FORMAT", "RECIPES", "RISE_FACTOR", "RLR_FAST_BATCH", "RLR_FAST_EPOCHS",
           "RUN_FILES", "RUN_FOLDERS", "TrainConfig", "build_model", "checkpoint_input_norm", "clear_run",
           "default_image_size", "distributed_context", "fit", "load_model", "model_class", "model_file",
           "model_from_checkpoint", "rank_device", "read_checkpoint", "recipe", "resolve_amp", "run_entries",
           "run_params", "save_best", "save_checkpoint", "selection_loss", "train", "validation_loss"]
_epoch_totals = epoch_totals

# An epoch loss above this multiple of the best epoch's (after warm-up) is reported as a rise.
RISE_FACTOR = 1.25


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



def _check_finite(value: float, epoch: int, step: int, world: int, device, out_dir: Path, lr: float,
                  what: str = "loss") -> None:
    """Stop the run on a non-finite loss or gradient norm (on every rank when any rank has one),
    before the optimizer step, so the last checkpoint keeps finite weights."""
    if any_rank(not math.isfinite(value), world, device):
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


class _Loop:
    """What every step of a run uses: the model, its data, optimizer, schedule, precision and the
    ranks (built by :func:`train`)."""

    def __init__(self, model, cache: FeatureCache, out_dir: Path, cfg: TrainConfig, device, rank: int, world: int,
                 progress: bool, val_cache: Optional[FeatureCache], tracker):
        self.model, self.cache, self.out_dir, self.cfg, self.device = model, cache, out_dir, cfg, device
        self.rank, self.world, self.progress, self.val_cache, self.tracker = rank, world, progress, val_cache, tracker
        self.params = [p for p in model.parameters() if p.requires_grad]
        opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
        # The fused kernel updates every parameter in one pass (a step of RLR's default network on
        # a 2-core CPU: 6.5 ms instead of 17); the same update up to float rounding.
        fused = cfg.amp != "fp16" and all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point
                                          for p in self.params)
        self.optimizer = opt_cls(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)
        self.steps_per_epoch = max(1, len(cache) // cfg.batch_size)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(cfg, self.steps_per_epoch))

    def start(self) -> None:
        """The loss's runner (under DDP: wrapped once the weights are loaded), precision and scaler."""
        device = self.device
        self.runner = _LossOf(self.model)
        if self.world > 1:
            self.runner = nn.parallel.DistributedDataParallel(
                self.runner, device_ids=[device.index] if device.type == "cuda" else None)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolve_amp(self.cfg.amp, device))
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.cfg.amp == "fp16")


def _resume(loop: _Loop, ckpt_path: Path, extra: Optional[dict]):
    """Load a run's checkpoint into the loop's model, optimizer, schedule and random generators,
    after checking it holds this model; returns (epochs done, history, extra)."""
    model = loop.model
    state = read_checkpoint(ckpt_path)
    if state["model"] != model.name or {**model.legacy_config, **state["config"]} != asdict(model.config):
        raise UsageError(f"cannot resume {ckpt_path}: it holds a different model or configuration")
    if checkpoint_input_norm(state) != input_norm_of(model):
        raise UsageError(f"cannot resume {ckpt_path}: it was trained on features of a backbone fed the "
                         f"{checkpoint_input_norm(state)!r} normalisation, this model's is fed "
                         f"{input_norm_of(model)!r}; start a new run with --force")
    model.load_state_dict(state["state_dict"])
    loop.optimizer.load_state_dict(state["optimizer"])
    loop.scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    _restore_cuda_rng(state.get("cuda_rng"))
    return state["epoch"], list(state["history"]), {**state.get("extra", {}), **(extra or {})}


def _run_epoch(loop: _Loop, epoch: int, history: list) -> dict:
    """One epoch's steps; returns its record (over every rank) and appends it to `history`."""
    model, cache, cfg, device, world, optimizer = loop.model, loop.cache, loop.cfg, loop.device, loop.world, loop.optimizer
    model.begin_epoch(epoch, cfg.epochs)  # a model whose loss changes over training (ResAD's stages)
    # The order of an epoch depends only on (seed, epoch): a resumed run sees the same batches.
    order = torch.randperm(len(cache), generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch))
    t0, total, seen, term_sums = clock(device), 0.0, 0, {}
    bar = progress_bar(range(loop.steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step",
                       enabled=loop.progress and loop.rank == 0, leave=False)
    grad_norms = []
    for step in bar:
        idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
        feats = cache.batch(idx.numpy(), device)
        lr = optimizer.param_groups[0]["lr"]  # this step's (the scheduler steps after it)
        with torch.autocast(device.type, dtype=loop.amp_dtype, enabled=loop.amp_dtype is not None):
            loss = loop.runner(feats)
        value = loss.item()
        _check_finite(value, epoch + 1, step, world, device, loop.out_dir, cfg.lr)
        optimizer.zero_grad(set_to_none=True)
        loop.scaler.scale(loss).backward()
        loop.scaler.unscale_(optimizer)  # the gradient norm is logged in the loss's own scale
        grad_norms.append(float(nn.utils.clip_grad_norm_(loop.params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)))
        if not loop.scaler.is_enabled():  # (fp16's scaler skips the steps whose gradients overflow)
            _check_finite(grad_norms[-1], epoch + 1, step, world, device, loop.out_dir, cfg.lr, what="gradient norm")
        loop.scaler.step(optimizer)
        loop.scaler.update()
        loop.scheduler.step()
        loop.tracker.log_scalars(epoch * loop.steps_per_epoch + step, {"train/loss": value, "train/lr": lr})
        total += value * len(idx)
        _add_terms(term_sums, model, len(idx))
        seen += len(idx)
        bar.set_postfix(loss=f"{total / seen:.4f}", img_per_s=f"{seen * world / (time.perf_counter() - t0):.1f}")
    total, seen, seconds, term_sums = epoch_totals(total, seen, clock(device) - t0, world, device, term_sums)
    finite_norms = [g for g in grad_norms if math.isfinite(g)]  # fp16 scaler steps it skipped are inf
    record = {"epoch": epoch + 1, "loss": total / max(1, seen), "lr": optimizer.param_groups[0]["lr"],
              "grad_norm": round(sum(finite_norms) / max(1, len(finite_norms)), 4),
              "images": seen, "seconds": round(seconds, 3), "images_per_s": round(seen / seconds, 2)}
    if term_sums:
        record["terms"] = {k: v / max(1, seen) for k, v in term_sums.items()}
    if loop.val_cache is not None:
        record["val_loss"] = validation_loss(model, loop.val_cache, device, loop.amp_dtype)
    warning = _rise_warning(history, record, cfg)
    if warning:
        record["warning"] = warning
    history.append(record)
    return record


def _end_epoch(loop: _Loop, record: dict, history: list, extra: Optional[dict], log) -> None:
    """Rank 0 after an epoch: the checkpoint, best.pt when the epoch is the best so far, the log,
    the epoch's line and the tracker's epoch numbers."""
    model, cfg, out_dir, epoch = loop.model, loop.cfg, loop.out_dir, record["epoch"]
    earlier = history[:-1]
    best = min(earlier, key=selection_loss) if earlier else None
    save_checkpoint(out_dir / CHECKPOINT, model, loop.optimizer, loop.scheduler, epoch, cfg, history, extra)
    if model.select_best_epoch and (best is None or selection_loss(record) <= selection_loss(best)
                                    or not (out_dir / BEST).is_file()):
        save_best(out_dir / BEST, model, record, extra)
    _write_log(out_dir, history)
    terms = "".join(f"  {k} {v:.4g}" for k, v in record.get("terms", {}).items())
    val = f"  held-out {record['val_loss']:.4f}" if "val_loss" in record else ""
    warning = record.get("warning")
    log(f"epoch {epoch}/{cfg.epochs}  loss {record['loss']:.4f}{terms}{val}  "
        f"{record['images_per_s']:.1f} img/s" + (f"  warning: {warning}" if warning else ""))
    # after the checkpoint: what the tracker holds is what a resume continues from
    loop.tracker.log_scalars(epoch * loop.steps_per_epoch - 1, _epoch_scalars(record))
    loop.tracker.flush()


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
    device = torch.device(device)
    model.to(device).train()
    ckpt_path = out_dir / CHECKPOINT
    resuming = resume and ckpt_path.is_file()
    if not resuming:  # a resumed run has what prepare() fits in its checkpoint
        model.prepare(cache)
    loop = _Loop(model, cache, out_dir, cfg, device, rank, world, progress, val_cache,
                 tracker if tracker is not None and rank == 0 else NullTracker())
    history, start_epoch = [], 0
    if resuming:
        start_epoch, history, extra = _resume(loop, ckpt_path, extra)
        if rank == 0:  # the checkpoint's history is the record: rewrite the log from it
            _write_log(out_dir, history)
        log(f"resuming {ckpt_path} at epoch {start_epoch}/{cfg.epochs}")
    elif rank == 0:
        _start_run(out_dir, model, cfg, extra)
    loop.tracker.log_params(run_params(model, cfg, extra))
    loop.start()
    for epoch in range(start_epoch, cfg.epochs):
        record = _run_epoch(loop, epoch, history)
        if rank == 0:
            _end_epoch(loop, record, history, extra, log)
        if on_epoch_end is not None:
            on_epoch_end(model, record)
            model.train()
    optimizer, scheduler = loop.optimizer, loop.scheduler
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
