"""Before/after table of two runs of the weighted kernel report (``rlr-fast kernels --json --ops-json``).

    python benchmarks/weighted_compare.py BEFORE.json BEFORE-OPS.json AFTER.json AFTER-OPS.json \
        [--ops mlka|lca] [--archs sm_90,sm_80] [--kernels dq,dkdv]

(each argument may list several files, comma-separated, e.g. one run per dtype).

Prints, for the default config of every kernel launch present in both runs (matched by arch, op,
dtype, head dim, kernel, k/v layout and, for split dK/dV launches, the gradient), the registers,
spills, warps resident per H100 SM, tensor-core instruction and the weighted figures at both
launches (32x32 window 7, 64x64 window 11), before and after, and LCA's keys visited per useful key
(kv/u), with issue 18's targets (sm_90, 16-bit, head dims 32 and 64; part 3's for MLKA, part 4's for
LCA); then the per-op sums (forward, forward + backward) before and after; then, where
the after report compiled whole config spaces, every config that spills registers. Nothing is
compiled or timed here: it reads the two reports.
"""
import argparse
import json
from pathlib import Path

# Issue 18's targets, sm_90 16-bit at head dims 32 and 64. Part 3 (MLKA): weighted instructions per
# useful score at either launch, per kernel, and per op for a forward + backward. Part 4 (LCA): keys
# visited per useful key in every kernel (forward, dQ, dK/dV, at B=8 32x32 window 7), forward +
# backward per useful score at either launch, and launches per forward + backward (1 + at most 3).
TARGETS = {"dq": 12.0, "dkdv": 20.0}
OP_TARGET = 40.0
MIN_WARPS = 16
LCA_KEYS_VISITED = 2.6
OP_TARGETS = {"mlka": OP_TARGET, "lca": 120.0}
MAX_LAUNCHES = {"lca": 1 + 3}
_DTYPES = ("fp16", "bf16", "fp32")


def _key(r):
    return (r["arch"], r["op"], r["dtype"], r["head_dim"], r["kernel"], r.get("layout", ""))


def _short_layout(layout: str) -> str:
    if not layout:
        return ""
    k, v = layout.split(", ")
    return f"k{k.split()[1][0].upper()} v{v.split()[1][0].upper()}"


def _load(paths: str) -> list:
    return [r for path in paths.split(",") for r in json.loads(Path(path).read_text())]


def _defaults(records: list, ops, archs, kernels) -> dict:
    """{key: [default records of its launches]} of one report."""
    out = {}
    for r in records:
        if not (r.get("default") and r.get("ok") and not r.get("pruned")):
            continue
        if r["op"] not in ops or r["arch"] not in archs or r["kernel"] not in kernels:
            continue
        out.setdefault(_key(r), []).append(r)
    return out


def _figure(r, launch, field):
    w = (r.get("weighted") or {}).get(launch) or {}
    return w.get(field, "err")


def _summary(records) -> dict:
    """One launch, or the sum over the split dK/dV launches (one per gradient): thread instructions
    and floors add up, the figures per score too (same useful scores)."""
    first = records[0]
    out = {"tc": first["tensor_core"], "tile": f"{first['tile']}/{first['block']}",
           "regs": "+".join(str(r["registers"]) for r in records),
           "spills": sum(r["spill_bytes"] for r in records),
           "warps": min(r["blocks_per_sm"] * r["num_warps"] for r in records),
           "kv": first.get("keys_visited_per_useful_key", "")}
    for launch in ("32x32", "64x64"):
        for field in ("weighted_instructions_per_score", "exp_per_score", "issue_floor_us"):
            values = [_figure(r, launch, field) for r in records]
            out[(launch, field)] = "err" if "err" in values else round(sum(values), 2)
    return out


def _meets(kernel, dtype, dim, arch, s, op="mlka", layout="") -> str:
    if arch != "sm_90" or dtype == "fp32" or dim not in (32, 64):
        return ""
    if op == "lca":  # RLR's layout (k and v shared) only
        if kernel == "dkdv" and layout != "k shared, v shared":
            return ""
        ok = s["kv"] != "" and s["kv"] <= LCA_KEYS_VISITED and s["spills"] == 0 and s["tc"] == "wgmma"
        return f"kv<={LCA_KEYS_VISITED:g},wgmma: {'met' if ok else 'NOT met'}"
    if kernel not in TARGETS:
        return ""
    w = [s[(launch, "weighted_instructions_per_score")] for launch in ("32x32", "64x64")]
    ok = all(x != "err" and x <= TARGETS[kernel] for x in w) and s["warps"] >= MIN_WARPS and s["spills"] == 0 \
        and s["tc"] == "wgmma"
    return f"<={TARGETS[kernel]:g},>={MIN_WARPS}w,wgmma: {'met' if ok else 'NOT met'}"


def kernel_table(before: dict, after: dict) -> str:
    head = (f"{'arch':<6}{'op':<5}{'kernel':<8}{'k/v':<6}{'dtype':<6}{'D':>4} | {'run':<7}{'tc':<6}{'tile/block':<12}"
            f"{'regs':>8}{'spill':>6}{'warps':>6}{'kv/u':>6} | {'w32':>7}{'ex32':>7}{'us32':>8} | {'w64':>7}{'ex64':>7}"
            f"{'us64':>9} | target")
    lines = [head, "-" * len(head)]
    for key in sorted(set(before) & set(after), key=lambda k: (k[0], k[1], _DTYPES.index(k[2]), k[3], ("forward", "dq", "dkdv").index(k[4]), k[5])):
        arch, op, dtype, dim, kernel, layout = key
        for name, records in (("before", before[key]), ("after", after[key])):
            s = _summary(records)
            target = _meets(kernel, dtype, dim, arch, s, op, layout) if name == "after" else ""
            lines.append(f"{arch:<6}{op:<5}{kernel:<8}{_short_layout(layout):<6}{dtype:<6}{dim:>4} | {name:<7}{s['tc']:<6}"
                         f"{s['tile']:<12}{s['regs']:>8}{s['spills']:>6}{s['warps']:>6}{s['kv']:>6} | "
                         f"{s[('32x32', 'weighted_instructions_per_score')]:>7}{s[('32x32', 'exp_per_score')]:>7}"
                         f"{s[('32x32', 'issue_floor_us')]:>8} | {s[('64x64', 'weighted_instructions_per_score')]:>7}"
                         f"{s[('64x64', 'exp_per_score')]:>7}{s[('64x64', 'issue_floor_us')]:>9} | {target}")
    return "\n".join(lines)


def op_table(before: list, after: list, ops, archs) -> str:
    def index(rows):
        return {(r["arch"], r["op"], r["dtype"], r["head_dim"], r["launch"], r["mode"]): r for r in rows
                if r["op"] in ops and r["arch"] in archs}

    b, a = index(before), index(after)
    head = (f"{'arch':<6}{'op':<5}{'dtype':<6}{'D':>4} {'launch':<7}{'mode':<17}| {'launches':>9}{'ins/sc':>9}"
            f"{'floor_us':>10} | {'launches':>9}{'ins/sc':>9}{'floor_us':>10}{'fa2_us':>9}{'x_fa2':>7} | target")
    lines = [f"{'':<45}| {'before':<28}| after", head, "-" * len(head)]
    for key in sorted(set(b) & set(a), key=lambda k: (k[0], k[1], _DTYPES.index(k[2]), *k[3:])):
        x, y = b[key], a[key]
        target = ""
        if key[0] == "sm_90" and key[2] != "fp32" and key[3] in (32, 64) and key[5] == "forward+backward":
            limit = OP_TARGETS[key[1]]
            met = y["weighted_instructions_per_useful_score"] <= limit
            target = f"<={limit:g}: {'met' if met else 'NOT met'}"
            if key[1] in MAX_LAUNCHES:
                fits = y["launches"] <= MAX_LAUNCHES[key[1]]
                target += f"; launches<={MAX_LAUNCHES[key[1]]}: {'met' if fits else 'NOT met'}"
        lines.append(f"{key[0]:<6}{key[1]:<5}{key[2]:<6}{key[3]:>4} {key[4]:<7}{key[5]:<17}| {x['launches']:>9}"
                     f"{x['weighted_instructions_per_useful_score']:>9}{x['issue_floor_us']:>10} | {y['launches']:>9}"
                     f"{y['weighted_instructions_per_useful_score']:>9}{y['issue_floor_us']:>10}"
                     f"{y['fa2_dense_floor_us']:>9}{y['ratio_to_fa2']:>7} | {target}")
    return "\n".join(lines)


def spill_table(records: list, ops, archs) -> str:
    """Every compiled config that spills, default or not (the defaults must not)."""
    rows = [r for r in records if r["op"] in ops and r["arch"] in archs and r.get("ok") and not r.get("pruned")
            and r["spill_bytes"] > 0]
    compiled = sum(1 for r in records if r["op"] in ops and r["arch"] in archs and r.get("ok") and not r.get("pruned"))
    lines = [f"{len(rows)} of {compiled} compiled configs spill ({sum(r['default'] for r in rows)} of them defaults)"]
    for r in sorted(rows, key=lambda r: (r["arch"], r["dtype"], r["head_dim"], r["kernel"], r.get("layout", ""))):
        config = ", ".join(f"{k}={v}" for k, v in r["config"].items())
        lines.append(f"  {r['arch']} {r['op']} {r['kernel']:<7} {_short_layout(r.get('layout', '')):<6}{r['dtype']} "
                     f"D={r['head_dim']:<4} cfg {r['config_index']}{'*' if r['default'] else ' '} ({config}): "
                     f"{r['registers']} registers, {r['spill_bytes']} bytes spilled")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("before")
    p.add_argument("before_ops")
    p.add_argument("after")
    p.add_argument("after_ops")
    p.add_argument("--ops", default="mlka")
    p.add_argument("--archs", default="sm_90,sm_80")
    p.add_argument("--kernels", default="forward,dq,dkdv")
    args = p.parse_args(argv)
    ops, archs, kernels = (set(x.split(",")) for x in (args.ops, args.archs, args.kernels))
    after_records = _load(args.after)
    before, after = _defaults(_load(args.before), ops, archs, kernels), _defaults(after_records, ops, archs, kernels)
    print("== Per kernel (default configs) ==")
    print(kernel_table(before, after))
    print("\n== Per op: forward, forward + backward (RLR's layout, kernels and torch glue) ==")
    print(op_table(_load(args.before_ops), _load(args.after_ops), ops, archs))
    print("\n== Spills in the after report (every config it compiled) ==")
    print(spill_table(after_records, ops, archs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
