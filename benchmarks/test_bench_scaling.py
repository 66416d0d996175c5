"""Scaling: RLR's reconstruction network alone (one level, no backbone), training step at
batch 8 on grids 16 -> 32 -> 64 -> 96, fast against naive, time and peak memory per image.
A case whose estimated peak exceeds the 16 GiB budget is not run: it is recorded as out of
budget with the estimate (the naive path stores B * heads * L^2 attention tensors per layer)."""
import pytest
import torch

from rlr_fast.models.rlr import ReconstructionNetwork, default_windows

BUDGET = 16 << 30
FULL = dict(grids=(16, 32, 48, 64, 96), batch=8, channels=40, dim=256, layers=4, heads=8)
SMALL = dict(grids=(8, 12), batch=2, channels=8, dim=32, layers=1, heads=4)


def naive_peak_estimate(grid, batch, heads, layers) -> int:
    """Bytes the reference path keeps for backward: per layer and per op, about three fp32
    B x heads x L x L tensors (scores, masked scores, probabilities)."""
    return 2 * 3 * layers * batch * heads * (grid * grid) ** 2 * 4


def pytest_generate_tests(metafunc):
    if "grid" in metafunc.fixturenames:
        cfg = FULL if metafunc.config.getoption("--benchmark") else SMALL
        metafunc.parametrize("grid", cfg["grids"], ids=lambda g: f"grid{g}")


@pytest.mark.parametrize("path", ["fast", "naive"])
def test_scaling(benchmark, measure, device, full, path, grid):
    cfg = FULL if full else SMALL
    b = cfg["batch"]
    benchmark.group = "scaling: reconstruction network, training step"
    info = dict(kind="scaling", path=path, grid=grid, batch=b, dim=cfg["dim"], layers=cfg["layers"])
    if path == "naive" and naive_peak_estimate(grid, b, cfg["heads"], cfg["layers"]) > BUDGET:
        benchmark.extra_info.update(info, out_of_budget=True,
                                    estimated_peak_bytes=naive_peak_estimate(grid, b, cfg["heads"], cfg["layers"]))
        benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # recorded, not run
        return
    torch.manual_seed(0)
    net = ReconstructionNetwork(cfg["channels"], cfg["dim"], (grid, grid), default_windows((grid, grid)),
                                num_layers=cfg["layers"], num_heads=cfg["heads"],
                                backend="auto" if path == "fast" else "reference").to(device)
    tokens = torch.randn(b, grid * grid, cfg["channels"], device=device)

    def fn():
        net.zero_grad(set_to_none=True)
        (net(tokens) - tokens).pow(2).mean().backward()

    heavy = full and grid >= 64  # a step takes from seconds to minutes: one warm call, one timed
    measure(fn, 1 if heavy else 2, warm=not heavy, **info, out_of_budget=False,
            estimated_peak_bytes=naive_peak_estimate(grid, b, cfg["heads"], cfg["layers"]) if path == "naive" else None)
