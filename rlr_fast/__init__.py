"""rlr-fast: fast multi-class industrial anomaly detection with RLR (ECCV 2024)."""
from .models import AnomalyOutput, RLRModel, UniADModel
from .modules import LocalCrossAttention, NeighborMaskedAttention
from .ops import local_cross_attention, neighbor_masked_attention

__version__ = "0.1.0"

__all__ = [
    "local_cross_attention",
    "neighbor_masked_attention",
    "LocalCrossAttention",
    "NeighborMaskedAttention",
    "RLRModel",
    "UniADModel",
    "AnomalyOutput",
    "__version__",
]
