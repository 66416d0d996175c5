"""Training recipes: the optimiser, schedule and precision of a run (``rlr-fast train --recipe``).

Each model names the recipe of each ``--recipe`` choice (``AnomalyModel.recipes``): UniAD and
ResAD have their own papers' schedules.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from .errors import UsageError


@dataclass
class TrainConfig:
    epochs: int = 20
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_epochs: int = 2
    schedule: str = "cosine"  # "cosine" (after warm-up) or "constant"
    grad_clip: float = 0.0  # 0: none
    optimizer: str = "adam"  # "adam" or "adamw"
    amp: str = "auto"  # "auto" (bf16 where the device has it natively, else none), "none", "bf16", "fp16"
    seed: int = 0
    # the share of each class's training images held out for the validation loss that picks the
    # best epoch (RLR and UniAD; 0: none, the training loss picks it)
    val_fraction: float = 0.1


# "fast" is for minutes on a CPU with a few dozen images per class (README: "A training that says
# when it does not learn" and the accuracy benchmark). "paper" is the recipe of the RLR paper: Adam,
# lr 1e-4, batch 4, 200 epochs, fp32; "uniad" UniAD's: AdamW 1e-4, weight decay 1e-4, gradient
# clipping 0.1.
# RLR's network (2 layers, d 128/256 at 256 px) costs a quarter of the paper's per epoch; it gets
# twice the epochs, which measured better than the paper's network with 20 (README, accuracy), and
# batches of 2: four times the optimizer steps of batch 8 for the same images, at about 1.2 times
# batch 4's cost per image on a 2-core CPU, since the network underfits (its held-out error equals
# its training error); on the accuracy benchmark, 3 seeds, batch 4 beat batch 8 and batch 2 beat
# batch 4 in mean pixel AUROC and AUPRO on every seed, with the same mean image AUROC.
RLR_FAST_EPOCHS = 40
RLR_FAST_BATCH = 2
RECIPES = {
    "fast": TrainConfig(),
    "rlr-fast": TrainConfig(epochs=RLR_FAST_EPOCHS, batch_size=RLR_FAST_BATCH),
    "paper": TrainConfig(epochs=200, batch_size=4, lr=1e-4, warmup_epochs=0, schedule="constant", amp="none"),
    "uniad": TrainConfig(epochs=1000, batch_size=8, lr=1e-4, weight_decay=1e-4, warmup_epochs=0,
                         schedule="constant", grad_clip=0.1, optimizer="adamw", amp="none"),
    # ResAD's official code: Adam, lr 1e-5, weight decay 5e-4, batch 32, 100 epochs (its step decay
    # at epochs 70 and 90 is left out); "resad-fast" is for minutes on a CPU (see the README).
    "resad": TrainConfig(epochs=100, batch_size=32, lr=1e-5, weight_decay=5e-4, warmup_epochs=0,
                         schedule="constant", amp="none"),
    "resad-fast": TrainConfig(epochs=8, batch_size=8, lr=1e-3, weight_decay=5e-4, warmup_epochs=1, amp="none"),
}


def recipe(name: str, **overrides) -> TrainConfig:
    if name not in RECIPES:
        raise UsageError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return replace(RECIPES[name], **{k: v for k, v in overrides.items() if v is not None})

