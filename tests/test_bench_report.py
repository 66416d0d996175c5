"""The benchmark report renderer on a small synthetic results file."""
import json

from rlr_fast.bench import main


def _bench(median, **info):
    info.setdefault("device", "cpu-x")
    info.setdefault("torch", "2.x")
    info.setdefault("threads", 2)
    return {"stats": {"median": median}, "extra_info": info}


def test_report(tmp_path, capsys):
    op = dict(kind="op", op="lca", grid=32, window=7, batch=8, mode="inference", flops=2e9, matmul_peak_gflops=100.0)
    benches = [
        _bench(0.010, provider="torch", peak_bytes=10 << 20, **op),
        _bench(0.060, provider="sdpa", peak_bytes=40 << 20, **op),
        _bench(0.050, provider="sdpa_float", peak_bytes=30 << 20, **op),
        _bench(0.200, provider="reference", peak_bytes=400 << 20, **op),
        _bench(0.005, provider="torch", peak_bytes=5 << 20, **{**op, "dtype": "bf16", "matmul_peak_gflops": 400.0}),
        _bench(0.020, provider="sdpa", peak_bytes=20 << 20, **{**op, "dtype": "bf16", "matmul_peak_gflops": 400.0}),
        _bench(0.020, kind="nearest", provider="torch", batch=8, tokens=3136, refs=12544, channels=24,
               flops=2e9, peak_bytes=10 << 20),
        _bench(0.080, kind="nearest", provider="dense", batch=8, tokens=3136, refs=12544, channels=24,
               flops=2e9, peak_bytes=1000 << 20),
        _bench(0.5, kind="model", model="rlr", path="fast", mode="inference", batch=16, image_size=256,
               peak_bytes=100 << 20),
        _bench(2.0, kind="model", model="rlr", path="naive", mode="inference", batch=16, image_size=256,
               peak_bytes=800 << 20),
        _bench(0.8, kind="scaling", path="fast", grid=32, batch=8, peak_bytes=80 << 20),
        _bench(4.0, kind="scaling", path="naive", grid=32, batch=8, peak_bytes=800 << 20,
               estimated_peak_bytes=960 << 20, estimate_method="fitted to the measured grids 16"),
        _bench(1.6, kind="scaling", path="fast", grid=64, batch=8, peak_bytes=160 << 20),
        _bench(0.0, kind="scaling", path="naive", grid=64, batch=8, out_of_budget=True,
               estimated_peak_bytes=64 << 30, estimate_method="fitted to the measured grids 16, 32"),
    ]
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"benchmarks": benches}))
    assert main(["report", str(results), "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "benchmarks.md").read_text()
    assert text.strip() == capsys.readouterr().out.strip()
    assert "Device: cpu-x, torch 2.x, 2 threads" in text
    # torch: 10 ms, 5x faster than the faster SDPA (float mask, 50 ms; boolean 60 ms), 20x than the
    # reference, 200 GFLOP/s = 200% of 100
    # (records without a dtype are fp32)
    assert "| lca | 32 | 7 | 8 | inference | fp32 | torch | 10.0 | 5.00x | sdpa_float | 20.00x | 200.0 | 200% | 10 |" in text
    assert "| lca | 32 | 7 | 8 | inference | fp32 | sdpa | 60.0 | 0.83x | sdpa_float |" in text
    # bf16: against SDPA in bf16 (20 ms), against the fp32 reference (200 ms), % of the bf16 rate
    assert "| lca | 32 | 7 | 8 | inference | bf16 | torch | 5.0 | 4.00x | sdpa | 40.00x | 400.0 | 100% | 5 |" in text
    assert "Matmul rate of this machine in the same run: fp32 100 GFLOP/s, bf16 400 GFLOP/s." in text
    assert text.index("| inference | fp32 | torch |") < text.index("| inference | bf16 | torch |")
    # nearest: 20 ms against 80 ms dense, 10 MiB against 1000 MiB, 2 GFLOP in 20 ms
    assert "| 8 | 3136 | 12544 | 24 | torch | 20.0 | 4.00x | 10 | 100.00x | 100.0 |" in text
    # 16 images / 0.5 s = 32 img/s against 8 img/s: 4x, memory 8x
    assert "| rlr (256px) | inference | 16 | 32.00 | 8.00 | 4.00x | 100 | 800 | 8.00x |" in text
    assert "| 32 | 100.0 | 500.0 | 5.00x | 10 | 100 | 10.00x |" in text
    assert "| 64 | 200.0 | out of budget | n/a | 20 | ~8192 (est.) | 409.60x (est.) |" in text
    assert "- grid 32: naive estimate 120 MiB/img (fitted to the measured grids 16); measured 100 MiB/img" in text
    assert "- grid 64: naive estimate 8192 MiB/img (fitted to the measured grids 16, 32)" in text
    png = tmp_path / "out" / "scaling.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_results_file(tmp_path, capsys):
    assert main(["report", str(tmp_path / "none.json")]) == 2
    assert "no such results file" in capsys.readouterr().err


def test_deploy_table(tmp_path):
    deploy = dict(kind="deploy", image_size=256)
    benches = [_bench(0.5, engine="eager", batch=16, **deploy), _bench(0.25, engine="onnxruntime", batch=16, **deploy),
               _bench(0.1, engine="eager", batch=1, **deploy), _bench(0.05, engine="openvino", batch=1, **deploy)]
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"benchmarks": benches}))
    assert main(["report", str(results), "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "benchmarks.md").read_text()
    assert "| input | batch | eager | compile | onnxruntime | openvino |" in text
    # batch 16: 32 img/s eager, 64 img/s onnxruntime; batch 1: 10 and 20 img/s (OpenVINO)
    assert "| 256px | 16 | 32.00 (1.00x) | n/a | 64.00 (2.00x) | n/a |" in text
    assert "| 256px | 1 | 10.00 (1.00x) | n/a | n/a | 20.00 (2.00x) |" in text
