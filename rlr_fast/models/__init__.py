"""Anomaly models: RLR (the paper's) and UniAD (the baseline)."""
from .base import AnomalyModel, AnomalyOutput
from .rlr import RLRConfig, RLRModel

__all__ = ["AnomalyModel", "AnomalyOutput", "RLRConfig", "RLRModel"]
