"""Measure each inference engine and precision on a trained run's test set, side by side in one
process, and record it in ``RUN/engines.json`` (what ``rlr-fast predict --engine auto`` reads).

    python -m rlr_fast.measure --run RUN --data DATA [--batch-size 16] [--rounds 5]

For each engine and precision (torch fp32 first: the reference; torch bf16; onnxruntime fp32;
OpenVINO fp32, bf16 and int8) the test images of DATA (the run's classes) go through the
engine once, for the accuracy: image and pixel AUROC (per class, and their mean over classes, as
``rlr-fast test``), and the largest difference of its anomaly maps and image scores from torch
fp32's, relative to the largest torch fp32 value. Then, for the speed, one full batch is run
``--rounds`` times after a warm-up call; images/s is the batch size over the median time. The
exports the engines run (``RUN/model.onnx``, ``RUN/model.xml``, ``RUN/model-int8.xml``) are
written first where missing (the INT8 one calibrated on DATA's training images, in a child
process: :mod:`rlr_fast.quantize`). An engine or precision that cannot run here (a package not
installed, bf16 on a CPU without native bf16) is recorded with ``status`` "skipped" and why.

The record (``FORMAT`` 1)::

    {"format": 1, "fingerprint": <the model's, rlr_fast.runs>, "device": "cpu", "data": ..., "classes": [...],
     "images": N, "image_size": S, "batch_size": B, "rounds": R, "threads": T, "cpu": ..., "cpu_bf16": bool,
     "versions": {package: version}, "created": <UTC time>, "command": ...,
     "engines": [{"engine": "torch", "precision": "fp32", "status": "ok" | "skipped", "reason": str (skipped),
                  "images_per_s": float, "batch_seconds": [float], "image_auroc": float, "pixel_auroc": float,
                  "image_auroc_change": float, "pixel_auroc_change": float (vs torch fp32),
                  "max_map_difference": float, "max_score_difference": float (relative to torch fp32's largest),
                  "classes": {class: {"image_auroc": float, "pixel_auroc": float}}}, ...]}

Every figure is measured here, on this machine: run it on a quiet one (nothing else running).
The test maps of two engines are held in memory at once (8 bytes per test pixel).
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from .timing import cpu_name

FORMAT = 1
CANDIDATES = (("torch", "fp32"), ("torch", "bf16"), ("onnxruntime", "fp32"),
              ("openvino", "fp32"), ("openvino", "bf16"), ("openvino", "int8"))
PACKAGES = ("torch", "onnxruntime", "openvino", "nncf")


def _versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def make_exports(run, model, data, classes, layout, candidates=CANDIDATES, say=print) -> dict:
    """Write the exports the ``candidates`` run where missing; (engine, precision) -> why it
    cannot be made, for those that could not."""
    from .export import export, export_openvino_int8
    from .runs import Run

    run, failed = Run(run), {}
    for fmt, engines in (("onnx", [("onnxruntime", "fp32")]), ("openvino", [("openvino", "fp32"), ("openvino", "bf16")])):
        path = run.export_file(fmt)
        if not any(key in candidates for key in engines):
            continue
        if not path.is_file():
            try:
                say(f"exporting {fmt}: {path}")
                export(model, fmt, path)
            except ImportError as e:
                failed.update({key: str(e) for key in engines})
    path = run.export_file("openvino", int8=True)
    if ("openvino", "int8") not in candidates:
        pass
    elif model.name != "rlr":
        failed[("openvino", "int8")] = f"only RLR runs are quantised to INT8 so far, not {model.name}"
    elif not path.is_file():
        try:
            say(f"exporting openvino int8 (NNCF, calibrated on the training images of {data}): {path}")
            export_openvino_int8(model, path, data, classes, layout)
        except (ImportError, RuntimeError) as e:
            failed[("openvino", "int8")] = str(e)
    return failed


def _auroc(per_class: dict, key: str) -> float:
    vals = [v[key] for v in per_class.values() if not math.isnan(v[key])]
    return float(np.mean(vals)) if vals else math.nan


def accuracy_pass(engine, loader, n: int, size: int):
    """(maps (N, H, W) float32, scores (N,) float64) of the engine over the loader."""
    maps = np.empty((n, size, size), np.float32)
    scores = np.empty(n, np.float64)
    i = 0
    with torch.no_grad():
        for batch in loader:
            out = engine(batch["image"])
            b = len(batch["image"])
            maps[i:i + b] = out.anomaly_map.float().cpu().numpy()[:, 0]
            scores[i:i + b] = out.score.double().cpu().numpy()
            i += b
    return maps, scores


def speed(engine, images: torch.Tensor, rounds: int) -> list:
    """Seconds per call of ``engine(images)`` over ``rounds`` calls after a warm-up call."""
    with torch.no_grad():
        engine(images)
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            engine(images)
            times.append(time.perf_counter() - t0)
    return times


def metrics_of(maps, scores, labels, masks, classes_of) -> dict:
    from .metrics import image_auroc, pixel_auroc

    per = {}
    for cls in dict.fromkeys(classes_of):
        idx = np.array([c == cls for c in classes_of])
        per[cls] = {"image_auroc": image_auroc(labels[idx], scores[idx]),
                    "pixel_auroc": pixel_auroc(masks[idx], maps[idx])}
    return per


def measure(run, data, classes=None, layout=None, batch_size: int = 16, rounds: int = 5, candidates=CANDIDATES,
            say=print) -> dict:
    """The engines record of ``run`` on the test set of ``data`` (see the module's docstring)."""
    from torch.utils.data import DataLoader

    from .data import MVTecDataset
    from .engines import load_engine
    from .precision import bf16_supported
    from .runs import Run
    from .training import load_model, read_checkpoint

    model = load_model(run, "cpu", thresholds=False)
    if model.name == "resad":
        raise ValueError("a ResAD run predicts with the torch engine only (its references change per class): "
                         "there are no engines to compare")
    if classes is None:
        classes = (read_checkpoint(Run(run).model_file()).get("extra") or {}).get("classes")
    if not isinstance(model.image_size, int):
        raise ValueError(f"measure reads square test images; this model takes {model.image_size}")
    dataset = MVTecDataset(data, classes=classes, split="test", image_size=model.image_size,
                           layout=None if layout in (None, "auto") else layout)
    failed = make_exports(run, model, data, dataset.classes, layout, candidates, say=say)
    fingerprint = model.fingerprint
    del model
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    labels = np.array([s[2] for s in dataset.samples])
    classes_of = [s[3] for s in dataset.samples]
    masks = np.concatenate([batch["mask"][:, 0].numpy() > 0.5 for batch in loader])
    first = next(iter(loader))["image"]
    n, model_size = len(dataset), dataset.image_size
    rows, ref = [], None
    for engine_name, precision in candidates:
        row = {"engine": engine_name, "precision": precision}
        rows.append(row)
        why = failed.get((engine_name, precision))
        if why is None and precision == "bf16" and engine_name == "torch" and not bf16_supported("cpu"):
            why = "this CPU has no native bfloat16 (AVX-512 BF16 or AMX): torch bf16 would run fp32"
        if why is None:
            try:
                engine = load_engine(engine_name, run, "cpu", precision)
            except (ImportError, FileNotFoundError, ValueError) as e:
                why = str(e)
        if why is not None:
            if ref is None:
                raise RuntimeError(f"the reference, torch fp32, cannot run: {why}")
            row.update(status="skipped", reason=why)
            say(f"{engine_name} {precision}: skipped ({why})")
            continue
        say(f"{engine_name} {precision}: {n} test images")
        maps, scores = accuracy_pass(engine, loader, n, model_size)
        times = speed(engine, first, rounds)
        del engine
        per = metrics_of(maps, scores, labels, masks, classes_of)
        row.update(status="ok", images_per_s=len(first) / statistics.median(times), batch_seconds=times,
                   image_auroc=_auroc(per, "image_auroc"), pixel_auroc=_auroc(per, "pixel_auroc"), classes=per)
        if ref is None:
            ref = (maps, scores, row)
        ref_maps, ref_scores, ref_row = ref
        row.update(image_auroc_change=row["image_auroc"] - ref_row["image_auroc"],
                   pixel_auroc_change=row["pixel_auroc"] - ref_row["pixel_auroc"],
                   max_map_difference=float(np.abs(maps - ref_maps).max() / max(np.abs(ref_maps).max(), 1e-30)),
                   max_score_difference=float(np.abs(scores - ref_scores).max()
                                              / max(np.abs(ref_scores).max(), 1e-30)))
        say(f"  {row['images_per_s']:.2f} images/s, image AUROC {row['image_auroc']:.4f}, pixel AUROC "
            f"{row['pixel_auroc']:.4f}, map difference {row['max_map_difference']:.1e}")
    return {"format": FORMAT, "fingerprint": fingerprint, "device": "cpu",
            "data": str(data), "classes": list(dataset.classes), "images": n, "image_size": model_size,
            "batch_size": batch_size, "rounds": rounds, "threads": torch.get_num_threads(), "cpu": cpu_name(),
            "cpu_bf16": bf16_supported("cpu"), "versions": _versions(),
            "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "command": f"python -m rlr_fast.measure --run {Run(run).dir} --data {data}",
            "engines": rows}


def markdown(record: dict) -> str:
    """The record as the table of BENCHMARKS.md."""
    ref = next(r for r in record["engines"] if r.get("status") == "ok")
    lines = ["| engine | precision | images/s | vs torch fp32 | image AUROC | pixel AUROC | map difference |",
             "|---|---|---|---|---|---|---|"]
    for r in record["engines"]:
        if r.get("status") != "ok":
            lines.append(f"| {r['engine']} | {r['precision']} | skipped: {r['reason']} | | | | |")
            continue
        lines.append(f"| {r['engine']} | {r['precision']} | {r['images_per_s']:.2f} | "
                     f"{r['images_per_s'] / ref['images_per_s']:.2f}x | {r['image_auroc']:.4f} | "
                     f"{r['pixel_auroc']:.4f} | {r['max_map_difference']:.1e} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from .io import atomic_write_json
    from .runs import Run

    p = argparse.ArgumentParser(prog="python -m rlr_fast.measure", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, type=Path, help="a trained run folder")
    p.add_argument("--data", required=True, type=Path, help="the run's data folder (test split measured, training "
                                                            "split calibrates the INT8 model)")
    p.add_argument("--classes", help="comma-separated classes (default: the run's)")
    p.add_argument("--layout", default="auto", help="layout of --data (default: detected)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5, help="timed calls of one batch per engine (median)")
    p.add_argument("--out", type=Path, help="the record (default: RUN/engines.json)")
    args = p.parse_args(argv)
    if not args.run.is_dir():
        p.error(f"--run must be a run folder: {args.run}")
    record = measure(args.run, args.data, args.classes, args.layout, args.batch_size, args.rounds)
    out = args.out or Run(args.run).engines_record
    atomic_write_json(out, record)
    print(markdown(record))
    print(f"engines record: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
