"""RLR: reconstruct features from a Learnable Reference (ECCV 2024).

Per backbone level, an independent reconstruction network (equations of the paper):

    Y   = Embed(F) + P                   F: (B, L, C) pooled backbone tokens, P: fixed 2D sin-cos
    R_h = Embed_R(R) + P                 R: (L, C) the learnable reference, shared by the batch
    Z   = LN( MLKA(Y, R_h) + alpha * LCA(Y, R_h) )      (no residual around the attention)
    Y'  = LN( Z + FFN(Z) )                               x num_layers
    F^  = Linear(LN(Y))                  (B, L, C) the reconstruction

LCA attends from Y to the reference inside each token's window (keys and values R_h); MLKA
attends from Y to the reference keys outside the window, taking the values from Y itself.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import List, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..backbone import EMBEDDED, FrozenBackbone
from ..modules import LocalCrossAttention, NeighborMaskedAttention
from ..precision import full_precision
from ..windows import complement_is_empty
from ..errors import UsageError
from .base import AnomalyModel, AnomalyOutput, check_image_size, image_shape
from .layers import feature_jitter, gaussian_blur, sincos_pos_embed_2d

# The paper's windows: 5 on a 16-grid, 7 on a 32-grid, 11 on a 64-grid.
PAPER_WINDOWS = ((16, 5), (32, 7), (64, 11))


def default_window(size: int) -> int:
    """Window for a grid side: the paper's values, interpolated linearly in log2(size) between
    them and extrapolated with the nearest segment's slope, rounded to the nearest odd number
    (at least 1). E.g. 8 -> 3, 16 -> 5, 24 -> 7, 32 -> 7, 48 -> 9, 64 -> 11, 128 -> 15."""
    pts = [(math.log2(g), k) for g, k in PAPER_WINDOWS]
    x = math.log2(size)
    (x0, y0), (x1, y1) = pts[:2] if x <= pts[1][0] else pts[1:]
    y = y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return max(1, 2 * int(round((y - 1) / 2)) + 1)


def default_windows(grid: Tuple[int, int]) -> Tuple[int, int]:
    """Per-axis default window, shrunk until MLKA leaves every query a key."""
    kh, kw = default_window(grid[0]), default_window(grid[1])
    while complement_is_empty(grid, (kh, kw)) and max(kh, kw) > 1:
        kh, kw = max(1, kh - 2), max(1, kw - 2)
    return kh, kw


@dataclass
class RLRConfig:
    """RLRModel's configuration. The defaults are the paper's except the backbone (below) and the
    choices measured on the accuracy benchmark (README, "What changed and why"): 2 layers instead
    of 4, widths 64 * 2 ** (index - 1) instead of 128 * 2 ** (index - 1), standardised tokens, a
    pixel map of balanced levels (the finest level's, blurred) and an image score of whitened
    residuals. ``PAPER_NETWORK`` restores the paper's network, score and map (``--recipe paper``
    does)."""

    image_size: Union[int, Tuple[int, int]] = 256  # an int (square) or (height, width)
    backbone: str = EMBEDDED  # the paper uses tf_efficientnet_b6; lite0's weights ship offline
    backbone_weights: str = "default"
    out_indices: Tuple[int, ...] = (2, 3)  # strides 8 and 16: grids 32 and 16 at 256 px
    dims: Optional[Tuple[int, ...]] = None  # None: dim_base * 2 ** (index - 1) per level
    dim_base: int = 64  # the paper: 128 (d 256 and 512 at indices 2 and 3)
    windows: Optional[Tuple[Tuple[int, int], ...]] = None  # None: default_windows(grid) per level
    num_layers: int = 2  # the paper: 4
    num_heads: int = 8
    alpha: float = 2.0
    ffn_ratio: int = 4
    jitter_scale: float = 4.0
    jitter_prob: float = 1.0
    score_sigma: float = 4.0
    backend: str = "auto"
    # "channel": each level's network sees its tokens standardised per channel with the training
    # features' mean and std, and its reconstruction is mapped back (see ReconstructionNetwork);
    # "none": raw tokens, as the paper's code. Loss and score are the paper's either way.
    feature_norm: str = "channel"
    # "paper": MSE + (1 - cos) per level, as the paper; "balanced": the same divided, per level,
    # by its mean over the training tokens (fitted after training by fit_score; see LevelBalance),
    # so that each level weighs alike in the image score; "whitened": per level, the squared
    # Mahalanobis distance of the residual F - F^ under the mean and covariance of the residuals
    # of the training tokens (fitted likewise; see WhitenedResidual), divided by the channels.
    # All average the levels' maps for the image score. Before fit_score, "balanced" and
    # "whitened" score as "paper". ``score`` is the pixel map's (and, with image_score None, the
    # image score's). "balanced" is the default: measured on the accuracy benchmark
    # (README, "What changed and why"), higher image AUROC on every seed, the pixel map unchanged
    # up to a constant factor.
    score: str = "balanced"
    # The image score's own per-token score, one of the same three (None: ``score``'s). The image
    # score is the maximum of the blurred mean of the levels' maps of this score; the pixel map
    # stays ``score``'s. "whitened" is the default: on the accuracy benchmark it raised image
    # AUROC on every seed and on the demo's textures, while its pixel map was better on the
    # benchmark's colour objects but worse on its grey ones and on the demo's textures
    # (benchmarks/results/accuracy-256/rlr-whitened-image-score.json).
    image_score: Optional[str] = "whitened"
    # The pixel map: "finest", the finest level's map alone (stride 8 with the default backbone);
    # "all", the mean of the levels' maps, as the paper. The image score is the paper's either way,
    # the maximum of the blurred mean of the levels. The coarser level's map is blurrier and
    # displaces defects' edges by up to half its stride: measured on the accuracy benchmark
    # (README, "What changed and why"), "finest" gives higher pixel AUROC and AUPRO.
    anomaly_map: str = "finest"
    # The pixel map's Gaussian blur (sigma in input pixels, scipy's kernel and border, as the
    # image score's); 0 leaves it unblurred, as the paper. The finest map is a 32x32 grid
    # upsampled bilinearly: its token-to-token noise is what the blur removes (measured on the
    # accuracy benchmark, benchmarks/results/accuracy-256/rlr-map-blur.json: higher pixel AUROC
    # and AUPRO on every seed).
    map_sigma: float = 4.0


# The network of the paper and its code, where the defaults above differ from it.
PAPER_NETWORK = {"num_layers": 4, "dim_base": 128, "feature_norm": "none", "score": "paper", "image_score": None,
                 "anomaly_map": "all", "map_sigma": 0.0}
SCORES = ("balanced", "whitened", "paper")
ANOMALY_MAPS = ("finest", "all")


class _FittedStatistics(nn.Module):
    """A score's statistics fitted on normal training tokens after training: the ``fitted``
    buffer travels with the weights, ``is_fitted`` mirrors it as a Python bool so that tracing
    and compiling see a constant, not a tensor."""

    def __init__(self):
        super().__init__()
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self.is_fitted = False
        self.register_load_state_dict_post_hook(lambda module, _: setattr(module, "is_fitted", bool(module.fitted)))

    def _mark_fitted(self) -> None:
        self.fitted.fill_(True)
        self.is_fitted = True


class WhitenedResidual(_FittedStatistics):
    """A level's score from its reconstruction residual r = F - F^ (B, L, C):
    (r - mu)^T P (r - mu) / C, with mu and P = (Sigma + eps * mean(diag Sigma) * I)^-1 the mean
    and shrunk inverse covariance of the residuals of normal training tokens.

    Residual channels are correlated and unequally predictable: an error along a direction the
    network never gets right on normal tokens says less than the same error along one it always
    gets right. Measured on the accuracy benchmark (README, "What changed, and why"): a higher
    image AUROC than the balanced levels on every seed, so the image score reads it by default
    (``image_score``); its pixel map is better on colour objects but worse on grey ones and on the
    demo's textures, so the map does not."""

    def __init__(self, channels: int, eps: float = 1e-3):
        super().__init__()
        self.eps = eps
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("precision", torch.eye(channels))

    @torch.no_grad()
    def set_statistics(self, mean: torch.Tensor, cov: torch.Tensor) -> None:
        """From the residuals' mean (C,) and covariance (C, C), both float64."""
        shrunk = cov + self.eps * cov.diagonal().mean().clamp_min(1e-12) * torch.eye(len(cov), dtype=cov.dtype,
                                                                                     device=cov.device)
        self.mean.copy_(mean)
        self.precision.copy_(torch.linalg.inv(shrunk))
        self._mark_fitted()

    def forward(self, residual: torch.Tensor) -> torch.Tensor:  # (B, L, C) -> (B, L)
        d = residual - self.mean
        return (d @ self.precision * d).sum(-1) / d.shape[-1]


def paper_score(target: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """The paper's per-token score, MSE + (1 - cos) over channels: (B, L, C) pairs -> (B, L)."""
    return (target - recon).pow(2).mean(-1) + 1 - F.cosine_similarity(target, recon, dim=-1)


class LevelBalance(_FittedStatistics):
    """The per-level divisors of score "balanced": each level's mean paper score (MSE + 1 - cos)
    over the tokens of normal training images, so that a level's map reads in multiples of its
    typical error on normal images.

    The levels' reconstruction errors differ in scale (about 1.2 at stride 8 against 0.66 at
    stride 16 with the default network on the accuracy benchmark), so the paper's mean of the
    maps lets the finer level decide the image score, while the coarser level's map separates
    normal from anomalous images at least as well on the least regular textures."""

    def __init__(self, levels: int):
        super().__init__()
        self.register_buffer("mean_error", torch.ones(levels))

    @torch.no_grad()
    def set_mean_error(self, mean: torch.Tensor) -> None:
        """From each level's mean score over the training tokens, (levels,)."""
        if not bool(torch.isfinite(mean).all() and (mean > 0).all()):
            raise ValueError(f"a level's mean training error must be finite and positive, got {mean.tolist()}")
        self.mean_error.copy_(mean)
        self._mark_fitted()


def _init_embedding(linear: nn.Linear) -> nn.Linear:
    nn.init.kaiming_normal_(linear.weight, mode="fan_in", nonlinearity="leaky_relu")
    nn.init.zeros_(linear.bias)
    return linear


class RLRLayer(nn.Module):
    """Z = LN(MLKA(Y, R_h) + alpha LCA(Y, R_h));  out = LN(Z + FFN(Z))."""

    def __init__(self, dim: int, num_heads: int, grid, window, alpha: float = 2.0, ffn_ratio: int = 4,
                 backend: str = "auto"):
        super().__init__()
        self.alpha = alpha
        self.lca = LocalCrossAttention(dim, num_heads, grid, window, backend=backend)
        self.mlka = NeighborMaskedAttention(dim, num_heads, grid, window, backend=backend)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_ratio * dim), nn.GELU(), nn.Linear(ffn_ratio * dim, dim))
        self.norm2 = nn.LayerNorm(dim)

    def reference_heads(self, ref: torch.Tensor):
        """The projections of the shared reference R_h (L, d): LCA keys and values, MLKA keys,
        each (heads, L, D), computed once for the whole batch."""
        return (self.lca.split_heads(self.lca.k_proj(ref)), self.lca.split_heads(self.lca.v_proj(ref)),
                self.mlka.split_heads(self.mlka.k_proj(ref)))

    def forward(self, y: torch.Tensor, ref_heads) -> torch.Tensor:  # y: (B, L, d)
        lca_k, lca_v, mlka_k = ref_heads
        local = self.lca.attend(self.lca.split_heads(self.lca.q_proj(y)), lca_k, lca_v)
        masked = self.mlka.attend(self.mlka.split_heads(self.mlka.q_proj(y)), mlka_k,
                                  self.mlka.split_heads(self.mlka.v_proj(y)))
        z = self.norm1(masked + self.alpha * local)
        return self.norm2(z + self.ffn(z))


class _ReferenceCache(NamedTuple):
    key: tuple  # dtype, device, autocast enabled and dtype
    inputs: List[torch.Tensor]  # copies of the tensors the projections were computed from
    heads: list  # per layer, the projections (LCA k, LCA v, MLKA k)


class ReconstructionNetwork(nn.Module):
    """One level's network: tokens F (B, L, C) -> reconstruction F^ (B, L, C).

    With ``standardize``, the network works on standardised tokens, (F - mu) / sigma with the
    per-channel mean and std of the training features (buffers, set by ``set_statistics``), and
    maps its output back: F^ = head(...) * sigma + mu. Backbone features are far from unit scale
    (Lite0's stride-8 level: std 4.4, channel stds 1.9-6.3, channel means away from zero); a head
    on LayerNorm-ed states must otherwise learn that scale and offset through Adam's bounded steps,
    which a few hundred steps of a small data set do not allow. The loss and the anomaly score
    stay the paper's, in the backbone's units.
    """

    def __init__(self, channels: int, dim: int, grid, window, num_layers: int = 4, num_heads: int = 8,
                 alpha: float = 2.0, ffn_ratio: int = 4, backend: str = "auto", standardize: bool = False):
        super().__init__()
        self.standardize = standardize
        if standardize:  # identity until set_statistics
            self.register_buffer("token_mean", torch.zeros(channels))
            self.register_buffer("token_std", torch.ones(channels))
        self.grid, self.window = tuple(grid), tuple(window)
        length = grid[0] * grid[1]
        self.embed = _init_embedding(nn.Linear(channels, dim))
        self.reference = nn.Parameter(torch.randn(length, channels))  # R ~ N(0, 1), (L, C)
        self.reference_embed = _init_embedding(nn.Linear(channels, dim))
        self.register_buffer("pos", sincos_pos_embed_2d(grid, dim), persistent=False)  # (L, d)
        self.layers = nn.ModuleList(
            RLRLayer(dim, num_heads, grid, window, alpha, ffn_ratio, backend) for _ in range(num_layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, channels)
        self._cache = None  # _ReferenceCache of the projected reference, eval mode only
        self.register_load_state_dict_post_hook(lambda module, _: module.clear_cache())

    def clear_cache(self) -> None:
        self._cache = None

    def train(self, mode: bool = True):
        if mode != self.training:  # model.predict toggles eval() on an eval model: keep the cache
            self.clear_cache()
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):  # .to(), .cuda(), .float(), ...
        self.clear_cache()
        return super()._apply(fn, *args, **kwargs)

    def _reference_inputs(self) -> List[torch.Tensor]:
        """Every tensor the projected reference depends on."""
        tensors = [self.reference, self.pos, *self.reference_embed.parameters()]
        for layer in self.layers:
            for linear in (layer.lca.k_proj, layer.lca.v_proj, layer.mlka.k_proj):
                tensors.extend(linear.parameters())
        return tensors

    def reference_heads(self):
        """Per layer, the projected reference heads.

        In eval mode without autograd they are cached, keyed on everything they depend on: the
        dtype, device and autocast state, and the values of the parameters and buffers they are
        computed from (compared with a copy, so an edit in place or through ``.data`` is seen;
        the copy costs a fraction of the projections it saves). train(), to() and
        load_state_dict() drop the cache. While tracing or compiling it is not used at all: the
        projections are part of the graph.
        """
        if (self.training or torch.is_grad_enabled() or torch.jit.is_tracing()
                or torch.compiler.is_compiling()):
            return self._project_reference()
        device = self.reference.device
        key = (self.reference.dtype, device, torch.is_autocast_enabled(device.type),
               torch.get_autocast_dtype(device.type))
        inputs = self._reference_inputs()
        cache = self._cache
        if cache is None or cache.key != key or not all(map(torch.equal, cache.inputs, inputs)):
            cache = self._cache = _ReferenceCache(key, [t.clone() for t in inputs], self._project_reference())
        return cache.heads

    def _project_reference(self):
        ref = self.reference_embed(self.reference) + self.pos  # R_h: (L, d), shared by the batch
        return [layer.reference_heads(ref) for layer in self.layers]

    @torch.no_grad()
    def set_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """The per-channel mean and std (C,) of the training tokens, for ``standardize``."""
        self.token_mean.copy_(mean)
        self.token_std.copy_(std.clamp_min(1e-6))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.standardize:
            tokens = (tokens - self.token_mean) / self.token_std
        y = self.embed(tokens) + self.pos
        for layer, heads in zip(self.layers, self.reference_heads()):
            y = layer(y, heads)
        out = self.head(self.norm(y))
        return out * self.token_std + self.token_mean if self.standardize else out


def _flatten(feature: torch.Tensor) -> torch.Tensor:
    return feature.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, L, C)


class RLRModel(AnomalyModel):
    """RLR with a frozen backbone: ``model.eval(); out = model(images)`` gives
    ``out.anomaly_map`` (B, 1, S, S) and ``out.score`` (B,); in train mode ``model(images)`` is
    the loss. All of RLRConfig's fields are keyword arguments."""

    name = "rlr"
    label = "RLR"
    config_class = RLRConfig
    recipes = {"fast": "rlr-fast", "paper": "paper"}
    cli_options = (
        ("--feature-norm", dict(choices=("channel", "none"),
                                help="RLR: standardise each level's features per channel for the network (default: "
                                     "channel; with --recipe paper: none, as the paper's code)")),
        ("--score", dict(choices=SCORES,
                         help="RLR: the per-token score of the pixel map, and of the image score unless "
                              "--image-score says otherwise (paper: MSE + (1 - cos) of the reconstruction, the levels "
                              "averaged; balanced, the default: the same with each level divided by its mean on the "
                              "training images; whitened: the residual's Mahalanobis distance under the training "
                              "residuals; balanced and whitened are fitted after training; with --recipe paper: "
                              "paper)")),
        ("--image-score", dict(choices=SCORES,
                               help="RLR: the per-token score that the image score reads, one of --score's choices "
                                    "(default: whitened; the pixel map stays --score's; with --recipe paper: "
                                    "--score's)")),
        ("--anomaly-map", dict(choices=ANOMALY_MAPS,
                               help="RLR: the pixel map (default: finest, the stride-8 level's map; all: the mean of "
                                    "the levels' maps, as the paper; with --recipe paper: all). The image score "
                                    "reads every level either way")),
        ("--map-sigma", dict(type=float, metavar="PIXELS",
                             help="RLR: the Gaussian blur of the pixel map, sigma in input pixels (default: 4; 0: "
                                  "unblurred, as the paper; with --recipe paper: 0)")),
    )

    def __init__(self, **kwargs):
        super().__init__()
        cfg = RLRConfig(**kwargs)
        self.backbone = FrozenBackbone(cfg.backbone, cfg.out_indices, cfg.backbone_weights)
        self.input_size = image_shape(cfg.image_size)
        cfg.image_size = cfg.image_size if isinstance(cfg.image_size, int) else self.input_size
        self.image_size = cfg.image_size
        grids = [tuple(math.ceil(s / r) for s in self.input_size) for r in self.backbone.reductions]
        dims = cfg.dims or tuple(cfg.dim_base * 2 ** (i - 1) for i in cfg.out_indices)
        windows = cfg.windows or tuple(default_windows(g) for g in grids)
        if not (len(dims) == len(windows) == len(grids)):
            raise ValueError(f"{len(grids)} levels but {len(dims)} dims and {len(windows)} windows")
        cfg.dims = tuple(int(d) for d in dims)
        cfg.windows = tuple(tuple(int(k) for k in ((w, w) if isinstance(w, int) else w)) for w in windows)
        cfg.out_indices = tuple(cfg.out_indices)
        check_image_size(cfg.image_size, zip(self.backbone.reductions, grids, cfg.windows))
        self.config = cfg
        self.grids = grids
        self.pool = nn.AvgPool2d(3, stride=1, padding=1)
        if cfg.feature_norm not in ("channel", "none"):
            raise UsageError(f"unknown feature_norm {cfg.feature_norm!r}; choose 'channel' or 'none'")
        self.levels = nn.ModuleList(
            ReconstructionNetwork(c, d, g, w, cfg.num_layers, cfg.num_heads, cfg.alpha, cfg.ffn_ratio, cfg.backend,
                                  standardize=cfg.feature_norm == "channel")
            for c, d, g, w in zip(self.backbone.channels, cfg.dims, grids, cfg.windows))
        if cfg.score not in SCORES:
            raise UsageError(f"unknown score {cfg.score!r}; choose one of {', '.join(SCORES)}")
        if cfg.image_score is not None and cfg.image_score not in SCORES:
            raise UsageError(f"unknown image_score {cfg.image_score!r}; choose one of {', '.join(SCORES)} (or None: "
                             f"the score's)")
        if "whitened" in self.score_kinds():
            self.scores = nn.ModuleList(WhitenedResidual(c) for c in self.backbone.channels)
        if "balanced" in self.score_kinds():
            self.balance = LevelBalance(len(self.levels))
        if cfg.anomaly_map not in ANOMALY_MAPS:
            raise UsageError(f"unknown anomaly_map {cfg.anomaly_map!r}; choose one of {', '.join(ANOMALY_MAPS)}")
        if not (isinstance(cfg.map_sigma, (int, float)) and cfg.map_sigma >= 0):
            raise UsageError(f"map_sigma must be a number >= 0 (the pixel map's blur in pixels), got {cfg.map_sigma!r}")

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> List[torch.Tensor]:
        return self.pooled_levels(images)

    # Runs made before feature_norm existed used raw tokens; before dim_base, their dims (always
    # stored) came from 128 * 2 ** (index - 1); before score, anomaly_map and map_sigma, the paper's;
    # before image_score, the image score read the map's score.
    legacy_config = {"feature_norm": "none", "dim_base": 128, "score": "paper", "image_score": None, "anomaly_map": "all",
                     "map_sigma": 0.0}
    paper_config = PAPER_NETWORK

    @torch.no_grad()
    def prepare(self, cache) -> None:
        """Per level, the per-channel mean and std of the training tokens (pooled features, as the
        networks see them), summed in float64 over the whole cache in batches and, under
        torchrun, over every rank's share."""
        if self.config.feature_norm != "channel":
            return
        device = self.levels[0].token_mean.device
        sums = [torch.zeros(2, net.token_mean.numel(), dtype=torch.float64, device=device) for net in self.levels]
        count = torch.zeros(1, dtype=torch.float64, device=device)
        for start in range(0, len(cache), 32):
            for total, level in zip(sums, cache.batch(range(start, min(len(cache), start + 32)), device)):
                tokens = _flatten(level).reshape(-1, level.shape[1]).double()
                total[0] += tokens.sum(0)
                total[1] += tokens.pow(2).sum(0)
            count += min(len(cache), start + 32) - start
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for total in sums:
                torch.distributed.all_reduce(total)
            torch.distributed.all_reduce(count)
        for net, total, level in zip(self.levels, sums, cache.levels):
            n = count * level.shape[2] * level.shape[3]  # tokens
            mean = total[0] / n
            var = (total[1] / n - mean.pow(2)).clamp_min(0) * n / (n - 1).clamp_min(1)
            net.set_statistics(mean.float(), var.sqrt().float())

    def score_kinds(self) -> Tuple[str, ...]:
        """The per-token scores the model reads: the pixel map's (``score``), then the image
        score's (``image_score``) when it is another."""
        image = self.config.image_score or self.config.score
        return (self.config.score,) if image == self.config.score else (self.config.score, image)

    @torch.no_grad()
    def fit_score(self, cache) -> None:
        """The statistics of the scores the model reads (``score_kinds``), from every token of the
        cache (no jitter, eval mode) in one pass, summed in float64 in batches and, under
        torchrun, over every rank's share. "whitened": per level, the mean and covariance of the
        residuals F - F^; "balanced": per level, the mean paper score. The training loop calls it
        on the served (best epoch's) weights once training ends; call it again after changing
        the weights."""
        kinds = self.score_kinds()
        whiten, balance = "whitened" in kinds, "balanced" in kinds
        if not (whiten or balance):
            return
        was_training = self.training
        self.eval()
        device = self.levels[0].reference.device
        f64 = dict(dtype=torch.float64, device=device)
        channels = [net.reference.shape[-1] for net in self.levels]
        firsts = [torch.zeros(c, **f64) for c in channels]
        seconds = [torch.zeros(c, c, **f64) for c in channels]
        level_sums = torch.zeros(len(self.levels), **f64)
        count = torch.zeros(1, **f64)
        for start in range(0, len(cache), 16):
            stop = min(len(cache), start + 16)
            pairs = self.reconstruct(cache.batch(range(start, stop), device))
            with full_precision(device):
                for level, (target, recon) in enumerate(pairs):
                    target, recon = target.float(), recon.float()
                    if whiten:
                        r = (target - recon).reshape(-1, target.shape[-1]).double()
                        firsts[level] += r.sum(0)
                        seconds[level] += r.T @ r
                    if balance:
                        level_sums[level] += paper_score(target, recon).double().mean(-1).sum()
            count += stop - start
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for total in (*firsts, *seconds, level_sums, count):
                torch.distributed.all_reduce(total)
        if whiten:
            for score, first, second, grid in zip(self.scores, firsts, seconds, self.grids):
                n = count * grid[0] * grid[1]  # tokens
                mean = first / n
                cov = (second / n - torch.outer(mean, mean)) * n / (n - 1).clamp_min(1)
                score.set_statistics(mean, cov)
        if balance:
            self.balance.set_mean_error((level_sums / count).float())
        self.train(was_training)

    def score_is_fitted_after_training(self) -> bool:
        return any(kind in ("whitened", "balanced") for kind in self.score_kinds())

    def _kind_fitted(self, kind: str) -> bool:
        if kind == "whitened":
            return self.scores[0].is_fitted
        if kind == "balanced":
            return self.balance.is_fitted
        return True  # "paper" needs no statistics

    def score_fitted(self) -> bool:
        return all(self._kind_fitted(kind) for kind in self.score_kinds())

    def balanced(self) -> bool:
        """Whether a map (the pixel map's or the image score's) is divided by each level's mean
        training error (score "balanced", fitted)."""
        return "balanced" in self.score_kinds() and self._kind_fitted("balanced")

    def whitened(self) -> bool:
        """Whether a map (the pixel map's or the image score's) is the whitened residual's (score
        "whitened", fitted)."""
        return "whitened" in self.score_kinds() and self._kind_fitted("whitened")

    def reconstruct(self, feats: List[torch.Tensor], jitter: bool = False):
        """[(F, F^)] per level, tokens (B, L, C); jitter perturbs the input only."""
        pairs = []
        for f, net in zip(feats, self.levels):
            tokens = _flatten(f)
            source = feature_jitter(tokens, self.config.jitter_scale, self.config.jitter_prob) if jitter else tokens
            pairs.append((tokens, net(source)))
        return pairs

    def loss(self, feats: List[torch.Tensor]) -> torch.Tensor:
        """Sum over levels of MSE(F^, F) + mean(1 - cos(F^, F)) (cosine over channels)."""
        total, terms = 0.0, {}
        for level, (target, recon) in enumerate(self.reconstruct(feats, jitter=self.training)):
            mse = F.mse_loss(recon, target)
            cos = (1 - F.cosine_similarity(recon, target, dim=-1)).mean()
            terms[f"level{level}_mse"], terms[f"level{level}_cos"] = mse.detach(), cos.detach()
            total = total + mse + cos
        self.last_terms = terms  # per level and term: the training log's "terms"
        return total

    def _token_score(self, kind: str, level: int, target: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """One level's per-token score of `kind`, (B, L) from float32 (B, L, C) pairs; an unfitted
        "whitened" or "balanced" scores as "paper"."""
        if kind == "whitened" and self._kind_fitted(kind):
            return self.scores[level](target - recon)
        s = paper_score(target, recon)
        if kind == "balanced" and self._kind_fitted(kind):
            s = s / self.balance.mean_error[level]
        return s

    def predict_features(self, feats: List[torch.Tensor]) -> AnomalyOutput:
        cfg = self.config
        kinds = self.score_kinds()
        image_kind = kinds[-1]
        # the pixel map of "finest" reads the first level only
        pixel_levels = 1 if cfg.anomaly_map == "finest" else len(self.levels)
        maps = {kind: [] for kind in kinds}  # per kind, per level (B, 1, H, W)
        pairs = self.reconstruct(feats)
        with full_precision(feats[0].device):  # the score map in float32, whatever the forward's precision
            for level, ((target, recon), grid) in enumerate(zip(pairs, self.grids)):
                target, recon = target.float(), recon.float()
                for kind in kinds:
                    if kind != image_kind and level >= pixel_levels:
                        continue
                    s = self._token_score(kind, level, target, recon).view(-1, 1, *grid)
                    maps[kind].append(F.interpolate(s, size=self.input_size, mode="bilinear", align_corners=True))
            mean_map = torch.stack(maps[image_kind]).mean(0)  # (B, 1, H, W)
            blurred_mean = gaussian_blur(mean_map, cfg.score_sigma)
            score = blurred_mean.amax(dim=(1, 2, 3))
            pixel_maps = maps[cfg.score]
            if cfg.anomaly_map == "finest":
                anomaly_map = gaussian_blur(pixel_maps[0], cfg.map_sigma)  # sigma 0: unchanged
            elif image_kind == cfg.score and cfg.map_sigma == cfg.score_sigma:
                anomaly_map = blurred_mean  # the same blur of the same map: computed once
            else:
                anomaly_map = gaussian_blur(torch.stack(pixel_maps).mean(0), cfg.map_sigma)
        return AnomalyOutput(anomaly_map, score)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in asdict(self.config).items())
