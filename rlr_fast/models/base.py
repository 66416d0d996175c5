"""What every anomaly model of rlr-fast provides (RLRModel, UniADModel).

Training runs on cached backbone features, so a model is split into the frozen part
(`features`) and the trained part (`loss`, `predict_features`).
"""
from __future__ import annotations

from typing import List, NamedTuple

import torch
from torch import nn

from ..precision import autocast, check_precision


class AnomalyOutput(NamedTuple):
    anomaly_map: torch.Tensor  # (B, 1, S, S) pixel anomaly map
    score: torch.Tensor  # (B,) image anomaly score


class AnomalyModel(nn.Module):
    """Base class: ``model(images)`` is the loss in train mode and an AnomalyOutput in eval mode.

    ``precision`` ("fp32" or "bf16") is the precision of ``model(images)``: "bf16" autocasts the
    forward to bfloat16 where the device has native support (fp32 otherwise, with a warning);
    score maps stay float32. Training precision is the training recipe's ``amp``.
    """

    name = "base"
    _precision = "fp32"

    @property
    def precision(self) -> str:
        return self._precision

    @precision.setter
    def precision(self, value: str) -> None:
        self._precision = check_precision(value)

    def features(self, images: torch.Tensor) -> List[torch.Tensor]:
        """What training caches: the frozen backbone's features after fixed preprocessing."""
        raise NotImplementedError

    def loss(self, feats: List[torch.Tensor]) -> torch.Tensor:
        """Training loss on (cached) features; feature jitter applies in train mode."""
        raise NotImplementedError

    def predict_features(self, feats: List[torch.Tensor]) -> AnomalyOutput:
        """Anomaly map and score from features."""
        raise NotImplementedError

    def check_images(self, images: torch.Tensor) -> None:
        size = self.image_size
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be a (B, 3, {size}, {size}) tensor, got "
                             f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
        if tuple(images.shape[-2:]) != (size, size):
            raise ValueError(f"images are {images.shape[-2]}x{images.shape[-1]} but the model was built for "
                             f"{size}x{size}; resize them (rlr_fast.data does) or build the model with "
                             f"image_size={images.shape[-1]}")

    def forward(self, images: torch.Tensor):
        self.check_images(images)
        with autocast(self.precision, images.device):
            feats = self.features(images)
            return self.loss(feats) if self.training else self.predict_features(feats)
