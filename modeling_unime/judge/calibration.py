"""The judge's biases, measured and corrected: contextual calibration of its Yes prior, and the audit of its scores.

**Contextual calibration** (Zhao et al. 2021, "Calibrate Before Use"): a Yes/No judge answers "Yes" to some queries
more readily than to others, whatever the candidate. `ContextualCalibration` measures that prior for each query as
P(Yes) on a content-free candidate of each candidate kind (the text ``"N/A"``, a blank image, or both), and divides it
out: ``logit(s') = logit(s) - logit(prior)``. A candidate the judge scores exactly at its prior gets 0.5. It costs
one extra pair per query and candidate kind (a query's 50 candidates are usually of one kind).

**The audit** (`judge_audit`): on pairs with known labels (positives 1, negatives 0), how well the scores separate
them (ROC AUC, the positive's win rate against its query's negatives), whether they mean what they say (expected
calibration error over 10 bins, Brier score), the score histogram and, for a calibrated judge, its mean prior.

Example:
    >>> import torch
    >>> class Eager:  # says Yes to everything, a little more to red
    ...     def score(self, query_text, query_image, candidates):
    ...         return torch.tensor([0.9 if text == "red" else 0.8 for text, _ in candidates])
    >>> calibrated = ContextualCalibration(Eager())
    >>> [round(value, 3) for value in calibrated.score("what colour?", None, [("red", None), ("blue", None)]).tolist()]
    [0.692, 0.5]
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from typing import Any

import torch

from ..util.statistics import tied_ranks
from . import Judge, judge_fingerprint

CONTENT_FREE_TEXT = "N/A"

__all__ = ["CONTENT_FREE_TEXT", "ContextualCalibration", "blank_image", "judge_audit", "logit"]


def logit(probability: float) -> float:
    probability = min(max(probability, 1e-12), 1 - 1e-12)
    return math.log(probability / (1 - probability))


def blank_image(size: int = 64):
    """A white image: the content-free image candidate."""
    from PIL import Image

    return Image.new("RGB", (size, size), "white")


def _kind(candidate: Sequence[Any]) -> str:
    text, image = candidate
    return "image+text" if image is not None and text else "image" if image is not None else "text"


class ContextualCalibration:
    """A `Judge` whose scores have the wrapped judge's per-query Yes prior divided out (see the module docstring).

    Args:
        judge: any `Judge`; wrapping a `ContextualCalibration` again is refused (the prior would be divided out
            twice).
        content_free_text: the text of the content-free candidate.
        content_free_image: the image of the content-free candidate (default: a blank 64x64 image).

    ``priors`` records, per candidate kind, every prior measured (for the audit).
    """

    def __init__(
        self, judge: Judge, content_free_text: str = CONTENT_FREE_TEXT, content_free_image: Any = None
    ) -> None:
        if isinstance(judge, ContextualCalibration):
            raise ValueError("this judge is calibrated already: contextual calibration applied twice would divide its "
                             "prior out twice.")
        self.judge = judge
        self.content_free_text = content_free_text
        self.content_free_image = content_free_image if content_free_image is not None else blank_image()
        self.priors: dict[str, list[float]] = {}

    def __getattr__(self, name: str) -> Any:
        # The wrapped judge's settings (instruction, official_compat, model...) read through; the cache key is this
        # wrapper's own (`fingerprint`).
        if name.startswith("_") or name == "judge":
            raise AttributeError(name)
        return getattr(self.judge, name)

    def content_free(self, kind: str) -> tuple[str | None, Any]:
        """The content-free candidate of a candidate kind."""
        return {"text": (self.content_free_text, None), "image": (None, self.content_free_image),
                "image+text": (self.content_free_text, self.content_free_image)}[kind]

    def score(self, query_text: str | None, query_image: Any, candidates: Sequence[Any]) -> torch.Tensor:
        candidates = [tuple(candidate) if not isinstance(candidate, str) else (candidate, None)
                      for candidate in candidates]
        kinds = [_kind(candidate) for candidate in candidates]
        needed = list(dict.fromkeys(kinds))
        scores = self.judge.score(query_text, query_image,
                                  [*candidates, *(self.content_free(kind) for kind in needed)])
        scores = torch.as_tensor(scores, dtype=torch.float64).reshape(-1)
        priors = dict(zip(needed, scores[len(candidates):].tolist()))
        for kind, prior in priors.items():
            self.priors.setdefault(kind, []).append(prior)
        corrected = [1 / (1 + math.exp(-(logit(score) - logit(priors[kind]))))
                     for score, kind in zip(scores[:len(candidates)].tolist(), kinds)]
        return torch.tensor(corrected, dtype=torch.float64)

    def mean_priors(self) -> dict[str, float]:
        """The mean prior measured per candidate kind."""
        return {kind: sum(values) / len(values) for kind, values in self.priors.items() if values}

    def fingerprint(self) -> str:
        """The wrapped judge's cache key and the content-free candidates: a calibrated score is never served from
        the uncalibrated judge's cache."""
        image = self.content_free_image
        identity = {"calibration": "contextual", "judge": judge_fingerprint(self.judge), "text": self.content_free_text,
                    "image": hashlib.sha256(image.tobytes()).hexdigest() + f"{image.size}{image.mode}"}
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _rank_auc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """ROC AUC by ranks (Mann-Whitney U, tied scores share their mean rank): O(n log n), for millions of pairs."""
    ranks = tied_ranks(scores)
    positives = sum(1 for label in labels if label)
    negatives = len(labels) - positives
    rank_sum = sum(rank for rank, label in zip(ranks, labels) if label)
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def judge_audit(
    scores: Sequence[float],
    labels: Sequence[int],
    groups: Sequence[Any] | None = None,
    bins: int = 10,
    prior: dict[str, float] | None = None,
) -> dict[str, Any]:
    """How good a judge's scores are on pairs with known labels (1 positive, 0 negative).

    Args:
        scores: one score in [0, 1] per pair.
        labels: 1 for a positive pair, 0 for a negative.
        groups: the query of each pair: ``pairwise_accuracy`` compares each positive with its own query's negatives
            (ties count half); without groups, with every negative.
        bins: of the histogram and of the expected calibration error.
        prior: the judge's mean Yes prior per candidate kind (`ContextualCalibration.mean_priors`), reported as is.

    Returns ``auc`` (ROC, ties half), ``pairwise_accuracy``, ``ece`` (sum over equal-width bins of the bin's share
    times |mean score - share of positives|), ``brier`` (mean squared error), ``histogram`` (counts over
    [0, 1]), ``positives``, ``negatives``, ``mean_positive_score``, ``mean_negative_score`` and ``prior``.

    >>> audit = judge_audit([0.9, 0.2, 0.6, 0.4], [1, 0, 1, 0])
    >>> audit["auc"], audit["brier"]
    (1.0, 0.0925)
    """
    if len(scores) != len(labels) or not scores:
        raise ValueError(f"judge_audit needs one label per score, got {len(scores)} scores and {len(labels)} labels.")
    positives = [score for score, label in zip(scores, labels) if label]
    negatives = [score for score, label in zip(scores, labels) if not label]
    auc = _rank_auc(scores, labels) if positives and negatives else float("nan")
    if groups is None:
        pairwise = auc
    else:
        compared = won = 0.0
        by_group: dict[Any, tuple[list[float], list[float]]] = {}
        for score, label, group in zip(scores, labels, groups):
            by_group.setdefault(group, ([], []))[0 if label else 1].append(score)
        for group_positives, group_negatives in by_group.values():
            for p in group_positives:
                for n in group_negatives:
                    compared += 1
                    won += (p > n) + 0.5 * (p == n)
        pairwise = won / compared if compared else float("nan")
    histogram = [0] * bins
    bin_scores: list[list[tuple[float, int]]] = [[] for _ in range(bins)]
    for score, label in zip(scores, labels):
        index = min(bins - 1, int(score * bins))
        histogram[index] += 1
        bin_scores[index].append((score, label))
    ece = sum(len(members) / len(scores) * abs(sum(s for s, _ in members) / len(members)
                                               - sum(label for _, label in members) / len(members))
              for members in bin_scores if members)
    brier = sum((score - label) ** 2 for score, label in zip(scores, labels)) / len(scores)
    return {
        "auc": round(auc, 6), "pairwise_accuracy": round(pairwise, 6), "ece": round(ece, 6), "brier": round(brier, 6),
        "histogram": histogram, "positives": len(positives), "negatives": len(negatives),
        "mean_positive_score": sum(positives) / len(positives) if positives else float("nan"),
        "mean_negative_score": sum(negatives) / len(negatives) if negatives else float("nan"),
        "prior": prior,
    }
