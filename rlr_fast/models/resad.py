"""ResAD (NeurIPS 2024): class-generalizable few-shot anomaly detection.

Trained once on some classes, ResAD inspects a new class from K normal reference images with no
retraining. Its three parts, per backbone level (the official code: github xcyao00/ResAD):

1. Feature converter: each token of the frozen backbone's feature map becomes its *residual*
   against the most cosine-similar token of the same level over all tokens of the K reference
   images (any position), found with :func:`rlr_fast.nearest_reference`. The paper writes the
   residual as the difference ``f - r``; the official code uses the squared difference
   ``(f - r) ** 2``. Both are offered (``residual="difference"`` or ``"squared"``), of the
   features scaled to norm sqrt(C) per token (``normalize="token"``, see below).
2. Feature constraintor: a 3x3 conv, batch norm and ReLU (the official ``MultiScaleConv``),
   trained with the official hypersphere loss (``hypersphere_loss``).
3. Feature distribution estimator: a conditional normalizing flow of FrEIA ``AllInOneBlock``
   couplings conditioned on a 2D sine-cosine positional embedding (the official ``fc_flow.py``),
   trained by maximum likelihood on normal tokens (stage 1) plus the official boundary losses on
   anomalous tokens (stage 2, ``flow_loss``).

Anomaly map, as the official ``validate.py``: per level the token log-likelihood per dimension
``logp``; (a) ``exp(logp - c)`` upsampled and summed over levels, turned into an anomaly score by
negation, and (b) the probability of the abnormal centre ``softmax([logp, logp_a])[1]``
upsampled and averaged over levels; each Gaussian-filtered (sigma 4), the map is their mean and
the image score its maximum. Test-time matching (``match_alpha``, 0.4 by default): the map is
then ``(1 - alpha) * map + alpha * knn``, ``knn`` the few-shot matching map of the similarities
the converter found (1 - cosine, levels averaged, filtered alike), as ``FewShotKNN``'s.

Deviations from the official code, and why:

- Backbone: the embedded ``tf_efficientnet_lite0`` at indices (1, 2, 3) (strides 4/8/16, as
  WideResNet50's layers 1-3 in the paper), so that it runs offline; any timm backbone by name.
- Feature scale (``normalize="token"``): each token's features and its match are scaled to
  norm sqrt(C) before the residual. The embedded Lite0's features are unnormalised (token norms
  of about 300), so their squared residuals reached 1e3 per element and the constraintor's
  invariance term (MSE of its output to its input on anomalous tokens) held the stage-2 loss at
  about 5e4, a target no batch-normalised output can reach; scaled, residuals are of order 1
  like the official WideResNet50's. The match (by cosine) is unchanged.
- Training references: K images drawn anew per batch from each class's normal images, as the
  official training, but from cached backbone features (``rlr_fast.fewshot.ReferencePoolCache``:
  the residuals are recomputed per batch, the backbone is not), leaving out the batch's own
  images (the official draw may pick them).
- Normalisation constant ``c`` of (a): the official code subtracts the maximum log-likelihood
  of the whole test set, which makes an image's score depend on the other test images. Here
  ``c`` is per level the maximum log-likelihood of the K reference images' own tokens, each
  against the other K - 1 (``calibrate``, set by ``set_reference``), so it fits the class being
  inspected and a single image gets the same score alone or in a batch; with K = 1, and with
  ``calibrate=False``, the running maximum of normal training tokens (``logp_max``). A constant
  per level matters: the levels are summed, and (a) is averaged with (b).
- Test-time matching: the official code's ``fdm_alpha`` 0.4 is ResAD++'s feature distribution
  matching of the residuals towards their vector-quantised codes (sorted values moved 60% of
  the way), which needs the quantiser; here the same weight blends the nearest-reference
  similarity, which the converter computes anyway, into the map (``match_alpha``).
- Stage 1 learns from the normal images of a batch only (the official stage 1 loads only normal
  images), so anomalous tokens reach neither its losses nor the batch norm's statistics. The
  flow sees all tokens of a batch in one step (the official code takes random chunks of 8192
  tokens with one step each).
- ResAD++'s extras (vector quantisation, ImageBind) are not part of the paper and are left out.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..backbone import EMBEDDED, FrozenBackbone
from ..ops import nearest_reference
from ..precision import full_precision
from .base import AnomalyModel, AnomalyOutput
from .layers import gaussian_blur, sincos_pos_embed_2d

RESIDUALS = ("squared", "difference")
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class ResADConfig:
    """ResADModel's configuration; defaults are the official code's unless noted."""

    image_size: int = 224
    backbone: str = EMBEDDED  # the paper: wide_resnet50_2; lite0's weights ship offline
    backbone_weights: str = "default"
    out_indices: Tuple[int, ...] = (1, 2, 3)  # strides 4, 8, 16
    residual: str = "squared"  # "squared" (official code) or "difference" (paper); see README
    # Scale of the features before the residual: "token" (each token L2-normalised, times sqrt(C):
    # residual elements of order 1 whatever the backbone, as the official WideResNet50's), or "none"
    normalize: str = "token"
    shots: int = 4  # reference images per class
    coupling_layers: int = 10
    clamp_alpha: float = 1.9
    pos_embed_dim: int = 256
    first_stage: float = 0.1  # fraction of the epochs with normal tokens only (official: 10 of 100)
    pos_beta: float = 0.05  # the normal boundary is this quantile of normal log-likelihoods
    margin_tau: float = 0.1  # abnormal boundary = normal boundary - margin_tau
    bgspp_lambda: float = 1.0  # weight of the boundary-guided losses
    score_sigma: float = 4.0
    # Test-time feature matching: the map is (1 - match_alpha) ResAD's + match_alpha the kNN map
    # (1 - nearest-reference cosine similarity, levels averaged, blurred alike); 0 turns it off
    match_alpha: float = 0.4
    # Normalise each level's log-likelihood by its maximum over the K references' own tokens, each
    # reference against the other K - 1 (with K = 1: the running maximum of training, logp_max)
    calibrate: bool = True
    backend: str = "auto"  # nearest_reference backend


NORMALIZATIONS = ("token", "none")


def _tokens(feature: torch.Tensor) -> torch.Tensor:
    return feature.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, L, C)


class ResidualConverter(nn.Module):
    """Frozen backbone plus the reference bank of one class: per level, the (M, C) tokens of the
    K reference images (M = K * H * W). ``set_reference`` must be called before ``match``."""

    def __init__(self, backbone: str, out_indices, weights, image_size: int, backend: str):
        super().__init__()
        self.backbone = FrozenBackbone(backbone, out_indices, weights)
        self.grids = [(math.ceil(image_size / r),) * 2 for r in self.backbone.reductions]
        self.backend = backend
        self.bank: Optional[List[torch.Tensor]] = None

    def levels(self, images: torch.Tensor) -> List[torch.Tensor]:
        feats = self.backbone(images)
        for f, g in zip(feats, self.grids):
            if tuple(f.shape[-2:]) != g:
                raise ValueError(f"backbone gave a {tuple(f.shape[-2:])} grid, expected {g}")
        return feats

    @torch.no_grad()
    def set_reference(self, images: torch.Tensor) -> None:
        self.bank = [_tokens(f).reshape(-1, f.shape[1]).contiguous() for f in self.levels(images)]

    @torch.no_grad()
    def match(self, images: torch.Tensor):
        """Per level (features (B, C, H, W), matched reference features (B, C, H, W), cosine
        similarity (B, H, W)) of every token and its nearest reference token."""
        if self.bank is None:
            raise ValueError("no reference images: call set_reference(images) with K normal images "
                             "of the class being inspected first")
        return [(f, *match_level(f, bank, self.backend)) for f, bank in zip(self.levels(images), self.bank)]


@torch.no_grad()
def match_level(f: torch.Tensor, bank: torch.Tensor, backend: str = "auto"):
    """Features f (B, C, H, W) against a bank of reference tokens (M, C): (the nearest reference
    token of each, by cosine similarity, (B, C, H, W); that similarity (B, H, W))."""
    bank = bank.to(f.device, f.dtype)
    index, sim = nearest_reference(_tokens(f), bank, backend=backend)
    matched = bank[index].transpose(1, 2).reshape(f.shape)  # gather the features themselves
    return matched, sim.view(f.shape[0], *f.shape[-2:])


def residual_of(f: torch.Tensor, matched: torch.Tensor, residual: str = "squared",
                normalize: str = "token") -> torch.Tensor:
    """The residual (B, C, H, W) of features f and their matched reference features. With
    ``normalize="token"`` both are first scaled to norm sqrt(C) per token, so the residual's
    scale no longer depends on the backbone's (the embedded Lite0's squared residuals reach 1e3
    per element, the official WideResNet50's are of order 1); the match is by cosine, unchanged."""
    if normalize == "token":
        scale = math.sqrt(f.shape[1])
        f, matched = F.normalize(f, dim=1) * scale, F.normalize(matched, dim=1) * scale
    diff = f - matched
    return diff.pow(2) if residual == "squared" else diff


class _ReferenceMixin:
    """``set_reference(images)``: the K normal images of the class to inspect."""

    def set_reference(self, images: torch.Tensor):
        self.check_images(images)
        images = images.to(next(self.parameters()).device)
        self.converter.set_reference(images)
        if hasattr(self, "calibrate_to_references"):
            self.calibrate_to_references(images)
        return self


def _subnet(dims_in: int, dims_out: int) -> nn.Module:
    """The official coupling subnet: Linear(d, 2d), ReLU, Linear(2d, out)."""
    return nn.Sequential(nn.Linear(dims_in, 2 * dims_in), nn.ReLU(), nn.Linear(2 * dims_in, dims_out))


def random_rotation(n: int) -> torch.Tensor:
    """A uniformly random rotation (n, n) (orthogonal, determinant +1) from torch's generator:
    QR of a Gaussian matrix with the signs of R's diagonal moved into Q, then one column
    flipped if the determinant is -1."""
    q, r = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    if torch.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q.float()


def conditional_flow(channels: int, cond_dim: int, coupling_layers: int, clamp: float) -> nn.Module:
    """The official conditional flow: FrEIA AllInOneBlocks (soft permutation, softplus global
    affine) conditioned on a ``cond_dim`` vector. Call as ``flow(x, c=[cond]) -> (z, log|det J|)``.

    FrEIA draws each block's fixed rotation from numpy's global generator; they are redrawn here
    from torch's, so that the same ``torch.manual_seed`` builds the same flow (as for every other
    module of the package). They are fixed parameters and live in the state dict."""
    import FrEIA.framework as Ff
    import FrEIA.modules as Fm

    flow = Ff.SequenceINN(channels)
    for _ in range(coupling_layers):
        flow.append(Fm.AllInOneBlock, cond=0, cond_shape=(cond_dim,), subnet_constructor=_subnet,
                    affine_clamping=clamp, global_affine_type="SOFTPLUS", permute_soft=True)
    with torch.no_grad():
        for block in flow.module_list:
            w = random_rotation(channels)
            block.w_perm.copy_(w.view_as(block.w_perm))
            block.w_perm_inv.copy_(w.t().reshape(block.w_perm_inv.shape))
    return flow


def log_likelihoods(z: torch.Tensor, log_det: torch.Tensor):
    """Per-dimension log-likelihood of the flow outputs z (N, C) under the normal centre N(0, I)
    and the abnormal centre N(1, I): ``(logp, logp_a)``, each (N,)."""
    c = z.shape[1]
    logp = (-c * _LOG_SQRT_2PI - 0.5 * z.pow(2).sum(1) + log_det) / c
    logp_a = (-c * _LOG_SQRT_2PI - 0.5 * (z - 1).pow(2).sum(1) + log_det) / c
    return logp, logp_a


def _barrier(x: torch.Tensor) -> torch.Tensor:
    """The official log barrier of the distances x > 0 past a bound: mean(softplus(x) e^x), the
    weight e^x without gradient; 0 for no tokens."""
    return (F.softplus(x) * torch.exp(x).detach()).mean() if x.numel() else x.new_zeros(())


def hypersphere_terms(features: torch.Tensor, anomalous: torch.Tensor, target: torch.Tensor) -> dict:
    """The official one-class loss of the constraintor (``calculate_log_barrier_bi_occ_loss``), by
    term: ``shell`` (normal tokens), ``invariance`` and ``push_out`` (anomalous tokens).

    features (N, C) after the constraintor, target (N, C) its input, anomalous (N,) bool. With
    radius A = sqrt(||f|| + 1) - 1: normal tokens are pulled into the shell [r_min, r_max]
    (r_max = min(0.9 * smallest anomalous radius, 0.4), or 0.4 without anomalies; r_min =
    0.99 r_max); anomalous ones keep their input (MSE + 1 - cos) and are pushed past r_max + 0.1.
    """
    radius = torch.sqrt(features.norm(dim=1) + 1) - 1
    normal = radius[~anomalous]
    zero = features.new_zeros(())
    terms = {"shell": zero, "invariance": zero, "push_out": zero}
    r_max = 0.4
    if anomalous.any():
        r_max = min(0.9 * radius[anomalous].min().item(), 0.4)
    r_min = 0.99 * r_max
    if normal.numel():
        terms["shell"] = _barrier(normal[normal > r_max] - r_max) + _barrier(r_min - normal[normal < r_min])
    if anomalous.any():
        f, t, ra = features[anomalous], target[anomalous], radius[anomalous]
        terms["invariance"] = F.mse_loss(f, t) + (1 - F.cosine_similarity(f, t, dim=1)).mean()
        bound = r_max + 0.1
        terms["push_out"] = _barrier(bound - ra[ra < bound])
    return terms


def hypersphere_loss(features: torch.Tensor, anomalous: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The sum of :func:`hypersphere_terms`."""
    return sum(hypersphere_terms(features, anomalous, target).values())


def focal_loss(probs: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, smooth: float = 1e-5) -> torch.Tensor:
    """The official focal loss of two-class probabilities (N, 2) against labels (N,) in {0, 1},
    with label smoothing ``smooth``: mean(-(1 - p_t)^gamma log p_t)."""
    one_hot = F.one_hot(target.long(), 2).to(probs.dtype).clamp(smooth, 1 - smooth)
    pt = (one_hot * probs).sum(1) + smooth
    return (-(1 - pt).pow(gamma) * pt.log()).mean()


def matching_map(sims: List[torch.Tensor], size, sigma: float) -> torch.Tensor:
    """The few-shot matching map (B, 1, S, S): per level 1 - the nearest-reference cosine
    similarity (B, 1, H, W), upsampled, averaged over levels, Gaussian-filtered."""
    maps = [F.interpolate(1 - sim, size=size, mode="bilinear", align_corners=True) for sim in sims]
    return gaussian_blur(torch.stack(maps).mean(0), sigma)


def _attach_converter(model, cfg) -> None:
    """The feature converter both few-shot models share, and the sizes it fixes: square inputs
    (the references are resized alike) and one token grid per level."""
    model.image_size = cfg.image_size
    model.input_size = (cfg.image_size, cfg.image_size)
    model.converter = ResidualConverter(cfg.backbone, cfg.out_indices, cfg.backbone_weights, cfg.image_size,
                                        cfg.backend)
    model.grids = model.converter.grids


class ResADModel(_ReferenceMixin, AnomalyModel):
    """ResAD with a frozen backbone. ``model.set_reference(ref_images)`` (K normal images of the
    class, (K, 3, S, S)); then in eval mode ``model(images)`` gives ``anomaly_map`` (B, 1, S, S)
    and ``score`` (B,). All of ResADConfig's fields are keyword arguments.

    ``features(images)`` is the converter's output, the residual maps; training caches them.
    ``loss(feats)`` takes those residuals and, optionally, one more entry: the (B, 1, S, S)
    anomaly masks (without it every token is normal)."""

    select_best_epoch = False  # the loss of stage 2 is not that of stage 1: the run is its last epoch

    name = "resad"
    label = "ResAD"
    config_class = ResADConfig
    recipes = {"fast": "resad-fast", "paper": "resad"}
    takes_references = True
    cli_options = (("--residual", dict(choices=("squared", "difference"),
                                       help="ResAD's residual: (f - r)^2 as the official code (default) or f - r "
                                            "as the paper")),)
    config_options = ("shots",)  # --shots: `train` adds it with the other reference options
    options_elsewhere = "note"
    option_use = "reference images"
    # Its graph would hold the reference features of one class (or take them as inputs) and
    # FrEIA's flows and the nearest-reference search, none of them traced yet.
    graph_export_refused = ("ResAD runs cannot be exported as a graph yet (its reference images change per class); "
                            "use --format weights, or predict with `rlr-fast predict --reference`")

    def __init__(self, **kwargs):
        super().__init__()
        cfg = ResADConfig(**kwargs)
        if cfg.residual not in RESIDUALS:
            raise ValueError(f"residual must be one of {', '.join(RESIDUALS)}, got {cfg.residual!r}")
        if cfg.shots < 1:
            raise ValueError(f"shots must be at least 1, got {cfg.shots}")
        if cfg.normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {', '.join(NORMALIZATIONS)}, got {cfg.normalize!r}")
        if not 0 <= cfg.match_alpha <= 1:
            raise ValueError(f"match_alpha must be in [0, 1], got {cfg.match_alpha}")
        cfg.out_indices = tuple(int(i) for i in cfg.out_indices)
        self.config = cfg
        _attach_converter(self, cfg)
        channels = self.converter.backbone.channels
        self.constraintor = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()) for c in channels)
        self.flows = nn.ModuleList(
            conditional_flow(c, cfg.pos_embed_dim, cfg.coupling_layers, cfg.clamp_alpha) for c in channels)
        for i, g in enumerate(self.grids):
            self.register_buffer(f"pos{i}", sincos_pos_embed_2d(g, cfg.pos_embed_dim), persistent=False)
        levels = len(channels)
        # Running values of training (saved, so resume and DDP see them): the normal boundary of
        # each level (official BoundaryAverager, momentum 0.9) and the normalisation constant c.
        self.register_buffer("boundary", torch.zeros(levels))
        self.register_buffer("logp_max", torch.zeros(levels))
        # The normalisation constant of the current references (calibrate_to_references); not
        # saved: it belongs to the class being inspected, not to the trained model.
        self.register_buffer("logp_ref", torch.full((levels,), float("nan")), persistent=False)
        self.stage = 1

    def begin_epoch(self, epoch: int, epochs: int) -> None:
        """Stage 1 (normal tokens only) for the first ``first_stage`` of the epochs, then stage 2."""
        self.stage = 1 if epoch < max(1, round(self.config.first_stage * epochs)) else 2

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> List[torch.Tensor]:
        """Per level the residual maps (B, C, H, W), then per level the nearest-reference cosine
        similarity (B, 1, H, W) (test-time matching); ``loss`` and training use the residuals."""
        matches = self.converter.match(images)
        return [self.residual(f, matched) for f, matched, _ in matches] + [sim.unsqueeze(1) for _, _, sim in matches]

    def residual(self, f: torch.Tensor, matched: torch.Tensor) -> torch.Tensor:
        return residual_of(f, matched, self.config.residual, self.config.normalize)

    @torch.no_grad()
    def calibrate_to_references(self, images: torch.Tensor) -> None:
        """``logp_ref``: per level, the maximum log-likelihood of the K reference images' tokens,
        each reference's residuals taken against the other K - 1 (leave one reference out), in
        eval mode. With one reference there is no other: NaN, and scoring falls back to the
        running maximum of training (``logp_max``)."""
        self.logp_ref.fill_(float("nan"))
        k = images.shape[0]
        if k < 2:
            return
        was_training = self.training
        self.eval()
        try:
            with full_precision(images.device):
                feats = [f.float() for f in self.converter.levels(images)]
                for level, f in enumerate(feats):
                    best = -float("inf")
                    for i in range(k):
                        others = torch.cat([f[:i], f[i + 1:]])
                        bank = _tokens(others).reshape(-1, f.shape[1])
                        matched, _ = match_level(f[i:i + 1], bank, self.config.backend)
                        logp, _ = self._level_logp(self.residual(f[i:i + 1], matched), level)
                        best = max(best, logp.max().item())
                    self.logp_ref[level] = best
        finally:
            self.train(was_training)

    def _level_logp(self, residual: torch.Tensor, level: int):
        """(logp, logp_a), each (B * H * W,), of a level's residual maps (B, C, H, W)."""
        e, _, pos = self._level_tokens(residual, level)
        z, log_det = self.flows[level](e, c=[pos])
        return log_likelihoods(z, log_det)

    def _level_tokens(self, residual: torch.Tensor, level: int):
        """Constraintor output e (N, C), its input (N, C) and the positional condition (N, P)."""
        b = residual.shape[0]
        e = _tokens(self.constraintor[level](residual)).reshape(-1, residual.shape[1])
        pos = getattr(self, f"pos{level}").to(residual.dtype).repeat(b, 1)
        return e, _tokens(residual).reshape(-1, residual.shape[1]), pos

    def _ema(self, name: str, level: int, value: torch.Tensor, momentum: float = 0.9) -> None:
        buf = getattr(self, name)
        buf[level] = momentum * buf[level] + (1 - momentum) * value.detach()

    def loss(self, feats: List[torch.Tensor]) -> torch.Tensor:
        """Per level: hypersphere loss of the constraintor plus the flow loss on its (detached)
        output. Stage 2 adds the anomalous tokens: see ``flow_terms``. Each named term, summed
        over the levels, is left in ``self.last_terms`` (floats) for the training log."""
        levels = len(self.flows)
        # feats: L residual maps, then optionally L similarity maps (features()), then the mask
        residuals = feats[:levels]
        mask = feats[-1] if len(feats) in (levels + 1, 2 * levels + 1) else None
        if self.stage == 1 and mask is not None:
            # Stage 1 sees normal images only (as the official stage 1, whose loader has no
            # anomalies), so that anomalous tokens reach neither a loss nor the batch norm's statistics.
            normal = mask.flatten(1).amax(1) <= 0.5
            if not normal.any():  # nothing to learn from: a zero that still has a graph
                self.last_terms = {}
                return sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0
            residuals, mask = [r[normal] for r in residuals], mask[normal]
        terms = {}
        for level, residual in enumerate(residuals):
            e, target, pos = self._level_tokens(residual, level)
            if mask is None:
                anomalous = torch.zeros(e.shape[0], dtype=torch.bool, device=e.device)
            else:
                m = F.interpolate(mask.float(), size=residual.shape[-2:], mode="nearest")
                anomalous = _tokens(m).reshape(-1) > 0.5
            keep = ~anomalous if self.stage == 1 else torch.ones_like(anomalous)
            e, target, pos, anomalous = e[keep], target[keep], pos[keep], anomalous[keep]
            level_terms = {f"constraint_{k}": v for k, v in hypersphere_terms(e, anomalous, target).items()}
            level_terms.update(self.flow_terms(level, e.detach(), pos, anomalous))
            for k, v in level_terms.items():
                terms[k] = terms.get(k, 0.0) + v
        self.last_terms = {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in terms.items()}
        return sum(terms.values())

    def flow_loss(self, level: int, e: torch.Tensor, pos: torch.Tensor, anomalous: torch.Tensor) -> torch.Tensor:
        """The sum of :func:`flow_terms`."""
        return sum(self.flow_terms(level, e, pos, anomalous).values())

    def flow_terms(self, level: int, e: torch.Tensor, pos: torch.Tensor, anomalous: torch.Tensor) -> dict:
        """The official flow loss (``train.py``), by term: ``nll_normal``, -log sigmoid(logp) of
        normal tokens; with anomalies also ``nll_anomalous``, -log sigmoid(logp_a) of anomalous
        ones, ``focal``, a focal loss on the two centres' softmax, and ``boundary``, the
        boundary-guided semi-push-pull losses (normal logp below the boundary b_n pulled up,
        anomalous logp above b_a = b_n - tau pushed down) times ``bgspp_lambda``."""
        z, log_det = self.flows[level](e, c=[pos])
        logp, logp_a = log_likelihoods(z, log_det)
        normal = logp[~anomalous]
        zero = logp.new_zeros(())
        if normal.numel():
            k = int(normal.numel() * self.config.pos_beta)
            self._ema("boundary", level, normal.detach().sort().values[k])
            self._ema("logp_max", level, normal.detach().max())
        terms = {"nll_normal": -F.logsigmoid(normal).mean() if normal.numel() else zero,
                 "nll_anomalous": zero, "focal": zero, "boundary": zero}
        if not anomalous.any():
            return terms
        terms["nll_anomalous"] = -F.logsigmoid(logp_a[anomalous]).mean()
        terms["focal"] = focal_loss(torch.softmax(torch.stack([logp, logp_a], -1), -1), anomalous)
        b_n = self.boundary[level].clone()
        b_a = b_n - self.config.margin_tau
        below, above = normal[normal <= b_n], logp[anomalous][logp[anomalous] >= b_a]
        push_pull = (F.softplus(b_n - below).mean() if below.numel() else zero) + \
                    (F.softplus(above - b_a).mean() if above.numel() else zero)
        terms["boundary"] = self.config.bgspp_lambda * push_pull
        return terms

    @torch.no_grad()
    def predict_features(self, feats: List[torch.Tensor]) -> AnomalyOutput:
        with full_precision(feats[0].device):  # flows and score maps in float32, whatever the forward's precision
            return self._score([f.float() for f in feats])

    def normalizer(self) -> torch.Tensor:
        """Per level the constant c of exp(logp - c): the references' (``logp_ref``) when
        ``calibrate`` and they have one, else the running maximum of training (``logp_max``)."""
        if self.config.calibrate and not torch.isnan(self.logp_ref).any():
            return self.logp_ref
        return self.logp_max

    def _score(self, feats: List[torch.Tensor]) -> AnomalyOutput:
        size = (self.image_size,) * 2
        levels = len(self.flows)
        residuals, sims = feats[:levels], feats[levels:2 * levels]
        normality, abnormal = 0.0, 0.0
        c = self.normalizer()
        for level, residual in enumerate(residuals):
            b, _, h, w = residual.shape
            logp, logp_a = self._level_logp(residual, level)
            p_normal = torch.exp(logp - c[level]).view(b, 1, h, w)
            p_abnormal = torch.softmax(torch.stack([logp, logp_a], -1), -1)[:, 1].view(b, 1, h, w)
            normality = normality + F.interpolate(p_normal, size=size, mode="bilinear", align_corners=True)
            abnormal = abnormal + F.interpolate(p_abnormal, size=size, mode="bilinear", align_corners=True)
        sigma = self.config.score_sigma
        scores1 = gaussian_blur(levels - normality, sigma)  # normality -> anomaly, as the official code
        scores2 = gaussian_blur(abnormal / levels, sigma)
        anomaly_map = (scores1 + scores2) / 2
        alpha = self.config.match_alpha
        if alpha > 0:
            if len(sims) != levels:
                raise ValueError(f"test-time matching (match_alpha {alpha}) needs the {levels} similarity maps "
                                 f"that features() returns after the residuals; got {len(feats)} maps")
            anomaly_map = (1 - alpha) * anomaly_map + alpha * matching_map(sims, size, sigma)
        return AnomalyOutput(anomaly_map, anomaly_map.amax(dim=(1, 2, 3)))

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in asdict(self.config).items())


@dataclass
class FewShotKNNConfig:
    """The few-shot kNN baseline: ResAD's converter alone."""

    image_size: int = 224
    backbone: str = EMBEDDED
    backbone_weights: str = "default"
    out_indices: Tuple[int, ...] = (1, 2, 3)
    shots: int = 4
    score_sigma: float = 4.0
    backend: str = "auto"


class FewShotKNN(_ReferenceMixin, AnomalyModel):
    """Few-shot kNN baseline on the same backbone and references as ResAD: each token's anomaly
    is 1 - its cosine similarity to the nearest reference token; per level upsampled and averaged,
    Gaussian-filtered (sigma 4) like ResAD's map, image score its maximum. Nothing is trained."""

    name = "knn"

    def __init__(self, **kwargs):
        super().__init__()
        cfg = FewShotKNNConfig(**kwargs)
        cfg.out_indices = tuple(int(i) for i in cfg.out_indices)
        self.config = cfg
        _attach_converter(self, cfg)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> List[torch.Tensor]:
        return [sim.unsqueeze(1) for _, _, sim in self.converter.match(images)]

    def loss(self, feats):
        raise ValueError("the few-shot kNN baseline has nothing to train")

    @torch.no_grad()
    def predict_features(self, feats: List[torch.Tensor]) -> AnomalyOutput:
        size = (self.image_size,) * 2
        with full_precision(feats[0].device):
            anomaly_map = matching_map([sim.float() for sim in feats], size, self.config.score_sigma)
        return AnomalyOutput(anomaly_map, anomaly_map.amax(dim=(1, 2, 3)))
