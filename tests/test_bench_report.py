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
        _bench(0.050, provider="sdpa", peak_bytes=40 << 20, **op),
        _bench(0.200, provider="reference", peak_bytes=400 << 20, **op),
        _bench(0.5, kind="model", model="rlr", path="fast", mode="inference", batch=16, image_size=256,
               peak_bytes=100 << 20),
        _bench(2.0, kind="model", model="rlr", path="naive", mode="inference", batch=16, image_size=256,
               peak_bytes=800 << 20),
        _bench(0.8, kind="scaling", path="fast", grid=32, batch=8, peak_bytes=80 << 20),
        _bench(4.0, kind="scaling", path="naive", grid=32, batch=8, peak_bytes=800 << 20),
        _bench(1.6, kind="scaling", path="fast", grid=64, batch=8, peak_bytes=160 << 20),
        _bench(0.0, kind="scaling", path="naive", grid=64, batch=8, out_of_budget=True,
               estimated_peak_bytes=64 << 30),
    ]
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"benchmarks": benches}))
    assert main(["report", str(results), "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "benchmarks.md").read_text()
    assert text.strip() == capsys.readouterr().out.strip()
    assert "Device: cpu-x, torch 2.x, 2 threads" in text
    # torch: 10 ms, 5x faster than SDPA, 20x than the reference, 200 GFLOP/s = 200% of 100
    assert "| lca | 32 | 7 | 8 | inference | torch | 10.0 | 5.00x | 20.00x | 200.0 | 200% | 10 |" in text
    # 16 images / 0.5 s = 32 img/s against 8 img/s: 4x, memory 8x
    assert "| rlr (256px) | inference | 16 | 32.00 | 8.00 | 4.00x | 100 | 800 | 8.00x |" in text
    assert "| 32 | 100.0 | 500.0 | 5.00x | 10 | 100 | 10.00x |" in text
    assert "| 64 | 200.0 | out of budget | n/a | 20 | ~8192 (est.) | 409.60x |" in text
    png = tmp_path / "out" / "scaling.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_results_file(tmp_path, capsys):
    assert main(["report", str(tmp_path / "none.json")]) == 2
    assert "no such results file" in capsys.readouterr().err
