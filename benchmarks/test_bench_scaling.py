"""Scaling: RLR's reconstruction network alone (one level, no backbone), training step at
batch 8 on grids 16 -> 32 -> 48 -> 64 -> 96, fast against naive, time and peak memory per image.

The naive path stores B * heads * L^2 attention tensors per layer. Its peak at a grid is estimated
before running it, from the naive peaks measured at the smaller grids of the same run (cases run
smallest grid first): per image a * L^2 + b * L fitted through those points. A case whose estimate
exceeds the 16 GiB budget is not run: it is recorded as out of budget with the estimate, and the
report marks every cell derived from an estimate as one."""
import pytest
import torch

from rlr_fast.models.rlr import ReconstructionNetwork, default_windows

BUDGET = 16 << 30
FULL = dict(grids=(16, 32, 48, 64, 96), batch=8, channels=40, dim=256, layers=4, heads=8)
SMALL = dict(grids=(8, 12), batch=2, channels=8, dim=32, layers=1, heads=4)

# grid -> measured naive peak bytes per image, in this run
_NAIVE_MEASURED: dict = {}


def analytic_naive_peak(grid, batch, heads, layers) -> int:
    """Without measurements: per layer and per op, about three fp32 B x heads x L x L tensors
    (scores, masked scores, probabilities) kept for backward."""
    return 2 * 3 * layers * batch * heads * (grid * grid) ** 2 * 4


def fit_per_image_peak(measured: dict):
    """Coefficients (a, b) of peak = a * L^2 + b * L per image, least squares through the measured
    (grid -> bytes per image) points; with one point, b = 0. None without points."""
    points = [(g * g, peak) for g, peak in sorted(measured.items())]
    if not points:
        return None
    if len(points) == 1:
        (length, peak), = points
        return peak / length ** 2, 0.0
    basis = torch.tensor([[length ** 2, length] for length, _ in points], dtype=torch.float64)
    target = torch.tensor([[peak] for _, peak in points], dtype=torch.float64)
    a, b = torch.linalg.lstsq(basis, target).solution.flatten().tolist()
    return a, b


def naive_peak_estimate(grid, batch, heads, layers, measured=None):
    """(bytes, how): the naive path's estimated peak at this grid and batch, and how it was made."""
    measured = {g: p for g, p in (_NAIVE_MEASURED if measured is None else measured).items() if g < grid}
    coeffs = fit_per_image_peak(measured)
    if coeffs is None:
        return analytic_naive_peak(grid, batch, heads, layers), "analytic"
    a, b = coeffs
    length = grid * grid
    grids = ", ".join(str(g) for g in sorted(measured))
    return int(batch * (a * length ** 2 + b * length)), f"fitted to the measured grids {grids}"


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
    estimate, how = (naive_peak_estimate(grid, b, cfg["heads"], cfg["layers"]) if path == "naive" else (None, None))
    info.update(estimated_peak_bytes=estimate, estimate_method=how)
    if path == "naive" and estimate > BUDGET:
        benchmark.extra_info.update(info, out_of_budget=True)
        benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # recorded, not run
        return
    torch.manual_seed(0)
    net = ReconstructionNetwork(cfg["channels"], cfg["dim"], (grid, grid), default_windows((grid, grid)),
                                num_layers=cfg["layers"], num_heads=cfg["heads"],
                                backend="auto" if path == "fast" else "dense").to(device)
    tokens = torch.randn(b, grid * grid, cfg["channels"], device=device)

    def fn():
        net.zero_grad(set_to_none=True)
        (net(tokens) - tokens).pow(2).mean().backward()

    # a step takes from seconds to minutes: one warm call, one timed
    heavy = full and (grid >= 64 or (path == "naive" and grid >= 48))
    peak = measure(fn, 1 if heavy else 2, warm=not heavy, **info, out_of_budget=False)
    if path == "naive" and peak:
        _NAIVE_MEASURED[grid] = peak / b


def test_naive_peak_fit_recovers_a_quadratic_and_uses_only_smaller_grids():
    per_image = lambda g: 3.0 * (g * g) ** 2 + 500.0 * g * g  # noqa: E731  a known a*L^2 + b*L
    measured = {16: per_image(16), 32: per_image(32), 64: 1.0}  # 64 is not smaller than 48: ignored
    estimate, how = naive_peak_estimate(48, 8, 8, 4, measured)
    assert abs(estimate - 8 * per_image(48)) <= 1e-6 * estimate
    assert how == "fitted to the measured grids 16, 32"
    assert naive_peak_estimate(16, 8, 8, 4, measured) == (analytic_naive_peak(16, 8, 8, 4), "analytic")
