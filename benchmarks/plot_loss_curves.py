"""RLR's loss curves at 128, 256 and 384 px, before and after issue 16's changes, as one picture.

Reads benchmarks/results/rlr-loss-curves.json (per run: what it is, its image size and its
per-epoch log as `rlr-fast train` writes log.jsonl) and writes
benchmarks/results/rlr-loss-curves.png: training loss (solid) and held-out loss (dashed, where
the run held images out) per epoch, one panel per image size.

    python benchmarks/plot_loss_curves.py [--results benchmarks/results/rlr-loss-curves.json] [--out PNG]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=HERE / "results" / "rlr-loss-curves.json")
    p.add_argument("--out", type=Path, default=HERE / "results" / "rlr-loss-curves.png")
    args = p.parse_args(argv)
    from matplotlib.figure import Figure

    runs = json.loads(args.results.read_text())["runs"]
    sizes = sorted({r["image_size"] for r in runs.values()})
    fig = Figure(figsize=(5.2 * len(sizes), 4.2))
    axes = fig.subplots(1, len(sizes), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        for i, (name, run) in enumerate((n, r) for n, r in runs.items() if r["image_size"] == size):
            epochs = [rec["epoch"] for rec in run["log"]]
            line, = ax.plot(epochs, [rec["loss"] for rec in run["log"]], label=run["label"], color=f"C{i}")
            held = [rec.get("val_loss") for rec in run["log"]]
            if all(v is not None for v in held):
                ax.plot(epochs, held, "--", color=line.get_color(), alpha=0.8)
        ax.set_title(f"{size} px")
        ax.set_xlabel("epoch")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("loss (solid: training, dashed: held-out)")
    fig.suptitle("RLR training loss per epoch")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
