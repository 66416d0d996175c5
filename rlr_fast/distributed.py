"""DistributedDataParallel helpers: the process group under torchrun, each rank's device, and
an epoch's numbers summed over the ranks. In one process (no torchrun) each is a no-op."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def distributed_context(device=None):
    """(rank, world size) when launched by torchrun, else (0, 1). The process group uses nccl
    for a CUDA ``device`` (None: CUDA when available) and gloo otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if not dist.is_initialized():
            cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
            dist.init_process_group("nccl" if cuda else "gloo")
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_device(device, world: int) -> torch.device:
    """This process's device: under torchrun on GPU, ``cuda:LOCAL_RANK`` (a plain "cuda" would put
    every rank on the first GPU); otherwise ``device`` as given."""
    device = torch.device(device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device



def epoch_totals(loss_sum: float, seen: int, seconds: float, world: int, device, terms=None):
    """(loss sum, images, seconds, term sums) of the epoch over every rank: images and sums
    summed, the time of the slowest rank, so images / seconds is the throughput of the whole job.
    ``terms``: the model's named loss terms, each summed over the epoch's images (or None)."""
    terms = dict(terms or {})
    if world == 1:
        return loss_sum, seen, seconds, terms
    sums = torch.tensor([loss_sum, seen, *terms.values()], dtype=torch.float64, device=device)
    slowest = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(sums)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return float(sums[0]), int(sums[1]), float(slowest), dict(zip(terms, sums[2:].tolist()))



def any_rank(flag: bool, world: int, device) -> bool:
    """Whether `flag` holds on any rank (itself in one process)."""
    if world == 1:
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
