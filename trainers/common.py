"""Pieces both trainers share: string options, the judge-dataset collator, metric logging, loss-only evaluation."""

from __future__ import annotations

import re
from collections import defaultdict
from enum import Enum
from typing import Any

import torch
from accelerate.utils import send_to_device
from transformers import TrainerCallback


class Choice(str, Enum):
    """A string option with a fixed set of values: equal to its value, printed as it, and built from it with an error
    that lists the values (``NegativeSelection("hardest")`` -> "negative_selection='hardest': use one of [...]")."""

    def __str__(self) -> str:
        return self.value

    @classmethod
    def _missing_(cls, value: object):
        option = re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__).lower()
        raise ValueError(f"{option}={value!r}: use one of {[member.value for member in cls]}.")


class EpochToCollator(TrainerCallback):
    """Tells a collator with ``set_epoch`` which epoch starts (a new draw of random negatives or positions)."""

    def __init__(self, collator) -> None:
        self.collator = collator

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.collator.set_epoch(int(state.epoch or 0))


class JudgeDatasetMixin:
    """For `transformers.Trainer` subclasses trained on the judge dataset: without a ``data_collator``, the one
    `make_collator` builds from the arguments, the processor and the image settings (``image_root``, ``image_size``,
    ``image_resize``); a collator with ``set_epoch`` is told each epoch start."""

    def __init__(
        self, *args: Any, image_root: Any = None, image_size: int | None = None, image_resize: str | None = None,
        **kwargs: Any,
    ) -> None:
        training_args = kwargs.get("args") or args[1]
        processor = kwargs.get("processing_class")
        if kwargs.get("data_collator") is None and processor is not None:
            kwargs["data_collator"] = self.make_collator(
                training_args, processor, image_root=image_root, image_size=image_size, image_resize=image_resize
            )
        super().__init__(*args, **kwargs)
        if hasattr(self.data_collator, "set_epoch"):
            self.add_callback(EpochToCollator(self.data_collator))

    def make_collator(self, args: Any, processor: Any, **images: Any) -> Any:
        raise NotImplementedError


def inputs_on_device(inputs: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """A collated batch with every tensor moved to ``device`` (lists and nested dicts followed; other values kept).

    What `Trainer` does before ``compute_loss``, through public API (its own helper is private); the floating inputs
    keep their dtype, as they do under Trainer without DeepSpeed, which these trainers refuse.
    """
    return send_to_device(inputs, device, non_blocking=False)


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
        inputs = inputs_on_device(inputs, self.args.device)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None
