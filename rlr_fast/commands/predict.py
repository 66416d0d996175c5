"""`rlr-fast predict`: anomaly scores (CSV) and heat maps (PNG) of images with a trained run."""
from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, type=Path, help="run folder (or checkpoint file) from `rlr-fast train`")
    p.add_argument("images", nargs="+", type=Path, help="image files and/or folders of images")
    p.add_argument("--out", type=Path, help="output folder (default: RUN/predictions)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: autocast to bfloat16 where the device has it (fp32 otherwise, with a warning)")
    p.add_argument("--no-heatmaps", action="store_true", help="scores only")


@torch.no_grad()
def run(args) -> int:
    from ..data import FolderDataset
    from ..training import load_model
    from ..viz import save_heatmap

    model = load_model(args.run, args.device)
    model.precision = args.precision
    out = args.out or (args.run if args.run.is_dir() else args.run.parent) / "predictions"
    out.mkdir(parents=True, exist_ok=True)
    dataset = FolderDataset(args.images, image_size=model.image_size)
    rows = []
    for batch in tqdm(DataLoader(dataset, batch_size=args.batch_size), desc="predict", unit="batch"):
        result = model(batch["image"].to(args.device))
        for i, path in enumerate(batch["path"]):
            score = float(result.score[i])
            rows.append((path, score))
            if not args.no_heatmaps:
                save_heatmap(out / f"{Path(path).stem}_heatmap.png", batch["image"][i], result.anomaly_map[i],
                             title=f"{Path(path).name}  score {score:.3f}")
    tmp = out / ".scores.csv.tmp"
    with open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "score"])
        writer.writerows(rows)
    os.replace(tmp, out / "scores.csv")
    print(f"{len(rows)} images scored: {out / 'scores.csv'}" + ("" if args.no_heatmaps else f"; heat maps in {out}"))
    return 0
