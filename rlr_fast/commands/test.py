"""`rlr-fast test`: per-class metrics of a trained run, as a table, JSON and overlay pictures, the
run's decision thresholds (F1-optimal on the data tested, stored as RUN/thresholds.json) and the
report page RUN/report.html (rlr_fast.report: every test image, live threshold sliders)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import options


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, type=options.existing_folder,
                   help="data folder with test images and masks, in a layout of --layout (e.g. MVTec's "
                        "<class>/test and ground_truth)")
    p.add_argument("--run", required=True, type=Path, help="run folder (or checkpoint file) from `rlr-fast train`")
    p.add_argument("--classes", help="comma-separated class names (default: every class in --data)")
    p.add_argument("--json", type=options.output_file, help="write the metrics here (default: RUN/metrics.json)")
    p.add_argument("--overlays", type=options.output_folder, help="overlay pictures folder (default: RUN/overlays)")
    p.add_argument("--report", type=options.output_file,
                   help="write the report page here (default: RUN/report.html; one offline HTML file)")
    p.add_argument("--batch-size", type=options.positive_int, default=8)
    p.add_argument("--device", type=options.device, default=options.default_device())
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: autocast to bfloat16 where the device has it (fp32 otherwise, with a warning)")
    p.add_argument("--exact-metrics", action="store_true",
                   help="pixel AUROC, AUPRO and the pixel threshold from every pixel, sorted (memory grows with the "
                        "test set: about 60 bytes per test pixel); the default above 2^24 test pixels (256 images "
                        "at 256 px) is binned curves in bounded memory, within 1e-3 of the exact metrics")
    p.add_argument("--no-progress", action="store_true")
    from .train import add_layout_option, add_logger_options, add_shot_options

    add_layout_option(p)
    add_logger_options(p)
    add_shot_options(p, "ResAD: K reference images per class, from the class's normal training images in --data "
                        "(MVTec: <class>/train/good; default: the K the model was trained with)")


def warn_untrained_classes(state: dict, classes) -> None:
    """RLR and UniAD learn the normal look of the classes they were trained on: say so when asked
    to test others (runs from before the classes were recorded are not checked)."""
    trained = (state.get("extra") or {}).get("classes")
    if trained is None:
        return
    unseen = [c for c in classes if c not in trained]
    if unseen:
        print(f"warning: the run was trained on {', '.join(trained)}, not on {', '.join(unseen)}: "
              f"the model has not learned what normal looks like there, so its scores mean little", file=sys.stderr)


def tracker_metrics(summary: dict, thresholds) -> dict:
    """What `test` sends a tracker (rlr_fast.trackers): ``test/<class>/<metric>`` and
    ``test/mean/<metric>`` (metrics.json's values), the thresholds and the throughput."""
    values = {f"test/{cls}/{name}": value for cls, metrics in summary["classes"].items()
              for name, value in metrics.items()}
    values.update({f"test/mean/{name}": value for name, value in summary["mean"].items()})
    values.update({"test/threshold/image": thresholds.image.threshold,
                   "test/threshold/pixel": thresholds.pixel.threshold})
    if summary.get("images_per_s") is not None:
        values["test/images_per_s"] = summary["images_per_s"]
    return values


def log_to_tracker(args, run_dir, summary: dict, thresholds, overlays) -> None:
    """--logger: the metrics, thresholds and a few overlay pictures, at the step the training's
    tracker reached (0 when it had none)."""
    from ..trackers import overlay_images
    from .train import open_tracker

    tracker = open_tracker(args, run_dir)
    try:
        tracker.log_metrics(tracker_metrics(summary, thresholds))
        for tag, image in overlay_images(overlays):
            tracker.log_image(tag, image)
    except BaseException:
        tracker.close(failed=True)
        raise
    tracker.close()


def run(args) -> int:
    from ..data import MVTecDataset
    from ..evaluation import evaluate
    from ..io import atomic_write_json, clean_stale_temporaries
    from ..metrics import format_table
    from ..runs import Run
    from ..trackers import check_loggers
    from ..training import model_class, model_from_checkpoint, read_checkpoint
    from .train import ignored_shot_options

    check_loggers(args.logger, args.mlflow_uri)  # before any work
    run = Run(args.run)
    source = run.model_file()  # the run's best epoch, when it has one
    state = read_checkpoint(source)
    dataset = MVTecDataset(args.data, classes=args.classes, split="test", image_size=state["config"]["image_size"],
                           layout=args.layout)
    if not model_class(state["model"]).takes_references:  # ResAD is for classes it was not trained on
        warn_untrained_classes(state, dataset.classes)
    model = model_from_checkpoint(state, args.device, source=source)
    model.precision = args.precision
    ignored_shot_options(args, model.name)
    overlays = args.overlays or run.overlays
    from ..report import ReportCollector, write_report

    shown = ReportCollector()  # what the report page shows, thumbnails only, gathered as the images are evaluated
    common = dict(batch_size=args.batch_size, device=args.device, overlays_dir=overlays, progress=not args.no_progress,
                  report=shown,
                  exact=True if args.exact_metrics else None)  # None: exact up to evaluation.EXACT_MAX_PIXELS
    if model.takes_references:  # (ResAD) each class against K of its normal training images
        from ..fewshot import evaluate_fewshot

        summary = evaluate_fewshot(model, args.data, args.shots or model.config.shots, args.shot_seed,
                                   classes=dataset.classes, layout=dataset.layout, **common)
    else:
        summary = evaluate(model, dataset, **common)
    print(format_table(summary))
    out = args.json or run.metrics
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(out.parent)  # of a test killed while writing
    # everything written here records the fingerprint of the model it was made from (rlr_fast.runs)
    atomic_write_json(out, {"classes": summary["classes"], "mean": summary["mean"],
                            **({"types": summary["types"]} if summary.get("types") else {}),
                            "pixel_metrics": summary["pixel_metrics"], "fingerprint": model.fingerprint})
    Run.write_source(overlays, model.fingerprint, "rlr-fast test")
    thresholds = summary["thresholds"]
    path = run.save_thresholds(thresholds, model.fingerprint)  # what `rlr-fast predict` and model.predict decide with
    report = write_report(args.report or run.report, summary, shown, thresholds, model.fingerprint, run=args.run)
    log_to_tracker(args, run.dir, summary, thresholds, overlays)
    print(f"pixel metrics: {summary['pixel_metrics']}\nmetrics: {out}\noverlays: {overlays}\nreport: {report}\n"
          f"thresholds (F1-optimal on this data): image "
          f"{thresholds.image.threshold:.4g}, pixel {thresholds.pixel.threshold:.4g}: {path}")
    return 0
