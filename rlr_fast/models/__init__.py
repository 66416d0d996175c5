"""Anomaly models: RLR (the paper's), UniAD (the baseline), ResAD (few-shot, new classes) and
PatchCore (the training-free nearest-neighbour baseline)."""
from .base import AnomalyModel, AnomalyOutput, Prediction
from .patchcore import PatchCoreConfig, PatchCoreModel
from .resad import FewShotKNN, ResADConfig, ResADModel
from .rlr import RLRConfig, RLRModel
from .uniad import UniADConfig, UniADModel
from .registry import create_model, list_models, register_model

__all__ = ["AnomalyModel", "AnomalyOutput", "Prediction", "FewShotKNN", "PatchCoreConfig", "PatchCoreModel",
           "ResADConfig", "ResADModel", "RLRConfig", "RLRModel", "UniADConfig", "UniADModel",
           "create_model", "list_models", "register_model"]
