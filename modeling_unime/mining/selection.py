"""Judging and selection (arXiv 2510.13515, "MLLM-as-a-Judge for Hard Negatives Mining"): global top-k retrieval, judge
scores of the positive and every candidate, the false-negative filter, cyclical sampling; the in-memory entry point
`mine_hard_negatives` and the report of a run."""

from __future__ import annotations

import os
import random
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset

from ..data import UNIME_FEATURES, JudgeRow, task_from_image_path
from ..judge import Judge
from ..util.embedding_cache import Item
from ..util.retrieval import chunked_top_k, faiss_top_k
from .config import MiningConfig
from .inputs import MiningEmbeddings, MiningInputs, count_duplicate_rows, embed_inputs
from .judging import CachedJudge, RootedJudge, judge_fingerprint
from .rules import cyclical_sample, false_negative_filter
from .stats import SelectionStats


class DegenerateMiningWarning(UserWarning):
    """The selection is degenerate (`SelectionStats.degenerate_warnings`): raised as a warning by runs that print no
    report (``verbose=False``); a printed report ends with a WARNING block instead."""


def select_negatives(
    row_index: int,
    inputs: MiningInputs,
    candidates: Sequence[Item],
    judge: Judge,
    config: MiningConfig,
    stats: SelectionStats,
) -> JudgeRow | None:
    """Judge one row's retrieved candidates, filter false negatives, sample; the output row, or None if dropped."""
    row, query, positive = inputs.rows[row_index], inputs.queries[row_index], inputs.positives[row_index]
    judged = judge.score(query[0], query[1], [positive, *candidates]).tolist()
    positive_score, candidate_scores = judged[0], judged[1:]
    keep = false_negative_filter(candidate_scores, positive_score, config.beta).tolist() if candidates else []
    stats.update(
        candidates_judged=len(candidate_scores),
        candidates_below_positive=sum(score < positive_score for score in candidate_scores),
        score_gap=sum(abs(positive_score - score) for score in candidate_scores),
    )
    ranked = [position for position, kept in enumerate(keep) if kept]
    positions, used_fallback = cyclical_sample(
        len(ranked), config.num_negatives, config.interval, config.empty_fallback,
        fallback_pool=len(candidates), rng=random.Random(config.seed * 1_000_003 + row_index),
    )
    dropped = used_fallback and not positions
    stats.update(
        queries=1,
        removed_as_false_negative=len(candidates) - len(ranked),
        used_fallback=used_fallback and not dropped,
        dropped=dropped,
        short_of_negatives=(0 if used_fallback else len(set(positions))) < config.num_negatives,
        positive_below_all=bool(candidate_scores) and positive_score < min(candidate_scores),
    )
    if dropped:
        return None
    if used_fallback:
        chosen = [(candidates[position], 1.0) for position in positions]
    else:
        chosen = [(candidates[ranked[position]], candidate_scores[ranked[position]]) for position in positions]
    return JudgeRow(
        query_text=query[0] or "",
        query_image=query[1],
        pos_text=positive[0] or "",
        pos_image=positive[1],
        neg_texts=[item[0] or "" for item, _ in chosen],
        neg_images=[item[1] for item, _ in chosen],
        judge_scores=[positive_score, *[score for _, score in chosen]],
        task=row.get("task") or task_from_image_path(query[1] or positive[1]) or "unknown",
        source=row.get("source") or "mine_hard_negatives",
    )


def mine_rows(
    row_indices: Sequence[int],
    inputs: MiningInputs,
    embeddings: MiningEmbeddings,
    judge: Judge,
    config: MiningConfig,
    stats: SelectionStats,
) -> list[JudgeRow]:
    """Retrieval, judging and selection for some rows of the inputs (one shard, or all of them)."""
    search = dict(exclude=[inputs.excluded[index] for index in row_indices],
                  similarity_threshold=config.similarity_threshold, stats=stats)
    pool_embeddings = embeddings.pool
    # The queries of these rows join the pool on its device (the embedder's: see `retrieval_device`).
    shard_queries = embeddings.queries[list(row_indices)].to(pool_embeddings.device)
    if config.retrieval == "faiss":
        _, indices = faiss_top_k(shard_queries, pool_embeddings, config.top_k, **search)
    else:
        _, indices = chunked_top_k(shard_queries, pool_embeddings, config.top_k, config.chunk_size, **search)
    indices = indices.cpu()
    mined = []
    for position, row_index in enumerate(row_indices):
        candidates = [inputs.pool[index] for index in indices[position].tolist() if index >= 0]
        selected = select_negatives(row_index, inputs, candidates, judge, config, stats)
        if selected is not None:
            mined.append(selected)
    return mined


def to_dataset(mined: Sequence[JudgeRow]) -> Dataset:
    """The mined rows as a dataset with the `UNIME_FEATURES` columns."""
    return Dataset.from_dict({name: [row[name] for row in mined] for name in UNIME_FEATURES}, features=UNIME_FEATURES)


def mine_hard_negatives(
    dataset: Dataset,
    embedder: Any,
    judge: Judge,
    *,
    pool: Sequence[Item] | None = None,
    config: MiningConfig | None = None,
    image_root: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    verbose: bool = True,
    **config_overrides: Any,
) -> tuple[Dataset, SelectionStats]:
    """Mine judge-scored hard negatives for every (query, positive) row, in memory and in one process.

    Args:
        dataset: rows with ``query_text``, ``query_image``, ``pos_text``, ``pos_image`` (image paths or None), and
            optionally ``task`` and ``source``.
        embedder: anything with ``encode(texts=, images=, image_root=, batch_size=)`` returning L2-normalised rows
            (a `UniMEV2Model`).
        judge: a `modeling_unime.judge.Judge` (an `MLLMJudge`, a ``ServerJudge``...). It receives image paths
            resolved under ``image_root``; the judge object itself is left as it is.
        pool: candidate (text, image) items; default: every positive of the dataset, deduplicated.
        config: a `MiningConfig`; keyword overrides (``top_k=``, ``beta=``...) are applied on top.
        image_root: the folder the image paths of the rows and the pool are relative to.
        cache_dir: keep embeddings and judge scores on disk there, keyed by model and content, so a repeated
            call (or one after a crash) recomputes nothing it already has.

    Returns:
        (dataset in the package schema, selection statistics). The summary is printed when ``verbose``.

    Example:
        >>> from modeling_unime.judge import MLLMJudge
        >>> from modeling_unime.tiny import build_tiny_unime, build_tiny_judge
        >>> rows = Dataset.from_list([{"query_text": f"q{i}", "query_image": None, "pos_text": f"answer {i}",
        ...                            "pos_image": None} for i in range(4)])
        >>> embedder, processor = build_tiny_unime("qwen2_vl"); embedder.processor = processor
        >>> mined, stats = mine_hard_negatives(rows, embedder, MLLMJudge(*build_tiny_judge()), top_k=3,
        ...                                    num_negatives=2, verbose=False)
        >>> len(mined), len(mined[0]["judge_scores"])
        (4, 3)
    """
    config = MiningConfig(**{**asdict(config or MiningConfig()), **config_overrides})
    inputs = MiningInputs.from_dataset(dataset, pool, image_root)
    timings = {}
    start = time.perf_counter()
    embeddings = embed_inputs(embedder, inputs, image_root, config.batch_size,
                              None if cache_dir is None else Path(cache_dir) / "embeddings")
    if cache_dir is None:
        scorer: Judge = RootedJudge(judge, image_root)
    else:
        scorer = CachedJudge(judge, Path(cache_dir) / "judge", judge_fingerprint(judge), image_root=image_root)
    timings["embedding"] = time.perf_counter() - start
    stats = SelectionStats(num_negatives=config.num_negatives)
    stats.update(duplicate_rows=count_duplicate_rows(inputs.queries, inputs.positives))
    start = time.perf_counter()
    mined = mine_rows(range(len(inputs)), inputs, embeddings, scorer, config, stats)
    timings["retrieval, judge and selection"] = time.perf_counter() - start
    result = to_dataset(mined)
    if verbose:
        print(mining_report(stats, result, timings, beta=config.beta))
    else:
        warn_degenerate(stats, config.beta)
    return result, stats


def mining_report(
    stats: SelectionStats,
    dataset: Dataset,
    timings: dict[str, float],
    beta: float | None = None,
    extra_lines: Sequence[str] = (),
) -> str:
    """The selection summary, the time per stage, a histogram of the negatives' judge scores, ``extra_lines``, and
    last, when the run is degenerate (`SelectionStats.degenerate_warnings`), a WARNING block saying why and what to
    do."""
    negative_scores = [score for scores in dataset["judge_scores"] for score in scores[1:]] if len(dataset) else []
    histogram = torch.histc(torch.tensor(negative_scores or [0.0], dtype=torch.float64), bins=10, min=0, max=1)
    if not negative_scores:
        histogram.zero_()
    lines = [
        stats.summary(beta, warnings=False),
        f"rows written: {len(dataset)}",
        "time per stage: " + ", ".join(f"{stage} {seconds:.1f}s" for stage, seconds in timings.items()),
        "negative judge-score histogram (10 bins over [0, 1]): " + " ".join(str(int(count)) for count in histogram),
        *extra_lines,
    ]
    block = stats.warning_block(beta)
    if block:
        lines.append(block)
    return "\n".join(lines)


def warn_degenerate(stats: SelectionStats, beta: float, where: Path | None = None) -> None:
    """A `DegenerateMiningWarning` when the selection is degenerate (for runs that print no report)."""
    problems = stats.degenerate_warnings(beta)
    if problems:
        warnings.warn(
            "degenerate mining run: " + " ".join(problems) + (f" Details and what to do: {where}." if where else
                                                              " See stats.summary() for what to do."),
            DegenerateMiningWarning, stacklevel=3,
        )
