"""Feature cache: the backbone is frozen and images are not augmented, so each image's features
are computed once and training reads them from memory (or from memory-mapped files on disk when
they do not fit)."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from .data import DataErrorLoader
from .io import atomic_write_json
from .progress import progress as progress_bar

from .timing import clock

# Above this many bytes of features, the cache goes to disk as memory-mapped files.
MEMORY_LIMIT_BYTES = 4 << 30


class FeatureCache:
    """Per level, an (N, C, H, W) float32 array (torch tensor in memory or numpy memmap)."""

    def __init__(self, levels: List, seconds: float = 0.0):
        self.levels = levels
        self.seconds = seconds  # time spent extracting

    def __len__(self) -> int:
        return int(self.levels[0].shape[0])

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(level.shape)) * 4 for level in self.levels)

    def batch(self, indices: Sequence[int], device="cpu") -> List[torch.Tensor]:
        idx = np.asarray(indices)
        out = []
        for level in self.levels:
            if isinstance(level, torch.Tensor):
                out.append(level[torch.as_tensor(idx)].to(device, non_blocking=True))
            else:
                out.append(torch.from_numpy(np.ascontiguousarray(level[idx])).to(device, non_blocking=True))
        return out


def _loader(dataset: Dataset, batch_size: int) -> DataErrorLoader:
    workers = min(2, os.cpu_count() or 1) if len(dataset) > batch_size else 0
    return DataErrorLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)


@torch.no_grad()
def extract_features(model, dataset: Dataset, batch_size: int = 16, device="cpu",
                     cache_dir: Optional[Path] = None, memory_limit: int = MEMORY_LIMIT_BYTES,
                     desc: str = "features", progress: bool = True, with_masks: bool = False) -> FeatureCache:
    """Run ``model.features`` over ``dataset`` once; in memory, or memory-mapped under
    ``cache_dir`` when larger than ``memory_limit`` bytes. ``with_masks``: the items' ``mask``
    (1, S, S) is cached too, as one more level after the features (ResAD trains on masks)."""
    start = clock(device)
    n = len(dataset)
    levels = None
    offset = 0
    bar = progress_bar(total=n, desc=desc, unit="img", enabled=progress)
    for batch in _loader(dataset, batch_size):
        feats = [f.float().cpu() for f in model.features(batch["image"].to(device))]
        if with_masks:
            feats.append(batch["mask"].float())
        if levels is None:
            shapes = [(n, *f.shape[1:]) for f in feats]
            total = sum(int(np.prod(s)) * 4 for s in shapes)
            if total > memory_limit and cache_dir is not None:
                cache_dir = Path(cache_dir)
                cache_dir.mkdir(parents=True, exist_ok=True)
                levels = [np.lib.format.open_memmap(cache_dir / f"level{i}.npy", mode="w+", dtype=np.float32,
                                                    shape=s) for i, s in enumerate(shapes)]
                atomic_write_json(cache_dir / "shapes.json", shapes)
            else:
                levels = [torch.empty(s) for s in shapes]
        for level, f in zip(levels, feats):
            level[offset: offset + len(f)] = f if isinstance(level, torch.Tensor) else f.numpy()
        offset += len(feats[0])
        bar.update(len(feats[0]))
        bar.set_postfix(img_per_s=f"{offset / (time.perf_counter() - start):.1f}")
    bar.close()
    for level in levels:
        if isinstance(level, np.memmap):
            level.flush()
    return FeatureCache(levels, clock(device) - start)


def shard(dataset: Dataset, rank: int, world: int) -> Dataset:
    """This rank's share of a dataset, padded by wrapping so every rank has the same length."""
    if world <= 1:
        return dataset
    per_rank = -(-len(dataset) // world)
    indices = [(rank + world * i) % len(dataset) for i in range(per_rank)]
    return Subset(dataset, indices)


def hold_out(dataset: Dataset, fraction: float, seed: int = 0, min_per_group: int = 10):
    """Split a training set into (train, held out): ``fraction`` of the images of each class
    (of the whole set for a plain folder), drawn with ``seed``, for a validation loss that uses
    training data only. A class with fewer than ``min_per_group`` images keeps all of them;
    a class that gives images gives at least one. Returns (dataset, None) when nothing is held out."""
    if fraction <= 0:
        return dataset, None
    if not 0 < fraction < 1:
        raise ValueError(f"the held-out fraction must be in [0, 1), got {fraction}")
    samples = getattr(dataset, "samples", None)
    groups = {}
    for i in range(len(dataset)):
        groups.setdefault(samples[i][3] if samples is not None else "", []).append(i)
    rng = np.random.default_rng(seed)
    held = []
    for key in sorted(groups):
        members = groups[key]
        if len(members) < min_per_group:
            continue
        count = max(1, int(round(fraction * len(members))))
        held.extend(members[j] for j in sorted(rng.choice(len(members), size=count, replace=False)))
    if not held:
        return dataset, None
    held_set = set(held)
    kept = [i for i in range(len(dataset)) if i not in held_set]
    return Subset(dataset, kept), Subset(dataset, sorted(held))
