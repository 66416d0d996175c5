"""`rlr-fast train`: train one model on every class of a data folder."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, type=Path,
                   help="MVTec-style folder (ROOT/<class>/train/good/...) or a plain folder of normal images")
    p.add_argument("--out", required=True, type=Path, help="run folder: checkpoint, config, log")
    p.add_argument("--classes", help="comma-separated class names (default: every class in --data)")
    p.add_argument("--model", choices=("rlr", "uniad", "resad"), default="rlr")
    p.add_argument("--recipe", choices=("fast", "paper"), default="fast",
                   help="fast: converges in minutes on a CPU (default); paper: the paper's schedule")
    add_shot_options(p, "ResAD: K reference images per seen class, from its train/good (default 4)")
    p.add_argument("--residual", choices=("squared", "difference"),
                   help="ResAD's residual: (f - r)^2 as the official code (default) or f - r as the paper")
    p.add_argument("--epochs", type=int, help="override the recipe's epochs")
    p.add_argument("--batch-size", type=int, help="override the recipe's batch size")
    p.add_argument("--lr", type=float, help="override the recipe's learning rate")
    p.add_argument("--image-size", type=int, default=None, help="input side in pixels (default: the model's, 256 for RLR)")
    p.add_argument("--backbone", help="timm model name (default: tf_efficientnet_lite0, weights shipped)")
    p.add_argument("--backbone-weights", default="default",
                   help="'default' (shipped or timm pretrained), 'random', or a local state-dict file")
    p.add_argument("--backend", choices=("auto", "torch", "reference", "triton"), default="auto")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_shot_options(p: argparse.ArgumentParser, shots_help: str) -> None:
    """--shots and --shot-seed, shared by train, test and predict."""
    p.add_argument("--shots", type=int, help=shots_help)
    p.add_argument("--shot-seed", type=int,
                   help="draw the K reference images with this seed (default: the first K by sorted name)")


def ignored_shot_options(args, model_name: str) -> None:
    """RLR and UniAD use no reference images: say so when ResAD's options were given."""
    given = [f"--{k.replace('_', '-')}" for k in ("shots", "shot_seed", "reference", "residual")
             if getattr(args, k, None) is not None]
    if given and model_name != "resad":
        print(f"note: {' and '.join(given)} ignored: only ResAD uses {'it' if len(given) == 1 else 'them'} "
              f"(reference images); this is a {model_name} model")


def training_set(data: Path, classes, image_size: int):
    from ..data import DataError, FolderDataset, MVTecDataset, discover_classes

    if not data.is_dir():
        raise DataError(f"data folder not found: {data}")
    if discover_classes(data):
        return MVTecDataset(data, classes=classes, split="train", image_size=image_size)
    if classes:
        raise DataError(f"--classes given but {data} has no class folders (<class>/train/good)")
    return FolderDataset(data, image_size=image_size)


def run(args) -> int:
    """Train; under torchrun (``torchrun --nproc_per_node N -m rlr_fast train ...``) every rank
    extracts and trains on its own share of the images, with its own feature cache."""
    from ..features import extract_features, shard
    from ..training import CHECKPOINT, build_model, distributed_context, rank_device, read_checkpoint, recipe, train

    rank, world = distributed_context(args.device)
    device = rank_device(args.device, world)
    say = print if rank == 0 else (lambda *a, **k: None)
    torch.manual_seed(args.seed)
    ckpt = args.out / CHECKPOINT
    if args.resume and ckpt.is_file():
        state = read_checkpoint(ckpt)  # rebuild exactly the model being resumed
        name, model_cfg = state["model"], dict(state["config"])
    else:
        if args.resume:
            say(f"no checkpoint in {args.out}: starting a new run")
        name, model_cfg = args.model, {"backend": args.backend, "backbone_weights": args.backbone_weights}
        if args.image_size:
            model_cfg["image_size"] = args.image_size
        if args.backbone:
            model_cfg["backbone"] = args.backbone
        if name == "resad":
            model_cfg.update({k: v for k, v in (("shots", args.shots), ("residual", args.residual)) if v is not None})
    if rank == 0:
        ignored_shot_options(args, name)
    model = build_model(name, model_cfg).to(device)
    recipe_name = {("uniad", "paper"): "uniad", ("resad", "paper"): "resad",
                   ("resad", "fast"): "resad-fast"}.get((name, args.recipe), args.recipe)
    cfg = recipe(recipe_name, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, amp=args.amp,
                 seed=args.seed)
    if name == "resad":  # every rank builds the whole (small) residual cache; DDP averages the gradients
        from ..fewshot import residual_cache

        say(f"training resad, {cfg}")
        cache = residual_cache(model, args.data, args.classes, model.config.shots, args.shot_seed,
                               device=device, progress=not args.no_progress, log=say)
    else:
        dataset = training_set(args.data, args.classes, model.image_size)
        classes = getattr(dataset, "classes", None)
        say(f"training {name} on {len(dataset)} images" + (f" of {len(classes)} classes ({', '.join(classes)})"
                                                           if classes else "") + f", {cfg}")
        local = shard(dataset, rank, world)
        if world > 1:
            say(f"{world} ranks: {len(local)} images each")
        cache_dir = args.out / "features" / (f"rank{rank}" if world > 1 else "")  # no two ranks share a file
        cache = extract_features(model, local, device=device, cache_dir=cache_dir, progress=not args.no_progress)
    say(f"features cached: {len(cache)} images in {cache.seconds:.1f}s ({cache.nbytes / 2**20:.0f} MiB)"
        + (" on rank 0" if world > 1 else ""))
    t0 = time.perf_counter()
    history = train(model, cache, args.out, cfg, resume=args.resume, device=device,
                    progress=not args.no_progress, log=say)
    if history:
        say(f"trained {cfg.epochs} epochs in {time.perf_counter() - t0:.1f}s; final loss "
            f"{history[-1]['loss']:.4f}; checkpoint {ckpt}")
    return 0
