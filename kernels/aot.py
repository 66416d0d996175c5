"""`rlr-fast kernels`: compile every Triton kernel ahead of time for GPU targets, with no GPU, and
report what the compiled code says about its speed.

Each kernel (forward, dQ and dK/dV, for each op, dtype, head dim and, for dK/dV, shared/batched
layout; dK/dV as the one or two launches its configuration makes), in every config of its
autotuning space (one row each, the default marked; a config that does not fit the call is
reported with the reason and not compiled; ``--default-only``: the defaults alone), is compiled from the launch
the autograd Function makes for a typical call (RLR at a 32 x 32 grid: B=8, 8 heads, window 7),
specialised exactly as Triton's JIT specialises that call at run time (pointers 16-byte aligned
and integers that are multiples of 16 marked divisible by 16, integers equal to 1 made
constants): without those hints the compiler drops vectorised and asynchronous loads, and the
report would describe another kernel. From the cubin:

- registers (``cuobjdump --dump-resource-usage``), spill bytes (``ptxas -v`` on the same PTX),
  shared memory; blocks per SM and occupancy on an H100 (64K registers, 228 KB shared memory
  and 64 warps per SM); the tensor-core instruction (wgmma or mma);
- from the SASS (``cuobjdump -sass``): the instructions in the body of the main loop (the
  innermost loop that multiplies on tensor cores, the fastest such loop where there are
  several; a branch inside a loop counts both sides) and instructions per score,
  loop x 32 x warps / (BLOCK_M x BLOCK_N);
- programs: the launch size of the typical call; for LCA, keys visited per useful key.

Exits non-zero if any kernel fails to compile or spills. ``--json FILE`` writes one record per
kernel launch and config (its ``config``: block sizes, num_warps, num_stages; ``default``: whether
it is the config the interpreter runs and the autotuner tries first; ``pruned``: why it does not
fit, or null).
"""
from __future__ import annotations

import argparse
import itertools
import math
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
OPS = {"lca": False, "mlka": True}  # op -> COMPLEMENT
# nearest_reference ("nn") is compiled at these channel counts (Lite0's stride-4 level has 24; 64 to
# 512 cover wider backbones and both of its paths: C in one chunk, or looped over chunks), shown in
# the D column, specialised as the JIT specialises a call at ResAD's layer-1 shape (8 images of
# 56 x 56 tokens against a shared ref of 4 x 56 x 56)
NEAREST_CHANNELS = (24, 64, 128, 256, 512)
NEAREST_METRICS = ("cosine", "l2")  # each a variant of the kernel (its constexpr L2)
KINDS = ("forward", "dq", "dkdv")
# The call the report describes: RLR's 32 x 32 level (d 256, 8 heads, window 7), batch 8.
TYPICAL = dict(batch=8, heads=8, grid=(32, 32), window=(7, 7))
# An H100 SM: 64K registers, 228 KB shared memory, 64 warps, 32 blocks at most; 132 SMs.
H100 = dict(registers=65536, smem_bytes=228 * 1024, warps=64, blocks=32, sms=132)
# SASS tensor-core instructions: wgmma (sm_90) and mma.sync
_MMA = re.compile(r"\b(HGMMA|HMMA)\b")


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", default="sm_80,sm_90", help="comma-separated targets, e.g. sm_80,sm_90")
    p.add_argument("--dtypes", default="fp32,fp16,bf16", help="comma-separated dtypes (default: all three)")
    p.add_argument("--head-dims", default="16,32,64,128", help="comma-separated head dims (default: all supported)")
    p.add_argument("--ops", default="lca,mlka,nn", help="comma-separated ops: lca, mlka, nn (nearest_reference)")
    p.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="parallel compiles")
    p.add_argument("--default-only", action="store_true",
                   help="compile each kernel's default config only, not its whole autotuning space")
    p.add_argument("--json", type=Path, help="also write one record per kernel launch and config as JSON")


# ------------------------------------------------------------------------------------------------
# The launches of a typical call, and the JIT's specialisation of them
# ------------------------------------------------------------------------------------------------

def typical_launches(op: str, dtype, head_dim: int, kind: str, k_shared: bool, v_shared: bool) -> list:
    """The launches the autograd Function makes for kind ("forward", "dq", "dkdv") of a typical
    call, built on meta tensors (no memory; their address 0 is 16-byte aligned like a CUDA
    allocation's)."""
    import torch

    from . import window_attention as wa

    b, h, (gh, gw) = TYPICAL["batch"], TYPICAL["heads"], TYPICAL["grid"]
    length = gh * gw

    def t(shared, dt=dtype):
        return torch.empty((h, length, head_dim) if shared else (b, h, length, head_dim), device="meta", dtype=dt)

    q, k, v = t(False), t(k_shared), t(v_shared)
    lse = torch.empty(b * h * length, device="meta", dtype=torch.float32)
    radius = (TYPICAL["window"][0] // 2, TYPICAL["window"][1] // 2)
    scale = head_dim ** -0.5
    if kind == "forward":
        return [wa.forward_launch(q, k, v, torch.empty_like(q), lse, (gh, gw), radius, scale, OPS[op])]
    splits = wa.dkdv_splits(b, (gh, gw), h, head_dim, dtype, OPS[op], k_shared or v_shared)
    launches = wa.backward_launches(q, k, v, torch.empty_like(q), torch.empty_like(q),
                                    *wa.kv_gradient_buffers(k, v, splits), lse, lse, (gh, gw), radius, scale,
                                    OPS[op], splits)
    return launches[:1] if kind == "dq" else launches[1:]


def _nearest_launch(dtype, channels: int, metric: str = "cosine"):
    """The launch of nearest_reference's kernel for `metric` ("cosine" or "l2", PatchCore's) at
    ResAD's layer-1 shape (contiguous x of 8 x 56 x 56 tokens, a shared ref of 4 x 56 x 56), on
    meta tensors. Its "rows" per loop iteration are
    BLOCK_M reference rows, its "columns" BLOCK_N tokens."""
    import importlib

    import torch

    from . import window_attention as wa

    nr = importlib.import_module(f"{__package__}.nearest_reference")  # the package exports the function
    b, n, m, c = 8, 56 * 56, 4 * 56 * 56, channels
    x, ref = torch.empty(b, n, c, device="meta", dtype=dtype), torch.empty(m, c, device="meta", dtype=dtype)
    index, sim = torch.empty(b, n, device="meta", dtype=torch.int64), torch.empty(b, n, device="meta")
    row = torch.empty(m, device="meta")  # the per-row scale and offset
    args = nr.launch_arguments(x, ref, row, torch.empty_like(row), index, sim, True, 1e-12, metric == "l2")
    return wa.Launch("nearest", lambda meta: (math.ceil(n / meta["BLOCK_N"]) * b,), args)


def jit_specialization(kernel, args: dict, arch: str):
    """(signature, constexprs, attrs) of a call of the jitted `kernel` with `args` (every argument
    by name) for ``ASTSource`` on `arch`, as Triton's JIT derives them from the arguments at run
    time (its own specialisation function and the target backend's attributes, per parameter)."""
    from triton._C.libtriton import native_specialize_impl

    backend = _backend(arch)
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(kernel.params):
        value = args[param.name]
        if param.is_constexpr:
            ty, spec = "constexpr", value
        else:
            ty, spec = native_specialize_impl(backend, value, param.is_const, not param.do_not_specialize,
                                              not param.do_not_specialize_on_alignment)
        signature[param.name] = ty
        if ty == "constexpr":
            constexprs[(i,)], spec = spec, ""  # constants carry no attributes
        if isinstance(spec, str):
            attrs[(i,)] = backend.parse_attr(spec)
    return signature, constexprs, attrs


def _target(arch: str):
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", int(arch.removeprefix("sm_")), 32)


def _backend(arch: str):
    from triton.compiler import make_backend

    return make_backend(_target(arch))


# ------------------------------------------------------------------------------------------------
# Reading the compiled code
# ------------------------------------------------------------------------------------------------

def sass_loops(sass: str) -> list:
    """The innermost loops of a kernel's SASS: for each, (instructions in its body, whether it
    holds a tensor-core instruction). A loop is a backward branch; its body runs from the
    branch target to the branch, both included (fixed 16-byte instructions)."""
    instructions = [(int(m.group(1), 16), m.group(2)) for m in
                    re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    loops = []
    for address, text in instructions:
        branch = re.search(r"\bBRA\b.*?0x([0-9a-f]+)\s*$", text)
        if branch and int(branch.group(1), 16) < address:
            loops.append((int(branch.group(1), 16), address))
    innermost = [(lo, hi) for lo, hi in loops
                 if not any((lo, hi) != (a, b) and lo <= a and b <= hi for a, b in loops)]
    return [((hi - lo) // 16 + 1, any(_MMA.search(text) for address, text in instructions if lo <= address <= hi))
            for lo, hi in innermost]


def main_loop_instructions(sass: str):
    """Instructions in the main loop's body: the fastest innermost loop on tensor cores (the
    unmasked loop where there is one), else the largest innermost loop; None if no loop."""
    loops = sass_loops(sass)
    on_tensor_cores = [n for n, mma in loops if mma]
    if on_tensor_cores:
        return min(on_tensor_cores)
    return max((n for n, _ in loops), default=None)


def blocks_per_sm(registers: int, smem_bytes: int, num_warps: int) -> int:
    """Blocks of a kernel resident on one H100 SM: the least of what its registers, shared
    memory, warps and the block limit allow."""
    limits = [H100["registers"] // (max(registers, 1) * 32 * num_warps), H100["warps"] // num_warps, H100["blocks"]]
    if smem_bytes:
        limits.append(H100["smem_bytes"] // smem_bytes)
    return min(limits)


def keys_visited_per_useful_key(cfg: dict, grid, window) -> float:
    """LCA: the (query, key) pairs a launch computes (every program's tile rows times the key
    blocks covering its tile's key patch) over the pairs inside the windows. For dK/dV (key tiles
    sweeping query blocks) the same ratio, sides swapped. `cfg`: a block config or launch arguments."""
    (gh, gw), (ry, rx) = grid, (window[0] // 2, window[1] // 2)
    th, tw, bh, bw = cfg["TILE_H"], cfg["TILE_W"], cfg["BLOCK_H"], cfg["BLOCK_W"]
    visited = 0
    for y0, x0 in itertools.product(range(0, gh, th), range(0, gw, tw)):
        rows = min(y0 + th + ry, gh) - max(y0 - ry, 0)
        cols = min(x0 + tw + rx, gw) - max(x0 - rx, 0)
        visited += th * tw * math.ceil(rows / bh) * bh * math.ceil(cols / bw) * bw
    useful = sum((min(y + ry, gh - 1) - max(y - ry, 0) + 1) * (min(x + rx, gw - 1) - max(x - rx, 0) + 1)
                 for y, x in itertools.product(range(gh), range(gw)))
    return visited / useful


# ------------------------------------------------------------------------------------------------
# Compiling
# ------------------------------------------------------------------------------------------------

def _jobs(archs, ops, dtypes, dims, default_only: bool):
    for arch, op, dtype, dim in itertools.product(archs, [op for op in ops if op in OPS], dtypes, dims):
        yield (arch, op, dtype, dim, "forward", None, default_only)
        yield (arch, op, dtype, dim, "dq", None, default_only)
        for layout in itertools.product((True, False), repeat=2):
            yield (arch, op, dtype, dim, "dkdv", layout, default_only)
    if "nn" in ops:
        for arch, dtype, channels, metric in itertools.product(archs, dtypes, NEAREST_CHANNELS, NEAREST_METRICS):
            yield (arch, "nn", dtype, channels, "nearest", metric, default_only)


def _compile_one(job) -> list:
    """Compile one kernel configuration (a worker process): a record per launch and config of its
    space (the default's alone if `default_only`)."""
    os.environ.pop("TRITON_INTERPRET", None)  # the interpreter replaces kernels: compile the real ones
    import torch

    arch, op, dtype_name, dim, kind, layout, default_only = job
    dtype = getattr(torch, DTYPES[dtype_name])
    if kind == "nearest":
        launches, metric, k_shared = [_nearest_launch(dtype, dim, layout)], layout, None
    else:  # forward and dQ: RLR's layout (LCA k, v shared; MLKA k shared, v batched)
        k_shared, v_shared = layout if layout is not None else (True, not OPS[op])
        launches = typical_launches(op, dtype, dim, kind, k_shared, v_shared)
    records = []
    for launch in launches:
        for index, candidate in enumerate(launch.candidates()):
            if default_only and not candidate.default:
                continue
            a = launch.arguments(candidate.config)
            record = {"op": op, "kernel": kind, "dtype": dtype_name, "head_dim": dim, "arch": arch,
                      "config_index": index, "default": candidate.default, "config": _config_record(candidate.config),
                      "pruned": candidate.reason, "dot": a["DOT"], "num_warps": candidate.config.num_warps,
                      "num_stages": candidate.config.num_stages, "programs": launch.programs_with(candidate.config)}
            if kind == "nearest":
                record.update(layout=f"{metric}, C in {'one chunk' if a['ONE_CHUNK'] else 'chunks'}", grads="",
                              metric=metric,
                              tile=str(a["BLOCK_N"]), block=f"{a['BLOCK_M']}x{a['BLOCK_C']}")
            else:
                record.update(layout=_layout_name(layout), grads=_grads_name(a), tile=_tile_name(a),
                              block=_block_name(a))
            if op == "lca":  # (a folded tile visits the same keys for each of its batch elements)
                record["keys_visited_per_useful_key"] = round(
                    keys_visited_per_useful_key(a, TYPICAL["grid"], TYPICAL["window"]), 3)
            records.append({**record, "ok": True} if candidate.reason else
                           _compile_launch(launch, candidate.config, arch, record))
    return records


def _config_record(config) -> dict:
    """A config as JSON: its block sizes, num_warps and num_stages."""
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def _tile_name(args) -> str:
    if "BLOCK_M" in args:
        return str(args["BLOCK_M"])
    fold = f"{args['FOLD']}*" if args.get("FOLD", 1) > 1 else ""
    return f"{fold}{args['TILE_H']}x{args['TILE_W']}"


def _block_name(args) -> str:
    return str(args["BLOCK_N"]) if "BLOCK_N" in args else f"{args['BLOCK_H']}x{args['BLOCK_W']}"


def _layout_name(layout) -> str:
    if layout is None:
        return ""
    return f"k {'shared' if layout[0] else 'batched'}, v {'shared' if layout[1] else 'batched'}"


def _grads_name(args) -> str:
    if "WITH_DK" not in args:
        return ""
    return "+".join(name for name, on in (("dK", args["WITH_DK"]), ("dV", args["WITH_DV"])) if on)


def _compile_launch(launch, config, arch, record) -> dict:
    """Compile one launch with `config` for `arch` with the JIT's specialisation: `record` with
    what the compiled code says, or with the error."""
    import triton
    from triton.compiler import ASTSource

    from .window_attention import tile_cols, tile_rows

    a = launch.arguments(config)
    signature, constexprs, attrs = jit_specialization(launch.kernel.fn, a, arch)
    try:
        compiled = triton.compile(ASTSource(launch.kernel.fn, signature, constexprs, attrs), target=_target(arch),
                                  options=launch.options(config))
    except Exception as e:  # reported in the table, and the command fails
        return {**record, "ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    ptx = compiled.asm["ptx"]
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([str(bin_dir / "cuobjdump"), "--dump-resource-usage", str(cubin)],
                               capture_output=True, text=True).stdout
        sass = subprocess.run([str(bin_dir / "cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True).stdout
        # ptxas -v, run on the same PTX with the flags Triton compiles it with, states the spill
        # stores and loads (its register count must be the cubin's: the same compile)
        (Path(tmp) / "kernel.ptx").write_text(ptx)
        sm = arch.removeprefix("sm_") + ("a" if arch == "sm_90" else "")
        verbose = subprocess.run([str(bin_dir / "ptxas"), "-lineinfo", "-v", "--regAllocOptLevel=2",
                                  f"--gpu-name=sm_{sm}", str(Path(tmp) / "kernel.ptx"), "-o", str(Path(tmp) / "kernel.o")],
                                 capture_output=True, text=True).stderr
    regs = re.search(r"\bREG:(\d+)", usage)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", verbose)
    ptxas_regs = re.search(r"Used (\d+) registers", verbose)
    if regs is None or spills is None or ptxas_regs is None:
        return {**record, "ok": False, "error": "could not read the resource usage of the cubin"}
    if int(ptxas_regs.group(1)) != int(regs.group(1)):
        return {**record, "ok": False, "error": f"ptxas -v used {ptxas_regs.group(1)} registers, the cubin "
                                                f"{regs.group(1)}: not the same compile"}
    warps = config.num_warps
    smem = int(compiled.metadata.shared)
    blocks = blocks_per_sm(int(regs.group(1)), smem, warps)
    loop = main_loop_instructions(sass)
    scores = tile_rows(a) * tile_cols(a)
    return {**record, "ok": True, "registers": int(regs.group(1)),
            "spill_bytes": int(spills.group(1)) + int(spills.group(2)), "smem_bytes": smem,
            "blocks_per_sm": blocks, "occupancy": round(blocks * warps / H100["warps"], 3),
            "tensor_core": "wgmma" if "wgmma" in ptx else ("mma" if "mma.sync" in ptx else "none"),
            "loop_instructions": loop,
            "instructions_per_score": None if loop is None else round(loop * 32 * warps / scores, 2),
            "cp_async": "cp.async" in ptx}


# ------------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------------

_COLUMNS = [("op", "<5"), ("kernel", "<7"), ("arch", "<6"), ("dtype", "<5"), ("head_dim", ">4"), ("layout", "<24"),
            ("grads", "<6"), ("config_index", ">4"), ("dot", "<7"), ("tile", ">5"), ("block", ">5"),
            ("num_warps", ">5"), ("num_stages", ">3"),
            ("registers", ">4"), ("spill_bytes", ">6"), ("smem_bytes", ">6"), ("blocks_per_sm", ">3"),
            ("occupancy", ">5"), ("tensor_core", "<5"), ("loop_instructions", ">5"),
            ("instructions_per_score", ">6"), ("programs", ">6"), ("keys_visited_per_useful_key", ">5")]
_HEADS = {"head_dim": "D", "config_index": "cfg", "num_stages": "stg", "num_warps": "warps", "registers": "regs",
          "spill_bytes": "spills", "smem_bytes": "smem",
          "blocks_per_sm": "blk", "occupancy": "occ", "tensor_core": "tc", "loop_instructions": "loop",
          "instructions_per_score": "ins/sc", "programs": "progs", "keys_visited_per_useful_key": "kv/u"}


def _cell(record, name, fmt) -> str:
    value = record.get(name)
    if name == "config_index":  # the default marked with a star
        value = f"{value}{'*' if record['default'] else ''}"
    return format("" if value is None else value, fmt)


def _table(records) -> str:
    head = " ".join(format(_HEADS.get(name, name), fmt) for name, fmt in _COLUMNS)
    lines = [head, "-" * len(head)]
    for r in records:
        if r["ok"] and not r["pruned"]:
            lines.append(" ".join(_cell(r, name, fmt) for name, fmt in _COLUMNS))
        else:
            what = f"pruned: {r['pruned']}" if r["ok"] else f"FAILED: {r['error']}"
            lines.append(" ".join(_cell(r, name, fmt) for name, fmt in _COLUMNS[:13]) + f" {what}")
    return "\n".join(lines)


def _list(value: str, allowed, what: str) -> list:
    items = [x.strip() for x in value.split(",") if x.strip()]
    unknown = [x for x in items if x not in allowed]
    if unknown or not items:
        from ..errors import UsageError

        raise UsageError(f"unknown {what} {unknown or value!r}; choose from {', '.join(map(str, allowed))}")
    return items


def run(args) -> int:
    from ..errors import UsageError
    from ..io import atomic_write_json

    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    for a in archs:
        if not re.fullmatch(r"sm_\d+", a):
            raise UsageError(f"--arch takes targets like sm_80,sm_90, got {a!r}")
    dtypes = _list(args.dtypes, DTYPES, "dtype(s)")
    ops = _list(args.ops, (*OPS, "nn"), "op(s)")
    dims = [int(d) for d in _list(args.head_dims, ("16", "32", "64", "128"), "head dim(s)")]
    jobs = list(_jobs(archs, ops, dtypes, dims, args.default_only))
    b, h, (gh, gw), (kh, kw) = TYPICAL["batch"], TYPICAL["heads"], TYPICAL["grid"], TYPICAL["window"]
    which = "default configs" if args.default_only else "every config"
    print(f"compiling {len(jobs)} kernels ({which}) for {', '.join(archs)} ({args.jobs} at a time), "
          f"specialised for B={b}, {h} heads, {gh}x{gw} grid, window {kh}x{kw} ...", flush=True)
    import multiprocessing

    with ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=multiprocessing.get_context("spawn")) as pool:
        records = [r for rs in pool.map(_compile_one, jobs) for r in rs]
    print(_table(records))
    failed = [r for r in records if not r["ok"]]
    spilled = [r for r in records if r["ok"] and not r["pruned"] and r["spill_bytes"] > 0]
    pruned = sum(1 for r in records if r["pruned"])
    print(f"\n{len(records) - len(failed) - pruned}/{len(records) - pruned} compiled ({pruned} configs pruned), "
          f"{len(spilled)} spilling registers. cfg: config in the kernel's autotuning space (* the default), "
          f"stg: pipeline stages, blk: blocks per H100 SM, occ: occupancy, "
          f"loop: instructions in the main loop body (SASS), "
          f"ins/sc: per score, progs: programs at B={b}, {h} heads, {gh}x{gw}, kv/u: LCA keys visited per useful key")
    if args.json:
        atomic_write_json(args.json, records)
    return 1 if failed or spilled else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m rlr_fast.kernels.aot")
    configure(parser)
    sys.exit(run(parser.parse_args()))
