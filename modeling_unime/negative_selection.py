"""Hard-negative selection for UniME-V2: global retrieval, false-negative filter, cyclical sampling.

These are the pure, model-free steps of the mining pipeline (arXiv 2510.13515, "MLLM-as-a-Judge for Hard Negatives Mining") around the judge:

1. :func:`chunked_top_k` (`modeling_unime.util.retrieval`, re-exported here) retrieves, for every query, the
   ``top_k`` most similar pool items, never forming the full queries x pool similarity matrix, excluding the query's
   own positive and its duplicates and, optionally, anything at or above a similarity threshold delta (Eq. 1).
2. :func:`false_negative_filter` drops candidates the judge scores too close to the positive
   (``s > s_pos - beta``): those are likely unlabelled positives.
3. :func:`cyclical_sample` picks ``num_negatives`` of the survivors with a strided walk over their ranking, so
   the chosen negatives spread over the difficulty range instead of being the ``num_negatives`` hardest.
4. :class:`SelectionStats` counts what each rule removed and how well the judge separated the positive from its
   candidates, and prints a report with hints, flagging a degenerate run with a WARNING block.

Only ``torch``, ``numpy`` and the standard library are used, so the module can be reused outside ``transformers``.

Example (one query, end to end):
    >>> import random, torch
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
from dataclasses import dataclass, fields
from typing import Union

import numpy as np
import torch

from .util.retrieval import chunked_top_k, faiss_top_k

__all__ = [
    "CHANCE_WIN_RATE",
    "DEGENERATE_FALLBACK_SHARE",
    "DEGENERATE_FILTER_SHARE",
    "EMPTY_FALLBACKS",
    "FALLBACK_SCORE",
    "MIN_JUDGED_FOR_CHANCE",
    "SelectionStats",
    "cyclical_sample",
    "false_negative_filter",
    "chunked_top_k",
    "faiss_top_k",
]

EMPTY_FALLBACKS = ("paper", "drop")
"""Accepted values of ``empty_fallback`` in :func:`cyclical_sample`."""

FALLBACK_SCORE = 1.0
"""Judge score the paper gives to each negative drawn by the empty-set fallback."""

DEGENERATE_FALLBACK_SHARE = 0.10
"""Share of queries left with no candidate after the filter (fallback or dropped) above which a run is flagged as
degenerate: the paper reports under 1%."""

DEGENERATE_FILTER_SHARE = 0.90
"""Share of the retrieved candidates removed by the false-negative filter above which a run is flagged."""

CHANCE_WIN_RATE = 0.60
"""A judge that scores the positive above fewer than this share of the judged candidates is flagged as at chance
(a judge at chance: about 0.5)."""

MIN_JUDGED_FOR_CHANCE = 50
"""Judged candidates needed before the at-chance check speaks."""

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
    on ``alpha`` is kept. The comparison runs in float64 with a slack of :data:`BOUNDARY_TOLERANCE` (1e-9) so that
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
      :data:`FALLBACK_SCORE` (1.0), as the paper does.
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


# --------------------------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class SelectionStats:
    """Counts of what each selection rule did, summed over queries (and over workers with :meth:`merge`).

    ``num_negatives`` is the target per query; it is used in the report's wording and must match when merging.

    Example:
        >>> stats = SelectionStats(num_negatives=10)
        >>> stats.update(queries=4, candidates_retrieved=200, removed_as_false_negative=30, short_of_negatives=1)
        >>> stats.merge(SelectionStats(queries=1, queries_used_fallback=1)).queries
        5
        >>> print(stats.summary())  # doctest: +ELLIPSIS
        Hard-negative selection over 4 queries (target 10 negatives each)
        ...
          - 25.0% of queries had fewer than 10 unique negatives: raise top_k or lower beta.
    """

    queries: int = 0
    candidates_retrieved: int = 0
    removed_by_threshold: int = 0
    removed_as_positive: int = 0
    removed_as_false_negative: int = 0
    queries_used_fallback: int = 0
    queries_dropped: int = 0
    queries_short_of_negatives: int = 0
    queries_positive_below_all: int = 0
    duplicate_rows: int = 0
    candidates_judged: int = 0
    candidates_below_positive: int = 0
    score_gap_sum: float = 0.0
    num_negatives: int = 10

    def update(
        self,
        *,
        queries: int = 0,
        candidates_retrieved: int = 0,
        removed_by_threshold: int = 0,
        removed_as_positive: int = 0,
        removed_as_false_negative: int = 0,
        used_fallback: int | bool = 0,
        dropped: int | bool = 0,
        short_of_negatives: int | bool = 0,
        positive_below_all: int | bool = 0,
        duplicate_rows: int = 0,
        candidates_judged: int = 0,
        candidates_below_positive: int = 0,
        score_gap: float = 0.0,
    ) -> None:
        """Add counts in place; booleans count as 0 or 1 so per-query flags can be passed directly.

        ``candidates_judged``, ``candidates_below_positive`` and ``score_gap`` (the sum over judged candidates of
        ``|s_pos - s|``) describe how well the judge separates the positive from the candidates: they feed the
        degenerate-run check (`degenerate_warnings`).
        """
        score_gap = float(score_gap)
        if not score_gap >= 0:
            raise ValueError(f"counts only grow; got score_gap_sum += {score_gap}")
        self.score_gap_sum += score_gap
        increments = {
            "queries": queries,
            "candidates_retrieved": candidates_retrieved,
            "removed_by_threshold": removed_by_threshold,
            "removed_as_positive": removed_as_positive,
            "removed_as_false_negative": removed_as_false_negative,
            "queries_used_fallback": used_fallback,
            "queries_dropped": dropped,
            "queries_short_of_negatives": short_of_negatives,
            "queries_positive_below_all": positive_below_all,
            "duplicate_rows": duplicate_rows,
            "candidates_judged": candidates_judged,
            "candidates_below_positive": candidates_below_positive,
        }
        for name, increment in increments.items():
            increment = int(increment)
            if increment < 0:
                raise ValueError(f"counts only grow; got {name} += {increment}")
            setattr(self, name, getattr(self, name) + increment)

    def merge(self, other: SelectionStats) -> SelectionStats:
        """A new :class:`SelectionStats` with both sets of counts added (e.g. one per worker); neither is changed."""
        if other.num_negatives != self.num_negatives:
            raise ValueError(f"cannot merge stats for {self.num_negatives} and {other.num_negatives} negatives")
        merged = {field.name: getattr(self, field.name) + getattr(other, field.name) for field in fields(self)}
        merged["num_negatives"] = self.num_negatives
        return SelectionStats(**merged)

    def summary(self, beta: float | None = None, warnings: bool = True) -> str:
        """A readable report: each count, its rate, hints on which setting to change and, when the run is degenerate
        (`degenerate_warnings`), a WARNING block at the end.

        Args:
            beta: the false-negative margin the run used; named in the warning when given.
            warnings: append the WARNING block (callers that print more lines put it last themselves with
                `warning_block`).
        """
        queries = self.queries
        retrieved = self.candidates_retrieved
        judged = self.candidates_judged

        def per_query(count: int) -> str:
            return f"{count / queries:.1f} per query" if queries else "n/a"

        def of_queries(count: int) -> str:
            return f"{100 * count / queries:.1f}% of queries" if queries else "n/a"

        def of_retrieved(count: int) -> str:
            return f"{100 * count / retrieved:.1f}% of retrieved" if retrieved else "n/a"

        def of_judged(count: int) -> str:
            return f"{100 * count / judged:.1f}% of judged" if judged else "n/a"

        rows = [
            ("candidates retrieved (top-k)", self.candidates_retrieved, per_query),
            ("pool items removed by the similarity threshold (delta)", self.removed_by_threshold, per_query),
            ("pool items removed as the positive or its duplicate", self.removed_as_positive, per_query),
            ("candidates removed by the false-negative filter (beta)", self.removed_as_false_negative, of_retrieved),
            ("queries that used the empty-set fallback", self.queries_used_fallback, of_queries),
            ("queries dropped (no candidate left)", self.queries_dropped, of_queries),
            (
                f"queries with fewer than {self.num_negatives} unique negatives",
                self.queries_short_of_negatives,
                of_queries,
            ),
            ("queries whose positive scored below every candidate", self.queries_positive_below_all, of_queries),
            ("duplicate (query, positive) rows, kept as given", self.duplicate_rows, of_queries),
            ("judged candidates scored below the positive", self.candidates_below_positive, of_judged),
        ]
        width = max(len(label) for label, _, _ in rows)
        lines = [f"Hard-negative selection over {queries:,} queries (target {self.num_negatives} negatives each)"]
        lines += [f"  {label:<{width}}  {count:>10,}  ({rate(count)})" for label, count, rate in rows]
        gap = f"{self.mean_score_gap:.4f}" if judged else "n/a"
        lines.append(f"  {'mean |positive score - candidate score|':<{width}}  {gap:>10}")
        lines.append("Hints:")
        lines += [f"  - {hint}" for hint in self._hints()] or ["  - none: every query got its negatives."]
        block = self.warning_block(beta) if warnings else ""
        if block:
            lines.append(block)
        return "\n".join(lines)

    @property
    def mean_score_gap(self) -> float:
        """Mean of ``|s_pos - s|`` over the judged candidates (0.0 when none was judged): how far apart the judge puts
        the positive and a candidate; a false-negative margin ``beta`` above it removes most candidates."""
        return self.score_gap_sum / self.candidates_judged if self.candidates_judged else 0.0

    def degenerate_warnings(self, beta: float | None = None) -> list[str]:
        """The reasons this selection is degenerate (empty when it is not).

        A run is flagged when more than :data:`DEGENERATE_FALLBACK_SHARE` of the queries had no candidate left after
        the false-negative filter (the paper reports under 1%: those rows get random negatives scored 1.0, or are
        dropped), when the filter removed more than :data:`DEGENERATE_FILTER_SHARE` of the retrieved candidates, or
        when the judge scored the positive above fewer than :data:`CHANCE_WIN_RATE` of at least
        :data:`MIN_JUDGED_FOR_CHANCE` judged candidates (a judge at chance scores it above about half of them).

        Example:
            >>> stats = SelectionStats(queries=48, candidates_retrieved=768, removed_as_false_negative=754,
            ...                        queries_used_fallback=41, candidates_judged=768, candidates_below_positive=380,
            ...                        score_gap_sum=3.84)
            >>> for problem in stats.degenerate_warnings(beta=0.01):
            ...     print(problem)  # doctest: +ELLIPSIS
            85.4% of queries (41 of 48) had no candidate left after the false-negative filter: 41 got the ...
            the false-negative filter removed 98.2% of the retrieved candidates.
            the judge scored the positive above only 49.5% of the judged candidates ...
        """
        return [message for _, message in self._degenerate_problems(beta)]

    def _degenerate_problems(self, beta: float | None) -> list[tuple[str, str]]:
        """(kind, message) of each degenerate-run check that failed; kinds: ``emptied``, ``filter``, ``chance``."""
        problems: list[tuple[str, str]] = []
        queries = self.queries
        if queries == 0:
            return problems
        emptied = self.queries_used_fallback + self.queries_dropped
        if emptied > DEGENERATE_FALLBACK_SHARE * queries:
            what = []
            if self.queries_used_fallback:
                what.append(f"{self.queries_used_fallback} got the empty-set fallback ({self.num_negatives} random "
                            f"retrieved candidates, each scored {FALLBACK_SCORE})")
            if self.queries_dropped:
                what.append(f"{self.queries_dropped} were dropped")
            problems.append(("emptied",
                f"{100 * emptied / queries:.1f}% of queries ({emptied} of {queries}) had no candidate left after the "
                f"false-negative filter: {' and '.join(what)}; the paper reports under 1%."
            ))
        retrieved = self.candidates_retrieved
        if retrieved and self.removed_as_false_negative > DEGENERATE_FILTER_SHARE * retrieved:
            problems.append(("filter",
                f"the false-negative filter removed {100 * self.removed_as_false_negative / retrieved:.1f}% of the "
                "retrieved candidates."
            ))
        judged = self.candidates_judged
        if judged >= MIN_JUDGED_FOR_CHANCE and self.candidates_below_positive < CHANCE_WIN_RATE * judged:
            gap = f"; the mean gap between the positive's score and a candidate's is {self.mean_score_gap:.4f}"
            if beta is not None and beta > 0:
                gap += f" ({'below' if self.mean_score_gap < beta else 'against'} beta = {beta:g})"
            problems.append(("chance",
                f"the judge scored the positive above only {100 * self.candidates_below_positive / judged:.1f}% of the "
                f"judged candidates (about 50% is a judge at chance; a useful judge puts the positive above most of "
                f"its retrieved candidates){gap}."
            ))
        return problems

    def warning_block(self, beta: float | None = None) -> str:
        """The WARNING block of a degenerate run (`degenerate_warnings`): what is wrong, the likely causes and what to
        do; an empty string when the run is not degenerate."""
        problems = self._degenerate_problems(beta)
        if not problems:
            return ""
        kinds = {kind for kind, _ in problems}
        lines = ["WARNING: degenerate mining run: the negatives and their judge scores are not what the method "
                 "intends; do not train on this dataset as it is."]
        lines += [f"WARNING:   - {message}" for _, message in problems]
        causes = []
        if "chance" in kinds:
            causes.append("a judge at chance (an untrained or tiny random model, or yes_token/no_token that are not "
                          "its answer words): use a judge that tells positives from negatives (the paper's "
                          "Qwen2.5-VL-7B-Instruct), and check a few of its scores by hand")
        if kinds & {"emptied", "filter"}:
            if beta is None or beta > 0:
                beta_text = "beta" if beta is None else f"beta = {beta:g}"
                causes.append(f"{beta_text} larger than the spread of the judge's scores (mean gap between the "
                              f"positive and a candidate: {self.mean_score_gap:.4f}): lower beta below that gap")
            causes.append("top_k too small to leave candidates after the filter: raise top_k")
        lines += [f"WARNING: likely cause and fix: {cause}." for cause in causes]
        if kinds & {"emptied", "filter"}:
            lines.append("WARNING: meanwhile, empty_fallback: drop keeps queries with no candidate left out of the "
                         f"dataset instead of giving them random negatives scored {FALLBACK_SCORE}.")
        return "\n".join(lines)

    def _hints(self) -> list[str]:
        hints = []
        queries = self.queries
        if queries == 0:
            return ["no query was recorded: call update(queries=...) once per selected query."]

        def share(count: int) -> str:
            return f"{100 * count / queries:.1f}% of queries"

        if self.queries_short_of_negatives:
            hints.append(f"{share(self.queries_short_of_negatives)} had fewer than {self.num_negatives} unique "
                         "negatives: raise top_k or lower beta.")
        if self.queries_used_fallback:
            hints.append(
                f"{share(self.queries_used_fallback)} used the paper's fallback (random top-k candidates scored 1.0, "
                "which puts more target mass on negatives than on the positive): lower beta, raise top_k, or use "
                "empty_fallback='drop'."
            )
        if self.queries_dropped:
            hints.append(f"{share(self.queries_dropped)} were dropped: raise top_k or lower beta to keep them.")
        if self.candidates_retrieved and self.removed_as_false_negative > 0.5 * self.candidates_retrieved:
            hints.append(
                "the false-negative filter removed over half of the retrieved candidates: check that the judge "
                "scores the positive sensibly, or lower beta."
            )
        if self.removed_by_threshold and self.removed_by_threshold >= queries:
            hints.append(
                f"the similarity threshold removed {self.removed_by_threshold / queries:.1f} pool items per query: "
                "if these are not near-duplicates of the queries, raise similarity_threshold (delta)."
            )
        if self.queries_positive_below_all:
            hints.append(
                f"{share(self.queries_positive_below_all)}: the judge scored the positive below every candidate (a "
                "noisy pair or a weak judge); inspect these rows or use a stronger judge."
            )
        if self.removed_as_positive > 2 * queries:
            hints.append(
                f"{self.removed_as_positive / queries:.1f} pool items per query were the positive or a duplicate "
                "of it: the pool holds many repeated targets; deduplicate it."
            )
        return hints
