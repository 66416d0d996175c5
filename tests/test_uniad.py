"""UniADModel: shapes, fast and naive paths agree, the neighbour mask masks, training learns."""
import pytest
import torch

from rlr_fast.features import extract_features
from rlr_fast.models.uniad import UniADModel
from rlr_fast.training import TrainConfig, train

TINY = dict(image_size=128, backbone="tf_efficientnet_lite0", backbone_weights="random", hidden=32, num_heads=4,
            ffn_dim=64, num_encoder_layers=2, num_decoder_layers=2, window=7)


def test_paper_defaults():
    model = UniADModel(backbone_weights="random")
    cfg = model.config
    assert sum(model.backbone.channels) == 272 and model.grid == (14, 14)
    assert (cfg.hidden, cfg.num_heads, cfg.ffn_dim, cfg.dropout, cfg.window, cfg.jitter_scale) == \
        (256, 8, 1024, 0.1, 7, 20.0)
    assert len(model.encoder) == 4 and len(model.decoder) == 4
    assert model.decoder[0].query.shape == (196, 256)
    assert model.decoder[0].query is not model.decoder[1].query  # a learned query per decoder layer


def test_shapes():
    model = UniADModel(**TINY).eval()
    out = model(torch.randn(2, 3, 128, 128))
    assert out.anomaly_map.shape == (2, 1, 128, 128) and out.score.shape == (2,)
    assert (out.anomaly_map >= 0).all()


def test_fast_and_naive_give_the_same_outputs_and_gradients():
    torch.manual_seed(0)
    fast = UniADModel(backend="torch", **TINY)
    naive = UniADModel(backend="dense", **TINY)
    naive.load_state_dict(fast.state_dict())
    images = torch.randn(3, 3, 128, 128)
    fast.eval(), naive.eval()
    with torch.no_grad():
        a, b = fast(images), naive(images)
    torch.testing.assert_close(a.anomaly_map, b.anomaly_map, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.score, b.score, rtol=1e-4, atol=1e-5)
    fast.train(), naive.train()
    feats = fast.features(images)
    torch.manual_seed(1)
    fast.loss(feats).backward()
    torch.manual_seed(1)  # same jitter and dropout
    naive.loss(feats).backward()
    for (name, p), q in zip(fast.named_parameters(), naive.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_every_attention_is_neighbour_masked():
    """A token's attention output ignores the tokens inside its 7x7 window and sees the others."""
    model = UniADModel(**TINY).eval()
    attn = model.encoder[0].attn
    x = torch.randn(1, 64, 32)
    i = 3 * 8 + 3  # (3, 3) on the 8x8 grid
    inside, outside = 5 * 8 + 5, 7 * 8 + 7  # (5, 5) is within 3 rows/cols, (7, 7) is not
    with torch.no_grad():
        base = attn(x, x, x)[0, i]
        for j, changes in ((inside, False), (outside, True)):
            y = x.clone()
            y[0, j] += 5.0
            moved = not torch.allclose(attn(y, y, y)[0, i], base, atol=1e-6)
            assert moved == changes, j
    for layer in model.decoder:
        assert layer.attn_memory.window == (7, 7) and layer.attn_previous.window == (7, 7)


def test_training_lowers_the_loss(tmp_path):
    torch.manual_seed(0)
    model = UniADModel(**TINY)
    data = [{"image": x} for x in torch.randn(8, 3, 128, 128)]
    cache = extract_features(model, data, batch_size=4, progress=False)
    history = train(model, cache, tmp_path, TrainConfig(epochs=15, batch_size=4, lr=5e-3, optimizer="adamw",
                                                         weight_decay=1e-4, grad_clip=0.1), progress=False)
    assert history[-1]["loss"] < 0.7 * history[0]["loss"], [h["loss"] for h in history]


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="backbone weights file not found"):
        UniADModel(backbone_weights=str(tmp_path / "efficientnet_b4.pth"))
