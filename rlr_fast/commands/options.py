"""Option types shared by the commands, checked at parse time.

A bad value stops the command before any work with argparse's one-line error, which names the
option: ``argument --epochs: must be an integer >= 1, got 0``.
"""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import torch

from ..errors import UsageError

# The smallest input side every model can run: RLR's coarsest grid (stride 16) must hold more than
# one token for MLKA to leave each query a key, and UniAD's 16-stride grid then is 2 x 2.
MIN_IMAGE_SIZE = 32


def int_at_least(minimum: int):
    """An argparse type: an integer >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


positive_int = int_at_least(1)
image_size = int_at_least(MIN_IMAGE_SIZE)
seed = int_at_least(0)


def float_in(what: str, accepts):
    """An argparse type: a finite number for which ``accepts(value)`` holds; ``what`` names the
    range in the error (e.g. "> 0", "in [0, 1)")."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number {what}, got {text!r}") from None
        if not (math.isfinite(value) and accepts(value)):
            raise argparse.ArgumentTypeError(f"must be a finite number {what}, got {text}")
        return value

    return parse


positive_float = float_in("> 0", lambda v: v > 0)  # e.g. a learning rate
fraction = float_in("in [0, 1)", lambda v: 0 <= v < 1)  # e.g. the share of images held out
unit_fraction = float_in("in (0, 1]", lambda v: 0 < v <= 1)  # e.g. the share of tokens a coreset keeps


def device(text: str) -> str:
    """An argparse type: a torch device that exists on this machine (cpu, cuda, cuda:1, mps)."""
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"not a device: {text!r} (e.g. cpu, cuda, cuda:1)") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text!r}: no CUDA GPU is available on this machine; use cpu")
        if dev.index is not None and dev.index >= count:
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {count} CUDA GPU(s), "
                                             f"numbered 0 to {count - 1}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available on this machine; use cpu")
    return text


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_backend(backend: str, device: str) -> None:
    """The triton backend runs on CUDA, or on the CPU in Triton's interpreter: refuse it on
    another device before any work, not at the first attention call of the training."""
    if backend == "triton" and torch.device(device).type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise UsageError(f"--backend triton needs --device cuda (got {device}); "
                         f"set TRITON_INTERPRET=1 to run Triton's (slow) interpreter instead")


def existing_folder(text: str) -> Path:
    """An argparse type: a folder that exists."""
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"folder not found: {path}")
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a file, not a folder")
    return path


def output_folder(text: str) -> Path:
    """An argparse type: a folder to write into; it may not exist yet, but neither it nor the
    nearest of its parents that exists may be a file."""
    path = Path(text)
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise argparse.ArgumentTypeError(f"{existing} is a file, not a folder")
    return path


def output_file(text: str) -> Path:
    """An argparse type: a file to write; it may not exist yet, but must not be a folder."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a folder, not a file")
    return path
