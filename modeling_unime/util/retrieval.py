"""Nearest-neighbour search over embeddings: one chunked top-k for mining and evaluation.

`chunked_top_k` is the exact search of UniME-V2's global retrieval (paper "MLLM-as-a-Judge for Hard Negatives Mining",
Eq. 1: the top-k most similar pool items of each query, dropping near-duplicates at similarity >= delta and the query's
own positive) and of every retrieval benchmark: queries and pool are cut into chunks, so the full (queries x pool) score
matrix is never formed, and equal scores rank by lower pool index whatever the chunk sizes. Half-precision embeddings
are scored in float32. `faiss_top_k` is the same contract through a faiss index. The layout follows
sentence-transformers' ``util/retrieval.py`` (``semantic_search``: query and corpus chunk sizes, a running top-k merged
per block).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["chunked_top_k", "faiss_top_k"]


def chunked_top_k(
    query_embeddings: torch.Tensor,
    pool_embeddings: torch.Tensor,
    k: int,
    chunk_size: int = 1024,
    exclude: Sequence[int | Iterable[int] | None] | None = None,
    similarity_threshold: float | None = None,
    *,
    query_chunk_size: int | None = None,
    stats: Any = None,
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
        >>> scores, indices = chunked_top_k(queries, pool, k=2, chunk_size=2, exclude=[[0], [2]])
        >>> indices.tolist()
        [[1, 2], [1, 0]]
        >>> scores
        tensor([[0.6000, 0.0000],
                [0.8000, 0.0000]])
        >>> scores, indices = chunked_top_k(queries, pool, k=2, exclude=[0, 2], similarity_threshold=0.7)
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
    # At least float32: bf16 scores tie far more often and would rank by index where float32 still tells them apart.
    dtype = torch.promote_types(torch.promote_types(query_embeddings.dtype, pool_embeddings.dtype), torch.float32)
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
    stats: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`chunked_top_k` through a faiss exact inner-product index (``pip install faiss-cpu``), same contract.

    faiss blocks the search itself and is faster on large pools; equal similarities may come out in another order
    than `chunked_top_k`'s lower-index-first rule where they straddle the k-th place. The search widens until
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
    stats: Any, top_indices: torch.Tensor, threshold_hits: torch.Tensor, exclusion_rows: np.ndarray
) -> None:
    if stats is None:
        return
    stats.update(
        candidates_retrieved=int((top_indices >= 0).sum()),
        removed_by_threshold=int(threshold_hits),
        removed_as_positive=int(exclusion_rows.size),
    )
