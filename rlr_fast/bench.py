"""Render benchmark results: `python -m rlr_fast.bench report RESULTS.json [--out DIR]`.

RESULTS.json is pytest-benchmark's `--benchmark-json` output of `benchmarks/`. The report is a
markdown file (tables with ratios to the naive path and to SDPA, side by side from the same run)
and a PNG plot of time and memory against grid size (log scale).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from .io import atomic_savefig, atomic_write_text


def _median_s(b) -> float:
    return b["stats"]["median"]


def _mb(x) -> str:
    return "n/a" if x is None else f"{x / 2**20:.0f}"


def _ratio(a, b) -> str:
    return "n/a" if (a is None or b is None or b == 0) else f"{a / b:.2f}x"


def load(path) -> list:
    data = json.loads(Path(path).read_text())
    return data["benchmarks"]


def _header(benches) -> list:
    info = next((b["extra_info"] for b in benches if "device" in b["extra_info"]), {})
    return [f"Device: {info.get('device', '?')}, torch {info.get('torch', '?')}, {info.get('threads', '?')} threads; "
            f"peak memory: {info.get('memory_method', '?')}."]


PROVIDERS = ("triton", "torch", "reference", "sdpa", "sdpa_float", "eager")


def best_sdpa(row: dict):
    """The faster of SDPA with a boolean mask and SDPA with a prebuilt float mask: the baseline."""
    cands = [row[p] for p in ("sdpa", "sdpa_float") if p in row]
    return min(cands, key=_median_s) if cands else None


def ops_table(benches) -> list:
    ops = [b for b in benches if b["extra_info"].get("kind") == "op"]
    if not ops:
        return []
    lines = ["## Ops", "",
             "Time is the median of the rounds; speed-ups are against SDPA and the reference backend "
             "measured in the same run. SDPA gets the dense mask as a boolean (`sdpa`) and as a prebuilt "
             "additive float mask (`sdpa_float`); `vs SDPA` compares with the faster of the two in each row "
             "group (its name in `SDPA baseline`); GFLOP/s counts the useful FLOPs of the masked "
             "problem and `% peak` compares them with this machine's matmul rate in the row's dtype, same run. "
             "bf16 rows take bf16 inputs and compare with SDPA in bf16; `vs reference` is against the "
             "reference backend in fp32.", "",
             "| op | grid | window | batch | mode | dtype | provider | ms | vs SDPA | SDPA baseline | vs reference "
             "| GFLOP/s | % peak | peak MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    groups, references = defaultdict(dict), {}
    for b in ops:
        e = b["extra_info"]
        dtype = e.get("dtype", "fp32")
        groups[(e["op"], e["grid"], e["window"], e["batch"], e["mode"], dtype)][e["provider"]] = b
        if e["provider"] == "reference" and dtype == "fp32":
            references[(e["op"], e["grid"], e["window"], e["batch"], e["mode"])] = b
    order = {"fp32": 0, "bf16": 1}
    for key in sorted(groups, key=lambda k: (k[0], k[1], k[4], order.get(k[5], 9))):
        row = groups[key]
        sdpa, ref = best_sdpa(row), references.get(key[:5])
        for provider in PROVIDERS:
            b = row.get(provider)
            if b is None:
                continue
            e, t = b["extra_info"], _median_s(b)
            gflops = e["flops"] / t / 1e9
            peak = e.get("matmul_peak_gflops")
            cells = [*key, provider, f"{t * 1e3:.1f}",
                     _ratio(_median_s(sdpa), t) if sdpa else "n/a",
                     sdpa["extra_info"]["provider"] if sdpa else "n/a",
                     _ratio(_median_s(ref), t) if ref else "n/a",
                     f"{gflops:.1f}", f"{100 * gflops / peak:.0f}%" if peak else "n/a", _mb(e.get("peak_bytes"))]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    peaks = {}
    for b in ops:
        e = b["extra_info"]
        if e.get("matmul_peak_gflops"):
            peaks.setdefault(e.get("dtype", "fp32"), e["matmul_peak_gflops"])
    if peaks:
        lines += ["", "Matmul rate of this machine in the same run: "
                  + ", ".join(f"{dtype} {rate:.0f} GFLOP/s" for dtype, rate in sorted(
                      peaks.items(), key=lambda kv: order.get(kv[0], 9))) + "."]
    return lines + [""]


def nearest_table(benches) -> list:
    rows = [b for b in benches if b["extra_info"].get("kind") == "nearest"]
    if not rows:
        return []
    lines = ["## nearest_reference", "",
             "Each token's most cosine-similar reference token, against the dense way (normalise, "
             "x @ ref^T, max: all B x N x M scores at once), same run. Ratios are dense over provider.", "",
             "| batch | tokens | refs | C | provider | ms | speed-up | peak MiB | memory ratio | GFLOP/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    groups = defaultdict(dict)
    for b in rows:
        e = b["extra_info"]
        groups[(e["batch"], e["tokens"], e["refs"], e["channels"])][e["provider"]] = b
    for key in sorted(groups):
        row = groups[key]
        dense = row.get("dense")
        for provider in ("triton", "torch", "dense"):
            b = row.get(provider)
            if b is None:
                continue
            e, t = b["extra_info"], _median_s(b)
            speed = _ratio(_median_s(dense), t) if dense else "n/a"
            mem = _ratio(dense["extra_info"].get("peak_bytes"), e.get("peak_bytes")) if dense else "n/a"
            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {provider} | {t * 1e3:.1f} | {speed} | "
                         f"{_mb(e.get('peak_bytes'))} | {mem} | {e['flops'] / t / 1e9:.1f} |")
    return lines + [""]


def models_table(benches) -> list:
    models = [b for b in benches if b["extra_info"].get("kind") == "model"]
    if not models:
        return []
    lines = ["## Models", "", "Fast = backend auto (torch on CPU, triton on CUDA); naive = backend reference "
             "(dense L x L masks). Training steps run on cached features.", "",
             "| model | mode | batch | fast img/s | naive img/s | speed-up | fast peak MiB | naive peak MiB | memory ratio |",
             "|---|---|---|---|---|---|---|---|---|"]
    groups = defaultdict(dict)
    for b in models:
        e = b["extra_info"]
        groups[(e["model"], e["mode"], e["batch"], e["image_size"])][e["path"]] = b
    for (model, mode, batch, size), row in sorted(groups.items()):
        fast, naive = row.get("fast"), row.get("naive")
        ips = lambda b: batch / _median_s(b) if b else None  # noqa: E731
        pk = lambda b: b["extra_info"].get("peak_bytes") if b else None  # noqa: E731
        lines.append(f"| {model} ({size}px) | {mode} | {batch} | {ips(fast) or 0:.2f} | {ips(naive) or 0:.2f} | "
                     f"{_ratio(ips(fast), ips(naive))} | {_mb(pk(fast))} | {_mb(pk(naive))} | "
                     f"{_ratio(pk(naive), pk(fast))} |")
    return lines + [""]


def resad_table(benches) -> list:
    """ResAD on the demo data (benchmarks/test_bench_resad.py): cache, training and test times."""
    rows = [b for b in benches if b["extra_info"].get("kind") == "resad"]
    if not rows:
        return []
    lines = ["## ResAD on the demo data", "", "| step | px | images | median s | images/s | peak MiB |",
             "|---|---|---|---|---|---|"]
    for b in rows:
        e = b["extra_info"]
        lines.append(f"| {e['mode']} | {e['image_size']} | {e['images']} | {_median_s(b):.2f} | "
                     f"{e['images'] / _median_s(b):.1f} | {_mb(e.get('peak_bytes'))} |")
    return lines + [""]


def deploy_table(benches) -> list:
    """Images/s of each deployment engine (benchmarks/test_bench_deploy.py), side by side."""
    deploy = [b for b in benches if b["extra_info"].get("kind") == "deploy"]
    if not deploy:
        return []
    engines = ("eager", "compile", "onnxruntime", "openvino")
    lines = ["## Deployment engines (CPU, fp32)", "",
             "Images/s of the whole model (backbone to score); in brackets, the ratio to eager PyTorch.", "",
             "| input | batch | " + " | ".join(engines) + " |", "|---|---|" + "---|" * len(engines)]
    groups = defaultdict(dict)
    for b in deploy:
        e = b["extra_info"]
        groups[(e["image_size"], e["batch"])][e["engine"]] = e["batch"] / _median_s(b)
    for (size, batch), row in sorted(groups.items()):
        eager = row.get("eager")
        cells = [f"{row[e]:.2f} ({_ratio(row[e], eager)})" if e in row else "n/a" for e in engines]
        lines.append(f"| {size}px | {batch} | " + " | ".join(cells) + " |")
    return lines + [""]


def scaling_rows(benches) -> dict:
    rows = defaultdict(dict)
    for b in benches:
        e = b["extra_info"]
        if e.get("kind") == "scaling":
            rows[e["grid"]][e["path"]] = b
    return dict(sorted(rows.items()))


def scaling_table(benches) -> list:
    rows = scaling_rows(benches)
    if not rows:
        return []
    lines = ["## Scaling", "", "RLR's reconstruction network alone, training step per image. A naive case whose "
             "estimated peak is above 16 GiB is not run: its cells say `out of budget`, and every number "
             "derived from an estimate is marked `(est.)`.", "",
             "| grid | fast ms/img | naive ms/img | speed-up | fast MiB/img | naive MiB/img | memory ratio |",
             "|---|---|---|---|---|---|---|"]
    notes = []
    for grid, row in rows.items():
        fast, naive = row.get("fast"), row.get("naive")
        per = lambda b: _median_s(b) / b["extra_info"]["batch"] * 1e3  # noqa: E731
        mem = lambda b: (b["extra_info"].get("peak_bytes") or 0) / b["extra_info"]["batch"]  # noqa: E731
        oob = naive is not None and naive["extra_info"].get("out_of_budget")
        est = naive["extra_info"].get("estimated_peak_bytes") if naive else None
        est_per = est / naive["extra_info"]["batch"] if est else None
        naive_t = "out of budget" if oob else (f"{per(naive):.1f}" if naive else "n/a")
        naive_m = f"~{_mb(est_per)} (est.)" if oob else (_mb(mem(naive)) if naive else "n/a")
        naive_mem_value = est_per if oob else (mem(naive) if naive else None)
        ratio = _ratio(naive_mem_value, mem(fast)) if fast and mem(fast) and naive_mem_value else "n/a"
        lines.append(f"| {grid} | {per(fast):.1f} | {naive_t} | "
                     f"{'n/a' if oob or not naive else _ratio(per(naive), per(fast))} | {_mb(mem(fast))} | {naive_m} | "
                     f"{ratio}{' (est.)' if oob and ratio != 'n/a' else ''} |")
        how = naive["extra_info"].get("estimate_method") if naive else None
        if est and how:
            measured = "" if oob else f"; measured {_mb(mem(naive))} MiB/img"
            notes.append(f"- grid {grid}: naive estimate {_mb(est_per)} MiB/img ({how}){measured}")
    if notes:
        lines += ["", "Naive peak estimates (per image a * L^2 + b * L through the smaller grids' measured "
                  "peaks, made before each case ran):"] + notes
    return lines + [""]


PARTS = ("backbone", "LCA", "MLKA", "linear + FFN", "LayerNorm", "score map", "other")


def profile_rows(benches) -> list:
    rows = [b for b in benches if b["extra_info"].get("kind") == "profile"]
    order = {"inference": 0, "train": 1, "fp32": 0, "bf16": 1}
    return sorted(rows, key=lambda b: (b["extra_info"]["model"], order.get(b["extra_info"]["mode"], 9),
                                       order.get(b["extra_info"]["precision"], 9)))


def profile_table(benches) -> list:
    rows = profile_rows(benches)
    if not rows:
        return []
    lines = ["## Where the time goes", "",
             "One call profiled with `torch.profiler` (`rlr_fast.profiling.breakdown`): CPU time per part in "
             "ms and its share of the parts' sum. bf16 runs under autocast. img/s is from the timed rounds of "
             "the same case; `vs fp32` is the bf16 case's img/s over the fp32 case's, same run.", "",
             "| model | mode | precision | batch | img/s | vs fp32 | " + " | ".join(PARTS) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(PARTS)]
    fp32 = {(b["extra_info"]["model"], b["extra_info"]["mode"]): b for b in rows
            if b["extra_info"]["precision"] == "fp32"}
    for b in rows:
        e = b["extra_info"]
        parts = e["parts"]
        total = sum(parts.values()) or 1.0
        ips = e["batch"] / _median_s(b)
        base = fp32.get((e["model"], e["mode"]))
        vs = _ratio(ips, e["batch"] / _median_s(base)) if base is not None and base is not b else "-"
        cells = [f"{parts.get(p, 0) * 1e3:.0f} ({100 * parts.get(p, 0) / total:.0f}%)" for p in PARTS]
        lines.append(f"| {e['model']} ({e['image_size']}px) | {e['mode']} | {e['precision']} | {e['batch']} | "
                     f"{ips:.2f} | {vs} | " + " | ".join(cells) + " |")
    return lines + [""]


def plot_profile(benches, path: Path) -> bool:
    rows = profile_rows(benches)
    if not rows:
        return False
    import matplotlib
    from matplotlib.figure import Figure

    labels = [f"{b['extra_info']['mode']} {b['extra_info']['precision']}" for b in rows]
    fig = Figure(figsize=(10, 0.6 * len(rows) + 1.8))
    ax = fig.subplots()
    left = [0.0] * len(rows)
    colors = matplotlib.colormaps["tab10"].colors
    for i, part in enumerate(PARTS):
        widths = [b["extra_info"]["parts"].get(part, 0) * 1e3 / b["extra_info"]["batch"] for b in rows]
        ax.barh(labels, widths, left=left, color=colors[i % len(colors)], label=part)
        left = [a + w for a, w in zip(left, widths)]
    ax.invert_yaxis()
    ax.set_xlabel("ms per image")
    ax.set_title("RLRModel: where the time goes")
    ax.legend(ncol=len(PARTS), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.3), frameon=False)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_savefig(fig, path, dpi=110)
    return True


def plot(benches, path: Path) -> bool:
    rows = scaling_rows(benches)
    if not rows:
        return False
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    ax_t, ax_m = fig.subplots(1, 2)
    for name, style in (("fast", "o-"), ("naive", "s--")):
        pts = [(g, r[name]) for g, r in rows.items() if name in r and not r[name]["extra_info"].get("out_of_budget")]
        if not pts:
            continue
        grids = [g for g, _ in pts]
        ax_t.plot(grids, [_median_s(b) / b["extra_info"]["batch"] * 1e3 for _, b in pts], style, label=name)
        ax_m.plot(grids, [max(1, (b["extra_info"].get("peak_bytes") or 0)) / b["extra_info"]["batch"] / 2**20
                          for _, b in pts], style, label=name)
        est = [(g, r[name]["extra_info"]["estimated_peak_bytes"] / r[name]["extra_info"]["batch"] / 2**20)
               for g, r in rows.items() if name in r and r[name]["extra_info"].get("out_of_budget")]
        if est:
            ax_m.plot(*zip(*est), "x", color="gray", label=f"{name}: estimate, over 16 GiB")
    for ax, title in ((ax_t, "training step time per image (ms)"), (ax_m, "peak memory per image (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("grid side (tokens)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_savefig(fig, path, dpi=110)
    return True


def report(results, out: Path) -> str:
    benches = load(results)
    md = ["# rlr-fast benchmarks", ""] + _header(benches) + [""]
    md += (ops_table(benches) + nearest_table(benches) + models_table(benches) + deploy_table(benches)
           + resad_table(benches) + profile_table(benches))
    if plot_profile(benches, out / "profile.png"):
        md += ["![time per image by part](profile.png)", ""]
    md += scaling_table(benches)
    if plot(benches, out / "scaling.png"):
        md += ["![time and memory against grid size](scaling.png)", ""]
    text = "\n".join(md)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "benchmarks.md", text)
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlr_fast.bench")
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="render pytest-benchmark JSON to markdown and a plot")
    rep.add_argument("results", type=Path)
    rep.add_argument("--out", type=Path, default=Path("."), help="folder for benchmarks.md and scaling.png")
    args = parser.parse_args(argv)
    if not args.results.is_file():
        print(f"no such results file: {args.results}", file=sys.stderr)
        return 2
    print(report(args.results, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
