"""Listwise position bias, measured fairly: does a listwise reranker (or judge) read the candidates, or prefer a slot?

A listwise model sees K candidates and names the best. Two measurements separate content from position:

- **content-free lists**: K copies of a candidate that says nothing (``"N/A"``, a blank image). Every slot is equally
  right, so a model without position bias spreads its choices; the histogram of the chosen slot shows the slot it
  prefers (``preferred_slot``, and how often: ``preferred_share``). Equal highest probabilities share the choice
  (here and below): a model that scores every slot alike chooses none of them.
- **the positive forced to every slot**: each row's list (the positive and K - 1 negatives) in all K cyclic rotations,
  so the positive visits every slot once. Accuracy per slot shows where the model finds the positive; their mean is
  the accuracy with position averaged out. A content-blind model that always picks slot p is right exactly once per
  row: its mean is exactly 100 / K, whatever p, with p named by the histogram.

The same rotations give **rotation-averaged** listwise scores: each candidate's probability averaged over the K slots
it visited (the order a model would give if position did not count), and their accuracy beside the plain one (the
list as given, positive at slot 0).

Example (a model that always picks the last slot):
    >>> class LastSlot:
    ...     def rerank(self, query, candidates, mode="listwise"):
    ...         k = len(candidates)
    ...         return list(range(k))[::-1], torch.tensor([0.0] * (k - 1) + [1.0])
    >>> report = slot_bias(LastSlot(), [("q", ["pos", "a", "b", "c"])] * 3, content_free="N/A")
    >>> report["content_free_histogram"], report["preferred_slot"], report["accuracy_by_slot"]
    ([0, 0, 0, 3], 3, [0.0, 0.0, 0.0, 100.0])
    >>> report["rotation_mean_accuracy"], report["chance"]
    (25.0, 25.0)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["rotations", "slot_bias"]


def rotations(candidates: Sequence[Any]) -> list[list[Any]]:
    """The K cyclic rotations of a list: rotation r puts the first item at slot r, the others follow in order.

    >>> rotations(["p", "a", "b"])
    [['p', 'a', 'b'], ['b', 'p', 'a'], ['a', 'b', 'p']]
    """
    count = len(candidates)
    return [[candidates[(slot - shift) % count] for slot in range(count)] for shift in range(count)]


def _probabilities(reranker: Any, query: Any, candidates: Sequence[Any]) -> torch.Tensor:
    _, probabilities = reranker.rerank(query, list(candidates), mode="listwise")
    probabilities = torch.as_tensor(probabilities, dtype=torch.float64).reshape(-1)
    if probabilities.numel() != len(candidates):
        raise ValueError(f"the reranker returned {probabilities.numel()} listwise scores for {len(candidates)} "
                         "candidates.")
    return probabilities


def _choice(probabilities: torch.Tensor) -> torch.Tensor:
    """How much each slot is chosen: 1 for the highest probability; equal highest ones share it (a model that
    gives every slot the same probability chooses none of them, not the first)."""
    best = probabilities == probabilities.max()
    return best.double() / best.sum()


def slot_bias(
    reranker: Any,
    rows: Sequence[tuple[Any, Sequence[Any]]],
    content_free: Any | None = None,
    content_free_lists: int | None = None,
) -> dict[str, Any]:
    """The slot-bias report of a listwise model on ``rows`` of ``(query, [positive, negative_1, ...])`` (one list
    length K for all rows).

    Args:
        reranker: has ``rerank(query, candidates, mode="listwise") -> (order, probabilities)``.
        content_free: the candidate that says nothing (default ``"N/A"``); a list of K copies is ranked for the
            queries of the first ``content_free_lists`` rows (default: all).

    Returns (percentages): ``content_free_histogram`` (chosen slot counts, fractional where slots tie),
    ``preferred_slot``, ``preferred_share``,
    ``accuracy_by_slot`` (the positive forced to each slot), ``rotation_mean_accuracy`` (their mean), ``chance``
    (100 / K), ``plain_accuracy`` (positive at slot 0), ``rotation_averaged_accuracy`` (argmax of the probabilities
    averaged over the rotations), ``positive_log_loss`` (mean -log P(positive) over every row and slot: the listwise
    index loss on these held-out lists) beside ``chance_log_loss`` (ln K), ``rows`` and ``list_length``.
    """
    if not rows:
        raise ValueError("slot_bias needs at least one row.")
    length = len(rows[0][1])
    if length < 2 or any(len(candidates) != length for _, candidates in rows):
        raise ValueError(f"every row needs the same list length of at least 2 (got {[len(c) for _, c in rows][:5]}).")
    content_free = "N/A" if content_free is None else content_free
    histogram = torch.zeros(length, dtype=torch.float64)
    free_rows = rows if content_free_lists is None else rows[:content_free_lists]
    for query, _ in free_rows:
        histogram += _choice(_probabilities(reranker, query, [content_free] * length))
    correct = [0.0] * length
    plain = averaged_correct = log_loss = 0.0
    for query, candidates in rows:
        averaged = torch.zeros(length, dtype=torch.float64)  # per candidate (its position in the given list)
        for shift, rotated in enumerate(rotations(candidates)):
            probabilities = _probabilities(reranker, query, rotated)
            credit = float(_choice(probabilities)[shift])  # rotation `shift` put the positive at slot `shift`
            log_loss -= math.log(max(float(probabilities[shift]), 1e-300))
            correct[shift] += credit
            plain += credit if shift == 0 else 0.0
            for slot in range(length):
                averaged[(slot - shift) % length] += probabilities[slot]
        averaged_correct += float(_choice(averaged)[0])
    counts = [round(float(value), 6) for value in histogram]
    histogram_list = [int(value) if float(value).is_integer() else value for value in counts]
    preferred = max(range(length), key=lambda slot: (counts[slot], -slot))
    accuracy_by_slot = [100 * count / len(rows) for count in correct]
    return {
        "rows": len(rows),
        "list_length": length,
        "chance": 100 / length,
        "content_free_histogram": histogram_list,
        "preferred_slot": preferred,
        "preferred_share": 100 * counts[preferred] / len(free_rows),
        "accuracy_by_slot": accuracy_by_slot,
        "rotation_mean_accuracy": sum(accuracy_by_slot) / length,
        "plain_accuracy": 100 * plain / len(rows),
        "rotation_averaged_accuracy": 100 * averaged_correct / len(rows),
        "positive_log_loss": log_loss / (len(rows) * length),
        "chance_log_loss": math.log(length),
    }
