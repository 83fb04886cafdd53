"""`run_mining`: the recipe's engine. Queries are cut into shards spread over the processes of an ``accelerate``
launch (shard s goes to process s % num_processes); each finished shard is written atomically; embeddings and judge
scores are cached on disk by content, so a killed run restarted with the same command skips finished work and gives
the same dataset."""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from datasets import Dataset

from ..judge import Judge
from ..placement import process_state
from ..util.embedding_cache import Item
from ..util.files import atomic_write, warn_damaged
from .cascade import JudgeCalibration, calibration_rows
from .config import MiningConfig
from .inputs import MiningInputs, count_duplicate_rows, embed_inputs
from .judging import CachedJudge, judge_fingerprint
from .selection import (
    check_cheap_judge,
    fit_calibration,
    judge_in_full,
    judge_progress,
    judged_pairs_dataset,
    mine_rows,
    mining_judge_agreement,
    mining_judge_audit,
    mining_report,
    render_judge_agreement,
    render_judge_audit,
    to_dataset,
    warn_degenerate,
)
from .stats import SelectionStats

__all__ = ["read_shard", "run_mining", "shard_path", "shard_rows", "shards_of_process"]


def run_mining(
    dataset: Dataset,
    embedder: Any,
    judge: Judge,
    output_dir: str | os.PathLike,
    config: MiningConfig | None = None,
    *,
    pool: Sequence[Item] | None = None,
    image_root: str | os.PathLike | None = None,
    state: Any = None,
    verbose: bool = True,
    cheap_judge: Judge | None = None,
) -> Dataset | None:
    """Resumable, multi-process mining into ``output_dir``; the merged dataset on the main process, else None.

    Layout of ``output_dir``: ``cache/embeddings``, ``cache/judge`` (content-keyed caches; each process appends to
    its own ``rank-<i>.jsonl``, every entry with the shard it was scored for), ``shards/shard-*.json`` (finished
    shards: rows, statistics, settings, ``mined_by``: the process that mined it), ``dataset/`` (the merged dataset,
    ``save_to_disk``), ``summary.txt`` (the report) and ``summary.json`` (the merged statistics, which are the sums of
    the shards', the degenerate-run reasons, and per shard its counts and process).
    ``state`` is an ``accelerate.PartialState`` (built when None): shard s goes to process s % num_processes
    (`shards_of_process`), and only that process mines it. ``cheap_judge``: the cascade's cheap stage (see
    `modeling_unime.mining.selection.mine_with_pairs`), cached under ``cache/cheap_judge``.

    Example:
        >>> from modeling_unime.judge import MLLMJudge
        >>> from modeling_unime.tiny import build_tiny_unime, build_tiny_judge
        >>> import tempfile
        >>> rows = Dataset.from_list([{"query_text": f"q{i}", "query_image": None, "pos_text": f"answer {i}",
        ...                            "pos_image": None} for i in range(4)])
        >>> embedder, processor = build_tiny_unime("qwen2_vl"); embedder.processor = processor
        >>> mined = run_mining(rows, embedder, MLLMJudge(*build_tiny_judge()), tempfile.mkdtemp(),
        ...                    MiningConfig(top_k=3, num_negatives=2, shard_size=2), verbose=False)
        >>> len(mined)
        4
    """
    state = state or process_state()
    config = config or MiningConfig()
    check_cheap_judge(cheap_judge, config)
    output_dir = Path(output_dir)
    shards_dir = output_dir / "shards"
    shards_dir.mkdir(parents=True, exist_ok=True)
    inputs = MiningInputs.from_dataset(dataset, pool, image_root)
    row_count = len(inputs)
    timings = {}

    start = time.perf_counter()
    embeddings = embed_inputs(embedder, inputs, image_root, config.batch_size, output_dir / "cache" / "embeddings",
                              state)
    timings["embedding"] = time.perf_counter() - start

    start = time.perf_counter()
    cached_judge = CachedJudge(judge, output_dir / "cache" / "judge", judge_fingerprint(judge),
                               f"rank-{state.process_index}", image_root=image_root)
    cheap = None if cheap_judge is None else CachedJudge(
        cheap_judge, output_dir / "cache" / "cheap_judge", judge_fingerprint(cheap_judge),
        f"rank-{state.process_index}", image_root=image_root)
    cheap_fingerprint = None if cheap_judge is None else judge_fingerprint(cheap_judge)
    state.wait_for_everyone()  # every process has read the judge logs before any process appends to them
    calibration, calibration_indices = None, []
    if config.judge_mode != "full":
        calibration, calibration_indices = calibrate(inputs, embeddings, cached_judge, config, state, cheap)
        timings["calibration"] = time.perf_counter() - start
        start = time.perf_counter()
        if state.is_main_process:
            content = json.dumps({"rows": calibration_indices, **calibration.to_dict()}, indent=1)
            atomic_write(output_dir / "calibration.json", lambda temporary: temporary.write_text(content))
    shard_count = (row_count + config.shard_size - 1) // config.shard_size
    pending = [shard for shard in shards_of_process(shard_count, state.process_index, state.num_processes)
               if not (shard_path(shards_dir, shard).exists()
                       and read_shard(shard_path(shards_dir, shard), len(shard_rows(shard, config.shard_size,
                                                                                      row_count))) is not None)]
    total_pairs = sum(len(shard_rows(shard, config.shard_size, row_count)) for shard in pending)
    total_pairs *= 1 + min(config.top_k, len(inputs.pool))
    description = f"judge (process {state.process_index})" if state.num_processes > 1 else "judge"
    with judge_progress(total_pairs, description, position=state.process_index) as bar:
        for shard in pending:
            path = shard_path(shards_dir, shard)
            indices = shard_rows(shard, config.shard_size, row_count)
            stats = SelectionStats(num_negatives=config.num_negatives)
            cached_judge.context = {"shard": shard}
            scored_before, cached_before = cached_judge.pairs_scored, cached_judge.pairs_from_cache
            pairs: list[dict[str, Any]] = []
            mined = mine_rows(indices, inputs, embeddings, cached_judge, config, stats, calibration=calibration,
                              calibration_indices=calibration_indices, pairs=pairs, progress=bar, cheap_judge=cheap)
            if shard == 0 and calibration is not None:
                stats.update(calibration_queries=len(calibration_indices))
            payload = json.dumps({
                "rows": mined, "stats": asdict(stats), "config": asdict(config), "pairs": pairs,
                "cheap_judge": cheap_fingerprint,
                "mined_by": {"process_index": state.process_index, "num_processes": state.num_processes},
                "judge_pairs": {"scored": cached_judge.pairs_scored - scored_before,
                                "from_cache": cached_judge.pairs_from_cache - cached_before},
            }, ensure_ascii=False)
            atomic_write(path, lambda temporary: temporary.write_text(payload, encoding="utf-8"))
        bar.total = bar.n
    cached_judge.context = {}
    timings["retrieval, judge and selection"] = time.perf_counter() - start
    state.wait_for_everyone()
    if not state.is_main_process:
        return None

    mined, pairs, stats = [], [], SelectionStats(num_negatives=config.num_negatives)
    stats.update(duplicate_rows=count_duplicate_rows(inputs.queries, inputs.positives))
    shard_records = []
    for shard in range(shard_count):
        path = shard_path(shards_dir, shard)
        content = read_shard(path, len(shard_rows(shard, config.shard_size, row_count)))
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
        if content.get("cheap_judge") != cheap_fingerprint:
            raise ValueError(
                f"{path} was mined with another cheap judge ({content.get('cheap_judge')}, this run: "
                f"{cheap_fingerprint}); use a new output_dir or delete the shards folder to mine again."
            )
        mined.extend(content["rows"])
        pairs.extend(content.get("pairs") or [])
        shard_stats = SelectionStats(**content["stats"])
        stats = stats.merge(shard_stats)
        shard_records.append({"shard": shard, "queries": shard_stats.queries, "rows": len(content["rows"]),
                              "mined_by": content.get("mined_by"), "judge_pairs": content.get("judge_pairs")})
    result = to_dataset(mined)
    save_dataset(result, output_dir / "dataset")
    save_dataset(judged_pairs_dataset(pairs), output_dir / "judged_pairs")
    by_process: dict[Any, list[int]] = {}
    for record in shard_records:
        by_process.setdefault((record["mined_by"] or {}).get("process_index", "?"), []).append(record["shard"])
    extra = [
        "shards mined per process: " + "; ".join(
            f"process {rank}: {len(shards)} ({', '.join(map(str, shards))})" for rank, shards in sorted(
                by_process.items(), key=lambda item: str(item[0]))),
        f"judge pairs scored by this process: {cached_judge.pairs_scored}, from cache: {cached_judge.pairs_from_cache}",
    ]
    audit = mining_judge_audit(pairs, judge)
    agreement = mining_judge_agreement(pairs, judge)
    extra += render_judge_audit(audit) + render_judge_agreement(agreement)
    report = mining_report(stats, result, timings, beta=config.beta, extra_lines=extra)
    (output_dir / "summary.txt").write_text(report + "\n", encoding="utf-8")
    summary = {"rows_written": len(result), "stats": asdict(stats), "judge_budget": stats.judge_budget(),
               "judge_audit": audit, "judge_agreement": agreement,
               "degenerate": stats.degenerate_warnings(config.beta), "config": asdict(config),
               "shards": shard_records, "seconds": timings}
    atomic_write(output_dir / "summary.json",
                  lambda temporary: temporary.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8"))
    if verbose:
        print(report)
    else:
        warn_degenerate(stats, config.beta, output_dir / "summary.txt")
    return result


def save_dataset(dataset: Dataset, final: Path) -> None:
    """``save_to_disk`` into a staging folder, then swap it in: a killed run never leaves half a dataset."""
    staging = final.parent / f".{final.name}-{uuid.uuid4().hex}"
    dataset.save_to_disk(str(staging))
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)


def calibrate(
    inputs: MiningInputs, embeddings: Any, cached_judge: CachedJudge, config: MiningConfig, state: Any,
    cheap_judge: CachedJudge | None = None,
) -> tuple[JudgeCalibration, list[int]]:
    """The cascade's calibration, the same on every process: each judges its share of the calibration rows in full
    (into the shared judge logs), then every process reads all the logs and fits on every calibration row."""
    indices = calibration_rows(len(inputs), config.cascade_calibration_share, config.cascade_calibration_min_rows,
                               config.seed)
    judges = [cached_judge] if cheap_judge is None else [cached_judge, cheap_judge]
    for judge in judges:
        judge.context = {"calibration": True}
    judge_in_full(indices[state.process_index::state.num_processes], inputs, embeddings, cached_judge, config,
                  cheap_judge)
    state.wait_for_everyone()
    for judge in judges:
        judge.reload()
    state.wait_for_everyone()  # nobody appends to the logs before every process has read them
    for judge in judges:
        judge.context = {}
    return fit_calibration(indices, inputs, embeddings, cached_judge, config, cheap_judge), indices


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
