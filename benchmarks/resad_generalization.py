"""ResAD's class generalization: leave one class out over the accuracy benchmark's classes.

The data are the accuracy benchmark's (``rlr_fast.demo_data.build_benchmark_dataset``: classes
made from scikit-image's photographs in the MVTec layout, exact masks), six classes by default
(three textures, three aligned objects). For each class in turn (the *unseen* class, a fold):
ResAD is trained on the other classes with the ``resad-fast`` recipe as it is (its last epoch,
nothing chosen on the unseen class), from their normal training images plus synthetic-defect
copies (a quarter of the training items anomalous) of kinds that the test sets do not have
(``--train-defects``; the test sets have ``--test-defects`` only). Then the unseen class is
tested from K of its normal training images (K = 4, 2, 1; reference draws 0, 1, 2), next to the
few-shot kNN baseline (``FewShotKNN``: 1 - nearest-reference cosine similarity, same backbone,
same K, same reference images, same test images, nothing trained). ResAD is trained once per
fold, with K = 4 references redrawn per batch (the model's default shots); the same model is
tested at every K. ``--variants`` also scores each model without test-time matching
(``match_alpha`` 0) and without the reference calibration (``calibrate`` False).

Per (class, K, draw): image AUROC, pixel AUROC, pixel AUPRO of each system. Per K and system:
the mean over classes, and the paired difference system minus kNN over the (class, draw) pairs (and, with ``--variants``,
ResAD minus each variant) with a percentile bootstrap 95% interval whose resample unit is the class (a class's draws are
resampled together: they share the class's test images and the trained model, so they are not
independent); the interval with the (class, draw) pair as the unit is kept in the JSON too.

    python benchmarks/resad_generalization.py --out results/resad_gen [--classes brick,grass,...]
        [--shots 4,2,1] [--draws 0,1,2] [--image-size 128] [--epochs N] [--variants]
        [--backbone-weights random]
    python benchmarks/resad_generalization.py --out results/resad_gen --report   # tables of what is recorded

Writes OUT/resad_generalization.json (rewritten atomically after every (class, K, draw): the
settings, per fold the training record with each epoch's loss terms, per (class, K, draw) the
metrics of every system) and OUT/resad_generalization.md. Run it again with the same settings
and it skips what is recorded: a fold's trained model is kept in OUT/runs/<class> and a fold
killed during training resumes from its checkpoint. The loop runs K by K (the first --shots
first), each K over all folds, so a stopped run has the first K complete for as many classes as
it reached. Wall times in the record are of whatever else the machine ran: not speed figures.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import List, Sequence

import numpy as np
import torch

from rlr_fast.demo_data import BENCHMARK_DEFECTS, BENCHMARK_PHOTOS, DEFECTS, build_benchmark_dataset
from rlr_fast.errors import UsageError
from rlr_fast.io import atomic_write_json, atomic_write_text

METRICS = ("image_auroc", "pixel_auroc", "pixel_aupro")
METRIC_NAMES = {"image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC", "pixel_aupro": "AUPRO"}
RESULTS, TABLE = "resad_generalization.json", "resad_generalization.md"
# three textures and three aligned objects of the accuracy benchmark
DEFAULT_CLASSES = ("brick", "grass", "text", "coins", "coffee", "chelsea")
TEST_DEFECTS = DEFECTS  # the demo's four kinds: scratch, stain, cut, hole
TRAIN_DEFECTS = tuple(k for k in BENCHMARK_DEFECTS if k not in DEFECTS)  # perlin, foreign, blur, tint
DEFECT_SHARE = 0.25  # of each seen class's training items, anomalous
TRAIN_SHOTS = 4  # references per training batch (ResADConfig's default)
# test-time settings a trained model is also scored with (--variants): the system name's suffix
VARIANTS = {"": {}, "_nomatch": {"match_alpha": 0.0}, "_nocalib": {"calibrate": False}}
BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED = 10_000, 0


# ------------------------------------------------------------------------------------------------
# The paired difference and its bootstrap interval
# ------------------------------------------------------------------------------------------------

def paired_difference(a: Sequence[float], b: Sequence[float], groups: Sequence, unit: str = "class",
                      resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED, level: float = 0.95) -> dict:
    """The mean of the paired differences ``a - b`` (one pair per entry; ``groups[i]`` is pair
    i's class) and a percentile bootstrap interval of it at ``level``.

    ``unit="class"``: each resample draws as many classes as there are, with replacement, and
    takes every pair of each drawn class (a class's pairs stay together); the statistic is the
    mean over the pairs taken. ``unit="pair"``: each resample draws the pairs themselves. The
    interval's ends are the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the
    ``resamples`` statistics (inverted empirical CDF: each end is one of the resampled means),
    drawn with ``numpy.random.default_rng(seed)``."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(groups) != len(a) or not len(a):
        raise ValueError(f"a, b and groups must be one value per pair, at least one: {a.shape}, {b.shape}, "
                         f"{len(groups)}")
    if unit not in ("class", "pair"):
        raise ValueError(f"unit must be 'class' or 'pair', got {unit!r}")
    d = a - b
    rng = np.random.default_rng(seed)
    if unit == "pair":
        picks = rng.integers(0, len(d), size=(resamples, len(d)))  # (R, n) pair indices
        stats = d[picks].mean(axis=1)
        n_units = len(d)
    else:
        names = list(dict.fromkeys(groups))
        index = {g: i for i, g in enumerate(names)}
        g = np.array([index[x] for x in groups])
        sums = np.bincount(g, weights=d, minlength=len(names))  # (C,) per class: sum and count of its pairs
        counts = np.bincount(g, minlength=len(names)).astype(np.float64)
        picks = rng.integers(0, len(names), size=(resamples, len(names)))  # (R, C) class indices
        stats = sums[picks].sum(axis=1) / counts[picks].sum(axis=1)
        n_units = len(names)
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2], method="inverted_cdf")
    return {"mean": float(d.mean()), "lo": float(lo), "hi": float(hi), "level": level, "unit": unit,
            "units": n_units, "pairs": int(len(d)), "resamples": resamples, "seed": seed}


# ------------------------------------------------------------------------------------------------
# The benchmark
# ------------------------------------------------------------------------------------------------

def _csv(text: str) -> List[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _ints(p, name: str, text: str) -> List[int]:
    try:
        values = [int(t) for t in _csv(text)]
    except ValueError:
        p.error(f"{name} must be comma-separated integers, got {text!r}")
    if not values:
        p.error(f"{name} needs at least one value")
    return values


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="results folder (data, runs, the JSON and the table)")
    p.add_argument("--classes", default=",".join(DEFAULT_CLASSES),
                   help=f"the benchmark classes, each left out in turn (at least 2), of: {', '.join(BENCHMARK_PHOTOS)}")
    p.add_argument("--shots", default="4,2,1", help="the K to test, in this order")
    p.add_argument("--draws", default="0,1,2", help="the seeds of the reference draws")
    p.add_argument("--test-defects", default=",".join(TEST_DEFECTS), help="defect kinds of the test sets")
    p.add_argument("--train-defects", default=",".join(TRAIN_DEFECTS),
                   help="defect kinds of the seen classes' training anomalies (none of --test-defects)")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--n-train", type=int, default=40, help="normal training images per class")
    p.add_argument("--n-test-good", type=int, default=20)
    p.add_argument("--n-test-defect", type=int, default=32)
    p.add_argument("--epochs", type=int, help="the training epochs (default: the resad-fast recipe's)")
    p.add_argument("--residual", default="squared", choices=("squared", "difference"))
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.add_argument("--backbone-weights", default="default", help="'default', 'random' (a quick check) or a file")
    p.add_argument("--variants", action="store_true",
                   help="also score each trained model without test-time matching and without the reference calibration")
    p.add_argument("--report", action="store_true",
                   help="run nothing: rewrite the summary and the table from what OUT's JSON has recorded")
    args = p.parse_args(argv)
    args.classes, args.test_defects, args.train_defects = (_csv(args.classes), _csv(args.test_defects),
                                                           _csv(args.train_defects))
    args.shots, args.draws = _ints(p, "--shots", args.shots), _ints(p, "--draws", args.draws)
    if len(args.classes) < 2 or len(set(args.classes)) != len(args.classes):
        p.error(f"--classes needs at least two distinct classes, got {args.classes}")
    bad = [c for c in args.classes if c not in BENCHMARK_PHOTOS]
    if bad:
        p.error(f"unknown class {', '.join(bad)}; choose from {', '.join(BENCHMARK_PHOTOS)}")
    bad = [d for d in args.test_defects + args.train_defects if d not in BENCHMARK_DEFECTS]
    if bad or not args.test_defects or not args.train_defects:
        p.error(f"defect kinds: at least one each, from {', '.join(BENCHMARK_DEFECTS)}; got {', '.join(bad)}")
    shared = sorted(set(args.test_defects) & set(args.train_defects))
    if shared:
        p.error(f"--train-defects and --test-defects share {', '.join(shared)}: the test kinds stay out of training")
    if min(args.shots) < 1:
        p.error("--shots must be positive")
    for name in ("image_size", "n_train", "n_test_good", "n_test_defect", "epochs"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if args.n_train <= max(max(args.shots), TRAIN_SHOTS):
        p.error(f"--n-train must exceed the largest K and the {TRAIN_SHOTS} training references")
    return args


def settings(args) -> dict:
    """What must not change between records of one results file (K and draws only add records)."""
    from rlr_fast.training import recipe

    cfg = recipe("resad-fast", epochs=args.epochs, seed=args.seed)
    return {"data": {"classes": args.classes, "test_defects": args.test_defects, "image_size": args.image_size,
                     "n_train": args.n_train, "n_test_good": args.n_test_good, "n_test_defect": args.n_test_defect,
                     "seed": 0},
            "training": {"recipe": "resad-fast", "epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": cfg.lr,
                         "seed": args.seed, "residual": args.residual, "train_shots": TRAIN_SHOTS,
                         "train_defects": args.train_defects, "defect_share": DEFECT_SHARE,
                         "backbone_weights": args.backbone_weights},
            "variants": args.variants}


def _load(path: Path, want: dict) -> dict:
    if not path.is_file():
        return {"settings": want, "folds": {}, "runs": {}}
    results = json.loads(path.read_text())
    if results.get("settings") != want:
        raise UsageError(f"{path} holds results of other settings ({json.dumps(results.get('settings'))}), "
                         f"not {json.dumps(want)}: give another --out")
    return results


def _quiet(*_args, **_kwargs) -> None:
    pass


def fold_model(args, data: Path, unseen: str, results: dict, path: Path):
    """The ResAD model trained on every class but ``unseen``: loaded when its run finished, else
    trained (resumed from its checkpoint when one is there); its training record goes into
    ``results["folds"]``."""
    from rlr_fast.fewshot import residual_cache
    from rlr_fast.models.resad import ResADModel
    from rlr_fast.training import CHECKPOINT, load_model, read_checkpoint, recipe, train

    run_dir = args.out / "runs" / unseen
    cfg = recipe("resad-fast", epochs=args.epochs, seed=args.seed)
    ckpt = run_dir / CHECKPOINT
    if unseen in results["folds"] and ckpt.is_file() and read_checkpoint(ckpt)["epoch"] >= cfg.epochs:
        return load_model(run_dir, thresholds=False)
    seen = [c for c in args.classes if c != unseen]
    torch.manual_seed(args.seed)
    model = ResADModel(image_size=args.image_size, shots=TRAIN_SHOTS, residual=args.residual,
                       backbone_weights=args.backbone_weights)
    t0 = time.perf_counter()
    cache = residual_cache(model, data, classes=seen, progress=False, log=_quiet, defect_kinds=args.train_defects,
                           defect_share=DEFECT_SHARE)
    anomalous = int((cache.masks[cache.items].flatten(1).amax(1) > 0.5).sum())
    resumed = ckpt.is_file()
    print(f"{unseen}: training on {', '.join(seen)} ({len(cache)} items, {anomalous} anomalous)"
          + (", resumed" if resumed else ""), flush=True)
    history = train(model, cache, run_dir, cfg, resume=resumed, progress=False,
                    log=lambda line: print(f"  {unseen}: {line}", flush=True))
    results["folds"][unseen] = {
        "seen": seen, "items": len(cache), "anomalous_items": anomalous, "resumed": resumed,
        "wall_s_this_call": round(time.perf_counter() - t0, 1), "history": history,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    atomic_write_json(path, results)
    return load_model(run_dir, thresholds=False)


def score(model, data: Path, unseen: str, shots: int, draw: int) -> dict:
    from rlr_fast.fewshot import evaluate_fewshot

    summary = evaluate_fewshot(model, data, shots, shot_seed=draw, classes=[unseen], log=_quiet, exact=True,
                               progress=False)
    return {m: summary["classes"][unseen][m] for m in METRICS}


def run_one(args, data: Path, model, unseen: str, shots: int, draw: int) -> dict:
    """Every system on the unseen class from one draw of K references."""
    from rlr_fast.fewshot import class_references
    from rlr_fast.models.resad import FewShotKNN

    t0 = time.perf_counter()
    refs = class_references(data, unseen, shots, draw)
    record = {"unseen": unseen, "shots": shots, "draw": draw, "references": [p.name for p in refs]}
    knn = FewShotKNN(image_size=args.image_size, shots=shots, backbone_weights=args.backbone_weights)
    record["knn"] = score(knn, data, unseen, shots, draw)
    for variant, overrides in VARIANTS.items():
        if variant and not args.variants:
            continue
        defaults = {k: getattr(model.config, k) for k in overrides}
        try:
            for k, v in overrides.items():
                setattr(model.config, k, v)
            record[f"resad{variant}"] = score(model, data, unseen, shots, draw)
        finally:
            for k, v in defaults.items():
                setattr(model.config, k, v)
    record["wall_s"] = round(time.perf_counter() - t0, 1)
    return record


def systems_of(results: dict) -> List[str]:
    return ["knn", "resad"] + ([f"resad{v}" for v in VARIANTS if v] if results["settings"]["variants"] else [])


def summary(results: dict) -> dict:
    """Per K: the classes with as many draws recorded as the most of any class (a class a
    stopped run left with fewer is listed under ``incomplete`` and left out), each system's mean
    over those classes (of its means over draws), and each ResAD system's paired difference to
    kNN over their (class, draw) pairs (both resample units)."""
    out = {}
    runs = list(results["runs"].values())
    for shots in sorted({r["shots"] for r in runs}, reverse=True):
        rs = [r for r in runs if r["shots"] == shots]
        n = {c: sum(r["unseen"] == c for r in rs) for c in results["settings"]["data"]["classes"]}
        classes = [c for c, k in n.items() if k and k == max(n.values())]
        incomplete = [c for c, k in n.items() if k and c not in classes]
        rs = [r for r in rs if r["unseen"] in classes]
        by = {}
        for s in systems_of(results):
            by[s] = {m: float(np.mean([np.mean([r[s][m] for r in rs if r["unseen"] == c]) for c in classes]))
                     for m in METRICS}
        diffs = {}
        for s in systems_of(results)[1:]:
            diffs[s] = {m: {unit: paired_difference([r[s][m] for r in rs], [r["knn"][m] for r in rs],
                                                    [r["unseen"] for r in rs], unit=unit)
                            for unit in ("class", "pair")} for m in METRICS}
        # the default ResAD minus each variant: what test-time matching and the calibration add
        variants = {s: {m: {unit: paired_difference([r["resad"][m] for r in rs], [r[s][m] for r in rs],
                                                    [r["unseen"] for r in rs], unit=unit)
                            for unit in ("class", "pair")} for m in METRICS} for s in systems_of(results)[2:]}
        per_class = {c: {s: {m: float(np.mean([r[s][m] for r in rs if r["unseen"] == c])) for m in METRICS}
                         for s in systems_of(results)} for c in classes}
        draws = {c: sorted(r["draw"] for r in rs if r["unseen"] == c) for c in classes}
        out[str(shots)] = {"classes": classes, "draws": draws, "incomplete": incomplete, "mean": by,
                           "difference_to_knn": diffs, "resad_minus_variant": variants, "per_class": per_class}
    return out


def tables(results: dict) -> str:
    """Markdown: per K the mean over classes and the paired differences, then per class."""
    s = results["settings"]
    if not results["runs"]:
        return "(nothing recorded yet)"
    summ = summary(results)
    lines = [f"ResAD class generalization, leave one class out: {len(s['data']['classes'])} benchmark classes at "
             f"{s['data']['image_size']} px; test defects {', '.join(s['data']['test_defects'])}; training anomalies "
             f"({s['training']['defect_share']:.0%} of the items) {', '.join(s['training']['train_defects'])}; "
             f"resad-fast, {s['training']['epochs']} epochs (last), residual {s['training']['residual']}. "
             "Difference: system minus kNN over the (class, draw) pairs, mean and 95% percentile bootstrap interval "
             f"(resample unit: the class, {BOOTSTRAP_RESAMPLES} resamples, seed {BOOTSTRAP_SEED}).", ""]
    for shots, k in summ.items():
        systems = list(k["mean"])
        n_draws = sorted({len(d) for d in k["draws"].values()})
        lines += [f"K = {shots}: {len(k['classes'])} unseen classes ({', '.join(k['classes'])}), "
                  f"{'/'.join(map(str, n_draws))} reference draws each"
                  + (f"; left out, draws incomplete: {', '.join(k['incomplete'])}" if k["incomplete"] else ""), "",
                  "| system | " + " | ".join(METRIC_NAMES[m] for m in METRICS) + " | "
                  + " | ".join(f"{METRIC_NAMES[m]} - kNN [95% CI]" for m in METRICS) + " |",
                  "|---|" + "---|" * (2 * len(METRICS))]
        for sys_name in systems:
            cells = [f"{k['mean'][sys_name][m]:.3f}" for m in METRICS]
            if sys_name == "knn":
                cells += ["" for _ in METRICS]
            else:
                for m in METRICS:
                    d = k["difference_to_knn"][sys_name][m]["class"]
                    cells.append(f"{d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]")
            lines.append(f"| {sys_name} | " + " | ".join(cells) + " |")
        for sys_name, d in k["resad_minus_variant"].items():
            lines.append(f"| resad - {sys_name} |" + " |" * len(METRICS) + " " + " | ".join(
                f"{d[m]['class']['mean']:+.3f} [{d[m]['class']['lo']:+.3f}, {d[m]['class']['hi']:+.3f}]"
                for m in METRICS) + " |")
        lines += ["", f"K = {shots}, per unseen class (mean over draws): " + ", ".join(
            f"{sys_name}" for sys_name in systems) + " each image AUROC / pixel AUROC / AUPRO", "",
                  "| unseen class | " + " | ".join(systems) + " |", "|---|" + "---|" * len(systems)]
        for c, row in k["per_class"].items():
            lines.append(f"| {c} | " + " | ".join(" / ".join(f"{row[sys_name][m]:.3f}" for m in METRICS)
                                                 for sys_name in systems) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / RESULTS
    if args.report:
        if not path.is_file():
            print(f"resad generalization: error: {path} does not exist", file=sys.stderr)
            return 2
        return report(json.loads(path.read_text()), args.out)
    try:
        results = _load(path, settings(args))
        data = build_benchmark_dataset(args.out / "data", classes=args.classes, image_size=args.image_size,
                                       n_train=args.n_train, n_test_good=args.n_test_good,
                                       n_test_defect=args.n_test_defect, defects=args.test_defects)
        for shots in args.shots:
            for unseen in args.classes:
                model = None
                for draw in args.draws:
                    key = f"{unseen}/K{shots}/draw{draw}"
                    if key in results["runs"]:
                        print(f"{key}: already done, skipped", flush=True)
                        continue
                    if model is None:
                        model = fold_model(args, data, unseen, results, path)
                        model.eval()
                    results["runs"][key] = run_one(args, data, model, unseen, shots, draw)
                    atomic_write_json(path, results)  # after every record: a stopped run keeps it
                    rec = results["runs"][key]
                    print(f"{key}: " + "; ".join(f"{s} " + " / ".join(f"{rec[s][m]:.3f}" for m in METRICS)
                                                 for s in systems_of(results)), flush=True)
    except UsageError as e:
        print(f"resad generalization: error: {e}", file=sys.stderr)
        return 2
    return report(results, args.out)


def report(results: dict, out: Path) -> int:
    """Write the summary into OUT's JSON and the markdown table next to it; print the table."""
    results["summary"] = summary(results) if results["runs"] else {}
    atomic_write_json(out / RESULTS, results)
    text = tables(results)
    atomic_write_text(out / TABLE, text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
