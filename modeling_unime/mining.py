"""MLLM-as-a-Judge hard-negative mining (method.md (a)-(d)), in one process.

global retrieval with an embedder -> judge scores of (query, positive) and every (query, candidate) -> false-negative
filter -> cyclical sampling -> a ``datasets.Dataset`` in the package schema with ``judge_scores`` (index 0 = positive).

Not in this module yet: sharding over processes, resumable shards and the on-disk caches of the recipe (see the
mining issue); a run here is in-memory and single-process.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Sequence
from typing import Any

import torch
from datasets import Dataset

from .data import UNIME_FEATURES, task_from_image_path
from .judge import MLLMJudge
from .negative_selection import SelectionStats, cyclical_sample, false_negative_filter, streaming_top_k

Item = tuple[str | None, str | None]


def _image_key(image: Any) -> str | None:
    if image is None or image == "":
        return None
    if not isinstance(image, str):
        raise ValueError("mine_hard_negatives takes image paths (strings) or None; PIL images cannot be deduplicated.")
    return image


def mine_hard_negatives(
    dataset: Dataset,
    embedder: Any,
    judge: MLLMJudge,
    pool: Sequence[Item] | None = None,
    top_k: int = 50,
    similarity_threshold: float | None = None,
    beta: float = 0.01,
    num_negatives: int = 10,
    interval: int = 5,
    empty_fallback: str = "paper",
    seed: int = 0,
    image_root: str | os.PathLike | None = None,
    batch_size: int = 16,
    chunk_size: int = 1024,
    verbose: bool = True,
) -> tuple[Dataset, SelectionStats]:
    """Mine judge-scored hard negatives for every (query, positive) row.

    Args:
        dataset: rows with ``query_text``, ``query_image``, ``pos_text``, ``pos_image`` (image paths or None), and
            optionally ``task``.
        embedder: anything with ``encode(texts=, images=, image_root=, batch_size=)`` returning L2-normalised rows
            (a `UniMEV2Model`).
        judge: an `MLLMJudge`.
        pool: candidate (text, image) items; default: every positive of the dataset, deduplicated.
        top_k: candidates retrieved per query (the paper's 50).
        similarity_threshold: drop candidates with cosine >= delta (off by default; the paper's value is unpublished).
        beta: false-negative margin: a candidate scoring above s_pos - beta is dropped.
        num_negatives, interval: cyclical sampling (10 negatives, step 5).
        empty_fallback: "paper" (10 random retrieved candidates, each scored 1.0) or "drop" (skip the query).
        seed: seeds the fallback's random choice, per row, so a run is reproducible.

    Returns:
        (dataset in the package schema, selection statistics). The summary is printed when ``verbose``.

    Example:
        >>> from modeling_unime.testing import build_tiny_unime, build_tiny_judge
        >>> rows = Dataset.from_list([{"query_text": f"q{i}", "query_image": None, "pos_text": f"answer {i}",
        ...                            "pos_image": None} for i in range(4)])
        >>> embedder, processor = build_tiny_unime("qwen2_vl"); embedder.processor = processor
        >>> mined, stats = mine_hard_negatives(rows, embedder, MLLMJudge(*build_tiny_judge()), top_k=3,
        ...                                    num_negatives=2, verbose=False)
        >>> len(mined), len(mined[0]["judge_scores"])
        (4, 3)
    """
    if len(dataset) == 0:
        raise ValueError("The dataset is empty: nothing to mine.")
    for column in ("query_text", "query_image", "pos_text", "pos_image"):
        if column not in dataset.column_names:
            raise ValueError(f"The dataset has no {column!r} column; it needs query_text/query_image/pos_text/pos_image.")
    timings: dict[str, float] = {}
    rows = dataset.to_list()
    positives = [(row["pos_text"] or None, _image_key(row["pos_image"])) for row in rows]
    if pool is None:
        pool = list(dict.fromkeys(positives))
    else:
        pool = [(text or None, _image_key(image)) for text, image in pool]
    if not pool:
        raise ValueError("The candidate pool is empty.")
    pool_positions: dict[Item, list[int]] = {}
    for index, item in enumerate(pool):
        pool_positions.setdefault(item, []).append(index)

    start = time.perf_counter()
    encode = dict(image_root=image_root, batch_size=batch_size)
    query_embeddings = embedder.encode(
        texts=[row["query_text"] or None for row in rows], images=[_image_key(row["query_image"]) for row in rows], **encode
    )
    pool_embeddings = embedder.encode(texts=[text for text, _ in pool], images=[image for _, image in pool], **encode)
    timings["embedding"] = time.perf_counter() - start

    stats = SelectionStats(num_negatives=num_negatives)
    start = time.perf_counter()
    # The row's own positive and every exact duplicate of it in the pool are never negatives.
    exclude = [pool_positions.get(positive, []) for positive in positives]
    scores, indices = streaming_top_k(
        query_embeddings, pool_embeddings, k=top_k, chunk_size=chunk_size, exclude=exclude,
        similarity_threshold=similarity_threshold, stats=stats,
    )
    timings["retrieval"] = time.perf_counter() - start

    start = time.perf_counter()
    judge.image_root = image_root
    mined = []
    for row_index, (row, positive) in enumerate(zip(rows, positives)):
        candidates = [pool[index] for index in indices[row_index].tolist() if index >= 0]
        query = (row["query_text"] or None, _image_key(row["query_image"]))
        judged = judge.score(query[0], query[1], [positive, *candidates]).tolist()
        positive_score, candidate_scores = judged[0], judged[1:]
        keep = false_negative_filter(candidate_scores, positive_score, beta)
        ranked = [position for position, kept in enumerate(keep.tolist()) if kept]
        positions, used_fallback = cyclical_sample(
            len(ranked), num_negatives, interval, empty_fallback, fallback_pool=len(candidates),
            rng=random.Random(seed * 1_000_003 + row_index),
        )
        unique = len(set(positions)) if not used_fallback else 0
        stats.update(
            queries=1,
            removed_as_false_negative=len(candidates) - len(ranked),
            used_fallback=used_fallback and bool(positions),
            dropped=used_fallback and not positions,
            short_of_negatives=unique < num_negatives,
        )
        if used_fallback and not positions:
            continue
        if used_fallback:
            chosen = [(candidates[position], 1.0) for position in positions]
        else:
            chosen = [(candidates[ranked[position]], candidate_scores[ranked[position]]) for position in positions]
        task = row.get("task") or task_from_image_path(query[1] or positive[1]) or "unknown"
        mined.append(
            {
                "query_text": query[0] or "",
                "query_image": query[1],
                "pos_text": positive[0] or "",
                "pos_image": positive[1],
                "neg_texts": [item[0] or "" for item, _ in chosen],
                "neg_images": [item[1] for item, _ in chosen],
                "judge_scores": [positive_score, *[score for _, score in chosen]],
                "task": task,
                "source": row.get("source") or "mine_hard_negatives",
            }
        )
    timings["judge_and_selection"] = time.perf_counter() - start
    columns = {name: [row[name] for row in mined] for name in UNIME_FEATURES}
    result = Dataset.from_dict(columns, features=UNIME_FEATURES)
    if verbose:
        print(stats.summary())
        print("time per stage: " + ", ".join(f"{stage} {seconds:.1f}s" for stage, seconds in timings.items()))
        histogram = torch.histc(torch.tensor([s for row in mined for s in row["judge_scores"][1:]] or [0.0]), 10, 0, 1)
        print("negative judge-score histogram (10 bins over [0, 1]): " + " ".join(str(int(c)) for c in histogram))
    return result, stats


__all__ = ["mine_hard_negatives"]
