"""Peak resident memory of `rlr-fast test` at several test-set sizes (issue 19 part 2).

Writes synthetic test sets of N images (the demo data's photographs with synthetic defects, one
class, half of them defective, at --data-size px) to disk, trains one small run on one of them, then
runs `rlr-fast test` on each set in its own process under ``/usr/bin/time -v`` and records:

- ``max_rss_kb``: GNU time's "Maximum resident set size", the peak of the largest process of the
  test (the main process; its data-loader workers are smaller forks of it);
- ``tree_rss_kb``: the peak of the summed RSS of the test process and all its descendants,
  sampled every 0.2 s from /proc (data-loader workers included; a sampled peak, so a lower bound);
- the pixel metrics path used ("exact" or "binned (N bins)"), the metrics, the size of the report
  page `test` writes (``report_bytes``: its thumbnails are all the evaluation keeps per image
  beyond a few numbers) and the command.

    python benchmarks/eval_memory.py --work /tmp/evalmem --sizes 500,5000 \\
        --out benchmarks/results/eval-memory.json [--exact-at 500] [--train-args "..."]

Memory only: nothing here is timed. ``--exact-at`` also measures `--exact-metrics` at these sizes,
for comparison (the exact path holds every map: keep those sizes small).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from rlr_fast.demo_data import build_demo_dataset
from rlr_fast.io import atomic_write_json

TRAIN_ARGS = "--epochs 1 --backbone-weights random --batch-size 4 --val-fraction 0 --no-progress"


def _children(pid: int) -> list:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:  # fields[1]: the parent pid
            kids.append(int(stat.parent.name))
    return kids


def _tree_rss_kb(pid: int) -> int:
    """Summed RSS (kB) of a process and its descendants, from /proc (0 for gone processes)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
        todo += _children(p)
    return total


def measure(argv: list, env: dict) -> dict:
    """Run ``argv`` under /usr/bin/time -v: its max RSS, the sampled tree peak, its output."""
    proc = subprocess.Popen(["/usr/bin/time", "-v", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    peak = [0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_rss_kb(proc.pid))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} failed ({proc.returncode}):\n{err[-3000:]}")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", err)
    return {"max_rss_kb": int(rss.group(1)), "tree_rss_kb": peak[0], "stdout": out}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", required=True, type=Path, help="scratch folder: data sets, the run, test outputs")
    p.add_argument("--sizes", default="500,5000", help="test-set sizes (images)")
    p.add_argument("--exact-at", default="", help="sizes also measured with --exact-metrics")
    p.add_argument("--data-size", type=int, default=256, help="side of the images written to disk")
    p.add_argument("--image-size", type=int, default=256, help="the model's input side (train --image-size)")
    p.add_argument("--train-args", default=TRAIN_ARGS)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    exact_at = [int(s) for s in args.exact_at.split(",") if s]
    exe = [sys.executable, "-m", "rlr_fast"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    roots = {}
    for n in sorted(set(sizes + exact_at)):
        roots[n] = build_demo_dataset(args.work / f"data-{n}", classes=("brick",), image_size=args.data_size,
                                      n_train=16, n_test_good=n - n // 2, n_test_defect=n // 2)
        print(f"data: {n} test images at {args.data_size} px in {roots[n]}", flush=True)
    run = args.work / "run"
    if not (run / "checkpoint.pt").is_file():
        subprocess.run([*exe, "train", "--data", str(roots[min(roots)]), "--out", str(run), "--force",
                        "--image-size", str(args.image_size), *shlex.split(args.train_args)], check=True, env=env)
    record = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "data_size": args.data_size,
              "image_size": args.image_size, "train_args": args.train_args, "runs": []}
    for n, exact in [(n, False) for n in sizes] + [(n, True) for n in exact_at]:
        name = f"{n}{'-exact' if exact else ''}"
        cmd = [*exe, "test", "--data", str(roots[n]), "--run", str(run),
               "--json", str(args.work / f"metrics-{name}.json"),
               "--overlays", str(args.work / f"overlays-{name}"), "--report", str(args.work / f"report-{name}.html"),
               "--batch-size", str(args.batch_size), "--no-progress",
               *(["--exact-metrics"] if exact else [])]
        result = measure(cmd, env)
        metrics = json.loads((args.work / f"metrics-{name}.json").read_text())
        row = {"images": n, "exact_metrics_flag": exact, "pixel_metrics": metrics.get("pixel_metrics"),
               "max_rss_kb": result["max_rss_kb"], "tree_rss_kb": result["tree_rss_kb"],
               "report_bytes": (args.work / f"report-{name}.html").stat().st_size,
               "mean": metrics["mean"], "command": shlex.join(["/usr/bin/time", "-v", *cmd])}
        record["runs"].append(row)
        print(f"{name}: {row['pixel_metrics']}, max RSS {row['max_rss_kb'] / 1024:.0f} MiB, "
              f"process tree {row['tree_rss_kb'] / 1024:.0f} MiB", flush=True)
        atomic_write_json(args.out, record)
    binned = {r["images"]: r for r in record["runs"] if not r["exact_metrics_flag"]}
    if len(sizes) >= 2:
        lo, hi = binned[min(sizes)], binned[max(sizes)]
        record["ratio_max_rss"] = hi["max_rss_kb"] / lo["max_rss_kb"]
        record["ratio_tree_rss"] = hi["tree_rss_kb"] / lo["tree_rss_kb"]
        print(f"peak at {max(sizes)} / peak at {min(sizes)} images: max RSS {record['ratio_max_rss']:.3f}, "
              f"process tree {record['ratio_tree_rss']:.3f}")
    atomic_write_json(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
