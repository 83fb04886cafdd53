"""UniMEV2RerankerTrainer: the joint pairwise + listwise training of UniME-V2-Reranker (arXiv 2510.13515,
"UniME-V2-Reranker"; the authors' ``Reranker/`` code).

From each row of the judge dataset up to three examples are built:

- pairwise positive: the judge's prompt with the query and the positive; target ``Yes``;
- pairwise negative: the same with the HARDEST negative (highest judge score, ties broken at random); target ``No``;
- listwise: the listwise prompt with the top-``x`` negatives by judge score (of the positive's kind first: text
  answers for a text positive, images for an image positive; the others fill in when too few) in random order, and
  the positive at a uniformly random slot among them; target ``Ans: (k)`` (1-based), of which only the index tokens
  are labelled (see `listwise_answer_segments`).

Random draws (tie-breaks, the order of the listed negatives, the positive's slot) come from
`trainers.seeding.row_rng` (``seed``, the epoch and the row), so a run is reproducible and each epoch draws
anew. With ``pairwise_weight=0`` (or
``listwise_weight=0``) the examples of that kind are neither built nor forwarded.

Loss = ``pairwise_weight`` x L_pair + ``listwise_weight`` x L_list. L_pair is the cross-entropy of the answer token
(``Yes`` / ``No``) averaged over pairwise examples; L_list is the cross-entropy of the whole index (the sum over its
labelled tokens, -log P(index)) averaged over lists. Under gradient accumulation both averages are taken over the
whole accumulated batch (and over processes), so the loss and its gradients do not depend on how a batch is split
into micro-batches. Logged apart: ``loss_pairwise``, ``loss_listwise``, ``loss_listwise_index`` (the index
cross-entropy restricted to the list's valid indices, as `score_listwise` reads them: ln K is chance for a list of
K) and ``yes_margin``.

Training and inference build prompts with the same code (`PromptBuilder`), so the query and candidate texts are always
in the prompt and the instruction strings cannot drift apart (the authors' code lost the texts to a key mismatch,
biased the position and misspelled the training prompt).

It subclasses `transformers.Trainer` rather than TRL's `SFTTrainer`: each row yields examples of two kinds whose
losses are computed and logged apart, and the multimodal prompts come from the scorer shared with inference;
SFTTrainer expects one text/conversation example per row and would tokenise it itself.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import Trainer, TrainingArguments

from modeling_unime.data import JudgeRow
from modeling_unime.scoring_unime import LISTWISE_ANSWER_PREFIX, PromptBuilder, listwise_answer

from .collator import load_training_image, training_image_resize
from .common import JudgeDatasetMixin, LoggedMetricsMixin
from .seeding import row_rng
from .sharding import ShardingMixin

PAIRWISE, LISTWISE = 0, 1
KIND_NAMES = {PAIRWISE: "pairwise", LISTWISE: "listwise"}


@dataclass
class UniMEV2RerankerTrainingArguments(TrainingArguments):
    r"""`TrainingArguments` plus the reranker objective. The paper trains with lr 2e-5, batch 64, 1 epoch
    (``recipes/configs/reranker-qwen25vl-7b.yaml``).

    Parameters:
        > Objective (L = pairwise_weight x L_pair + listwise_weight x L_list; the paper weighs both 1)

        pairwise_weight (`float`, *optional*, defaults to `1.0`):
            Weight of L_pair, the cross-entropy of ``Yes`` for the positive and ``No`` for the hardest negative.
            0 builds no pairwise examples.
        listwise_weight (`float`, *optional*, defaults to `1.0`):
            Weight of L_list, the cross-entropy of the positive's index in a list. 0 builds no listwise examples.

        > Lists

        listwise_negatives (`int`, *optional*, defaults to `4`):
            The top-x negatives by judge score listed with the positive.

        > Data

        remove_unused_columns (`bool`, *optional*, defaults to `False`):
            The collator reads every column of the judge dataset: keep them.
    """

    pairwise_weight: float = field(default=1.0, metadata={"help": "weight of L_pair (0: no pairwise examples)"})
    listwise_weight: float = field(default=1.0, metadata={"help": "weight of L_list (0: no listwise examples)"})
    listwise_negatives: int = field(default=4, metadata={"help": "top-x negatives by judge score in the list"})
    remove_unused_columns: bool = field(default=False, metadata={"help": "the collator needs every column"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pairwise_weight < 0 or self.listwise_weight < 0:
            raise ValueError(
                f"pairwise_weight={self.pairwise_weight}, listwise_weight={self.listwise_weight}: weights must be >= 0."
            )
        if self.pairwise_weight == 0 and self.listwise_weight == 0:
            raise ValueError("pairwise_weight and listwise_weight are both 0: there is nothing to train.")
        if self.listwise_weight > 0 and self.listwise_negatives < 1:
            raise ValueError(f"listwise_negatives={self.listwise_negatives}: a list needs at least one negative.")


def listwise_answer_segments(position: int, count: int) -> list[tuple[str, bool]]:
    """The listwise target ``Ans: (k)`` as (text, labelled) pieces: only the tokens that choose the index are labelled.

    The digits of ``k`` always are. The closing ``)`` is labelled only where it carries information: after a first
    digit ``d`` that also starts a valid two-digit index (``10 d <= count``), where ``)`` against a second digit
    decides between ``d`` and ``10 d + e``. Everywhere else it is certain and left out, as is ``Ans: (``.

    Example:
        >>> listwise_answer_segments(3, 5)
        [('Ans: (', False), ('3', True), (')', False)]
        >>> listwise_answer_segments(1, 12), listwise_answer_segments(12, 12)
        ([('Ans: (', False), ('1', True), (')', True)], [('Ans: (', False), ('12', True), (')', False)])
    """
    if not 1 <= position <= count:
        raise ValueError(f"Listwise position {position} is outside 1..{count}.")
    informative_close = position < 10 and 10 * position <= count
    segments = [(LISTWISE_ANSWER_PREFIX, False), (str(position), True), (")", informative_close)]
    if "".join(text for text, _ in segments) != listwise_answer(position):
        raise AssertionError("listwise_answer_segments drifted from scoring_unime.listwise_answer")
    return segments


def candidate_kind(text: Any, image: Any) -> str:
    """``"text"``, ``"image"`` or ``"image+text"``: what a candidate is made of (empty text counts as none)."""
    has_text, has_image = bool(text), image is not None
    if has_text and has_image:
        return "image+text"
    return "image" if has_image else "text"


@dataclass
class RerankerCollator:
    """Rows of the judge dataset (`modeling_unime.data.JudgeRow`) -> one batch: 2 pairwise rows per query (positive,
    hardest negative), then 1 listwise row per query; ``labels`` on the answer tokens that carry the decision only (-100
    elsewhere), ``example_kind`` and ``list_length`` (0 for pairwise rows) per row. ``pairwise=False`` /
    ``listwise=False`` leave that kind out entirely.

    Each row is checked first: ``judge_scores`` must hold one finite score in [0, 1] for the positive and for each
    negative of ``neg_texts`` (and ``neg_images``, when given, one entry per negative); a ValueError names the row's
    query otherwise.

    Example:
        >>> from modeling_unime.tiny import build_tiny_processor
        >>> collate = RerankerCollator(build_tiny_processor("qwen2_5_vl"), listwise_negatives=2)
        >>> row = dict(query_text="What colour?", query_image=None, pos_text="red", pos_image=None,
        ...            neg_texts=["blue", "green", "teal"], neg_images=[None] * 3, judge_scores=[0.9, 0.1, 0.7, 0.3])
        >>> collate.hardest_negative(row), sorted(collate.listwise_candidates(row)[0])
        (1, [1, 2])
    """

    processor: Any
    listwise_negatives: int = 4
    seed: int = 0
    image_root: str | os.PathLike | None = None
    image_size: int | None = None
    epoch: int = 0
    image_resize: str | None = None
    pairwise: bool = True
    listwise: bool = True

    def __post_init__(self) -> None:
        if not (self.pairwise or self.listwise):
            raise ValueError("RerankerCollator: pairwise and listwise are both off; there is nothing to build.")
        self.training_image_resize = training_image_resize(self.processor, self.image_resize, self.image_size)
        backbone_processor = getattr(self.processor, "backbone_processor", self.processor)
        self.prompts = PromptBuilder(backbone_processor)
        self.backbone_processor = backbone_processor

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    # ------------------------------------------------------------------------------------------------ checks

    @staticmethod
    def row_name(row: JudgeRow) -> str:
        """How errors name a row: its query text (and its query image when the text is empty)."""
        text = row.get("query_text")
        if text:
            return f"query {text!r}"
        return f"query image {row.get('query_image')!r}" if row.get("query_image") is not None else "query ''"

    @classmethod
    def negative_scores(cls, row: JudgeRow) -> list[float]:
        """The negatives' judge scores (``judge_scores[1:]``) after checking the row: a ValueError names the row and
        says what is wrong (a count that does not match ``neg_texts``, a missing / NaN / infinite score, a score
        outside [0, 1], no negatives)."""
        name = cls.row_name(row)
        negatives = list(row.get("neg_texts") or [])
        scores = row.get("judge_scores")
        if scores is None:
            raise ValueError(f"Row with {name}: no judge_scores; the reranker needs the judge's scores.")
        scores = list(scores)
        if len(scores) != 1 + len(negatives):
            raise ValueError(
                f"Row with {name}: judge_scores has {len(scores)} values for 1 positive + {len(negatives)} negatives "
                f"(neg_texts); it needs {1 + len(negatives)}: the positive's score first, then one per negative in "
                "order."
            )
        neg_images = row.get("neg_images")
        if neg_images is not None and len(neg_images) != len(negatives):
            raise ValueError(
                f"Row with {name}: neg_images has {len(neg_images)} entries for {len(negatives)} neg_texts; give one "
                "per negative (None where a negative has no image)."
            )
        if not negatives:
            raise ValueError(f"Row with {name} has no negatives: the reranker needs at least one.")
        for index, score in enumerate(scores):
            which = "the positive" if index == 0 else f"negative {index - 1} ({negatives[index - 1]!r})"
            try:
                value = float(score)
            except (TypeError, ValueError):
                raise ValueError(
                    f"Row with {name}: judge_scores[{index}] ({which}) is {score!r}, not a number."
                ) from None
            if not math.isfinite(value):
                raise ValueError(
                    f"Row with {name}: judge_scores[{index}] ({which}) is {value}; every candidate needs a finite "
                    "judge score in [0, 1] (re-score the row or drop it)."
                )
            if not 0.0 <= value <= 1.0:
                raise ValueError(
                    f"Row with {name}: judge_scores[{index}] ({which}) = {value} is outside [0, 1]; judge scores are "
                    "P(Yes) / (P(Yes) + P(No))."
                )
        return [float(score) for score in scores[1:]]

    # ------------------------------------------------------------------------------------------------ draws

    @staticmethod
    def _ranked(scores: Sequence[float], positions: Sequence[int], rng: random.Random) -> list[int]:
        """``positions`` by judge score, highest first; equal scores in random order."""
        tie_breaks = {position: rng.random() for position in positions}
        return sorted(positions, key=lambda position: (-scores[position], tie_breaks[position]))

    def hardest_negative(self, row: JudgeRow) -> int:
        """Position (in ``neg_texts``) of the negative with the highest judge score; among equals, one at random
        (seeded per row and epoch)."""
        scores = self.negative_scores(row)
        return self._ranked(scores, range(len(scores)), row_rng(self.seed, self.epoch, row, "pairwise",
                                                                             self.image_root))[0]

    def listwise_candidates(self, row: JudgeRow) -> tuple[list[int], int]:
        """(the listed negatives' positions in ``neg_texts``, in the order listed; the positive's 0-based slot).

        The negatives are the top ``listwise_negatives`` by judge score (ties broken at random), taken first among
        those of the positive's kind (`candidate_kind`) and then, when those are too few, among the others; they are
        listed in random order. The positive's slot is uniform over the list's ``len(negatives) + 1`` slots.
        """
        scores = self.negative_scores(row)
        rng = row_rng(self.seed, self.epoch, row, "listwise", self.image_root)
        ranked = self._ranked(scores, range(len(scores)), rng)
        neg_images = row.get("neg_images") or [None] * len(scores)
        kind = candidate_kind(row.get("pos_text"), row.get("pos_image"))
        same = [
            position for position in ranked if candidate_kind(row["neg_texts"][position], neg_images[position]) == kind
        ]
        chosen = set(same)
        others = [position for position in ranked if position not in chosen]
        negatives = (same + others)[: self.listwise_negatives]
        rng.shuffle(negatives)
        return negatives, rng.randrange(len(negatives) + 1)

    # ------------------------------------------------------------------------------------------------ examples

    def _item(self, text: Any, image: Any, where: str) -> tuple[str | None, Any]:
        return (text or None, load_training_image(image, self.image_root, self.training_image_resize, where))

    def examples(self, row: JudgeRow) -> dict[str, Any]:
        """The training examples of one row: ``pairwise`` and ``listwise`` lists of (prompt, answer segments,
        images), where the answer segments are (text, labelled) pieces; and the listwise ``listwise_position``
        (1-based) and ``list_length`` (None when listwise is off)."""
        self.negative_scores(row)  # check the row before anything is loaded
        where = self.row_name(row)
        query = self._item(row["query_text"], row["query_image"], where)
        neg_images = row.get("neg_images") or [None] * len(row["neg_texts"])
        positive = self._item(row["pos_text"], row["pos_image"], where + " positive")

        def images(*items):
            return [image for _, image in items if image is not None]

        built: dict[str, Any] = {"pairwise": [], "listwise": [], "listwise_position": None, "list_length": None}
        if self.pairwise:
            hardest = self.hardest_negative(row)
            negative = self._item(row["neg_texts"][hardest], neg_images[hardest], where + f" negative {hardest}")
            built["pairwise"] = [
                (self.prompts.render(query, positive), [("Yes", True)], images(query, positive)),
                (self.prompts.render(query, negative), [("No", True)], images(query, negative)),
            ]
        if self.listwise:
            negatives, slot = self.listwise_candidates(row)
            listed = [self._item(row["neg_texts"][p], neg_images[p], where + f" negative {p}") for p in negatives]
            listed.insert(slot, positive)
            built["listwise"] = [(
                self.prompts.render_listwise(query, listed, answer=""),
                listwise_answer_segments(slot + 1, len(listed)),
                images(query, *listed),
            )]
            built["listwise_position"], built["list_length"] = slot + 1, len(listed)
        return built

    def batch(self, examples: Sequence[tuple[str, Sequence[tuple[str, bool]], list]]) -> dict[str, torch.Tensor]:
        """Left-padded prompt + answer batch; ``labels`` are the answer tokens of the labelled segments."""
        texts = [prompt + "".join(text for text, _ in segments) for prompt, segments, _ in examples]
        images = [image for _, _, row_images in examples for image in row_images]
        batch = self.backbone_processor(text=texts, images=images or None, padding=True, padding_side="left",
                                        return_tensors="pt")
        labels = torch.full_like(batch["input_ids"], -100)
        for row, (_, segments, _) in enumerate(examples):
            pieces = [self.prompts.tokenizer.encode(text, add_special_tokens=False) for text, _ in segments]
            answer_ids = [token for piece in pieces for token in piece]
            tail = batch["input_ids"][row, -len(answer_ids):]
            if tail.tolist() != answer_ids:
                answer = "".join(text for text, _ in segments)
                raise ValueError(
                    f"The answer {answer!r} does not tokenise the same at the end of its prompt as piece by piece "
                    f"({[text for text, _ in segments]}): the labels would not cover the right tokens."
                )
            start = batch["input_ids"].shape[1] - len(answer_ids)
            for piece, (_, labelled) in zip(pieces, segments):
                if labelled:
                    labels[row, start : start + len(piece)] = batch["input_ids"][row, start : start + len(piece)]
                start += len(piece)
        batch["labels"] = labels
        return batch

    def __call__(self, rows: Sequence[JudgeRow]) -> dict[str, Any]:
        built = [self.examples(row) for row in rows]
        pairwise = [example for item in built for example in item["pairwise"]]
        listwise = [example for item in built for example in item["listwise"]]
        # One batch, so one forward per step: DDP then sees every parameter's gradient exactly once.
        batch = self.batch(pairwise + listwise)
        batch["example_kind"] = torch.tensor([PAIRWISE] * len(pairwise) + [LISTWISE] * len(listwise))
        batch["list_length"] = torch.tensor([0] * len(pairwise) + [item["list_length"] for item in built
                                                                    if item["listwise"]], dtype=torch.long)
        return batch


@dataclass
class AnswerTokenLosses:
    """What one forward gives the loss: per example kind, the summed cross-entropy of its examples (each example's
    labelled tokens summed) and the number of examples; the logits that predicted the labelled tokens, their targets,
    and for each of them its batch row."""

    sums: dict[int, torch.Tensor]
    counts: dict[int, int]
    logits: torch.Tensor
    targets: torch.Tensor
    rows: torch.Tensor

    def mean(self, kind: int) -> torch.Tensor:
        """Per-example mean cross-entropy of one kind in this batch."""
        return self.sums[kind] / self.counts[kind]


def answer_token_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> AnswerTokenLosses:
    """Cross-entropy over the labelled answer tokens only (logits computed at those positions alone), summed per
    example and then per example kind."""
    inputs = dict(batch)
    labels, kinds = inputs.pop("labels"), inputs.pop("example_kind")
    inputs.pop("list_length", None)
    # The logit at position t predicts token t + 1: keep only the positions that predict a labelled token.
    predicting = torch.zeros_like(labels, dtype=torch.bool)
    predicting[:, :-1] = labels[:, 1:] != -100
    logits = model(**inputs, logits_to_keep=predicting).logits.float()
    targets = labels[:, 1:][predicting[:, :-1]]
    rows = predicting.nonzero()[:, 0]
    token_losses = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    sums, counts = {}, {}
    for kind in (PAIRWISE, LISTWISE):
        count = int((kinds == kind).sum())
        if count:
            sums[kind] = token_losses[kinds[rows] == kind].sum()
            counts[kind] = count
    return AnswerTokenLosses(sums, counts, logits, targets, rows)


def listwise_index_cross_entropy(
    losses: AnswerTokenLosses, list_length: torch.Tensor, digit_ids: Sequence[int], close_id: int
) -> torch.Tensor | None:
    """Mean over lists of -log P(right index), the index distribution restricted to the list's valid indices as
    `MultimodalScorer.score_listwise` reads it (first digit among 1..min(K, 9); after a first digit d with
    10 d <= K, ")" or a second digit e with 10 d + e <= K). ln K is chance for a list of K. None without lists."""
    total, lists = 0.0, 0
    list_rows = [int(row) for row in torch.unique(losses.rows) if int(list_length[row]) > 0]
    for row in list_rows:
        count = int(list_length[row])
        picked = (losses.rows == row).nonzero().flatten()
        logits, targets = losses.logits[picked].detach(), losses.targets[picked].tolist()
        first = targets[0]
        valid = [digit_ids[d] for d in range(1, min(count, 9) + 1)]
        if first not in valid:
            return None  # not a digit-index row (a tokenizer that merges digits): no restricted reading
        nll = -torch.log_softmax(logits[0, valid], dim=-1)[valid.index(first)]
        if len(targets) > 1:
            lead = digit_ids.index(first)
            following = [close_id] + [digit_ids[e] for e in range(10) if 10 * lead + e <= count]
            nll = nll - torch.log_softmax(logits[1, following], dim=-1)[following.index(targets[1])]
        total, lists = total + nll, lists + 1
    return total / lists if lists else None


class UniMEV2RerankerTrainer(ShardingMixin, JudgeDatasetMixin, LoggedMetricsMixin, Trainer):
    """`Trainer` for `UniMEV2Reranker` on the judge dataset (see the module docstring).

    Logged: ``loss_pairwise``, ``loss_listwise`` (per list, -log P(index) over the vocabulary: what is trained),
    ``loss_listwise_index`` (the same restricted to the list's valid indices; chance ln K) and ``yes_margin`` (mean
    P(Yes | positive) - P(Yes | hardest negative), Yes against No). Values are means over the micro-batches since
    the last log.

    Gradient accumulation: `get_batch_samples` (which `Trainer` calls once per optimizer step) counts the examples
    of each kind over all micro-batches of the step (and over processes), and `compute_loss` divides each kind's
    summed loss by that count, so the loss is already scaled for accumulation (``loss_is_scaled_for_ga``): batch
    4 x 1 step and batch 2 x 2 steps give the same loss and gradients, also when the micro-batches differ in size;
    under DDP the loss is multiplied by the process count, as `Trainer` does, since DDP averages gradients.
    """

    # compute_loss normalises by the whole accumulated batch (counts from `get_batch_samples`): Trainer must
    # not divide by the accumulation steps again (nor rely on model_accepts_loss_kwargs, which the labels trigger).
    loss_is_scaled_for_ga = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.check_deepspeed(coalesced=False)  # one reduction per backward, in hook order: no trained vision tower
        processor = kwargs.get("processing_class")
        tokenizer = getattr(processor, "tokenizer", None)
        self.answer_ids = [tokenizer.convert_tokens_to_ids(word) for word in ("Yes", "No")] if tokenizer else None
        self.digit_ids = [tokenizer.convert_tokens_to_ids(str(digit)) for digit in range(10)] if tokenizer else None
        self.close_id = tokenizer.convert_tokens_to_ids(")") if tokenizer else None

    def make_collator(self, args: UniMEV2RerankerTrainingArguments, processor: Any, **images: Any) -> RerankerCollator:
        return RerankerCollator(
            processor, listwise_negatives=args.listwise_negatives, seed=args.seed,
            pairwise=args.pairwise_weight > 0, listwise=args.listwise_weight > 0, **images,
        )

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device) -> tuple[list, Any]:
        """The micro-batches of one optimizer step and, for reranker batches, the examples per kind
        ([pairwise, listwise]) over all of them, summed over processes when ``average_tokens_across_devices`` (the
        default): `compute_loss` divides each kind's summed loss by its count, so the micro-batch losses add up to
        the whole accumulated batch's loss."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if batch_samples and "example_kind" in batch_samples[0]:
            num_items_in_batch = self.examples_per_kind(batch_samples, device)
        return batch_samples, num_items_in_batch

    def examples_per_kind(self, batch_samples: list, device: torch.device) -> torch.Tensor:
        """[pairwise, listwise] example counts of these micro-batches (over every process when the Trainer averages
        across devices)."""
        counts = sum(torch.bincount(batch["example_kind"].flatten(), minlength=2)[:2] for batch in batch_samples)
        counts = counts.to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            counts = self.accelerator.gather(counts).reshape(-1, 2).sum(dim=0)
        return counts

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        losses = answer_token_losses(model, inputs)
        weights = {PAIRWISE: self.args.pairwise_weight, LISTWISE: self.args.listwise_weight}
        for kind, weight in weights.items():
            if weight > 0 and kind not in losses.sums and losses.sums:
                raise ValueError(
                    f"{KIND_NAMES[kind]}_weight is {weight} but the batch holds no {KIND_NAMES[kind]} examples "
                    "(was the collator built with that kind switched off?)."
                )
        if num_items_in_batch is not None and torch.is_tensor(num_items_in_batch) and num_items_in_batch.numel() == 2:
            # Sums over this micro-batch / counts over the whole accumulated batch (and processes): the micro-batch
            # losses add up to the full batch's loss.
            loss = sum(weights[kind] * losses.sums[kind] / num_items_in_batch[kind].clamp(min=1)
                       for kind in losses.sums)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                loss = loss * self.accelerator.num_processes  # DDP averages the gradients over processes
        else:
            loss = sum(weights[kind] * losses.mean(kind) for kind in losses.sums)
            if model.training:  # no counts (a call outside the training loop): a per-micro-batch mean
                loss = loss / getattr(self, "current_gradient_accumulation_steps", 1)
        metrics = {f"loss_{KIND_NAMES[kind]}": losses.mean(kind).detach() for kind in losses.sums}
        if LISTWISE in losses.sums and self.digit_ids is not None:
            index = listwise_index_cross_entropy(losses, inputs["list_length"], self.digit_ids, self.close_id)
            if index is not None:
                metrics["loss_listwise_index"] = index.detach()
        if self.answer_ids is not None and PAIRWISE in losses.sums:
            # Pairwise answers are one token each; their rows alternate positive / hardest negative.
            pairwise_rows = inputs["example_kind"][losses.rows] == PAIRWISE
            yes = torch.softmax(losses.logits.detach()[pairwise_rows][:, self.answer_ids], dim=-1)[:, 0]
            metrics["yes_margin"] = (yes[0::2] - yes[1::2]).mean()
        self._record(metrics)
        return (loss, {}) if return_outputs else loss


__all__ = [
    "UniMEV2RerankerTrainer",
    "UniMEV2RerankerTrainingArguments",
    "RerankerCollator",
    "AnswerTokenLosses",
    "answer_token_losses",
    "candidate_kind",
    "listwise_answer_segments",
    "listwise_index_cross_entropy",
]
