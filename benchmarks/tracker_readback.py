"""What `--logger tensorboard,mlflow` writes, read back with each tool's own reader: a tiny run
(2 generated classes, 64 px, random backbone, 2 epochs) trained and tested with both loggers,
then every TensorBoard tag (EventAccumulator) and every MLflow metric, parameter and artifact
(MlflowClient on the file store) listed with its number of values and steps.

    python benchmarks/tracker_readback.py --out WORK   # prints the listing the README shows
"""
from __future__ import annotations

import argparse
import os
import shutil
import textwrap
from pathlib import Path


def values_text(steps) -> str:
    """"4 values, steps 0-3" (consecutive steps), "2 values, steps 1, 3", "1 value, step 3"."""
    steps = sorted(steps)
    count = f"{len(steps)} value{'s' if len(steps) > 1 else ''}"
    if len(steps) == 1:
        return f"{count}, step {steps[0]}"
    if steps == list(range(steps[0], steps[-1] + 1)):
        return f"{count}, steps {steps[0]}-{steps[-1]}"
    return f"{count}, steps {', '.join(map(str, steps))}"


def listing(run: Path) -> str:
    """TensorBoard's tags and MLflow's metrics, parameters and artifacts of a run folder."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    lines = [f"TensorBoard ({run.name}/tensorboard, EventAccumulator):"]
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in tags["scalars"]:
        events = acc.Scalars(tag)
        lines.append(f"  scalar {tag}: {values_text([e.step for e in events])}")
    for tag in tags["images"]:
        (event,) = acc.Images(tag)[-1:]
        lines.append(f"  image  {tag}: {event.width}x{event.height}, step {event.step}")
    for tag in tags["tensors"]:  # add_text is stored as a tensor
        lines.append(f"  text   {tag}")
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(run / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("rlr-fast")
    (found,) = client.search_runs([experiment.experiment_id])
    run_id = found.info.run_id
    lines.append(f"MLflow ({run.name}/mlruns, MlflowClient): experiment rlr-fast, 1 run, status {found.info.status}")
    for key in sorted(found.data.metrics):
        history = client.get_metric_history(run_id, key)
        lines.append(f"  metric {key}: {values_text([m.step for m in history])}")
    lines.extend(textwrap.wrap(f"params ({len(found.data.params)}): {', '.join(sorted(found.data.params))}", 100,
                               initial_indent="  ", subsequent_indent="    "))

    def artifacts(path=None):
        for item in client.list_artifacts(run_id, path):
            yield from artifacts(item.path) if item.is_dir else [item.path]

    lines.extend(f"  artifact {path}" for path in artifacts())
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="work folder (its data/ and run/ are replaced)")
    args = parser.parse_args()
    from rlr_fast.cli import main as cli
    from rlr_fast.demo_data import build_demo_dataset

    data, run = args.out / "data", args.out / "run"
    for folder in (data, run):
        shutil.rmtree(folder, ignore_errors=True)
    build_demo_dataset(data, classes=("brick", "gravel"), image_size=64, n_train=4, n_test_good=2, n_test_defect=4)
    common = ["--data", str(data), "--no-progress", "--logger", "tensorboard,mlflow"]
    assert cli(["train", *common, "--out", str(run), "--image-size", "64", "--backbone-weights", "random",
                "--batch-size", "4", "--epochs", "2"]) == 0
    assert cli(["test", *common, "--run", str(run)]) == 0
    print("\n" + listing(run))


if __name__ == "__main__":
    main()
