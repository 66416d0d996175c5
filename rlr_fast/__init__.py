"""rlr-fast: fast multi-class industrial anomaly detection with RLR (ECCV 2024), UniAD and few-shot ResAD."""
import torch as _torch

# The torch backend calls torch.amp.custom_fwd/custom_bwd with device_type (torch 2.4) and the CPU
# flash-attention ops with a mask (2.3). setup.py declares this floor; the check names it for an
# install that skipped the dependency check (pip --no-deps).
TORCH_MIN = (2, 4)


def _check_torch(version: str) -> None:
    release = tuple(int(p) for p in version.split("+")[0].split(".")[:2])
    if release < TORCH_MIN:
        need = ".".join(map(str, TORCH_MIN))
        raise ImportError(f"rlr-fast needs torch >= {need}, found torch {version}: pip install 'torch>={need}'")


_check_torch(_torch.__version__)
from .modules import LocalCrossAttention, NeighborMaskedAttention
from .ops import local_cross_attention, nearest_reference, neighbor_masked_attention

__version__ = "0.1.0"

__all__ = [
    "local_cross_attention",
    "neighbor_masked_attention",
    "nearest_reference",
    "LocalCrossAttention",
    "NeighborMaskedAttention",
    "RLRModel",
    "UniADModel",
    "ResADModel",
    "PatchCoreModel",
    "AnomalyOutput",
    "Prediction",
    "create_model",
    "list_models",
    "register_model",
    "__version__",
]

_MODELS = ("RLRModel", "UniADModel", "ResADModel", "PatchCoreModel", "AnomalyOutput", "Prediction", "create_model",
           "list_models", "register_model")


def __getattr__(name):
    # The models pull in timm: import them on first use, so that the ops stay light to import.
    if name in _MODELS:
        from . import models

        return getattr(models, name)
    raise AttributeError(f"module 'rlr_fast' has no attribute {name!r}")
