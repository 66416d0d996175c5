"""`rlr-fast test`: per-class metrics of a trained run, as a table, JSON and overlay pictures, and
the run's decision thresholds (F1-optimal on the data tested, stored as RUN/thresholds.json)."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, type=Path, help="MVTec-style folder with <class>/test and ground_truth")
    p.add_argument("--run", required=True, type=Path, help="run folder (or checkpoint file) from `rlr-fast train`")
    p.add_argument("--classes", help="comma-separated class names (default: every class in --data)")
    p.add_argument("--json", type=Path, help="write the metrics here (default: RUN/metrics.json)")
    p.add_argument("--overlays", type=Path, help="overlay pictures folder (default: RUN/overlays)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: autocast to bfloat16 where the device has it (fp32 otherwise, with a warning)")
    p.add_argument("--no-progress", action="store_true")
    from .train import add_shot_options

    add_shot_options(p, "ResAD: K reference images per class, from <class>/train/good of --data "
                        "(default: the K the model was trained with)")


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def run(args) -> int:
    from ..decisions import THRESHOLDS_FILE
    from ..evaluation import evaluate
    from ..metrics import format_table
    from ..training import load_model
    from .train import ignored_shot_options

    run_dir = args.run if args.run.is_dir() else args.run.parent
    model = load_model(args.run, args.device)
    model.precision = args.precision
    ignored_shot_options(args, model.name)
    overlays = args.overlays or run_dir / "overlays"
    common = dict(classes=args.classes, batch_size=args.batch_size, device=args.device, overlays_dir=overlays,
                  progress=not args.no_progress)
    if model.name == "resad":
        from ..fewshot import evaluate_fewshot

        summary = evaluate_fewshot(model, args.data, args.shots or model.config.shots, args.shot_seed, **common)
    else:
        summary = evaluate(model, args.data, **common)
    print(format_table(summary))
    out = args.json or run_dir / "metrics.json"
    write_json(out, {"classes": summary["classes"], "mean": summary["mean"]})
    thresholds = summary["thresholds"]
    thresholds.save(run_dir / THRESHOLDS_FILE)  # what `rlr-fast predict` and model.predict decide with
    print(f"metrics: {out}\noverlays: {overlays}\nthresholds (F1-optimal on this data): image "
          f"{thresholds.image.threshold:.4g}, pixel {thresholds.pixel.threshold:.4g}: {run_dir / THRESHOLDS_FILE}")
    return 0
