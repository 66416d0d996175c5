"""One script for a GPU: the op table and the RLRModel training step, with the static report's floors.

Run from a checkout on an idle CUDA GPU (an H100 is the target); it takes a few minutes:

    .venv/bin/python benchmarks/gpu_check.py [--json results/gpu-check.json]

Op table: both ops in RLR's layouts (LCA: k and v shared; MLKA: k shared, v batched) at B=8, 8 heads,
head dim 32, on the 32 x 32 grid (window 7) and the 64 x 64 grid (window 11), fp16 and bf16, forward
and forward + backward, for three providers:

- ``ours``: this package's Triton kernels (backend "triton");
- ``sdpa``: ``scaled_dot_product_attention`` on its FlashAttention backend over the *dense* problem (no
  mask: every key), the speed MLKA should reach, an upper bound of LCA's work;
- ``flex``: FlexAttention (compiled) with a block mask from the window predicate, the masked kernel a
  user writes in ten lines.

Each row prints the median times, ours/flex and ours/sdpa, and next to them the static report's floors
(`rlr-fast kernels --ops-json`, default ``benchmarks/results/kernels-sm90-weighted-ops.json``): our
floor on an H100 SXM and FlashAttention-2's on the dense problem at the same shape.

Training step: RLRModel at 256 px, batch 8, on cached features (as training runs): ours eager (backend
auto: the Triton kernels), ours under ``torch.compile`` (the custom ops with the Triton backward), naive
(backend reference: dense masked attention).

Without CUDA the script stops with a message saying so (the pure-Python parts, the mask and the table,
are tested on any machine by ``benchmarks/test_bench_gpu.py``).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

# (grid side, window) of each launch, named as the report names them
LAUNCHES = {"32x32": (32, 7), "64x64": (64, 11)}
OPS = ("lca", "mlka")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
MODES = ("forward", "forward+backward")
PROVIDERS = ("ours", "sdpa", "flex")
DEFAULT_FLOORS = Path(__file__).resolve().parent / "results" / "kernels-sm90-weighted-ops.json"


class NoGPU(RuntimeError):
    """The script needs a CUDA GPU."""


def require_cuda() -> torch.device:
    if not torch.cuda.is_available():
        raise NoGPU("gpu_check needs a CUDA GPU and torch.cuda.is_available() is False here; without a GPU "
                    "the static evidence is `rlr-fast kernels` (benchmarks/gpu.md, section 6)")
    return torch.device("cuda")


# ------------------------------------------------------------------------------------------------
# Masks
# ------------------------------------------------------------------------------------------------

def window_mask_mod(grid: int, window: int, complement: bool) -> Callable:
    """FlexAttention's mask_mod on a grid x grid token grid (row-major tokens): key `kv` visible to
    query `q` inside the (clipped) window for LCA, outside it for MLKA."""
    r = window // 2

    def mask_mod(b, h, q, kv):
        inside = ((q // grid - kv // grid).abs() <= r) & ((q % grid - kv % grid).abs() <= r)
        return ~inside if complement else inside

    return mask_mod


def block_mask(grid: int, window: int, complement: bool, device, block: int = 128):
    """FlexAttention's block mask of the window predicate: (query block, key block) pairs with no
    visible key are skipped, full ones run unmasked, the others apply `window_mask_mod`."""
    from torch.nn.attention.flex_attention import create_block_mask

    length = grid * grid
    return create_block_mask(window_mask_mod(grid, window, complement), None, None, length, length,
                             device=device, BLOCK_SIZE=block)


# ------------------------------------------------------------------------------------------------
# The table
# ------------------------------------------------------------------------------------------------

def load_floors(path: Optional[Path], head_dim: int, arch: str = "sm_90") -> Dict[tuple, dict]:
    """{(op, dtype, launch, mode): the report's row} from `rlr-fast kernels --ops-json` (empty if
    there is no such file)."""
    if path is None or not Path(path).exists():
        return {}
    rows = json.loads(Path(path).read_text())
    return {(r["op"], r["dtype"], r["launch"], r["mode"]): r for r in rows
            if r["head_dim"] == head_dim and r["arch"] == arch}


def _ratio(a, b) -> str:
    return f"{a / b:.2f}" if a is not None and b else "-"


def _ms(value) -> str:
    return "-" if value is None else f"{value:.3f}"


OP_HEAD = ("op", "dtype", "launch", "mode", "ours_ms", "sdpa_ms", "flex_ms", "ours/flex", "ours/sdpa",
           "floor_ms", "fa2_ms", "ours/floor")


def format_op_table(rows: List[dict], floors: Dict[tuple, dict]) -> str:
    """The op table: one line per (op, dtype, launch, mode) with the providers' median times (ms),
    ours against flex and sdpa, and the report's floors (ours and FlashAttention-2's dense, ms)."""
    lines = [" ".join(f"{h:>10}" for h in OP_HEAD)]
    for r in rows:
        floor = floors.get((r["op"], r["dtype"], r["launch"], r["mode"]), {})
        ours_floor = floor.get("issue_floor_us")
        fa2 = floor.get("fa2_dense_floor_us")
        ours_floor = None if ours_floor is None else ours_floor / 1000
        fa2 = None if fa2 is None else fa2 / 1000
        cells = (r["op"], r["dtype"], r["launch"], r["mode"], _ms(r.get("ours")), _ms(r.get("sdpa")),
                 _ms(r.get("flex")), _ratio(r.get("ours"), r.get("flex")), _ratio(r.get("ours"), r.get("sdpa")),
                 _ms(ours_floor), _ms(fa2), _ratio(r.get("ours"), ours_floor))
        lines.append(" ".join(f"{c:>10}" for c in cells))
    return "\n".join(lines)


def format_model_table(times: Dict[str, Optional[float]], batch: int) -> str:
    """The training step: ms per step and images/s per path, and each path against naive."""
    naive = times.get("naive")
    lines = [f"{'path':>14} {'ms/step':>10} {'images/s':>10} {'vs naive':>9}"]
    for path, ms in times.items():
        lines.append(f"{path:>14} {_ms(ms):>10} {'-' if not ms else f'{batch / ms * 1000:.1f}':>10} "
                     f"{_ratio(naive, ms):>9}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Measuring (GPU only)
# ------------------------------------------------------------------------------------------------

def median_ms(fn: Callable, warmup: int = 3, repeats: int = 10) -> float:
    """Median time of fn() in ms on the current CUDA stream (CUDA events)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _op_call(op: str, provider: str, q, k, v, grid: int, window: int) -> Callable:
    import torch.nn.functional as F

    from rlr_fast import local_cross_attention, neighbor_masked_attention

    def expand(t):
        return t.expand(q.shape[0], *t.shape[-3:]) if t.dim() == 3 else t

    if provider == "ours":
        fn = local_cross_attention if op == "lca" else neighbor_masked_attention
        return lambda: fn(q, k, v, (grid, grid), window, backend="triton")
    if provider == "sdpa":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def call():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, expand(k), expand(v))
        return call
    from torch.nn.attention.flex_attention import flex_attention

    mask = block_mask(grid, window, op == "mlka", q.device)
    flex = torch.compile(flex_attention)
    return lambda: flex(q, expand(k), expand(v), block_mask=mask)


def measure_ops(device, batch: int, heads: int, head_dim: int, repeats: int) -> List[dict]:
    rows = []
    for op, dtype_name, launch, mode in [(o, d, n, m) for o in OPS for d in DTYPES for n in LAUNCHES for m in MODES]:
        grid, window = LAUNCHES[launch]
        length = grid * grid
        gen = torch.Generator(device=device).manual_seed(0)

        def t(*batch_dims):
            return torch.randn(*batch_dims, heads, length, head_dim, device=device, dtype=DTYPES[dtype_name],
                               generator=gen).requires_grad_()

        q, k = t(batch), t()
        v = t() if op == "lca" else t(batch)
        grad = torch.randn_like(q)
        row = dict(op=op, dtype=dtype_name, launch=launch, mode=mode)
        for provider in PROVIDERS:
            call = _op_call(op, provider, q, k, v, grid, window)
            if mode == "forward":
                def fn(call=call):
                    with torch.no_grad():
                        call()
            else:
                def fn(call=call):
                    torch.autograd.grad(call(), (q, k, v), grad)
            try:
                row[provider] = median_ms(fn, repeats=repeats)
            except Exception as e:  # a provider this GPU or build lacks: reported, the others still run
                row[provider] = None
                row[f"{provider}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        rows.append(row)
        print(f"  {op} {dtype_name} {launch} {mode}: " + ", ".join(
            f"{p} {_ms(row.get(p))} ms" for p in PROVIDERS), flush=True)
    return rows


def measure_training_step(device, batch: int, image_size: int, repeats: int) -> Dict[str, Optional[float]]:
    from rlr_fast.models.rlr import RLRModel

    times = {}
    for path in ("ours eager", "ours compiled", "naive"):
        torch.manual_seed(0)
        model = RLRModel(image_size=image_size, backbone_weights="random",
                         backend="dense" if path == "naive" else "auto").to(device).train()
        feats = model.features(torch.randn(batch, 3, image_size, image_size, device=device))
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        loss = torch.compile(model.loss) if path == "ours compiled" else model.loss

        def step():
            optimizer.zero_grad(set_to_none=True)
            loss(feats).backward()
            optimizer.step()
        try:
            times[path] = median_ms(step, repeats=repeats)
        except torch.cuda.OutOfMemoryError:  # the naive path at large sizes
            times[path] = None
        print(f"  training step {path}: {_ms(times[path])} ms", flush=True)
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--floors", type=Path, default=DEFAULT_FLOORS,
                   help="per-op floors from `rlr-fast kernels --ops-json` (default: the saved sm_90 report)")
    p.add_argument("--skip-model", action="store_true", help="the op table only")
    p.add_argument("--json", type=Path, help="also write every measurement as JSON")
    args = p.parse_args(argv)
    try:
        device = require_cuda()
    except NoGPU as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}: B={args.batch}, {args.heads} heads, "
          f"head dim {args.head_dim}", flush=True)
    rows = measure_ops(device, args.batch, args.heads, args.head_dim, args.repeats)
    floors = load_floors(args.floors, args.head_dim)
    print("\nOps (median ms; floors from the static report: ours and FlashAttention-2's on the dense problem, "
          "H100 SXM)\n")
    print(format_op_table(rows, floors))
    times = {}
    if not args.skip_model:
        times = measure_training_step(device, args.batch, args.image_size, max(3, args.repeats // 4))
        print(f"\nRLRModel training step, {args.image_size} px, batch {args.batch}\n")
        print(format_model_table(times, args.batch))
    if args.json:
        from rlr_fast.io import atomic_write_json

        atomic_write_json(args.json, {"device": torch.cuda.get_device_name(device), "ops": rows, "training_step": times})
    return 0


if __name__ == "__main__":
    sys.exit(main())
