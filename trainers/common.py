"""Pieces both trainers share: metric logging, loss-only evaluation, epoch-aware collators."""

from __future__ import annotations

from collections import defaultdict

import torch
from transformers import TrainerCallback


class EpochToCollator(TrainerCallback):
    """Tells a collator with ``set_epoch`` which epoch starts (a new draw of random negatives or positions)."""

    def __init__(self, collator) -> None:
        self.collator = collator

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.collator.set_epoch(int(state.epoch or 0))


class LoggedMetricsMixin:
    """For `transformers.Trainer` subclasses whose ``compute_loss`` records extra values with ``_record``: they are
    averaged over the steps since the last log (and over processes) and logged beside the loss, with an ``eval_``
    prefix during evaluation. Evaluation computes the loss only: there are no labels or logits to return."""

    def _record(self, metrics: dict[str, torch.Tensor]) -> None:
        if not hasattr(self, "_metrics"):
            self._metrics = defaultdict(list)
        mode = "train" if self.model.training else "eval"
        for name, value in metrics.items():
            self._metrics[f"{mode}/{name}"].append(float(self.accelerator.gather_for_metrics(value.reshape(1)).mean()))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        for name, values in list(getattr(self, "_metrics", {}).items()):
            if name.startswith(f"{mode}/") and values:
                logs[prefix + name.split("/", 1)[1]] = sum(values) / len(values)
                self._metrics[name] = []
        super().log(logs, start_time)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None
