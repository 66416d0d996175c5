"""The ``rlr-fast`` command line (also ``python -m rlr_fast``).

Each sub-command lives in the module that owns its job; this file only wires them up.
A command module provides ``configure(parser)`` and ``run(args) -> int``.

Only the package's own errors (:mod:`rlr_fast.errors`: bad options, data, checkpoints) and
plain file-system errors (a missing file, a file where a folder should be, no permission)
become one-line messages; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import RLRFastError

USER_ERRORS = (RLRFastError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)

# name -> (module, one-line help)
COMMANDS = {
    "train": ("rlr_fast.commands.train", "train one model on every class of a data folder"),
    "test": ("rlr_fast.commands.test", "evaluate a trained run: per-class metrics, overlays and decision thresholds"),
    "predict": ("rlr_fast.commands.predict", "decide on images with a trained run: scores, labels, heat maps and masks"),
    "export": ("rlr_fast.commands.export", "export a trained run for deployment: ONNX, OpenVINO or weights alone"),
    "demo": ("rlr_fast.commands.demo", "build the demo data, train, test and summarise (offline)"),
    "kernels": ("rlr_fast.kernels.aot", "compile every Triton kernel ahead of time for GPU targets"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlr-fast", description="rlr-fast: fast multi-class industrial anomaly detection with RLR.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module, _import_error=None)
        try:
            importlib.import_module(module).configure(p)
        except ImportError as e:  # e.g. no triton on this platform: the other commands still work
            p.set_defaults(_import_error=f"`rlr-fast {name}` is unavailable here: {e}")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args._import_error:
        print(args._import_error, file=sys.stderr)
        return 2
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except USER_ERRORS as e:  # bad input: a clear message, no traceback
        print(f"rlr-fast {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
