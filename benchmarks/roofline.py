"""A roofline table for RLR inference on this CPU: FLOPs per image by part, each engine's images/s
(from a run's ``engines.json``, written by ``python -m rlr_fast.measure``), the FLOP rate that
makes, and its share of this CPU's matrix-product rate in the engine's dtype.

    python benchmarks/roofline.py --run RUN [--threads 2] [--out F.json] [--markdown F.md]

FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` over one eager forward of the run's model (batch
``engines.json``'s batch size) after a first one, as the engines are timed (the learnable reference's
key and value heads are computed once and reused), divided by the batch, split by module and operator:

    backbone      everything under ``model.backbone``
    MLKA          its products, every (query, key) pair, the window's masked ones included: 4 B L^2 d
                  per layer (Q K^T and P V), as every implementation computes them
    LCA           the other attention products of the reconstruction networks (bmm/baddbmm)
    linear + FFN  the other matrix products of the networks (projections, embeddings, FFN, head)
    other         the rest (the score statistics, LayerNorm and softmax are not counted as FLOPs)

The count runs under bfloat16 autocast on a CPU with native bfloat16, where MLKA runs as plain
products that the counter sees (tests/test_roofline.py checks that count against the formula); in float32 it runs on PyTorch's
fused flash kernel, which the counter has no formula for, and the formula is added.

Matrix-product rate: the median of ``--rounds`` timed (2048 x 2048) @ (2048 x 2048) products in
float32 and in bfloat16 (bfloat16 only where native), on ``--threads`` threads, in this process.
INT8 rows are compared with the bfloat16 rate (the CPU's fastest floating-point products).

Run it on a quiet machine (nothing else running), right after ``python -m rlr_fast.measure`` on the
same run, with the same thread count.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from rlr_fast.checkpoints import load_model
from rlr_fast.precision import bf16_supported
from rlr_fast.timing import cpu_name

PARTS = ("backbone", "LCA", "MLKA", "linear + FFN", "other")
_ATTENTION = {"bmm", "baddbmm"}
_MATMUL = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear"}


def _op_name(op) -> str:
    """"bmm" of aten.bmm (the counter's keys are operator packets) or of aten.bmm.default."""
    parts = str(op).split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def flops_by_part(model, image_size: int, batch: int) -> dict:
    """FLOPs per image of one eager forward of ``model`` by part (see the module docstring)."""
    images = torch.rand(batch, 3, image_size, image_size)
    native = bf16_supported("cpu")
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=native):
        model(images)  # a first call makes what later calls reuse (the reference's key/value heads)
        with counter:
            model(images)
    counts = counter.get_flop_counts()  # {module path: {operator: FLOPs}}, a parent's include its children's

    def total_of(keys, ops=None):
        return sum(v for k in keys for op, v in counts[k].items() if ops is None or _op_name(op) in ops)

    total = total_of(["Global"])
    backbone = [k for k in counts if re.fullmatch(r"[^.]+\.backbone", k)]
    levels = [k for k in counts if re.fullmatch(r"[^.]+\.levels\.\d+", k)]
    # The ops are called as functions of their modules (not through __call__), so the counter files
    # their products under the layer: MLKA's are its formula, LCA's the rest of the layers' bmm/baddbmm.
    mlka = sum(4 * batch * (net.grid[0] * net.grid[1]) ** 2 * net.embed.out_features * len(net.layers)
               for net in model.levels)
    products = total_of(levels, _ATTENTION)
    parts = {"backbone": total_of(backbone),
             "LCA": products - (mlka if native else 0),
             "MLKA": mlka,
             "linear + FFN": total_of(levels, _MATMUL - _ATTENTION)}
    if native:
        how = "counted under bf16 autocast, where MLKA runs as plain products (4 B L^2 d per layer)"
    else:
        total += mlka  # MLKA ran on the fused flash kernel, which the counter does not see
        how = "counted in float32; MLKA (the fused flash kernel, not seen by the counter) from 4 B L^2 d per layer"
    parts["other"] = total - sum(parts.values())
    return {"per_image": {k: v / batch for k, v in parts.items()}, "total_per_image": total / batch,
            "how": how, "batch": batch}


def matmul_rate(dtype, threads: int, rounds: int, n: int = 2048) -> float:
    """GFLOP/s of an (n x n) @ (n x n) product in ``dtype``, median of ``rounds``."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times) / 1e9


def table(record: dict) -> str:
    flops = record["flops"]["per_image"]
    total = record["flops"]["total_per_image"]
    lines = ["FLOPs per image (" + record["flops"]["how"] + "): "
             + ", ".join(f"{p} {flops[p] / 1e9:.2f} G ({flops[p] / total:.0%})" for p in PARTS)
             + f"; total {total / 1e9:.2f} GFLOP.",
             "",
             "Matrix-product rate on this CPU (" + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in record["matmul_gflops"].items())
             + f"; {record['threads']} threads).",
             "",
             "| engine | precision | images/s | GFLOP/s | share of the matmul rate |",
             "|---|---|---|---|---|"]
    for row in record["engines"]:
        lines.append(f"| {row['engine']} | {row['precision']} | {row['images_per_s']:.2f} | {row['gflops']:.0f} | "
                     f"{row['share']:.0%} of {row['rate_dtype']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, type=Path, help="a run with engines.json (python -m rlr_fast.measure)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--rounds", type=int, default=7, help="timed products per dtype (median)")
    p.add_argument("--out", type=Path, help="write the record as JSON here")
    p.add_argument("--markdown", type=Path, help="write the table as Markdown here")
    args = p.parse_args(argv)
    engines_file = args.run / "engines.json"
    if not engines_file.is_file():
        p.error(f"{engines_file} not found: run `python -m rlr_fast.measure --run {args.run} --data DATA` first")
    engines = json.loads(engines_file.read_text())
    torch.set_num_threads(args.threads)
    model = load_model(args.run, thresholds=False).eval()
    flops = flops_by_part(model, engines["image_size"], engines["batch_size"])
    rates = {"fp32": matmul_rate(torch.float32, args.threads, args.rounds)}
    if bf16_supported("cpu"):
        rates["bf16"] = matmul_rate(torch.bfloat16, args.threads, args.rounds)
    rows = []
    for row in engines["engines"]:
        if row.get("status") != "ok":
            continue
        rate_dtype = "fp32" if row["precision"] == "fp32" or "bf16" not in rates else "bf16"
        gflops = flops["total_per_image"] * row["images_per_s"] / 1e9
        rows.append({"engine": row["engine"], "precision": row["precision"], "images_per_s": row["images_per_s"],
                     "gflops": gflops, "rate_dtype": rate_dtype, "share": gflops / rates[rate_dtype]})
    record = {"what": "RLR inference roofline on this CPU: FLOPs per image by part, engines' images/s "
                      "(engines.json) and the FLOP rate they reach against this CPU's matrix-product rate",
              "cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__,
              "engines_record": {k: engines[k] for k in ("cpu", "threads", "batch_size", "rounds", "created")
                                 if k in engines},
              "flops": flops, "matmul_gflops": rates, "engines": rows}
    text = table(record)
    print(text)
    if args.out:
        args.out.write_text(json.dumps(record, indent=1) + "\n")
    if args.markdown:
        args.markdown.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
