"""Two CPU processes with gloo (as `torchrun --nproc_per_node 2` runs them) end with identical weights."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from rlr_fast.features import extract_features, shard
from rlr_fast.models.rlr import RLRModel
from rlr_fast.training import TrainConfig, train

TINY = dict(image_size=64, backbone_weights="random", num_layers=1, dims=(32, 64), num_heads=4)


class _Images(torch.utils.data.Dataset):
    def __init__(self, n):
        self.x = torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[i]}


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    torch.manual_seed(rank)  # different initial weights per rank: DDP must synchronise them
    model = RLRModel(**TINY)
    cache = extract_features(model, shard(_Images(10), rank, world), progress=False)
    train(model, cache, out, TrainConfig(epochs=2, batch_size=2, lr=1e-3), progress=False)
    torch.save({k: v for k, v in model.state_dict().items() if not k.startswith("backbone")},
               os.path.join(out, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_end_with_identical_weights(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # and training moved them away from rank 0's initial weights
    torch.manual_seed(0)
    init = RLRModel(**TINY).state_dict()
    assert any(not torch.equal(a[k], init[k]) for k in a)
    assert (tmp_path / "checkpoint.pt").is_file()  # written by rank 0


def test_shard_pads_to_equal_lengths():
    parts = [list(shard(list(range(7)), r, 3)) for r in range(3)]
    assert [len(p) for p in parts] == [3, 3, 3]
    assert sorted(set(sum(parts, []))) == list(range(7))


def _cli_worker(rank, world, port, data, out, record):
    """One torchrun-like process running the real `rlr-fast train` command path, recording which
    images its feature extraction saw, where it cached them, and its weights at the end."""
    import json

    import rlr_fast.features
    import rlr_fast.training
    from rlr_fast.cli import main

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    real_extract, real_train = rlr_fast.features.extract_features, rlr_fast.training.train

    def extract(model, dataset, **kwargs):
        seen = [dataset[i]["path"] for i in range(len(dataset))]
        with open(os.path.join(record, f"rank{rank}.json"), "w") as fh:
            json.dump({"paths": seen, "cache_dir": str(kwargs["cache_dir"])}, fh)
        return real_extract(model, dataset, **kwargs)

    def train(model, *args, **kwargs):
        history = real_train(model, *args, **kwargs)
        torch.save({k: v for k, v in model.state_dict().items() if not k.startswith("backbone")},
                   os.path.join(record, f"rank{rank}.pt"))
        return history

    rlr_fast.features.extract_features, rlr_fast.training.train = extract, train
    # A different seed per rank: different initial weights and batch order, which DDP must reconcile.
    code = main(["train", "--data", data, "--out", out, "--image-size", "64", "--backbone-weights", "random",
                 "--epochs", "2", "--batch-size", "1", "--seed", str(rank), "--val-fraction", "0", "--no-progress"])
    assert code == 0
    torch.distributed.destroy_process_group()


def test_cli_train_with_two_gloo_processes_shards_the_data(tmp_path):
    import json

    from rlr_fast.data import list_images
    from rlr_fast.demo_data import build_demo_dataset

    data = build_demo_dataset(tmp_path / "data", classes=("brick",), image_size=64, n_train=6, n_test_good=1,
                              n_test_defect=1)
    run, record = tmp_path / "run", tmp_path / "record"
    record.mkdir()
    mp.spawn(_cli_worker, args=(2, _free_port(), str(data), str(run), str(record)), nprocs=2, join=True)

    seen = [json.loads((record / f"rank{r}.json").read_text()) for r in range(2)]
    everything = sorted(map(str, list_images(data / "brick" / "train" / "good")))
    assert [len(s["paths"]) for s in seen] == [3, 3]  # each rank extracted and trained on half
    assert sorted(seen[0]["paths"] + seen[1]["paths"]) == everything  # together, all of it, once
    assert seen[0]["cache_dir"] != seen[1]["cache_dir"]  # one feature cache per rank

    a, b = (torch.load(record / f"rank{r}.pt", weights_only=True) for r in range(2))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["images"] for r in log] == [6, 6]  # the epoch's images counted over both ranks
    for r in log:
        assert r["images_per_s"] == pytest.approx(r["images"] / r["seconds"], rel=0.01)


def test_rank_device_is_cuda_local_rank_under_torchrun(monkeypatch):
    from rlr_fast.training import rank_device

    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert rank_device("cuda", 2) == torch.device("cuda", 1) and chosen == [torch.device("cuda", 1)]
    assert rank_device("cpu", 2) == torch.device("cpu")
    assert rank_device("cuda", 1) == torch.device("cuda")  # a single process keeps what it was given


RESAD_TINY = dict(image_size=64, backbone_weights="random", coupling_layers=2, pos_embed_dim=16, shots=2,
                  first_stage=0.5)


def _resad_worker(rank, world, port, out):
    """ResAD over two gloo processes, each on its own residuals (half of them with defects)."""
    from rlr_fast.features import FeatureCache
    from rlr_fast.models.resad import ResADModel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    torch.manual_seed(rank)  # different initial weights per rank: DDP must synchronise them
    model = ResADModel(**RESAD_TINY)
    g = torch.Generator().manual_seed(10 + rank)
    levels = [torch.rand(4, c, *grid, generator=g) for c, grid in zip(model.converter.backbone.channels, model.grids)]
    masks = torch.zeros(4, 1, 64, 64)
    masks[2:, :, 16:40, 16:40] = 1
    train(model, FeatureCache(levels + [masks]), out, TrainConfig(epochs=2, batch_size=2, lr=1e-3), progress=False)
    torch.save(dict(model.named_parameters()), os.path.join(out, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_two_gloo_processes_train_resad_to_identical_weights(tmp_path):
    """Both stages (one epoch each); the buffers (boundaries, batch-norm statistics) are rank 0's,
    broadcast by DDP, and rank 0 writes the checkpoint."""
    from rlr_fast.models.resad import ResADModel

    mp.spawn(_resad_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    torch.manual_seed(0)
    init = dict(ResADModel(**RESAD_TINY).named_parameters())
    assert any(not torch.equal(a[k], init[k]) for k in a if not k.startswith("converter"))
    assert (tmp_path / "checkpoint.pt").is_file()
