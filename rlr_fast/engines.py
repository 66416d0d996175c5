"""Inference engines: the same calls, ``engine(images) -> AnomalyOutput`` and
``engine.predict(images) -> Prediction`` (scores, labels, maps, masks under the run's
thresholds, as ``model.predict``), whatever runs the model.

``torch`` runs the trained model of a run (PyTorch eager); ``onnxruntime`` and ``openvino`` run
the graph that ``rlr-fast export`` wrote (``RUN/model.onnx``, ``RUN/model.xml``), with no
PyTorch model code involved. Images are (B, 3, H, W) ImageNet-normalised float32 tensors, as
``rlr_fast.data`` reads them; ``engine.image_size`` is the size they must have (an int when
square, else (H, W), as ``model.image_size``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .decisions import Thresholds
from .errors import UsageError
from .export import require
from .models.base import AnomalyOutput, decide

ENGINES = ("torch", "onnxruntime", "openvino")
EXPORTED = {"onnxruntime": "model.onnx", "openvino": "model.xml"}


def exported_model(run, engine: str) -> Path:
    """The exported file an engine runs: ``run`` itself if it is a file, else the export in it."""
    run = Path(run)
    path = run / EXPORTED[engine] if run.is_dir() else run
    if not path.is_file():
        fmt = "onnx" if engine == "onnxruntime" else "openvino"
        raise FileNotFoundError(f"no exported model at {path}: write one with "
                                f"`rlr-fast export --run {run} --format {fmt}`")
    return path


def _size(height: int, width: int):
    return height if height == width else (height, width)


class _Exported:
    """What the onnxruntime and OpenVINO engines share: the run's thresholds and predict()."""

    def __init__(self, run):
        run = Path(run)
        self.thresholds = Thresholds.of_run(run if run.is_dir() else run.parent)

    def predict(self, images: torch.Tensor, image_threshold=None, pixel_threshold=None):
        return decide(self(images), self.thresholds, image_threshold, pixel_threshold)


class TorchEngine:
    def __init__(self, run, device="cpu", precision="fp32"):
        from .training import load_model

        self.model = load_model(run, device)
        self.model.precision = precision
        self.device = device
        self.image_size = self.model.image_size

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> AnomalyOutput:
        return self.model(images.to(self.device))

    def predict(self, images: torch.Tensor, image_threshold=None, pixel_threshold=None):
        return self.model.predict(images.to(self.device), image_threshold, pixel_threshold)


class OnnxRuntimeEngine(_Exported):
    def __init__(self, run, device="cpu"):
        super().__init__(run)
        ort = require("onnxruntime", "--engine onnxruntime")
        providers = ["CPUExecutionProvider"]
        if str(device).startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(str(exported_model(run, "onnxruntime")), providers=providers)
        self.input = self.session.get_inputs()[0].name
        self.image_size = _size(*self.session.get_inputs()[0].shape[-2:])

    def __call__(self, images: torch.Tensor) -> AnomalyOutput:
        x = np.ascontiguousarray(images.detach().float().cpu().numpy())
        anomaly_map, score = self.session.run(None, {self.input: x})
        return AnomalyOutput(torch.from_numpy(anomaly_map), torch.from_numpy(score))


class OpenVINOEngine(_Exported):
    def __init__(self, run, device="cpu"):
        super().__init__(run)
        ov = require("openvino", "--engine openvino")
        core = ov.Core()
        model = core.read_model(exported_model(run, "openvino"))
        # fp32 as exported: on CPUs with bf16 units OpenVINO would otherwise compute in bf16.
        self.compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        shape = model.inputs[0].get_partial_shape()
        self.image_size = _size(shape[2].get_length(), shape[3].get_length())

    def __call__(self, images: torch.Tensor) -> AnomalyOutput:
        x = np.ascontiguousarray(images.detach().float().cpu().numpy())
        result = self.compiled([x])
        anomaly_map, score = (result[self.compiled.outputs[i]] for i in range(2))
        return AnomalyOutput(torch.from_numpy(np.asarray(anomaly_map)), torch.from_numpy(np.asarray(score)))


def load_engine(engine: str, run, device="cpu", precision: str = "fp32"):
    """An engine of kind ``engine`` (one of ENGINES) for a run folder or an exported file.
    ``precision`` ("fp32", "bf16") is the torch engine's (``model.precision``); the exported
    graphs run in float32."""
    kinds = {"torch": TorchEngine, "onnxruntime": OnnxRuntimeEngine, "openvino": OpenVINOEngine}
    if engine not in kinds:
        raise UsageError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if engine == "torch":
        return TorchEngine(run, device, precision)
    if precision != "fp32":
        raise UsageError(f"precision {precision!r} is for the torch engine; the {engine} engine runs the "
                         f"exported float32 graph")
    return kinds[engine](run, device)
