"""The test report page: ``RUN/report.html``, one self-contained file written by ``rlr-fast test``
(and ``rlr-fast demo``) that a person opens offline to choose an operating point.

What it holds, all inline (no server, no network, no framework; a small script of this module):

- the per-class metrics table (the values of ``metrics.json``), drawn here as HTML;
- per class, the image ROC curve and the pixel PRO curve (up to FPR 0.3, the AUPRO range) as SVG;
- per class, every test image as a small JPEG thumbnail sorted by score, with its label, defect
  type and score; a click opens its heat map, ground-truth mask and predicted mask;
- an image-threshold slider, starting at the stored F1-optimal threshold, that recolours the
  flagged images and updates counts, precision, recall, F1 and FPR live (the rule of
  :func:`rlr_fast.decisions.decision_counts`: ``score >= threshold``), and a pixel-threshold
  slider that redraws the predicted mask shown;
- a button printing the ``rlr-fast predict --threshold T --pixel-threshold P`` command for the
  chosen thresholds.

Memory: the page is built from what it shows, gathered by a :class:`ReportCollector` as the
evaluation sees each image (``evaluation.evaluate(report=...)``, in its exact and binned paths):
per image its score, label, defect type and file name, a JPEG thumbnail, its anomaly map at
thumbnail size quantised to 8 bits over the map's own range (grey PNG, with that range) and the
ground-truth mask (1-bit PNG). Nothing of full size is kept, so the binned evaluation's memory
grows only by these few kB per image (the page itself holds them). The curves are those the
evaluation computes anyway: the image ROC from the scores, the PRO curve from the exact pixels or
from the binned histograms, resampled to ``curve_points`` points when handed over.

Size: per image a thumbnail and a heat map (JPEG, the heat map drawn at the end over the class's
map range), the 8-bit map (the pixel slider thresholds it in the page, so a predicted mask there
is exact to half a quantum of the image's map range, at thumbnail resolution) and the mask, about
10 kB with ``thumb_size`` 96 (see the README for measured sizes).

The page records the fingerprint of the model it was made from (``rlr_fast.runs``), in a
``<meta name="rlr-fast-fingerprint">`` tag (:func:`read_fingerprint`) and in its header.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from .metrics import METRICS

__all__ = ["ReportConfig", "ReportCollector", "build_report", "write_report", "read_fingerprint"]

METRIC_NAMES = {"image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC", "pixel_aupro": "pixel AUPRO",
                "image_f1max": "image F1-max"}
PRO_MAX_FPR = 0.3  # the FPR range pixel AUPRO integrates over (rlr_fast.metrics.pixel_aupro)


@dataclass
class ReportConfig:
    thumb_size: int = 96  # px of the longer side of thumbnails, heat maps and masks (never upscaled)
    jpeg_quality: int = 75
    curve_points: int = 150  # points of a drawn PRO curve (the ROC of images is drawn whole)


# ------------------------------------------------------------------------------------ pictures
def _encode(image, fmt: str, **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save)
    return buf.getvalue()


def _data_uri(data: bytes, fmt: str) -> str:
    mime = "image/jpeg" if fmt == "JPEG" else "image/png"
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def _resize_float(m: np.ndarray, size) -> np.ndarray:
    """A float map (H, W) resized bilinearly to ``size`` (w, h)."""
    from PIL import Image

    return np.asarray(Image.fromarray(m.astype(np.float32), mode="F").resize(size, Image.BILINEAR))


@dataclass
class _Shown:
    """One test image as the page shows it: a few numbers and a few kB of encoded pictures."""

    name: str
    defect: str
    label: int
    score: float
    thumb: bytes  # JPEG (h', w', 3)
    map: bytes  # grey PNG (h', w'): the map at thumbnail size, 0..255 over [lo, hi]
    lo: float
    hi: float
    mask: Optional[bytes]  # 1-bit PNG (h', w'); None when the image has no defect pixel


@dataclass
class _ClassShown:
    images: List[_Shown] = field(default_factory=list)
    lo: float = math.inf  # range of the class's full-size maps: the heat maps' colour scale
    hi: float = -math.inf
    pro: Optional[tuple] = None  # (fpr grid, pro) resampled to curve_points, or None (n/a)


class ReportCollector:
    """Gathers what the page shows as the evaluation sees each image (``add``) and each class's
    PRO curve (``set_pro``); :func:`build_report` makes the page from it. Per image it keeps only
    thumbnail-sized encoded pictures and a few numbers (about 10 kB at ``thumb_size`` 96)."""

    def __init__(self, config: Optional[ReportConfig] = None):
        self.config = config or ReportConfig()
        self.classes: Dict[str, _ClassShown] = {}

    def _cls(self, cls: str) -> _ClassShown:
        return self.classes.setdefault(cls, _ClassShown())

    def add(self, cls: str, image, mask, amap, score: float, label: int, defect: str, path) -> None:
        """One test image: ``image`` a normalised (3, H, W) tensor or (H, W, 3) uint8 array,
        ``mask`` (H, W) ground truth, ``amap`` (H, W) anomaly map; only thumbnails are kept."""
        from PIL import Image

        from .data import denormalize

        cfg, rec = self.config, self._cls(cls)
        rgb = denormalize(image) if hasattr(image, "detach") else np.asarray(image, dtype=np.uint8)  # (H, W, 3)
        amap = np.asarray(amap, dtype=np.float32)
        amap = amap.reshape(amap.shape[-2:])  # (H, W)
        rec.lo, rec.hi = min(rec.lo, float(amap.min())), max(rec.hi, float(amap.max()))
        h, w = rgb.shape[:2]
        scale = min(1.0, cfg.thumb_size / max(h, w))
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        thumb = Image.fromarray(rgb).resize(size, Image.BILINEAR)
        small = _resize_float(amap, size)  # (h', w')
        lo, hi = float(small.min()), float(small.max())
        quantised = np.clip(np.round((small - lo) / max(hi - lo, 1e-12) * 255), 0, 255).astype(np.uint8)
        mask = np.asarray(mask).reshape(np.shape(mask)[-2:]) > 0.5
        gt = None
        if mask.any():
            gt = _encode(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.NEAREST).convert("1"), "PNG",
                         optimize=True)
        rec.images.append(_Shown(Path(path).name, defect, int(label), float(score),
                                 _encode(thumb, "JPEG", quality=cfg.jpeg_quality, optimize=True),
                                 _encode(Image.fromarray(quantised), "PNG", optimize=True), lo, hi, gt))

    def set_pro(self, cls: str, curve) -> None:
        """The class's pixel PRO curve, ``(fpr, pro)`` ascending in fpr (``metrics.pro_curve`` or
        ``PixelHistograms.pro_curve``), or None when undefined; kept as ``curve_points`` points
        on [0, PRO_MAX_FPR]."""
        if curve is None:
            self._cls(cls).pro = None
            return
        fpr, pro = curve
        grid = np.linspace(0.0, PRO_MAX_FPR, self.config.curve_points)
        self._cls(cls).pro = (grid, np.interp(grid, fpr, pro))


def _heat(shown: _Shown, heat_range, quality: int) -> bytes:
    """The heat-map overlay (JPEG) of one image: its thumbnail half-blended with the jet colours
    of its (dequantised) small map over the class's range."""
    from matplotlib import colormaps
    from PIL import Image

    thumb = np.asarray(Image.open(io.BytesIO(shown.thumb)).convert("RGB"), dtype=np.float32)  # (h', w', 3)
    q = np.asarray(Image.open(io.BytesIO(shown.map)), dtype=np.float32)  # (h', w')
    small = shown.lo + q / 255 * (shown.hi - shown.lo)
    lo, hi = heat_range
    colours = colormaps["jet"](np.clip((small - lo) / max(hi - lo, 1e-12), 0, 1))[..., :3]
    heat = (0.5 * thumb + 0.5 * 255 * colours).round().astype(np.uint8)
    return _encode(Image.fromarray(heat), "JPEG", quality=quality, optimize=True)


# -------------------------------------------------------------------------------------- curves
_W, _H, _L, _T = 200, 160, 36, 10  # plot area and its left/top margins (the page's script uses them too)


def _svg_curve(x: np.ndarray, y: np.ndarray, xmax: float, xlabel: str, ylabel: str, title: str,
               diagonal: bool = False, dot_id: Optional[str] = None) -> str:
    """A line plot of y (0..1) against x (0..xmax) as inline SVG, with axes and ticks."""
    px = lambda v: _L + v / xmax * _W
    py = lambda v: _T + (1 - v) * _H
    pts = " ".join(f"{px(a):.1f},{py(b):.1f}" for a, b in zip(x, y))
    ticks = []
    for f in (0, 0.5, 1):
        ticks.append(f'<text x="{px(f * xmax):.1f}" y="{_T + _H + 14}" text-anchor="middle">{f * xmax:g}</text>')
        ticks.append(f'<text x="{_L - 4}" y="{py(f) + 4:.1f}" text-anchor="end">{f:g}</text>')
    extra = f'<line x1="{px(0)}" y1="{py(0)}" x2="{px(xmax)}" y2="{py(1)}" class="diag"/>' if diagonal else ""
    dot = (f'<circle id="{dot_id}" r="4" class="dot" cx="-10" cy="-10"/>') if dot_id else ""
    return (f'<svg class="curve" width="{_L + _W + 10}" height="{_T + _H + 34}" data-xmax="{xmax}" '
            f'role="img" aria-label="{html.escape(title)}"><title>{html.escape(title)}</title>'
            f'<rect x="{_L}" y="{_T}" width="{_W}" height="{_H}" class="frame"/>{extra}'
            f'<polyline points="{pts}" class="line"/>{dot}{"".join(ticks)}'
            f'<text x="{_L + _W / 2}" y="{_T + _H + 30}" text-anchor="middle">{html.escape(xlabel)}</text>'
            f'<text x="10" y="{_T + _H / 2}" text-anchor="middle" transform="rotate(-90 10 {_T + _H / 2})">'
            f'{html.escape(ylabel)}</text></svg>')


def _curves(index: int, name: str, rec: _ClassShown) -> str:
    """The class's image ROC (exact, from its scores) and pixel PRO curve (as the evaluation gave it)."""
    from sklearn.metrics import roc_curve

    labels = np.array([im.label for im in rec.images], dtype=int)
    parts = []
    if labels.size and labels.min() != labels.max():
        fpr, tpr, _ = roc_curve(labels, np.array([im.score for im in rec.images], dtype=np.float64))
        parts.append(_svg_curve(fpr, tpr, 1.0, "false-positive rate", "true-positive rate", f"{name}: image ROC",
                                diagonal=True, dot_id=f"roc-dot-{index}"))
    else:
        parts.append('<p class="na">image ROC: n/a (one label only)</p>')
    if rec.pro is not None:
        grid, pro = rec.pro
        parts.append(_svg_curve(grid, pro, PRO_MAX_FPR, "false-positive rate (pixels)",
                                "per-region overlap", f"{name}: pixel PRO"))
    else:
        parts.append('<p class="na">pixel PRO: n/a (needs defect regions and normal pixels)</p>')
    return "".join(parts)


# ---------------------------------------------------------------------------------------- page
def _cell(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return '<td data-value="nan">n/a</td>'
    return f'<td data-value="{float(v)!r}">{100 * float(v):.1f}</td>'


def _metrics_table(summary: dict) -> str:
    head = "".join(f"<th>{METRIC_NAMES[m]}</th>" for m in METRICS)
    rows = []
    for name, values in summary["classes"].items():
        rows.append(f'<tr data-class="{html.escape(name)}"><th>{html.escape(name)}</th>'
                    + "".join(_cell(values[m]) for m in METRICS) + "</tr>")
        for kind, t in (summary.get("types") or {}).get(name, {}).items():
            rows.append(f'<tr class="type" data-class="{html.escape(name)}" data-type="{html.escape(kind)}">'
                        f'<th>&nbsp;&nbsp;{html.escape(kind)}</th>' + "".join(_cell(t[m]) for m in METRICS) + "</tr>")
    rows.append('<tr class="mean" data-class="mean"><th>mean</th>'
                + "".join(_cell(summary["mean"][m]) for m in METRICS) + "</tr>")
    return f'<table id="metrics"><thead><tr><th>class</th>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _threshold_record(t) -> dict:
    nan = lambda v: None if v is None or math.isnan(v) else float(v)
    return {"threshold": float(t.threshold), "min": nan(t.min), "max": nan(t.max)}


def build_report(summary: dict, collected: ReportCollector, thresholds, fingerprint: Optional[str],
                 run: str = "RUN", title: str = "rlr-fast test report") -> str:
    """The page as a string. ``summary`` is what ``evaluate`` returns (its "classes", "mean" and
    optional "types" are the metrics table), ``collected`` the :class:`ReportCollector` the
    evaluation filled, ``thresholds`` the stored :class:`~rlr_fast.decisions.Thresholds` the
    sliders start at, ``run`` the run folder named in the predict command."""
    cfg = collected.config
    names = [c for c in summary["classes"] if c in collected.classes and collected.classes[c].images]
    if not names:
        raise ValueError("a report needs the images of at least one class")
    map_range = (min(collected.classes[c].lo for c in names), max(collected.classes[c].hi for c in names))
    classes, curves = [], []
    for index, name in enumerate(names):
        rec = collected.classes[name]
        images = []
        for im in sorted(rec.images, key=lambda im: -im.score):  # stable: ties in test order
            images.append({"name": im.name, "defect": im.defect, "label": im.label, "score": im.score,
                           "thumb": _data_uri(im.thumb, "JPEG"),
                           "heat": _data_uri(_heat(im, (rec.lo, rec.hi), cfg.jpeg_quality), "JPEG"),
                           "map": _data_uri(im.map, "PNG"), "lo": im.lo, "hi": im.hi,
                           "mask": _data_uri(im.mask, "PNG") if im.mask is not None else None})
        classes.append({"name": name, "images": images})
        curves.append(f'<div class="curves" data-class="{html.escape(name)}"><h3>{html.escape(name)}</h3>'
                      f'{_curves(index, name, rec)}</div>')
    data = {"title": title, "fingerprint": fingerprint, "run": str(run), "map_range": list(map_range),
            "image": _threshold_record(thresholds.image), "pixel": _threshold_record(thresholds.pixel),
            "plot": {"left": _L, "top": _T, "width": _W, "height": _H}, "classes": classes}
    payload = json.dumps(data, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    fp = html.escape(fingerprint or "not recorded")
    return _PAGE.format(title=html.escape(title), fingerprint=fp, run=html.escape(str(run)),
                        metrics=_metrics_table(summary), curves="".join(curves), data=payload,
                        style=_STYLE, script=_SCRIPT)


def write_report(path, summary: dict, collected: ReportCollector, thresholds, fingerprint: Optional[str],
                 run: str = "RUN", title: str = "rlr-fast test report") -> Path:
    """Write the page (atomically) to ``path``; returns the path."""
    from .io import atomic_write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, build_report(summary, collected, thresholds, fingerprint, run, title))
    return path


def read_fingerprint(path) -> Optional[str]:
    """The model fingerprint a report page records (None: none recorded or not a report)."""
    try:
        head = Path(path).read_text(errors="replace")[:4096]
    except OSError:
        return None
    found = re.search(r'<meta name="rlr-fast-fingerprint" content="([0-9a-f]+)"', head)
    return found.group(1) if found else None


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="rlr-fast-fingerprint" content="{fingerprint}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title><style>{style}</style></head>
<body>
<header><h1>{title}</h1><p>run <code>{run}</code> &middot; model fingerprint <code>{fingerprint}</code></p></header>
<section><h2>Metrics (%)</h2>{metrics}</section>
<section id="decide"><h2>Operating point</h2>
<div class="slider"><label for="image-slider">image threshold</label>
<input type="range" id="image-slider"><input type="number" id="image-threshold" step="any">
<button id="image-reset" type="button">F1-optimal</button></div>
<div class="slider"><label for="pixel-slider">pixel threshold</label>
<input type="range" id="pixel-slider"><input type="number" id="pixel-threshold" step="any">
<button id="pixel-reset" type="button">F1-optimal</button></div>
<table id="stats"><thead><tr><th>class</th><th>flagged</th><th>TP</th><th>FP</th><th>TN</th><th>FN</th>
<th>precision</th><th>recall</th><th>F1</th><th>FPR</th></tr></thead><tbody></tbody></table>
<p><button id="command-button" type="button">predict command for these thresholds</button></p>
<pre id="command" hidden></pre>
<p class="note">An image is flagged when its score is at or above the image threshold; a pixel when its
anomaly map is at or above the pixel threshold (masks here are drawn at thumbnail size from an 8-bit map).
Red frame: flagged; green: passed; a cross marks a wrong decision.</p></section>
<section><h2>Curves</h2><div id="curves">{curves}</div></section>
<section><h2>Test images, by score</h2><div id="grids"></div></section>
<aside id="detail" hidden><button id="detail-close" type="button">close</button>
<p id="detail-title"></p>
<div class="panels"><figure><img id="detail-image" alt="image"><figcaption>image</figcaption></figure>
<figure><img id="detail-heat" alt="heat map"><figcaption>heat map</figcaption></figure>
<figure><img id="detail-gt" alt="ground truth"><figcaption>ground truth</figcaption></figure>
<figure><canvas id="detail-mask"></canvas><figcaption>predicted mask</figcaption></figure></div></aside>
<script type="application/json" id="report-data">{data}</script>
<script>{script}</script>
</body></html>
"""

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1em 2em;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.4em}h3{font-size:1em;margin:.2em 0}
table{border-collapse:collapse}td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right}
th:first-child{text-align:left}tr.mean{font-weight:bold}tr.type{color:#555}
.slider{display:flex;gap:.6em;align-items:center;margin:.3em 0}.slider label{width:8em}
.slider input[type=range]{width:24em}.slider input[type=number]{width:8em}
#curves{display:flex;flex-wrap:wrap;gap:1.5em}.curves{display:flex;gap:.5em;flex-wrap:wrap;align-items:flex-start}
svg.curve text{font-size:10px;fill:#444}svg .frame{fill:none;stroke:#999}svg .diag{stroke:#ccc;stroke-dasharray:3}
svg .line{fill:none;stroke:#1565c0;stroke-width:1.5}svg .dot{fill:#d32f2f}
.grid{display:flex;flex-wrap:wrap;gap:6px}.thumb{margin:0;width:100px;cursor:pointer;position:relative}
.thumb img{width:96px;height:96px;object-fit:contain;border:2px solid #2e7d32;display:block}
.thumb.flagged img{border-color:#d32f2f}.thumb figcaption{font-size:11px;line-height:1.2;white-space:pre-line}
.thumb.wrong::after{content:"\\2716";position:absolute;top:2px;right:6px;color:#fff;background:#000a;padding:0 2px;font-size:11px}
.thumb.open img{outline:3px solid #1565c0}
#detail{position:fixed;right:1em;bottom:1em;background:#fff;border:1px solid #888;padding:.6em;box-shadow:0 2px 10px #0004}
#detail .panels{display:flex;gap:.5em}#detail figure{margin:0;text-align:center}
#detail img,#detail canvas{width:192px;height:192px;object-fit:contain;image-rendering:pixelated;background:#000}
pre{background:#f4f4f4;padding:.5em;white-space:pre-wrap}.note{color:#555;font-size:12px}.na{color:#777}
"""

_SCRIPT = r"""
(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("report-data").textContent);
  var $ = function (id) { return document.getElementById(id); };
  var state = { t: D.image.threshold, p: D.pixel.threshold, open: null };
  var maps = {};  // "class/index" -> {w, h, q: Uint8ClampedArray} once decoded

  // the rule of rlr_fast.decisions.decision_counts: flagged when score >= threshold
  function counts(images, t) {
    var c = { tp: 0, fp: 0, tn: 0, fn: 0 };
    images.forEach(function (im) {
      var f = im.score >= t;
      if (f && im.label) c.tp++; else if (f) c.fp++; else if (im.label) c.fn++; else c.tn++;
    });
    var r = function (a, b) { return b ? a / b : NaN; };
    c.precision = r(c.tp, c.tp + c.fp); c.recall = r(c.tp, c.tp + c.fn); c.fpr = r(c.fp, c.fp + c.tn);
    c.f1 = (isNaN(c.precision) || isNaN(c.recall)) ? NaN
      : (c.precision + c.recall ? 2 * c.precision * c.recall / (c.precision + c.recall) : 0);
    c.flagged = c.tp + c.fp;
    return c;
  }
  function fmt(v) { return isNaN(v) ? "n/a" : v.toFixed(3); }
  function el(tag, attrs, text) {
    var e = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function setupSlider(kind, rec, range) {
    var slider = $(kind + "-slider"), box = $(kind + "-threshold");
    var lo = Math.min(range[0], rec.threshold), hi = Math.max(range[1], rec.threshold);
    // step "any": the stored threshold sits exactly on the slider (a step grid from lo would snap
    // it to another value than the box shows, until the slider first moves)
    slider.min = lo; slider.max = hi; slider.step = "any";
    var set = function (v) { state[kind === "image" ? "t" : "p"] = v; update(); };
    slider.value = rec.threshold; box.value = String(rec.threshold);
    slider.addEventListener("input", function () { box.value = slider.value; set(parseFloat(slider.value)); });
    box.addEventListener("input", function () {
      var v = parseFloat(box.value);
      if (isFinite(v)) { slider.value = v; set(v); }
    });
    $(kind + "-reset").addEventListener("click", function () {
      slider.value = rec.threshold; box.value = String(rec.threshold); set(rec.threshold);
    });
  }

  function buildStats() {
    var body = document.querySelector("#stats tbody");
    D.classes.map(function (c) { return c.name; }).concat(["all"]).forEach(function (name) {
      var tr = el("tr", { "data-class": name });
      tr.appendChild(el("th", {}, name));
      ["flagged", "tp", "fp", "tn", "fn", "precision", "recall", "f1", "fpr"].forEach(function (k) {
        tr.appendChild(el("td", { "data-k": k }));
      });
      body.appendChild(tr);
    });
  }

  function buildGrids() {
    var root = $("grids");
    D.classes.forEach(function (c, ci) {
      root.appendChild(el("h3", {}, c.name + " (" + c.images.length + " images)"));
      var grid = el("div", { "class": "grid", "data-class": c.name });
      c.images.forEach(function (im, i) {
        var fig = el("figure", { "class": "thumb", "data-class": c.name, "data-index": String(i),
          title: im.name + ": " + (im.label ? "anomalous" : "normal") + ", " + im.defect + ", score " + im.score });
        fig.appendChild(el("img", { src: im.thumb, alt: im.name }));
        fig.appendChild(el("figcaption", {}, im.score.toPrecision(4) + "\n" + (im.label ? "anomalous: " + im.defect
          : "normal" + (im.defect === "good" ? "" : ": " + im.defect))));
        fig.addEventListener("click", function () { openDetail(ci, i); });
        grid.appendChild(fig);
        im.node = fig;
      });
      root.appendChild(grid);
    });
  }

  function rocDot(ci, c) {
    var dot = $("roc-dot-" + ci);
    if (!dot || isNaN(c.fpr) || isNaN(c.recall)) return;
    var P = D.plot;
    dot.setAttribute("cx", P.left + c.fpr * P.width);
    dot.setAttribute("cy", P.top + (1 - c.recall) * P.height);
  }

  function update() {
    var all = [];
    D.classes.forEach(function (c, ci) {
      c.images.forEach(function (im) {
        var f = im.score >= state.t;
        im.node.classList.toggle("flagged", f);
        im.node.classList.toggle("wrong", f !== Boolean(im.label));
      });
      all = all.concat(c.images);
      var k = counts(c.images, state.t);
      fill(c.name, k); rocDot(ci, k);
    });
    fill("all", counts(all, state.t));
    if (state.open) drawMask();
    if (!$("command").hidden) showCommand();
  }
  function fill(name, c) {
    var row = document.querySelector('#stats tr[data-class="' + CSS.escape(name) + '"]');
    row.querySelectorAll("td").forEach(function (td) {
      var k = td.getAttribute("data-k"), v = c[k];
      td.textContent = (k === "precision" || k === "recall" || k === "f1" || k === "fpr") ? fmt(v) : String(v);
    });
  }

  function openDetail(ci, i) {
    var im = D.classes[ci].images[i];
    if (state.open) state.open.node.classList.remove("open");
    state.open = im; state.openKey = ci + "/" + i;
    im.node.classList.add("open");
    $("detail-title").textContent = D.classes[ci].name + " / " + im.name + ": " + (im.label ? "anomalous" : "normal")
      + " (" + im.defect + "), score " + im.score;
    $("detail-image").src = im.thumb;
    $("detail-heat").src = im.heat;
    var gt = $("detail-gt");
    if (im.mask) { gt.src = im.mask; gt.style.visibility = "visible"; } else { gt.removeAttribute("src"); gt.style.visibility = "hidden"; }
    $("detail").hidden = false;
    drawMask();
  }

  function drawMask() {
    var im = state.open, key = state.openKey;
    var cached = maps[key];
    if (!cached) {
      var img = new Image();
      img.onload = function () {
        var cv = document.createElement("canvas"); cv.width = img.width; cv.height = img.height;
        var ctx = cv.getContext("2d"); ctx.drawImage(img, 0, 0);
        var px = ctx.getImageData(0, 0, img.width, img.height).data, q = new Uint8ClampedArray(img.width * img.height);
        for (var j = 0; j < q.length; j++) q[j] = px[4 * j];
        maps[key] = { w: img.width, h: img.height, q: q };
        if (state.openKey === key) drawMask();
      };
      img.src = im.map;
      return;
    }
    var base = new Image();
    base.onload = function () {
      if (state.openKey !== key) return;
      var cv = $("detail-mask"); cv.width = cached.w; cv.height = cached.h;
      var ctx = cv.getContext("2d"); ctx.drawImage(base, 0, 0, cached.w, cached.h);
      var out = ctx.getImageData(0, 0, cached.w, cached.h), d = out.data;
      var lo = im.lo, hi = im.hi;  // the 8-bit map spans the image's own map range
      var level = hi > lo ? (state.p - lo) / (hi - lo) * 255 : (state.p <= lo ? -1 : 256);
      var flagged = 0;
      for (var j = 0; j < cached.q.length; j++) {
        if (cached.q[j] >= level) {
          flagged++;
          d[4 * j] = Math.round(0.4 * d[4 * j] + 0.6 * 255); d[4 * j + 1] = Math.round(0.4 * d[4 * j + 1]);
          d[4 * j + 2] = Math.round(0.4 * d[4 * j + 2]);
        }
      }
      ctx.putImageData(out, 0, 0);
      cv.setAttribute("data-flagged", String(flagged));
    };
    base.src = im.thumb;
  }

  function showCommand() {
    var cmd = "rlr-fast predict --run " + JSON.stringify(D.run).slice(1, -1).replace(/ /g, "\\ ")
      + " --threshold " + String(state.t) + " --pixel-threshold " + String(state.p) + " IMAGES...";
    var pre = $("command"); pre.textContent = cmd; pre.hidden = false;
    return cmd;
  }

  buildStats();
  buildGrids();
  setupSlider("image", D.image, [Math.min.apply(null, allScores()), Math.max.apply(null, allScores())]);
  setupSlider("pixel", D.pixel, D.map_range);
  $("command-button").addEventListener("click", function () {
    var cmd = showCommand();
    if (navigator.clipboard && window.isSecureContext) navigator.clipboard.writeText(cmd).catch(function () {});
  });
  $("detail-close").addEventListener("click", function () {
    $("detail").hidden = true;
    if (state.open) state.open.node.classList.remove("open");
    state.open = null; state.openKey = null;
  });
  update();

  function allScores() {
    var s = [];
    D.classes.forEach(function (c) { c.images.forEach(function (im) { s.push(im.score); }); });
    return s;
  }
})();
"""
