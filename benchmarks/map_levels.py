"""Which of RLR's level maps make the best anomaly map and image score, measured on a trained run.

RLR scores each level (strides 8 and 16 with the default backbone) by its reconstruction error
and, as the paper does, averages the two upsampled maps; the image score is the maximum of that
average blurred (sigma 4). This script tests one trained run once and derives several pixel maps
and image scores from the same per-level maps, so that they are compared on the same model:

- pixel maps: ``all`` (the mean of the levels, the paper's) and ``finest`` (the stride-8 level's alone);
  and ``norm`` (the mean of the levels' maps, each divided by its mean over the run's training images);
- image scores: ``max-MAP`` (the maximum of the blurred map; ``max-all`` is the paper's) and ``top-MAP``
  (the mean of the top 1% of the blurred map's pixels instead of its maximum).

    python benchmarks/map_levels.py --run RUN --data DATA --json OUT.json

RUN is a run folder of `rlr-fast train --model rlr` and DATA the data folder it was trained on
(its test split is scored), e.g. the accuracy benchmark's ``OUT/runs/rlr-seed0`` and ``OUT/data``.
Prints one line per variant (mean over classes) and writes per-class figures to ``--json``.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rlr_fast.data import MVTecDataset
from rlr_fast.metrics import image_auroc, pixel_aupro, pixel_auroc
from rlr_fast.models.layers import gaussian_blur
from rlr_fast.models.rlr import paper_score
from rlr_fast.training import load_model

MAPS = ("all", "finest", "norm")
SCORES = tuple(f"{kind}-{m}" for kind in ("max", "top") for m in MAPS)
TOP_SHARE = 0.01  # the share of a blurred map's pixels the "top" scores average


def level_maps(model, images: torch.Tensor) -> list:
    """Per level, the paper's reconstruction error upsampled to the input: [(B, 1, H, W)]."""
    maps = []
    for (target, recon), grid in zip(model.reconstruct(model.features(images)), model.grids):
        s = paper_score(target.float(), recon.float())  # (B, L)
        maps.append(F.interpolate(s.view(-1, 1, *grid), size=model.input_size, mode="bilinear", align_corners=True))
    return maps


def image_scores(pixel_maps: dict, sigma: float) -> dict:
    out = {}
    for name, m in pixel_maps.items():
        blurred = gaussian_blur(m, sigma).flatten(1)  # (B, H*W)
        k = max(1, int(round(TOP_SHARE * blurred.shape[1])))
        out[f"max-{name}"] = blurred.amax(1)
        out[f"top-{name}"] = blurred.topk(k, dim=1).values.mean(1)
    return out


@torch.no_grad()
def measure(run: Path, data: Path, batch_size: int = 8) -> dict:
    model = load_model(run, thresholds=False)
    if getattr(model.config, "score", "paper") == "whitened":  # "balanced" reads the paper's level maps too
        raise SystemExit(f"{run}: this script derives the paper's level maps; the run uses score='whitened'")
    # each level's mean error over the training images (normal only: no test image is looked at)
    train = MVTecDataset(data, split="train", image_size=model.image_size)
    level_mean = 0
    for batch in torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=False):
        level_mean = level_mean + torch.stack([m.mean(dim=(1, 2, 3)).sum() for m in level_maps(model, batch["image"])])
    level_mean = level_mean / len(train)
    dataset = MVTecDataset(data, split="test", image_size=model.image_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    per = defaultdict(lambda: {"labels": [], "masks": {m: [] for m in MAPS}, "scores": defaultdict(list),
                               "maps": {m: [] for m in MAPS}})
    for batch in loader:
        levels = level_maps(model, batch["image"])
        pixel_maps = {"all": torch.stack(levels).mean(0), "finest": levels[0],
                      "norm": torch.stack([m / mu for m, mu in zip(levels, level_mean)]).mean(0)}
        scores = image_scores(pixel_maps, model.config.score_sigma)
        for i, cls in enumerate(batch["cls"]):
            rec = per[cls]
            rec["labels"].append(int(batch["label"][i]))
            for name, s in scores.items():
                rec["scores"][name].append(float(s[i]))
            for name, m in pixel_maps.items():
                rec["maps"][name].append(m[i, 0].numpy())
                rec["masks"][name].append(batch["mask"][i].reshape(m.shape[-2:]).numpy())
        print(f"  {sum(len(r['labels']) for r in per.values())}/{len(dataset)} images", end="\r", file=sys.stderr)
    classes = {}
    for cls, rec in sorted(per.items()):
        row = {f"image_auroc/{s}": image_auroc(rec["labels"], rec["scores"][s]) for s in SCORES}
        for m in MAPS:
            masks, maps = np.stack(rec["masks"][m]), np.stack(rec["maps"][m])
            row[f"pixel_auroc/{m}"] = pixel_auroc(masks, maps)
            row[f"pixel_aupro/{m}"] = pixel_aupro(masks, maps)
        classes[cls] = row
    mean = {k: float(np.mean([row[k] for row in classes.values()])) for k in next(iter(classes.values()))}
    return {"run": run.name, "level_train_mean": level_mean.tolist(), "classes": classes, "mean": mean}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True, help="an RLR run folder")
    p.add_argument("--data", type=Path, required=True, help="the data folder whose test split is scored")
    p.add_argument("--json", type=Path, help="write the per-class figures here")
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args(argv)
    result = measure(args.run, args.data, args.batch_size)
    for key, value in result["mean"].items():
        print(f"{key:24s} {value:.4f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
