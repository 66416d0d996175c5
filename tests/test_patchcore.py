"""PatchCore: memory bank, greedy k-center coreset, scores, checkpoints, command line and export."""
import csv
import json
import math

import numpy as np
import pytest
import torch

from rlr_fast.cli import main
from rlr_fast.data import MVTecDataset
from rlr_fast.errors import UsageError
from rlr_fast.models.patchcore import (PatchCoreModel, coreset_indices, johnson_lindenstrauss_dim, k_center_greedy,
                                       reweighted_score, sparse_random_projection)
from rlr_fast.training import load_model, save_checkpoint

TINY = dict(image_size=64, backbone_weights="random")


def _tokens(embedding):
    return embedding.flatten(2).transpose(1, 2).reshape(-1, embedding.shape[1])


# ------------------------------------------------------------------------------------------------
# Memory bank and coreset
# ------------------------------------------------------------------------------------------------

def test_locally_aware_features_are_pooled_levels_at_the_first_grid():
    model = PatchCoreModel(**TINY).eval()
    images = torch.randn(2, 3, 64, 64)
    (embedding,) = model.features(images)
    first, second = model.backbone(images)
    pool = torch.nn.AvgPool2d(3, 1, 1)
    up = torch.nn.functional.interpolate(pool(second), size=first.shape[-2:], mode="bilinear", align_corners=False)
    assert embedding.shape == (2, first.shape[1] + second.shape[1], 8, 8)
    torch.testing.assert_close(embedding, torch.cat([pool(first), up], 1))


def test_bank_is_every_training_token_at_ratio_one():
    model = PatchCoreModel(**TINY, coreset_ratio=1.0)
    feats = model.features(torch.randn(3, 3, 64, 64))
    info = model.fit(feats)
    assert info == {"tokens": 3 * 64, "bank": 3 * 64, "coreset_ratio": 1.0}
    assert torch.equal(model.memory_bank, _tokens(feats[0]))


def test_bank_is_the_coreset_at_a_ratio():
    model = PatchCoreModel(**TINY, coreset_ratio=0.25)
    feats = model.features(torch.randn(3, 3, 64, 64))
    model.fit(feats, seed=3)
    tokens = _tokens(feats[0])
    index = coreset_indices(tokens, 0.25, seed=3)
    assert model.memory_bank.shape == (48, tokens.shape[1]) and len(set(index.tolist())) == 48
    assert torch.equal(model.memory_bank, tokens[index])


def brute_force_k_center(points, count, start):
    """Each step: every point's distance to its nearest chosen point, in float64; take the largest."""
    chosen = [start]
    p = points.double()
    while len(chosen) < count:
        d = torch.cdist(p, p[chosen], compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values
        chosen.append(int(d.argmax()))
    return chosen


def test_k_center_greedy_takes_the_farthest_point_each_step():
    # by hand: from 0 the farthest is 10 (index 3); then 2 is 2 away from {0, 10}, 1 only 1, 7 3 away: 7
    line = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [10.0, 0.0], [7.0, 0.0]])
    assert k_center_greedy(line, 4, 0).tolist() == [0, 3, 4, 2]
    g = torch.Generator().manual_seed(0)
    points = torch.randn(200, 2, generator=g)
    assert k_center_greedy(points, 30, 17).tolist() == brute_force_k_center(points, 30, 17)


def test_coreset_is_deterministic_given_the_seed():
    tokens = torch.randn(500, 8)
    a, b = coreset_indices(tokens, 0.1, seed=1), coreset_indices(tokens, 0.1, seed=1)
    assert torch.equal(a, b) and len(a) == 50 == len(set(a.tolist()))
    assert not torch.equal(a, coreset_indices(tokens, 0.1, seed=2))  # another random start
    assert len(coreset_indices(tokens, 0.001)) == 1  # at least one token


def test_selection_projects_wide_tokens_as_anomalib_does():
    """With more channels than the Johnson-Lindenstrauss dimension the selection runs on very
    sparse random projections (the greedy steps on the projected points), else on the tokens."""
    n, c = 400, 600
    k = johnson_lindenstrauss_dim(n, 0.9)
    assert k == int(4 * math.log(n) / (0.9 ** 2 / 2 - 0.9 ** 3 / 3)) and k < c
    p = sparse_random_projection(c, k, torch.Generator().manual_seed(0))
    scale = math.sqrt(math.sqrt(c)) / math.sqrt(k)  # sqrt(1 / density) / sqrt(k)
    nonzero = p[p != 0]
    assert p.shape == (c, k) and (nonzero > 0).any() and (nonzero < 0).any()
    torch.testing.assert_close(nonzero.abs(), torch.full_like(nonzero, scale))
    assert abs(float((p != 0).float().mean()) - 1 / math.sqrt(c)) < 0.01  # density 1/sqrt(C)
    tokens = torch.randn(n, c)
    g = torch.Generator().manual_seed(4)
    projection = sparse_random_projection(c, k, g)
    start = int(torch.randint(n, (1,), generator=g))
    expected = k_center_greedy(tokens @ projection, int(n * 0.1), start)
    assert torch.equal(coreset_indices(tokens, 0.1, seed=4), expected)


# ------------------------------------------------------------------------------------------------
# Scores
# ------------------------------------------------------------------------------------------------

def test_training_image_scores_zero_and_a_foreign_patch_scores_higher(data):
    """Embedded Lite0 weights, real demo textures: fitted on brick's training images at ratio 1,
    a training image's tokens are in the bank (distance ~0: fp32 rounding of ||x||^2 - 2 max);
    a gravel patch pasted into it scores above every brick token outside the patch."""
    model = PatchCoreModel(image_size=64, coreset_ratio=1.0).eval()
    brick = torch.stack([item["image"] for item in MVTecDataset(data, classes=["brick"], split="train",
                                                                   image_size=64)])
    gravel = MVTecDataset(data, classes=["gravel"], split="train", image_size=64)[0]["image"]
    model.fit(model.features(brick))
    dist, _, tokens = model.patch_scores(model.features(brick[:1])[0])
    scale = float(tokens.norm(dim=-1).mean())
    assert float(dist.max()) < 1e-2 * scale
    out = model(brick[:1])
    assert float(out.score) < 1e-2 * scale
    pasted = brick[:1].clone()
    pasted[..., 16:48, 16:48] = gravel[..., 16:48, 16:48]
    dist, _, _ = model.patch_scores(model.features(pasted)[0])
    grid = dist.view(8, 8)
    inside = grid[3:5, 3:5]  # stride 8: the centre of the pasted 32 x 32 pixels
    outside = torch.ones(8, 8, dtype=torch.bool)
    outside[1:7, 1:7] = False  # tokens whose 3x3 pool and receptive field stay mostly brick
    assert float(inside.min()) > float(grid[outside].max())
    assert float(model(pasted).score) > 10 * float(out.score)


def direct_score(patch_scores, tokens, bank, k):
    """The reweighting from its formula, in float64 with explicit distances and sorting."""
    out = []
    for b in range(patch_scores.shape[0]):
        i = int(patch_scores[b].argmax())
        m_test = tokens[b, i].double()
        d_bank = (bank.double() - m_test).norm(dim=1)
        star = int(d_bank.argmin())
        s = float(d_bank[star])
        m_star = bank[star].double()
        order = sorted(range(bank.shape[0]), key=lambda j: float((bank[j].double() - m_star).norm()))[:k]
        d = torch.tensor([float((m_test - bank[j].double()).norm()) for j in order], dtype=torch.float64)
        out.append((1 - torch.softmax(d, 0)[0].item()) * s)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("k", [1, 3, 9, 50])
def test_image_score_reweighting_matches_its_formula(k):
    g = torch.Generator().manual_seed(5)
    bank = torch.randn(40, 6, generator=g)
    tokens = torch.randn(3, 20, 6, generator=g)
    from rlr_fast.ops import nearest_reference

    locations, patch_scores = nearest_reference(tokens, bank, metric="l2", backend="torch")
    got = reweighted_score(patch_scores, locations, tokens, bank, k)
    expected = direct_score(patch_scores, tokens, bank, min(k, 40)) if k > 1 else patch_scores.double().amax(1)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


def test_anomaly_map_is_the_upsampled_blurred_patch_scores():
    from rlr_fast.models.layers import gaussian_blur

    model = PatchCoreModel(**TINY, coreset_ratio=0.5)
    model.fit(model.features(torch.randn(2, 3, 64, 64)))
    model.eval()
    images = torch.randn(2, 3, 64, 64)
    out = model(images)
    dist, _, _ = model.patch_scores(model.features(images)[0])
    expected = gaussian_blur(dist.view(2, 1, 8, 8).repeat_interleave(8, 2).repeat_interleave(8, 3), 4.0)
    assert out.anomaly_map.shape == (2, 1, 64, 64)
    torch.testing.assert_close(out.anomaly_map, expected)


def test_unfitted_model_and_bad_settings_are_clear_errors():
    model = PatchCoreModel(**TINY).eval()
    with pytest.raises(UsageError, match="empty memory bank: fit it first"):
        model(torch.randn(1, 3, 64, 64))
    with pytest.raises(UsageError, match="no loss to train"):
        model.train()(torch.randn(1, 3, 64, 64))
    with pytest.raises(UsageError, match=r"coreset_ratio must be a number in \(0, 1\]"):
        PatchCoreModel(**TINY, coreset_ratio=0)
    with pytest.raises(UsageError, match="num_neighbors must be an integer >= 1"):
        PatchCoreModel(**TINY, num_neighbors=0)


# ------------------------------------------------------------------------------------------------
# Checkpoint, command line, export
# ------------------------------------------------------------------------------------------------

def test_checkpoint_round_trip(tmp_path):
    model = PatchCoreModel(**TINY, coreset_ratio=0.3)
    model.fit(model.features(torch.randn(2, 3, 64, 64)))
    save_checkpoint(tmp_path / "checkpoint.pt", model)
    loaded = load_model(tmp_path)
    assert loaded.name == "patchcore" and loaded.config == model.config
    assert torch.equal(loaded.memory_bank, model.memory_bank) and loaded.memory_bank.shape[0] == 38
    images = torch.randn(2, 3, 64, 64)
    model.eval()
    a, b = model(images), loaded(images)
    assert torch.equal(a.score, b.score) and torch.equal(a.anomaly_map, b.anomaly_map)


def test_cli_train_test_predict(data, tmp_path, capsys):
    run = tmp_path / "run"
    common = ["--model", "patchcore", "--data", str(data), "--out", str(run), "--image-size", "64",
              "--backbone-weights", "random", "--no-progress"]
    assert main(["train", *common, "--coreset-ratio", "0.5", "--epochs", "3", "--lr", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "note: --epochs and --lr ignored: patchcore is fitted in one pass" in out
    assert "memory bank: 256 of 512 training tokens (coreset ratio 0.5" in out  # 8 images x 8 x 8 tokens
    assert "fitted in" in out and "memory bank of 256 tokens" in out
    config = json.loads((run / "config.json").read_text())
    assert config["model"] == "patchcore" and config["config"]["coreset_ratio"] == 0.5
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and log[0]["bank"] == 256 and log[0]["tokens"] == 512 and log[0]["images"] == 8
    assert load_model(run).memory_bank.shape[0] == 256

    assert main(["train", *common, "--resume"]) == 2  # fitted, not trained: nothing to resume
    assert "without its training state" in capsys.readouterr().err

    assert main(["test", "--data", str(data), "--run", str(run), "--no-progress"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["classes"]) == {"brick", "gravel"}
    assert all(0.0 <= v <= 1.0 for v in metrics["mean"].values())
    assert "image AUROC" in capsys.readouterr().out

    folders = sorted(str(f) for f in (data / "brick" / "test").iterdir() if f.is_dir())  # good and the defects
    assert main(["predict", "--run", str(run), *folders, "--out", str(tmp_path / "pred")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "pred" / "scores.csv")))
    assert len(rows) == 6 and all(float(r["score"]) >= 0 and r["label"] in ("normal", "anomalous") for r in rows)


def test_cli_notes_and_refuses_coreset_ratio(data, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--model", "patchcore", "--data", str(data), "--out", str(tmp_path / "r"),
              "--coreset-ratio", "1.5"])
    assert "--coreset-ratio: must be a finite number in (0, 1], got 1.5" in capsys.readouterr().err
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "rlr"), "--image-size", "64",
                 "--backbone-weights", "random", "--epochs", "1", "--batch-size", "4", "--coreset-ratio", "0.2",
                 "--no-progress"]) == 0
    assert "--coreset-ratio ignored: only PatchCore uses it" in capsys.readouterr().out


@pytest.fixture(scope="module")
def exported(data, tmp_path_factory):
    """A fitted run (random backbone, gravel's training images, ratio 0.5) exported once as ONNX,
    OpenVINO and weights with `rlr-fast export`."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("openvino")
    torch.manual_seed(0)
    model = PatchCoreModel(**TINY, coreset_ratio=0.5)
    images = torch.stack([item["image"] for item in MVTecDataset(data, classes=["gravel"], split="train",
                                                                    image_size=64)])
    model.fit(model.features(images))
    run = tmp_path_factory.mktemp("exported") / "run"
    save_checkpoint(run / "checkpoint.pt", model)
    for fmt in ("onnx", "openvino", "weights"):
        assert main(["export", "--run", str(run), "--format", fmt]) == 0
    return run, model


def test_onnx_export_matches_eager(exported):
    import onnxruntime as ort

    run, _ = exported
    session = ort.InferenceSession(str(run / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == ["batch", 3, 64, 64]
    eager = load_model(run)
    for batch in (1, 4):
        images = torch.randn(batch, 3, 64, 64)
        got = session.run(None, {"images": images.numpy()})
        with torch.no_grad():
            out = eager(images)
        for g, e in zip(got, (out.anomaly_map.numpy(), out.score.numpy())):
            scale = float(np.abs(e).max())
            assert float(np.abs(g - e).max()) <= 1e-4 * scale


def test_predict_with_exported_engines_matches_torch(data, exported, tmp_path):
    """`rlr-fast predict --engine onnxruntime|openvino` on the same images as `--engine torch`:
    the same scores; the weights file loads the same bank."""
    run, model = exported
    assert torch.equal(load_model(run / "weights.pt").memory_bank, model.memory_bank)
    folder = str(data / "gravel" / "test" / "good")
    scores = {}
    for engine in ("torch", "onnxruntime", "openvino"):
        out = tmp_path / engine
        assert main(["predict", "--run", str(run), folder, "--engine", engine, "--out", str(out), "--no-heatmaps",
                     "--threshold", "1.0"]) == 0
        scores[engine] = [float(r["score"]) for r in csv.DictReader(open(out / "scores.csv"))]
    assert len(scores["torch"]) == 2
    for engine in ("onnxruntime", "openvino"):
        np.testing.assert_allclose(scores[engine], scores["torch"], rtol=1e-4)
