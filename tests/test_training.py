"""Training on cached features: checkpoints, resume, recipes."""
import json

import pytest
import torch

from rlr_fast.features import extract_features
from rlr_fast.models.rlr import RLRModel
from rlr_fast.training import (CHECKPOINT, RLR_FAST_EPOCHS, TrainConfig, load_model, read_checkpoint, recipe,
                               save_checkpoint, train)

TINY = dict(image_size=64, backbone_weights="random", num_layers=1, dims=(32, 64), num_heads=4)


class _Images(torch.utils.data.Dataset):
    def __init__(self, n):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, 64, 64, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[i], "path": f"{i}.png"}


def _model(seed=0):
    torch.manual_seed(seed)
    return RLRModel(**TINY)


def test_feature_cache_matches_the_backbone_in_memory_and_on_disk(tmp_path):
    model = _model()
    data = _Images(10)
    mem = extract_features(model, data, batch_size=4, progress=False)
    disk = extract_features(model, data, batch_size=4, cache_dir=tmp_path, memory_limit=0, progress=False)
    assert isinstance(mem.levels[0], torch.Tensor) and not isinstance(disk.levels[0], torch.Tensor)
    assert (tmp_path / "level0.npy").is_file()
    direct = model.features(data.x[[7, 2]])
    for a, b, c in zip(mem.batch([7, 2]), disk.batch([7, 2]), direct):
        torch.testing.assert_close(a, c)
        torch.testing.assert_close(b, c)


def test_checkpoint_round_trip(tmp_path):
    model = _model()
    opt = torch.optim.Adam(model.parameters())
    save_checkpoint(tmp_path / "ck.pt", model, opt, epoch=3)
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temporary file left
    state = read_checkpoint(tmp_path / "ck.pt")
    assert state["epoch"] == 3 and state["model"] == "rlr"
    loaded = load_model(tmp_path / "ck.pt")
    assert not loaded.training
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    images = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(images).anomaly_map, loaded(images).anomaly_map)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_model(tmp_path / "nothing")


def test_resume_after_interruption_gives_the_same_weights(tmp_path):
    cfg = TrainConfig(epochs=4, batch_size=4, lr=1e-3, warmup_epochs=1)
    cache = extract_features(_model(), _Images(12), progress=False)

    straight = _model()
    train(straight, cache, tmp_path / "straight", cfg, progress=False)

    class Killed(Exception):
        pass

    interrupted = _model()
    calls = {"n": 0}

    # interrupt after two epochs: train with epochs=2 writes the epoch-2 checkpoint, as a killed
    # run would leave it (the schedule still spans 4 epochs because the config says so)
    import rlr_fast.training as training

    original = training.save_checkpoint

    def save_then_die(path, *args, **kwargs):
        original(path, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            raise Killed

    training.save_checkpoint = save_then_die
    try:
        with pytest.raises(Killed):
            train(interrupted, cache, tmp_path / "resumed", cfg, progress=False, log=lambda msg: None)
    finally:
        training.save_checkpoint = original
    assert read_checkpoint(tmp_path / "resumed")["epoch"] == 2
    resumed = _model(seed=123)  # a fresh process would build the model anew
    history = train(resumed, cache, tmp_path / "resumed", cfg, resume=True, progress=False, log=lambda msg: None)
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    log = [json.loads(line) for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3, 4]


def test_resume_refuses_another_model(tmp_path):
    cache = extract_features(_model(), _Images(4), progress=False)
    train(_model(), cache, tmp_path, TrainConfig(epochs=1, batch_size=4), progress=False)
    other = RLRModel(**{**TINY, "num_layers": 2})
    with pytest.raises(ValueError, match="different model or configuration"):
        train(other, cache, tmp_path, TrainConfig(epochs=2, batch_size=4), resume=True, progress=False)


def test_the_paper_score_needs_no_fit_and_training_leaves_it_alone(tmp_path):
    cache = extract_features(_model(), _Images(8), progress=False)
    lines = []
    paper = RLRModel(**{**TINY, "score": "paper", "image_score": None})
    train(paper, cache, tmp_path, TrainConfig(epochs=1, batch_size=4), progress=False, log=lines.append)
    served = load_model(tmp_path, thresholds=False)
    assert served.config.score == "paper" and served.score_fitted() and not served.whitened()
    assert not served.balanced() and not hasattr(served, "scores") and not hasattr(served, "balance")
    assert not any("fitted the score" in line for line in lines)


def test_the_default_balanced_score_is_fitted_on_the_served_weights_after_training(tmp_path):
    cache = extract_features(_model(), _Images(8), progress=False)
    lines = []
    train(_model(), cache, tmp_path, TrainConfig(epochs=2, batch_size=4), progress=False, log=lines.append)
    assert any(line.startswith("fitted the score's statistics on 8 training images") for line in lines)
    served = load_model(tmp_path, thresholds=False)
    assert served.config.score == "balanced" and served.balanced() and served.score_fitted()
    # the divisors are the served model's mean level scores over the training features
    means = []
    with torch.no_grad():
        for target, recon in served.reconstruct(cache.batch(range(len(cache)), torch.device("cpu"))):
            t, r = target.double(), recon.double()
            cos = (t * r).sum(-1) / (t.norm(dim=-1) * r.norm(dim=-1))
            means.append(float(((t - r).pow(2).mean(-1) + 1 - cos).mean()))
    torch.testing.assert_close(served.balance.mean_error, torch.tensor(means), rtol=1e-4, atol=0)


def test_a_checkpoint_from_before_the_new_defaults_loads_as_it_was_trained(tmp_path):
    # Checkpoints written before dim_base, feature_norm and score existed store their dims and
    # depth but not those keys; they were the paper's network on raw tokens with the paper's
    # score and must load as such.
    torch.manual_seed(0)
    old = RLRModel(**{**TINY, "dims": None, "dim_base": 128, "feature_norm": "none", "score": "paper"})
    save_checkpoint(tmp_path / CHECKPOINT, old)
    state = torch.load(tmp_path / CHECKPOINT, weights_only=False)
    for key in ("dim_base", "feature_norm", "score"):
        del state["config"][key]
    torch.save(state, tmp_path / CHECKPOINT)
    loaded = load_model(tmp_path)
    assert (loaded.config.dims, loaded.config.feature_norm, loaded.config.score) == ((256, 512), "none", "paper")
    images = torch.rand(2, 3, 64, 64)
    old.eval()
    with torch.no_grad():
        assert torch.equal(loaded(images).anomaly_map, old(images).anomaly_map)


def test_training_lowers_the_loss(tmp_path):
    cache = extract_features(_model(), _Images(8), progress=False)
    history = train(_model(), cache, tmp_path, TrainConfig(epochs=8, batch_size=4, lr=2e-3), progress=False)
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert (tmp_path / CHECKPOINT).is_file() and (tmp_path / "config.json").is_file()


def test_recipes():
    paper = recipe("paper")
    assert (paper.lr, paper.batch_size, paper.epochs, paper.schedule, paper.optimizer) == \
        (1e-4, 4, 200, "constant", "adam")
    assert recipe("fast", epochs=3).epochs == 3
    assert recipe("rlr-fast").epochs == RLR_FAST_EPOCHS and recipe("fast").epochs == 20
    assert recipe("rlr-fast").batch_size == 2 and recipe("fast").batch_size == 8
    with pytest.raises(ValueError, match="unknown recipe"):
        recipe("slow")


def test_resume_restores_the_cuda_rng_state(tmp_path, monkeypatch):
    # No GPU here: a stand-in for the GPUs' generator states, and a record of what resume restores.
    import rlr_fast.checkpoints as checkpoints
    import rlr_fast.training as training

    states = [torch.tensor([1, 2, 3], dtype=torch.uint8), torch.tensor([4, 5, 6], dtype=torch.uint8)]
    restored = []
    # save_checkpoint (rlr_fast.checkpoints) records the state; the training loop restores it
    monkeypatch.setattr(checkpoints, "_cuda_rng_state", lambda: [s.clone() for s in states])
    monkeypatch.setattr(training, "_restore_cuda_rng", lambda got: restored.append([s.tolist() for s in got]))
    cache = extract_features(_model(), _Images(4), progress=False)
    train(_model(), cache, tmp_path, TrainConfig(epochs=1, batch_size=4), progress=False)
    assert [s.tolist() for s in read_checkpoint(tmp_path)["cuda_rng"]] == [[1, 2, 3], [4, 5, 6]]
    assert restored == []
    train(_model(), cache, tmp_path, TrainConfig(epochs=2, batch_size=4), resume=True, progress=False,
          log=lambda msg: None)
    assert restored == [[[1, 2, 3], [4, 5, 6]]]


def test_restore_cuda_rng_sets_each_gpus_generator(monkeypatch):
    from rlr_fast.training import _restore_cuda_rng

    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # fewer GPUs than in the checkpoint
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((device, state.tolist())))
    _restore_cuda_rng([torch.tensor([1, 2], dtype=torch.uint8), torch.tensor([3, 4], dtype=torch.uint8)])
    assert restored == [(0, [1, 2])]
    _restore_cuda_rng(None)  # a checkpoint written without CUDA
    assert restored == [(0, [1, 2])]


def test_clock_waits_for_the_gpu_before_reading_the_time(monkeypatch):
    import time

    from rlr_fast.timing import clock

    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append(("sync", device)))
    monkeypatch.setattr(time, "perf_counter", lambda: events.append(("clock", None)) or 42.0)
    assert clock("cuda:1") == 42.0
    assert events == [("sync", torch.device("cuda", 1)), ("clock", None)]
    events.clear()
    assert clock("cpu") == 42.0 and events == [("clock", None)]


def _val_images(n):
    class Held(_Images):
        def __init__(self, n):
            g = torch.Generator().manual_seed(1)  # other images than the training ones
            self.x = torch.randn(n, 3, 64, 64, generator=g)
    return Held(n)


def test_a_short_training_lowers_the_loss_and_keeps_the_best_epoch(tmp_path):
    from rlr_fast.training import BEST

    cache = extract_features(_model(), _Images(16), progress=False)
    val = extract_features(_model(), _val_images(4), progress=False)
    history = train(_model(), cache, tmp_path, TrainConfig(epochs=6, batch_size=4, lr=1e-3, warmup_epochs=1,
                                                           amp="none"),
                    progress=False, log=lambda msg: None, val_cache=val)
    losses, held = [r["loss"] for r in history], [r["val_loss"] for r in history]
    assert losses[-1] < 0.6 * losses[0] and held[-1] < held[0]
    assert all(r["grad_norm"] > 0 and "warning" not in r for r in history)
    best = min(history, key=lambda r: r["val_loss"])
    saved = torch.load(tmp_path / BEST, weights_only=True)
    assert saved["epoch"] == best["epoch"] and saved["record"]["val_loss"] == best["val_loss"]
    # load_model reads the best epoch's weights: its held-out loss is the one recorded for that epoch
    from rlr_fast.training import validation_loss

    assert validation_loss(load_model(tmp_path), val, torch.device("cpu")) == pytest.approx(best["val_loss"], rel=1e-5)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["val_loss"] for r in log] == held


def test_a_non_finite_loss_stops_the_run_before_the_weights_are_touched(tmp_path):
    from rlr_fast.errors import TrainingDiverged

    cache = extract_features(_model(), _Images(16), progress=False)
    # a forced learning rate: the gradients blow up in the second epoch (at which of its 4 steps
    # depends on the CPU's float rounding: step 2 on AVX-512 CPUs without FP16, 3 with)
    with pytest.raises(TrainingDiverged, match=r"the gradient norm became (inf|nan) at epoch 2, step [1-4]; the "
                                               r"last checkpoint.*holds epoch 1\. Train again with a lower --lr "
                                               r"\(this run's was 3\)"):
        train(_model(), cache, tmp_path, TrainConfig(epochs=6, batch_size=4, lr=3.0, warmup_epochs=1, amp="none"),
              progress=False, log=lambda msg: None)
    state = read_checkpoint(tmp_path)
    assert state["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in state["state_dict"].values() if t.is_floating_point())


def test_a_loss_that_rises_after_warm_up_is_reported(tmp_path):
    cache = extract_features(_model(), _Images(16), progress=False)
    lines = []
    # a forced learning rate: the loss of epoch 2, the first after warm-up, rises ~2x above epoch 1's
    history = train(_model(), cache, tmp_path, TrainConfig(epochs=3, batch_size=4, lr=1.0, warmup_epochs=1,
                                                           val_fraction=0, amp="none"),
                    progress=False, log=lines.append)
    assert "warning" not in history[0] and "warning" not in history[2]
    ratio = history[1]["loss"] / history[0]["loss"]
    assert ratio > 1.25 and history[2]["loss"] < 1.25 * history[0]["loss"]
    assert history[1]["warning"].startswith(f"loss {history[1]['loss']:.4g} is {ratio:.2f}x its best "
                                            f"({history[0]['loss']:.4g} at epoch 1)")
    assert "warning: loss" in lines[1] and "warning" not in lines[0]
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert log[1]["warning"] == history[1]["warning"]


def test_held_out_images_are_drawn_per_class_and_reproducibly():
    from rlr_fast.features import hold_out

    class Classes(torch.utils.data.Dataset):
        samples = [(f"{c}{i}", None, 0, c, "good") for c, n in (("a", 20), ("b", 10), ("c", 9)) for i in range(n)]

        def __len__(self):
            return len(self.samples)

    data = Classes()
    kept, held = hold_out(data, 0.1, seed=0)
    classes = [data.samples[i][3] for i in held.indices]
    assert classes.count("a") == 2 and classes.count("b") == 1 and "c" not in classes  # c has too few
    assert sorted(kept.indices + held.indices) == list(range(len(data)))
    assert hold_out(data, 0.1, seed=0)[1].indices == held.indices
    assert hold_out(data, 0.1, seed=1)[1].indices != held.indices
    assert hold_out(data, 0.0)[1] is None


def test_training_ends_by_fitting_the_whitened_score_on_the_served_weights(tmp_path):
    from rlr_fast.training import BEST

    cache = extract_features(_model(), _Images(16), progress=False)
    val = extract_features(_model(), _val_images(4), progress=False)
    lines = []
    torch.manual_seed(0)
    history = train(RLRModel(**TINY, score="whitened"), cache, tmp_path,
                    TrainConfig(epochs=3, batch_size=4, lr=1e-3, warmup_epochs=1, amp="none"),
                    progress=False, log=lines.append, val_cache=val)
    assert any(line.startswith("fitted the score's statistics on 16 training images") for line in lines)
    served = load_model(tmp_path, thresholds=False)
    assert served.whitened() and served.config.score == "whitened"
    saved = torch.load(tmp_path / BEST, weights_only=True)
    best = min(history, key=lambda r: r["val_loss"])
    assert saved["epoch"] == best["epoch"]  # still the best epoch's weights, now with its statistics
    # The statistics are those of the served weights: fitting them again on the same cache gives
    # the same tensors.
    again = load_model(tmp_path, thresholds=False)
    for s in again.scores:
        s.mean.zero_()
    again.fit_score(cache)
    for a, b in zip(served.scores, again.scores):
        torch.testing.assert_close(a.mean, b.mean)
        torch.testing.assert_close(a.precision, b.precision)
