"""Training UniME-V2 models: losses, collators and Trainer subclasses."""

from .collator import NegativeSelection, UniMEV2Collator
from .embedding_trainer import Loss, UniMEV2Trainer, UniMEV2TrainingArguments
from .losses import InfoNCELoss, SoftLabelAlignmentLoss

__all__ = [
    "InfoNCELoss",
    "Loss",
    "NegativeSelection",
    "SoftLabelAlignmentLoss",
    "UniMEV2Collator",
    "UniMEV2Trainer",
    "UniMEV2TrainingArguments",
]
