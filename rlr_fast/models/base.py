"""What every anomaly model of rlr-fast provides (RLRModel, UniADModel).

Training runs on cached backbone features, so a model is split into the frozen part
(`features`) and the trained part (`loss`, `predict_features`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Tuple

import torch
from torch import nn

from ..errors import UsageError
from ..precision import autocast, check_precision
from ..windows import complement_is_empty


def check_image_size(image_size: int, levels) -> None:
    """Refuse an image size whose feature grid a masked-attention window covers entirely (its
    central query would have no key), when the model is built rather than at the first forward,
    and in terms of the image size the user chose. `levels`: (stride, grid, window) per level."""
    too_small = [(stride, grid, window) for stride, grid, window in levels
                 if complement_is_empty(tuple(grid), tuple(window))]
    if too_small:
        stride, grid, window = too_small[-1]
        minimum = max(s * min(w) + 1 for s, _, w in too_small)  # a grid side larger than the window
        raise UsageError(f"image size {image_size} is too small for this model: its stride-{stride} feature "
                         f"grid is {grid[0]}x{grid[1]}, which the {window[0]}x{window[1]} attention window "
                         f"covers entirely; use an image size of at least {minimum}")


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def image_shape(size) -> Tuple[int, int]:
    """The input size (H, W) of a model from ``image_size``: an int (square) or a pair of ints."""
    pair = (size, size) if isinstance(size, int) else tuple(size) if isinstance(size, (tuple, list)) else None
    if (pair is None or len(pair) != 2
            or any(isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in pair)):
        raise ValueError(f"image_size must be a positive int or a pair (height, width) of positive ints, "
                         f"got {size!r}")
    return pair


class AnomalyOutput(NamedTuple):
    anomaly_map: torch.Tensor  # (B, 1, S, S) pixel anomaly map
    score: torch.Tensor  # (B,) image anomaly score


@dataclass
class Prediction:
    """What ``model.predict(images)`` decides for a batch of B images of side S."""

    scores: torch.Tensor  # (B,) raw image anomaly scores
    anomaly_maps: torch.Tensor  # (B, 1, S, S) raw pixel anomaly maps
    normalized_scores: Optional[torch.Tensor]  # (B,) in [0, 1], 0.5 at the image threshold; None: no statistics
    labels: Optional[torch.Tensor]  # (B,) bool, True = anomalous; None: no image threshold
    masks: Optional[torch.Tensor]  # (B, 1, S, S) bool, True = anomalous pixel; None: no pixel threshold


def decide(out: AnomalyOutput, thresholds=None, image_threshold: Optional[float] = None,
           pixel_threshold: Optional[float] = None) -> Prediction:
    """The Prediction of an output under ``thresholds`` (a Thresholds or None), the given
    thresholds overriding theirs: shared by the models and the deployment engines."""
    from ..decisions import Thresholds

    chosen = (thresholds or Thresholds()).override(image_threshold, pixel_threshold)
    image, pixel = chosen.image, chosen.pixel
    return Prediction(
        scores=out.score, anomaly_maps=out.anomaly_map,
        normalized_scores=image.normalize(out.score) if image is not None and image.has_statistics else None,
        labels=out.score >= image.threshold if image is not None else None,
        masks=out.anomaly_map >= pixel.threshold if pixel is not None else None)


class AnomalyModel(nn.Module):
    """Base class: ``model(images)`` is the loss in train mode and an AnomalyOutput in eval mode.

    ``precision`` ("fp32" or "bf16") is the precision of ``model(images)``: "bf16" autocasts the
    forward to bfloat16 where the device has native support (fp32 otherwise, with a warning);
    score maps stay float32. Training precision is the training recipe's ``amp``.

    ``thresholds`` (a :class:`rlr_fast.decisions.Thresholds`) is what ``rlr-fast test`` fitted;
    ``rlr_fast.training.load_model`` sets it from the run, and :meth:`predict` decides with it.
    """

    name = "base"
    input_size: Tuple[int, int]  # (H, W) of the images, from image_size
    _precision = "fp32"
    thresholds = None

    @property
    def precision(self) -> str:
        return self._precision

    @precision.setter
    def precision(self, value: str) -> None:
        self._precision = check_precision(value)

    def features(self, images: torch.Tensor) -> List[torch.Tensor]:
        """What training caches: the frozen backbone's features after fixed preprocessing."""
        raise NotImplementedError

    @torch.no_grad()
    def pooled_levels(self, images: torch.Tensor) -> List[torch.Tensor]:
        """The backbone's levels (B, C, H, W), each checked against its expected grid
        (``self.grids``) and smoothed by ``self.pool`` (RLR's and PatchCore's local aggregation)."""
        feats = self.backbone(images)
        for f, g in zip(feats, self.grids):
            if tuple(f.shape[-2:]) != tuple(g):
                raise ValueError(f"backbone gave a {tuple(f.shape[-2:])} grid, expected {tuple(g)}")
        return [self.pool(f) for f in feats]

    def loss(self, feats: List[torch.Tensor]) -> torch.Tensor:
        """Training loss on (cached) features; feature jitter applies in train mode."""
        raise NotImplementedError

    def prepare(self, cache) -> None:
        """Fit what the model derives from its training features, before the first epoch of a new
        run (the training loop calls it; a resumed run has it in its checkpoint). Default: nothing."""

    def fit_score(self, cache) -> None:
        """Fit what the model's score derives from the trained weights on training features (RLR's
        whitened residual), once training ends; the training loop calls it on the weights the run
        serves. Default: nothing."""

    def score_is_fitted_after_training(self) -> bool:
        """Whether the score has statistics that fit_score derives from the trained weights."""
        return False

    def score_fitted(self) -> bool:
        """Whether what fit_score fits is there (always, for a model without it)."""
        return True

    # Values of configuration fields for checkpoints written before the field existed (what
    # those runs did); model_from_checkpoint fills them in.
    legacy_config: dict = {}
    # The configuration of the model's paper where the defaults differ from it (``--recipe paper``).
    paper_config: dict = {}
    # Whether a run keeps the model of its best epoch (best.pt, by the held-out loss): False for a
    # model whose loss changes meaning during training (ResAD's stages), whose run is its last epoch.
    select_best_epoch: bool = True

    # What the commands and the training loop need to know of a model, declared here rather than
    # tested by name (rlr_fast.models.registry looks the class up from a checkpoint's model name).
    # How messages name the model.
    label: str = "base"
    # The configuration dataclass (its defaults, e.g. the image size when none is given).
    config_class = None
    # The training recipe (rlr_fast.training.RECIPES) that each `--recipe` choice names for this
    # model: UniAD and ResAD have their own papers' schedules.
    recipes: dict = {"fast": "fast", "paper": "paper"}
    # Whether the model scores an image against reference images of its class (ResAD): set by
    # set_reference, drawn from --data or --reference by the commands.
    takes_references: bool = False
    # Whether the model is fitted in one pass (``fit``, PatchCore's memory bank) instead of trained.
    training_free: bool = False
    # The model's own options of `rlr-fast train`: (flag, argparse keywords) pairs, each setting
    # the config field of the flag's name (--feature-norm: feature_norm). `train` adds them to its
    # parser, keeps them in the run and refuses them for another model (options_elsewhere "refuse")
    # or notes that it ignores them ("note"; the note says what they are for, option_use).
    cli_options: tuple = ()
    config_options: tuple = ()  # more config fields `train` sets from options it adds itself (--shots)
    options_elsewhere: str = "refuse"
    option_use: str = ""
    # Why `rlr-fast export` refuses a graph (ONNX, OpenVINO) of this model, or None: it exports.
    graph_export_refused: Optional[str] = None
    # Why the model only takes the image size it was built with (what `export --image-size` says).
    fixed_size_reason: str = "its learnable reference has one token per position of the trained feature grid"

    @classmethod
    def default_image_size(cls):
        """The input side the model is built with when no image size is given."""
        return cls.config_class().image_size

    @classmethod
    def option_fields(cls) -> tuple:
        """The config fields `rlr-fast train` sets from this model's own options."""
        return tuple(flag.lstrip("-").replace("-", "_") for flag, _ in cls.cli_options) + tuple(cls.config_options)

    def begin_epoch(self, epoch: int, epochs: int) -> None:
        """Called by the training loop before each epoch (0-based) of `epochs`, for a model whose
        loss changes over training (ResAD's stages). Default: nothing."""

    def predict_features(self, feats: List[torch.Tensor]) -> AnomalyOutput:
        """Anomaly map and score from features."""
        raise NotImplementedError

    def check_images(self, images: torch.Tensor) -> None:
        """Images must be (B, 3, H, W) at the model's input size, ImageNet-normalised floats."""
        h, w = self.input_size
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be a (B, 3, {h}, {w}) tensor, got "
                             f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
        if tuple(images.shape[-2:]) != (h, w):
            raise ValueError(f"images are {images.shape[-2]}x{images.shape[-1]} but the model was built for "
                             f"{h}x{w}; resize them (rlr_fast.data does) or build the model with "
                             f"image_size=({images.shape[-2]}, {images.shape[-1]})")
        expected = next(self.parameters()).dtype
        if images.dtype != expected and not torch.is_autocast_enabled(images.device.type):
            raise TypeError(
                f"images must be {_name(expected)} tensors of ImageNet-normalised values ((x / 255 - mean) / std "
                f"per channel, about -2.1 to 2.6), got {_name(images.dtype)}; rlr_fast.data.load_image reads "
                f"files that way (for uint8 pixels in [0, 255]: images.float().div(255) then normalise with "
                f"rlr_fast.data.IMAGENET_MEAN and IMAGENET_STD)")

    @torch.no_grad()
    def predict(self, images: torch.Tensor, image_threshold: Optional[float] = None,
                pixel_threshold: Optional[float] = None) -> Prediction:
        """Scores, maps and, where thresholds are known (fitted by ``rlr-fast test`` or given
        here, overriding those), normalised scores, labels and binary masks. Runs in eval mode."""
        was_training = self.training
        self.eval()
        try:
            out = self(images)  # checked, in the model's precision
        finally:
            self.train(was_training)
        return decide(out, self.thresholds, image_threshold, pixel_threshold)

    def forward(self, images: torch.Tensor):
        self.check_images(images)
        with autocast(self.precision, images.device):
            feats = self.features(images)
            return self.loss(feats) if self.training else self.predict_features(feats)
