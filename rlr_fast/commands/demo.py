"""`rlr-fast demo`: the offline end-to-end job. Builds the demo data set, trains ONE model on all
its classes, tests it and writes the metrics, overlays, report page and a speed summary to one folder."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ..timing import cpu_name
from . import options

# Chosen by measurement on this data (see the README): 128 px input (grids 16 and 8), RLR's fast
# recipe (its default network and epochs, as `rlr-fast train`).
DEMO_IMAGE_SIZE = 128


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=options.output_folder, default=Path("results/demo"), help="results folder")
    p.add_argument("--epochs", type=options.positive_int, help="default: RLR's fast recipe's")
    p.add_argument("--image-size", type=options.image_size, default=DEMO_IMAGE_SIZE)
    p.add_argument("--batch-size", type=options.positive_int, default=None)
    p.add_argument("--backend", choices=("auto", "torch", "dense", "triton", "reference"), default="auto")
    p.add_argument("--device", type=options.device, default=options.default_device())
    p.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    from ..runs import Run

    with Run(args.out / "run").training_lock("rlr-fast demo"):  # two demos into one --out would mix
        return _demo(args)


def _demo(args) -> int:
    from ..data import MVTecDataset
    from ..runs import Run
    from ..demo_data import build_demo_dataset
    from ..evaluation import evaluate
    from ..features import extract_features
    from ..io import atomic_write_json, atomic_write_text
    from ..metrics import format_table
    from ..models.rlr import RLRModel
    from ..training import load_model, recipe, train

    options.check_backend(args.backend, args.device)
    out, progress = args.out, not args.no_progress
    started = time.perf_counter()
    t0 = time.perf_counter()
    data = build_demo_dataset(out / "data")
    print(f"demo data: {data} ({time.perf_counter() - t0:.1f}s)")
    model = RLRModel(image_size=args.image_size, backend=args.backend).to(args.device)
    train_set = MVTecDataset(data, split="train", image_size=model.image_size)
    cache = extract_features(model, train_set, device=args.device, progress=progress)
    cfg = recipe("rlr-fast", epochs=args.epochs, batch_size=args.batch_size)
    print(f"training RLR on {len(train_set)} images of {len(train_set.classes)} classes "
          f"({', '.join(train_set.classes)}): {cfg.epochs} epochs, batch {cfg.batch_size}, lr {cfg.lr}")
    t0 = time.perf_counter()
    history = train(model, cache, out / "run", cfg, device=args.device, progress=progress)
    train_seconds = time.perf_counter() - t0
    # the model the run serves (its best epoch, as `rlr-fast test` and `predict` use), so the
    # thresholds below are those of the model that predict decides with
    model = load_model(out / "run", args.device, thresholds=False)
    from ..report import ReportCollector, write_report

    shown = ReportCollector()  # what the report page shows, gathered as the images are evaluated
    summary = evaluate(model, data, device=args.device, overlays_dir=out / "overlays", progress=progress,
                       report=shown)
    table = format_table(summary)
    print(table)
    atomic_write_json(out / "metrics.json", {"classes": summary["classes"], "mean": summary["mean"]})
    # `rlr-fast predict --run OUT/run` decides with these; they record the model they were fitted for
    run = Run(out / "run")
    run.save_thresholds(summary["thresholds"], model.fingerprint)
    # the page `rlr-fast test --run OUT/run` writes too (there, so `train --force` removes it with the run)
    report = write_report(run.report, summary, shown, summary["thresholds"], model.fingerprint, run=run.dir,
                          title="rlr-fast demo report")
    atomic_write_text(out / "metrics.txt", table + "\n")
    speed = {
        "device": str(args.device), "cpu": cpu_name(),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "backend": args.backend, "image_size": model.image_size,
        "train_images": len(train_set), "feature_extraction_s": round(cache.seconds, 2),
        "feature_extraction_images_per_s": round(len(train_set) / cache.seconds, 1),
        "training_s": round(train_seconds, 1), "epochs": cfg.epochs,
        "training_images_per_s": round(sum(h["images_per_s"] for h in history) / len(history), 1),
        "inference_images_per_s": round(summary["images_per_s"], 1),
        "total_s": round(time.perf_counter() - started, 1),
    }
    atomic_write_json(out / "speed.json", speed)
    lines = [f"- {k.replace('_', ' ')}: {v}" for k, v in speed.items()]
    atomic_write_text(out / "summary.md", "# rlr-fast demo\n\n```\n" + table + "\n```\n\n## Speed\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"results: {out} (metrics.txt, metrics.json, overlays/, speed.json, summary.md, run/)")
    print(f"report: {report} (open it in a browser)")
    return 0
