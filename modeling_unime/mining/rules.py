"""The selection rules of hard-negative mining, around the judge (arXiv 2510.13515, "MLLM-as-a-Judge for Hard
Negatives Mining"): model-free, only ``torch``, ``numpy`` and the standard library.

1. Global retrieval (`modeling_unime.util.retrieval.chunked_top_k`) finds each query's ``top_k`` most similar pool
   items, excluding its own positive (and, optionally, anything at or above a similarity threshold delta, Eq. 1).
2. `false_negative_filter` drops candidates the judge scores too close to the positive (``s > s_pos - beta``):
   those are likely unlabelled positives.
3. `cyclical_sample` picks ``num_negatives`` of the survivors with a strided walk over their ranking, so the chosen
   negatives spread over the difficulty range instead of being the ``num_negatives`` hardest.

`modeling_unime.mining.stats.SelectionStats` counts what each rule removed.

Example (one query, end to end):
    >>> import random, torch
    >>> from modeling_unime.mining.stats import SelectionStats
    >>> from modeling_unime.util.retrieval import chunked_top_k
    >>> queries = torch.tensor([[1.0, 0.0]])
    >>> pool = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.1], [1.0, 0.5], [0.0, 1.0]]), dim=-1)
    >>> stats = SelectionStats(num_negatives=2)
    >>> scores, indices = chunked_top_k(queries, pool, k=3, exclude=[[0]], stats=stats)
    >>> indices.tolist()
    [[1, 2, 3]]
    >>> judge_scores = [0.95, 0.40, 0.10]  # judge's P(Yes) for pool items 1, 2, 3; the positive scored 0.9
    >>> kept = false_negative_filter(judge_scores, positive_score=0.9, beta=0.01)
    >>> kept.tolist()
    [False, True, True]
    >>> survivors = [index for index, keep in zip(indices[0].tolist(), kept) if keep]
    >>> positions, used_fallback = cyclical_sample(survivors, num_negatives=2, rng=random.Random(0))
    >>> [survivors[p] for p in positions], used_fallback
    ([2, 3], False)
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence, Sized
from typing import Union

import numpy as np
import torch

EMPTY_FALLBACKS = ("paper", "drop")
"""Accepted values of ``empty_fallback`` in `cyclical_sample`."""

FALLBACK_SCORE = 1.0
"""Judge score the paper gives to each negative drawn by the empty-set fallback."""

BOUNDARY_TOLERANCE = 1e-9
"""Slack on the false-negative boundary, so decimal round-off (``0.3 - 0.1 == 0.19999999999999998``) never turns a
score that sits exactly on ``s_pos - beta`` into a dropped one. Judge scores carry far less precision than this."""

RandomSource = Union[random.Random, np.random.Generator]
ScoreArray = Union[Sequence[float], np.ndarray, torch.Tensor]


# --------------------------------------------------------------------------------------------------------------------
# false-negative filter
# --------------------------------------------------------------------------------------------------------------------


def false_negative_filter(
    candidate_scores: ScoreArray,
    positive_score: float,
    beta: float = 0.01,
    *,
    on_nonfinite: str = "raise",
) -> np.ndarray | torch.Tensor:
    """Mask of the candidates to keep: judge score ``s <= s_pos - beta``.

    A candidate the judge scores above ``alpha = s_pos - beta`` is as good a match as the labelled positive, so it
    is likely an unlabelled positive (a false negative) and must not be trained on as a negative. A score exactly
    on ``alpha`` is kept. The comparison runs in float64 with a slack of `BOUNDARY_TOLERANCE` (1e-9) so that
    decimal round-off does not move a score that sits on the boundary.

    Args:
        candidate_scores: 1-D judge scores ``s(q, c)``, in any order.
        positive_score: judge score ``s_pos`` of the (query, positive) pair.
        beta: margin below the positive score; the paper's supplement uses 0.01.
        on_nonfinite: what to do with NaN or infinite candidate scores (a failed judge call): ``"raise"``
            (default) raises, ``"drop"`` drops those candidates explicitly.

    Returns:
        Boolean mask, ``True`` = keep, aligned with ``candidate_scores``: a ``torch.bool`` tensor on the same
        device when ``candidate_scores`` is a tensor, otherwise a ``numpy`` bool array.

    Raises:
        ValueError: a candidate score is NaN or infinite (the message names its position) and
            ``on_nonfinite="raise"``; ``positive_score`` or ``beta`` is not finite; scores are not 1-D;
            ``on_nonfinite`` is not one of ``"raise"``, ``"drop"``.

    Example:
        >>> false_negative_filter([0.95, 0.89, 0.5, 0.891], positive_score=0.9, beta=0.01).tolist()
        [False, True, True, False]
        >>> false_negative_filter([0.2, float("nan")], positive_score=0.9)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: judge score of candidate 1 is nan (1 non-finite score(s) in total); re-score it, or pass ...
    """
    if on_nonfinite not in ("raise", "drop"):
        raise ValueError(f"on_nonfinite must be 'raise' or 'drop', got {on_nonfinite!r}")
    positive_score = float(positive_score)
    beta = float(beta)
    if not math.isfinite(positive_score):
        raise ValueError(
            f"positive_score is {positive_score}: the judge failed on the (query, positive) pair; "
            "re-score it or skip this query"
        )
    if not math.isfinite(beta):
        raise ValueError(f"beta must be finite, got {beta}")

    if isinstance(candidate_scores, torch.Tensor):
        scores = candidate_scores.detach().to("cpu", torch.float64).numpy()
    else:
        scores = np.asarray(candidate_scores, dtype=np.float64)
    if scores.ndim != 1:
        raise ValueError(f"candidate_scores must be 1-D, got shape {scores.shape}")

    finite = np.isfinite(scores)
    if on_nonfinite == "raise" and not finite.all():
        bad = np.flatnonzero(~finite)
        raise ValueError(
            f"judge score of candidate {int(bad[0])} is {scores[bad[0]]} ({bad.size} non-finite score(s) in total); "
            "re-score it, or pass on_nonfinite='drop' to drop non-finite candidates explicitly"
        )
    alpha = positive_score - beta
    with np.errstate(invalid="ignore"):
        keep = finite & (scores <= alpha + BOUNDARY_TOLERANCE)
    if isinstance(candidate_scores, torch.Tensor):
        return torch.from_numpy(keep).to(candidate_scores.device)
    return keep


# --------------------------------------------------------------------------------------------------------------------
# cyclical sampling
# --------------------------------------------------------------------------------------------------------------------


def cyclical_sample(
    ranked_candidates: Sized | int,
    num_negatives: int = 10,
    interval: int = 5,
    empty_fallback: str = "paper",
    fallback_pool: Sized | int | None = None,
    rng: RandomSource | None = None,
) -> tuple[list[int], bool]:
    """Positions of ``num_negatives`` negatives, taken from the ranking with a strided, cyclical walk.

    The walk visits positions ``0, interval, 2*interval, ...``, then ``1, 1+interval, ...``, then ``2, ...`` (every
    position once), so the chosen negatives spread over the ranking rather than all being the hardest. If there are
    fewer candidates than ``num_negatives``, the walk starts over in the same order: duplicates are allowed.

    With 23 candidates and the defaults: ``[0, 5, 10, 15, 20, 1, 6, 11, 16, 21]``; with 3 candidates:
    ``[0, 1, 2, 0, 1, 2, 0, 1, 2, 0]``.

    When no candidate is left (the paper reports under 1% of queries):

    * ``empty_fallback="paper"``: ``num_negatives`` random positions of ``fallback_pool`` (the initial top-k
      retrieval, before any filtering), without replacement when the pool is large enough; a smaller pool is used
      in full, in random order, as many times as needed. The caller gives each of them the judge score
      `FALLBACK_SCORE` (1.0), as the paper does.
    * ``empty_fallback="drop"``: an empty selection; the caller skips the query.

    In both cases the returned flag is ``True``.

    Args:
        ranked_candidates: the filtered candidates, hardest first (only their number is used; an int is accepted).
        num_negatives: how many negatives to choose (``>= 0``).
        interval: stride of the walk (``>= 1``); 1 takes the candidates in rank order.
        empty_fallback: ``"paper"`` or ``"drop"``, see above.
        fallback_pool: the initial top-k candidates (or their number); required by ``"paper"`` when nothing is left.
        rng: ``random.Random`` or ``numpy.random.Generator`` for the fallback draw; ``None`` draws from a fresh,
            unseeded ``random.Random``. Pass a seeded one for reproducible mining.

    Returns:
        ``(positions, used_fallback)``. ``positions`` index ``ranked_candidates``, or ``fallback_pool`` when
        ``used_fallback`` is ``True``.

    Raises:
        ValueError: unknown ``empty_fallback``, ``num_negatives < 0``, ``interval < 1``, or the ``"paper"`` fallback
            is needed but ``fallback_pool`` is missing or empty.
        TypeError: ``rng`` is neither a ``random.Random`` nor a ``numpy.random.Generator``.

    Example:
        >>> cyclical_sample(list(range(12)))
        ([0, 5, 10, 1, 6, 11, 2, 7, 3, 8], False)
        >>> cyclical_sample([], empty_fallback="drop")
        ([], True)
        >>> positions, used_fallback = cyclical_sample([], fallback_pool=50, rng=random.Random(0))
        >>> len(set(positions)), used_fallback
        (10, True)
    """
    if empty_fallback not in EMPTY_FALLBACKS:
        raise ValueError(f"empty_fallback must be one of {EMPTY_FALLBACKS}, got {empty_fallback!r}")
    if not isinstance(num_negatives, int) or isinstance(num_negatives, bool) or num_negatives < 0:
        raise ValueError(f"num_negatives must be a non-negative int, got {num_negatives!r}")
    if not isinstance(interval, int) or isinstance(interval, bool) or interval < 1:
        raise ValueError(f"interval must be a positive int, got {interval!r}")

    num_candidates = _count(ranked_candidates, "ranked_candidates")
    if num_negatives == 0:
        return [], False
    if num_candidates > 0:
        walk = [
            position
            for offset in range(min(interval, num_candidates))
            for position in range(offset, num_candidates, interval)
        ]
        return [walk[step % num_candidates] for step in range(num_negatives)], False

    if empty_fallback == "drop":
        return [], True
    if fallback_pool is None:
        raise ValueError(
            "no candidate is left and empty_fallback='paper' needs fallback_pool (the initial top-k candidates); "
            "pass it, or use empty_fallback='drop'"
        )
    pool_size = _count(fallback_pool, "fallback_pool")
    if pool_size == 0:
        raise ValueError("no candidate is left and fallback_pool is empty; use empty_fallback='drop' for this query")
    positions: list[int] = []
    while len(positions) < num_negatives:
        draw = min(pool_size, num_negatives - len(positions))
        positions.extend(_sample_without_replacement(pool_size, draw, rng))
    return positions, True


def _count(candidates: Sized | int, name: str) -> int:
    if isinstance(candidates, (int, np.integer)) and not isinstance(candidates, bool):
        if candidates < 0:
            raise ValueError(f"{name} must not be negative, got {candidates}")
        return int(candidates)
    return len(candidates)


def _sample_without_replacement(population: int, count: int, rng: RandomSource | None) -> list[int]:
    if rng is None:
        rng = random.Random()
    if isinstance(rng, random.Random):
        return rng.sample(range(population), count)
    if isinstance(rng, np.random.Generator):
        return [int(position) for position in rng.choice(population, size=count, replace=False)]
    raise TypeError(f"rng must be a random.Random or a numpy.random.Generator, got {type(rng).__name__}")


__all__ = ["BOUNDARY_TOLERANCE", "EMPTY_FALLBACKS", "FALLBACK_SCORE", "cyclical_sample", "false_negative_filter"]
