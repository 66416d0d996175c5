"""ResAD's class generalization on the demo data, leave one class out.

For each of the demo's three classes: train ResAD on the other two (their normal images and the
same images with synthetic defects, references redrawn per batch), then test the held-out class
from K reference images of its train/good, next to the few-shot kNN baseline (1 - nearest-
reference cosine similarity, same backbone, same references). Both residual forms (difference
and squared difference) are run unless ``--residuals`` says otherwise; ``--variants`` also scores
each trained model without test-time matching and without the reference calibration. Each run's
per-epoch log (loss terms included) is kept in the JSON.
Per class: image AUROC, pixel AUROC, pixel AUPRO. Writes JSON and a markdown table.

    python benchmarks/resad_generalization.py --out results/resad_loo [--epochs 4] [--shots 4] [--unseen gravel]
        [--residuals squared] [--variants]

Accuracy only: the training and test times it prints come from whatever else runs on the
machine; measure those with ``pytest benchmarks/test_bench_resad.py --benchmark``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from rlr_fast.demo_data import CLASSES, build_demo_dataset
from rlr_fast.fewshot import evaluate_fewshot, residual_cache
from rlr_fast.io import atomic_write_json, atomic_write_text
from rlr_fast.models.resad import RESIDUALS, FewShotKNN, ResADModel
from rlr_fast.training import recipe, train

METRICS = ("image_auroc", "pixel_auroc", "pixel_aupro")
# Test-time settings a trained model is also scored with (--variants): "" is the model's own.
VARIANTS = {"": {}, "_nomatch": {"match_alpha": 0.0}, "_nocalib": {"calibrate": False}}


def run(out: Path, epochs: int, shots: int, image_size: int, lr: float, seed: int, unseen_classes=CLASSES,
        residuals=RESIDUALS, variants: bool = False) -> dict:
    data = build_demo_dataset(out / "data")
    results = {}
    for unseen in unseen_classes:
        seen = [c for c in CLASSES if c != unseen]
        row = {}
        knn = FewShotKNN(image_size=image_size, shots=shots)
        row["knn"] = evaluate_fewshot(knn, data, shots, classes=[unseen], progress=False)["classes"][unseen]
        for residual in residuals:
            torch.manual_seed(seed)
            model = ResADModel(image_size=image_size, shots=shots, residual=residual)
            cache = residual_cache(model, data, classes=seen, progress=False)
            cfg = recipe("resad-fast", epochs=epochs, lr=lr, seed=seed)
            history = train(model, cache, out / f"run_{unseen}_{residual}", cfg, progress=False)
            for variant, settings in VARIANTS.items():  # the same trained model, scored other ways
                if variant and not variants:
                    continue
                defaults = {k: getattr(model.config, k) for k in settings}
                for k, v in settings.items():
                    setattr(model.config, k, v)
                row[f"resad_{residual}{variant}"] = evaluate_fewshot(model, data, shots, classes=[unseen],
                                                                     progress=False)["classes"][unseen]
                for k, v in defaults.items():
                    setattr(model.config, k, v)
            row[f"resad_{residual}"]["history"] = history
        results[unseen] = {"seen": seen, **row}
        print(json.dumps({unseen: results[unseen]}, indent=1), flush=True)
    return results


def table(results: dict) -> str:
    systems = [k for k in next(iter(results.values())) if k != "seen"]
    head = "| unseen class (trained on) | " + " | ".join(f"{s} {m}" for s in systems for m in
                                                         ("img AUROC", "pix AUROC", "AUPRO")) + " |"
    lines = [head, "|" + "---|" * (1 + 3 * len(systems))]
    means = {s: {m: 0.0 for m in METRICS} for s in systems}
    for cls, row in results.items():
        cells = []
        for s in systems:
            for m in METRICS:
                cells.append(f"{row[s][m]:.3f}")
                means[s][m] += row[s][m] / len(results)
        lines.append(f"| {cls} ({', '.join(row['seen'])}) | " + " | ".join(cells) + " |")
    lines.append("| mean | " + " | ".join(f"{means[s][m]:.3f}" for s in systems for m in METRICS) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("results/resad_loo"))
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--shots", type=int, default=4)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=None, help="override the resad-fast recipe's learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--unseen", default=",".join(CLASSES), help="the held-out classes to run (comma-separated)")
    p.add_argument("--variants", action="store_true",
                   help="also score each trained model without test-time matching and without the reference "
                        "calibration (the running maximum of training instead)")
    p.add_argument("--residuals", default=",".join(RESIDUALS), help="ResAD's residual forms to run (comma-separated)")
    args = p.parse_args(argv)
    unseen = [c for c in args.unseen.split(",") if c]
    unknown = [c for c in unseen if c not in CLASSES]
    if unknown:
        p.error(f"unknown demo class(es) {', '.join(unknown)}; choose from {', '.join(CLASSES)}")
    residuals = [r for r in args.residuals.split(",") if r]
    if any(r not in RESIDUALS for r in residuals):
        p.error(f"--residuals: choose from {', '.join(RESIDUALS)}")
    results = run(args.out, args.epochs, args.shots, args.image_size, args.lr, args.seed, unseen, residuals,
                  args.variants)
    config = {"unseen": unseen, "epochs": args.epochs, "shots": args.shots, "image_size": args.image_size, "lr": args.lr,
              "seed": args.seed, "residuals": residuals,
              "variants": args.variants}
    atomic_write_json(args.out / "results.json", {"config": config, "results": results})
    text = table(results)
    atomic_write_text(args.out / "results.md", text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
