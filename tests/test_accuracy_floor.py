"""A floor on detection: a short default training on demo data with the embedded backbone must
still find the demo defects, so a change that breaks learning fails the suite (not only the
accuracy benchmark, which CI does not run).

Calibration (this configuration, seed 0): trained 4 epochs, mean image / pixel AUROC / AUPRO
0.972 / 0.965 / 0.903; the same network with a learning rate of 1e-12 (it does not learn)
0.667 / 0.830 / 0.618. The floors sit between, nearer the untrained side of the trained figures
so that a platform's rounding cannot trip them."""
import json

from rlr_fast.cli import main
from rlr_fast.demo_data import build_demo_dataset

FLOORS = {"image_auroc": 0.85, "pixel_auroc": 0.90, "pixel_aupro": 0.80}


def test_a_short_default_training_detects_the_demo_defects(tmp_path):
    data = build_demo_dataset(tmp_path / "data", classes=("brick", "gravel"), image_size=128, n_train=8,
                              n_test_good=3, n_test_defect=6)
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(run), "--image-size", "128", "--epochs", "4",
                 "--no-progress"]) == 0
    assert main(["test", "--data", str(data), "--run", str(run), "--no-progress"]) == 0
    mean = json.loads((run / "metrics.json").read_text())["mean"]
    low = {k: round(mean[k], 3) for k, floor in FLOORS.items() if mean[k] < floor}
    assert not low, f"detection fell below the floor {FLOORS}: {low}"
