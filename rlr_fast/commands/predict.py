"""`rlr-fast predict`: decisions on images with a trained run.

Writes ``scores.csv`` (per image: path, raw score, normalised score, label, heat map and mask
files) and, beside each heat map, a binary mask PNG. The thresholds are those `rlr-fast test`
stored in the run (``--threshold``/``--pixel-threshold`` override them); without any, the raw
scores and heat maps are still written and the message says how to get decisions.

Outputs mirror the images' paths relative to their common folder, so two images never share an
output name, and an output folder holding a previous prediction is refused unless
``--overwrite`` is given: nothing is overwritten silently.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from collections import Counter
from pathlib import Path
from typing import List, Sequence

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..engines import ALL_PRECISIONS, DEFAULT_TOLERANCE, ENGINES
from ..errors import UsageError
from . import options
from .train import add_layout_option, add_shot_options

SCORES_FILE = "scores.csv"
COLUMNS = ("path", "score", "normalized_score", "label", "heatmap", "mask")


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, type=Path, help="run folder (or checkpoint file) from `rlr-fast train`")
    p.add_argument("images", nargs="*", type=Path, help="image files and/or folders of images")
    p.add_argument("--data", type=options.existing_folder,
                   help="also predict on the test images of this data folder (a layout of --layout); ResAD takes "
                        "each class's references from its normal training images unless --reference is given")
    p.add_argument("--classes", help="with --data: comma-separated class names (default: every class)")
    add_layout_option(p)
    p.add_argument("--out", type=Path, help="output folder (default: RUN/predictions)")
    p.add_argument("--threshold", type=float,
                   help="image score at or above which an image is anomalous (default: the run's, from `rlr-fast test`)")
    p.add_argument("--pixel-threshold", type=float,
                   help="map value at or above which a pixel is anomalous, for the masks (default: the run's)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=ALL_PRECISIONS,
                   help="fp32 (default); bf16: torch autocasts to bfloat16 where the device has it (fp32 "
                        "otherwise, with a warning), openvino runs with its bf16 precision hint (CPUs with native "
                        "bf16 only); int8: openvino runs the INT8 export (rlr-fast export --format openvino --int8)")
    p.add_argument("--no-heatmaps", action="store_true", help="no heat map or mask pictures: scores only")
    p.add_argument("--overwrite", action="store_true", help="replace a previous prediction in the output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--engine", choices=(*ENGINES, "auto"), default="torch",
                   help="torch: the trained model; onnxruntime/openvino: the run's export (rlr-fast export); "
                        "auto: the fastest engine and precision whose image and pixel AUROC, as measured in "
                        "RUN/engines.json (python -m rlr_fast.measure), are within --tolerance of torch fp32's "
                        "(torch fp32 without a record)")
    p.add_argument("--tolerance", type=float,
                   help=f"with --engine auto: the largest drop of image or pixel AUROC from torch fp32 accepted "
                        f"(default {DEFAULT_TOLERANCE})")
    p.add_argument("--reference", type=Path,
                   help="ResAD: folder of normal images of the class being inspected (K of them are used)")
    add_shot_options(p, "ResAD: how many images of --reference (or of each class of --data) to use (default: "
                        "the K the model was trained with)")


def output_stems(paths: Sequence[Path]) -> List[Path]:
    """Per image, its output name without suffix: its path relative to the images' common
    folder, without the extension, or with it (``a_jpg``) where two images differ only by it."""
    paths = [Path(os.path.abspath(p)) for p in paths]
    root = Path(os.path.commonpath([p.parent for p in paths]))
    stems = [p.relative_to(root).with_suffix("") for p in paths]
    clashes = Counter(stems)
    return [s if clashes[s] == 1 else s.with_name(f"{s.name}_{p.suffix.lstrip('.').lower()}")
            for s, p in zip(stems, paths)]


def _check_output_folder(out: Path, overwrite: bool) -> None:
    if (out / SCORES_FILE).exists() and not overwrite:
        raise UsageError(f"{out} already holds a prediction ({SCORES_FILE}); pass --overwrite to replace it "
                         f"or --out for another folder")


def _cell(t, i, fmt: str) -> str:
    return "" if t is None else fmt.format(float(t[i]))


def _groups(args, image_size):
    """The images to predict, as (class or None, paths) groups: each class of --data's test split
    (in its layout), then the images and folders given."""
    from ..data import FolderDataset, MVTecDataset

    if not args.images and args.data is None:
        raise UsageError("give images or folders of images, or --data DATA for the test images of a data folder")
    groups = []
    if args.data is not None:
        dataset = MVTecDataset(args.data, classes=args.classes, split="test", image_size=image_size, layout=args.layout)
        groups += [(cls, [s[0] for s in dataset.samples if s[3] == cls]) for cls in dataset.classes]
        args.layout = dataset.layout  # the reader, for the references
    if args.images:
        groups.append((None, FolderDataset(args.images, image_size=image_size).paths))
    seen, out = set(), []
    for cls, paths in groups:  # a file given twice is predicted once
        paths = [p for p in dict.fromkeys(Path(os.path.abspath(p)) for p in paths) if p not in seen]
        seen.update(paths)
        out.append((cls, paths))
    return out


def _set_references(args, model, cls) -> None:
    """ResAD: the references of the group's class: --reference, else K of the class's normal
    training images in --data."""
    from ..fewshot import class_references, load_references, reference_paths

    shots = args.shots or model.config.shots
    if args.reference is not None:
        if not args.reference.is_dir():
            raise FileNotFoundError(f"--reference folder not found: {args.reference}")
        refs = reference_paths(args.reference, shots, args.shot_seed, what="--reference")
    elif cls is not None:
        refs = class_references(args.data, cls, shots, args.shot_seed, layout=args.layout)
    else:
        raise UsageError("a ResAD run needs --reference DIR: normal images of the class being inspected")
    model.set_reference(load_references(refs, model.image_size).to(args.device))


def _engine(args):
    """The engine of --engine (and --precision); with auto, the one the run's record picks,
    saying what it picked and why."""
    from ..engines import auto_engine, load_engine

    if args.engine != "auto":
        if args.tolerance is not None:
            raise UsageError("--tolerance is for --engine auto")
        return load_engine(args.engine, args.run, args.device, precision=args.precision or "fp32")
    if args.precision is not None:
        raise UsageError("--engine auto chooses the precision too; give --engine with --precision, or no --precision")
    engine = auto_engine(args.run, args.device, DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance)
    print(engine.choice)
    return engine


@torch.no_grad()
def run(args) -> int:
    from ..data import FolderDataset
    from ..io import atomic_open
    from ..runs import Run
    from ..viz import save_heatmap, save_mask
    from .train import ignored_shot_options

    model = _engine(args)  # the engine
    torch_model = getattr(model, "model", None)  # the PyTorch model, with --engine torch
    if torch_model is None and args.reference is not None:
        raise UsageError(f"--reference is for ResAD runs, which predict with --engine torch, not {args.engine}")
    if torch_model is not None:
        ignored_shot_options(args, torch_model.name)
    references = torch_model is not None and torch_model.takes_references
    groups = _groups(args, model.image_size)
    if references and args.reference is None and any(cls is None for cls, _ in groups):
        raise UsageError("a ResAD run needs --reference DIR: normal images of the class being inspected")
    if references and args.reference is not None and not args.reference.is_dir():
        raise FileNotFoundError(f"--reference folder not found: {args.reference}")
    out = args.out or Run(args.run).predictions
    _check_output_folder(out, args.overwrite)
    out.mkdir(parents=True, exist_ok=True)
    every = [p for _, paths in groups for p in paths]
    stems = dict(zip(map(str, every), output_stems(every)))
    rows, decided = [], None
    for cls, paths in groups:
        if references:
            _set_references(args, torch_model, cls)
        dataset = FolderDataset(paths, image_size=model.image_size)
        loader = DataLoader(dataset, batch_size=args.batch_size)
        for batch in tqdm(loader, desc="predict" + (f" {cls}" if cls else ""), unit="batch",
                          disable=args.no_progress):
            pred = model.predict(batch["image"], args.threshold, args.pixel_threshold)
            decided = pred.labels is not None
            for i, path in enumerate(batch["path"]):
                label = "" if pred.labels is None else ("anomalous" if pred.labels[i] else "normal")
                heatmap = mask = ""
                if not args.no_heatmaps:
                    heatmap = stems[path].as_posix() + "_heatmap.png"
                    save_heatmap(out / heatmap, batch["image"][i], pred.anomaly_maps[i],
                                 title=f"{Path(path).name}  score {float(pred.scores[i]):.3f} {label}".rstrip())
                    if pred.masks is not None:
                        mask = stems[path].as_posix() + "_mask.png"
                        save_mask(out / mask, pred.masks[i])
                rows.append((path, _cell(pred.scores, i, "{:.9g}"), _cell(pred.normalized_scores, i, "{:.4f}"),
                             label, heatmap, mask))
    if model.fingerprint is not None:  # the model these predictions were made with (rlr_fast.runs)
        Run.write_source(out, model.fingerprint, f"rlr-fast predict --engine {args.engine}"
                         + (f" ({model.kind} {model.precision})" if args.engine == "auto" else ""))
    with atomic_open(out / SCORES_FILE, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(COLUMNS)
        writer.writerows(rows)
    anomalous = sum(r[3] == "anomalous" for r in rows)
    print(f"{len(rows)} images scored" + (f", {anomalous} anomalous" if decided else "") + f": {out / SCORES_FILE}"
          + ("" if args.no_heatmaps else f"; pictures in {out}"))
    if not decided:
        print(f"no image threshold: {args.run} has no {Run.THRESHOLDS}. Run `rlr-fast test --data DATA --run "
              f"{args.run}` first (it fits F1-optimal thresholds on labelled data) or pass --threshold; "
              f"the raw scores are written, without labels", file=sys.stderr)
    return 0
