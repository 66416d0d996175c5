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
    p.add_argument("--image-size", type=int,
                   help="input side of the exported graph; must be the run's (its reference and "
                        "positional embeddings are tied to the trained feature grid); default: the run's")


def run(args) -> int:
    from ..export import export
    from ..training import load_model

    model = load_model(args.run, "cpu", thresholds=False)  # an export does not decide: no thresholds needed
    if model.graph_export_refused and args.format != "weights":  # (ResAD's)
        raise UsageError(f"--format {args.format}: {model.graph_export_refused}")
    if args.image_size is not None and (args.image_size, args.image_size) != tuple(model.input_size):
        raise UsageError(f"--image-size {args.image_size}: this run was trained at {model.image_size} px and its "
                         f"model only takes that size ({model.fixed_size_reason}); resize images instead, as "
                         f"`rlr-fast predict` does")
    out = args.out or Run(args.run).export_file(args.format)
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder; give a file name (e.g. {out / DEFAULT_NAMES[args.format]})")
    out.parent.mkdir(parents=True, exist_ok=True)
    path = export(model, args.format, out)
    extra = f" (weights in {path.with_suffix('.bin')})" if args.format == "openvino" else ""
    print(f"exported {model.name} ({args.format}): {path}{extra}")
    return 0
