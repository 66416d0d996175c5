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
- from the SASS (``cuobjdump -sass``): the instructions in the body of the fastest tensor-core
  loop (MLKA's unmasked loop; a branch inside a loop counts both sides) and instructions per
  computed score, loop x 32 x warps / (BLOCK_M x BLOCK_N): the fast loop alone, a flattering figure;
- the figures that cannot flatter, at two launches (`GEOMETRIES`: B=8, 8 heads, 32 x 32 window 7 and
  64 x 64 window 11): every machine loop of the SASS matched to its source loop by the line info
  (``nvdisasm --print-line-info-inline``) and weighted by its trip count for the launch, summed
  over the programs (`trip_counts`: the kernel's own index arithmetic in Python), the prologue and
  epilogue once per program (MLKA's partial last block, an ``if full < length`` block, only where
  the grid has one: `tail_blocks`), in thread instructions per *useful* score; exp2 per useful score;
  the floor time on an H100 SXM (`weighted_figures`);
- programs: the launch size of the typical call; for LCA, keys visited per useful key.

Then, per op, dtype and head dim, the default configs' sums over every launch of a forward and a
forward + backward, torch glue included (`op_summaries`), next to FlashAttention-2's floor on
the dense problem at the same shape.

Exits non-zero if any kernel fails to compile or spills. ``--json FILE`` writes one record per
kernel launch and config (its ``config``: block sizes, num_warps, num_stages; ``default``: whether
it is the config the interpreter runs and the autotuner tries first; ``pruned``: why it does not
fit, or null; ``weighted``: the weighted figures per launch); ``--ops-json FILE`` the per-op sums.
A kernel added or changed must keep `trip_counts` in step with its loops: a machine loop that
matches no source loop is reported as an error in its weighted figures.
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
from collections import Counter
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
    p.add_argument("--ops-json", type=Path, help="also write the per-op sums (forward, forward + backward) as JSON")


# ------------------------------------------------------------------------------------------------
# The launches of a typical call, and the JIT's specialisation of them
# ------------------------------------------------------------------------------------------------

def typical_launches(op: str, dtype, head_dim: int, kind: str, k_shared: bool, v_shared: bool,
                     geometry: dict = TYPICAL) -> list:
    """The launches the autograd Function makes for kind ("forward", "dq", "dkdv") of a typical
    call (`geometry`: batch, heads, grid, window; RLR's 32 x 32 level by default), built on meta
    tensors (no memory; their address 0 is 16-byte aligned like a CUDA allocation's)."""
    import torch

    from . import tuning
    from . import window_attention as wa

    b, h, (gh, gw) = geometry["batch"], geometry["heads"], geometry["grid"]
    length = gh * gw

    def t(shared, dt=dtype):
        return torch.empty((h, length, head_dim) if shared else (b, h, length, head_dim), device="meta", dtype=dt)

    q, k, v = t(False), t(k_shared), t(v_shared)
    lse = torch.empty(b * h * length, device="meta", dtype=torch.float32)
    radius = (geometry["window"][0] // 2, geometry["window"][1] // 2)
    scale = head_dim ** -0.5
    if kind == "forward":
        return [wa.forward_launch(q, k, v, torch.empty_like(q), lse, (gh, gw), radius, scale, OPS[op])]
    arch = tuning.target_arch()  # the report's target (None: as sm_90)
    splits = wa.dkdv_splits(b, (gh, gw), h, head_dim, dtype, OPS[op], k_shared or v_shared, arch)
    # MLKA's FlashAttention-2 style dQ and LCA's batch-folded dQ are given the forward's output and
    # compute delta themselves
    fused = wa.mlka_fa2_backward(dtype, head_dim, arch) if OPS[op] else wa.lca_fused_backward(dtype, head_dim)
    o = torch.empty_like(q) if fused else None
    launches = wa.backward_launches(q, k, v, torch.empty_like(q), torch.empty_like(q),
                                    *wa.kv_gradient_buffers(k, v, splits), lse, lse, (gh, gw), radius, scale,
                                    OPS[op], splits, o)
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
# Figures that cannot flatter: every loop weighted by its trip count for a launch
# ------------------------------------------------------------------------------------------------

# The launches the weighted figures describe: RLR's 32 x 32 level and its 64 x 64 one (window 11).
GEOMETRIES = {"32x32": TYPICAL, "64x64": dict(batch=8, heads=8, grid=(64, 64), window=(11, 11))}
# An H100 SXM: 132 SMs at the 1.98 GHz boost clock; per SM and clock 4 warp instructions issued
# (128 thread issue slots) and 16 MUFU (exp2) results.
H100_SXM = dict(sms=132, clock_hz=1.98e9, issue_slots=128, mufu=16, warp_issue=4)
# FlashAttention-2 on the dense problem, thread instructions and exp2 per score: an estimate counted
# from its algorithm (Dao 2023, arXiv 2307.08691) on m16n8k16 tensor-core tiles, not read from its
# SASS. Forward: the two products 2 x D/64 (D 32-64: 1-2), and per score one FFMA (scale, minus the
# max), one MUFU.EX2, one FADD (row sum), one FMNMX (row max), half an F2FP (pack P): about 6. The
# backward recomputes P (FFMA, EX2) and runs five products (5 x D/64), dS = P (dP - delta) (FADD,
# FMUL), two packs and the dQ accumulation: about 15. The paper's throughput (forward 50-73% of an
# A100's tensor-core peak) bounds these from above only (73% at D=64 leaves ~22 per score), so the
# floor below is optimistic for FA2: a ratio against it does not flatter our kernels.
FA2 = dict(forward=6.0, backward=15.0, exp_forward=1.0, exp_backward=1.0)
# Torch glue around the Triton backward (delta = rowsum(O * dO), casts, the splits' sums): no SASS
# of PyTorch's elementwise kernels here; estimated at 3 thread instructions per element processed.
GLUE_INSTRUCTIONS_PER_ELEMENT = 3
_EX2 = re.compile(r"\bMUFU\.EX2\b")
_LOC = re.compile(r'"([^"]+)", line (\d+)')


def useful_pairs(grid, window, complement: bool) -> int:
    """(query, key) pairs a head of one batch element computes: inside the clipped windows (LCA), or
    outside them (MLKA: every key but those)."""
    (gh, gw), (ry, rx) = grid, (window[0] // 2, window[1] // 2)
    inside = sum((min(y + ry, gh - 1) - max(y - ry, 0) + 1) * (min(x + rx, gw - 1) - max(x - rx, 0) + 1)
                 for y, x in itertools.product(range(gh), range(gw)))
    return (gh * gw) ** 2 - inside if complement else inside


def source_loops(fn):
    """The `for` loops of a jitted kernel's source in preorder: for each, its (first, last) line in
    the file and the lines of the ``if _needs_mask(...)`` statements directly in it. Also the
    kernel's (first, last) line and file name."""
    import ast
    import inspect
    import textwrap

    lines, start = inspect.getsourcelines(fn)
    tree = ast.parse(textwrap.dedent("".join(lines)))
    off = start - 1
    loops = []

    def visit(node, loop):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.For):
                loops.append({"lines": (child.lineno + off, child.end_lineno + off), "masks": []})
                visit(child, len(loops) - 1)
                continue
            if (isinstance(child, ast.If) and loop is not None and isinstance(child.test, ast.Call)
                    and getattr(child.test.func, "id", None) == "_needs_mask"):
                loops[loop]["masks"].append((child.lineno + off, child.end_lineno + off))
            visit(child, loop)

    visit(tree, None)
    return loops, (start, start + len(lines) - 1), Path(inspect.getsourcefile(fn)).name


def tail_blocks(fn) -> list:
    """The (first, last) lines in the file of the ``if full < length:`` statements of a jitted
    kernel's source: MLKA's partial last block of a sweep, run by a program only where the grid's
    length is not a multiple of the block (count key ("tail",) in `trip_counts`)."""
    import ast
    import inspect
    import textwrap

    lines, start = inspect.getsourcelines(fn)
    off = start - 1
    return [(node.lineno + off, node.end_lineno + off) for node in ast.walk(ast.parse(textwrap.dedent("".join(lines))))
            if isinstance(node, ast.If) and isinstance(node.test, ast.Compare) and len(node.test.ops) == 1
            and isinstance(node.test.ops[0], ast.Lt) and getattr(node.test.left, "id", None) == "full"
            and getattr(node.test.comparators[0], "id", None) == "length"]


def kernel_lines(line_info: str, span, file_name: str) -> dict:
    """{SASS address: the kernel's own source line} from ``nvdisasm --print-line-info-inline``:
    of the locations before an instruction (a helper's line inlined at the kernel's), the one in
    the kernel's file and line span. An instruction with none keeps the previous one's."""
    out, pending, last = {}, [], None
    for text in line_info.splitlines():
        if text.lstrip().startswith("//##"):
            pending.extend(_LOC.findall(text))
            continue
        m = re.search(r"/\*([0-9a-f]{4,})\*/", text)
        if not m:
            continue
        inside = [int(n) for f, n in pending if Path(f).name == file_name and span[0] <= int(n) <= span[1]]
        if inside:
            last = inside[-1]
        pending = []
        out[int(m.group(1), 16)] = last
    return out


def _parse_sass(sass: str):
    return [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]


def loop_weights(sass: str, lines: dict, loops: list, tails: list = ()) -> list:
    """For each SASS instruction (address, text): the key of the count it runs with, per program:
    ("once",) outside every loop (prologue, epilogue, pipelining's first loads); ("loop", i) in a
    machine loop matched to source loop i (the source loop holding most of its instructions' lines);
    ("mask", i) for the part of loop i's body that a branch skips, whose lines are in its
    ``if _needs_mask`` block; ("tail",) outside every loop, skipped by a branch, with its line in
    one of the (first, last) line spans `tails` (`tail_blocks`). Raises ValueError where a machine
    loop matches no source loop."""
    instructions = _parse_sass(sass)
    ranges = []
    branches = []
    for address, text in instructions:
        target = re.search(r"\bBRA\b.*?0x([0-9a-f]+)\s*$", text)
        if target:
            (ranges if int(target.group(1), 16) < address else branches).append(
                (int(target.group(1), 16), address) if int(target.group(1), 16) < address
                else (address, int(target.group(1), 16)))
    ranges = [r for r in ranges if r[0] != r[1]]  # the end-of-kernel trap branches to itself

    def innermost(address):
        inside = [r for r in ranges if r[0] <= address <= r[1]]
        return min(inside, key=lambda r: r[1] - r[0]) if inside else None

    def source_loop(line):
        holding = [i for i, lp in enumerate(loops) if line is not None and lp["lines"][0] <= line <= lp["lines"][1]]
        return max(holding, key=lambda i: loops[i]["lines"][0]) if holding else None

    def source_parent(i):
        lo, hi = loops[i]["lines"]
        outer = [j for j, lp in enumerate(loops) if j != i and lp["lines"][0] <= lo and hi <= lp["lines"][1]]
        return max(outer, key=lambda j: loops[j]["lines"][0]) if outer else None

    votes = {}
    for address, _ in instructions:
        r = innermost(address)
        if r is not None:
            votes.setdefault(r, []).append(source_loop(lines.get(address)))
    # innermost machine loops by the lines of their bodies; a machine loop holding others is the
    # source loop around theirs (its own body holds their pipelined first loads, whose lines are
    # the inner loop's)
    matched = {}
    for r in sorted(votes, key=lambda r: r[1] - r[0]):
        nested = [c for c in matched if c != r and r[0] <= c[0] and c[1] <= r[1]]
        counted = [source_parent(matched[c]) for c in nested] if nested else votes[r]
        counted = [i for i in counted if i is not None]
        if not counted:
            raise ValueError(f"machine loop {r[0]:#x}-{r[1]:#x} matches no loop of the source")
        matched[r] = max(set(counted), key=counted.count)
    factor = _unrolled(instructions, matched, lines, loops)
    keys = []
    for address, text in instructions:
        r = innermost(address)
        if r is None:
            line = lines.get(address)
            tail = (line is not None and any(lo <= line <= hi for lo, hi in tails)
                    and any(a < address < t for a, t in branches))
            keys.append((address, text, ("tail",) if tail else ("once",)))
            continue
        i = matched[r]
        line = lines.get(address)
        skipped = any(r[0] <= a < address < t <= r[1] for a, t in branches)
        masked = line is not None and any(lo <= line <= hi for lo, hi in loops[i]["masks"])
        key = ("mask", i) if skipped and masked else ("loop", i)
        keys.append((address, text, key if factor[r] == 1 else (*key, factor[r])))
    return keys


# The instructions that do a loop iteration's work (loads, products, FMAs, exp2), by opcode: what an
# unrolled copy of a loop holds once per iteration it covers.
_WORK = re.compile(r"^(?:@!?U?P\w+\s+)?(LDG|LDGSTS|LDS|LDSM|HMMA|HGMMA|FFMA|MUFU)\b")


def _unrolled(instructions, matched: dict, lines: dict, loops: list) -> dict:
    """{machine loop: the fraction of an iteration each of its instructions counts for}. A source
    loop that the compiler turned into several machine loops (unrolled by U with a remainder loop)
    is charged, per iteration, the body per iteration of its least efficient copy (U estimated from
    the work instructions a copy holds against the smallest copy's): an upper bound; the other
    copies count nothing. A source loop with one machine loop: 1."""
    factor = {r: 1.0 for r in matched}
    by_source = {}
    for r, i in matched.items():
        by_source.setdefault(i, []).append(r)
    for i, copies in by_source.items():
        if len(copies) < 2:
            continue
        if any(a != b and a[0] <= b[0] and b[1] <= a[1] for a in copies for b in copies):
            raise ValueError(f"source loop {i} matches machine loops nested in each other")
        def work(r):
            return max(1, sum(1 for a, t in instructions if r[0] <= a <= r[1] and _WORK.search(t.strip())))
        least = min(work(r) for r in copies)
        per_iteration = {r: ((r[1] - r[0]) // 16 + 1) / max(1, round(work(r) / least)) for r in copies}
        worst = max(copies, key=per_iteration.get)
        for r in copies:
            factor[r] = 1.0 / max(1, round(work(r) / least)) if r == worst else 0.0
    return factor


def _blocks(lo, hi, block):
    return math.ceil(max(hi - lo, 0) / block)


def trip_counts(name: str, a: dict, geometry: dict) -> Counter:
    """{per-program counts: programs with them} of a launch of kernel `name` with arguments `a` (config
    included) at `geometry`: each program's count of every key of `loop_weights` ("once": 1; ("loop",
    i): iterations of source loop i, summed over its enclosing loops'; ("mask", i): those of them that
    compute the mask), from the kernel's own index arithmetic. Heads are alike: counted once, times H."""
    b, h, (gh, gw), (wy, wx) = geometry["batch"], geometry["heads"], geometry["grid"], geometry["window"]
    ry, rx, length = wy // 2, wx // 2, gh * gw
    programs = Counter()

    def patch(y0, x0, th, tw):
        return max(y0 - ry, 0), min(y0 + th + ry, gh), max(x0 - rx, 0), min(x0 + tw + rx, gw)

    def sweep(p, bh, bw, complement):
        """The blocks a tile sweeps (top-left corners), and whether each computes the mask."""
        y_lo, y_hi, x_lo, x_hi = p
        if complement:
            oy, ox, ny, nx = 0, 0, _blocks(0, gh, bh), _blocks(0, gw, bw)
        else:
            oy, ox, ny, nx = y_lo, x_lo, _blocks(y_lo, y_hi, bh), _blocks(x_lo, x_hi, bw)
        out = []
        for i, j in itertools.product(range(ny), range(nx)):
            by, bx = oy + i * bh, ox + j * bw
            overlaps = by < y_hi and by + bh > y_lo and bx < x_hi and bx + bw > x_lo
            overhangs = by + bh > gh or bx + bw > gw
            out.append(overlaps or overhangs or not complement)
        return out

    def tiles(th, tw):
        return [(ty * th, tx * tw) for ty, tx in itertools.product(range(math.ceil(gh / th)), range(math.ceil(gw / tw)))]

    def band_split(tile, bm, bn):
        """MLKA's band split of run `tile` (`_mlka_band`): (fast-loop blocks, whole band blocks,
        partial last blocks: 0 or 1)."""
        full = (length // bn) * bn
        first_row = tile * bm // gw
        last_row = (min(tile * bm + bm, length) - 1) // gw
        band_lo = (max(first_row - ry, 0) * gw) // bn * bn
        band_hi = max(min(math.ceil(min(last_row + ry + 1, gh) * gw / bn) * bn, full), band_lo)
        return band_lo // bn + (full - band_hi) // bn, (band_hi - band_lo) // bn, math.ceil((length - full) / bn)

    if name == "mlka_fwd":
        bm, bn = a["BLOCK_M"], a["BLOCK_N"]
        for tile in range(math.ceil(length / bm)):
            fast, band, tail = band_split(tile, bm, bn)
            programs[((("once",), 1), (("loop", 0), fast), (("loop", 1), band + tail))] += b * h
    elif name == "mlka_dq":  # loops: 0 the fast loop, 1 the band's whole blocks; the tail block is not a loop
        for tile in range(math.ceil(length / a["BLOCK_M"])):
            fast, band, tail = band_split(tile, a["BLOCK_M"], a["BLOCK_N"])
            programs[((("once",), 1), (("loop", 0), fast), (("loop", 1), band), (("tail",), tail))] += b * h
    elif name == "mlka_dkdv":  # loops: 0 the batch run, 1 the fast loop, 2 the band's whole blocks
        # (the run is a static_range: each element a copy of loops 1 and 2, which `_unrolled` charges
        # as copies of one loop, at the costliest copy's body per iteration, run x the iterations)
        if a["K_SHARED"] or a["V_SHARED"]:
            runs = [max(min(s * a["RUN"] + a["RUN"], b) - s * a["RUN"], 0) for s in range(a["SPLITS"])]
        else:
            runs = [1] * b
        for tile in range(math.ceil(length / a["BLOCK_M"])):
            fast, band, tail = band_split(tile, a["BLOCK_M"], a["BLOCK_N"])
            for run in runs:
                programs[((("once",), 1), (("loop", 0), run), (("loop", 1), run * fast), (("loop", 2), run * band),
                          (("tail",), run * tail))] += h
    elif name == "lca_fwd":
        th, tw, fold = a["TILE_H"], a["TILE_W"], a["FOLD"]
        for y0, x0 in tiles(th, tw):
            n = len(sweep(patch(y0, x0, th, tw), a["BLOCK_H"], a["BLOCK_W"], False))
            programs[((("once",), 1), (("loop", 0), n))] += math.ceil(b / fold) * h
    elif name == "lca_dq":  # the forward's folded tiles and sweep
        th, tw, fold = a["TILE_H"], a["TILE_W"], a["FOLD"]
        for y0, x0 in tiles(th, tw):
            n = len(sweep(patch(y0, x0, th, tw), a["BLOCK_H"], a["BLOCK_W"], False))
            programs[((("once",), 1), (("loop", 0), n))] += math.ceil(b / fold) * h
    elif name == "lca_dkdv":  # loops: 0 the groups of FOLD batch elements, 1 the query blocks
        th, tw, fold = a["TILE_H"], a["TILE_W"], a["FOLD"]
        if a["K_SHARED"] or a["V_SHARED"]:
            groups, per_tile = math.ceil(b / fold), 1
        else:
            groups, per_tile = 1, b
        for y0, x0 in tiles(th, tw):
            n = len(sweep(patch(y0, x0, th, tw), a["BLOCK_H"], a["BLOCK_W"], False))
            programs[((("once",), 1), (("loop", 0), groups), (("loop", 1), groups * n))] += per_tile * h
    elif name in ("dq", "dkdv"):
        th, tw, complement = a["TILE_H"], a["TILE_W"], a["COMPLEMENT"]
        for y0, x0 in tiles(th, tw):
            masks = sweep(patch(y0, x0, th, tw), a["BLOCK_H"], a["BLOCK_W"], complement)
            if name == "dq":
                programs[((("once",), 1), (("loop", 0), len(masks)), (("mask", 0), sum(masks)))] += b * h
                continue
            if a["K_SHARED"] or a["V_SHARED"]:
                per = math.ceil(b / a["SPLITS"])
                runs = [max(min(s * per + per, b) - s * per, 0) for s in range(a["SPLITS"])]
            else:
                runs = [1] * b
            for run in runs:
                programs[((("once",), 1), (("loop", 0), run), (("loop", 1), run * len(masks)),
                          (("mask", 1), run * sum(masks)))] += h
    else:
        raise ValueError(f"no trip counts for kernel {name!r}")
    return Counter({tuple((key, n) for key, n in counts): m for counts, m in programs.items()})


def weighted_figures(keys: list, trips: Counter, num_warps: int, useful_scores: int) -> dict:
    """The launch's weighted figures: thread instructions (SASS instructions x 32 x warps, each run
    its count of times, every program) and exp2 (MUFU.EX2) per useful score, and the floor time on an
    H100 SXM: the larger of the issue bound and the exp bound, over the whole GPU or, if larger, for
    the costliest program on its own SM (4 warp instructions per clock at most)."""
    per_key, ex2_key = Counter(), Counter()
    for _, text, key in keys:
        weight = key[2] if len(key) == 3 else 1.0  # (kind, loop, fraction) in a loop unrolled by the compiler
        key = key[:2]
        per_key[key] += weight
        ex2_key[key] += weight * bool(_EX2.search(text))
    # a ("mask", i) key counts nothing where the loop has no skipped mask block; a missing count is 0
    total = ex2 = 0
    worst = 0
    for counts, programs in trips.items():
        counts = dict(counts)
        body = sum(n * counts.get(key, 0) for key, n in per_key.items())
        total += body * programs
        ex2 += sum(n * counts.get(key, 0) for key, n in ex2_key.items()) * programs
        worst = max(worst, body)
    threads = 32 * num_warps
    gpu = H100_SXM
    issue_s = total * threads / (gpu["issue_slots"] * gpu["sms"] * gpu["clock_hz"])
    exp_s = ex2 * threads / (gpu["mufu"] * gpu["sms"] * gpu["clock_hz"])
    program_s = worst * num_warps / (min(num_warps, gpu["warp_issue"]) * gpu["clock_hz"])
    return {"weighted_instructions_per_score": round(total * threads / useful_scores, 2),
            "exp_per_score": round(ex2 * threads / useful_scores, 3),
            "issue_floor_us": round(max(issue_s, exp_s, program_s) * 1e6, 2),
            "thread_instructions": round(total * threads), "thread_exp": round(ex2 * threads)}


def fa2_floor_us(geometry: dict, mode: str) -> float:
    """FlashAttention-2's floor on the dense problem at `geometry` (every query against every key,
    B x H x L^2 scores) from `FA2`'s instructions and exp per score: the larger of the two bounds."""
    gh, gw = geometry["grid"]
    scores = geometry["batch"] * geometry["heads"] * (gh * gw) ** 2
    parts = ("forward",) if mode == "forward" else ("forward", "backward")
    instr = sum(FA2[p] for p in parts) * scores
    ex2 = sum(FA2[f"exp_{p}"] for p in parts) * scores
    gpu = H100_SXM
    return round(max(instr / gpu["issue_slots"], ex2 / gpu["mufu"]) / (gpu["sms"] * gpu["clock_hz"]) * 1e6, 2)


def backward_glue(op: str, dtype_name: str, head_dim: int, geometry: dict, splits: int, shared: tuple,
                  arch: str = "sm_90") -> list:
    """The torch launches around the Triton backward kernels (WindowAttentionFunction.backward), each
    as the elements it processes: delta = (O.float() * dO.float()).sum(-1) (the casts only in 16
    bits; none where MLKA's FlashAttention-2 style dQ computes delta, which depends on the target
    `arch`), and for each shared gradient reduced in splits > 1 its sum over the splits and its cast."""
    import torch

    from . import window_attention as wa

    gh, gw = geometry["grid"]
    rows = geometry["batch"] * geometry["heads"] * gh * gw
    elements = rows * head_dim
    glue = ([elements, elements] if dtype_name != "fp32" else []) + [elements, elements]  # casts, mul, sum
    dtype = getattr(torch, DTYPES[dtype_name])
    if not OPS[op] and wa.lca_fused_backward(dtype, head_dim):
        return []  # LCA's batch-folded backward: delta in its dQ kernel, the batch sums in dK/dV's
    if OPS[op] and wa.mlka_fa2_backward(dtype, head_dim, int(arch.removeprefix("sm_"))):
        glue = []
    for is_shared in shared:
        if is_shared and splits > 1:
            glue.append(splits * geometry["heads"] * gh * gw * head_dim)  # sum over the splits
            if dtype_name != "fp32":
                glue.append(geometry["heads"] * gh * gw * head_dim)  # the cast back
    return glue


def op_summaries(records: list) -> list:
    """Per arch, op, dtype, head dim and launch geometry, the default configs' sums for a forward and
    a forward + backward in RLR's layout (LCA: k, v shared; MLKA: k shared, v batched): launches,
    thread instructions per useful score (kernels by their weighted SASS, torch glue estimated) and
    the floor time, with FlashAttention-2's floor on the dense problem and the ratio."""
    out = []
    rlr_layout = {"lca": _layout_name((True, True)), "mlka": _layout_name((True, False))}
    defaults = [r for r in records if r["default"] and r["ok"] and r["op"] in OPS and r.get("weighted")]
    groups = {}
    for r in defaults:
        if r["kernel"] == "dkdv" and r["layout"] != rlr_layout[r["op"]]:
            continue
        groups.setdefault((r["arch"], r["op"], r["dtype"], r["head_dim"]), []).append(r)
    for (arch, op, dtype_name, dim), rows in sorted(groups.items()):
        for name, geometry in GEOMETRIES.items():
            useful = geometry["batch"] * geometry["heads"] * useful_pairs(geometry["grid"], geometry["window"], OPS[op])
            for mode in ("forward", "forward+backward"):
                kernels = [r for r in rows if r["kernel"] == "forward" or mode != "forward"]
                figures = [r["weighted"][name] for r in kernels]
                if any(f is None or "error" in f for f in figures):
                    continue
                glue = [] if mode == "forward" else backward_glue(
                    op, dtype_name, dim, geometry, next((f["splits"] for f in figures if "splits" in f), 1),
                    (True, not OPS[op]), arch)
                glue_instr = GLUE_INSTRUCTIONS_PER_ELEMENT * sum(glue)
                gpu = H100_SXM
                glue_us = glue_instr / (gpu["issue_slots"] * gpu["sms"] * gpu["clock_hz"]) * 1e6
                floor = sum(f["issue_floor_us"] for f in figures) + glue_us
                fa2 = fa2_floor_us(geometry, mode)
                out.append({"arch": arch, "op": op, "dtype": dtype_name, "head_dim": dim, "launch": name, "mode": mode,
                            "launches": len(kernels) + len(glue),
                            "weighted_instructions_per_useful_score": round(
                                (sum(f["thread_instructions"] for f in figures) + glue_instr) / useful, 2),
                            "issue_floor_us": round(floor, 2), "fa2_dense_floor_us": fa2,
                            "ratio_to_fa2": round(floor / fa2, 2)})
    return out


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

    from . import tuning

    arch, op, dtype_name, dim, kind, layout, default_only = job
    tuning.target_shared_memory(int(arch.removeprefix("sm_")))  # prune for the target's shared memory
    dtype = getattr(torch, DTYPES[dtype_name])
    if kind == "nearest":
        launches, metric, k_shared = [_nearest_launch(dtype, dim, layout)], layout, None
    else:  # forward and dQ: RLR's layout (LCA k, v shared; MLKA k shared, v batched)
        k_shared, v_shared = layout if layout is not None else (True, not OPS[op])
        launches = typical_launches(op, dtype, dim, kind, k_shared, v_shared)
    # the same launches at every geometry of the weighted figures (the nearest kernel has none)
    at = {} if kind == "nearest" else {name: typical_launches(op, dtype, dim, kind, k_shared, v_shared, geometry)
                                       for name, geometry in GEOMETRIES.items()}
    records = []
    for number, launch in enumerate(launches):
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
            weigh = {name: (ls[number], ls[number].candidates()[index].config, GEOMETRIES[name])
                     for name, ls in at.items()}
            records.append({**record, "ok": True} if candidate.reason else
                           _compile_launch(launch, candidate.config, arch, record, weigh))
    return records


def _config_record(config) -> dict:
    """A config as JSON: its block sizes, num_warps, num_stages and its own register budget (if any)."""
    budget = {} if config.maxnreg is None else {"maxnreg": config.maxnreg}
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages, **budget}


def _tile_name(args) -> str:
    if "BLOCK_M" in args:
        return str(args["BLOCK_M"])
    fold = f"{args['FOLD']}*" if args.get("FOLD", 1) > 1 and "K_SHARED" not in args else ""
    return f"{fold}{args['TILE_H']}x{args['TILE_W']}"


def _block_name(args) -> str:
    if "BLOCK_N" in args:
        return str(args["BLOCK_N"])
    fold = f"{args['FOLD']}*" if args.get("FOLD", 1) > 1 and "K_SHARED" in args else ""  # LCA dK/dV: folded queries
    return f"{fold}{args['BLOCK_H']}x{args['BLOCK_W']}"


def _layout_name(layout) -> str:
    if layout is None:
        return ""
    return f"k {'shared' if layout[0] else 'batched'}, v {'shared' if layout[1] else 'batched'}"


def _grads_name(args) -> str:
    if "WITH_DK" not in args:
        return ""
    return "+".join(name for name, on in (("dK", args["WITH_DK"]), ("dV", args["WITH_DV"])) if on)


def _compile_code(launch, config, arch):
    """Compile one launch with `config` for `arch` with the JIT's specialisation: (the compiled
    kernel, its SASS, its SASS with line info, ``cuobjdump --dump-resource-usage``, ``ptxas -v``)."""
    import triton
    from triton.compiler import ASTSource

    a = launch.arguments(config)
    signature, constexprs, attrs = jit_specialization(launch.kernel.fn, a, arch)
    compiled = triton.compile(ASTSource(launch.kernel.fn, signature, constexprs, attrs), target=_target(arch),
                              options=launch.options(config))
    ptx = compiled.asm["ptx"]
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([str(bin_dir / "cuobjdump"), "--dump-resource-usage", str(cubin)],
                               capture_output=True, text=True).stdout
        sass = subprocess.run([str(bin_dir / "cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True).stdout
        line_info = subprocess.run([str(bin_dir / "nvdisasm"), "--print-line-info-inline", "-c", str(cubin)],
                                   capture_output=True, text=True).stdout
        # ptxas -v, run on the same PTX with the flags Triton compiles it with, states the spill
        # stores and loads (its register count must be the cubin's: the same compile)
        (Path(tmp) / "kernel.ptx").write_text(ptx)
        sm = arch.removeprefix("sm_") + ("a" if arch == "sm_90" else "")
        verbose = subprocess.run([str(bin_dir / "ptxas"), "-lineinfo", "-v", "--regAllocOptLevel=2",
                                  f"--gpu-name=sm_{sm}", str(Path(tmp) / "kernel.ptx"), "-o", str(Path(tmp) / "kernel.o")],
                                 capture_output=True, text=True).stderr
    return compiled, sass, line_info, usage, verbose


def weigh_launch(launch, config, geometry: dict, sass: str, line_info: str) -> dict:
    """The weighted figures (`weighted_figures`) of `launch` with `config` at `geometry`, from the
    SASS and line info of its compiled kernel; {"error": ...} where a machine loop matches no loop
    of the source."""
    fn = launch.kernel.fn.fn
    a = launch.arguments(config)
    loops, span, file_name = source_loops(fn)
    try:
        keys = loop_weights(sass, kernel_lines(line_info, span, file_name), loops, tail_blocks(fn))
        trips = trip_counts(launch.name, a, geometry)
    except ValueError as e:
        return {"error": str(e)}
    counted = {key[1] for counts in trips for key, _ in counts if key[0] == "loop"}
    missing = sorted({k[1] for _, _, k in keys if k[0] in ("loop", "mask")} - counted)
    if missing or len(counted) != len(loops):
        return {"error": f"the trip counts of {launch.name} do not cover its {len(loops)} source loops "
                         f"(counted {sorted(counted)}, machine loops of {missing} uncounted)"}
    useful = geometry["batch"] * geometry["heads"] * useful_pairs(geometry["grid"], geometry["window"],
                                                                  bool(a.get("COMPLEMENT", launch.name.startswith("mlka"))))
    figures = weighted_figures(keys, trips, config.num_warps, useful)
    if "SPLITS" in a:
        figures["splits"] = a["SPLITS"]
    # source loops the compiler unrolled into several machine loops (charged as `_unrolled` says)
    figures["unrolled_loops"] = sorted({k[1] for _, _, k in keys if len(k) == 3})
    return figures


def _compile_launch(launch, config, arch, record, weigh=None) -> dict:
    """Compile one launch with `config` for `arch` with the JIT's specialisation: `record` with
    what the compiled code says, or with the error. `weigh`: {geometry name: (the launch at that
    geometry, its config, the geometry)} for the weighted figures (the same compile where the JIT
    specialises both launches alike, else its own)."""
    from .window_attention import tile_cols, tile_rows

    a = launch.arguments(config)
    try:
        compiled, sass, line_info, usage, verbose = _compile_code(launch, config, arch)
    except Exception as e:  # reported in the table, and the command fails
        return {**record, "ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    ptx = compiled.asm["ptx"]
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
    weighted = {}
    for name, (other, other_config, geometry) in (weigh or {}).items():
        code = (sass, line_info)
        if jit_specialization(other.kernel.fn, other.arguments(other_config), arch) != \
                jit_specialization(launch.kernel.fn, a, arch) or other_config != config:
            code = _compile_code(other, other_config, arch)[1:3]
        weighted[name] = weigh_launch(other, other_config, geometry, *code)
    return {**record, "ok": True, "registers": int(regs.group(1)),
            "spill_bytes": int(spills.group(1)) + int(spills.group(2)), "smem_bytes": smem,
            "blocks_per_sm": blocks, "occupancy": round(blocks * warps / H100["warps"], 3),
            "tensor_core": "wgmma" if "wgmma" in ptx else ("mma" if "mma.sync" in ptx else "none"),
            "loop_instructions": loop,
            "instructions_per_score": None if loop is None else round(loop * 32 * warps / scores, 2),
            "cp_async": "cp.async" in ptx, "weighted": weighted or None}


# ------------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------------

_COLUMNS = [("op", "<5"), ("kernel", "<7"), ("arch", "<6"), ("dtype", "<5"), ("head_dim", ">4"), ("layout", "<24"),
            ("grads", "<6"), ("config_index", ">4"), ("dot", "<7"), ("tile", ">5"), ("block", ">5"),
            ("num_warps", ">5"), ("num_stages", ">3"),
            ("registers", ">4"), ("spill_bytes", ">6"), ("smem_bytes", ">6"), ("blocks_per_sm", ">3"),
            ("occupancy", ">5"), ("tensor_core", "<5"), ("loop_instructions", ">5"),
            ("instructions_per_score", ">6"),
            ("32x32:weighted_instructions_per_score", ">6"), ("32x32:exp_per_score", ">5"), ("32x32:issue_floor_us", ">7"),
            ("64x64:weighted_instructions_per_score", ">6"), ("64x64:exp_per_score", ">5"), ("64x64:issue_floor_us", ">7"),
            ("programs", ">6"), ("keys_visited_per_useful_key", ">5")]
_HEADS = {"head_dim": "D", "config_index": "cfg", "num_stages": "stg", "num_warps": "warps", "registers": "regs",
          "spill_bytes": "spills", "smem_bytes": "smem",
          "blocks_per_sm": "blk", "occupancy": "occ", "tensor_core": "tc", "loop_instructions": "loop",
          "instructions_per_score": "ins/sc", "programs": "progs", "keys_visited_per_useful_key": "kv/u",
          "32x32:weighted_instructions_per_score": "w32", "32x32:exp_per_score": "ex32", "32x32:issue_floor_us": "us32",
          "64x64:weighted_instructions_per_score": "w64", "64x64:exp_per_score": "ex64", "64x64:issue_floor_us": "us64"}


def _cell(record, name, fmt) -> str:
    value = record.get(name)
    if ":" in name:  # a weighted figure at one launch geometry
        geometry, _, field = name.partition(":")
        value = ((record.get("weighted") or {}).get(geometry) or {}).get(field, "err")
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


_OP_COLUMNS = [("arch", "<6"), ("op", "<5"), ("dtype", "<5"), ("head_dim", ">4"), ("launch", "<6"), ("mode", "<16"),
               ("launches", ">8"), ("weighted_instructions_per_useful_score", ">8"), ("issue_floor_us", ">9"),
               ("fa2_dense_floor_us", ">9"), ("ratio_to_fa2", ">6")]
_OP_HEADS = {"head_dim": "D", "weighted_instructions_per_useful_score": "ins/sc", "issue_floor_us": "floor_us",
             "fa2_dense_floor_us": "fa2_us", "ratio_to_fa2": "x_fa2"}


def _op_table(rows) -> str:
    head = " ".join(format(_OP_HEADS.get(name, name), fmt) for name, fmt in _OP_COLUMNS)
    return "\n".join([head, "-" * len(head)] + [" ".join(format(r[name], fmt) for name, fmt in _OP_COLUMNS)
                                              for r in rows])


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
          f"ins/sc: per score (both: the fast loop alone, per computed score), "
          f"w32/w64: thread instructions per useful score with every loop weighted by its trip count (prologue "
          f"and epilogue amortised) at B={b}, {h} heads, {gh}x{gw} window {kh} / 64x64 window 11, ex: exp2 (MUFU.EX2) "
          f"per useful score, us: floor time on an H100 SXM (the larger of the issue and exp bounds), "
          f"progs: programs at B={b}, {h} heads, {gh}x{gw}, kv/u: LCA keys visited per useful key")
    ops_rows = op_summaries(records)
    if ops_rows:
        print("\nPer op, default configs, RLR's layout (LCA k, v shared; MLKA k shared, v batched): launches "
              "(kernels and torch glue), thread instructions per useful score (glue estimated at "
              f"{GLUE_INSTRUCTIONS_PER_ELEMENT} per element), floor time on an H100 SXM, and FlashAttention-2's "
              f"floor on the dense problem at the same shapes ({FA2['forward']:g} instructions and "
              f"{FA2['exp_forward']:g} exp2 per score forward, {FA2['backward']:g} and {FA2['exp_backward']:g} "
              "backward)\n")
        print(_op_table(ops_rows))
    if args.json:
        atomic_write_json(args.json, records)
    if args.ops_json:
        atomic_write_json(args.ops_json, ops_rows)
    return 1 if failed or spilled else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m rlr_fast.kernels.aot")
    configure(parser)
    sys.exit(run(parser.parse_args()))
