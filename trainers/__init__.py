"""Training UniME-V2 models: losses, collators and Trainer subclasses."""

from .collator import UniMEV2Collator
from .embedding_trainer import UniMEV2Trainer, UniMEV2TrainingArguments
from .losses import InfoNCELoss, SoftLabelAlignmentLoss

__all__ = [
    "InfoNCELoss",
    "SoftLabelAlignmentLoss",
    "UniMEV2Collator",
    "UniMEV2Trainer",
    "UniMEV2TrainingArguments",
]
