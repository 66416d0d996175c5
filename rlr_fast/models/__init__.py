"""Anomaly models: RLR (the paper's) and UniAD (the baseline)."""
from .base import AnomalyModel, AnomalyOutput, Prediction
from .rlr import RLRConfig, RLRModel
from .uniad import UniADConfig, UniADModel

__all__ = ["AnomalyModel", "AnomalyOutput", "Prediction", "RLRConfig", "RLRModel", "UniADConfig", "UniADModel"]
