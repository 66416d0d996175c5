"""INT8 post-training quantisation of an exported OpenVINO model with NNCF, in its own process.

``rlr-fast export --format openvino --int8`` writes the float32 OpenVINO model, then runs
``python -m rlr_fast.quantize`` on it in a child process: NNCF and the thread pools it starts
stay out of the calling process (an NNCF import inside a long-lived process that later runs
other native code has crashed it; see the README's export section).

What is quantised: the reconstruction's matrix products with weights (the attention
projections, the output projections, the FFN), with NNCF's transformer preset
(``model_type=TRANSFORMER``: SmoothQuant on the projections' activations). What stays in float32
(an NNCF ignored scope, :func:`kept_in_float`):

- the attention scores and their softmax-weighted sums (the two matrix products around each
  softmax), so the softmax sees float32 scores;
- every convolution: the frozen backbone (about 3% of RLRModel's FLOPs at 256 px, so little to
  gain, and quantising it with the transformer preset decorrelated the maps from fp32 entirely in
  our measurement: the reconstruction is compared with those features, and an error in them is an
  error in the residual) and the Gaussian blur of the image score;
- the score map (every weighted op after the upsampling of each level's score grid, and the
  per-token scores, e.g. the whitening projection, between the residual and that upsampling).

The calibration images are the run's training images (``--data`` in its layout, the classes the
run was trained on), ``--subset`` of them spread evenly over the set.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

QUANTISED_TYPES = ("MatMul", "Convolution", "GroupConvolution")
# ops between an attention's score product and its softmax, or after the softmax before its weighted sum
PASS_THROUGH = ("Multiply", "Add", "Divide", "Select", "Reshape", "Transpose", "Convert", "Unsqueeze", "Squeeze")
DEFAULT_SUBSET = 128


def _consumers(op):
    return [target.get_node() for output in op.outputs() for target in output.get_target_inputs()]


def _producers(op):
    return [op.input_value(i).get_node() for i in range(op.get_input_size())]


def kept_in_float(model) -> list:
    """The friendly names of the quantisable ops NNCF is told to leave in float32: the matrix
    products that feed a softmax or take its output (attention scores and weighted sums), every
    convolution (the backbone, the score's blur), and every quantisable op downstream of the score
    map's first op (an ``Interpolate``, which upsamples each level's score grid) or that computes
    the per-token scores (between the residual and the upsampling: the whitening projection)."""
    names = {op.get_friendly_name() for op in model.get_ordered_ops()
             if op.get_type_name() in ("Convolution", "GroupConvolution")}
    for op in model.get_ordered_ops():
        if op.get_type_name() == "Softmax":
            # the nearest MatMul before (the scores, behind their scale, mask and reshapes) and after
            # (the weighted sum) each softmax
            for step in (_producers, _consumers):
                frontier = step(op)
                for _ in range(6):
                    hits = [n for n in frontier if n.get_type_name() == "MatMul"]
                    names.update(n.get_friendly_name() for n in hits)
                    frontier = [m for n in frontier if n.get_type_name() in PASS_THROUGH for m in step(n)]
                    if not frontier:
                        break
    # the score map: everything after any Interpolate, and the token scores leading to it
    seen, stack = set(), [op for op in model.get_ordered_ops() if op.get_type_name() == "Interpolate"]
    while stack:
        op = stack.pop()
        if op.get_friendly_name() in seen:
            continue
        seen.add(op.get_friendly_name())
        if op.get_type_name() in QUANTISED_TYPES:
            names.add(op.get_friendly_name())
        stack.extend(_consumers(op))
    for op in model.get_ordered_ops():
        if op.get_type_name() != "Interpolate":
            continue
        # back from the upsampling to the first op that has a residual (a Subtract) as input: the
        # per-token score (squared error + cosine, or the whitening projection)
        stack, visited = [op], set()
        while stack:
            node = stack.pop()
            if node.get_friendly_name() in visited or node.get_type_name() in ("Parameter", "Constant"):
                continue
            visited.add(node.get_friendly_name())
            if node.get_type_name() == "Subtract":
                continue  # the residual: stop here, its inputs are the features and the reconstruction
            if node.get_type_name() in QUANTISED_TYPES:
                names.add(node.get_friendly_name())
            stack.extend(_producers(node))
    return sorted(names)


def calibration_images(data, classes, image_size: int, layout=None, subset: int = DEFAULT_SUBSET):
    """Up to ``subset`` training images of ``classes`` in ``data``, spread evenly over the set,
    as float32 numpy arrays (1, 3, H, W), ImageNet-normalised as the data pipeline gives them."""
    from .data import MVTecDataset

    dataset = MVTecDataset(data, classes=classes, split="train", image_size=image_size, layout=layout)
    n = len(dataset)
    picks = sorted({round(i * n / subset) for i in range(min(subset, n))}) if n > subset else range(n)
    return [dataset[i]["image"][None].numpy() for i in picks]


def quantize(source: Path, out: Path, images, fingerprint_info: dict | None = None) -> Path:
    """Quantise the OpenVINO model ``source`` to INT8 with ``images`` as calibration data; write
    it to ``out`` (.xml, .bin beside it) with the source's rlr_fast metadata and ``precision``
    int8 recorded in it."""
    import tempfile

    import logging

    import nncf
    import openvino as ov

    from .io import atomic_write_bytes

    nncf.set_log_level(logging.WARNING)  # not its per-node notes

    model = ov.Core().read_model(source)
    info = dict(fingerprint_info or {})
    if model.has_rt_info(["rlr_fast"]):
        for key in ("format", "model", "input_size", "config", "fingerprint"):
            if model.has_rt_info(["rlr_fast", key]):
                info.setdefault(key, str(model.get_rt_info(["rlr_fast", key]).astype(str)))
    ignored = kept_in_float(model)
    quantized = nncf.quantize(model, nncf.Dataset(images), subset_size=len(images),
                              model_type=nncf.ModelType.TRANSFORMER,
                              ignored_scope=nncf.IgnoredScope(names=ignored, validate=False))
    for key, value in {**info, "precision": "int8", "calibration_images": str(len(images)),
                       "kept_in_float": str(len(ignored))}.items():
        quantized.set_rt_info(value, ["rlr_fast", key])
    with tempfile.TemporaryDirectory() as tmp:
        ov.save_model(quantized, Path(tmp) / "model.xml", compress_to_fp16=False)
        atomic_write_bytes(out.with_suffix(".bin"), (Path(tmp) / "model.bin").read_bytes())
        atomic_write_bytes(out, (Path(tmp) / "model.xml").read_bytes())
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m rlr_fast.quantize",
                                description="INT8 quantisation of an OpenVINO export with NNCF "
                                            "(what `rlr-fast export --format openvino --int8` runs)")
    p.add_argument("--model", required=True, type=Path, help="the float32 OpenVINO model (.xml)")
    p.add_argument("--out", required=True, type=Path, help="the INT8 model to write (.xml, .bin beside it)")
    p.add_argument("--data", required=True, type=Path, help="data folder whose training images calibrate")
    p.add_argument("--classes", help="comma-separated classes (default: every class)")
    p.add_argument("--layout", help="the data folder's layout (default: detected)")
    p.add_argument("--image-size", required=True, type=int)
    p.add_argument("--subset", type=int, default=DEFAULT_SUBSET, help="calibration images (default %(default)s)")
    args = p.parse_args(argv)
    images = calibration_images(args.data, args.classes, args.image_size, args.layout, args.subset)
    quantize(args.model, args.out, images)
    print(f"quantised with {len(images)} calibration images: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
