"""The ``rlr-fast`` command line (also ``python -m rlr_fast``).

Each sub-command lives in the module that owns its job; this file only wires them up.
A command module provides ``configure(parser)`` and ``run(args) -> int``.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS = {
    "train": ("rlr_fast.commands.train", "train one model on every class of a data folder"),
    "test": ("rlr_fast.commands.test", "evaluate a trained run: per-class metrics and overlays"),
    "predict": ("rlr_fast.commands.predict", "score images with a trained run: CSV and heat maps"),
    "demo": ("rlr_fast.commands.demo", "build the demo data, train, test and summarise (offline)"),
    "kernels": ("rlr_fast.kernels.aot", "compile every Triton kernel ahead of time for GPU targets"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlr-fast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).configure(p)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
