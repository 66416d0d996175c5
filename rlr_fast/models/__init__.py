"""Anomaly models: RLR (the paper's) and UniAD (the baseline)."""
from .base import AnomalyModel, AnomalyOutput
from .rlr import RLRConfig, RLRModel
from .uniad import UniADConfig, UniADModel

__all__ = ["AnomalyModel", "AnomalyOutput", "RLRConfig", "RLRModel", "UniADConfig", "UniADModel"]
