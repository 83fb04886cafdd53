"""MLLM-as-a-Judge hard-negative mining (method.md (a)-(d)).

global retrieval with an embedder -> judge scores of (query, positive) and every (query, candidate) -> false-negative
filter -> cyclical sampling -> a ``datasets.Dataset`` in the package schema with ``judge_scores`` (index 0 = positive).

Two entry points share the same stages:

- `mine_hard_negatives`: in memory, one process, returns the dataset;
- `run_mining`: the recipe's engine. Queries are cut into shards spread over the processes of an ``accelerate``
  launch; each finished shard is written atomically; embeddings and judge scores are cached on disk by content, so a
  killed run restarted with the same command skips finished work and gives the same dataset.

Cache keys: an embedding is keyed by the embedder's fingerprint (every byte of its weights, its config, its processor
and image rule: `model_fingerprint`, `processor_settings`) and the item (text, image path, absolute image root); a
judge score by the judge's fingerprint (weights and every scoring setting: `judge_settings`) and the pair (query,
candidate, absolute image root). A changed setting never reuses a stale entry. Caches are disposable: a damaged
embedding part, judge-log line or finished shard is reported (`DamagedCacheWarning`, naming the file) and recomputed.

The summary (printed, ``summary.txt``, ``summary.json``) ends with WARNING lines when the run is degenerate
(`SelectionStats.degenerate_warnings`: most queries on the empty-set fallback, the filter removing nearly everything,
or a judge at chance); runs that print nothing raise a `DegenerateMiningWarning` instead.
"""

from __future__ import annotations

import json
import os
import random
import time
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset

from .data import UNIME_FEATURES, task_from_image_path
from .util.embedding_cache import EmbeddingCache, cached_embeddings, embed_items, item_key, root_key
from .util.files import DamagedCacheWarning, atomic_write, warn_damaged
from .util.fingerprint import model_fingerprint, processor_settings
from .negative_selection import (
    SelectionStats,
    cyclical_sample,
    faiss_top_k,
    false_negative_filter,
    chunked_top_k,
)

Item = tuple[str | None, str | None]


@dataclass
class MiningConfig:
    """Every knob of the mining (method.md (a)-(d)); the defaults are the paper's.

    Attributes:
        top_k: candidates retrieved per query (50).
        similarity_threshold: drop candidates whose cosine with the query is >= delta (off: unpublished value).
        beta: false-negative margin: a candidate scoring above s_pos - beta is dropped (0.01, the supplement's value).
        num_negatives: negatives kept per query (10).
        interval: step of the cyclical walk over the ranked candidates (5).
        empty_fallback: "paper" (random retrieved candidates, each scored 1.0) or "drop" (skip the query).
        seed: seeds the fallback's random choice, per row, so every run and every process count agree.
        batch_size: rows per embedding batch.
        chunk_size: pool rows per similarity block of the streaming top-k.
        shard_size: queries per shard (the unit of work, of resumption and of the output files).
        retrieval: "exact" (streaming top-k in torch) or "faiss" (exact inner-product index; ``pip install
            unime-v2[faiss]``).
    """

    top_k: int = 50
    similarity_threshold: float | None = None
    beta: float = 0.01
    num_negatives: int = 10
    interval: int = 5
    empty_fallback: str = "paper"
    seed: int = 0
    batch_size: int = 16
    chunk_size: int = 1024
    shard_size: int = 256
    retrieval: str = "exact"

    def __post_init__(self) -> None:
        if self.retrieval not in ("exact", "faiss"):
            raise ValueError(f"retrieval={self.retrieval!r}: use 'exact' or 'faiss'.")


# -------------------------------------------------------------------------------------------------- inputs


def _image_key(image: Any, where: str) -> str | None:
    if image is None or image == "":
        return None
    if not isinstance(image, str):
        raise ValueError(
            f"{where}: mining takes image paths (strings) or None, got {type(image).__name__}; save images to files "
            "(relative to image_root) so that identical candidates can be recognised and cached."
        )
    return image


def read_pairs(dataset: Dataset) -> tuple[list[dict[str, Any]], list[Item], list[Item]]:
    """(rows, queries, positives) of a dataset of (query text/image, positive text/image) rows, validated."""
    if len(dataset) == 0:
        raise ValueError("The dataset is empty: nothing to mine.")
    for column in ("query_text", "query_image", "pos_text", "pos_image"):
        if column not in dataset.column_names:
            raise ValueError(f"The dataset has no {column!r} column; it needs query_text/query_image/pos_text/pos_image.")
    rows = dataset.to_list()
    queries, positives = [], []
    for index, row in enumerate(rows):
        query = (row["query_text"] or None, _image_key(row["query_image"], f"row {index} query_image"))
        positive = (row["pos_text"] or None, _image_key(row["pos_image"], f"row {index} pos_image"))
        for name, item in (("query", query), ("positive", positive)):
            if item == (None, None):
                raise ValueError(f"Row {index}: the {name} has neither text nor image.")
        queries.append(query)
        positives.append(positive)
    return rows, queries, positives


def check_images(rows: Sequence[dict[str, Any]], image_root: str | os.PathLike | None) -> None:
    """Every image path of the (query, positive) rows must exist: fail before any model runs, naming the row."""
    missing = []
    for index, row in enumerate(rows):
        for column in ("query_image", "pos_image"):
            path = row.get(column)
            if path and not os.path.isfile(os.path.join(os.fspath(image_root), path) if image_root and not os.path.isabs(path) else path):
                missing.append(f"row {index} {column} {path!r}")
    if missing:
        raise ValueError(
            f"{len(missing)} image file(s) not found under image_root={None if image_root is None else os.fspath(image_root)!r} "
            f"(first: {'; '.join(missing[:5])}). Fix the paths or pass the right image_root."
        )


def build_pool(positives: Sequence[Item], pool: Sequence[Item] | None = None) -> list[Item]:
    """The candidate pool: the given items, or every positive of the dataset, deduplicated in first-seen order."""
    if pool is None:
        return list(dict.fromkeys(positives))
    pool = [(text or None, _image_key(image, f"pool item {index}")) for index, (text, image) in enumerate(pool)]
    if not pool:
        raise ValueError("The candidate pool is empty.")
    return pool


def exclusions(pool: Sequence[Item], positives: Sequence[Item]) -> list[list[int]]:
    """For each row, the pool positions holding its own positive (every exact duplicate of it): never a negative."""
    positions: dict[Item, list[int]] = {}
    for index, item in enumerate(pool):
        positions.setdefault(item, []).append(index)
    return [positions.get(positive, []) for positive in positives]


def count_duplicate_rows(queries: Sequence[Item], positives: Sequence[Item]) -> int:
    """Rows whose (query, positive) pair appeared earlier: kept as given (their judge pairs are scored once)."""
    return len(queries) - len(set(zip(queries, positives)))


def judge_settings(judge: Any) -> dict[str, Any]:
    """Every setting of a judge, besides its weights, that changes a score: the answer rule (``official_compat``,
    ``repetition_penalty``, the Yes/No token ids and strings), the prompt (``instruction``; the chat template and a
    hash of the tokenizer) and the images (``image_resize``, the image processor's settings).

    Left out on purpose: ``batch_size`` and ``prefix_sharing`` move a score in the last bits only (padding), and
    ``image_root``, which is part of each pair's cache key instead (`CachedJudge`).
    """
    settings: dict[str, Any] = {
        name: getattr(judge, name, None)
        for name in ("official_compat", "repetition_penalty", "instruction", "image_resize", "answer_token_ids")
    }
    tokenizer = getattr(judge, "tokenizer", None)
    answer_ids = settings["answer_token_ids"]
    if tokenizer is not None and answer_ids is not None and hasattr(tokenizer, "convert_ids_to_tokens"):
        settings["answer_tokens"] = tokenizer.convert_ids_to_tokens(list(answer_ids))
    settings.update(processor_settings(getattr(judge, "processor", None), tokenizer))
    return settings


def judge_fingerprint(judge: Any) -> str:
    """Cache key of a judge's scores: its weights (every byte, `model_fingerprint`) and every setting that changes a
    score (`judge_settings`). A judge that computes its own key (``fingerprint()``: `judge_server.ServerJudge`, whose
    weights live on a server) gives it; a judge without a ``model`` is keyed by its class name."""
    own_fingerprint = getattr(judge, "fingerprint", None)
    if callable(own_fingerprint):
        return own_fingerprint()
    if not hasattr(judge, "model"):
        return type(judge).__name__
    return model_fingerprint(judge.model, judge_settings(judge))


# -------------------------------------------------------------------------------------------------- selection


def select_negatives(
    row_index: int,
    row: dict[str, Any],
    query: Item,
    positive: Item,
    candidates: Sequence[Item],
    judge: Any,
    config: MiningConfig,
    stats: SelectionStats,
) -> dict[str, Any] | None:
    """Judge one query's retrieved candidates, filter false negatives, sample; the output row, or None if dropped."""
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
    return {
        "query_text": query[0] or "",
        "query_image": query[1],
        "pos_text": positive[0] or "",
        "pos_image": positive[1],
        "neg_texts": [item[0] or "" for item, _ in chosen],
        "neg_images": [item[1] for item, _ in chosen],
        "judge_scores": [positive_score, *[score for _, score in chosen]],
        "task": row.get("task") or task_from_image_path(query[1] or positive[1]) or "unknown",
        "source": row.get("source") or "mine_hard_negatives",
    }


def mine_rows(
    row_indices: Sequence[int],
    rows: Sequence[dict[str, Any]],
    queries: Sequence[Item],
    positives: Sequence[Item],
    query_embeddings: torch.Tensor,
    pool: Sequence[Item],
    pool_embeddings: torch.Tensor,
    excluded: Sequence[Sequence[int]],
    judge: Any,
    config: MiningConfig,
    stats: SelectionStats,
) -> list[dict[str, Any]]:
    """Retrieval, judging and selection for some rows of the dataset (one shard, or all of it)."""
    search = dict(exclude=[excluded[index] for index in row_indices],
                  similarity_threshold=config.similarity_threshold, stats=stats)
    # The queries of these rows join the pool on its device (the embedder's: see `retrieval_device`).
    shard_queries = query_embeddings[list(row_indices)].to(pool_embeddings.device)
    if config.retrieval == "faiss":
        _, indices = faiss_top_k(shard_queries, pool_embeddings, config.top_k, **search)
    else:
        _, indices = chunked_top_k(shard_queries, pool_embeddings, config.top_k, config.chunk_size, **search)
    indices = indices.cpu()
    mined = []
    for position, row_index in enumerate(row_indices):
        candidates = [pool[index] for index in indices[position].tolist() if index >= 0]
        selected = select_negatives(
            row_index, rows[row_index], queries[row_index], positives[row_index], candidates, judge, config, stats
        )
        if selected is not None:
            mined.append(selected)
    return mined


def to_dataset(mined: Sequence[dict[str, Any]]) -> Dataset:
    return Dataset.from_dict({name: [row[name] for row in mined] for name in UNIME_FEATURES}, features=UNIME_FEATURES)


def mine_hard_negatives(
    dataset: Dataset,
    embedder: Any,
    judge: Any,
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
        judge: an `MLLMJudge` (or anything with ``score(query_text, query_image, candidates)``).
        pool: candidate (text, image) items; default: every positive of the dataset, deduplicated.
        config: a `MiningConfig`; keyword overrides (``top_k=``, ``beta=``...) are applied on top.
        cache_dir: keep embeddings and judge scores on disk there, keyed by model and content, so a repeated
            call (or one after a crash) recomputes nothing it already has.

    Returns:
        (dataset in the package schema, selection statistics). The summary is printed when ``verbose``.

    Example:
        >>> from modeling_unime.judge import MLLMJudge
        >>> from modeling_unime.testing import build_tiny_unime, build_tiny_judge
        >>> rows = Dataset.from_list([{"query_text": f"q{i}", "query_image": None, "pos_text": f"answer {i}",
        ...                            "pos_image": None} for i in range(4)])
        >>> embedder, processor = build_tiny_unime("qwen2_vl"); embedder.processor = processor
        >>> mined, stats = mine_hard_negatives(rows, embedder, MLLMJudge(*build_tiny_judge()), top_k=3,
        ...                                    num_negatives=2, verbose=False)
        >>> len(mined), len(mined[0]["judge_scores"])
        (4, 3)
    """
    config = MiningConfig(**{**asdict(config or MiningConfig()), **config_overrides})
    rows, queries, positives = read_pairs(dataset)
    check_images(rows, image_root)
    pool = build_pool(positives, pool)
    timings = {}
    start = time.perf_counter()
    if cache_dir is None:
        query_embeddings = embed_items(embedder, queries, image_root, config.batch_size)
        pool_embeddings = embed_items(embedder, pool, image_root, config.batch_size)
    else:
        embeddings = cached_embeddings(
            embedder, [*queries, *pool], Path(cache_dir) / "embeddings", image_root, config.batch_size
        )
        query_embeddings, pool_embeddings = embeddings[: len(queries)], embeddings[len(queries) :]
        judge = CachedJudge(judge, Path(cache_dir) / "judge", judge_fingerprint(judge))
    pool_embeddings = pool_embeddings.to(retrieval_device(embedder))
    timings["embedding"] = time.perf_counter() - start
    if hasattr(judge, "image_root"):
        judge.image_root = image_root
    stats = SelectionStats(num_negatives=config.num_negatives)
    stats.update(duplicate_rows=count_duplicate_rows(queries, positives))
    start = time.perf_counter()
    mined = mine_rows(
        range(len(rows)), rows, queries, positives, query_embeddings, pool, pool_embeddings,
        exclusions(pool, positives), judge, config, stats,
    )
    timings["retrieval, judge and selection"] = time.perf_counter() - start
    result = to_dataset(mined)
    if verbose:
        print(mining_report(stats, result, timings, beta=config.beta))
    else:
        _warn_degenerate(stats, config.beta)
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


# -------------------------------------------------------------------------------------------------- caches


class DegenerateMiningWarning(UserWarning):
    """The selection is degenerate (`SelectionStats.degenerate_warnings`): raised as a warning by runs that print no
    report (``verbose=False``); a printed report ends with a WARNING block instead."""


class CachedJudge:
    """Wraps a judge so that a (query, candidate) pair already scored, in this run or an earlier one, is not scored
    again. Scores are appended to ``<folder>/<fingerprint>/<writer>.jsonl`` after every query, one JSON object a
    line: ``key`` (hash of the query, the candidate and the absolute image root), ``score``, and the fields of
    `context` (the recipe records the ``shard`` being mined, so each log shows which shards its process mined).

    A line that cannot be read (the last line of a log cut by a kill or a full disk) is reported with a
    `DamagedCacheWarning` naming the file and line, and its pair is scored again; the writer's own log is rewritten
    without it (atomically), so that new entries never join a cut line and the damage is reported once.

    A score computed in another batch can differ from a fresh one in the last bits (different padding), never more.
    """

    def __init__(self, judge: Any, folder: str | os.PathLike, fingerprint: str, writer: str = "rank-0") -> None:
        self.judge = judge
        self.folder = Path(folder) / fingerprint
        self.folder.mkdir(parents=True, exist_ok=True)
        self.log = self.folder / f"{writer}.jsonl"
        self.scores: dict[str, float] = {}
        self.pairs_scored = 0
        self.pairs_from_cache = 0
        self.context: dict[str, Any] = {}
        self._image_root = root_key(getattr(judge, "image_root", None))
        self.reload()
        self._repair_own_log()

    @property
    def image_root(self) -> Any:
        return getattr(self.judge, "image_root", self._image_root)

    @image_root.setter
    def image_root(self, value: Any) -> None:
        self.judge.image_root = value
        self._image_root = root_key(value)

    @staticmethod
    def _read_log(log: Path) -> tuple[list[tuple[str, float, str]], list[tuple[int, str]]]:
        """((key, score, line) of every readable line, (line number, problem) of every damaged one) of a log."""
        entries, damaged = [], []
        text = log.read_bytes().decode("utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                entries.append((entry["key"], float(entry["score"]), line))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
                damaged.append((number, f"{type(error).__name__}: {line[:80]!r}"))
        return entries, damaged

    def reload(self) -> None:
        """Read every log of the folder; a damaged line is reported (file and line) and its pair scored again."""
        for log in sorted(self.folder.glob("*.jsonl")):
            try:
                entries, damaged = self._read_log(log)
            except FileNotFoundError:
                continue
            for number, problem in damaged:
                warn_damaged(log, f"judge log line {number}", problem,
                              "the line is ignored and its pair is scored again.")
            self.scores.update((key, score) for key, score, _ in entries)

    def _repair_own_log(self) -> None:
        """Rewrite this writer's log without its damaged lines (atomically) if it has any or its last line lacks a
        newline, so that new entries never join a cut line and the damage is reported once."""
        if not self.log.exists() or not self.log.stat().st_size:
            return
        with self.log.open("rb") as handle:
            handle.seek(-1, os.SEEK_END)
            ends_a_line = handle.read(1) == b"\n"
        entries, damaged = self._read_log(self.log)
        if damaged or not ends_a_line:
            text = "".join(line + "\n" for _, _, line in entries)
            atomic_write(self.log, lambda temporary: temporary.write_text(text, encoding="utf-8"))

    def key(self, query_text: str | None, query_image: str | None, candidate: Item) -> str:
        """Cache key of one pair: the query, the candidate and the absolute image root their paths are under."""
        return item_key(query_text, query_image, candidate[0], candidate[1], self._image_root)

    def score(self, query_text: str | None, query_image: str | None, candidates: Sequence[Item]) -> torch.Tensor:
        keys = [self.key(query_text, query_image, candidate) for candidate in candidates]
        missing = [index for index, key in enumerate(keys) if key not in self.scores]
        unique_missing = list({keys[index]: index for index in reversed(missing)}.values())[::-1]
        if unique_missing:
            fresh = self.judge.score(query_text, query_image, [candidates[index] for index in unique_missing]).tolist()
            with self.log.open("a", encoding="utf-8") as log:
                for index, score in zip(unique_missing, fresh):
                    self.scores[keys[index]] = score
                    log.write(json.dumps({"key": keys[index], "score": score, **self.context}) + "\n")
        self.pairs_scored += len(unique_missing)
        self.pairs_from_cache += len(candidates) - len(unique_missing)
        return torch.tensor([self.scores[key] for key in keys], dtype=torch.float64)


# -------------------------------------------------------------------------------------------------- sharded runs


def distributed_state() -> Any:
    """The ``accelerate`` state of this process (`modeling_unime.placement.process_state`). Without an accelerator it
    is asked for CPU explicitly: otherwise each process of ``accelerate launch --multi_gpu`` on a CPU machine
    believes it is alone and mines everything."""
    from .placement import process_state

    return process_state()


def retrieval_device(embedder: Any) -> torch.device:
    """Where the similarity search runs: the embedder's device (a GPU makes the top-k over a 600K pool take seconds
    instead of CPU hours), CPU for anything that is not a torch module."""
    if isinstance(embedder, torch.nn.Module):
        parameter = next(embedder.parameters(), None)
        if parameter is not None:
            return parameter.device
    return torch.device("cpu")


def run_mining(
    dataset: Dataset,
    embedder: Any,
    judge: Any,
    output_dir: str | os.PathLike,
    config: MiningConfig | None = None,
    pool: Sequence[Item] | None = None,
    image_root: str | os.PathLike | None = None,
    state: Any = None,
    verbose: bool = True,
) -> Dataset | None:
    """Resumable, multi-process mining into ``output_dir``; the merged dataset on the main process, else None.

    Layout of ``output_dir``: ``cache/embeddings``, ``cache/judge`` (content-keyed caches; each process appends to
    its own ``rank-<i>.jsonl``, every entry with the shard it was scored for), ``shards/shard-*.json`` (finished
    shards: rows, statistics, settings, ``mined_by``: the process that mined it), ``dataset/`` (the merged dataset,
    ``save_to_disk``), ``summary.txt`` (the report) and ``summary.json`` (the merged statistics, which are the sums of
    the shards', the degenerate-run reasons, and per shard its counts and process).
    ``state`` is an ``accelerate.PartialState`` (built when None): shard s goes to process s % num_processes
    (`shards_of_process`), and only that process mines it.

    Example:
        >>> from modeling_unime.judge import MLLMJudge
        >>> from modeling_unime.testing import build_tiny_unime, build_tiny_judge
        >>> import tempfile
        >>> rows = Dataset.from_list([{"query_text": f"q{i}", "query_image": None, "pos_text": f"answer {i}",
        ...                            "pos_image": None} for i in range(4)])
        >>> embedder, processor = build_tiny_unime("qwen2_vl"); embedder.processor = processor
        >>> mined = run_mining(rows, embedder, MLLMJudge(*build_tiny_judge()), tempfile.mkdtemp(),
        ...                    MiningConfig(top_k=3, num_negatives=2, shard_size=2), verbose=False)
        >>> len(mined)
        4
    """
    state = state or distributed_state()
    config = config or MiningConfig()
    output_dir = Path(output_dir)
    shards_dir = output_dir / "shards"
    shards_dir.mkdir(parents=True, exist_ok=True)
    rows, queries, positives = read_pairs(dataset)
    check_images(rows, image_root)
    pool = build_pool(positives, pool)
    timings = {}

    start = time.perf_counter()
    embeddings = cached_embeddings(
        embedder, [*queries, *pool], output_dir / "cache" / "embeddings", image_root, config.batch_size, state
    )
    query_embeddings, pool_embeddings = embeddings[: len(queries)], embeddings[len(queries) :]
    pool_embeddings = pool_embeddings.to(retrieval_device(embedder))
    timings["embedding"] = time.perf_counter() - start

    start = time.perf_counter()
    cached_judge = CachedJudge(
        judge, output_dir / "cache" / "judge", judge_fingerprint(judge), f"rank-{state.process_index}"
    )
    cached_judge.image_root = image_root
    state.wait_for_everyone()  # every process has read the judge logs before any process appends to them
    excluded = exclusions(pool, positives)
    shard_count = (len(rows) + config.shard_size - 1) // config.shard_size
    for shard in shards_of_process(shard_count, state.process_index, state.num_processes):
        path = shard_path(shards_dir, shard)
        indices = shard_rows(shard, config.shard_size, len(rows))
        if path.exists() and read_shard(path, len(indices)) is not None:
            continue
        stats = SelectionStats(num_negatives=config.num_negatives)
        cached_judge.context = {"shard": shard}
        scored_before, cached_before = cached_judge.pairs_scored, cached_judge.pairs_from_cache
        mined = mine_rows(indices, rows, queries, positives, query_embeddings, pool, pool_embeddings, excluded,
                          cached_judge, config, stats)
        payload = json.dumps({
            "rows": mined, "stats": asdict(stats), "config": asdict(config),
            "mined_by": {"process_index": state.process_index, "num_processes": state.num_processes},
            "judge_pairs": {"scored": cached_judge.pairs_scored - scored_before,
                            "from_cache": cached_judge.pairs_from_cache - cached_before},
        }, ensure_ascii=False)
        atomic_write(path, lambda temporary: temporary.write_text(payload, encoding="utf-8"))
    cached_judge.context = {}
    timings["retrieval, judge and selection"] = time.perf_counter() - start
    state.wait_for_everyone()
    if not state.is_main_process:
        return None

    mined, stats = [], SelectionStats(num_negatives=config.num_negatives)
    stats.update(duplicate_rows=count_duplicate_rows(queries, positives))
    shard_records = []
    for shard in range(shard_count):
        path = shard_path(shards_dir, shard)
        content = read_shard(path, len(shard_rows(shard, config.shard_size, len(rows))))
        if content is None:
            raise RuntimeError(
                f"{path} is missing or damaged after every process finished (see the warning above); run the same "
                "command again: it mines that shard again and reuses everything else."
            )
        if content["config"] != asdict(config):
            raise ValueError(
                f"{path} was mined with other settings ({content['config']}); use a new output_dir or delete the "
                "shards folder to mine again."
            )
        mined.extend(content["rows"])
        shard_stats = SelectionStats(**content["stats"])
        stats = stats.merge(shard_stats)
        shard_records.append({"shard": shard, "queries": shard_stats.queries, "rows": len(content["rows"]),
                              "mined_by": content.get("mined_by"), "judge_pairs": content.get("judge_pairs")})
    result = to_dataset(mined)
    final = output_dir / "dataset"
    staging = output_dir / f".dataset-{uuid.uuid4().hex}"
    result.save_to_disk(str(staging))
    if final.exists():
        import shutil

        shutil.rmtree(final)
    os.replace(staging, final)
    by_process: dict[Any, list[int]] = {}
    for record in shard_records:
        by_process.setdefault((record["mined_by"] or {}).get("process_index", "?"), []).append(record["shard"])
    extra = [
        "shards mined per process: " + "; ".join(
            f"process {rank}: {len(shards)} ({', '.join(map(str, shards))})" for rank, shards in sorted(
                by_process.items(), key=lambda item: str(item[0]))),
        f"judge pairs scored by this process: {cached_judge.pairs_scored}, from cache: {cached_judge.pairs_from_cache}",
    ]
    report = mining_report(stats, result, timings, beta=config.beta, extra_lines=extra)
    (output_dir / "summary.txt").write_text(report + "\n", encoding="utf-8")
    summary = {"rows_written": len(result), "stats": asdict(stats),
               "degenerate": stats.degenerate_warnings(config.beta), "config": asdict(config),
               "shards": shard_records, "seconds": timings}
    atomic_write(output_dir / "summary.json",
                  lambda temporary: temporary.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8"))
    if verbose:
        print(report)
    else:
        _warn_degenerate(stats, config.beta, output_dir / "summary.txt")
    return result


def shard_path(shards_dir: Path, shard: int) -> Path:
    """The finished-shard file of shard ``shard``."""
    return shards_dir / f"shard-{shard:05d}.json"


def shard_rows(shard: int, shard_size: int, row_count: int) -> range:
    """The dataset rows of shard ``shard``."""
    return range(shard * shard_size, min((shard + 1) * shard_size, row_count))


def shards_of_process(shard_count: int, process_index: int, num_processes: int) -> range:
    """The shards process ``process_index`` mines: every ``num_processes``-th, from its own index (shard s belongs to
    process s % num_processes), so each shard is mined by exactly one process."""
    return range(process_index, shard_count, num_processes)


def read_shard(path: Path, expected_queries: int) -> dict[str, Any] | None:
    """A finished shard's content, or None when the file is missing or damaged (cut, not JSON, missing fields, or
    counts that do not add up to the shard's ``expected_queries`` queries). A damaged file is reported with a
    `DamagedCacheWarning` naming it and removed, so that its shard is mined again."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        problem: str | None = f"{type(error).__name__}: {error}"
    else:
        problem = _shard_problem(content, expected_queries)
    if problem is None:
        return content
    warn_damaged(path, "finished-shard file", problem, "it was removed and its shard is mined again.")
    path.unlink(missing_ok=True)
    return None


def _shard_problem(content: Any, expected_queries: int) -> str | None:
    if not isinstance(content, dict) or not all(
        isinstance(content.get(name), kind) for name, kind in (("rows", list), ("stats", dict), ("config", dict))
    ):
        return "not a shard: it needs 'rows', 'stats' and 'config'"
    try:
        stats = SelectionStats(**content["stats"])
    except TypeError as error:
        return f"unreadable statistics ({error})"
    if stats.queries != expected_queries:
        return f"its statistics count {stats.queries} queries, the shard has {expected_queries}"
    if len(content["rows"]) != stats.queries - stats.queries_dropped:
        return f"{len(content['rows'])} rows for {stats.queries} queries of which {stats.queries_dropped} were dropped"
    return None


def _warn_degenerate(stats: SelectionStats, beta: float, where: Path | None = None) -> None:
    """A `DegenerateMiningWarning` when the selection is degenerate (for runs that print no report)."""
    problems = stats.degenerate_warnings(beta)
    if problems:
        warnings.warn(
            "degenerate mining run: " + " ".join(problems) + (f" Details and what to do: {where}." if where else
                                                              " See stats.summary() for what to do."),
            DegenerateMiningWarning, stacklevel=3,
        )


def write_hub_folder(dataset: Dataset, card: str, folder: str | os.PathLike) -> Path:
    """The folder a Hub dataset repo receives: ``README.md`` (the card) and ``data/train-00000-of-00001.parquet``."""
    folder = Path(folder)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    dataset.to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    (folder / "README.md").write_text(card, encoding="utf-8")
    return folder


def push_mined_dataset(
    dataset: Dataset, card: str, repo_id: str, folder: str | os.PathLike, token: str | None = None,
    private: bool = False,
) -> str:
    """Write the Hub folder, create the dataset repo if needed and upload the folder; returns the commit URL."""
    from huggingface_hub import HfApi

    folder = write_hub_folder(dataset, card, folder)
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    commit = api.upload_folder(
        folder_path=str(folder), repo_id=repo_id, repo_type="dataset",
        commit_message=f"Hard negatives mined with unime-v2 ({len(dataset)} rows)",
    )
    return str(getattr(commit, "commit_url", commit))


__all__ = [
    "DamagedCacheWarning",
    "DegenerateMiningWarning",
    "judge_settings",
    "processor_settings",
    "read_shard",
    "shards_of_process",
    "write_hub_folder",
    "push_mined_dataset",
    "MiningConfig",
    "mine_hard_negatives",
    "run_mining",
    "distributed_state",
    "retrieval_device",
    "read_pairs",
    "check_images",
    "build_pool",
    "exclusions",
    "select_negatives",
    "mine_rows",
    "mining_report",
    "model_fingerprint",
    "judge_fingerprint",
    "cached_embeddings",
    "count_duplicate_rows",
    "EmbeddingCache",
    "CachedJudge",
]
