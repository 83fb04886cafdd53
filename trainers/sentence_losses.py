"""UniME-V2's soft-label objective as a sentence-transformers loss, for ``SentenceTransformerTrainer`` users.

`CachedSoftLabelAlignmentLoss` is `trainers.losses.SoftLabelAlignmentLoss` (the symmetric KL between the embedder's
and the judge's distributions over each query's 1 + k candidates, paper "MLLM Judgment Based Training Framework", tau
0.02) in sentence-transformers' GradCache form (`sentence_transformers.base.losses.CachedLossMixin`): every column is
embedded in mini-batches of ``mini_batch_size`` rows without activations kept, the loss is back-propagated to the
embeddings, and each mini-batch is embedded again with gradients. Its gradients equal `UniMEV2Trainer`'s on the same
rows (tests/test_sentence_transformers.py).

The dataset has the columns ``query``, ``positive``, ``negative_1`` ... ``negative_k`` (sentence-transformers
inputs: a text, an image, or ``{"image": ..., "text": ...}``) and ``label``: the judge scores of the positive and
the negatives, in that order. `judge_rows_for_sentence_transformers` makes it from a judge dataset
(``modeling_unime.mining`` output, or the authors' file).

Example (a tiny random model on CPU; with a real checkpoint, load it with ``SentenceTransformer(path,
trust_remote_code=True)`` instead):

    >>> import tempfile
    >>> from datasets import Dataset
    >>> from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    >>> from sentence_transformers import SentenceTransformerTrainingArguments
    >>> from modeling_unime.sentence_unime import UniMEV2SentenceEmbedder
    >>> from modeling_unime.tiny import build_tiny_unime, synthetic_judge_dataset
    >>> model, processor = build_tiny_unime("qwen2_vl")
    >>> image_root = tempfile.mkdtemp()
    >>> rows = judge_rows_for_sentence_transformers(synthetic_judge_dataset(8, image_root, num_negatives=3),
    ...                                             num_negatives=3, image_root=image_root)
    >>> rows.column_names
    ['query', 'positive', 'negative_1', 'negative_2', 'negative_3', 'label']
    >>> st_model = SentenceTransformer(modules=[UniMEV2SentenceEmbedder(model, processor)], device="cpu")
    >>> loss = CachedSoftLabelAlignmentLoss(st_model, temperature=0.02, mini_batch_size=4)
    >>> args = SentenceTransformerTrainingArguments(tempfile.mkdtemp(), max_steps=2, per_device_train_batch_size=4,
    ...     report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    >>> trainer = SentenceTransformerTrainer(model=st_model, args=args, train_dataset=rows, loss=loss)
    >>> trainer.train().global_step  # doctest: +ELLIPSIS
    {...}
    2
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .losses import SoftLabelAlignmentLoss

try:
    from sentence_transformers.base.losses.gradcache import CachedLossMixin
except ImportError as error:  # pragma: no cover - the extra is missing
    raise ImportError(
        "trainers.sentence_losses needs sentence-transformers: pip install 'unime-v2[sentence-transformers]'."
    ) from error


class CachedSoftLabelAlignmentLoss(CachedLossMixin, nn.Module):
    r"""Judgment-based distribution alignment for ``SentenceTransformerTrainer``, with GradCache.

    Columns: the query, then 1 + k candidates (the positive first); ``label``: (batch, 1 + k) judge scores in
    [0, 1]. With unit embeddings q and c, s_bc = q_b . c_bc and

    .. math::

        L = \frac{1}{B} \sum_b \tfrac{1}{2}\left(\mathrm{KL}(P_b \| Q_b) + \mathrm{KL}(Q_b \| P_b)\right),
        \quad P = \mathrm{softmax}(s / \tau), \quad Q = \mathrm{softmax}(j / \tau)

    computed by `trainers.losses.SoftLabelAlignmentLoss` (bad judge scores raise ``ValueError`` naming the entry).

    Args:
        model: a ``SentenceTransformer`` whose embeddings are L2-normalised (a UniME-V2 checkpoint is).
        temperature: tau (paper: 0.02).
        mini_batch_size: rows embedded at a time; bounds activation memory, not the result.
        show_progress_bar: a bar over the mini-batches.
    """

    def __init__(
        self, model: Any, temperature: float = 0.02, mini_batch_size: int = 8, show_progress_bar: bool = False
    ) -> None:
        super().__init__()
        if mini_batch_size < 1:
            raise ValueError(f"mini_batch_size must be >= 1, got {mini_batch_size}.")
        self.model = model
        self.mini_batch_size = mini_batch_size
        self.show_progress_bar = show_progress_bar
        self.soft_label_loss = SoftLabelAlignmentLoss(temperature)

    @property
    def temperature(self) -> float:
        return self.soft_label_loss.temperature

    def similarities(self, reps: list[list[Tensor]]) -> Tensor:
        """(batch, 1 + k) dot products of each query with its candidates, from the per-mini-batch embeddings."""
        if len(reps) < 3:
            raise ValueError(
                f"CachedSoftLabelAlignmentLoss needs a query column and at least 2 candidate columns (the positive "
                f"and a negative), got {len(reps)} column(s)."
            )
        queries = torch.cat(reps[0])
        candidates = torch.stack([torch.cat(column) for column in reps[1:]], dim=1)
        return torch.einsum("bd,bkd->bk", queries, candidates)

    def calculate_loss(
        self, reps: list[list[Tensor]], labels: Tensor | None = None, *, with_backward: bool = False
    ) -> Tensor:
        if labels is None:
            raise ValueError("CachedSoftLabelAlignmentLoss needs a 'label' column with the judge scores.")
        similarities = self.similarities(reps)
        if labels.shape != similarities.shape:
            raise ValueError(
                f"label has shape {tuple(labels.shape)} but the batch has {similarities.shape[1]} candidate columns "
                f"per query (shape {tuple(similarities.shape)}): give one judge score per candidate column, the "
                "positive's first."
            )
        loss = self.soft_label_loss(similarities, labels)
        if with_backward:
            loss.backward()
            loss = loss.detach()
        return loss

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        return self.forward_cached(sentence_features, labels)

    def get_config_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "mini_batch_size": self.mini_batch_size}

    @property
    def citation(self) -> str:
        return (
            "@inproceedings{gu2026unimev2,\n  title={UniME-V2: MLLM-as-a-Judge for Universal Multimodal Embedding "
            "Learning},\n  author={Gu, Tiancheng and others},\n  booktitle={AAAI},\n  year={2026},\n"
            "  eprint={2510.13515}\n}"
        )


def _st_input(text: str | None, image: Any, image_root: str | os.PathLike | None) -> Any:
    """A judge-dataset (text, image) pair as one sentence-transformers input, image paths made absolute."""
    if isinstance(image, str) and image and image_root is not None and not os.path.isabs(image):
        image = os.path.join(os.fspath(image_root), image)
    image = image or None
    if image is None:
        return text
    return {"image": image, "text": text or None}


def judge_rows_for_sentence_transformers(
    dataset: Any, num_negatives: int = 8, image_root: str | os.PathLike | None = None
):
    """A judge dataset (``query_text``, ``query_image``, ``pos_text``, ``pos_image``, ``neg_texts``, ``neg_images``,
    ``judge_scores``) as the columns `CachedSoftLabelAlignmentLoss` trains on: the first ``num_negatives``
    negatives of each row (as `trainers.collator.UniMEV2Collator` with ``negative_selection="first"``; a row with
    fewer repeats them in order) and their judge scores in ``label``.

    Image paths are made absolute against ``image_root``. Every row carries an image+text dict or a text in each
    column, so the columns keep one type: a text-only candidate is ``{"image": None, "text": ...}`` when the column
    also holds images.
    """
    from datasets import Dataset

    from .collator import UniMEV2Collator, negative_positions

    if num_negatives < 1:
        raise ValueError(f"num_negatives must be >= 1, got {num_negatives}.")
    columns: dict[str, list[Any]] = {
        "query": [], "positive": [], **{f"negative_{i + 1}": [] for i in range(num_negatives)}
    }
    labels = []
    for index, row in enumerate(dataset):
        neg_images = UniMEV2Collator.check_row(row, index)
        chosen = negative_positions(row, num_negatives)
        columns["query"].append(_st_input(row["query_text"], row["query_image"], image_root))
        columns["positive"].append(_st_input(row["pos_text"], row["pos_image"], image_root))
        for slot, position in enumerate(chosen):
            columns[f"negative_{slot + 1}"].append(
                _st_input(row["neg_texts"][position], neg_images[position], image_root)
            )
        labels.append([float(row["judge_scores"][0]), *(float(row["judge_scores"][1 + p]) for p in chosen)])
    for name, values in columns.items():
        if any(isinstance(value, dict) for value in values):  # one Arrow type per column
            columns[name] = [value if isinstance(value, dict) else {"image": None, "text": value} for value in values]
    return Dataset.from_dict({**columns, "label": labels})


__all__ = ["CachedSoftLabelAlignmentLoss", "judge_rows_for_sentence_transformers"]
