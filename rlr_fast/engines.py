"""Inference engines: the same calls, ``engine(images) -> AnomalyOutput`` and
``engine.predict(images) -> Prediction`` (scores, labels, maps, masks under the run's
thresholds, as ``model.predict``), whatever runs the model.

``torch`` runs the trained model of a run (PyTorch eager); ``onnxruntime`` and ``openvino`` run
the graph that ``rlr-fast export`` wrote (``RUN/model.onnx``, ``RUN/model.xml``), with no
PyTorch model code involved. Images are (B, 3, H, W) ImageNet-normalised float32 tensors, as
``rlr_fast.data`` reads them; ``engine.image_size`` is the size they must have (an int when
square, else (H, W), as ``model.image_size``).

Every engine refuses (:class:`~rlr_fast.errors.StaleRunError`) an export or thresholds made from
other weights than the ones the run serves now (``rlr_fast.runs``); ``engine.fingerprint`` is the
fingerprint of the model it runs.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .errors import UsageError
from .export import require
from .models.base import AnomalyOutput, decide
from .runs import Run

ENGINES = ("torch", "onnxruntime", "openvino")
FORMATS = {"onnxruntime": "onnx", "openvino": "openvino"}  # engine -> the export format it runs


def exported_model(run, engine: str) -> Path:
    """The exported file an engine runs: ``run`` itself if it is a file, else the export in it."""
    run = Path(run)
    fmt = FORMATS[engine]
    path = Run(run).export_file(fmt) if run.is_dir() else run
    if not path.is_file():
        raise FileNotFoundError(f"no exported model at {path}: write one with "
                                f"`rlr-fast export --run {run} --format {fmt}`")
    return path


def _size(height: int, width: int):
    return height if height == width else (height, width)


class _Exported:
    """What the onnxruntime and OpenVINO engines share: the run's thresholds and predict(), and
    the checks that the export and the thresholds come from the model the run serves."""

    def _check(self, run, path: Path, recorded) -> None:
        """Refuse an export in a run folder made from other weights than the run serves now (a file
        given itself is the model), then thresholds fitted for another model than the export's."""
        run = Run(run)
        served = run.served_fingerprint() if run.file is None else None
        run.check(path, recorded, served)
        self.fingerprint = recorded or served
        self.thresholds = run.thresholds(expected=self.fingerprint) if self.fingerprint else run.thresholds(check=False)

    def predict(self, images: torch.Tensor, image_threshold=None, pixel_threshold=None):
        return decide(self(images), self.thresholds, image_threshold, pixel_threshold)


class TorchEngine:
    def __init__(self, run, device="cpu", precision="fp32"):
        from .checkpoints import load_model

        self.model = load_model(run, device)
        self.model.precision = precision
        self.fingerprint = self.model.fingerprint
        self.device = device
        self.image_size = self.model.image_size

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> AnomalyOutput:
        return self.model(images.to(self.device))

    def predict(self, images: torch.Tensor, image_threshold=None, pixel_threshold=None):
        return self.model.predict(images.to(self.device), image_threshold, pixel_threshold)


class OnnxRuntimeEngine(_Exported):
    def __init__(self, run, device="cpu"):
        ort = require("onnxruntime", "--engine onnxruntime")
        providers = ["CPUExecutionProvider"]
        if str(device).startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        path = exported_model(run, "onnxruntime")
        self.session = ort.InferenceSession(str(path), providers=providers)
        self._check(run, path, self.session.get_modelmeta().custom_metadata_map.get("fingerprint"))
        self.input = self.session.get_inputs()[0].name
        self.image_size = _size(*self.session.get_inputs()[0].shape[-2:])

    def __call__(self, images: torch.Tensor) -> AnomalyOutput:
        x = np.ascontiguousarray(images.detach().float().cpu().numpy())
        anomaly_map, score = self.session.run(None, {self.input: x})
        return AnomalyOutput(torch.from_numpy(anomaly_map), torch.from_numpy(score))


class OpenVINOEngine(_Exported):
    def __init__(self, run, device="cpu"):
        ov = require("openvino", "--engine openvino")
        core = ov.Core()
        path = exported_model(run, "openvino")
        model = core.read_model(path)
        key = ["rlr_fast", "fingerprint"]
        self._check(run, path, str(model.get_rt_info(key).astype(str)) if model.has_rt_info(key) else None)
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
