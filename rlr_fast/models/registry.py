"""Models by name, as timm's registry: ``create_model("rlr_lite0", image_size=128)``.

A *variant* is a model class with default keyword arguments (its backbone, its network's size);
``create_model(name, **kwargs)`` builds one, the keyword arguments overriding the variant's
defaults, and ``list_models()`` lists them. Each model's short name (the class's ``name``: rlr,
uniad, resad, patchcore), which ``rlr-fast train --model`` takes and checkpoints record, names
its default variant.

What the commands and the training loop need to know of a model (its recipes, whether it takes
reference images or is training-free, its default image size, its own options of `rlr-fast
train`) the model class declares (rlr_fast.models.base.AnomalyModel); :func:`model_class` finds
the class of a name. A new model is its own file and one ``register_model`` line below.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from ..backbone import EMBEDDED
from ..errors import UsageError
from .patchcore import PatchCoreModel
from .resad import ResADModel
from .rlr import PAPER_NETWORK, RLRModel
from .uniad import UniADModel


@dataclass(frozen=True)
class ModelVariant:
    """A registered model: its class and the keyword arguments it is built with by default."""

    name: str
    model_class: type
    defaults: Dict[str, object] = field(default_factory=dict)
    description: str = ""

    def build(self, **kwargs):
        return self.model_class(**{**self.defaults, **kwargs})


_VARIANTS: Dict[str, ModelVariant] = {}
_DEFAULT_VARIANT: Dict[str, str] = {}  # model short name (the class's `name`) -> its default variant


def register_model(name: str, model_class: type, *, default: bool = False, description: str = "",
                   **defaults) -> ModelVariant:
    """Register `model_class` built with `defaults` as the model `name`; `default=True` makes it
    the variant the class's short name (``model_class.name``) builds. A name is registered once."""
    if name in _VARIANTS or name in _DEFAULT_VARIANT:
        raise ValueError(f"a model named {name!r} is already registered")
    if default and model_class.name in _DEFAULT_VARIANT:
        raise ValueError(f"{model_class.name} already has a default variant, {_DEFAULT_VARIANT[model_class.name]}")
    variant = ModelVariant(name, model_class, dict(defaults), description)
    _VARIANTS[name] = variant
    if default:
        _DEFAULT_VARIANT[model_class.name] = name
    return variant


def list_models(pattern: Optional[str] = None) -> List[str]:
    """The registered variants' names, sorted; `pattern` (e.g. ``"rlr_*"``) filters them."""
    names = sorted(_VARIANTS)
    return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names


def model_names() -> List[str]:
    """The models' short names (what `rlr-fast train --model` takes), in registration order."""
    return list(_DEFAULT_VARIANT)


def default_variant(short_name: str) -> str:
    """The variant a model's short name builds (e.g. rlr -> rlr_lite0)."""
    return get_variant(short_name).name


def get_variant(name: str) -> ModelVariant:
    """The variant of a variant's name or of a model's short name."""
    name = _DEFAULT_VARIANT.get(name, name)
    if name not in _VARIANTS:
        known = ", ".join([*model_names(), *list_models()])
        raise UsageError(f"unknown model {name!r}; choose one of {known}")
    return _VARIANTS[name]


def model_class(name: str) -> type:
    """The model class of a variant's name or of a model's short name (what checkpoints record)."""
    return get_variant(name).model_class


def create_model(name: str, **kwargs):
    """Build the model `name` (a variant of :func:`list_models`, or a short name: rlr, uniad,
    resad, patchcore), the keyword arguments overriding the variant's defaults."""
    return get_variant(name).build(**kwargs)


# The short names' variants first: model_names() lists them in this order.
register_model("rlr_lite0", RLRModel, default=True,
               description="RLR with this package's defaults: tf_efficientnet_lite0 (weights shipped), 2 layers, "
                           "d 64/128 at 256 px, standardised tokens, the finest level's map")
register_model("uniad_b4", UniADModel, default=True,
               description="UniAD as its paper: efficientnet_b4 (timm pretrained weights), 224 px")
register_model("resad_lite0", ResADModel, default=True,
               description="ResAD on tf_efficientnet_lite0 (weights shipped), 224 px")
register_model("patchcore_lite0", PatchCoreModel, default=True,
               description="PatchCore on tf_efficientnet_lite0 (weights shipped), 256 px")
register_model("rlr_b6_paper", RLRModel, backbone="tf_efficientnet_b6", **PAPER_NETWORK,
               description="RLR as its paper: tf_efficientnet_b6 (timm pretrained weights), 4 layers, d 256/512, "
                           "raw tokens, the mean of the levels' maps")
register_model("uniad_lite0", UniADModel, backbone=EMBEDDED,
               description="UniAD on tf_efficientnet_lite0 (weights shipped), 224 px")
