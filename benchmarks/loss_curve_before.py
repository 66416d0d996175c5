"""Issue 16's "before" loss curve at any image size: the paper's network on raw features with the
recipe RLR had before the fixes (Adam 1e-3, 2 warm-up epochs, cosine over 10 epochs, batch 8,
bf16 autocast), on the demo's three textures built at that size; trained through
``rlr_fast.training.train`` with the default held-out split (so a held-out loss is logged), then
tested. Writes ``before.json`` (recipe, network, per-epoch log, metrics) into the run folder; its
``log`` is what ``benchmarks/results/rlr-loss-curves.json`` holds as the "raw" runs.

    python benchmarks/loss_curve_before.py DATA RUN [--image-size 384] [--epochs 10]

DATA is built with ``build_demo_dataset(DATA, image_size, n_train=40, n_test_good=10,
n_test_defect=16)`` if it has no brick class yet.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", type=Path)
    p.add_argument("run", type=Path)
    p.add_argument("--image-size", type=int, default=384)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import torch
    from rlr_fast.checkpoints import load_model
    from rlr_fast.commands.train import training_set
    from rlr_fast.demo_data import build_demo_dataset
    from rlr_fast.evaluation import evaluate
    from rlr_fast.features import extract_features, hold_out
    from rlr_fast.models.rlr import PAPER_NETWORK, RLRModel
    from rlr_fast.recipes import TrainConfig
    from rlr_fast.training import train

    size = args.image_size
    if not (args.data / "brick").is_dir():
        build_demo_dataset(args.data, image_size=size, n_train=40, n_test_good=10, n_test_defect=16)
    torch.manual_seed(args.seed)
    model = RLRModel(image_size=size, **PAPER_NETWORK)
    cfg = TrainConfig(epochs=args.epochs, batch_size=8, lr=1e-3, warmup_epochs=2, schedule="cosine", amp="bf16",
                      seed=args.seed)
    dataset = training_set(args.data, None, size, "auto")
    train_set, held = hold_out(dataset, cfg.val_fraction, seed=cfg.seed)
    cache = extract_features(model, train_set, progress=False)
    val = extract_features(model, held, progress=False) if held is not None else None  # None: too few images
    t0 = time.perf_counter()
    history = train(model, cache, args.run, cfg, val_cache=val, progress=False, extra={"classes": dataset.classes})
    seconds = time.perf_counter() - t0
    summary = evaluate(load_model(args.run, thresholds=False), args.data, progress=False)
    record = {"config": vars(cfg), "network": PAPER_NETWORK, "image_size": size, "train_seconds": seconds,
              "log": history, "metrics": {"mean": summary["mean"], "classes": summary["classes"]}}
    (args.run / "before.json").write_text(json.dumps(record, indent=1))
    print("mean", summary["mean"], f"training {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
