"""Several judges as one: their (weighted) mean score, each pair's disagreement, and how far they agree.

A single judge's mistakes and biases flow straight into the labels; a panel of judges from different families is a
known remedy (their failures are less correlated, though not independent). `EnsembleJudge` averages its members'
scores; `score_with_details` also returns each pair's member scores, which mining keeps in the judged-pairs side
table (``member_scores`` and ``disagreement``: their standard deviation) and summarises with `judge_agreement`
(Spearman's rank correlation and Cohen's kappa at 0.5 for every two members).

Example:
    >>> import torch
    >>> class Fixed:
    ...     def __init__(self, *values): self.values = values
    ...     def score(self, query_text, query_image, candidates): return torch.tensor(self.values[:len(candidates)])
    >>> panel = EnsembleJudge([Fixed(0.9, 0.2), Fixed(0.7, 0.4)], names=["a", "b"])
    >>> [round(value, 3) for value in panel.score("q", None, ["x", "y"]).tolist()]
    [0.8, 0.3]
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

__all__ = ["EnsembleJudge", "cohen_kappa", "judge_agreement", "spearman"]


class EnsembleJudge:
    """The weighted mean of several judges' scores (see the module docstring).

    Args:
        judges: two or more `Judge` objects.
        weights: one per judge (default equal); they are normalised to sum to 1.
        names: one per judge, for the agreement report (default ``judge_0``, ``judge_1``...).
    """

    def __init__(self, judges: Sequence[Judge], weights: Sequence[float] | None = None,
                 names: Sequence[str] | None = None) -> None:
        if len(judges) < 2:
            raise ValueError(f"an ensemble needs at least two judges, got {len(judges)}.")
        weights = [1.0] * len(judges) if weights is None else [float(weight) for weight in weights]
        if len(weights) != len(judges) or any(weight < 0 for weight in weights) or not sum(weights) > 0:
            raise ValueError(f"weights must be one non-negative number per judge, not all 0: got {weights}.")
        self.judges = list(judges)
        self.weights = [weight / sum(weights) for weight in weights]
        self.names = list(names) if names is not None else [f"judge_{index}" for index in range(len(judges))]
        if len(self.names) != len(self.judges) or len(set(self.names)) != len(self.names):
            raise ValueError(f"names must be one distinct name per judge, got {self.names}.")

    def score_with_details(self, query_text: str | None, query_image: Any, candidates: Sequence[Any]
                           ) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        """The mean score of each candidate, and per candidate ``{"members": [each judge's score]}``."""
        members = torch.stack([torch.as_tensor(judge.score(query_text, query_image, list(candidates)),
                                               dtype=torch.float64).reshape(-1) for judge in self.judges])
        if members.shape[1] != len(candidates):
            raise ValueError(f"a member judge answered {members.shape[1]} scores for {len(candidates)} candidates.")
        mean = torch.tensor(self.weights, dtype=torch.float64) @ members
        return mean, [{"members": members[:, index].tolist()} for index in range(len(candidates))]

    def score(self, query_text: str | None, query_image: Any, candidates: Sequence[Any]) -> torch.Tensor:
        return self.score_with_details(query_text, query_image, candidates)[0]

    def fingerprint(self) -> str:
        """The members' cache keys, names and weights."""
        identity = {"ensemble": [judge_fingerprint(judge) for judge in self.judges], "weights": self.weights,
                    "names": self.names}
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def spearman(first: Sequence[float], second: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson's of the ranks, ties averaged); NaN when either side is constant.

    >>> spearman([0.1, 0.4, 0.3], [1, 3, 2]), spearman([1, 2, 3], [3, 2, 1])
    (1.0, -1.0)
    """
    ranks_a, ranks_b = tied_ranks(first), tied_ranks(second)
    mean_a, mean_b = sum(ranks_a) / len(ranks_a), sum(ranks_b) / len(ranks_b)
    covariance = sum((a - mean_a) * (b - mean_b) for a, b in zip(ranks_a, ranks_b))
    spread = math.sqrt(sum((a - mean_a) ** 2 for a in ranks_a) * sum((b - mean_b) ** 2 for b in ranks_b))
    return covariance / spread if spread else float("nan")


def cohen_kappa(first: Sequence[float], second: Sequence[float], threshold: float = 0.5) -> float:
    """Cohen's kappa of the two judges' Yes / No verdicts (score >= ``threshold``); NaN when chance agreement is 1.

    >>> cohen_kappa([0.9, 0.8, 0.1, 0.2], [0.7, 0.6, 0.3, 0.9])
    0.5
    """
    yes_a = [value >= threshold for value in first]
    yes_b = [value >= threshold for value in second]
    count = len(yes_a)
    observed = sum(a == b for a, b in zip(yes_a, yes_b)) / count
    p_a, p_b = sum(yes_a) / count, sum(yes_b) / count
    expected = p_a * p_b + (1 - p_a) * (1 - p_b)
    return (observed - expected) / (1 - expected) if expected < 1 else float("nan")


def judge_agreement(member_scores: Sequence[Sequence[float]], names: Sequence[str]) -> dict[str, Any]:
    """For every two judges, over the same pairs (``member_scores[pair][judge]``): Spearman's rank correlation and
    Cohen's kappa at 0.5; and the mean disagreement (standard deviation of a pair's member scores)."""
    columns = list(zip(*member_scores))
    pairs = {}
    for first in range(len(names)):
        for second in range(first + 1, len(names)):
            pairs[f"{names[first]} / {names[second]}"] = {
                "spearman": spearman(columns[first], columns[second]),
                "kappa_at_0.5": cohen_kappa(columns[first], columns[second]),
            }
    disagreements = [_std(scores) for scores in member_scores]
    return {"pairs": len(member_scores), "judges": list(names), "agreement": pairs,
            "mean_disagreement": sum(disagreements) / len(disagreements) if disagreements else float("nan")}


def _std(values: Sequence[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((value - mean) ** 2 for value in values) / len(values))
