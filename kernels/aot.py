"""`rlr-fast kernels`: compile every Triton kernel ahead of time for GPU targets, with no GPU.

Each kernel (forward, dQ and dK/dV backward, for each op, dtype, head dim and shared/batched
layout; dK/dV as the one or two launches its configuration makes; nearest_reference's kernel for
each dtype at the channel counts of NEAREST_CHANNELS, shown in the D column) is compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``;
``cuobjdump --dump-resource-usage`` (shipped in the triton wheel) reads the registers from the
cubin and ``ptxas -v`` on the same PTX states the spill stores and loads. Exits non-zero if any
kernel fails to compile or spills.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
OPS = {"lca": False, "mlka": True}  # op -> COMPLEMENT
# nearest_reference is compiled at these channel counts (Lite0's stride-4 level has 24; 64 to 512
# cover wider backbones and both of its paths: C in one chunk, or looped over chunks)
NEAREST_CHANNELS = (24, 64, 128, 256, 512)


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", default="sm_80,sm_90", help="comma-separated targets, e.g. sm_80,sm_90")
    p.add_argument("--dtypes", default="fp32,fp16,bf16", help="comma-separated dtypes (default: all three)")
    p.add_argument("--head-dims", default="16,32,64,128", help="comma-separated head dims (default: all supported)")
    p.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="parallel compiles")
    p.add_argument("--json", type=Path, help="also write the table as JSON")


def _jobs(archs, dtypes, dims):
    for arch, op, dtype, dim in itertools.product(archs, OPS, dtypes, dims):
        yield (arch, "forward", op, dtype, dim, None)
        yield (arch, "backward dq", op, dtype, dim, None)
        for layout in itertools.product((True, False), repeat=2):
            yield (arch, "backward dk/dv", op, dtype, dim, layout)
    for arch, dtype, channels in itertools.product(archs, dtypes, NEAREST_CHANNELS):
        yield (arch, "nearest", "nearest", dtype, channels, None)


def _compile_one(job) -> list:
    """Compile one kernel configuration (a worker process): a row per launch it makes (dK/dV may
    take two), with registers, spills and shared memory."""
    os.environ.pop("TRITON_INTERPRET", None)  # the interpreter replaces kernels: compile the real ones
    import torch

    from rlr_fast.kernels import window_attention as wa

    arch, kind, op, dtype_name, dim, layout = job
    if kind == "nearest":
        return [_compile_nearest(arch, dtype_name, dim)]
    dtype = getattr(torch, DTYPES[dtype_name])
    cfg = wa.block_config({"forward": "fwd", "backward dq": "dq", "backward dk/dv": "dkdv"}[kind], dim, dtype, OPS[op])
    fn = {"forward": wa._fwd_kernel, "backward dq": wa._bwd_dq_kernel, "backward dk/dv": wa._bwd_dkdv_kernel}[kind]
    ptr = f"*{dtype_name}"
    signature = {}
    for name in fn.arg_names:
        if name in ("LSE", "DELTA"):
            signature[name] = "*fp32"
        elif name in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV"):
            signature[name] = ptr
        elif name in ("qk_scale", "sm_scale"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    constexprs = dict(COMPLEMENT=OPS[op], HEAD_DIM=dim, **wa.launch_constexprs(cfg, dtype))
    passes = [None]
    if layout is not None:  # dK and dV in one launch, or one launch each where the config splits them
        constexprs.update(K_SHARED=layout[0], V_SHARED=layout[1])
        passes = [(True, False), (False, True)] if cfg["split"] else [(True, True)]
    rows = []
    for grads in passes:
        if grads is not None:
            constexprs.update(WITH_DK=grads[0], WITH_DV=grads[1])
        row = {"kernel": fn.__name__.strip("_"), "op": op, "arch": arch, "dtype": dtype_name, "head_dim": dim,
               "layout": _layout_name(layout), "grads": _grads_name(grads), "dot": constexprs["DOT"],
               "tile": f"{cfg['TILE_H']}x{cfg['TILE_W']}", "block": f"{cfg['BLOCK_H']}x{cfg['BLOCK_W']}",
               "num_warps": cfg["num_warps"]}
        rows.append(_compile_kernel(fn, dict(signature), dict(constexprs), arch, row))
    return rows


def _compile_nearest(arch, dtype_name, channels) -> dict:
    """Compile nearest_reference's kernel for `channels` (its "head_dim" column): BLOCK_N tokens a
    program ("tile"), ref tiles of BLOCK_M rows by BLOCK_C channels ("block"). It is specialised
    as the JIT specialises a call at ResAD's layer-1 shape (8 images of 56 x 56 tokens against a
    shared ref of 4 x 56 x 56, contiguous): integer arguments equal to 1 become constants, those
    divisible by 16 and the pointers are marked so; without that it would be another kernel."""
    import importlib

    import torch
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend

    from rlr_fast.kernels import window_attention as wa

    nr = importlib.import_module("rlr_fast.kernels.nearest_reference")  # the package exports the function
    dtype = getattr(torch, DTYPES[dtype_name])
    cfg = nr.block_config(channels, dtype)
    n, m, c = 56 * 56, 4 * 56 * 56, channels  # the batch size is no argument of the kernel
    tensor = torch.empty(1, dtype=dtype)  # stands for every pointer: only its dtype and alignment matter
    args = dict(X=tensor, R=tensor, R_INV_NORM=torch.empty(1), INDEX=torch.empty(1, dtype=torch.int64),
                SIM=torch.empty(1), stride_xb=n * c, stride_xn=c, stride_xc=1, stride_rb=0, stride_rm=c,
                stride_ib=0, N=n, M=m, C=c, eps=1e-12)
    signature, constexprs, attrs = {}, wa.launch_constexprs(cfg, dtype), {}
    for i, name in enumerate(nr._nearest_kernel.arg_names):
        if name in constexprs:
            continue
        kind, spec = native_specialize_impl(CUDABackend, args[name], False, True, True)
        if kind == "constexpr":
            constexprs[name] = spec
        else:
            signature[name] = kind
            attrs[(i,)] = CUDABackend.parse_attr(spec or "")
    row = {"kernel": "nearest_kernel", "op": "nn", "arch": arch, "dtype": dtype_name, "head_dim": channels,
           "layout": "C in one chunk" if cfg["ONE_CHUNK"] else "C in chunks", "grads": "", "dot": cfg["DOT"],
           "tile": str(cfg["BLOCK_N"]), "block": f"{cfg['BLOCK_M']}x{cfg['BLOCK_C']}", "num_warps": cfg["num_warps"]}
    return _compile_kernel(nr._nearest_kernel, signature, constexprs, arch, row, attrs)


def _layout_name(layout) -> str:
    if layout is None:
        return ""
    return f"k {'shared' if layout[0] else 'batched'}, v {'shared' if layout[1] else 'batched'}"


def _grads_name(grads) -> str:
    return "" if grads is None else "+".join(name for name, on in zip(("dK", "dV"), grads) if on)


def _compile_kernel(fn, signature, constexprs, arch, row, attrs=None) -> dict:
    """Compile one kernel for `arch`: `row` with its resource usage, or with the error. `attrs`:
    the JIT's specialisation hints ({(arg index,): [["tt.divisibility", 16]]})."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for name in constexprs:
        signature[name] = "constexpr"
    try:
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                                  target=GPUTarget("cuda", int(arch.removeprefix("sm_")), 32),
                                  options={"num_warps": row["num_warps"]})
    except Exception as e:  # reported in the table, and the command fails
        return {**row, "ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    ptx = compiled.asm["ptx"]
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([str(bin_dir / "cuobjdump"), "--dump-resource-usage", str(cubin)],
                               capture_output=True, text=True).stdout
        # ptxas -v states the spill stores and loads of the same PTX exactly
        (Path(tmp) / "kernel.ptx").write_text(ptx)
        sm = arch.removeprefix("sm_") + ("a" if arch == "sm_90" else "")
        verbose = subprocess.run([str(bin_dir / "ptxas"), f"-arch=sm_{sm}", "-v", str(Path(tmp) / "kernel.ptx"),
                                  "-o", str(Path(tmp) / "kernel.o")], capture_output=True, text=True).stderr
    regs = re.search(r"\bREG:(\d+)", usage)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", verbose)
    if regs is None or spills is None:
        return {**row, "ok": False, "error": "could not read the resource usage of the cubin"}
    return {**row, "ok": True, "registers": int(regs.group(1)),
            "spill_bytes": int(spills.group(1)) + int(spills.group(2)),
            "shared_bytes": int(compiled.metadata.shared), "tensor_cores": "wgmma" if "wgmma" in ptx else
            ("mma" if "mma.sync" in ptx else "none")}


def run(args) -> int:
    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    for a in archs:
        if not re.fullmatch(r"sm_\d+", a):
            raise ValueError(f"--arch takes targets like sm_80,sm_90, got {a!r}")
    dtypes = [d.strip() for d in args.dtypes.split(",")]
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        raise ValueError(f"unknown dtype(s) {unknown}; choose from {', '.join(DTYPES)}")
    dims = [int(d) for d in args.head_dims.split(",")]
    bad = [d for d in dims if d not in (16, 32, 64, 128)]
    if bad:
        raise ValueError(f"unsupported head dim(s) {bad}; supported: 16, 32, 64, 128")
    jobs = list(_jobs(archs, dtypes, dims))
    print(f"compiling {len(jobs)} kernel configurations for {', '.join(archs)} ({args.jobs} at a time) ...", flush=True)
    import multiprocessing

    with ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=multiprocessing.get_context("spawn")) as pool:
        rows = [row for rows in pool.map(_compile_one, jobs) for row in rows]
    head = f"{'kernel':<16} {'op':<5} {'arch':<6} {'dtype':<5} {'D':>4} {'layout':<24} {'grads':<6} {'dot':<7} " \
           f"{'tile':>5} {'block':>5} {'warps':>5} {'regs':>5} {'spills':>7} {'smem':>7}  tensor cores"
    print(head)
    print("-" * len(head))
    for r in rows:
        if r["ok"]:
            print(f"{r['kernel']:<16} {r['op']:<5} {r['arch']:<6} {r['dtype']:<5} {r['head_dim']:>4} {r['layout']:<24} "
                  f"{r['grads']:<6} {r['dot']:<7} {r['tile']:>5} {r['block']:>5} {r['num_warps']:>5} {r['registers']:>5} {r['spill_bytes']:>7} {r['shared_bytes']:>7}  {r['tensor_cores']}")
        else:
            print(f"{r['kernel']:<16} {r['op']:<5} {r['arch']:<6} {r['dtype']:<5} {r['head_dim']:>4} {r['layout']:<24} "
                  f"{r['grads']:<6} {r['dot']:<7} FAILED: {r['error']}")
    failed = [r for r in rows if not r["ok"]]
    spilled = [r for r in rows if r["ok"] and r["spill_bytes"] > 0]
    print(f"\n{len(rows) - len(failed)}/{len(rows)} compiled, {len(spilled)} spilling registers")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 1 if failed or spilled else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m rlr_fast.kernels.aot")
    configure(parser)
    sys.exit(run(parser.parse_args()))
