"""PatchCore (Roth et al., CVPR 2022): nearest-neighbour anomaly detection, no training.

The method as anomalib's ``Patchcore`` runs it:

1. Locally aware patch features: two levels of a frozen backbone, each averaged over its 3 x 3
   neighbourhood (``AvgPool2d(3, 1, 1)``), the deeper level upsampled (bilinear) to the first
   level's grid, concatenated over channels: one token (C = C1 + C2) per first-level position.
2. Memory bank: every token of the normal training images, optionally reduced to a coreset by
   greedy k-center selection (``coreset_ratio`` of the tokens, anomalib's default 0.1): start
   from a random token, then repeatedly take the token farthest from all chosen ones. As in
   anomalib the distances of the selection are measured after a sparse random projection to the
   Johnson-Lindenstrauss dimension for ``eps = 0.9`` (Li et al.'s very sparse projection).
3. Patch score: each test token's Euclidean distance to its nearest bank token
   (:func:`rlr_fast.nearest_reference` with ``metric="l2"``: no N x M distance matrix).
4. Image score: the largest patch score ``s*`` reweighted by how isolated its nearest bank token
   ``m*`` is: with ``N_b(m*)`` the ``num_neighbors`` (9) bank tokens nearest to ``m*`` (``m*``
   first), ``s = (1 - softmax_j(||m_test - n_j||)[0]) * s*`` over ``n_j`` in ``N_b(m*)``.
5. Anomaly map: the patch scores upsampled to the image (nearest, as anomalib's
   ``F.interpolate`` default) and Gaussian-blurred with sigma 4.

Deviations from anomalib, and why:

- Backbone: the embedded ``tf_efficientnet_lite0`` at indices (2, 3) (strides 8 and 16, as
  WideResNet50's layer2 and layer3) so that it runs offline; any timm backbone by name.
- No resize-then-centre-crop: images are resized to ``image_size`` like the other models here.
- Random projection: skipped when the Johnson-Lindenstrauss dimension is not below the token
  dimension (anomalib then projects to a *higher* dimension, which only adds noise and work;
  scikit-learn's projection refuses it). With Lite0's 152 channels that is every bank of more
  than a few hundred tokens; a wide backbone (WideResNet50: 1536) is projected as in anomalib.
- The selection's random start and projection come from a generator seeded with the training
  seed, so the coreset is the same on every run.
- Gaussian blur: scipy's ``reflect`` border (``rlr_fast.models.layers.gaussian_blur``, as the
  other models) where anomalib's kornia-style blur mirrors without repeating the edge pixel;
  the same kernel (sigma 4, radius 16). Only pixels within 16 of the border differ.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import List, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..backbone import EMBEDDED, FrozenBackbone
from ..commands.options import unit_fraction
from ..errors import UsageError
from ..ops import nearest_reference
from ..precision import full_precision
from ..progress import progress as progress_bar
from .base import AnomalyModel, AnomalyOutput, image_shape
from .layers import gaussian_blur

# Elements of the largest temporary of the coreset selection and of the image-score search:
# rows of the (N, C) tokens are processed this many elements at a time.
CHUNK_ELEMENTS = 1 << 22


@dataclass
class PatchCoreConfig:
    """PatchCoreModel's configuration; defaults are anomalib's unless noted."""

    image_size: Union[int, Tuple[int, int]] = 256  # an int (square) or (height, width)
    backbone: str = EMBEDDED  # anomalib: wide_resnet50_2; lite0's weights ship offline
    backbone_weights: str = "default"
    out_indices: Tuple[int, ...] = (2, 3)  # strides 8 and 16 (anomalib: layer2, layer3)
    coreset_ratio: float = 0.1  # fraction of the training tokens kept in the bank; 1: all of them
    projection_eps: float = 0.9  # Johnson-Lindenstrauss distortion of the selection's projection
    num_neighbors: int = 9  # bank neighbours of the image-score reweighting; 1: the plain maximum
    score_sigma: float = 4.0
    backend: str = "auto"  # nearest_reference backend


def check_coreset_ratio(ratio) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise UsageError(f"coreset_ratio must be a number in (0, 1] (the fraction of the training tokens "
                         f"kept in the memory bank), got {ratio!r}")
    return float(ratio)


# ------------------------------------------------------------------------------------------------
# Coreset selection
# ------------------------------------------------------------------------------------------------

def johnson_lindenstrauss_dim(n_samples: int, eps: float) -> int:
    """The smallest dimension a random projection of n points needs to keep every pairwise
    distance within a factor (1 +- eps) with good probability: 4 ln(n) / (eps^2/2 - eps^3/3)
    (Dasgupta and Gupta), as scikit-learn's and anomalib's projection choose it."""
    return int(4 * math.log(n_samples) / (eps ** 2 / 2 - eps ** 3 / 3))


def sparse_random_projection(features: int, components: int, generator: torch.Generator) -> torch.Tensor:
    """(features, components) very sparse random projection (Li, Hastie and Church, 2006): each
    entry is nonzero with probability d = 1 / sqrt(features), then +-sqrt(1 / d) / sqrt(components)
    with equal chance; ``tokens @ P`` keeps distances in expectation."""
    density = 1 / math.sqrt(features)
    nonzero = torch.rand(features, components, generator=generator) < density
    sign = torch.where(torch.rand(features, components, generator=generator) < 0.5, -1.0, 1.0)
    return nonzero * sign * (math.sqrt(1 / density) / math.sqrt(components))


def k_center_greedy(points: torch.Tensor, count: int, start: int, progress: bool = False) -> torch.Tensor:
    """Indices (count,) of greedy k-center selection over points (N, D): ``start`` first, then
    each step the point whose distance to its nearest chosen point is largest (the first such
    point on ties). Memory O(N): one distance per point, updated by one matrix-vector product
    per step (``||p - c||^2 = ||p||^2 - 2 p.c + ||c||^2``); a chosen point's distance is set to 0."""
    n = points.shape[0]
    if not 1 <= count <= n:
        raise ValueError(f"cannot choose {count} of {n} points")
    points = points.float()
    sq = points.pow(2).sum(-1)  # (N,)
    nearest = torch.full((n,), float("inf"))
    chosen = torch.empty(count, dtype=torch.int64)
    index = int(start)
    bar = progress_bar(total=count, desc="coreset", unit="token", enabled=progress, leave=False)
    for step in range(count):
        chosen[step] = index
        center = points[index]
        dist = (sq - 2 * (points @ center) + sq[index]).clamp_min_(0)  # (N,) squared distances
        torch.minimum(nearest, dist, out=nearest)
        nearest[index] = 0
        index = int(nearest.argmax())
        bar.update(1)
    bar.close()
    return chosen


def coreset_indices(tokens: torch.Tensor, ratio: float, seed: int = 0, eps: float = 0.9,
                    progress: bool = False) -> torch.Tensor:
    """The indices into tokens (N, C) of the memory bank: all of them in order for ratio 1, else
    ``int(N * ratio)`` (at least 1) by greedy k-center selection from a seeded random start, on
    the tokens projected to the Johnson-Lindenstrauss dimension where that is smaller than C."""
    n, c = tokens.shape
    if ratio >= 1:
        return torch.arange(n)
    generator = torch.Generator().manual_seed(seed)
    count = max(1, int(n * ratio))
    components = johnson_lindenstrauss_dim(n, eps) if n > 1 else c
    points = tokens
    if components < c:
        projection = sparse_random_projection(c, components, generator)
        rows = max(1, CHUNK_ELEMENTS // c)
        points = torch.cat([tokens[i:i + rows].float() @ projection for i in range(0, n, rows)])
    start = int(torch.randint(n, (1,), generator=generator))
    return k_center_greedy(points, count, start, progress)


# ------------------------------------------------------------------------------------------------
# Scores
# ------------------------------------------------------------------------------------------------

def _pairwise_l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(..., P, Q) Euclidean distances of a (..., P, C) to b (..., Q, C), clamped at 0 before the root."""
    sq = a.pow(2).sum(-1, keepdim=True) - 2 * a @ b.transpose(-1, -2) + b.pow(2).sum(-1).unsqueeze(-2)
    return sq.clamp_min(0).sqrt()


def reweighted_score(patch_scores: torch.Tensor, locations: torch.Tensor, tokens: torch.Tensor,
                     bank: torch.Tensor, num_neighbors: int) -> torch.Tensor:
    """Image scores (B,) from patch scores (B, L) (each token's distance to its nearest bank
    token), their bank indices locations (B, L), the tokens (B, L, C) and the bank (M, C).

    With the most anomalous token m_test (distance s*) and its nearest bank token m*, the
    ``k = min(num_neighbors, M)`` bank tokens nearest to m* (m* itself first) are its support;
    the score is ``(1 - softmax(||m_test - support_j||)[0]) * s*``: an anomalous token matched to
    an isolated bank token weighs more. Memory O(B * M) for the support search."""
    top = patch_scores.argmax(dim=1, keepdim=True)  # (B, 1)
    best = patch_scores.gather(1, top).squeeze(1)  # s*, (B,)
    if num_neighbors <= 1:
        return best
    c = tokens.shape[-1]
    query = tokens.gather(1, top.unsqueeze(-1).expand(-1, 1, c))  # m_test, (B, 1, C)
    matched = bank.index_select(0, locations.gather(1, top).squeeze(1))  # m*, (B, C)
    k = min(num_neighbors, bank.shape[0])
    support = _pairwise_l2(matched, bank).topk(k, dim=1, largest=False).indices  # (B, k), m* first
    dist = _pairwise_l2(query, bank[support]).squeeze(1)  # (B, k)
    return (1 - torch.softmax(dist, dim=1)[:, 0]) * best


# ------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------

class PatchCoreModel(AnomalyModel):
    """PatchCore with a frozen backbone. Fitted, not trained: ``model.fit(feats)`` (or
    ``rlr-fast train --model patchcore``) builds the memory bank from normal images' features;
    then ``model.eval(); out = model(images)`` gives ``out.anomaly_map`` (B, 1, S, S) and
    ``out.score`` (B,). All of PatchCoreConfig's fields are keyword arguments."""

    name = "patchcore"
    label = "PatchCore"
    config_class = PatchCoreConfig
    training_free = True  # rlr_fast.training.train calls fit() instead of running epochs
    cli_options = (("--coreset-ratio", dict(type=unit_fraction,
                                            help="PatchCore: fraction of the training tokens kept in its memory "
                                                 "bank, in (0, 1] (default 0.1; 1 keeps every token)")),)
    options_elsewhere = "note"
    option_use = "its memory bank"
    fixed_size_reason = "its memory bank holds the features of images of that size"

    def __init__(self, **kwargs):
        super().__init__()
        cfg = PatchCoreConfig(**kwargs)
        check_coreset_ratio(cfg.coreset_ratio)
        if isinstance(cfg.num_neighbors, bool) or not isinstance(cfg.num_neighbors, int) or cfg.num_neighbors < 1:
            raise UsageError(f"num_neighbors must be an integer >= 1, got {cfg.num_neighbors!r}")
        if len(cfg.out_indices) < 1:
            raise UsageError("PatchCore needs at least one backbone level (out_indices)")
        self.backbone = FrozenBackbone(cfg.backbone, cfg.out_indices, cfg.backbone_weights)
        self.input_size = image_shape(cfg.image_size)
        cfg.image_size = cfg.image_size if isinstance(cfg.image_size, int) else self.input_size
        cfg.out_indices = tuple(cfg.out_indices)
        self.image_size = cfg.image_size
        self.config = cfg
        self.grids = [tuple(math.ceil(s / r) for s in self.input_size) for r in self.backbone.reductions]
        self.grid = self.grids[0]  # the tokens' grid: the first level's
        self.pool = nn.AvgPool2d(3, stride=1, padding=1)
        channels = sum(self.backbone.channels)
        self.register_buffer("memory_bank", torch.empty(0, channels))  # (M, C), filled by fit()

    # -- features -------------------------------------------------------------------------------

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> List[torch.Tensor]:
        """[embedding (B, C, H, W)]: the pooled levels, all at the first level's grid."""
        pooled = self.pooled_levels(images)
        first = pooled[0]
        rest = [F.interpolate(p, size=first.shape[-2:], mode="bilinear", align_corners=False) for p in pooled[1:]]
        return [torch.cat([first, *rest], dim=1)]

    # -- fitting --------------------------------------------------------------------------------

    def loss(self, feats: List[torch.Tensor]) -> torch.Tensor:
        raise UsageError("PatchCore has no loss to train: it is fitted, model.fit(model.features(images)) "
                         "(or `rlr-fast train --model patchcore`), and used in eval mode")

    @torch.no_grad()
    def fit(self, source, seed: int = 0, progress: bool = False, log=None) -> dict:
        """Build the memory bank from normal images' features: ``source`` is a FeatureCache (what
        ``rlr-fast train`` extracts) or a list ``[embedding (B, C, H, W)]`` as :meth:`features`
        returns. Returns what was done: tokens, bank size, coreset ratio."""
        tokens = _training_tokens(source)
        if tokens.shape[0] == 0:
            raise UsageError("PatchCore needs at least one training image to build its memory bank")
        if tokens.shape[1] != self.memory_bank.shape[1]:
            raise ValueError(f"the features have {tokens.shape[1]} channels but this model's tokens have "
                             f"{self.memory_bank.shape[1]}")
        ratio = self.config.coreset_ratio
        index = coreset_indices(tokens, ratio, seed, self.config.projection_eps, progress)
        bank = tokens[index] if ratio < 1 else tokens
        self.memory_bank = bank.to(self.memory_bank.device, self.memory_bank.dtype).contiguous()
        info = {"tokens": int(tokens.shape[0]), "bank": int(bank.shape[0]), "coreset_ratio": ratio}
        if log is not None:
            log(f"memory bank: {info['bank']} of {info['tokens']} training tokens (coreset ratio {ratio:g}, "
                f"{self.memory_bank.shape[1]} channels, {self.memory_bank.numel() * 4 / 2 ** 20:.1f} MiB)")
        return info

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The bank's size is known only once fitted: take the checkpoint's (a wrong channel count
        # is still refused by the size check of load_state_dict).
        bank = state_dict.get(prefix + "memory_bank")
        if isinstance(bank, torch.Tensor) and bank.dim() == 2 and bank.shape[1] == self.memory_bank.shape[1]:
            self.memory_bank = torch.empty(bank.shape, dtype=self.memory_bank.dtype, device=self.memory_bank.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- scoring --------------------------------------------------------------------------------

    def patch_scores(self, embedding: torch.Tensor):
        """(distances (B, L), bank indices (B, L), tokens (B, L, C)) of every token of an
        embedding (B, C, H, W) to its nearest bank token."""
        if self.memory_bank.shape[0] == 0:
            raise UsageError("this PatchCore model has an empty memory bank: fit it first "
                             "(model.fit(model.features(normal_images)) or `rlr-fast train --model patchcore`)")
        tokens = embedding.float().flatten(2).transpose(1, 2)  # (B, L, C)
        index, dist = nearest_reference(tokens, self.memory_bank.float(), metric="l2", backend=self.config.backend)
        return dist, index, tokens

    def predict_features(self, feats: List[torch.Tensor]) -> AnomalyOutput:
        embedding = feats[0]
        with full_precision(embedding.device):  # scores in float32, whatever the forward's precision
            dist, index, tokens = self.patch_scores(embedding)
            score = reweighted_score(dist, index, tokens, self.memory_bank.float(), self.config.num_neighbors)
            maps = dist.view(-1, 1, *embedding.shape[-2:])
            anomaly_map = gaussian_blur(F.interpolate(maps, size=self.input_size, mode="nearest"),
                                        self.config.score_sigma)
        return AnomalyOutput(anomaly_map, score)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in asdict(self.config).items()) + f", bank={self.memory_bank.shape[0]}"


def _training_tokens(source) -> torch.Tensor:
    """(N, C) float32 tokens of a FeatureCache (its first level) or a list [embedding (B, C, H, W)]."""
    if isinstance(source, (list, tuple)):
        embedding = source[0]
        return embedding.detach().float().flatten(2).transpose(1, 2).reshape(-1, embedding.shape[1]).cpu()
    level = source.levels[0]  # (N_img, C, H, W): a tensor, or a memory-mapped numpy array
    n, c = int(level.shape[0]), int(level.shape[1])
    per_image = int(np.prod(level.shape[2:]))
    tokens = torch.empty(n * per_image, c)
    images = max(1, CHUNK_ELEMENTS // max(1, c * per_image))
    for start in range(0, n, images):
        block = source.batch(range(start, min(n, start + images)))[0]  # (b, C, H, W)
        tokens[start * per_image:(start + len(block)) * per_image] = block.flatten(2).transpose(1, 2).reshape(-1, c)
    return tokens
