"""Re-ordering the head of a ranking with a reranker: the rerank stage of MMEB, retrieval and SugarCrepe."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["rerank_head"]


def rerank_head(
    ranking: Sequence[int],
    query_item: Any,
    candidate_items: Sequence[Any],
    reranker: Any,
    top_k: int = 10,
    image_root: str | os.PathLike | None = None,
    mode: str = "listwise",
    query_index: int = 0,
) -> list[int]:
    """``ranking`` (candidate indices, best first) with its first ``top_k`` re-ordered by the reranker.

    ``reranker.rerank(query_item, head_items, mode=mode, image_root=image_root)`` returns ``(order, scores)``:
    positions into the head, best first; positions it leaves out keep the embedder's order after those it lists.
    An order that is not distinct positions into the head raises ValueError naming ``query_index``.

    Example:
        >>> class Reverse:
        ...     def rerank(self, query, candidates, mode, image_root):
        ...         return list(range(len(candidates)))[::-1], None
        >>> rerank_head([4, 3, 2, 1, 0], ("q", None), [(str(i), None) for i in range(5)], Reverse(), top_k=3)
        [2, 3, 4, 1, 0]
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}.")
    head, tail = list(ranking[:top_k]), list(ranking[top_k:])
    order, _ = reranker.rerank(query_item, [candidate_items[index] for index in head], mode=mode, image_root=image_root)
    positions = [int(position) for position in (order.tolist() if isinstance(order, torch.Tensor) else order)]
    if any(not 0 <= position < len(head) for position in positions) or len(set(positions)) != len(positions):
        raise ValueError(
            f"Query {query_index}: the reranker returned order {positions}, which is not a list of distinct "
            f"positions into its {len(head)} candidates."
        )
    chosen = set(positions)
    return [head[position] for position in positions] + [index for position, index in enumerate(head)
                                                            if position not in chosen] + tail
