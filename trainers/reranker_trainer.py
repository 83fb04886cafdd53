"""UniMEV2RerankerTrainer: pairwise + listwise training of the UniME-V2 reranker (method.md (f)).

From each row of the judge dataset three examples are built:

- pairwise positive: the judge's prompt with the query and the positive; target ``Yes``;
- pairwise negative: the same with the HARDEST negative (highest judge score); target ``No``;
- listwise: the listwise prompt with the positive at a uniformly random position among the top-``x`` negatives by
  judge score; target ``Ans: (k)`` (1-based).

Loss = ``pairwise_weight`` x L_pair + ``listwise_weight`` x L_list, each the cross-entropy over its answer tokens
only, both logged. Training and inference build prompts with the same code (`PromptBuilder`), so the query and
candidate texts are always in the prompt and the instruction strings cannot drift apart (the authors' code lost the
texts to a key mismatch, biased the position and misspelled the training prompt).

It subclasses `transformers.Trainer` rather than TRL's `SFTTrainer`: each row yields three examples of two kinds whose
losses are computed and logged apart, and the multimodal prompts come from the scorer shared with inference; SFTTrainer
expects one text/conversation example per row and would tokenise it itself.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import Trainer, TrainingArguments

from modeling_unime.scoring_unime import PromptBuilder, listwise_answer

from .collator import load_training_image, training_image_resize
from .common import EpochToCollator, LoggedMetricsMixin


PAIRWISE, LISTWISE = 0, 1


@dataclass
class UniMEV2RerankerTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the reranker objective (paper: lr 2e-5, batch 64, 1 epoch)."""

    pairwise_weight: float = field(default=1.0, metadata={"help": "weight of L_pair"})
    listwise_weight: float = field(default=1.0, metadata={"help": "weight of L_list"})
    listwise_negatives: int = field(default=4, metadata={"help": "top-x negatives by judge score in the list"})
    remove_unused_columns: bool = field(default=False, metadata={"help": "the collator needs every column"})


@dataclass
class RerankerCollator:
    """Rows of the judge dataset -> one batch: 2 pairwise rows per query (positive, hardest negative), then 1
    listwise row per query; ``labels`` on the answer tokens only (-100 elsewhere) and ``example_kind`` per row.

    Example:
        >>> from modeling_unime.testing import build_tiny_processor
        >>> collate = RerankerCollator(build_tiny_processor("qwen2_5_vl"), listwise_negatives=2)
        >>> row = dict(query_text="What colour?", query_image=None, pos_text="red", pos_image=None,
        ...            neg_texts=["blue", "green", "teal"], neg_images=[None] * 3, judge_scores=[0.9, 0.1, 0.7, 0.3])
        >>> collate.hardest_negative(row), collate.listwise_candidates(row)[0]
        (1, [1, 2])
    """

    processor: Any
    listwise_negatives: int = 4
    seed: int = 0
    image_root: str | os.PathLike | None = None
    image_size: int | None = None
    epoch: int = 0
    image_resize: str | None = None

    def __post_init__(self) -> None:
        self.training_image_resize = training_image_resize(self.processor, self.image_resize, self.image_size)
        backbone_processor = getattr(self.processor, "_backbone_processor", self.processor)
        self.prompts = PromptBuilder(backbone_processor)
        self.backbone_processor = backbone_processor

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @staticmethod
    def hardest_negative(row: dict[str, Any]) -> int:
        """Position of the negative with the highest judge score (the first of equals)."""
        scores = row["judge_scores"][1:]
        if not scores:
            raise ValueError(f"Row with query {row['query_text']!r} has no negatives: the reranker needs at least one.")
        return max(range(len(scores)), key=lambda position: (scores[position], -position))

    def _rng(self, row: dict[str, Any]) -> random.Random:
        key = repr((self.seed, self.epoch, row["query_text"], row["query_image"], row["pos_text"], row["pos_image"]))
        return random.Random(hashlib.sha256(key.encode()).digest())

    def listwise_candidates(self, row: dict[str, Any]) -> tuple[list[int], int]:
        """(negative positions of the list, top-x by judge score; the positive's slot, uniform over x + 1)."""
        scores = row["judge_scores"][1:]
        ranked = sorted(range(len(scores)), key=lambda position: (-scores[position], position))
        negatives = ranked[: self.listwise_negatives]
        return negatives, self._rng(row).randrange(len(negatives) + 1)

    def _item(self, text: Any, image: Any, where: str) -> tuple[str | None, Any]:
        return (text or None, load_training_image(image, self.image_root, self.training_image_resize, where))

    def examples(self, row: dict[str, Any]) -> dict[str, Any]:
        """The three training examples of one row, as (prompt, answer, images) triples."""
        where = f"query {row['query_text']!r}"
        query = self._item(row["query_text"], row["query_image"], where)
        neg_images = row.get("neg_images") or [None] * len(row["neg_texts"])
        positive = self._item(row["pos_text"], row["pos_image"], where + " positive")
        hardest = self.hardest_negative(row)
        negative = self._item(row["neg_texts"][hardest], neg_images[hardest], where + f" negative {hardest}")
        negatives, slot = self.listwise_candidates(row)
        listed = [self._item(row["neg_texts"][p], neg_images[p], where + f" negative {p}") for p in negatives]
        listed.insert(slot, positive)

        def images(*items):
            return [image for _, image in items if image is not None]

        return {
            "pairwise": [
                (self.prompts.render(query, positive), "Yes", images(query, positive)),
                (self.prompts.render(query, negative), "No", images(query, negative)),
            ],
            "listwise": [
                (self.prompts.render_listwise(query, listed, answer=""), listwise_answer(slot + 1), images(query, *listed))
            ],
            "listwise_position": slot + 1,
        }

    def batch(self, examples: Sequence[tuple[str, str, list]]) -> dict[str, torch.Tensor]:
        """Left-padded prompt + answer batch; labels are the answer tokens."""
        texts = [prompt + answer for prompt, answer, _ in examples]
        images = [image for _, _, row_images in examples for image in row_images]
        batch = self.backbone_processor(text=texts, images=images or None, padding=True, padding_side="left",
                                        return_tensors="pt")
        labels = torch.full_like(batch["input_ids"], -100)
        for row, (prompt, answer, _) in enumerate(examples):
            answer_ids = self.prompts.tokenizer.encode(answer, add_special_tokens=False)
            if batch["input_ids"][row, -len(answer_ids):].tolist() != answer_ids:
                raise ValueError(f"The answer {answer!r} does not tokenise the same at the end of its prompt.")
            labels[row, -len(answer_ids):] = batch["input_ids"][row, -len(answer_ids):]
        batch["labels"] = labels
        return batch

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        built = [self.examples(row) for row in rows]
        pairwise = [example for item in built for example in item["pairwise"]]
        listwise = [example for item in built for example in item["listwise"]]
        # One batch, so one forward per step: DDP then sees every parameter's gradient exactly once.
        batch = self.batch(pairwise + listwise)
        batch["example_kind"] = torch.tensor([PAIRWISE] * len(pairwise) + [LISTWISE] * len(listwise))
        return batch


def answer_token_losses(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[dict[int, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Cross-entropy over the answer tokens only, per example kind; also the logits that predicted them and the
    kind of each of those logits' rows."""
    inputs = dict(batch)
    labels, kinds = inputs.pop("labels"), inputs.pop("example_kind")
    # The logit at position t predicts token t + 1: keep only the positions that predict an answer token.
    predicting = torch.zeros_like(labels, dtype=torch.bool)
    predicting[:, :-1] = labels[:, 1:] != -100
    logits = model(**inputs, logits_to_keep=predicting).logits.float()
    targets = labels[:, 1:][predicting[:, :-1]]
    logit_kinds = kinds[predicting.nonzero()[:, 0]]
    losses = {
        kind: torch.nn.functional.cross_entropy(logits[logit_kinds == kind], targets[logit_kinds == kind])
        for kind in (PAIRWISE, LISTWISE)
        if bool((logit_kinds == kind).any())
    }
    return losses, logits, logit_kinds


class UniMEV2RerankerTrainer(LoggedMetricsMixin, Trainer):
    """`Trainer` for `UniMEV2Reranker` on the judge dataset (see the module docstring).

    Logged: ``loss_pairwise``, ``loss_listwise`` and ``yes_margin`` (mean P(Yes | positive) - P(Yes | hardest
    negative), Yes against No).
    """

    def __init__(
        self, *args: Any, image_root: Any = None, image_size: int | None = None, image_resize: str | None = None,
        **kwargs: Any,
    ) -> None:
        training_args: UniMEV2RerankerTrainingArguments = kwargs.get("args") or args[1]
        processor = kwargs.get("processing_class")
        if kwargs.get("data_collator") is None and processor is not None:
            kwargs["data_collator"] = RerankerCollator(
                processor, listwise_negatives=training_args.listwise_negatives, seed=training_args.seed,
                image_root=image_root, image_size=image_size, image_resize=image_resize,
            )
        super().__init__(*args, **kwargs)
        if isinstance(self.data_collator, RerankerCollator):
            self.add_callback(EpochToCollator(self.data_collator))
        tokenizer = getattr(processor, "tokenizer", None)
        self.answer_ids = [tokenizer.convert_tokens_to_ids(word) for word in ("Yes", "No")] if tokenizer else None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        losses, logits, kinds = answer_token_losses(model, inputs)
        pairwise_loss, listwise_loss = losses[PAIRWISE], losses[LISTWISE]
        loss = self.args.pairwise_weight * pairwise_loss + self.args.listwise_weight * listwise_loss
        metrics = {"loss_pairwise": pairwise_loss.detach(), "loss_listwise": listwise_loss.detach()}
        if self.answer_ids is not None:
            # Pairwise answers are one token each; their rows alternate positive / hardest negative.
            yes = torch.softmax(logits.detach()[kinds == PAIRWISE][:, self.answer_ids], dim=-1)[:, 0]
            metrics["yes_margin"] = (yes[0::2] - yes[1::2]).mean()
        self._record(metrics)
        return (loss, {}) if return_outputs else loss


__all__ = [
    "UniMEV2RerankerTrainer",
    "UniMEV2RerankerTrainingArguments",
    "RerankerCollator",
    "answer_token_losses",
]
