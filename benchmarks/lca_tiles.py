"""LCA's query tile on the CPU: the torch backend's forward + backward per tile, and RLR's training
step with the tile rule of ``rlr_fast.blocked.lca_tile`` against fixed tiles.

    python benchmarks/lca_tiles.py --out benchmarks/results/lca-tiles.json

Timings alternate between the candidates round by round (side by side in one process, so a
noisy neighbour hits all alike); each figure is the median of the rounds. Run it on a quiet
machine: a second torch process on the same cores makes every figure meaningless.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import rlr_fast.blocked as blocked
from rlr_fast.blocked.chunked import BlockedAttention, LCAPlan
from rlr_fast.timing import cpu_name

# (grid side, window, head dim): RLR's levels at 128 to 512 px with 8 heads (d 128 and 256).
SHAPES = [(8, 3, 32), (16, 5, 32), (24, 7, 16), (32, 7, 16), (48, 9, 16), (64, 11, 16)]
TILES = [(2, 2), (2, 4), (4, 4), (4, 8)]


def _median(xs):
    return sorted(xs)[len(xs) // 2]


def op_sweep(batches, shared: bool, rounds: int, heads: int = 8) -> dict:
    out = {}
    for b in batches:
        for side, window, d in SHAPES:
            grid, length = (side, side), side * side
            q = torch.randn(b, heads, length, d, requires_grad=True)
            kv_shape = (heads, length, d) if shared else (b, heads, length, d)
            k, v = torch.randn(kv_shape, requires_grad=True), torch.randn(kv_shape, requires_grad=True)
            plans = {f"{t[0]}x{t[1]}": LCAPlan(grid, (window, window), torch.device("cpu"), torch.float32, tile=t)
                     for t in TILES}
            times = {name: [] for name in plans}

            def run(plan):
                o = BlockedAttention.apply(q, k, v, plan, d ** -0.5)
                o.backward(torch.ones_like(o))

            for plan in plans.values():
                run(plan)
            for _ in range(rounds):
                for name, plan in plans.items():
                    t0 = time.perf_counter()
                    run(plan)
                    times[name].append(time.perf_counter() - t0)
            ms = {name: round(_median(x) * 1000, 2) for name, x in times.items()}
            rule = blocked.lca_tile(grid, (window, window), batch=b, shared=shared)
            out[f"batch {b}, grid {side}, window {window}, head dim {d}"] = {
                "ms": ms, "rule": f"{rule[0]}x{rule[1]}", "fastest": min(ms, key=ms.get)}
            print(f"batch {b} grid {side} window {window}: {ms}  rule {rule[0]}x{rule[1]}", flush=True)
    return out


def training_step(batch: int, image_size: int, rounds: int) -> dict:
    """RLR's default training step (cached features, Adam) with the tile rule against 2 x 2 tiles
    (the rule before it), one model, the rule switched between rounds."""
    from rlr_fast.models.rlr import RLRModel

    torch.manual_seed(0)
    model = RLRModel(image_size=image_size, backbone_weights="random").train()
    feats = [f.detach() for f in model.features(torch.randn(batch, 3, image_size, image_size))]
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    rule = blocked.lca_tile
    candidates = {"rule": rule, "2x2": lambda grid, window, batch, shared: (min(2, grid[0]), min(2, grid[1]))}
    times = {name: [] for name in candidates}

    def step():
        opt.zero_grad(set_to_none=True)
        model.loss(feats).backward()
        opt.step()

    try:
        for name, tile in candidates.items():
            blocked.lca_tile = tile
            for _ in range(2):
                step()
        for _ in range(rounds):
            for name, tile in candidates.items():
                blocked.lca_tile = tile
                t0 = time.perf_counter()
                for _ in range(3):
                    step()
                times[name].append((time.perf_counter() - t0) / 3)
    finally:
        blocked.lca_tile = rule
    ms = {name: round(_median(x) * 1000, 1) for name, x in times.items()}
    print(f"training step, batch {batch}, {image_size} px: {ms}", flush=True)
    return {"batch": batch, "image_size": image_size, "ms_per_step": ms,
            "speedup_rule_over_2x2": round(ms["2x2"] / ms["rule"], 3)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    result = {
        "what": "LCA forward + backward (torch backend, float32, 8 heads, ones as the output gradient) "
                "per query tile, and RLR's training step with the tile rule against 2x2 tiles",
        "machine": {"cpu": cpu_name(), "threads": args.threads,
                    "torch": torch.__version__},
        "shared_kv": op_sweep(batches, True, args.rounds),
        "batched_kv": op_sweep([b for b in batches if b in (1, 2, 8)], False, args.rounds),
        "training_step": [training_step(b, 256, args.rounds) for b in (2, 8)],
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
