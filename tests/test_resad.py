"""ResAD: the converter against a brute-force nearest search, the flow's likelihood against an
autograd Jacobian, the official losses against hand-computed values, scoring, checkpoints, resume."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from rlr_fast.data import DataError
from rlr_fast.features import FeatureCache
from rlr_fast.fewshot import reference_paths
from rlr_fast.models.resad import (FewShotKNN, ResADModel, conditional_flow, focal_loss, hypersphere_loss,
                                   log_likelihoods)
from rlr_fast.training import TrainConfig, load_model, read_checkpoint, save_checkpoint, train

TINY = dict(image_size=64, backbone_weights="random", coupling_layers=2, pos_embed_dim=16, shots=2)


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return ResADModel(**{**TINY, **kw})


def _brute_force_match(feature, refs):
    """For every token of feature (C, H, W), the reference token (over all refs (K, C, H, W),
    any position) of highest cosine similarity, lowest index on ties, in float64, one by one."""
    c = feature.shape[0]
    bank = refs.permute(0, 2, 3, 1).reshape(-1, c).double()
    out = torch.empty_like(feature, dtype=torch.float64)
    for y in range(feature.shape[1]):
        for x in range(feature.shape[2]):
            t = feature[:, y, x].double()
            sims = [float(t @ r / (t.norm() * r.norm())) for r in bank]
            out[:, y, x] = bank[max(range(len(sims)), key=lambda j: (sims[j], -j))]
    return out


@pytest.mark.parametrize("residual,normalize", [("squared", "none"), ("difference", "none"), ("squared", "token")])
def test_residuals_use_the_nearest_reference_token_of_any_position(residual, normalize):
    model = _model(residual=residual, normalize=normalize).eval()
    refs, images = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
    model.set_reference(refs)
    got = model.features(images)
    feats, ref_feats = model.converter.levels(images), model.converter.levels(refs)
    for level in (0, 2):  # the largest and the smallest grid
        for b in range(2):
            matched = _brute_force_match(feats[level][b], ref_feats[level])
            f = feats[level][b].double()
            if normalize == "token":  # each token (channel vector) scaled to norm sqrt(C)
                c = f.shape[0]
                f = f / f.norm(dim=0, keepdim=True) * math.sqrt(c)
                matched = matched / matched.norm(dim=0, keepdim=True) * math.sqrt(c)
            diff = f - matched
            want = diff.pow(2) if residual == "squared" else diff
            torch.testing.assert_close(got[level][b].double(), want, atol=1e-5, rtol=1e-5)


def test_a_shifted_reference_matches_across_positions():
    """The reference is the image rolled by 16 pixels (4 tokens of level 1): every token whose
    receptive field misses the borders and the seam (columns 2-8) has its exact copy at another
    position, so its residual vanishes, while a same-position residual would not."""
    model = _model(residual="difference").eval()
    image = torch.randn(1, 3, 64, 64)
    model.set_reference(torch.roll(image, shifts=16, dims=-1))
    r = model.features(image)[0][0]  # level 1 (stride 4): a 16-pixel roll is 4 tokens
    assert r[:, :, 2:9].abs().max() < 1e-5
    same_position = model.converter.levels(image)[0] - model.converter.levels(torch.roll(image, 16, -1))[0]
    assert same_position[0, :, :, 2:9].abs().amax(0).min() > 0.1


def test_a_model_without_reference_is_a_clear_error():
    model = _model().eval()
    with pytest.raises(ValueError, match="set_reference"):
        model(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="residual must be one of"):
        _model(residual="cube")


def test_flow_log_det_is_the_log_determinant_of_its_jacobian():
    torch.manual_seed(0)
    flow = conditional_flow(6, 4, coupling_layers=3, clamp=1.9).double()
    for p in flow.parameters():  # move the trainable ones away from the near-identity start
        if p.requires_grad:  # (the fixed soft permutations stay orthogonal, as FrEIA assumes)
            p.data.add_(0.3 * torch.randn_like(p))
    x, c = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    _, log_det = flow(x, c=[c])
    for i in range(3):
        jac = torch.autograd.functional.jacobian(lambda v: flow(v[None], c=[c[i:i + 1]])[0][0], x[i])
        torch.testing.assert_close(log_det[i], torch.linalg.slogdet(jac)[1])


def test_log_likelihoods_are_gaussian_log_densities_per_dimension():
    z, log_det = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    logp, logp_a = log_likelihoods(z, log_det)
    normal = torch.distributions.Normal(0.0, 1.0)
    torch.testing.assert_close(logp, (normal.log_prob(z).sum(1) + log_det) / 7)
    torch.testing.assert_close(logp_a, (normal.log_prob(z - 1).sum(1) + log_det) / 7)


def _barrier(x):
    return math.log1p(math.exp(x)) * math.exp(x)


def test_hypersphere_loss_without_anomalies():
    # norms 3 and 0: radii sqrt(3 + 1) - 1 = 1 (> r_max = 0.4) and 0 (< r_min = 0.396)
    # and a third of radius 0.398, inside the shell [r_min, r_max]: no loss
    f = torch.tensor([[3.0, 0.0], [0.0, 0.0], [1.398 ** 2 - 1, 0.0]])
    loss = hypersphere_loss(f, torch.zeros(3, dtype=torch.bool), f)
    assert loss.item() == pytest.approx(_barrier(1 - 0.4) + _barrier(0.396), rel=1e-5)


def test_hypersphere_loss_with_anomalies():
    # anomalous radius 0.2 -> r_max = min(0.9 * 0.2, 0.4) = 0.18, r_min = 0.1782; bound 0.28
    ra = 0.2
    anomalous_norm = (1 + ra) ** 2 - 1
    f = torch.tensor([[1.0, 0.0], [anomalous_norm, 0.0]])
    target = torch.tensor([[9.0, 9.0], [anomalous_norm, 1.0]])
    loss = hypersphere_loss(f, torch.tensor([False, True]), target)
    normal_radius = math.sqrt(2) - 1
    mse = 1.0 / 2  # (0^2 + 1^2) / 2 over the anomalous token's channels
    cos = anomalous_norm / math.hypot(anomalous_norm, 1.0)
    want = _barrier(normal_radius - 0.18) + mse + (1 - cos) + _barrier(0.28 - ra)
    assert loss.item() == pytest.approx(want, rel=1e-5)


def test_focal_loss_matches_the_formula():
    probs = torch.tensor([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4]])
    target = torch.tensor([0, 1, 1])
    s = 1e-5
    want = 0.0
    for p, t in zip(probs.tolist(), target.tolist()):
        pt = p[t] * (1 - s) + p[1 - t] * s + s
        want += -((1 - pt) ** 2) * math.log(pt) / 3
    assert focal_loss(probs, target).item() == pytest.approx(want, rel=1e-5)


def test_stages_follow_the_epochs():
    model = _model(first_stage=0.25)
    stages = []
    for epoch in range(8):
        model.begin_epoch(epoch, 8)
        stages.append(model.stage)
    assert stages == [1, 1, 2, 2, 2, 2, 2, 2]


def test_a_score_does_not_depend_on_the_rest_of_the_batch():
    model = _model().eval()
    model.logp_max.fill_(-1.0)
    model.set_reference(torch.randn(2, 3, 64, 64))
    images = torch.randn(3, 3, 64, 64)
    together = model(images)
    alone = model(images[1:2])
    torch.testing.assert_close(alone.score, together.score[1:2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone.anomaly_map, together.anomaly_map[1:2], atol=1e-5, rtol=1e-5)


def test_knn_baseline_is_zero_on_a_reference_image_and_one_minus_cosine_elsewhere():
    torch.manual_seed(0)
    knn = FewShotKNN(image_size=64, backbone_weights="random", score_sigma=0).eval()
    refs = torch.randn(2, 3, 64, 64)
    knn.set_reference(refs)
    out = knn(refs[:1])
    assert out.anomaly_map.abs().max() < 1e-5
    image = torch.randn(1, 3, 64, 64)
    sims = knn.features(image)
    feats, bank = knn.converter.levels(image), knn.converter.bank
    for sim, f, b in zip(sims, feats, bank):  # the similarity is the best cosine over the bank
        tokens = f[0].flatten(1).t()
        want = F.normalize(tokens, dim=1) @ F.normalize(b, dim=1).t()
        torch.testing.assert_close(sim[0, 0].flatten(), want.amax(1), atol=1e-5, rtol=1e-5)


def test_reference_paths(tmp_path):
    from PIL import Image

    for i in range(6):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{5 - i:02d}.png")
    assert [p.name for p in reference_paths(tmp_path, 3)] == ["00.png", "01.png", "02.png"]
    drawn = reference_paths(tmp_path, 3, seed=7)
    assert drawn == reference_paths(tmp_path, 3, seed=7) and len(set(drawn)) == 3 and drawn == sorted(drawn)
    assert any(reference_paths(tmp_path, 3, seed=s) != drawn for s in range(5))
    with pytest.raises(DataError, match="has 6 normal image.*7 shots"):
        reference_paths(tmp_path, 7)
    with pytest.raises(ValueError, match="positive integer"):
        reference_paths(tmp_path, 0)


def _cache(n=8, seed=0):
    """Residual-shaped random features and masks (half the images with a square defect)."""
    g = torch.Generator().manual_seed(seed)
    model = _model()
    levels = [torch.rand(n, c, *grid, generator=g) for c, grid in
              zip(model.converter.backbone.channels, model.grids)]
    masks = torch.zeros(n, 1, 64, 64)
    masks[n // 2:, :, 16:40, 16:40] = 1
    return FeatureCache(levels + [masks])


def test_checkpoint_round_trip(tmp_path):
    model = _model()
    train(model, _cache(), tmp_path, TrainConfig(epochs=2, batch_size=4), progress=False)
    assert model.boundary.abs().sum() > 0 and model.logp_max.abs().sum() > 0  # training set them
    state = read_checkpoint(tmp_path)
    assert state["model"] == "resad" and state["config"]["residual"] == "squared"
    loaded = load_model(tmp_path)
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    refs, images = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
    model.eval().set_reference(refs)
    loaded.set_reference(refs)
    with torch.no_grad():
        torch.testing.assert_close(model(images).anomaly_map, loaded(images).anomaly_map)


def test_resume_after_interruption_gives_the_same_weights(tmp_path):
    """Four epochs, stage 2 from the second; killed after two, resumed in a new model."""
    cfg = TrainConfig(epochs=4, batch_size=4, lr=1e-3, warmup_epochs=1)
    cache = _cache()
    straight = _model(first_stage=0.25)
    train(straight, cache, tmp_path / "straight", cfg, progress=False)

    import rlr_fast.training as training

    class Killed(Exception):
        pass

    original, calls = training.save_checkpoint, {"n": 0}

    def save_then_die(path, *args, **kwargs):
        original(path, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            raise Killed

    training.save_checkpoint = save_then_die
    try:
        with pytest.raises(Killed):
            train(_model(first_stage=0.25), cache, tmp_path / "resumed", cfg, progress=False)
    finally:
        training.save_checkpoint = original
    resumed = _model(seed=123, first_stage=0.25)
    history = train(resumed, cache, tmp_path / "resumed", cfg, resume=True, progress=False, log=lambda m: None)
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    log = [json.loads(line) for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3, 4]


def test_stage_two_learns_to_separate_anomalous_tokens(tmp_path):
    """On residuals where anomalous tokens are larger, training puts their log-likelihood
    under the normal tokens' (the boundary losses' purpose)."""
    n = 8
    g = torch.Generator().manual_seed(1)
    model = _model(first_stage=0.2, match_alpha=0.0)
    masks = torch.zeros(n, 1, 64, 64)
    masks[n // 2:, :, 16:48, 16:48] = 1
    levels = []
    for c, grid in zip(model.converter.backbone.channels, model.grids):
        r = 0.1 * torch.rand(n, c, *grid, generator=g)
        m = F.interpolate(masks, size=grid, mode="nearest")
        levels.append(r + 2.0 * m * torch.rand(n, c, *grid, generator=g))
    train(model, FeatureCache(levels + [masks]), tmp_path, TrainConfig(epochs=10, batch_size=8, lr=3e-3),
          progress=False)
    model.eval()
    out = model.predict_features(levels)
    inside, outside = masks.bool(), ~masks.bool()
    assert out.anomaly_map[inside].mean() > out.anomaly_map[outside].mean()
    assert out.score[n // 2:].min() > out.score[:n // 2].max()


def test_the_same_seed_builds_the_same_model():
    """FrEIA draws its soft permutations from numpy's global generator: without redrawing them
    from torch's, two models built after the same torch.manual_seed differed (and a resumed or
    distributed run could not reproduce an uninterrupted one)."""
    a, b = _model(seed=3).state_dict(), _model(seed=3).state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for block in _model(seed=3).flows[0].module_list:  # each permutation is still a rotation
        w = block.w_perm.view(block.w_perm.shape[:2]).double()
        torch.testing.assert_close(w @ w.t(), torch.eye(len(w), dtype=torch.float64), atol=1e-6, rtol=0)
        assert torch.linalg.det(w).item() == pytest.approx(1.0, abs=1e-5)
        torch.testing.assert_close(block.w_perm_inv.view(w.shape).double(), w.t())


# ------------------------------------------------------------------------------------------------
# Test-time matching, reference calibration, redrawn references, stage 1, per-term log, export
# ------------------------------------------------------------------------------------------------

def _flow_logp(model, residual, level):
    """logp (N,) of residual maps (B, C, H, W) through the constraintor and flow, by hand."""
    e = model.constraintor[level](residual).permute(0, 2, 3, 1).reshape(-1, residual.shape[1])
    pos = getattr(model, f"pos{level}").repeat(residual.shape[0], 1)
    z, log_det = model.flows[level](e, c=[pos])
    return log_likelihoods(z, log_det)[0]


def test_calibration_is_the_leave_one_reference_out_maximum():
    model = _model(shots=3).eval()
    refs = torch.randn(3, 3, 64, 64)
    model.set_reference(refs)
    other = _model(shots=3).eval()  # the same weights; its own converter, set to K - 1 references
    other.load_state_dict(model.state_dict())
    want = torch.full((3,), -float("inf"))
    with torch.no_grad():
        for i in range(3):
            other.converter.set_reference(torch.cat([refs[:i], refs[i + 1:]]))
            residuals = other.features(refs[i:i + 1])[:3]
            for level in range(3):
                want[level] = max(want[level], _flow_logp(model, residuals[level], level).max())
    torch.testing.assert_close(model.logp_ref, want, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(model.normalizer(), want, atol=1e-4, rtol=1e-5)
    model.logp_max.fill_(-3.0)  # one reference: no other to score it against, training's maximum
    model.set_reference(refs[:1])
    assert torch.isnan(model.logp_ref).all() and torch.equal(model.normalizer(), model.logp_max)
    model.config.calibrate = False
    model.set_reference(refs)
    assert torch.equal(model.normalizer(), model.logp_max)


def test_calibration_leaves_the_training_state_alone():
    model = _model(shots=2).train()
    running = [m.running_mean.clone() for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    model.set_reference(torch.randn(2, 3, 64, 64))
    assert model.training
    after = [m.running_mean for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(torch.equal(a, b) for a, b in zip(running, after))


def test_test_time_matching_blends_the_nearest_reference_map():
    """map(alpha) = (1 - alpha) map(0) + alpha * blur(mean over levels of 1 - best cosine)."""
    from rlr_fast.models.layers import gaussian_blur

    alpha = 0.4
    model = _model(match_alpha=alpha).eval()
    plain = _model(match_alpha=0.0).eval()
    model.logp_max.fill_(-1.0)
    plain.logp_max.fill_(-1.0)
    refs, images = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
    model.set_reference(refs)
    plain.set_reference(refs)
    with torch.no_grad():
        got, base = model(images), plain(images)
        maps = []
        for f, bank in zip(model.converter.levels(images), model.converter.bank):
            tokens = f.flatten(2).transpose(1, 2)  # (B, HW, C)
            best = (F.normalize(tokens, dim=2) @ F.normalize(bank, dim=1).t()).amax(2)
            sim = best.view(f.shape[0], 1, *f.shape[-2:])
            maps.append(F.interpolate(1 - sim, size=(64, 64), mode="bilinear", align_corners=True))
        knn = gaussian_blur(torch.stack(maps).mean(0), model.config.score_sigma)
    want = (1 - alpha) * base.anomaly_map + alpha * knn
    torch.testing.assert_close(got.anomaly_map, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.score, want.amax(dim=(1, 2, 3)), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="match_alpha"):
        _model(match_alpha=1.5)


def _seen_classes(root, classes=("aa", "bb"), n=6, size=64):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for ci, cls in enumerate(classes):
        for i in range(n):
            folder = root / cls / "train" / "good"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (torch.rand(size, size, 3, generator=g) * 255).byte().numpy()
            Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return root


def test_training_references_are_redrawn_per_batch_and_give_the_converters_residuals(tmp_path):
    from rlr_fast.fewshot import load_references, residual_cache
    from rlr_fast.data import list_images

    root = _seen_classes(tmp_path)
    model = _model(shots=2).eval()
    cache = residual_cache(model, root, shots=2, anomalies=False, progress=False, log=lambda *a: None)
    assert len(cache) == 12  # every normal image trains, and is a reference of the others
    items = [0, 1, 7]  # class aa's images 0 and 1, class bb's image 1
    torch.manual_seed(5)
    got = cache.batch(items)
    torch.manual_seed(5)  # the same draws, by hand: class by class, the batch's own images left out
    drawn = {0: cache.draw(0, torch.tensor([0, 1])), 1: cache.draw(1, torch.tensor([1]))}
    assert not {0, 1} & set(drawn[0].tolist()) and 1 not in drawn[1].tolist() and len(drawn[0]) == 2
    for row, (cls, index) in zip(range(3), [("aa", 0), ("aa", 1), ("bb", 1)]):
        paths = list_images(root / cls / "train" / "good")
        model.set_reference(load_references([paths[i] for i in drawn[0 if cls == "aa" else 1]], 64))
        want = model.features(load_references([paths[index]], 64))[:3]
        for level in range(3):
            torch.testing.assert_close(got[level][row:row + 1], want[level], atol=1e-4, rtol=1e-4)
    assert got[3].shape == (3, 1, 64, 64) and got[3].abs().sum() == 0  # normal images: empty masks
    draws = {tuple(cache.draw(0, torch.tensor([0])).tolist()) for _ in range(20)}
    assert len(draws) > 1  # redrawn, not fixed
    fixed = residual_cache(model, root, shots=2, anomalies=True, progress=False, log=lambda *a: None,
                           redraw=False, defect_kinds=["hole"], defect_copies=2)
    assert len(fixed) == 2 * (4 + 4 * 2)  # per class 4 non-reference images, each twice with a defect
    assert all(torch.equal(fixed.draw(c, torch.tensor([2])), torch.tensor([0, 1])) for c in (0, 1))
    masks = fixed.batch(range(len(fixed)))[3]
    assert (masks.flatten(1).amax(1) > 0).sum() == 16
    with pytest.raises(ValueError, match="defect kinds"):
        residual_cache(model, root, shots=2, progress=False, log=lambda *a: None, defect_kinds=["dent"])


def test_stage_one_keeps_anomalous_images_out_of_the_batch_norm_statistics():
    """One stage-1 step on a batch of two normal and two defective images moves the batch norm's
    running statistics exactly as the two normal images alone do."""
    cache = _cache(n=4)  # images 2 and 3 have a defect
    feats = cache.batch([0, 1, 2, 3])
    a, b = _model().train(), _model().train()
    a.stage = b.stage = 1
    a.loss(feats)
    b.loss([f[:2] for f in feats])
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        if "running" in name:
            assert torch.equal(x, y), name
    untouched = _model().state_dict()
    assert not torch.equal(a.constraintor[0][1].running_mean, untouched["constraintor.0.1.running_mean"])


def test_short_training_lowers_each_term_that_should_fall(tmp_path):
    """Residual-like maps with larger anomalous tokens: over a short training the likelihood and
    constraintor terms of stage 2 fall (the boundary term chases a moving boundary and is not
    asked to); every term is logged per epoch in log.jsonl."""
    n = 16
    g = torch.Generator().manual_seed(2)
    model = _model(first_stage=0.1, match_alpha=0.0)
    masks = torch.zeros(n, 1, 64, 64)
    masks[n // 2:, :, 8:40, 16:48] = 1
    levels = []
    for c, grid in zip(model.converter.backbone.channels, model.grids):
        m = F.interpolate(masks, size=grid, mode="nearest")
        levels.append(0.2 * torch.rand(n, c, *grid, generator=g) + 2.0 * m * torch.rand(n, c, *grid, generator=g))
    train(model, FeatureCache(levels + [masks]), tmp_path, TrainConfig(epochs=8, batch_size=8, lr=3e-3, amp="none"),
          progress=False, log=lambda m: None)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    names = {"nll_normal", "nll_anomalous", "focal", "boundary", "constraint_shell", "constraint_invariance",
             "constraint_push_out"}
    assert all(set(r["terms"]) == names for r in log)
    for r in log:  # the terms add up to the loss
        assert sum(r["terms"].values()) == pytest.approx(r["loss"], rel=1e-5)
    first, last = log[1]["terms"], log[-1]["terms"]  # the first and last stage-2 epochs
    for name in ("nll_normal", "nll_anomalous", "focal", "constraint_shell", "constraint_invariance"):
        assert last[name] < first[name], (name, first[name], last[name])


def test_export_of_a_resad_run_is_a_one_line_error(tmp_path, capsys):
    from rlr_fast.cli import main

    model = _model()
    save_checkpoint(tmp_path / "checkpoint.pt", model)
    for fmt in ("onnx", "openvino"):
        code = main(["export", "--run", str(tmp_path), "--format", fmt])
        err = capsys.readouterr().err.strip()
        assert code != 0 and "resad" in err.lower() and "weights" in err and "Traceback" not in err
        assert len(err.splitlines()) == 1
    assert main(["export", "--run", str(tmp_path), "--format", "weights"]) == 0
    assert load_model(tmp_path / "weights.pt").name == "resad"
