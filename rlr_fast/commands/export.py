"""`rlr-fast export`: a trained run as an ONNX graph, an OpenVINO model, or its weights alone."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UsageError
from ..runs import Run

DEFAULT_NAMES = Run.EXPORTS  # format -> the file it is written to in the run folder


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, type=Path, help="run folder (or checkpoint file) from `rlr-fast train`")
    p.add_argument("--format", required=True, choices=tuple(DEFAULT_NAMES),
                   help="onnx: the whole model as one graph (dynamic batch); openvino: .xml + .bin "
                        "(needs the openvino package); weights: the model alone, no optimizer state")
    p.add_argument("--out", type=Path, help="output file (default: RUN/model.onnx, RUN/model.xml or RUN/weights.pt)")
    p.add_argument("--int8", action="store_true",
                   help="with --format openvino: INT8 post-training quantisation with NNCF (pip install "
                        "'rlr-fast[int8]'), calibrated on the run's training images in --data; writes "
                        "RUN/model-int8.xml + .bin; attention scores and the score map stay float32")
    p.add_argument("--data", type=Path, help="with --int8: the data folder the run was trained on (its training "
                                             "images calibrate the quantisation)")
    p.add_argument("--classes", help="with --int8: comma-separated classes to calibrate on (default: the run's)")
    p.add_argument("--layout", default="auto", help="with --int8: the layout of --data (default: detected)")
    p.add_argument("--calibration-images", type=int, default=128,
                   help="with --int8: how many training images calibrate, spread over the set (default %(default)s)")
    p.add_argument("--image-size", type=int,
                   help="input side of the exported graph; must be the run's (its reference and "
                        "positional embeddings are tied to the trained feature grid); default: the run's")


def _check_int8(args) -> None:
    if not args.int8:
        if args.data is not None or args.classes is not None:
            raise UsageError("--data and --classes are for --int8 (its calibration images)")
        return
    if args.format != "openvino":
        raise UsageError(f"--int8 is for --format openvino (an OpenVINO model quantised with NNCF), not {args.format}")
    if args.data is None:
        raise UsageError("--int8 needs --data DATA: the data folder the run was trained on (its training images "
                         "calibrate the quantisation)")
    if not args.data.is_dir():
        raise FileNotFoundError(f"--data folder not found: {args.data}")
    if args.calibration_images < 1:
        raise UsageError("--calibration-images must be at least 1")
    from ..export import require_installed

    require_installed("openvino", "--format openvino")  # before loading anything: said at once
    require_installed("nncf", "--int8")


def _trained_classes(run):
    """The classes the run was trained on (recorded in its checkpoint), or None."""
    from ..training import read_checkpoint

    extra = read_checkpoint(Run(run).model_file()).get("extra") or {}
    return extra.get("classes")


def run(args) -> int:
    from ..export import export, export_openvino_int8
    from ..training import load_model

    _check_int8(args)
    model = load_model(args.run, "cpu", thresholds=False)  # an export does not decide: no thresholds needed
    if model.graph_export_refused and args.format != "weights":  # (ResAD's)
        raise UsageError(f"--format {args.format}: {model.graph_export_refused}")
    if args.int8 and model.name != "rlr":
        raise UsageError(f"--int8: only RLR runs are quantised so far (which ops of {model.name} must stay in float32 "
                         f"has not been measured); export --format openvino without --int8")
    if args.image_size is not None and (args.image_size, args.image_size) != tuple(model.input_size):
        raise UsageError(f"--image-size {args.image_size}: this run was trained at {model.image_size} px and its "
                         f"model only takes that size ({model.fixed_size_reason}); resize images instead, as "
                         f"`rlr-fast predict` does")
    out = args.out or Run(args.run).export_file(args.format, int8=args.int8)
    if out.is_dir():
        name = Run.INT8 if args.int8 else DEFAULT_NAMES[args.format]
        raise UsageError(f"--out {out} is a folder; give a file name (e.g. {out / name})")
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.int8:
        classes = args.classes or _trained_classes(args.run)
        path = export_openvino_int8(model, out, args.data, classes, args.layout, args.calibration_images)
    else:
        path = export(model, args.format, out)
    extra = f" (weights in {path.with_suffix('.bin')})" if args.format == "openvino" else ""
    print(f"exported {model.name} ({args.format}{', int8' if args.int8 else ''}): {path}{extra}")
    return 0
