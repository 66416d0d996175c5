"""Two CPU processes with gloo (as `torchrun --nproc_per_node 2` runs them) end with identical weights."""
import os
import socket

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
