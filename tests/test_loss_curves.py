"""benchmarks/loss_curve_before.py (issue 16's "before" curves: the paper's network on raw features
with the pre-fix recipe) and benchmarks/plot_loss_curves.py, on the tiny demo data."""
import json
import math

from rlr_fast.models.rlr import PAPER_NETWORK

from helpers import load_script


def test_before_curve_trains_the_pre_fix_recipe_and_records_it(data, tmp_path):
    run = tmp_path / "run"
    assert load_script("loss_curve_before").main([str(data), str(run), "--image-size", "64", "--epochs", "2"]) == 0
    record = json.loads((run / "before.json").read_text())
    cfg = record["config"]
    assert (cfg["lr"], cfg["batch_size"], cfg["warmup_epochs"], cfg["schedule"], cfg["amp"], cfg["epochs"]) == \
        (1e-3, 8, 2, "cosine", "bf16", 2)
    assert record["network"] == PAPER_NETWORK and record["image_size"] == 64
    assert [r["epoch"] for r in record["log"]] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in record["log"])
    assert set(record["metrics"]["classes"]) == {"brick", "gravel"}
    assert 0.0 <= record["metrics"]["mean"]["image_auroc"] <= 1.0


def test_plot_draws_every_size_of_the_committed_curves(tmp_path):
    from pathlib import Path

    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "rlr-loss-curves.json"
    runs = json.loads(results.read_text())["runs"]
    assert {r["image_size"] for r in runs.values()} == {128, 256, 384}
    # a "before" curve at each size: the paper's network, before the fixes or as the previous default
    assert {r["image_size"] for r in runs.values() if "paper's network" in r["label"]} == {128, 256, 384}
    out = tmp_path / "curves.png"
    assert load_script("plot_loss_curves").main(["--results", str(results), "--out", str(out)]) == 0
    assert out.stat().st_size > 10_000
