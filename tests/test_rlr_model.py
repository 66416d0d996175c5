"""RLRModel: building blocks against their definitions, backends agreeing, caching, backbone."""
import math

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from rlr_fast.backbone import FrozenBackbone
from rlr_fast.errors import DataError, UsageError
from rlr_fast.models.layers import feature_jitter, gaussian_blur, sincos_pos_embed_2d
from rlr_fast.models.rlr import PAPER_NETWORK, RLRModel, default_window, default_windows

TINY = dict(image_size=64, backbone_weights="random", num_layers=2, dims=(32, 64), num_heads=4)


def test_positional_embedding_matches_the_formula():
    h, w, d = 3, 5, 16
    pe = sincos_pos_embed_2d((h, w), d)
    half = d // 2
    for i in range(h * w):
        y, x = divmod(i, w)
        for j in range(half // 2):
            f = math.exp(2 * j * -math.log(1e4) / half)
            assert pe[i, 2 * j].item() == pytest.approx(math.sin(x * f), abs=1e-6)
            assert pe[i, 2 * j + 1].item() == pytest.approx(math.cos(x * f), abs=1e-6)
            assert pe[i, half + 2 * j].item() == pytest.approx(math.sin(y * f), abs=1e-6)
            assert pe[i, half + 2 * j + 1].item() == pytest.approx(math.cos(y * f), abs=1e-6)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed_2d((2, 2), 6)


@pytest.mark.parametrize("path", ["matrix", "convolution"])
@pytest.mark.parametrize("sigma,shape", [(4.0, (40, 33)), (1.5, (9, 12)), (4.0, (7, 5))])
def test_gaussian_blur_matches_scipy(sigma, shape, path, monkeypatch):
    from rlr_fast.models import layers

    if path == "convolution":  # the path of maps wider than BLUR_MATRIX_MAX
        monkeypatch.setattr(layers, "BLUR_MATRIX_MAX", 0)
    x = torch.rand(2, 1, *shape, dtype=torch.float64)
    got = gaussian_blur(x, sigma)
    for i in range(2):
        expected = ndimage.gaussian_filter(x[i, 0].numpy(), sigma)  # truncate 4, mode 'reflect'
        np.testing.assert_allclose(got[i, 0].numpy(), expected, atol=1e-12)


def test_feature_jitter_scale():
    torch.manual_seed(0)
    tokens = torch.randn(4, 500, 64) * 3
    noise = feature_jitter(tokens, scale=4.0) - tokens
    expected_std = tokens.norm(dim=-1) / 64 * 4.0  # per token
    ratio = noise.std(dim=-1) / expected_std
    assert ratio.mean().item() == pytest.approx(1.0, abs=0.05)
    assert torch.equal(feature_jitter(tokens, scale=0.0), tokens)


def _some_query_sees_the_whole_grid(grid, window):
    """Brute force over every query: does its clipped window hold every token of the grid?"""
    (h, w), (kh, kw) = grid, window
    return any(y - kh // 2 <= 0 and y + kh // 2 >= h - 1 and x - kw // 2 <= 0 and x + kw // 2 >= w - 1
               for y in range(h) for x in range(w))


def test_default_windows_follow_the_paper():
    assert [default_window(g) for g in (16, 32, 64)] == [5, 7, 11]
    assert default_windows((16, 32)) == (5, 7)
    # small grids: the paper's window shrinks (both axes by 2) until MLKA leaves every query a key
    assert default_windows((8, 8)) == (3, 3) and default_windows((4, 4)) == (1, 1)
    for grid in [(h, w) for h in range(2, 20) for w in range(2, 20)]:
        kh, kw = default_windows(grid)
        assert kh % 2 == 1 and kw % 2 == 1
        assert not _some_query_sees_the_whole_grid(grid, (kh, kw)), grid
        start = (default_window(grid[0]), default_window(grid[1]))
        if (kh, kw) != start:  # it shrank: the next larger step would have left a query without keys
            assert _some_query_sees_the_whole_grid(grid, (kh + 2, kw + 2)), grid


def test_paper_network_by_name():
    # The defaults differ from the paper in depth, width and token standardisation only;
    # PAPER_NETWORK (what `--recipe paper` applies) restores it.
    default = RLRModel(image_size=64, backbone_weights="random").config
    assert (default.num_layers, default.dims, default.feature_norm) == (2, (128, 256), "channel")
    paper = RLRModel(image_size=64, backbone_weights="random", **PAPER_NETWORK)
    assert (paper.config.num_layers, paper.config.dims, paper.config.feature_norm) == (4, (256, 512), "none")
    assert len(paper.levels[1].layers) == 4 and paper.levels[1].head.in_features == 512
    assert not paper.levels[0].standardize


def test_shapes_and_paper_defaults():
    model = RLRModel(image_size=64, backbone_weights="random")
    cfg = model.config
    assert (cfg.num_heads, cfg.alpha, cfg.jitter_scale, cfg.ffn_ratio) == (8, 2.0, 4.0, 4)
    assert model.grids == [(8, 8), (4, 4)]
    level = model.levels[0]
    assert level.reference.shape == (64, model.backbone.channels[0])
    model.eval()
    out = model(torch.randn(3, 3, 64, 64))
    assert out.anomaly_map.shape == (3, 1, 64, 64) and out.score.shape == (3,)
    model.train()
    loss = model(torch.randn(2, 3, 64, 64))
    assert loss.dim() == 0 and loss.requires_grad
    with pytest.raises(ValueError, match="images are 32x32 but the model was built for 64x64"):
        model(torch.randn(1, 3, 32, 32))


def test_reference_and_torch_backends_give_the_same_maps():
    torch.manual_seed(0)
    fast = RLRModel(backend="torch", **TINY).eval()
    naive = RLRModel(backend="dense", **TINY).eval()
    naive.load_state_dict(fast.state_dict())
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        a, b = fast(images), naive(images)
    torch.testing.assert_close(a.anomaly_map, b.anomaly_map, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.score, b.score, rtol=1e-4, atol=1e-5)
    # and the same gradients of the training loss
    fast.train(), naive.train()
    feats = fast.features(images)
    torch.manual_seed(1)
    fast.loss(feats).backward()
    torch.manual_seed(1)
    naive.loss(feats).backward()
    for (name, p), q in zip(fast.named_parameters(), naive.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_reference_is_projected_once_and_cached_until_parameters_change():
    model = RLRModel(**TINY).eval()
    level = model.levels[0]
    calls = []
    original = level._project_reference
    level._project_reference = lambda: calls.append(1) or original()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        first = model(images).anomaly_map
        model(images)
        assert len(calls) == 1  # cached in eval mode
        heads = level.reference_heads()
        assert all(h.shape[:2] == (4, 64) and h.dim() == 3 for h in heads[0])  # (heads, L, D): no batch
        level.reference.add_(1.0)  # a parameter changes in place: the cache must notice
        second = model(images).anomaly_map
    assert len(calls) == 2
    assert not torch.allclose(first, second)
    model.train()
    model(images)
    assert len(calls) == 3  # never cached while training


def test_embedded_backbone_recognises_a_cat():
    """The shipped Lite0 weights mapped onto timm's model classify a real photo correctly."""
    import timm
    from PIL import Image
    from skimage.data import chelsea

    backbone = FrozenBackbone()
    assert backbone.channels == [40, 112] and backbone.reductions == [8, 16]
    full = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    from rlr_fast.backbone import _embedded_lite0_state, _map_in_order
    full.load_state_dict(_map_in_order(_embedded_lite0_state(), full, "weights"))
    # the feature extractor holds exactly the same weights
    for name, value in backbone.model.state_dict().items():
        assert torch.equal(value, full.state_dict()[name]), name
    img = np.asarray(Image.fromarray(chelsea()).resize((224, 224), Image.BICUBIC), dtype=np.float32) / 255
    x = (torch.from_numpy(img).permute(2, 0, 1) - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) \
        / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    with torch.no_grad():
        top5 = full(x[None]).topk(5).indices[0].tolist()
    assert top5[0] in range(281, 286)  # ImageNet's domestic cats: tabby, tiger cat, Persian, Siamese, Egyptian


def test_backbone_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="backbone weights file not found"):
        FrozenBackbone(weights=tmp_path / "missing.pth")
    bad = tmp_path / "bad.pth"
    torch.save({"conv_stem.weight": torch.zeros(1)}, bad)
    with pytest.raises(DataError, match=r"backbone weights file .*bad\.pth lacks"):
        FrozenBackbone(weights=bad)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(bad.read_bytes()[:100])
    with pytest.raises(DataError, match=r"backbone weights file .*truncated\.pth is not a readable"):
        FrozenBackbone(weights=truncated)
    with pytest.raises(ValueError, match=r"images must be \(B, 3, H, W\)"):
        FrozenBackbone(weights="random")(torch.zeros(1, 1, 32, 32))


def test_paper_backbone_requests_the_papers_pretrained_weights(tmp_path, monkeypatch, capsys):
    # No network here: record what timm is asked for, and stop there (no download is attempted).
    import timm

    from rlr_fast.cli import main

    asked = []

    def create_model(name, pretrained=False, **kwargs):
        asked.append((name, pretrained))
        raise ConnectionError("offline")

    monkeypatch.setattr(timm, "create_model", create_model)
    (tmp_path / "images").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "images" / "a.png")
    assert main(["train", "--data", str(tmp_path / "images"), "--out", str(tmp_path / "run"),
                 "--backbone", "tf_efficientnet_b6", "--image-size", "64", "--no-progress"]) == 2
    assert "'tf_efficientnet_b6.aa_in1k' for backbone 'tf_efficientnet_b6'" in capsys.readouterr().err
    assert asked == [("tf_efficientnet_b6.aa_in1k", True)]
    asked.clear()
    with pytest.raises(UsageError):  # a tag given explicitly is kept
        FrozenBackbone("tf_efficientnet_b6.ap_in1k")
    assert asked == [("tf_efficientnet_b6.ap_in1k", True)]


def _numpy_level_scores(model, feats, precisions=None):
    """Per level, float64 numpy (B, L) token scores of `feats`: the paper's, or with `precisions`
    [(mean, precision)] per level the whitened residual's."""
    with torch.no_grad():
        pairs = [(t.double().numpy(), r.double().numpy()) for t, r in model.reconstruct(feats)]
    out = []
    for level, (target, recon) in enumerate(pairs):
        if precisions is None:
            cos = (target * recon).sum(-1) / (np.linalg.norm(target, axis=-1) * np.linalg.norm(recon, axis=-1))
            out.append(((target - recon) ** 2).mean(-1) + 1 - cos)
        else:
            mean, precision = precisions[level]
            d = (target - recon) - mean
            out.append(np.einsum("blc,cd,bld->bl", d, precision, d) / d.shape[-1])
    return out


def _numpy_whitening(model, feats):
    """Per level, the float64 numpy (mean, shrunk precision) of the residuals of every token of
    `feats`, as WhitenedResidual fits them."""
    with torch.no_grad():
        pairs = [(t.double().numpy(), r.double().numpy()) for t, r in model.reconstruct(feats)]
    out = []
    for target, recon in pairs:
        res = (target - recon).reshape(-1, target.shape[-1])
        cov = np.cov(res, rowvar=False)
        out.append((res.mean(0), np.linalg.inv(cov + 1e-3 * np.mean(np.diag(cov)) * np.eye(len(cov)))))
    return out


def test_the_whitened_score_is_the_mahalanobis_distance_of_the_residual():
    from rlr_fast.features import FeatureCache

    torch.manual_seed(0)
    model = RLRModel(**TINY, score="whitened", map_sigma=0).eval()
    feats = model.features(torch.randn(24, 3, 64, 64))
    with torch.no_grad():
        unfitted = model.predict_features(feats)
    model.fit_score(FeatureCache(feats))
    assert model.whitened()
    with torch.no_grad():
        got = model.predict_features(feats).anomaly_map
    maps = [torch.nn.functional.interpolate(torch.from_numpy(s).view(-1, 1, *grid), size=(64, 64),
                                            mode="bilinear", align_corners=True)
            for s, grid in zip(_numpy_level_scores(model, feats, _numpy_whitening(model, feats)), model.grids)]
    torch.testing.assert_close(got.double(), maps[0], rtol=2e-3, atol=1e-4)  # the finest level's map, the default
    # on the tokens it was fitted on, the distance per channel averages about 1
    assert 0.8 < float(sum(m.mean() for m in maps) / len(maps)) < 1.1
    # before fit_score, the paper's score; score="paper" is the paper's whatever the statistics
    torch.manual_seed(0)
    paper = RLRModel(**TINY, score="paper", image_score=None, map_sigma=0).eval()
    with torch.no_grad():
        torch.testing.assert_close(paper.predict_features(feats).anomaly_map, unfitted.anomaly_map)


def test_an_unknown_score_is_refused():
    with pytest.raises(UsageError, match="unknown score 'maxabs'"):
        RLRModel(**TINY, score="maxabs")


@pytest.mark.parametrize("map_sigma", [0.0, 4.0, 2.5])  # 4.0 = score_sigma: "all" reuses the score's blur
@pytest.mark.parametrize("anomaly_map", ["finest", "all"])
def test_the_pixel_map_is_the_finest_levels_or_the_mean_blurred_and_the_score_the_papers(anomaly_map, map_sigma):
    torch.manual_seed(0)
    model = RLRModel(**TINY, anomaly_map=anomaly_map, map_sigma=map_sigma).eval()
    feats = model.features(torch.randn(3, 3, 64, 64))
    with torch.no_grad():
        out = model.predict_features(feats)
        pairs = [(t.double().numpy(), r.double().numpy()) for t, r in model.reconstruct(feats)]
    maps = []  # per level: MSE over channels + 1 - cosine, bilinear to the input (corners aligned)
    for (target, recon), grid in zip(pairs, model.grids):
        cos = (target * recon).sum(-1) / (np.linalg.norm(target, axis=-1) * np.linalg.norm(recon, axis=-1))
        s = ((target - recon) ** 2).mean(-1) + 1 - cos
        maps.append(torch.nn.functional.interpolate(torch.from_numpy(s).view(-1, 1, *grid), size=(64, 64),
                                                    mode="bilinear", align_corners=True)[:, 0].numpy())
    mean = sum(maps) / len(maps)
    expected = maps[0] if anomaly_map == "finest" else mean
    if map_sigma > 0:  # scipy's Gaussian filter (reflect border, truncate 4), image by image
        expected = np.stack([ndimage.gaussian_filter(m, map_sigma) for m in expected])
    np.testing.assert_allclose(out.anomaly_map[:, 0].double().numpy(), expected, rtol=1e-4, atol=1e-5)
    # the image score is the paper's whatever the map: the maximum of the blurred mean of the levels
    score = [ndimage.gaussian_filter(m, 4.0).max() for m in mean]
    np.testing.assert_allclose(out.score.double().numpy(), score, rtol=1e-4, atol=1e-5)
    assert not np.allclose(maps[0], mean, atol=1e-3)  # the two choices differ on these inputs


def test_an_unknown_anomaly_map_is_refused_and_the_paper_network_averages_the_levels():
    with pytest.raises(UsageError, match="unknown anomaly_map 'coarsest'; choose one of finest, all"):
        RLRModel(**TINY, anomaly_map="coarsest")
    assert RLRModel(**TINY).config.anomaly_map == "finest"
    assert PAPER_NETWORK["anomaly_map"] == "all" and RLRModel.legacy_config["anomaly_map"] == "all"


@pytest.mark.parametrize("bad", [-1.0, "4", None])
def test_a_bad_map_sigma_is_refused_and_the_paper_and_old_runs_leave_the_map_unblurred(bad):
    with pytest.raises(UsageError, match=f"map_sigma must be a number >= 0 .*got {bad!r}"):
        RLRModel(**TINY, map_sigma=bad)
    assert RLRModel(**TINY).config.map_sigma == 4.0
    assert PAPER_NETWORK["map_sigma"] == 0.0 and RLRModel.legacy_config["map_sigma"] == 0.0


def test_the_balanced_score_divides_each_level_by_its_mean_training_error():
    from rlr_fast.features import FeatureCache

    torch.manual_seed(0)
    model = RLRModel(**TINY, score="balanced", image_score=None).eval()
    train = model.features(torch.randn(20, 3, 64, 64))
    test = model.features(torch.randn(3, 3, 64, 64))
    with torch.no_grad():
        unfitted = model.predict_features(test)
    assert not model.balanced() and not model.score_fitted()
    model.fit_score(FeatureCache(train))
    assert model.balanced() and model.score_fitted()

    means = [s.mean() for s in _numpy_level_scores(model, train)]  # over every token of every training image
    np.testing.assert_allclose(model.balance.mean_error.numpy(), means, rtol=1e-4)
    maps = [torch.nn.functional.interpolate(torch.from_numpy(s / m).view(-1, 1, *grid), size=(64, 64),
                                            mode="bilinear", align_corners=True)[:, 0].numpy()
            for s, m, grid in zip(_numpy_level_scores(model, test), means, model.grids)]
    with torch.no_grad():
        out = model.predict_features(test)
    finest = np.stack([ndimage.gaussian_filter(m, 4.0) for m in maps[0]])  # the default map: blurred, sigma 4
    np.testing.assert_allclose(out.anomaly_map[:, 0].double().numpy(), finest, rtol=1e-4, atol=1e-5)
    score = [ndimage.gaussian_filter(m, 4.0).max() for m in sum(maps) / len(maps)]
    np.testing.assert_allclose(out.score.double().numpy(), score, rtol=1e-4, atol=1e-5)
    # before fit_score, the paper's score; the fitted divisors survive a state_dict round trip
    torch.manual_seed(0)
    paper = RLRModel(**TINY, score="paper", image_score=None).eval()
    with torch.no_grad():
        torch.testing.assert_close(paper.predict_features(test).score, unfitted.score)
    torch.manual_seed(1)
    again = RLRModel(**TINY, score="balanced", image_score=None).eval()
    again.load_state_dict(model.state_dict())
    assert again.balanced()
    with pytest.raises(ValueError, match="must be finite and positive"):
        again.balance.set_mean_error(torch.tensor([1.0, float("nan")]))


def test_the_default_image_score_reads_whitened_levels_and_the_map_balanced_ones():
    from rlr_fast.features import FeatureCache

    torch.manual_seed(0)
    model = RLRModel(**TINY).eval()  # score "balanced", image_score "whitened"
    assert model.score_kinds() == ("balanced", "whitened")
    train = model.features(torch.randn(24, 3, 64, 64))
    test = model.features(torch.randn(3, 3, 64, 64))
    assert not model.score_fitted()
    model.fit_score(FeatureCache(train))  # one pass fits both
    assert model.score_fitted() and model.balanced() and model.whitened()
    precisions = _numpy_whitening(model, train)
    means = [s.mean() for s in _numpy_level_scores(model, train)]

    def up(s, grid):
        return torch.nn.functional.interpolate(torch.from_numpy(s).view(-1, 1, *grid), size=(64, 64),
                                               mode="bilinear", align_corners=True)[:, 0].numpy()

    balanced = [up(s / m, g) for s, m, g in zip(_numpy_level_scores(model, test), means, model.grids)]
    whitened = [up(s, g) for s, g in zip(_numpy_level_scores(model, test, precisions), model.grids)]
    with torch.no_grad():
        out = model.predict_features(test)
    finest = np.stack([ndimage.gaussian_filter(m, 4.0) for m in balanced[0]])
    np.testing.assert_allclose(out.anomaly_map[:, 0].double().numpy(), finest, rtol=1e-4, atol=1e-5)
    score = [ndimage.gaussian_filter(m, 4.0).max() for m in sum(whitened) / len(whitened)]
    np.testing.assert_allclose(out.score.double().numpy(), score, rtol=2e-3, atol=1e-4)
    # the statistics are those a model of each score alone fits, and survive a state_dict round trip
    for kind in ("balanced", "whitened"):
        torch.manual_seed(0)
        alone = RLRModel(**TINY, score=kind, image_score=None).eval()
        alone.fit_score(FeatureCache(train))
        for name, tensor in alone.state_dict().items():
            if name.startswith(("balance.", "scores.")):
                torch.testing.assert_close(model.state_dict()[name], tensor)
    torch.manual_seed(1)
    again = RLRModel(**TINY).eval()
    again.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(again.predict_features(test).score, out.score)
    # image_score=None: the map's score for both, as runs made before image_score existed
    torch.manual_seed(0)
    single = RLRModel(**TINY, image_score=None).eval()
    assert single.score_kinds() == ("balanced",) and not hasattr(single, "scores")


def test_an_unknown_image_score_is_refused():
    with pytest.raises(UsageError, match="unknown image_score 'maxabs'"):
        RLRModel(**TINY, image_score="maxabs")
