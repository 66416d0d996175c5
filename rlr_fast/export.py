"""Export a trained model for deployment: ONNX, OpenVINO, or its weights alone.

The ONNX graph is the whole model, images to (anomaly map, score): the frozen backbone, each
level's reconstruction, the anomaly map and the image score, with a dynamic batch dimension. It
is recorded by ``torch.onnx.export(dynamo=True)``; while it traces, the attention ops run as
plain tensor operations (``rlr_fast.traceable``) that compute what the ``torch`` backend does.
The OpenVINO model (``.xml`` + ``.bin``) is converted from that ONNX graph, so both engines run
the same computation. The weights file is the model alone (configuration and state dict, no
optimizer, schedule or random state), readable with ``torch.load(weights_only=True)`` and by
``rlr_fast.training.load_model``.
"""
from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import subprocess
import sys
import tempfile
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .errors import UsageError
from .io import atomic_torch_save, atomic_write_bytes
from .backbone import input_norm_of
from .runs import model_fingerprint
from .checkpoints import FORMAT

FORMATS = ("onnx", "openvino", "weights")
SUFFIXES = {"onnx": ".onnx", "openvino": ".xml", "weights": ".pt"}
INPUT, OUTPUTS = "images", ("anomaly_map", "score")
OPSET = 18


class MissingPackage(ImportError, UsageError):
    """An optional package that a requested format or engine needs is not installed (a
    ValueError too, so the command line reports it in one line)."""


EXTRAS = {"nncf": "int8"}  # package -> the extra that installs it (default: deploy)


def _missing(package: str, what: str) -> MissingPackage:
    return MissingPackage(f"{what} needs the {package} package: pip install 'rlr-fast[{EXTRAS.get(package, 'deploy')}]'")


def require(package: str, what: str):
    """Import ``package`` for ``what``, or raise MissingPackage saying how to install it."""
    try:
        return importlib.import_module(package)
    except ImportError:
        raise _missing(package, what) from None


def require_installed(package: str, what: str) -> None:
    """Like :func:`require`, without importing ``package`` into this process (NNCF runs in a
    child process: :mod:`rlr_fast.quantize`)."""
    try:
        found = importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise _missing(package, what)


class Deployable(nn.Module):
    """The eval-mode model as a plain function of the images: (anomaly_map, score)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.eval()

    def forward(self, images: torch.Tensor):
        out = self.model(images)
        return out.anomaly_map, out.score


def metadata(model) -> dict:
    """What a deployment engine needs to know about the exported model, and the fingerprint of
    the weights it was exported from (``rlr_fast.runs``: engines refuse an export whose
    fingerprint is not that of the model its run serves)."""
    return {"format": FORMAT, "model": model.name, "input_size": json.dumps(list(model.input_size)),
            "config": json.dumps(asdict(model.config)), "fingerprint": model_fingerprint(model)}


def onnx_bytes(model, batch: int = 2) -> bytes:
    """The serialised ONNX model of ``model`` (float32, CPU) with a dynamic batch dimension."""
    for package in ("onnx", "onnxscript"):  # torch.onnx needs them: say so here, not deep inside it
        require(package, "ONNX export")
    if next(model.parameters()).dtype != torch.float32 or next(model.parameters()).device.type != "cpu":
        model = copy.deepcopy(model).float().cpu()  # the caller's model stays as it is
    module = Deployable(model)
    images = torch.randn(batch, 3, *model.input_size)  # batch 2: 1 would be specialised
    dynamic = {INPUT: {0: torch.export.Dim("batch", min=1, max=1024)}}
    with torch.no_grad(), warnings.catch_warnings():
        # The geometry tables are cached with lru_cache; tracing through the cache is intended.
        warnings.filterwarnings("ignore", message=".*lru_cache.*")
        program = torch.onnx.export(module, (images,), dynamo=True, input_names=[INPUT], output_names=list(OUTPUTS),
                                    dynamic_shapes=dynamic, opset_version=OPSET, verbose=False)
    proto = program.model_proto
    for key, value in metadata(model).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return proto.SerializeToString()


def export_onnx(model, path) -> Path:
    atomic_write_bytes(path, onnx_bytes(model))
    return Path(path)


def export_openvino(model, path) -> Path:
    """``path`` (.xml) and its weights beside it (.bin), converted from the ONNX graph."""
    ov = require("openvino", "--format openvino")
    path = Path(path)
    if path.suffix != ".xml":
        raise UsageError(f"an OpenVINO model is an .xml file (weights in a .bin beside it), got {path}")
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        onnx_path.write_bytes(onnx_bytes(model))
        ov_model = ov.convert_model(onnx_path)
        for key, value in metadata(model).items():
            ov_model.set_rt_info(value, ["rlr_fast", key])
        ov.save_model(ov_model, Path(tmp) / "model.xml", compress_to_fp16=False)
        # Weights first: the .xml appears only once the .bin it refers to is complete.
        atomic_write_bytes(path.with_suffix(".bin"), (Path(tmp) / "model.bin").read_bytes())
        atomic_write_bytes(path, (Path(tmp) / "model.xml").read_bytes())  # reads <stem>.bin beside it
    return path


def export_openvino_int8(model, path, data, classes=None, layout=None, subset: Optional[int] = None) -> Path:
    """``path`` (.xml, .bin beside it): the OpenVINO model quantised to INT8 by NNCF
    (:mod:`rlr_fast.quantize`, run in a child process), calibrated on the training images of
    ``classes`` in the data folder ``data``."""
    require_installed("openvino", "--format openvino")
    require_installed("nncf", "--int8")
    path = Path(path)
    if path.suffix != ".xml":
        raise UsageError(f"an OpenVINO model is an .xml file (weights in a .bin beside it), got {path}")
    if not isinstance(model.image_size, int):
        raise UsageError(f"--int8 calibrates on square images; this model takes {model.image_size}")
    with tempfile.TemporaryDirectory() as tmp:
        source = export_openvino(model, Path(tmp) / "model.xml")
        command = [sys.executable, "-m", "rlr_fast.quantize", "--model", str(source), "--out", str(path),
                   "--data", str(data), "--image-size", str(model.image_size)]
        if classes:
            command += ["--classes", ",".join(classes) if not isinstance(classes, str) else classes]
        if layout not in (None, "auto"):
            command += ["--layout", str(layout)]
        if subset:
            command += ["--subset", str(subset)]
        done = subprocess.run(command)
    if done.returncode != 0:
        raise RuntimeError(f"INT8 quantisation failed (exit code {done.returncode}) in `{' '.join(command[1:])}`; "
                           f"its output is above")
    return path


def export_weights(model, path) -> Path:
    """The model alone, as ``load_model`` reads it: format, model name, config and state dict (and
    the fingerprint of those weights, which is the source checkpoint's)."""
    state = {"format": FORMAT, "model": model.name, "config": asdict(model.config),
             "state_dict": model.state_dict(), "input_norm": input_norm_of(model),
             "fingerprint": model_fingerprint(model)}
    atomic_torch_save(state, path)
    return Path(path)


def export(model, fmt: str, path) -> Path:
    """Write ``model`` in format ``fmt`` (one of FORMATS) to ``path``."""
    if fmt not in FORMATS:
        raise UsageError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return {"onnx": export_onnx, "openvino": export_openvino, "weights": export_weights}[fmt](model, path)
