"""Anomaly models: RLR (the paper's), UniAD (the baseline) and ResAD (few-shot, new classes)."""
from .base import AnomalyModel, AnomalyOutput, Prediction
from .resad import FewShotKNN, ResADConfig, ResADModel
from .rlr import RLRConfig, RLRModel
from .uniad import UniADConfig, UniADModel

__all__ = ["AnomalyModel", "AnomalyOutput", "Prediction", "FewShotKNN", "ResADConfig", "ResADModel", "RLRConfig",
           "RLRModel", "UniADConfig", "UniADModel"]
