"""UniAD (NeurIPS 2022): the baseline rlr-fast is measured against.

Backbone stages resized to one grid and concatenated, projected to `hidden` channels, then a
transformer with a neighbour mask in every attention and a layer-wise learned query decoder:

    encoder (x4):  x = LN(x + Drop(NMA(q = k = x + pos, v = x)));  x = LN(x + Drop(FFN(x)))
    decoder (x4, layer i with its own learned query Q_i, out_0 = encoder output M):
        t = LN(Q_i + Drop(NMA(q = Q_i + pos, k = M + pos, v = M)))
        t = LN(t + Drop(NMA(q = t + pos, k = out_{i-1} + pos, v = out_{i-1})))
        out_i = LN(t + Drop(FFN(t)))
    reconstruction = Linear(LN(out_4))

NMA is ``rlr_fast.neighbor_masked_attention`` with ``backend=`` passed through, so UniAD gets
the fast path too; ``backend="dense"`` is the naive UniAD. One deviation from the original
code: dropout is applied to each attention's output, not to its attention probabilities (the
fused ops do not materialise them).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import List, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..backbone import FrozenBackbone
from ..modules import NeighborMaskedAttention
from ..precision import full_precision
from .base import AnomalyModel, AnomalyOutput, check_image_size, image_shape
from .layers import feature_jitter


@dataclass
class UniADConfig:
    """UniADModel's configuration; the defaults are the paper's."""

    image_size: Union[int, Tuple[int, int]] = 224  # an int (square) or (height, width)
    backbone: str = "efficientnet_b4"
    backbone_weights: str = "default"
    out_indices: Tuple[int, ...] = (0, 1, 2, 3)  # efficientnet_b4 stages 1-4: 24+32+56+160 = 272 channels
    feature_stride: int = 16  # every stage resized to image_size / 16 (14 x 14 at 224)
    hidden: int = 256
    num_heads: int = 8
    ffn_dim: int = 1024
    dropout: float = 0.1
    num_encoder_layers: int = 4
    num_decoder_layers: int = 4
    window: int = 7
    jitter_scale: float = 20.0
    jitter_prob: float = 1.0
    pool_size: int = 16
    backend: str = "auto"


def _ffn(d: int, hidden: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, d))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: UniADConfig, grid):
        super().__init__()
        self.attn = NeighborMaskedAttention(cfg.hidden, cfg.num_heads, grid, cfg.window, backend=cfg.backend)
        self.ffn = _ffn(cfg.hidden, cfg.ffn_dim, cfg.dropout)
        self.norm1, self.norm2 = nn.LayerNorm(cfg.hidden), nn.LayerNorm(cfg.hidden)
        self.drop1, self.drop2 = nn.Dropout(cfg.dropout), nn.Dropout(cfg.dropout)

    def forward(self, x, pos):  # x: (B, L, hidden), pos: (L, hidden)
        qk = x + pos
        x = self.norm1(x + self.drop1(self.attn(qk, qk, x)))
        return self.norm2(x + self.drop2(self.ffn(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: UniADConfig, grid):
        super().__init__()
        length = grid[0] * grid[1]
        self.query = nn.Parameter(torch.empty(length, cfg.hidden))  # this layer's learned query (L, hidden)
        nn.init.normal_(self.query, std=0.02)
        self.attn_memory = NeighborMaskedAttention(cfg.hidden, cfg.num_heads, grid, cfg.window, backend=cfg.backend)
        self.attn_previous = NeighborMaskedAttention(cfg.hidden, cfg.num_heads, grid, cfg.window, backend=cfg.backend)
        self.ffn = _ffn(cfg.hidden, cfg.ffn_dim, cfg.dropout)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(cfg.hidden) for _ in range(3))
        self.drop1, self.drop2, self.drop3 = (nn.Dropout(cfg.dropout) for _ in range(3))

    def forward(self, memory, previous, pos):
        b = memory.shape[0]
        query = self.query.expand(b, -1, -1)  # a view: the learned query is not copied per image
        t = self.norm1(query + self.drop1(self.attn_memory(query + pos, memory + pos, memory)))
        t = self.norm2(t + self.drop2(self.attn_previous(t + pos, previous + pos, previous)))
        return self.norm3(t + self.drop3(self.ffn(t)))


class UniADModel(AnomalyModel):
    """UniAD with a frozen backbone; same interface as RLRModel. All of UniADConfig's fields are
    keyword arguments."""

    name = "uniad"
    label = "UniAD"
    config_class = UniADConfig
    recipes = {"fast": "fast", "paper": "uniad"}

    def __init__(self, **kwargs):
        super().__init__()
        cfg = UniADConfig(**kwargs)
        cfg.out_indices = tuple(cfg.out_indices)
        self.config = cfg
        self.backbone = FrozenBackbone(cfg.backbone, cfg.out_indices, cfg.backbone_weights)
        self.input_size = image_shape(cfg.image_size)
        cfg.image_size = cfg.image_size if isinstance(cfg.image_size, int) else self.input_size
        self.image_size = cfg.image_size
        self.grid = tuple(math.ceil(s / cfg.feature_stride) for s in self.input_size)
        check_image_size(cfg.image_size, [(cfg.feature_stride, self.grid, (cfg.window, cfg.window))])
        channels = sum(self.backbone.channels)
        self.input_proj = nn.Linear(channels, cfg.hidden)
        self.pos = nn.Parameter(torch.empty(self.grid[0] * self.grid[1], cfg.hidden))  # learned positional embedding
        nn.init.uniform_(self.pos)
        self.encoder = nn.ModuleList(EncoderLayer(cfg, self.grid) for _ in range(cfg.num_encoder_layers))
        self.decoder = nn.ModuleList(DecoderLayer(cfg, self.grid) for _ in range(cfg.num_decoder_layers))
        self.norm = nn.LayerNorm(cfg.hidden)
        self.output_proj = nn.Linear(cfg.hidden, channels)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> List[torch.Tensor]:
        """Every stage resized (bilinear, align_corners) to the grid and concatenated: (B, C, H, W)."""
        stages = [F.interpolate(f, size=self.grid, mode="bilinear", align_corners=True)
                  for f in self.backbone(images)]
        return [torch.cat(stages, dim=1)]

    def reconstruct(self, feats: List[torch.Tensor], jitter: bool = False):
        tokens = feats[0].flatten(2).transpose(1, 2)  # (B, L, C)
        source = feature_jitter(tokens, self.config.jitter_scale, self.config.jitter_prob) if jitter else tokens
        x = self.input_proj(source)
        for layer in self.encoder:
            x = layer(x, self.pos)
        memory, out = x, x
        for layer in self.decoder:
            out = layer(memory, out, self.pos)
        return tokens, self.output_proj(self.norm(out))

    def loss(self, feats: List[torch.Tensor]) -> torch.Tensor:
        target, recon = self.reconstruct(feats, jitter=self.training)
        return F.mse_loss(recon, target)

    def predict_features(self, feats: List[torch.Tensor]) -> AnomalyOutput:
        target, recon = self.reconstruct(feats)
        with full_precision(target.device):  # the score map in float32, whatever the forward's precision
            target, recon = target.float(), recon.float()
            dist = (target - recon).pow(2).sum(-1).sqrt().view(-1, 1, *self.grid)  # L2 over channels
            anomaly_map = F.interpolate(dist, size=self.input_size, mode="bilinear", align_corners=True)
            k = min(self.config.pool_size, *self.input_size)
            score = F.avg_pool2d(anomaly_map, k, stride=1).amax(dim=(1, 2, 3))
        return AnomalyOutput(anomaly_map, score)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in asdict(self.config).items())
