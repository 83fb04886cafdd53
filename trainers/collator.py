"""Batches of the judge dataset for embedding training: a query batch and a candidate batch of 1 + k per query."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from modeling_unime.data import JudgeRow
from modeling_unime.processing_unime import (
    UniMEV2Processor,
    canonical_image_resize,
    drop_orphan_placeholder,
    load_image,
)

from .common import Choice
from .seeding import row_rng, stable_key


class NegativeSelection(Choice):
    """Which of a row's mined negatives a query trains on (`UniMEV2Collator.negative_selection`)."""

    FIRST = "first"
    RANDOM = "random"


NEGATIVE_SELECTIONS = tuple(member.value for member in NegativeSelection)


def load_training_image(image: Any, image_root: Any, image_resize: str | None, where: str):
    """One training image as RGB PIL (or None), resized under ``image_resize`` (see
    `modeling_unime.processing_unime.canonical_image_resize`); a missing or unreadable image raises a ValueError
    that names ``where`` (e.g. "query 'a red circle' negative 3")."""
    return load_image(image, where, image_root, image_resize)


def training_image_resize(processor: Any, image_resize: str | None, image_size: int | None) -> str:
    """The resize rule of a training collator: ``image_resize`` when given, ``square:<image_size>`` for the older
    ``image_size`` setting, else the processor's own rule (what the checkpoint will use at inference)."""
    if image_resize is not None and image_size is not None:
        raise ValueError("Give image_resize or image_size, not both (image_size=N means image_resize='square:N').")
    if image_resize is None:
        image_resize = f"square:{image_size}" if image_size else getattr(processor, "image_resize", "native")
    return canonical_image_resize(image_resize)


def _as_float(value: Any) -> float | None:
    """A judge score as a float (Python, numpy or 0-d torch number), or None for anything else (str, bool, None)."""
    if value is None or isinstance(value, (str, bytes, bool)):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def distinct_inputs(keys: Sequence[Any], inputs: Sequence[Any]) -> tuple[list[Any], list[int]]:
    """(the inputs whose key comes first, in order; for every input the position of its key's first input).

    >>> distinct_inputs(["a", "b", "a", "c", "b"], [10, 20, 11, 30, 21])
    ([10, 20, 30], [0, 1, 0, 2, 1])
    """
    slots: dict[Any, int] = {}
    unique, index = [], []
    for key, item in zip(keys, inputs):
        if key not in slots:
            slots[key] = len(unique)
            unique.append(item)
        index.append(slots[key])
    return unique, index


def negative_positions(
    row: JudgeRow, k: int, selection: str = NegativeSelection.FIRST, seed: int = 0, epoch: int = 0,
    image_root: Any = None,
) -> list[int]:
    """Positions of the ``k`` negatives of ``row`` to train on: its first ``k`` (``"first"``, as the authors' runs), or
    ``k`` drawn without replacement per epoch (``"random"``, `trainers.seeding.row_rng`); a row with fewer
    than ``k`` repeats them in order.

    Example:
        >>> negative_positions({"query_text": "q", "neg_texts": ["a", "b", "c"]}, 5)
        [0, 1, 2, 0, 1]
    """
    available = len(row["neg_texts"])
    if k == 0:
        return []
    if available == 0:
        raise ValueError(
            f"A row has no negatives but num_negatives={k} (query {row['query_text']!r}); mine it again or set "
            "num_negatives=0."
        )
    if selection == NegativeSelection.FIRST or available <= k:
        return [position % available for position in range(k)]
    return row_rng(seed, epoch, row, "negatives", image_root).sample(range(available), k)


@dataclass
class UniMEV2Collator:
    """Turns rows of the judge dataset (`modeling_unime.data.JudgeRow`: ``query_text``, ``query_image``, ``pos_text``,
    ``pos_image``, ``neg_texts``, ``neg_images``, ``judge_scores``) into model inputs.

    Each query gets 1 + ``num_negatives`` candidates, the positive first. The negatives are the row's first ``k``
    (``negative_selection="first"``, as the authors' ``Embedding/src/collator.py``) or ``k`` drawn without
    replacement per epoch (``"random"``, from `trainers.seeding.row_rng`: the seed, the epoch and the row's
    query and positive). A row with fewer than ``k`` negatives
    repeats them in order. Images are resized under ``image_resize`` (the paper trains at ``"authors-train-qwen2vl"``,
    672x672, for Qwen2-VL and ``"authors-train-llava-ov"``, 336x336, for LLaVA-OneVision); by default under the
    processor's own rule. ``image_size=N`` is the older spelling of ``image_resize="square:N"``.

    The output holds ``chunks``: processor batches over the rows [query_1..query_B, candidates of query_1, ...,
    candidates of query_B], of at most ``chunk_size`` rows each so that GradCache can run them one at a time (one
    chunk without it: one forward per step, which DDP needs when some parameters serve only some rows);
    ``num_queries`` (B); and ``judge_scores`` (B, 1 + k). With ``deduplicate=True`` (the default) an input that
    occurs more than once in the step (the same text and the same image: a label text shared by many queries of a
    classification task, a caption mined as a negative for several queries) is encoded once: ``chunks`` hold the
    distinct inputs only and ``input_index`` maps every row above to its distinct input (the trainer gathers the
    embeddings with it, so a shared representation receives the sum of its uses' gradients).

    Every row is checked first (`check_row`): judge scores must be finite probabilities in [0, 1], one for the
    positive and one per negative, and ``neg_images`` one per negative text (or None); a bad row raises
    ``ValueError`` naming its query text, its position in the batch and the fix.

    Example:
        >>> from modeling_unime.tiny import build_tiny_processor
        >>> collate = UniMEV2Collator(build_tiny_processor("qwen2_vl"), num_negatives=2)
        >>> row = dict(query_text="a red circle", query_image=None, pos_text="red", pos_image=None,
        ...            neg_texts=["blue", "green", "teal"], neg_images=[None, None, None],
        ...            judge_scores=[0.9, 0.2, 0.1, 0.05])
        >>> batch = collate([row])
        >>> batch["judge_scores"].round(decimals=2).tolist(), batch["chunks"][0]["input_ids"].shape[0]
        ([[0.8999999761581421, 0.20000000298023224, 0.10000000149011612]], 4)
    """

    processor: UniMEV2Processor
    num_negatives: int = 8
    negative_selection: NegativeSelection | str = NegativeSelection.FIRST
    seed: int = 0
    image_root: str | os.PathLike | None = None
    image_size: int | None = None
    chunk_size: int | None = None
    image_resize: str | None = None
    instruction: str | None = None
    epoch: int = 0
    deduplicate: bool = True
    warned_orphan_placeholders: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        self.negative_selection = NegativeSelection(self.negative_selection)
        if self.num_negatives < 0:
            raise ValueError(f"num_negatives must be >= 0, got {self.num_negatives}.")
        self.training_image_resize = training_image_resize(self.processor, self.image_resize, self.image_size)

    def set_epoch(self, epoch: int) -> None:
        """Called at each epoch start (by `UniMEV2Trainer`): a new draw for ``negative_selection="random"``."""
        self.epoch = int(epoch)

    def choose_negatives(self, row: JudgeRow) -> list[int]:
        """Positions of the row's negatives to train on (`negative_positions` under this collator's settings)."""
        return negative_positions(row, self.num_negatives, self.negative_selection, self.seed, self.epoch,
                                  self.image_root)

    def _image(self, image: Any, where: str):
        return load_training_image(image, self.image_root, self.training_image_resize, where)

    def _process(self, items: Sequence[tuple[str | None, Any]]) -> list[Any]:
        size = self.chunk_size or len(items) or 1
        return [
            self.processor(
                texts=[text for text, _ in items[start : start + size]],
                images=[image for _, image in items[start : start + size]],
                instruction=self.instruction,
                image_resize="native",  # resized above, under the training rule
            )
            for start in range(0, len(items), size)
        ]

    @staticmethod
    def check_row(row: JudgeRow, index: int | None = None) -> list[Any]:
        """Check one row of the judge dataset; returns its ``neg_images`` (one per negative text, None for a
        text-only one). Raises ``ValueError`` naming the row (query text, position in the batch) and the fix when
        ``judge_scores`` is not [positive, one per negative] of finite probabilities in [0, 1], or ``neg_images`` is
        not one per negative text.

        Example:
            >>> row = dict(query_text="red?", neg_texts=["blue"], neg_images=None, judge_scores=[0.9, 0.2])
            >>> UniMEV2Collator.check_row(row)
            [None]
            >>> UniMEV2Collator.check_row(dict(row, judge_scores=[90.0, 20.0]), 3)  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            ValueError: Row with query 'red?' (row 3 of the batch): judge_scores[0] = 90.0 (the positive) is outside ...
        """
        where = f"Row with query {row.get('query_text')!r}"
        where += f" (row {index} of the batch)" if index is not None else ""
        negatives = len(row["neg_texts"])
        scores = row["judge_scores"]
        if scores is None or len(scores) != 1 + negatives:
            raise ValueError(
                f"{where}: judge_scores has {0 if scores is None else len(scores)} values for 1 positive + "
                f"{negatives} negatives. judge_scores must be [the positive's score, one per negative, in the "
                "order of neg_texts]: fix or drop the row."
            )
        for position, score in enumerate(scores):
            value = _as_float(score)
            if value is not None and math.isfinite(value) and 0.0 <= value <= 1.0:
                continue
            which = "the positive" if position == 0 else f"negative {position - 1}, {row['neg_texts'][position - 1]!r}"
            if value is None or not math.isfinite(value):
                raise ValueError(
                    f"{where}: judge_scores[{position}] = {score!r} ({which}) is not a finite number. Judge scores "
                    "are the judge's P(Yes) / (P(Yes) + P(No)) in [0, 1]: score this pair again (a NaN often comes "
                    "from a judge run in fp16) or drop the row."
                )
            raise ValueError(
                f"{where}: judge_scores[{position}] = {score!r} ({which}) is outside [0, 1]. Judge scores are "
                "probabilities, P(Yes) / (P(Yes) + P(No)); scores on a 0-100 scale must be divided by 100 first, e.g. "
                "dataset.map(lambda row: {'judge_scores': [s / 100 for s in row['judge_scores']]})."
            )
        neg_images = row.get("neg_images")
        if neg_images is None:
            return [None] * negatives
        if len(neg_images) != negatives:
            raise ValueError(
                f"{where}: {negatives} neg_texts but {len(neg_images)} neg_images. Give one neg_images entry per "
                "negative text, in the same order (None for a text-only negative), or leave neg_images out (None) "
                "when no negative has an image."
            )
        return list(neg_images)

    def __call__(self, rows: Sequence[JudgeRow]) -> dict[str, Any]:
        queries, candidates, scores = [], [], []  # (text, image as given, where: for error messages)
        for index, row in enumerate(rows):
            neg_images = self.check_row(row, index)
            chosen = self.choose_negatives(row)
            where = f"query {row['query_text']!r}"
            queries.append((row["query_text"], row["query_image"], where))
            candidates.append((row["pos_text"], row["pos_image"], where + " positive"))
            candidates += [(row["neg_texts"][position], neg_images[position], where + f" negative {position}")
                           for position in chosen]
            scores.append([row["judge_scores"][0], *[row["judge_scores"][1 + position] for position in chosen]])
        inputs = [*queries, *candidates]
        batch = {"num_queries": len(queries), "judge_scores": torch.tensor(scores, dtype=torch.float32)}
        if self.deduplicate:  # before the images are read: a repeated image is read and resized once
            inputs, index = distinct_inputs([self._input_key(text, image) for text, image, _ in inputs], inputs)
            batch["input_index"] = torch.tensor(index, dtype=torch.long)
        items = [(text or None, self._image(image, where)) for text, image, where in inputs]
        return {"chunks": self._process(self._without_orphan_placeholders(items)), **batch}

    def _without_orphan_placeholders(self, items: list[tuple[str | None, Any]]) -> list[tuple[str | None, Any]]:
        """Texts that name an image they do not have lose the placeholder (`drop_orphan_placeholder`); said once."""
        fixed = [(drop_orphan_placeholder(text, image is not None), image) for text, image in items]
        changed = [text for (text, _), (new, _) in zip(items, fixed) if new != text]
        if changed and not self.warned_orphan_placeholders:
            self.warned_orphan_placeholders = True
            warnings.warn(f"{len(changed)} input(s) of a batch have an image placeholder but no image (e.g. "
                          f"{changed[0][:80]!r}; the authors' WebQA queries are such): the placeholder was dropped "
                          "(modeling_unime.processing_unime.drop_orphan_placeholder). Said once per collator.",
                          stacklevel=2)
        return fixed

    def _input_key(self, text: str | None, image: Any) -> str:
        """What makes two inputs of a step the same (the instruction is the collator's, shared by all): the text and
        the image (a path as written, relative to ``image_root``; bytes and pixels by their hash)."""
        return repr((text or "", stable_key(image, self.image_root) if image is not None else None))


__all__ = [
    "NEGATIVE_SELECTIONS", "NegativeSelection", "UniMEV2Collator", "distinct_inputs", "load_training_image",
    "negative_positions",
    "training_image_resize",
]
