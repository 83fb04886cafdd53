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
        own_collator = kwargs.get("data_collator") is None and processor is not None
        if own_collator:
            kwargs["data_collator"] = self.make_collator(
                training_args, processor, image_root=image_root, image_size=image_size, image_resize=image_resize
            )
        super().__init__(*args, **kwargs)
        if hasattr(self.data_collator, "set_epoch"):
            self.add_callback(EpochToCollator(self.data_collator))
        # A collator of the caller's may read another schema: only ours is known to need these columns.
        datasets = {"train_dataset": self.train_dataset, "eval_dataset": self.eval_dataset} if own_collator else {}
        for name, dataset in datasets.items():
            for label, part in (dataset.items() if isinstance(dataset, dict) else [(name, dataset)]):
                if part is not None:
                    check_judge_dataset(part, label if isinstance(dataset, dict) else name)

    def make_collator(self, args: Any, processor: Any, **images: Any) -> Any:
        raise NotImplementedError


JUDGE_DATASET_COLUMNS = ("query_text", "query_image", "pos_text", "pos_image", "neg_texts", "judge_scores")
"""The columns every trainer of the judge dataset reads (``neg_images`` is optional: None when no negative has an
image)."""


def check_judge_dataset(dataset: Any, name: str = "train_dataset", show: int = 3) -> None:
    """Check a judge dataset once, before training: every column the collators read is there, and in every row
    ``judge_scores`` holds [positive, one per negative] finite numbers in [0, 1]. Vectorised over the Arrow columns
    (a second or so per million rows); a row that would only be batched late in a run is caught at the start.

    Raises:
        ValueError: naming the missing columns (and those present), or the first bad rows (index and query).

    Example:
        >>> from datasets import Dataset
        >>> rows = Dataset.from_list([dict(query_text="red?", query_image=None, pos_text="red", pos_image=None,
        ...                                neg_texts=["blue"], judge_scores=[0.9, float("nan")])])
        >>> check_judge_dataset(rows)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: train_dataset: 1 row(s) with judge_scores that are not finite numbers in [0, 1]: row 0 ...
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    columns = getattr(dataset, "column_names", None)
    if columns is None:  # an IterableDataset without known features, or a plain list: checked per batch
        return
    missing = [column for column in JUDGE_DATASET_COLUMNS if column not in columns]
    if missing:
        raise ValueError(
            f"{name} lacks the column(s) {missing}; it has {sorted(columns)}. A judge dataset has "
            f"{list(JUDGE_DATASET_COLUMNS)} (+ neg_images): mine one with recipes/mine_hard_negatives.py, or rename "
            "your columns with dataset.rename_columns({...})."
        )
    if not hasattr(dataset, "with_format") or not len(dataset):
        return
    table = dataset.select_columns(["query_text", "neg_texts", "judge_scores"]).with_format("arrow")[:]
    scores, negatives = table.column("judge_scores").combine_chunks(), table.column("neg_texts").combine_chunks()
    counts = pc.fill_null(pc.list_value_length(scores), -1)
    wrong_length = pc.not_equal(counts, pc.add(pc.fill_null(pc.list_value_length(negatives), 0), 1))
    values = pc.cast(pc.list_flatten(scores), pa.float64())
    bad_value = pc.or_kleene(pc.invert(pc.is_finite(values)), pc.or_(pc.less(values, 0.0), pc.greater(values, 1.0)))
    bad_value = pc.fill_null(bad_value, True)  # a null score is not a number either
    rows_of_values = pc.list_parent_indices(scores)
    for problem, rows in (
        ("judge_scores of another length than 1 + len(neg_texts)",
         pc.indices_nonzero(wrong_length).to_pylist()),
        ("judge_scores that are not finite numbers in [0, 1]",
         sorted(set(pc.filter(rows_of_values, bad_value).to_pylist()))),
    ):
        if rows:
            queries = table.column("query_text")
            shown = ", ".join(f"row {row} (query {queries[row].as_py()!r}: {scores[row].as_py()})"
                              for row in rows[:show])
            raise ValueError(
                f"{name}: {len(rows)} row(s) with {problem}: {shown}{', ...' if len(rows) > show else ''}. "
                "judge_scores must be [the positive's P(Yes), one per negative, in the order of neg_texts], each in "
                "[0, 1]: re-score these rows or drop them, e.g. dataset.filter(lambda row, index: index not in bad, "
                "with_indices=True)."
            )


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
