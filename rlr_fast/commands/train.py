"""`rlr-fast train`: train one model on every class of a data folder.

Everything the user gave is checked before the model is built: the options at parse time, then
the run folder (an existing run is replaced only with --force, continued only with --resume, and
a resumed run refuses an option that contradicts it), then the data folder.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from ..errors import UsageError
from . import options

# Options a resumed run takes from its checkpoint: (option, where the run keeps it, its key); the
# models' own options (run_settings() adds them) are kept in their config.
RUN_SETTINGS = (("--model", "run", "model"), ("--image-size", "config", "image_size"),
                ("--backbone", "config", "backbone"), ("--backbone-weights", "config", "backbone_weights"),
                ("--backend", "config", "backend"), ("--recipe", "extra", "recipe"),
                ("--batch-size", "train", "batch_size"), ("--lr", "train", "lr"), ("--amp", "train", "amp"),
                ("--seed", "train", "seed"), ("--val-fraction", "train", "val_fraction"))
# Options of the gradient training, which a training-free model (PatchCore) does not run.
GRADIENT_OPTIONS = ("recipe", "epochs", "batch_size", "lr", "amp", "val_fraction")


def model_classes() -> list:
    """The class of each model `--model` offers (rlr_fast.models.registry), in its order."""
    from ..models.registry import model_class, model_names

    return [model_class(name) for name in model_names()]


def model_options() -> list:
    """(config field, model class) of every model's own option of `train` (AnomalyModel.cli_options
    and config_options), in the models' order."""
    return [(field, cls) for cls in model_classes() for field in cls.option_fields()]


def run_settings() -> tuple:
    """RUN_SETTINGS and the models' own options, which a run keeps in its config."""
    return RUN_SETTINGS + tuple((f"--{field.replace('_', '-')}", "config", field) for field, _ in model_options())


def configure(p: argparse.ArgumentParser) -> None:
    # Options a resumed run takes from its checkpoint default to None here, so that one given
    # explicitly can be told from the default and refused if it contradicts the run.
    p.add_argument("--data", required=True, type=options.existing_folder,
                   help="data folder in a layout of --layout (e.g. MVTec's ROOT/<class>/train/good/...) or a plain "
                        "folder of normal images")
    add_layout_option(p)
    p.add_argument("--out", required=True, type=options.output_folder, help="run folder: checkpoint, config, log")
    p.add_argument("--classes", help="comma-separated class names (default: every class in --data)")
    from ..models.registry import model_names

    p.add_argument("--model", choices=model_names(),
                   help="model (default: rlr); patchcore: the training-free nearest-neighbour baseline")
    p.add_argument("--recipe", choices=("fast", "paper"),
                   help="fast: converges in minutes on a CPU (default); paper: the paper's schedule and network "
                        "(RLR: 4 layers, d 256/512, raw tokens)")
    add_shot_options(p, "ResAD: K reference images per seen class, drawn anew for every batch from its train/good "
                        "(default 4); with --shot-seed, K fixed ones drawn with that seed, left out of training")
    for cls in model_classes():  # each model's own options (AnomalyModel.cli_options)
        for flag, spec in cls.cli_options:
            p.add_argument(flag, **spec)
    p.add_argument("--epochs", type=options.positive_int,
                   help="override the recipe's epochs; with --resume, the run's new total")
    p.add_argument("--batch-size", type=options.positive_int, help="override the recipe's batch size")
    p.add_argument("--lr", type=options.positive_float, help="override the recipe's learning rate")
    p.add_argument("--image-size", type=options.image_size,
                   help=f"input side in pixels, >= {options.MIN_IMAGE_SIZE} (default: the model's, 256 for RLR)")
    p.add_argument("--backbone", help="timm model name (default: tf_efficientnet_lite0, weights shipped)")
    p.add_argument("--backbone-weights",
                   help="'default' (shipped or timm pretrained; the default), 'random', or a local state-dict file")
    p.add_argument("--backend", choices=("auto", "torch", "dense", "triton", "reference"),
                   help="attention backend (PatchCore: nearest-neighbour search backend; default: auto)")
    p.add_argument("--amp", choices=("auto", "none", "bf16", "fp16"),
                   help="mixed precision (default: the recipe's; auto: bf16 where the device computes it natively)")
    p.add_argument("--device", type=options.device, default=options.default_device())
    existing = p.add_mutually_exclusive_group()
    existing.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    existing.add_argument("--force", action="store_true",
                          help="replace the run in --out (its checkpoint, config, log, and everything made from "
                               "its model: metrics, overlays, thresholds, exports, predictions)")
    p.add_argument("--seed", type=options.seed, help="random seed (default: 0)")
    p.add_argument("--val-fraction", type=options.fraction,
                   help="share of each class's training images held out for the validation loss that picks "
                        "the best epoch (default 0.1; 0: none, the training loss picks it)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (the per-epoch loss lines stay)")
    add_logger_options(p)


def add_logger_options(p: argparse.ArgumentParser) -> None:
    """--logger and the MLflow store, shared by train and test (rlr_fast.trackers)."""
    from ..trackers import DEFAULT_EXPERIMENT

    p.add_argument("--logger", default="none", metavar="{none,tensorboard,mlflow}",
                   help="also send the numbers to a tracker, offline (default: none, the run's own log.jsonl and "
                        "metrics.json): tensorboard (event files in RUN/tensorboard), mlflow (a file store in "
                        "RUN/mlruns, or --mlflow-uri), or tensorboard,mlflow; needs pip install rlr-fast[trackers]")
    p.add_argument("--mlflow-uri", help="--logger mlflow: the MLflow tracking URI (default: file store RUN/mlruns)")
    p.add_argument("--mlflow-experiment", default=DEFAULT_EXPERIMENT,
                   help=f"--logger mlflow: the MLflow experiment (default: {DEFAULT_EXPERIMENT})")


def open_tracker(args, run_dir, rank: int = 0):
    """The tracker of --logger for the run folder (rlr_fast.trackers.make_tracker)."""
    from ..trackers import make_tracker

    return make_tracker(args.logger, run_dir, mlflow_uri=args.mlflow_uri, mlflow_experiment=args.mlflow_experiment,
                        rank=rank)


def unlogged_trackers(args) -> None:
    """A resumed run that logged to trackers before: say which the resume leaves out."""
    from ..trackers import parse_loggers, read_state

    used = read_state(args.out).get("loggers") or []
    left_out = [n for n in used if n not in parse_loggers(args.logger)]
    if left_out:
        print(f"note: this run logged to {' and '.join(left_out)} before; add --logger {','.join(used)} to go on "
              f"logging there (this resume does not)")


def add_layout_option(p: argparse.ArgumentParser) -> None:
    """--layout, shared by train, test and predict (rlr_fast.layouts)."""
    from ..layouts import LAYOUTS

    p.add_argument("--layout", choices=("auto", *LAYOUTS), default="auto",
                   help="layout of --data (default: detected): mvtec (<class>/train/good, test/, ground_truth/), "
                        "folder (normal/, anomalous folders, optional mask/ and normal_test/), visa (as published, "
                        "split_csv/1cls.csv), mvtec-ad2 (<class>/test_public), mvtec-loco (<class>/test/"
                        "logical_anomalies, masks per image in a folder)")


def add_shot_options(p: argparse.ArgumentParser, shots_help: str) -> None:
    """--shots and --shot-seed, shared by train, test and predict."""
    p.add_argument("--shots", type=options.positive_int, help=shots_help)
    p.add_argument("--shot-seed", type=options.seed,
                   help="draw the K reference images with this seed (default: the first K by sorted name)")


# The options of the reference images (train, test and predict), which only a model that takes
# them (AnomalyModel.takes_references: ResAD) uses.
REFERENCE_OPTIONS = ("shots", "shot_seed", "reference", "residual")


def _flags(fields) -> str:
    return " and ".join(f"--{k.replace('_', '-')}" for k in fields)


def ignored_shot_options(args, model_name: str) -> None:
    """A model that takes no reference images (RLR, UniAD, PatchCore): say so when the reference
    options were given."""
    from ..training import model_class

    given = [k for k in REFERENCE_OPTIONS if getattr(args, k, None) is not None]
    if given and not model_class(model_name).takes_references:
        users = " and ".join(cls.label for cls in model_classes() if cls.takes_references)
        print(f"note: {_flags(given)} ignored: only {users} uses {'it' if len(given) == 1 else 'them'} "
              f"(reference images); this is a {model_name} model")


def ignored_model_options(args, model_name: str) -> None:
    """Say which given options the chosen model does not use: the gradient training's with a
    training-free model (PatchCore), another model's own options (those it notes rather than
    refuses, AnomalyModel.options_elsewhere; the reference options are ignored_shot_options')
    with any other."""
    from ..training import model_class

    cls = model_class(model_name)
    if cls.training_free:
        given = [k for k in GRADIENT_OPTIONS if getattr(args, k, None) is not None]
        if given:
            print(f"note: {_flags(given)} ignored: {model_name} is fitted in one pass (a memory bank of "
                  f"training tokens), with no gradient training")
        return
    for field, owner in model_options():
        if (owner is not cls and owner.options_elsewhere == "note" and field not in REFERENCE_OPTIONS
                and field not in cls.option_fields() and getattr(args, field, None) is not None):
            print(f"note: {_flags([field])} ignored: only {owner.label} uses it ({owner.option_use}); "
                  f"this is a {model_name} model")


def training_set(data: Path, classes, image_size: int, layout: str = "auto"):
    """The images to train on: the train split of a data folder in a layout of rlr_fast.layouts
    (named, or detected), or a plain folder of normal images."""
    from ..data import DataError, FolderDataset, MVTecDataset
    from ..layouts import detect

    name = detect(data) if layout in (None, "auto") else layout  # detect raises DataError for a missing folder
    if name is not None:
        return MVTecDataset(data, classes=classes, split="train", image_size=image_size, layout=name)
    if classes:
        raise DataError(f"--classes given but {data} has no class folders (<class>/train/good) in any known layout")
    return FolderDataset(data, image_size=image_size)


def _prepare_out(args):
    """Check --out against --resume/--force; returns the checkpoint state to resume, or None.
    Under torchrun only rank 0 checks and clears the folder (if it refuses, torchrun stops the
    others); every rank reads the checkpoint it resumes."""
    from ..io import clean_stale_temporaries
    from ..training import CHECKPOINT, clear_run, read_checkpoint, run_entries

    if int(os.environ.get("RANK", "0")) != 0:
        return read_checkpoint(args.out / CHECKPOINT) if args.resume and (args.out / CHECKPOINT).is_file() else None
    for folder in (args.out, args.out / "features"):  # left by a writer killed mid-write
        clean_stale_temporaries(folder)
    found = run_entries(args.out)
    if args.resume:
        if (args.out / CHECKPOINT).is_file():
            state = read_checkpoint(args.out / CHECKPOINT)
            if not state.get("train_config") or not state.get("optimizer"):
                raise UsageError(f"cannot resume {args.out / CHECKPOINT}: it holds a model without its "
                                 f"training state; use --force to start the run again")
            return state
        if found:
            raise UsageError(f"cannot resume {args.out}: it has no {CHECKPOINT} (only {', '.join(found)}); "
                             f"use --force to start it again")
        print(f"no checkpoint in {args.out}: starting a new run")
    elif found and not args.force:
        raise UsageError(f"{args.out} already holds a run ({', '.join(found)}); add --resume to continue it "
                         f"or --force to replace it")
    elif found:
        print(f"--force: removed {', '.join(clear_run(args.out))} from {args.out}")
    return None


def _check_resume(args, state) -> None:
    """Refuse an option given with --resume that contradicts the run being resumed."""
    extra = state.get("extra") or {}
    kept = {"run": {"model": state["model"]}, "config": state["config"], "train": state.get("train_config") or {},
            "extra": extra}
    for option, where, key in run_settings():
        given = getattr(args, option.lstrip("-").replace("-", "_"))
        if given is not None and key in kept[where] and given != kept[where][key]:
            raise UsageError(f"{option} {given} conflicts with the run being resumed in {args.out}, which has "
                             f"{option} {kept[where][key]}; drop {option}, or start a new run with --force")
    done = state["epoch"]
    if args.epochs is not None and args.epochs < done:
        raise UsageError(f"--epochs {args.epochs} is fewer than the {done} epochs {args.out} has already trained")


def _check_resumed_classes(args, state, classes) -> None:
    """A resumed run trains on the classes it started with (--data and --classes may not change them)."""
    trained = (state.get("extra") or {}).get("classes")
    if trained is not None and classes != trained:
        raise UsageError(f"the run being resumed in {args.out} trains on {','.join(trained)}, but --data/--classes "
                         f"now give {','.join(classes or ['a plain folder of images'])}")


def _settings(args, state):
    """(model name, model config, train config, recipe name) of the new or resumed run."""
    from dataclasses import replace

    from ..training import TrainConfig, model_class, recipe

    if state is not None:
        cfg = TrainConfig(**state["train_config"])
        config = {**model_class(state["model"]).legacy_config, **state["config"]}
        return (state["model"], config, replace(cfg, epochs=args.epochs or cfg.epochs),
                (state.get("extra") or {}).get("recipe"))
    name = args.model or "rlr"
    cls = model_class(name)
    model_cfg = {"backend": args.backend or "auto", "backbone_weights": args.backbone_weights or "default"}
    if args.image_size:
        model_cfg["image_size"] = args.image_size
    if args.backbone:
        model_cfg["backbone"] = args.backbone
    recipe_name = args.recipe or "fast"
    if recipe_name == "paper":  # the paper's network too, where the model's defaults differ from it
        model_cfg.update(cls.paper_config)
    for field, owner in model_options():  # the models' own options: this one's are set, others' refused or noted
        value = getattr(args, field, None)
        if value is None:
            continue
        if field in cls.option_fields():
            model_cfg[field] = value
        elif owner.options_elsewhere == "refuse":
            raise UsageError(f"--{field.replace('_', '-')} is an option of the {owner.name} model, not of {name}")
    # the recipe a model's --recipe names (AnomalyModel.recipes): UniAD and ResAD have their own papers' schedules
    cfg = recipe(cls.recipes.get(recipe_name, recipe_name), epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, amp=args.amp, seed=args.seed,
                 val_fraction=args.val_fraction)
    return name, model_cfg, cfg, recipe_name


def run(args) -> int:
    """Train; under torchrun (``torchrun --nproc_per_node N -m rlr_fast train ...``) every rank
    extracts and trains on its own share of the images, with its own feature cache. The run
    folder is held (rank 0 holds it for every rank) from before it is checked to the end, so that
    a second training of the same folder is refused, not mixed in."""
    from ..runs import Run

    if int(os.environ.get("RANK", "0")) != 0:
        return _train(args)
    with Run(args.out).training_lock():
        return _train(args)


def _train(args) -> int:
    from ..features import extract_features, hold_out, shard
    from ..trackers import check_loggers
    from ..training import (BEST, CHECKPOINT, build_model, default_image_size, distributed_context, load_model,
                            rank_device, selection_loss, train)

    check_loggers(args.logger, args.mlflow_uri)  # before any work: a missing package is said at once
    state = _prepare_out(args)
    if state is not None:
        _check_resume(args, state)
    name, model_cfg, cfg, recipe_name = _settings(args, state)
    options.check_backend(model_cfg.get("backend", "auto"), args.device)
    requested = args.classes
    trained = ((state or {}).get("extra") or {}).get("classes")
    if requested is None and trained is not None:
        # a resumed run reads its own classes in its own order (the order the batches were drawn from),
        # so the data folder's sorted listing of the same classes does not count as a change
        requested = ",".join(trained)
    dataset = training_set(args.data, requested, model_cfg.get("image_size") or default_image_size(name),
                           args.layout)
    classes = getattr(dataset, "classes", None)
    if state is not None:
        _check_resumed_classes(args, state, classes)
    done = state["epoch"] if state is not None else 0
    rank, world = distributed_context(args.device)
    device = rank_device(args.device, world)
    say = print if rank == 0 else (lambda *a, **k: None)
    if rank == 0:
        ignored_shot_options(args, name)
        ignored_model_options(args, name)
        if state is not None:
            unlogged_trackers(args)
    if done >= cfg.epochs:
        if load_model(args.out, thresholds=False).score_fitted():
            say(f"{args.out} has already trained {done}/{cfg.epochs} epochs: nothing to do "
                f"(give a larger --epochs to train longer)")
            return 0
        say(f"{args.out} has trained {done}/{cfg.epochs} epochs but its model's score is not fitted "
            f"(the run stopped before the end): fitting it")
    torch.manual_seed(cfg.seed)
    model = build_model(name, model_cfg).to(device)
    fitted = model.training_free
    say(f"{'fitting' if fitted else 'training'} {name} on {len(dataset)} images"
        + (f" of {len(classes)} classes ({', '.join(classes)})" if classes else "")
        + f", image size {model.image_size}, "
        + (f"coreset ratio {model.config.coreset_ratio:g}, seed {cfg.seed}" if fitted else f"{cfg}"))
    if model.takes_references:  # every rank builds the whole (small) residual cache; DDP averages the gradients
        from ..fewshot import residual_cache

        cache = residual_cache(model, args.data, args.classes, model.config.shots, args.shot_seed,
                               device=device, progress=not args.no_progress, log=say, redraw=args.shot_seed is None,
                               layout=getattr(dataset, "layout", args.layout))
        val_cache = None
    else:
        # Images held out of training for the validation loss that picks the best epoch (the
        # same split on every rank and on resume: it depends only on the seed and the fraction);
        # a fitted model (PatchCore's memory bank) takes every image.
        dataset, held_out = hold_out(dataset, 0.0 if fitted else cfg.val_fraction, seed=cfg.seed)
        local = shard(dataset, rank, world)
        if world > 1:
            say(f"{world} ranks: {len(local)} images each")
        cache_dir = args.out / "features" / (f"rank{rank}" if world > 1 else "")  # no two ranks share a file
        cache = extract_features(model, local, device=device, cache_dir=cache_dir, progress=not args.no_progress)
        val_cache = None
        if held_out is not None:
            val_cache = extract_features(model, held_out, device=device, desc="held-out features",
                                         progress=not args.no_progress)
            say(f"held out {len(held_out)} training images for the validation loss that picks the best epoch")
    say(f"features cached: {len(cache)} images in {cache.seconds:.1f}s ({cache.nbytes / 2**20:.0f} MiB)"
        + (" on rank 0" if world > 1 else ""))
    t0 = time.perf_counter()
    tracker = open_tracker(args, args.out, rank)
    try:
        history = train(model, cache, args.out, cfg, resume=state is not None, device=device,
                        progress=not args.no_progress, log=say, extra={"classes": classes, "recipe": recipe_name},
                        val_cache=val_cache, tracker=tracker)
    except BaseException:
        tracker.close(failed=True)  # what was flushed (every checkpointed epoch) stays
        raise
    tracker.close()
    if fitted:
        say(f"fitted in {time.perf_counter() - t0:.1f}s: memory bank of {history[-1]['bank']} tokens "
            f"(coreset ratio {history[-1]['coreset_ratio']:g} of {history[-1]['tokens']}); "
            f"checkpoint {args.out / CHECKPOINT}")
        return 0
    if state is not None and rank == 0:
        from ..runs import Run

        derived = [n for n in Run(args.out).entries() if n in Run.DERIVED_FILES + (Run.OVERLAYS, Run.PREDICTIONS)]
        if derived:
            say(f"note: {', '.join(derived)} in {args.out} were made before this training; load_model, predict and the "
                f"engines refuse them if the model the run serves has changed, until `rlr-fast test` or "
                f"`rlr-fast export` makes them again")
    epochs = f"epochs {done + 1}-{len(history)}" if len(history) > done + 1 else f"epoch {len(history)}"
    kept = f"checkpoint {args.out / CHECKPOINT}"
    if model.select_best_epoch:
        best = min(history, key=selection_loss)
        kept = (f"best epoch {best['epoch']} ({'held-out' if 'val_loss' in best else 'training'} loss "
                f"{selection_loss(best):.4f}): {args.out / BEST}")
    say(f"trained {epochs} of {cfg.epochs} in {time.perf_counter() - t0:.1f}s; "
        f"final loss {history[-1]['loss']:.4f}; {kept}")
    return 0
