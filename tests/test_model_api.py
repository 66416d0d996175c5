"""RLRModel's Python API under autocast, `.data` edits, tracers and compilers, and bad images."""
import warnings

import pytest
import torch

from rlr_fast import ops
from rlr_fast.models.rlr import RLRModel

TINY = dict(image_size=64, backbone_weights="random", num_layers=2, dims=(32, 64), num_heads=4, backend="torch")


def _model(**overrides):
    torch.manual_seed(0)
    return RLRModel(**{**TINY, **overrides}).eval()


def _maps(model, images):
    with torch.no_grad():
        return model(images).anomaly_map


def test_cache_follows_autocast_in_both_orders():
    model, images = _model(), torch.randn(2, 3, 64, 64)
    plain = _maps(model, images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = _maps(model, images)  # failed: the cached fp32 projections met bf16 queries
    again = _maps(model, images)  # failed the other way round: bf16 projections, fp32 queries
    torch.testing.assert_close(again, plain)
    torch.testing.assert_close(mixed.float(), plain, rtol=0.1, atol=0.05)


def test_cache_is_not_stale_after_an_edit_through_data():
    model, images = _model(), torch.randn(2, 3, 64, 64)
    before = _maps(model, images)
    model.levels[0].reference.data.mul_(3.0)  # .data has its own version counter
    after = _maps(model, images)
    fresh = RLRModel(**TINY).eval()
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(after, _maps(fresh, images))
    assert not torch.allclose(before, after)


def test_cache_follows_dtype_and_is_dropped_by_train_to_and_load_state_dict():
    model, images = _model(), torch.randn(1, 3, 64, 64)
    _maps(model, images)
    level = model.levels[0]
    assert level._cache is not None
    model.train()
    assert level._cache is None
    model.eval()
    _maps(model, images)
    model.load_state_dict(model.state_dict())
    assert level._cache is None
    _maps(model, images)
    model.to(torch.float64)
    assert level._cache is None
    out = _maps(model, images.double())  # failed: cached float32 projections met float64 queries
    assert level._cache.heads[0][0].dtype == torch.float64 and torch.isfinite(out).all()


def test_compile_fullgraph_gives_the_eager_maps():
    model, images = _model(), torch.randn(2, 3, 64, 64)
    eager = _maps(model, images)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")  # graph breaks raise
    torch.testing.assert_close(_maps(compiled, images), eager, rtol=1e-5, atol=1e-6)


def test_compile_fullgraph_trains_like_eager():
    model, images = _model(), torch.randn(2, 3, 64, 64)
    feats = model.features(images)
    model.train()
    torch.manual_seed(1)
    model.loss(feats).backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    torch._dynamo.reset()
    compiled_loss = torch.compile(model.loss, fullgraph=True, backend="aot_eager")
    torch.manual_seed(1)
    compiled_loss(feats).backward()
    for name, grad in eager.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-6,
                                   msg=name)


def test_jit_trace_gives_the_eager_maps():
    model, images = _model(), torch.randn(2, 3, 64, 64)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, images, strict=False, check_trace=False)
        other = torch.randn(3, 3, 64, 64)  # another batch size through the traced graph
        out = traced(other)
    expected = model(other)
    torch.testing.assert_close(out[0], expected.anomaly_map, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[1], expected.score, rtol=1e-4, atol=1e-5)


def test_torch_export_gives_the_eager_maps():
    model, images = _model(), torch.randn(2, 3, 64, 64)
    batch = torch.export.Dim("batch", min=1, max=64)
    with torch.no_grad():
        program = torch.export.export(model, (images,), dynamic_shapes=({0: batch},))
        other = torch.randn(3, 3, 64, 64)
        got = program.module()(other)
    expected = _maps(model, other)
    torch.testing.assert_close(got[0], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float64, torch.int64])
def test_images_of_another_dtype_are_refused_with_the_expected_dtype_and_range(dtype):
    model = _model()
    images = torch.zeros(1, 3, 64, 64, dtype=dtype)
    with pytest.raises(TypeError, match=r"float32.*ImageNet.*normalis.*" + str(dtype).split(".")[-1]):
        model(images)


def test_rectangular_image_size():
    model = _model(image_size=(48, 80))
    assert model.grids == [(6, 10), (3, 5)]
    out = _maps(model, torch.randn(2, 3, 48, 80))
    assert out.shape == (2, 1, 48, 80)
    with pytest.raises(ValueError, match="48x80"):
        model(torch.randn(2, 3, 80, 48))
    with pytest.raises(ValueError, match="image_size"):
        RLRModel(**{**TINY, "image_size": (48, 80, 3)})


def test_rectangular_image_size_uniad():
    from rlr_fast.models.uniad import UniADModel

    torch.manual_seed(0)
    model = UniADModel(image_size=(48, 80), backbone="tf_efficientnet_lite0", backbone_weights="random", hidden=32,
                       num_heads=4, ffn_dim=64, num_encoder_layers=1, num_decoder_layers=1, window=3).eval()
    assert model.grid == (3, 5)
    out = model(torch.randn(2, 3, 48, 80))
    assert out.anomaly_map.shape == (2, 1, 48, 80) and out.score.shape == (2,)


def test_legacy_onnx_exporter_runs_the_traceable_path(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    model, images = _model(), torch.randn(2, 3, 64, 64)
    path = tmp_path / "legacy.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (images,), str(path), dynamo=False, input_names=["images"],
                          output_names=["anomaly_map", "score"], dynamic_axes={"images": {0: "batch"}})
    other = torch.randn(3, 3, 64, 64)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": other.numpy()})
    expected = _maps(model, other)
    torch.testing.assert_close(torch.from_numpy(got[0]), expected, rtol=1e-4, atol=1e-5)


def test_exporting_leaves_no_fake_tensor_in_a_cache():
    """torch.export traces with fake tensors: a geometry cached as a tensor during the trace broke
    every later eager call on that geometry (seen as jit.trace failing after an ONNX export)."""
    model = _model(image_size=(40, 72))  # grids (5, 9) and (3, 5): geometries no other test caches
    with torch.no_grad():
        torch.export.export(model, (torch.randn(2, 3, 40, 72),))
    for grid, window in zip(model.grids, model.config.windows):
        q = torch.randn(1, 2, grid[0] * grid[1], 4)
        for op in ("local_cross_attention", "neighbor_masked_attention"):
            for backend in ("dense", "torch"):
                getattr(ops, op)(q, q[0], q, grid, window, backend=backend)  # failed on a fake tensor
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.jit.trace(model, torch.randn(2, 3, 40, 72), strict=False, check_trace=False)
