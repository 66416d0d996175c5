"""Inference engines: the same calls, ``engine(images) -> AnomalyOutput`` and
``engine.predict(images) -> Prediction`` (scores, labels, maps, masks under the run's
thresholds, as ``model.predict``), whatever runs the model.

``torch`` runs the trained model of a run (PyTorch eager); ``onnxruntime`` and ``openvino`` run
the graph that ``rlr-fast export`` wrote (``RUN/model.onnx``, ``RUN/model.xml``), with no
PyTorch model code involved. Images are (B, 3, H, W) ImageNet-normalised float32 tensors, as
``rlr_fast.data`` reads them; ``engine.image_size`` is the size they must have (an int when
square, else (H, W), as ``model.image_size``).

Precisions (``load_engine(..., precision=)``, ``rlr-fast predict --precision``): ``torch`` runs
fp32 or bf16 (autocast, ``model.precision``); ``onnxruntime`` the float32 graph; ``openvino`` the
float32 graph with OpenVINO's inference precision hint f32 (the default) or bf16 (on CPUs with
native bfloat16: AVX-512 BF16 or AMX), or ``int8``: the model ``rlr-fast export --format openvino
--int8`` quantised with NNCF (``RUN/model-int8.xml``), its unquantised parts in f32.
:data:`PRECISIONS` says which engine takes which. ``load_engine("auto", RUN)`` is
:func:`auto_engine`: the fastest engine and precision whose measured accuracy (``RUN/engines.json``,
written by ``python -m rlr_fast.measure``) stays within a tolerance of torch fp32.

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
# engine -> the precisions it runs, its default first
PRECISIONS = {"torch": ("fp32", "bf16"), "onnxruntime": ("fp32",), "openvino": ("fp32", "bf16", "int8")}
ALL_PRECISIONS = ("fp32", "bf16", "int8")
DEFAULT_TOLERANCE = 0.005  # --engine auto: the largest AUROC drop from torch fp32 accepted


def exported_model(run, engine: str, int8: bool = False) -> Path:
    """The exported file an engine runs: ``run`` itself if it is a file, else the export in it
    (``int8``: the INT8 OpenVINO model)."""
    run = Path(run)
    fmt = FORMATS[engine]
    path = Run(run).export_file(fmt, int8=int8) if run.is_dir() else run
    if not path.is_file():
        how = f"--format {fmt} --int8 --data DATA" if int8 else f"--format {fmt}"
        raise FileNotFoundError(f"no exported model at {path}: write one with `rlr-fast export --run {run} {how}`")
    return path


def check_precision(engine: str, precision: str) -> str:
    """``precision`` if ``engine`` runs it, else a UsageError naming those it runs."""
    if precision not in ALL_PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; choose one of {', '.join(ALL_PRECISIONS)}")
    if precision not in PRECISIONS[engine]:
        others = [e for e, p in PRECISIONS.items() if precision in p]
        raise UsageError(f"the {engine} engine does not run precision {precision} (it runs "
                         f"{', '.join(PRECISIONS[engine])}); {precision} is for {' or '.join('--engine ' + e for e in others)}")
    return precision


def openvino_bf16_supported(core) -> bool:
    """Whether OpenVINO's CPU plugin computes bfloat16 natively on this CPU (AVX-512 BF16 or AMX)."""
    try:
        return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:  # an older OpenVINO without the property: ask PyTorch's oneDNN
        from .precision import bf16_supported

        return bf16_supported("cpu")


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
    kind = "torch"

    def __init__(self, run, device="cpu", precision="fp32"):
        from .checkpoints import load_model

        self.model = load_model(run, device)
        self.model.precision = precision
        self.precision = precision
        self.fingerprint = self.model.fingerprint
        self.device = device
        self.image_size = self.model.image_size

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> AnomalyOutput:
        return self.model(images.to(self.device))

    def predict(self, images: torch.Tensor, image_threshold=None, pixel_threshold=None):
        return self.model.predict(images.to(self.device), image_threshold, pixel_threshold)


class OnnxRuntimeEngine(_Exported):
    kind = "onnxruntime"

    def __init__(self, run, device="cpu"):
        ort = require("onnxruntime", "--engine onnxruntime")
        providers = ["CPUExecutionProvider"]
        if str(device).startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        path = exported_model(run, "onnxruntime")
        self.precision = "fp32"
        self.session = ort.InferenceSession(str(path), providers=providers)
        self._check(run, path, self.session.get_modelmeta().custom_metadata_map.get("fingerprint"))
        self.input = self.session.get_inputs()[0].name
        self.image_size = _size(*self.session.get_inputs()[0].shape[-2:])

    def __call__(self, images: torch.Tensor) -> AnomalyOutput:
        x = np.ascontiguousarray(images.detach().float().cpu().numpy())
        anomaly_map, score = self.session.run(None, {self.input: x})
        return AnomalyOutput(torch.from_numpy(anomaly_map), torch.from_numpy(score))


class OpenVINOEngine(_Exported):
    kind = "openvino"

    def __init__(self, run, device="cpu", precision="fp32"):
        check_precision("openvino", precision)
        ov = require("openvino", "--engine openvino")
        core = ov.Core()
        if precision == "bf16" and not openvino_bf16_supported(core):
            raise UsageError("--precision bf16: this CPU has no native bfloat16 (AVX-512 BF16 or AMX), where "
                             "OpenVINO would emulate it, slower than f32; use --precision fp32 (or int8)")
        path = exported_model(run, "openvino", int8=precision == "int8")
        model = core.read_model(path)

        def info(name):
            key = ["rlr_fast", name]
            return str(model.get_rt_info(key).astype(str)) if model.has_rt_info(key) else None

        quantised = info("precision") == "int8"
        if quantised != (precision == "int8"):
            raise UsageError(f"{path} is the {'INT8' if quantised else 'float32'} model: run it with --precision "
                             f"{'int8' if quantised else 'fp32 or bf16'}")
        self._check(run, path, info("fingerprint"))
        self.precision = precision
        # f32 unless bf16 is asked for: on CPUs with bf16 units OpenVINO would otherwise compute in bf16.
        # The INT8 model's unquantised parts (attention scores, score map) run in f32 too.
        hint = "bf16" if precision == "bf16" else "f32"
        self.compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint})
        shape = model.inputs[0].get_partial_shape()
        self.image_size = _size(shape[2].get_length(), shape[3].get_length())

    def __call__(self, images: torch.Tensor) -> AnomalyOutput:
        x = np.ascontiguousarray(images.detach().float().cpu().numpy())
        result = self.compiled([x])
        anomaly_map, score = (result[self.compiled.outputs[i]] for i in range(2))
        return AnomalyOutput(torch.from_numpy(np.asarray(anomaly_map)), torch.from_numpy(np.asarray(score)))


def load_engine(engine: str, run, device="cpu", precision: str = "fp32"):
    """An engine of kind ``engine`` (one of ENGINES) for a run folder or an exported file, at
    ``precision`` (one of ``PRECISIONS[engine]``: torch fp32/bf16, onnxruntime fp32, openvino
    fp32/bf16/int8). ``"auto"``: :func:`auto_engine` with the default tolerance (its choice in
    ``engine.choice``)."""
    kinds = {"torch": TorchEngine, "onnxruntime": OnnxRuntimeEngine, "openvino": OpenVINOEngine}
    if engine == "auto":
        return auto_engine(run, device)
    if engine not in kinds:
        raise UsageError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)} or auto")
    check_precision(engine, precision)
    if engine == "onnxruntime":
        return OnnxRuntimeEngine(run, device)
    return kinds[engine](run, device, precision)


def _record(run) -> tuple:
    """(the engines record of a run folder or None, why there is none or it is not used)."""
    import json

    run = Run(run)
    path = run.engines_record
    make = f"make one with `python -m rlr_fast.measure --run {run.dir} --data DATA` (DATA: the run's test data)"
    if not path.is_file():
        return None, f"no engine measurements ({path}): {make}"
    try:
        record = json.loads(path.read_text())
        record["engines"]
    except (ValueError, KeyError, TypeError):
        return None, f"{path} is not an engines record: {make} again"
    served = run.served_fingerprint()
    if served is not None and record.get("fingerprint") != served:
        return None, (f"{path} was measured on another model (fingerprint {record.get('fingerprint')}) than the "
                      f"one the run serves now ({served}): {make} again")
    return record, ""


def rank_engines(record: dict, tolerance: float = DEFAULT_TOLERANCE):
    """The measured engines whose image and pixel AUROC are at most ``tolerance`` below torch
    fp32's (the record's reference), fastest first: a list of the record's entries."""
    rows = [r for r in record["engines"] if r.get("status") == "ok"]
    ref = next((r for r in rows if (r["engine"], r["precision"]) == ("torch", "fp32")), None)
    if ref is None:
        return []
    ok = [r for r in rows if all(ref[m] - r[m] <= tolerance + 1e-12 for m in ("image_auroc", "pixel_auroc"))]
    return sorted(ok, key=lambda r: -r["images_per_s"])


def auto_engine(run, device="cpu", tolerance: float = DEFAULT_TOLERANCE):
    """The fastest engine and precision of the run's record (``RUN/engines.json``) whose image
    and pixel AUROC on the run's test set are at most ``tolerance`` below torch fp32's, loaded;
    ``engine.choice`` says what was picked and why. Without a (current) record, or on another
    device than the record's, torch fp32, and ``engine.choice`` says how to make a record. A
    choice that cannot be loaded here (its export missing, bf16 on a CPU without it, a package
    not installed) gives way to the next fastest, and the message says why."""
    if tolerance < 0:
        raise UsageError(f"--tolerance must be >= 0, got {tolerance}")
    record, why = _record(run) if Path(run).is_dir() else (None, "--engine auto needs a run folder (its "
                                                                 "engines.json), not a file")
    if record is not None and torch.device(device).type != record.get("device", "cpu"):
        record, why = None, (f"the engines were measured on {record.get('device', 'cpu')}, not {device}: "
                             f"--engine auto uses torch fp32")
    if record is None:
        engine = TorchEngine(run, device, "fp32")
        engine.choice = f"engine auto: torch fp32 ({why})"
        return engine
    ranked = rank_engines(record, tolerance)
    ref = next(r for r in record["engines"] if (r["engine"], r["precision"]) == ("torch", "fp32"))
    passed = []
    for row in ranked:
        try:
            engine = load_engine(row["engine"], run, device, row["precision"])
        except (ImportError, FileNotFoundError, UsageError) as e:
            passed.append(f"{row['engine']} {row['precision']} not usable here: {e}")
            continue
        speed = row["images_per_s"] / ref["images_per_s"] if ref["images_per_s"] else float("nan")
        faster = [r for r in record["engines"] if r.get("status") == "ok" and r not in ranked
                  and r["images_per_s"] > row["images_per_s"]]
        engine.choice = (f"engine auto: {row['engine']} {row['precision']}, the fastest measured within tolerance "
                         f"{tolerance:g} of torch fp32's AUROC: {row['images_per_s']:.2f} images/s ({speed:.2f}x "
                         f"torch fp32), image AUROC {row['image_auroc']:.4f} (torch fp32 {ref['image_auroc']:.4f}), "
                         f"pixel AUROC {row['pixel_auroc']:.4f} ({ref['pixel_auroc']:.4f}); measured in "
                         f"{Run(run).engines_record}"
                         + "".join(f"; faster but outside the tolerance: {r['engine']} {r['precision']} "
                                   f"({r['images_per_s']:.2f} images/s, image AUROC {r['image_auroc']:.4f}, "
                                   f"pixel AUROC {r['pixel_auroc']:.4f})" for r in faster)
                         + "".join(f"; {p}" for p in passed))
        return engine
    engine = TorchEngine(run, device, "fp32")  # the reference itself is always within tolerance
    engine.choice = "engine auto: torch fp32" + "".join(f"; {p}" for p in passed)
    return engine
