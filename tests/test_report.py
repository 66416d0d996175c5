"""The test report page RUN/report.html (issue 21): what `rlr-fast test` writes into it, its size,
and the page itself driven in headless Chromium with Playwright (skipped, with the reason, only
where no Chromium or no Playwright can be found: `make test` installs both where it can)."""
import json
import math
import os
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix

from rlr_fast.cli import main
from rlr_fast.decisions import Thresholds, decision_counts
from rlr_fast.metrics import METRICS, pro_curve
from rlr_fast.report import ReportCollector, build_report, read_fingerprint
from rlr_fast.runs import Run


# ---------------------------------------------------------------------------- decision_counts
def test_decision_counts_match_sklearn_confusion_matrix():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 50)
    scores = rng.normal(size=50) + labels
    for t in [*np.quantile(scores, [0.1, 0.5, 0.9]), scores[7]]:  # scores[7]: a score exactly at the threshold
        c = decision_counts(labels, scores, t)
        tn, fp, fn, tp = confusion_matrix(labels, scores >= t, labels=[0, 1]).ravel()
        assert (c.tp, c.fp, c.tn, c.fn) == (tp, fp, tn, fn)
        assert c.precision == pytest.approx(tp / (tp + fp)) and c.recall == pytest.approx(tp / (tp + fn))
        assert c.f1 == pytest.approx(2 * tp / (2 * tp + fp + fn)) and c.fpr == pytest.approx(fp / (fp + tn))
    above = decision_counts(labels, scores, scores.max() + 1)  # nothing flagged: precision undefined
    assert above.tp + above.fp == 0 and math.isnan(above.precision) and above.recall == 0 and math.isnan(above.f1)


# ------------------------------------------------------------------------------- a tiny run
@pytest.fixture(scope="module")
def tiny_run(data, tmp_path_factory):  # noqa: F811
    """1 epoch of RLR at 64 px on the 2 x 6 test images of `data`, then `rlr-fast test`."""
    run = tmp_path_factory.mktemp("report") / "run"
    assert main(["train", "--data", str(data), "--out", str(run), "--image-size", "64", "--backbone-weights",
                 "random", "--batch-size", "4", "--epochs", "1", "--no-progress"]) == 0
    assert main(["test", "--data", str(data), "--run", str(run), "--no-progress"]) == 0
    return run


def page_data(path) -> dict:
    text = Path(path).read_text()
    raw = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', text, re.S).group(1)
    return json.loads(raw)


def test_test_writes_a_self_contained_report_of_every_test_image(data, tiny_run):  # noqa: F811
    page = tiny_run / "report.html"
    text = page.read_text()
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert read_fingerprint(page) == metrics["fingerprint"] == Run(tiny_run).served_fingerprint()
    assert not re.search(r"(src|href)=\"(https?:)?//", text) and "<link" not in text  # nothing fetched
    got = page_data(page)
    thresholds = Thresholds.load(tiny_run / "thresholds.json")
    assert got["image"]["threshold"] == thresholds.image.threshold
    assert got["pixel"]["threshold"] == thresholds.pixel.threshold
    for cls in got["classes"]:
        on_disk = sorted(p.name for p in (data / cls["name"] / "test").rglob("*.png"))
        assert sorted(im["name"] for im in cls["images"]) == on_disk
        scores = [im["score"] for im in cls["images"]]
        assert scores == sorted(scores, reverse=True)
        for im in cls["images"]:
            assert im["label"] == (im["defect"] != "good")
            assert all(im[k].startswith("data:image/") for k in ("thumb", "heat", "map"))
            assert (im["mask"] is None) == (im["defect"] == "good")


def test_train_force_removes_the_report(data, tiny_run, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    assert main(["train", "--data", str(data), "--out", str(run), "--image-size", "64", "--backbone-weights",
                 "random", "--batch-size", "4", "--epochs", "1", "--no-progress", "--force"]) == 0
    assert not (run / "report.html").exists() and (run / "checkpoint.pt").is_file()


def test_report_size_per_image_is_small():
    """Synthetic records at MVTec-like 256 px: each image costs the page about 10 kB (thumbnail,
    heat map, 8-bit map, mask), so a 1,000-image test set stays in the tens of MB."""
    rng = np.random.default_rng(0)
    n, size = 12, 256
    yy, xx = np.mgrid[:size, :size] / size
    shown, maps, masks, labels = ReportCollector(), [], [], []
    for i in range(n):
        cx, cy = rng.uniform(0.2, 0.8, 2)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.01)
        maps.append((rng.uniform(0, 0.2, (size, size)) + blob * (i % 2)).astype(np.float32))
        masks.append((blob > 0.5) & bool(i % 2))
        labels.append(i % 2)
        image = (rng.uniform(0, 255, (size, size, 3)) * 0.3 + 120 * blob[..., None]).astype(np.uint8)
        shown.add("c", image, masks[-1], maps[-1], float(maps[-1].max()), i % 2, "crack" if i % 2 else "good",
                  f"img{i}.png")
    shown.set_pro("c", pro_curve(np.stack(masks), np.stack(maps)))
    summary = {"classes": {"c": {m: 0.5 for m in METRICS}}, "mean": {m: 0.5 for m in METRICS}}
    thresholds = Thresholds.fit(labels, [float(m.max()) for m in maps], np.stack(masks), np.stack(maps))
    page = build_report(summary, shown, thresholds, "0123456789abcdef")
    per_image = len(page.encode()) / n
    assert per_image < 20_000, f"{per_image:.0f} bytes per image"


# ---------------------------------------------------------------------------------- browser
def find_chromium():
    """A Chromium to drive: $RLR_FAST_CHROMIUM, the system's (Debian's `chromium`), or Playwright's own."""
    for candidate in (os.environ.get("RLR_FAST_CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser"),
                      shutil.which("google-chrome")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install -e '.[test]')")
    executable = find_chromium()
    with sync_api.sync_playwright() as p:
        if executable is None and not Path(p.chromium.executable_path).is_file():
            pytest.skip("no Chromium found: install Debian's `chromium` (apt-get install chromium, as `make test` "
                        "does as root) or set RLR_FAST_CHROMIUM to a Chromium binary")
        b = p.chromium.launch(executable_path=executable) if executable else p.chromium.launch()
        yield b
        b.close()


def _rate(text: str) -> float:
    return math.nan if text == "n/a" else float(text)


def _check_stats(page, got, threshold):
    """The page's counts and rates per class and overall equal rlr_fast.decisions' at `threshold`."""
    groups = {c["name"]: c["images"] for c in got["classes"]}
    groups["all"] = [im for c in got["classes"] for im in c["images"]]
    for name, images in groups.items():
        want = decision_counts([im["label"] for im in images], [im["score"] for im in images], threshold)
        row = {td.get_attribute("data-k"): td.inner_text()
               for td in page.query_selector_all(f'#stats tr[data-class="{name}"] td')}
        assert [int(row[k]) for k in ("tp", "fp", "tn", "fn", "flagged")] == [want.tp, want.fp, want.tn, want.fn,
                                                                           want.tp + want.fp], name
        for k in ("precision", "recall", "f1", "fpr"):
            value, ref = _rate(row[k]), getattr(want, k)
            assert (math.isnan(value) and math.isnan(ref)) or abs(value - ref) <= 5e-4 + 1e-12, (name, k, row[k], ref)
    flagged = page.eval_on_selector_all(".thumb.flagged", "els => els.length")
    assert flagged == sum(im["score"] >= threshold for im in groups["all"])


def test_report_page_in_chromium(browser, data, tiny_run, tmp_path):  # noqa: F811
    path = tiny_run / "report.html"
    got = page_data(path)
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    page = browser.new_page()
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(path.as_uri())
    page.wait_for_selector(".thumb")

    # the metrics table shows metrics.json's values
    for name, values in [*metrics["classes"].items(), ("mean", metrics["mean"])]:
        cells = page.query_selector_all(f'#metrics tr[data-class="{name}"] td')
        assert len(cells) == len(METRICS)
        for cell, m in zip(cells, METRICS):
            v = values[m]
            text = cell.inner_text()
            assert text == ("n/a" if math.isnan(v) else f"{100 * v:.1f}"), (name, m)
            assert math.isnan(v) or float(cell.get_attribute("data-value")) == v

    # the slider starts at the stored threshold; counts follow it as it moves
    stored = got["image"]["threshold"]
    assert float(page.input_value("#image-threshold")) == stored
    _check_stats(page, got, stored)
    slider = page.locator("#image-slider")
    box = slider.bounding_box()
    for fraction in (0.25, 0.6, 0.9):
        page.mouse.click(box["x"] + fraction * box["width"], box["y"] + box["height"] / 2)
        # the box holds the threshold the page counts with; the slider shows it (a range input
        # writes its value with fewer digits, and a click on the thumb itself moves nothing)
        value = float(page.input_value("#image-threshold"))
        assert float(slider.input_value()) == pytest.approx(value, rel=1e-12)
        _check_stats(page, got, value)
    slider.focus()
    for key in ("Home", "ArrowRight", "End"):
        page.keyboard.press(key)
        _check_stats(page, got, float(slider.input_value()))
    scores = sorted(im["score"] for c in got["classes"] for im in c["images"])
    at = scores[len(scores) // 2]  # typed exactly: the image with that score is flagged
    page.fill("#image-threshold", repr(at))
    _check_stats(page, got, at)

    # a click on a thumbnail shows its heat map, and the pixel slider redraws its mask
    first = got["classes"][0]
    page.click(f'.thumb[data-class="{first["name"]}"][data-index="0"]')
    assert page.is_visible("#detail")
    assert page.get_attribute("#detail-heat", "src") == first["images"][0]["heat"]
    assert page.get_attribute("#detail-image", "src") == first["images"][0]["thumb"]
    page.wait_for_function("document.getElementById('detail-mask').hasAttribute('data-flagged')")
    lo, hi = got["map_range"]
    n_pixels = page.evaluate("(() => { const c = document.getElementById('detail-mask'); return c.width * c.height; })()")
    for value, want in ((lo, n_pixels), (hi + 1.0, 0)):
        page.fill("#pixel-threshold", repr(value))
        page.wait_for_function(f"document.getElementById('detail-mask').getAttribute('data-flagged') === '{want}'")

    # the button prints a predict command that rlr-fast accepts, with the chosen thresholds
    page.fill("#pixel-threshold", repr(got["pixel"]["threshold"]))
    page.click("#command-button")
    command = page.inner_text("#command")
    assert f"--threshold {at!r}" in command and f"--pixel-threshold {got['pixel']['threshold']!r}" in command
    args = shlex.split(command)
    assert args[:2] == ["rlr-fast", "predict"] and args[-1] == "IMAGES..."
    out = tmp_path / "pred"
    assert main([*args[1:-1], str(data / first["name"] / "test" / "good"), "--out", str(out), "--no-progress",
                 "--no-heatmaps"]) == 0
    assert (out / "scores.csv").is_file()
    assert errors == []
    page.close()
