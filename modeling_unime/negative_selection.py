"""Hard-negative selection for UniME-V2: global retrieval, false-negative filter, cyclical sampling.

These are the pure, model-free steps (a), (c) and (d) of the mining pipeline (see ``method.md``):

1. :func:`streaming_top_k` retrieves, for every query, the ``top_k`` most similar pool items, never forming the
   full queries x pool similarity matrix, excluding the query's own positive and its duplicates and, optionally,
   anything at or above a similarity threshold delta (Eq. 1 of the paper).
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
    >>> scores, indices = streaming_top_k(queries, pool, k=3, exclude=[[0]], stats=stats)
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
from collections.abc import Iterable, Sequence, Sized
from dataclasses import dataclass, fields
from typing import Union

import numpy as np
import torch

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
    "streaming_top_k",
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
# (a) global retrieval
# --------------------------------------------------------------------------------------------------------------------


def streaming_top_k(
    query_embeddings: torch.Tensor,
    pool_embeddings: torch.Tensor,
    k: int,
    chunk_size: int = 1024,
    exclude: Sequence[int | Iterable[int] | None] | None = None,
    similarity_threshold: float | None = None,
    *,
    query_chunk_size: int | None = None,
    stats: SelectionStats | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` most similar pool items for every query, computed block by block.

    Similarity is the dot product, i.e. the cosine similarity for the L2-normalised embeddings the caller passes.
    The queries are processed ``query_chunk_size`` rows at a time and, for each such chunk, the pool
    ``chunk_size`` rows at a time; a running top-``k`` per query is merged with each block. Peak memory is
    therefore ``O(query_chunk_size x (chunk_size + k))`` for the working block plus ``O(queries x k)`` for the
    result: the full ``queries x pool`` matrix is never formed.

    Args:
        query_embeddings: ``(N, D)`` float tensor, rows L2-normalised.
        pool_embeddings: ``(M, D)`` float tensor on the same device, rows L2-normalised.
        k: number of candidates to return per query (``>= 0``).
        chunk_size: rows of the pool per block (and of the queries, unless ``query_chunk_size`` is given).
        exclude: one entry per query: a pool index or a collection of pool indices never to return for that query
            (its own positive and the exact duplicates of it), or ``None`` for nothing. Indices must lie in
            ``[0, M)``.
        similarity_threshold: delta of Eq. 1: a candidate with similarity ``>= delta`` is dropped (near-duplicates
            of the query). ``None`` disables the rule.
        query_chunk_size: rows of the queries per block; defaults to ``chunk_size``.
        stats: if given, ``candidates_retrieved``, ``removed_by_threshold`` and ``removed_as_positive`` are added
            to it. ``removed_by_threshold`` counts every non-excluded pool item at or above delta, not only those
            that would have ranked in the top ``k``. The ``queries`` count is left to the caller, which records
            one per selected query.

    Returns:
        ``(scores, indices)``, both ``(N, k)``, sorted by decreasing similarity. ``scores`` has the promoted dtype
        of the inputs, ``indices`` is ``torch.long``. Equal similarities are ordered by lower pool index, so the
        result does not depend on the chunk sizes. When fewer than ``k`` candidates survive the exclusions and
        the threshold (for instance a pool smaller than ``k``), the missing trailing slots hold index ``-1`` and
        score ``-inf``.

    Raises:
        ValueError: on shapes that do not match, non-finite embeddings, ``k < 0``, chunk sizes ``< 1``, a
            non-finite ``similarity_threshold``, ``exclude`` of the wrong length, or an excluded index out of range.

    Example:
        >>> import torch
        >>> queries = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> pool = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
        >>> scores, indices = streaming_top_k(queries, pool, k=2, chunk_size=2, exclude=[[0], [2]])
        >>> indices.tolist()
        [[1, 2], [1, 0]]
        >>> scores
        tensor([[0.6000, 0.0000],
                [0.8000, 0.0000]])
        >>> scores, indices = streaming_top_k(queries, pool, k=2, exclude=[0, 2], similarity_threshold=0.7)
        >>> indices.tolist()  # query 1 loses pool item 1 (0.8 >= 0.7) and has a single candidate left
        [[1, 2], [0, -1]]
        >>> scores[1, 1].item()
        -inf
    """
    _check_embeddings(query_embeddings, pool_embeddings)
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise ValueError(f"k must be a non-negative int, got {k!r}")
    query_chunk_size = chunk_size if query_chunk_size is None else query_chunk_size
    for name, value in (("chunk_size", chunk_size), ("query_chunk_size", query_chunk_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if similarity_threshold is not None:
        similarity_threshold = float(similarity_threshold)
        if not math.isfinite(similarity_threshold):
            raise ValueError(f"similarity_threshold must be finite or None, got {similarity_threshold}")

    num_queries, num_pool = query_embeddings.shape[0], pool_embeddings.shape[0]
    device = query_embeddings.device
    dtype = torch.promote_types(query_embeddings.dtype, pool_embeddings.dtype)
    exclusion_rows, exclusion_cols, exclusion_offsets = _flatten_exclusions(exclude, num_queries, num_pool)

    top_scores = torch.full((num_queries, k), -math.inf, dtype=dtype, device=device)
    top_indices = torch.full((num_queries, k), -1, dtype=torch.long, device=device)
    # A device tensor, so that counting adds no host sync of its own.
    threshold_hits = torch.zeros((), dtype=torch.long, device=device)
    if k == 0 or num_queries == 0:
        _record_retrieval(stats, top_indices, threshold_hits, exclusion_rows)
        return top_scores, top_indices

    with torch.no_grad():
        for query_start in range(0, num_queries, query_chunk_size):
            query_end = min(query_start + query_chunk_size, num_queries)
            queries = query_embeddings[query_start:query_end].to(dtype)
            running_scores = top_scores[query_start:query_end]
            running_indices = top_indices[query_start:query_end]

            first, last = exclusion_offsets[query_start], exclusion_offsets[query_end]
            chunk_rows = exclusion_rows[first:last] - query_start
            chunk_cols = exclusion_cols[first:last]
            by_col = np.argsort(chunk_cols, kind="stable")
            chunk_rows, chunk_cols = chunk_rows[by_col], chunk_cols[by_col]

            for pool_start in range(0, num_pool, chunk_size):
                pool_end = min(pool_start + chunk_size, num_pool)
                block = torch.matmul(queries, pool_embeddings[pool_start:pool_end].to(dtype).T)

                lo, hi = np.searchsorted(chunk_cols, [pool_start, pool_end], side="left")
                if hi > lo:
                    rows = torch.as_tensor(chunk_rows[lo:hi], device=device)
                    cols = torch.as_tensor(chunk_cols[lo:hi] - pool_start, device=device)
                    block[rows, cols] = -math.inf
                if similarity_threshold is not None:
                    too_similar = block >= similarity_threshold
                    threshold_hits += too_similar.sum()
                    block.masked_fill_(too_similar, -math.inf)

                block_scores, block_indices = _block_contenders(block, k)
                if block_scores is None:
                    continue
                # Every running index is lower than every index of this block, the running list is ordered
                # (score desc, index asc) and the contenders are in column order: a stable sort of the two therefore
                # orders ties by pool index, whatever the chunking.
                merged_scores = torch.cat([running_scores, block_scores], dim=1)
                merged_indices = torch.cat([running_indices, block_indices + pool_start], dim=1)
                merged_scores, order = torch.sort(merged_scores, dim=1, descending=True, stable=True)
                running_scores = merged_scores[:, :k]
                running_indices = torch.gather(merged_indices, 1, order[:, :k])

            running_indices = running_indices.masked_fill(running_scores == -math.inf, -1)
            top_scores[query_start:query_end] = running_scores
            top_indices[query_start:query_end] = running_indices

    _record_retrieval(stats, top_indices, threshold_hits, exclusion_rows)
    return top_scores, top_indices


def faiss_top_k(
    query_embeddings: torch.Tensor,
    pool_embeddings: torch.Tensor,
    k: int,
    exclude: Sequence[int | Iterable[int] | None] | None = None,
    similarity_threshold: float | None = None,
    *,
    stats: SelectionStats | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`streaming_top_k` through a faiss exact inner-product index (``pip install faiss-cpu``), same contract.

    faiss blocks the search itself and is faster on large pools; equal similarities may come out in another order
    than `streaming_top_k`'s lower-index-first rule where they straddle the k-th place. The search widens until
    every query has ``k`` candidates left after the exclusions and the threshold, or the pool is exhausted.

    Example:
        >>> import torch
        >>> queries = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> pool = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
        >>> faiss_top_k(queries, pool, k=2, exclude=[[0], [2]])[1].tolist()
        [[1, 2], [1, 0]]
    """
    import faiss

    _check_embeddings(query_embeddings, pool_embeddings)
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}.")
    if similarity_threshold is not None and not math.isfinite(similarity_threshold):
        raise ValueError(f"similarity_threshold must be finite or None, got {similarity_threshold}.")
    queries = np.ascontiguousarray(query_embeddings.detach().cpu().float().numpy())
    pool = np.ascontiguousarray(pool_embeddings.detach().cpu().float().numpy())
    count, pool_size = queries.shape[0], pool.shape[0]
    if exclude is not None and len(exclude) != count:
        raise ValueError(f"exclude has {len(exclude)} entries for {count} queries; give one per query.")
    excluded = [set() for _ in range(count)]
    for row, entry in enumerate(exclude or []):
        for index in ([] if entry is None else [entry] if isinstance(entry, (int, np.integer)) else entry):
            if not 0 <= int(index) < pool_size:
                raise ValueError(f"exclude[{row}] holds pool index {index}, outside [0, {pool_size}).")
            excluded[row].add(int(index))
    index = faiss.IndexFlatIP(pool.shape[1])
    index.add(pool)
    top_scores = torch.full((count, k), -math.inf)
    top_indices = torch.full((count, k), -1, dtype=torch.long)
    width = min(pool_size, k + max((len(entry) for entry in excluded), default=0))
    pending = list(range(count))
    while pending and k > 0 and width > 0:
        scores, ids = index.search(queries[pending], width)
        still_short = []
        for position, row in enumerate(pending):
            kept = [
                (float(score), int(item))
                for score, item in zip(scores[position], ids[position])
                if item >= 0 and int(item) not in excluded[row]
                and (similarity_threshold is None or score < similarity_threshold)
            ]
            kept.sort(key=lambda pair: (-pair[0], pair[1]))
            if len(kept) < k and width < pool_size:
                still_short.append(row)
                continue
            for slot, (score, item) in enumerate(kept[:k]):
                top_scores[row, slot], top_indices[row, slot] = score, item
        pending = still_short
        width = min(pool_size, width * 2)
    if stats is not None:
        threshold_hits = 0
        if similarity_threshold is not None:
            radius = float(np.nextafter(np.float32(similarity_threshold), np.float32(-np.inf)))
            limits, _, ids = index.range_search(queries, radius)
            threshold_hits = sum(
                int(item) not in excluded[row]
                for row in range(count)
                for item in ids[limits[row] : limits[row + 1]]
            )
        stats.update(
            candidates_retrieved=int((top_indices >= 0).sum()),
            removed_by_threshold=threshold_hits,
            removed_as_positive=sum(len(entry) for entry in excluded),
        )
    return top_scores, top_indices


def _block_contenders(block: torch.Tensor, k: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Every entry of ``block`` that could be in its row's top ``k`` under lowest-index tie-breaking, in column order.

    ``torch.topk`` picks arbitrarily among equal values at the ``k``-th place, so the selection is widened to every
    valid entry tied with the ``k``-th best (rows needing less get some extra entries, which the merge discards).
    Returns ``(None, None)`` when the block holds no valid (finite) entry. Sorting only these contenders, instead of
    the whole block, keeps the merge cheap.
    """
    top_in_block = min(k, block.shape[1])
    values, columns = torch.topk(block, top_in_block, dim=1, sorted=False)
    kth_best = values.min(dim=1, keepdim=True).values
    width = int(((block >= kth_best) & (block > -math.inf)).sum(dim=1).max())
    if width == 0:
        return None, None
    if width != top_in_block:
        values, columns = torch.topk(block, width, dim=1, sorted=False)
    columns, by_column = torch.sort(columns, dim=1)
    return torch.gather(values, 1, by_column), columns


def _check_embeddings(query_embeddings: torch.Tensor, pool_embeddings: torch.Tensor) -> None:
    for name, tensor in (("query_embeddings", query_embeddings), ("pool_embeddings", pool_embeddings)):
        if not isinstance(tensor, torch.Tensor) or tensor.ndim != 2 or not tensor.is_floating_point():
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else ""
            raise ValueError(f"{name} must be a 2-D float tensor, got {type(tensor).__name__} {shape}")
        if not bool(torch.isfinite(tensor).all()):
            bad_row = int((~torch.isfinite(tensor)).any(dim=1).nonzero()[0, 0])
            raise ValueError(f"{name} has a non-finite value in row {bad_row}; re-embed that item")
    if query_embeddings.shape[1] != pool_embeddings.shape[1]:
        raise ValueError(
            f"embedding sizes differ: queries {tuple(query_embeddings.shape)}, pool {tuple(pool_embeddings.shape)}"
        )
    if query_embeddings.device != pool_embeddings.device:
        raise ValueError(f"queries on {query_embeddings.device} but pool on {pool_embeddings.device}")


def _flatten_exclusions(
    exclude: Sequence[int | Iterable[int] | None] | None, num_queries: int, num_pool: int
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(row, col) pairs of the exclusions, sorted by row, and per-row offsets into them (CSR layout)."""
    offsets = [0] * (num_queries + 1)
    if exclude is None:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty.copy(), offsets
    if len(exclude) != num_queries:
        raise ValueError(f"exclude has {len(exclude)} entries but there are {num_queries} queries")
    rows: list[int] = []
    cols: list[int] = []
    for query, entry in enumerate(exclude):
        if entry is None:
            excluded: set[int] = set()
        elif isinstance(entry, (int, np.integer)) or (isinstance(entry, torch.Tensor) and entry.ndim == 0):
            excluded = {int(entry)}
        else:
            excluded = {int(index) for index in entry}
        for index in sorted(excluded):
            if not 0 <= index < num_pool:
                raise ValueError(f"exclude[{query}] holds pool index {index}, outside [0, {num_pool})")
            rows.append(query)
            cols.append(index)
        offsets[query + 1] = len(rows)
    return np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64), offsets


def _record_retrieval(
    stats: SelectionStats | None, top_indices: torch.Tensor, threshold_hits: torch.Tensor, exclusion_rows: np.ndarray
) -> None:
    if stats is None:
        return
    stats.update(
        candidates_retrieved=int((top_indices >= 0).sum()),
        removed_by_threshold=int(threshold_hits),
        removed_as_positive=int(exclusion_rows.size),
    )


# --------------------------------------------------------------------------------------------------------------------
# (c) false-negative filter
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
# (d) cyclical sampling
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
        if self.queries_short_of_negatives:
            share = 100 * self.queries_short_of_negatives / queries
            hints.append(
                f"{share:.1f}% of queries had fewer than {self.num_negatives} unique negatives: "
                "raise top_k or lower beta."
            )
        if self.queries_used_fallback:
            share = 100 * self.queries_used_fallback / queries
            hints.append(
                f"{share:.1f}% of queries used the paper's fallback (random top-k candidates scored 1.0, which puts "
                "more target mass on negatives than on the positive): lower beta, raise top_k, or use "
                "empty_fallback='drop'."
            )
        if self.queries_dropped:
            share = 100 * self.queries_dropped / queries
            hints.append(f"{share:.1f}% of queries were dropped: raise top_k or lower beta to keep them.")
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
            share = 100 * self.queries_positive_below_all / queries
            hints.append(
                f"{share:.1f}% of queries: the judge scored the positive below every candidate (a noisy pair or a "
                "weak judge); inspect these rows or use a stronger judge."
            )
        if self.removed_as_positive > 2 * queries:
            hints.append(
                f"{self.removed_as_positive / queries:.1f} pool items per query were the positive or a duplicate "
                "of it: the pool holds many repeated targets; deduplicate it."
            )
        return hints
