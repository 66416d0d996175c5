"""The accuracy benchmark: many classes of real photographs, one model per (model, seed), raw results.

Builds the benchmark data set (``rlr_fast.demo_data.build_benchmark_dataset``: scikit-image's
photographs in the MVTec layout, eight classes by default, several defect kinds with exact
masks), then for each model and seed trains ONE model on all its classes and tests it, through
the same functions as ``rlr-fast train`` and ``rlr-fast test`` (``rlr_fast.cli.main``). Model
names are passed through to ``train --model``, so any model the CLI offers can be benchmarked.

    python benchmarks/accuracy.py --out results/accuracy [--models rlr,uniad] [--seeds 0,1,2]
        [--classes brick,coins] [--image-size 256] [--epochs N] [--backbone-weights random]
        [--train-args "rlr:--lr 1e-4 --amp bf16"]

Writes OUT/accuracy.json (the raw record, rewritten atomically after every run: per model and
seed the per-class image/pixel AUROC, AUPRO and F1-max, the per-epoch training log with the loss,
the wall time of training (feature extraction included; summed over the calls that trained
it, a call killed mid-training lost) and of testing, the exact train options) and OUT/accuracy.md (tables
per class and mean, mean +- std over seeds), and prints the tables. Run again with the same
settings, it skips the (model, seed) pairs already recorded and resumes a run whose training was
interrupted from its checkpoint (``train --resume``). Each run keeps its folder in
OUT/runs/MODEL-seedS (checkpoint, log.jsonl, metrics.json, overlays/).

UniAD's own default backbone (efficientnet_b4) needs weights from the network, so UniAD runs on
the embedded backbone (tf_efficientnet_lite0) unless --backbone says otherwise. Times are wall
times on whatever else the machine runs: meaningful only on a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional

from rlr_fast import cli
from rlr_fast.demo_data import BENCHMARK_CLASSES, BENCHMARK_DEFECTS, BENCHMARK_PHOTOS, build_benchmark_dataset
from rlr_fast.errors import UsageError
from rlr_fast.io import atomic_write_json, atomic_write_text
from rlr_fast.training import CHECKPOINT

METRICS = ("image_auroc", "pixel_auroc", "pixel_aupro")
METRIC_NAMES = {"image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC", "pixel_aupro": "pixel AUPRO"}
RESULTS, TABLE = "accuracy.json", "accuracy.md"
TIMES = "benchmark_times.json"  # in a run folder: the training wall time so far
EMBEDDED_BACKBONE = "tf_efficientnet_lite0"


def _csv(text: str) -> List[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def cli_models() -> List[str]:
    """The models ``rlr-fast train --model`` offers in this installation."""
    from rlr_fast.commands import train

    parser = argparse.ArgumentParser()
    train.configure(parser)
    (action,) = [a for a in parser._actions if "--model" in a.option_strings]
    return list(action.choices)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="results folder (data, runs, accuracy.json/.md)")
    p.add_argument("--models", default="rlr,uniad", help="comma-separated `rlr-fast train --model` names")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds (`train --seed`)")
    p.add_argument("--classes", default=",".join(BENCHMARK_CLASSES),
                   help=f"comma-separated benchmark classes, of: {', '.join(BENCHMARK_PHOTOS)}")
    p.add_argument("--defects", default=",".join(BENCHMARK_DEFECTS), help="defect kinds of the test sets")
    p.add_argument("--image-size", type=int, default=256, help="data and model input side in pixels")
    p.add_argument("--n-train", type=int, default=40, help="normal training images per class")
    p.add_argument("--n-test-good", type=int, default=20, help="normal test images per class")
    p.add_argument("--n-test-defect", type=int, default=32, help="defective test images per class")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the data set (not of the training)")
    p.add_argument("--epochs", type=int, help="`train --epochs` (default: each model's recipe)")
    p.add_argument("--backbone-weights", help="`train --backbone-weights` for every model (e.g. random, for a quick check)")
    p.add_argument("--backbone", help=f"`train --backbone` for every model (default: the model's own; "
                                      f"{EMBEDDED_BACKBONE} for UniAD)")
    p.add_argument("--train-args", action="append", default=[], metavar="[MODEL:]ARGS",
                   help="more `rlr-fast train` options, for every model or, with MODEL:, for one (repeatable)")
    p.add_argument("--progress", action="store_true", help="show progress bars")
    args = p.parse_args(argv)
    args.models, args.classes, args.defects = _csv(args.models), _csv(args.classes), _csv(args.defects)
    try:
        args.seeds = [int(s) for s in _csv(args.seeds)]
    except ValueError:
        p.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if not args.models or not args.seeds or not args.classes:
        p.error("--models, --seeds and --classes need at least one entry each")
    offered = cli_models()
    unknown = [m for m in args.models if m not in offered]
    if unknown:
        p.error(f"unknown model {', '.join(unknown)}: this rlr-fast's `train --model` offers {', '.join(offered)}")
    bad = [c for c in args.classes if c not in BENCHMARK_PHOTOS]
    if bad:
        p.error(f"unknown class {', '.join(bad)}; choose from {', '.join(BENCHMARK_PHOTOS)}")
    bad = [d for d in args.defects if d not in BENCHMARK_DEFECTS]
    if bad:
        p.error(f"unknown defect kind {', '.join(bad)}; choose from {', '.join(BENCHMARK_DEFECTS)}")
    for name, value in (("--image-size", args.image_size), ("--n-train", args.n_train),
                        ("--n-test-good", args.n_test_good), ("--n-test-defect", args.n_test_defect),
                        ("--epochs", args.epochs)):
        if value is not None and value < 1:
            p.error(f"{name} must be a positive integer, got {value}")
    for spec in args.train_args:
        model = spec.split(":", 1)[0] if ":" in spec.split(" ", 1)[0] else None
        if model is not None and model not in args.models:
            p.error(f"--train-args {spec!r} names model {model!r}, which is not in --models")
    return args


def train_options(args, model: str) -> List[str]:
    """The options that make one model's training of this benchmark (no paths, no seed)."""
    opts = ["--model", model, "--image-size", str(args.image_size)]
    if args.epochs is not None:
        opts += ["--epochs", str(args.epochs)]
    if args.backbone_weights:
        opts += ["--backbone-weights", args.backbone_weights]
    backbone = args.backbone or (EMBEDDED_BACKBONE if model == "uniad" else None)
    if backbone:
        opts += ["--backbone", backbone]
    for spec in args.train_args:
        head, _, rest = spec.partition(":")
        if rest and " " not in head and not head.startswith("-"):
            if head == model:
                opts += shlex.split(rest)
        else:
            opts += shlex.split(spec)
    return opts


def settings(args) -> dict:
    """What must not change between runs recorded in one results file."""
    return {"data": {"classes": args.classes, "defects": args.defects, "image_size": args.image_size,
                     "n_train": args.n_train, "n_test_good": args.n_test_good,
                     "n_test_defect": args.n_test_defect, "seed": args.data_seed}}


def _cli(argv: List[str]) -> None:
    """Run one rlr-fast command as the CLI does; a failure stops the benchmark with its message."""
    print("$ rlr-fast " + " ".join(shlex.quote(a) for a in argv), flush=True)
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse refused an option
        code = e.code if isinstance(e.code, int) else 2
    if code:
        raise UsageError(f"`rlr-fast {argv[0]}` failed (exit code {code}); see its message above")


def _read_log(run_dir: Path) -> List[dict]:
    path = run_dir / "log.jsonl"
    if not path.is_file():  # e.g. a model that needs no training epochs
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_one(args, data: Path, model: str, seed: int) -> dict:
    """Train (or resume) and test one model with one seed; its record for the results file."""
    run_dir = args.out / "runs" / f"{model}-seed{seed}"
    quiet = [] if args.progress else ["--no-progress"]
    opts = train_options(args, model)
    # a run interrupted after a checkpoint continues from it; one killed before its first
    # checkpoint (or never started) starts again
    resumed = (run_dir / CHECKPOINT).is_file()
    times_path = run_dir / TIMES
    before = json.loads(times_path.read_text())["train_wall_s"] if resumed and times_path.is_file() else 0.0
    t0 = time.perf_counter()
    _cli(["train", "--data", str(data), "--out", str(run_dir), "--classes", ",".join(args.classes),
          "--seed", str(seed), "--resume" if resumed else "--force", *opts, *quiet])
    train_s = before + time.perf_counter() - t0  # over every call that trained this run to its end
    atomic_write_json(times_path, {"train_wall_s": train_s})
    t0 = time.perf_counter()
    metrics_path = run_dir / "metrics.json"
    _cli(["test", "--data", str(data), "--run", str(run_dir), "--classes", ",".join(args.classes),
          "--json", str(metrics_path), *quiet])
    test_s = time.perf_counter() - t0
    metrics = json.loads(metrics_path.read_text())
    log = _read_log(run_dir)
    return {"model": model, "seed": seed, "train_options": opts,
            "classes": metrics["classes"], "mean": metrics["mean"],
            "loss": [r.get("loss") for r in log], "log": log,
            "train_wall_s": round(train_s, 2), "test_wall_s": round(test_s, 2),
            "epoch_s": round(sum(r.get("seconds", 0.0) for r in log), 2),
            "resumed": resumed, "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _load(path: Path, want: dict) -> dict:
    if not path.is_file():
        return {"settings": want, "runs": {}}
    results = json.loads(path.read_text())
    if results.get("settings") != want:
        raise UsageError(f"{path} holds results of other settings ({json.dumps(results.get('settings'))}), "
                         f"not {json.dumps(want)}: give another --out")
    return results


def _mean_std(values: List[Optional[float]], digits: int = 3) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def tables(results: dict, models: Optional[List[str]] = None) -> str:
    """Markdown: a summary (mean over classes, mean ± std over seeds, times), then one table per
    metric with a row per class."""
    runs = list(results["runs"].values())
    models = models or sorted({r["model"] for r in runs})
    by_model: Dict[str, List[dict]] = {m: sorted((r for r in runs if r["model"] == m), key=lambda r: r["seed"])
                                       for m in models}
    by_model = {m: rs for m, rs in by_model.items() if rs}
    if not by_model:
        return "(no runs recorded yet)"
    classes = results["settings"]["data"]["classes"]
    data = results["settings"]["data"]
    lines = [f"Accuracy benchmark: {len(classes)} classes, {data['image_size']} px, {data['n_train']} normal "
             f"training images, {data['n_test_good']} normal + {data['n_test_defect']} defective test images per "
             f"class; mean ± std over seeds (std of the per-seed class means).", "",
             "| model | seeds | " + " | ".join(METRIC_NAMES[m] for m in METRICS) + " | train s | test s |",
             "|---|---|" + "---|" * (len(METRICS) + 2)]
    for model, rs in by_model.items():
        cells = [_mean_std([r["mean"][m] for r in rs]) for m in METRICS]
        times = [_mean_std([r["train_wall_s"] for r in rs], 0), _mean_std([r["test_wall_s"] for r in rs], 0)]
        lines.append(f"| {model} | {','.join(str(r['seed']) for r in rs)} | " + " | ".join(cells + times) + " |")
    for metric in METRICS:
        lines += ["", f"{METRIC_NAMES[metric]} per class (mean ± std over seeds):", "",
                  "| class | " + " | ".join(by_model) + " |", "|---|" + "---|" * len(by_model)]
        for cls in classes:
            lines.append(f"| {cls} | " + " | ".join(_mean_std([r["classes"].get(cls, {}).get(metric) for r in rs])
                                                   for rs in by_model.values()) + " |")
        lines.append("| **mean** | " + " | ".join(_mean_std([r["mean"][metric] for r in rs])
                                                  for rs in by_model.values()) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    want = settings(args)
    path = args.out / RESULTS
    try:
        results = _load(path, want)
        t0 = time.perf_counter()
        data = build_benchmark_dataset(args.out / "data", classes=args.classes, image_size=args.image_size,
                                       n_train=args.n_train, n_test_good=args.n_test_good,
                                       n_test_defect=args.n_test_defect, seed=args.data_seed, defects=args.defects)
        print(f"benchmark data: {data} ({time.perf_counter() - t0:.1f}s)", flush=True)
        for model in args.models:
            for seed in args.seeds:
                key = f"{model}/seed{seed}"
                done = results["runs"].get(key)
                if done is not None:
                    if done["train_options"] != train_options(args, model):
                        raise UsageError(f"{path} has {key} trained with {' '.join(done['train_options'])}, "
                                         f"not {' '.join(train_options(args, model))}: give another --out")
                    print(f"{key}: already done, skipped", flush=True)
                    continue
                results["runs"][key] = run_one(args, data, model, seed)
                atomic_write_json(path, results)  # after every run: an interrupted benchmark keeps it
                print(f"{key}: mean " + ", ".join(f"{METRIC_NAMES[m]} {results['runs'][key]['mean'][m]:.3f}"
                                                  for m in METRICS), flush=True)
    except UsageError as e:
        print(f"accuracy benchmark: error: {e}", file=sys.stderr)
        return 2
    atomic_write_json(path, results)
    text = tables(results, args.models)
    atomic_write_text(args.out / TABLE, text + "\n")
    print(text)
    print(f"results: {path}, {args.out / TABLE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
