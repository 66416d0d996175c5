"""rlr-fast: fast multi-class industrial anomaly detection with RLR (ECCV 2024)."""
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
    "AnomalyOutput",
    "__version__",
]

_MODELS = ("RLRModel", "UniADModel", "AnomalyOutput")


def __getattr__(name):
    # The models pull in timm: import them on first use, so that the ops stay light to import.
    if name in _MODELS:
        from . import models

        return getattr(models, name)
    raise AttributeError(f"module 'rlr_fast' has no attribute {name!r}")
