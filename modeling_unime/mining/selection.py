"""Judging and selection (arXiv 2510.13515, "MLLM-as-a-Judge for Hard Negatives Mining"): global top-k retrieval, judge
scores of the positive and every candidate, the false-negative filter, cyclical sampling; the in-memory entry point
`mine_hard_negatives` and the report of a run."""

from __future__ import annotations

import math
import os
import random
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from datasets import Dataset, Features, List, Value

from ..data import MINED_FEATURES, MinedRow, task_from_image_path
from ..judge import Judge
from ..judge.calibration import judge_audit
from ..judge.ensemble import judge_agreement
from ..util.embedding_cache import Item
from ..util.retrieval import chunked_top_k, faiss_top_k
from .cascade import JudgeCalibration, RowScores, audit_row, calibration_rows, candidate_modality, decide_row
from .config import MiningConfig
from .inputs import MiningEmbeddings, MiningInputs, count_duplicate_rows, embed_inputs
from .judging import CachedJudge, RootedJudge, judge_fingerprint, score_with_details
from .rules import FALLBACK_SCORE, cyclical_sample, false_negative_filter
from .stats import SelectionStats

JUDGED_PAIR_FEATURES = Features({
    "row": Value("int64"), "rank": Value("int32"), "query_text": Value("string"), "query_image": Value("string"),
    "candidate_text": Value("string"), "candidate_image": Value("string"), "similarity": Value("float64"),
    "score": Value("float64"), "source": Value("string"), "estimate": Value("float64"), "sigma": Value("float64"),
    "positive_score": Value("float64"), "member_scores": List(Value("float64")), "disagreement": Value("float64"),
    "cheap_score": Value("float64"),
})


class DegenerateMiningWarning(UserWarning):
    """The selection is degenerate (`SelectionStats.degenerate_warnings`): raised as a warning by runs that print no
    report (``verbose=False``); a printed report ends with a WARNING block instead."""


@dataclass
class Selection:
    """What the false-negative filter and the cyclical walk pick from one row's scores: the surviving candidate
    positions (retrieval order), the walk's positions into them (or into all candidates for the fallback)."""

    ranked: list[int]
    positions: list[int]
    used_fallback: bool

    @property
    def chosen(self) -> list[int]:
        """Candidate positions of the negatives (a repeated one appears again)."""
        return list(self.positions) if self.used_fallback else [self.ranked[position] for position in self.positions]


def walk(candidate_scores: Sequence[float], positive_score: float, config: MiningConfig, row_index: int) -> Selection:
    """The selection of one row from its scores: the false-negative filter, then the cyclical walk over the
    survivors in retrieval order (the empty-set fallback seeded per row, so that any process count agrees)."""
    keep = false_negative_filter(candidate_scores, positive_score, config.beta).tolist() if candidate_scores else []
    ranked = [position for position, kept in enumerate(keep) if kept]
    positions, used_fallback = cyclical_sample(
        len(ranked), config.num_negatives, config.interval, config.empty_fallback,
        fallback_pool=len(candidate_scores), rng=random.Random(config.seed * 1_000_003 + row_index),
    )
    return Selection(ranked, positions, used_fallback)


@dataclass
class RowContext:
    """What the judging of one row may use besides the judge: each candidate's similarity to the query (from the
    retrieval), the cascade's calibration, and where the judged pairs and the audit go."""

    similarities: list[float] | None = None
    calibration: JudgeCalibration | None = None
    fully_judged: bool = False
    pairs: list[dict[str, Any]] | None = None
    cheap_scores: list[float] | None = None

    @property
    def features(self) -> list[float] | None:
        """What the cascade's estimates are read from: the cheap judge's scores when there is one, else the
        similarities."""
        return self.cheap_scores if self.cheap_scores is not None else self.similarities


def row_scores(
    row_index: int,
    inputs: MiningInputs,
    candidates: Sequence[Item],
    judge: Judge,
    config: MiningConfig,
    context: RowContext,
) -> RowScores:
    """The positive's judge score and one score per candidate: all from the judge (``judge_mode: full``, and the
    calibration rows), or from the cascade (`modeling_unime.mining.cascade.decide_row`)."""
    query, positive = inputs.queries[row_index], inputs.positives[row_index]
    cascade = config.judge_mode != "full" and not context.fully_judged and candidates
    if not cascade:
        judged, details = checked_scores_with_details(judge, query, [positive, *candidates], row_index)
        return RowScores(judged[0], judged[1:], ["judge"] * len(candidates), details=details[1:])
    if context.calibration is None or context.features is None:
        raise ValueError(f"judge_mode={config.judge_mode!r} needs the calibration and the candidates' similarities.")
    if (context.cheap_scores is not None) != (context.calibration.feature == "cheap_judge"):
        raise ValueError(f"the calibration reads {context.calibration.feature!r} but this row gives "
                         f"{'cheap judge scores' if context.cheap_scores is not None else 'similarities'}: calibrate "
                         "and mine with the same cheap scorer.")
    positive_score = checked_scores(judge, query, [positive], row_index)[0]
    details: dict[int, Any] = {}

    def judge_candidates(positions: list[int]) -> list[float]:
        scores, found = checked_scores_with_details(judge, query, [candidates[position] for position in positions],
                                                    row_index)
        details.update(zip(positions, found))
        return scores
    task = inputs.rows[row_index].get("task")
    predicted = [context.calibration.estimate(feature, (task, candidate_modality(candidate)))
                 for feature, candidate in zip(context.features, candidates)]
    pairs = 1 + len(candidates)
    budget = None if config.judge_budget is None else max(0, math.ceil(config.judge_budget * pairs) - 1)
    if config.judge_mode == "top_m" and budget is None:
        budget = config.cascade_top_m

    def picked(scores: list[float]) -> list[int]:
        selection = walk(scores, positive_score, config, row_index)
        return [] if selection.used_fallback else selection.chosen

    scored = decide_row(
        judge_candidates, positive_score, predicted, picked,
        positive_score - config.beta, config.judge_mode, config.cascade_margin, budget, config.cascade_exact_labels,
        top_m=budget, label_temperature=config.cascade_label_temperature, label_weight=config.cascade_label_weight,
    )
    scored.details = [details.get(position) for position in range(len(candidates))]
    return scored


def checked_scores(judge: Judge, query: Item, candidates: Sequence[Item], row_index: int) -> list[float]:
    """The judge's scores of ``candidates`` for ``query``, as floats, after checking its answer: one finite number
    per candidate (a judge that answers otherwise would misalign every score after it)."""
    return checked_scores_with_details(judge, query, candidates, row_index)[0]


def checked_scores_with_details(judge: Judge, query: Item, candidates: Sequence[Item], row_index: int
                                ) -> tuple[list[float], list[dict[str, Any] | None]]:
    """`checked_scores`, and what the judge tells about each pair (an ensemble's member scores; else None)."""
    answer, details = score_with_details(judge, query[0], query[1], list(candidates))
    where = (f"the judge ({type(_innermost(judge)).__name__}) for row {row_index} (query {query[0]!r}, image "
             f"{query[1]!r})")
    if isinstance(answer, torch.Tensor):
        values = answer.detach().reshape(-1).tolist() if answer.dim() <= 1 else None
    elif isinstance(answer, (list, tuple)):
        values = list(answer)
    else:
        values = None
    if values is None:
        raise TypeError(f"{where} answered {type(answer).__name__} "
                        f"{tuple(answer.shape) if hasattr(answer, 'shape') else ''}: a judge's score() returns a 1-D "
                        "tensor (or list) with one score per candidate.")
    if len(values) != len(candidates):
        raise ValueError(f"{where} answered {len(values)} score(s) for {len(candidates)} candidate(s): one score per "
                         "candidate, in their order.")
    try:
        floats = [float(value) for value in values]
    except (TypeError, ValueError) as error:
        raise TypeError(f"{where} answered a score that is not a number ({error}).") from None
    bad = [index for index, value in enumerate(floats) if not math.isfinite(value)]
    if bad:
        raise ValueError(f"{where} answered {floats[bad[0]]} for candidate {bad[0]} ({candidates[bad[0]]!r}); "
                         f"{len(bad)} non-finite score(s) in all: re-score them or check the judge.")
    return floats, list(details)


def _innermost(judge: Any) -> Any:
    """The judge a wrapper (`RootedJudge`, `CachedJudge`) wraps, for error messages."""
    while hasattr(judge, "judge") and judge.judge is not judge:
        judge = judge.judge
    return judge


def select_negatives(
    row_index: int,
    inputs: MiningInputs,
    candidates: Sequence[Item],
    judge: Judge,
    config: MiningConfig,
    stats: SelectionStats,
    context: RowContext | None = None,
) -> MinedRow | None:
    """Judge one row's retrieved candidates (or estimate them: the cascade), filter false negatives, sample; the
    output row, or None if dropped. Every candidate's score, and where it came from, goes to ``context.pairs``."""
    context = context or RowContext()
    row, query, positive = inputs.rows[row_index], inputs.queries[row_index], inputs.positives[row_index]
    scored = row_scores(row_index, inputs, candidates, judge, config, context)
    positive_score, candidate_scores = scored.positive, scored.candidates
    judged = [score for score, source in zip(candidate_scores, scored.sources) if source == "judge"]
    stats.update(
        candidates_judged=len(judged),
        candidates_below_positive=sum(score < positive_score for score in judged),
        score_gap=sum(abs(positive_score - score) for score in judged),
        judge_pairs=scored.judged_pairs,
        estimated_pairs=scored.sources.count("estimate"),
    )
    selection = walk(candidate_scores, positive_score, config, row_index)
    ranked, positions, used_fallback = selection.ranked, selection.positions, selection.used_fallback
    dropped = used_fallback and not positions
    stats.update(
        queries=1,
        removed_as_false_negative=len(candidates) - len(ranked),
        used_fallback=used_fallback and not dropped,
        dropped=dropped,
        short_of_negatives=(0 if used_fallback else len(set(positions))) < config.num_negatives,
        positive_below_all=bool(candidate_scores) and positive_score < min(candidate_scores),
    )
    if config.cascade_audit and "estimate" in scored.sources:
        full = checked_scores(judge, query, list(candidates), row_index)
        reference = walk(full, positive_score, config, row_index)
        stats.add_audit(audit_row(selection.chosen, used_fallback, candidate_scores, reference.chosen,
                                  reference.used_fallback, full, positive_score, scored.sources))
    elif config.cascade_audit:
        stats.add_audit(audit_row(selection.chosen, used_fallback, candidate_scores, selection.chosen,
                                  used_fallback, candidate_scores, positive_score, scored.sources))
    if context.pairs is not None:
        context.pairs.extend(
            {"row": row_index, "rank": rank, "query_text": query[0], "query_image": query[1],
             "candidate_text": candidate[0], "candidate_image": candidate[1],
             "similarity": None if context.similarities is None else float(context.similarities[rank]),
             "score": float(candidate_scores[rank]), "source": scored.sources[rank],
             "estimate": scored.estimates[rank] if scored.estimates else None,
             "sigma": scored.sigmas[rank] if scored.sigmas else None,
             "positive_score": float(positive_score),
             **member_columns(scored.details[rank] if scored.details else None),
             "cheap_score": None if context.cheap_scores is None else float(context.cheap_scores[rank])}
            for rank, candidate in enumerate(candidates)
        )
    if dropped:
        return None
    chosen = selection.chosen
    if used_fallback:
        scores, sources = [FALLBACK_SCORE] * len(chosen), ["fallback"] * len(chosen)
    else:
        scores = [candidate_scores[position] for position in chosen]
        sources = [scored.sources[position] for position in chosen]
    return MinedRow(
        query_text=query[0] or "",
        query_image=query[1],
        pos_text=positive[0] or "",
        pos_image=positive[1],
        neg_texts=[candidates[position][0] or "" for position in chosen],
        neg_images=[candidates[position][1] for position in chosen],
        judge_scores=[positive_score, *scores],
        task=row.get("task") or task_from_image_path(query[1] or positive[1]) or "unknown",
        source=row.get("source") or "mine_hard_negatives",
        judge_score_source=["judge", *sources],
    )


def mine_rows(
    row_indices: Sequence[int],
    inputs: MiningInputs,
    embeddings: MiningEmbeddings,
    judge: Judge,
    config: MiningConfig,
    stats: SelectionStats,
    *,
    calibration: JudgeCalibration | None = None,
    calibration_indices: Sequence[int] = (),
    pairs: list[dict[str, Any]] | None = None,
    progress: Any = None,
    cheap_judge: Judge | None = None,
) -> list[MinedRow]:
    """Retrieval, judging and selection for some rows of the inputs (one shard, or all of them).

    ``calibration`` (with the rows of ``calibration_indices`` judged in full) drives the cascade, its estimates read
    from the similarities or, with ``cheap_judge``, from that judge's score of every candidate; ``pairs`` receives
    every candidate's score (`select_negatives`); ``progress`` (a tqdm bar) advances by each row's pairs.
    """
    similarities, indices = retrieve(row_indices, inputs, embeddings, config, stats)
    mined = []
    calibration_set = set(calibration_indices)
    for position, row_index in enumerate(row_indices):
        valid = [column for column, index in enumerate(indices[position].tolist()) if index >= 0]
        candidates = [inputs.pool[int(indices[position, column])] for column in valid]
        context = RowContext(similarities=[float(similarities[position, column]) for column in valid],
                             calibration=calibration, fully_judged=row_index in calibration_set, pairs=pairs)
        if cheap_judge is not None and config.judge_mode != "full" and candidates:
            context.cheap_scores = checked_scores(cheap_judge, inputs.queries[row_index], candidates, row_index)
            stats.update(cheap_judge_pairs=len(candidates))
        selected = select_negatives(row_index, inputs, candidates, judge, config, stats, context)
        if selected is not None:
            mined.append(selected)
        if progress is not None:
            progress.update(1 + len(candidates))
    return mined


def retrieve(
    row_indices: Sequence[int],
    inputs: MiningInputs,
    embeddings: MiningEmbeddings,
    config: MiningConfig,
    stats: SelectionStats | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(similarities, pool indices) of the top-k of these rows' queries (-1 where fewer candidates are left)."""
    search = dict(exclude=[inputs.excluded[index] for index in row_indices],
                  similarity_threshold=config.similarity_threshold, stats=stats)
    pool_embeddings = embeddings.pool
    # The queries of these rows join the pool on its device (the embedder's: see `retrieval_device`).
    shard_queries = embeddings.queries[list(row_indices)].to(pool_embeddings.device)
    if config.retrieval == "faiss":
        similarities, indices = faiss_top_k(shard_queries, pool_embeddings, config.top_k, **search)
    else:
        similarities, indices = chunked_top_k(shard_queries, pool_embeddings, config.top_k, config.chunk_size,
                                              **search)
    return similarities.cpu(), indices.cpu()


def fit_calibration(
    row_indices: Sequence[int],
    inputs: MiningInputs,
    embeddings: MiningEmbeddings,
    judge: Judge,
    config: MiningConfig,
    cheap_judge: Judge | None = None,
) -> JudgeCalibration:
    """The cascade's calibration from rows judged in full (through ``judge``: a cached judge answers pairs it has
    scored from its logs): similarity (or the ``cheap_judge``'s score) -> judge score per (task, candidate
    modality)."""
    features, scores, groups = judge_in_full(row_indices, inputs, embeddings, judge, config, cheap_judge)
    return JudgeCalibration.fit(features, scores, groups, sigma_floor=config.cascade_sigma_floor,
                                tail=config.cascade_tail,
                                feature="similarity" if cheap_judge is None else "cheap_judge")


def judge_in_full(
    row_indices: Sequence[int],
    inputs: MiningInputs,
    embeddings: MiningEmbeddings,
    judge: Judge,
    config: MiningConfig,
    cheap_judge: Judge | None = None,
) -> tuple[list[float], list[float], list[tuple[str | None, str]]]:
    """Every retrieved candidate of these rows judged: (similarities, or the ``cheap_judge``'s scores; judge scores;
    (task, candidate modality))."""
    features: list[float] = []
    scores: list[float] = []
    groups: list[tuple[str | None, str]] = []
    if not row_indices:
        return features, scores, groups
    similarities, indices = retrieve(row_indices, inputs, embeddings, config)
    for position, row_index in enumerate(row_indices):
        valid = [column for column, index in enumerate(indices[position].tolist()) if index >= 0]
        candidates = [inputs.pool[int(indices[position, column])] for column in valid]
        if not candidates:
            continue
        scores += checked_scores(judge, inputs.queries[row_index], candidates, row_index)
        if cheap_judge is None:
            features += [float(similarities[position, column]) for column in valid]
        else:
            features += checked_scores(cheap_judge, inputs.queries[row_index], candidates, row_index)
        task = inputs.rows[row_index].get("task")
        groups += [(task, candidate_modality(candidate)) for candidate in candidates]
    return features, scores, groups


def member_columns(detail: dict[str, Any] | None) -> dict[str, Any]:
    """The side table's ensemble columns of one pair: the member judges' scores and their standard deviation."""
    members = (detail or {}).get("members")
    if not members:
        return {"member_scores": None, "disagreement": None}
    mean = sum(members) / len(members)
    return {"member_scores": [float(value) for value in members],
            "disagreement": math.sqrt(sum((value - mean) ** 2 for value in members) / len(members))}


def mining_judge_agreement(pairs: Sequence[dict[str, Any]], judge: Any = None) -> dict[str, Any] | None:
    """An ensemble judge's agreement (`modeling_unime.judge.ensemble.judge_agreement`) over the judged pairs that
    carry member scores; None for a single judge."""
    members = [pair["member_scores"] for pair in pairs if pair.get("member_scores")]
    if not members:
        return None
    ensemble = _innermost_with(judge, "names")
    names = ensemble.names if ensemble is not None else [f"judge_{index}" for index in range(len(members[0]))]
    return judge_agreement(members, names)


def render_judge_agreement(agreement: dict[str, Any] | None) -> list[str]:
    if agreement is None:
        return []
    return [f"judge ensemble over {agreement['pairs']:,} judged pairs: mean disagreement (s.d. of the members' scores) "
            f"{agreement['mean_disagreement']:.4f}; " + "; ".join(
                f"{pair}: Spearman {values['spearman']:.3f}, kappa at 0.5 {values['kappa_at_0.5']:.3f}"
                for pair, values in agreement["agreement"].items())]


def mining_judge_audit(pairs: Sequence[dict[str, Any]], judge: Any = None) -> dict[str, Any] | None:
    """The judge audit of a mining run (`modeling_unime.judge.calibration.judge_audit`): each row's positive (label 1)
    against the candidates the judge scored (label 0: most are negatives, but the false negatives the filter drops
    are among them, so the numbers are a lower bound), per row; with the judge's mean Yes prior when it measures one
    (`ContextualCalibration`)."""
    positives: dict[int, float] = {}
    scores, labels, groups = [], [], []
    for pair in pairs:
        positives.setdefault(pair["row"], pair["positive_score"])
        if pair["source"] == "judge":
            scores.append(pair["score"])
            labels.append(0)
            groups.append(pair["row"])
    if not positives or not scores:
        return None
    scores += list(positives.values())
    labels += [1] * len(positives)
    groups += list(positives)
    inner = _innermost_with(judge, "mean_priors")
    return judge_audit(scores, labels, groups, prior=inner.mean_priors() if inner is not None else None)


def _innermost_with(judge: Any, attribute: str) -> Any:
    """The first judge in a chain of wrappers (`CachedJudge`, `RootedJudge`...) that has ``attribute``."""
    while judge is not None:
        if hasattr(judge, attribute):
            return judge
        judge = getattr(judge, "judge", None)
    return None


def render_judge_audit(audit: dict[str, Any] | None) -> list[str]:
    """The report lines of a mining run's judge audit."""
    if audit is None:
        return []
    lines = [
        f"judge audit (each row's positive against its judged candidates, taken as negatives): AUC {audit['auc']:.4f}, "
        f"pairwise accuracy {audit['pairwise_accuracy']:.4f}, ECE {audit['ece']:.4f}, Brier {audit['brier']:.4f}, "
        f"mean score positives {audit['mean_positive_score']:.4f} / candidates {audit['mean_negative_score']:.4f}",
        "judge score histogram (10 bins over [0, 1], positives and candidates): "
        + " ".join(str(count) for count in audit["histogram"]),
    ]
    if audit.get("prior"):
        lines.append("judge Yes prior on content-free candidates (divided out): " + ", ".join(
            f"{kind} {value:.4f}" for kind, value in audit["prior"].items()))
    return lines


def judged_pairs_dataset(pairs: Sequence[dict[str, Any]]) -> Dataset:
    """The judged-pairs side table: one row per (query, retrieved candidate) with its similarity, its score, where
    the score came from (``judge`` / ``estimate``), the cascade's estimate and sigma, and the positive's score."""
    return Dataset.from_dict({name: [pair.get(name) for pair in pairs] for name in JUDGED_PAIR_FEATURES},
                             features=JUDGED_PAIR_FEATURES)


def to_dataset(mined: Sequence[MinedRow]) -> Dataset:
    """The mined rows as a dataset with the `MINED_FEATURES` columns (a row without ``judge_score_source``, from a
    shard written before it existed, says ``judge`` for every score but the fallback's)."""
    columns = {name: [row.get(name) for row in mined] for name in MINED_FEATURES}
    columns["judge_score_source"] = [
        row.get("judge_score_source") or ["judge"] * len(row["judge_scores"]) for row in mined
    ]
    return Dataset.from_dict(columns, features=MINED_FEATURES)


class MiningResult(NamedTuple):
    """What an in-memory mining run gives: the dataset (`MINED_FEATURES`), the selection statistics, the judged-pairs
    side table (`judged_pairs_dataset`) and the cascade's calibration (None with ``judge_mode: full``)."""

    dataset: Dataset
    stats: SelectionStats
    pairs: Dataset
    calibration: JudgeCalibration | None


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
        config: a `MiningConfig`; keyword overrides (``top_k=``, ``beta=``, ``judge_mode=``...) are applied on top.
        image_root: the folder the image paths of the rows and the pool are relative to.
        cache_dir: keep embeddings and judge scores on disk there, keyed by model and content, so a repeated
            call (or one after a crash) recomputes nothing it already has.

    Returns:
        (dataset with the `MINED_FEATURES` columns, selection statistics). The summary is printed when
        ``verbose``. `mine_with_pairs` also returns every judged pair and the cascade's calibration.

    Example:
        >>> from modeling_unime.judge import MLLMJudge
        >>> from modeling_unime.tiny import build_tiny_unime, build_tiny_judge
        >>> rows = Dataset.from_list([{"query_text": f"q{i}", "query_image": None, "pos_text": f"answer {i}",
        ...                            "pos_image": None} for i in range(4)])
        >>> embedder, processor = build_tiny_unime("qwen2_vl"); embedder.processor = processor
        >>> mined, stats = mine_hard_negatives(rows, embedder, MLLMJudge(*build_tiny_judge()), top_k=3,
        ...                                    num_negatives=2, verbose=False)
        >>> len(mined), len(mined[0]["judge_scores"]), mined[0]["judge_score_source"][0]
        (4, 3, 'judge')
    """
    result = mine_with_pairs(dataset, embedder, judge, pool=pool, config=config, image_root=image_root,
                             cache_dir=cache_dir, verbose=verbose, **config_overrides)
    return result.dataset, result.stats


def mine_with_pairs(
    dataset: Dataset,
    embedder: Any,
    judge: Judge,
    *,
    pool: Sequence[Item] | None = None,
    config: MiningConfig | None = None,
    image_root: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    verbose: bool = True,
    progress: bool | None = None,
    cheap_judge: Judge | None = None,
    **config_overrides: Any,
) -> MiningResult:
    """`mine_hard_negatives`, returning also every judged pair (the side table) and the cascade's calibration.

    ``progress``: show the judge stage's progress bar (pairs done / total, pairs/s, ETA); default: on a terminal.
    ``cheap_judge``: the cascade's cheap stage (``judge_mode`` cascade / top_m): a smaller judge that scores every
    pair, calibrated against ``judge``, instead of the embedder's similarity (`modeling_unime.mining.cascade`).
    """
    config = MiningConfig(**{**asdict(config or MiningConfig()), **config_overrides})
    check_cheap_judge(cheap_judge, config)
    inputs = MiningInputs.from_dataset(dataset, pool, image_root)
    timings = {}
    start = time.perf_counter()
    embeddings = embed_inputs(embedder, inputs, image_root, config.batch_size,
                              None if cache_dir is None else Path(cache_dir) / "embeddings")
    if cache_dir is None:
        scorer: Judge = RootedJudge(judge, image_root)
        cheap = None if cheap_judge is None else RootedJudge(cheap_judge, image_root)
    else:
        scorer = CachedJudge(judge, Path(cache_dir) / "judge", judge_fingerprint(judge), image_root=image_root)
        cheap = None if cheap_judge is None else CachedJudge(cheap_judge, Path(cache_dir) / "cheap_judge",
                                                             judge_fingerprint(cheap_judge), image_root=image_root)
    timings["embedding"] = time.perf_counter() - start
    stats = SelectionStats(num_negatives=config.num_negatives)
    stats.update(duplicate_rows=count_duplicate_rows(inputs.queries, inputs.positives))
    start = time.perf_counter()
    calibration, calibration_indices = None, []
    if config.judge_mode != "full":
        calibration_indices = calibration_rows(len(inputs), config.cascade_calibration_share,
                                               config.cascade_calibration_min_rows, config.seed)
        calibration = fit_calibration(calibration_indices, inputs, embeddings, scorer, config, cheap)
        stats.update(calibration_queries=len(calibration_indices))
        timings["calibration"] = time.perf_counter() - start
        start = time.perf_counter()
    pairs: list[dict[str, Any]] = []
    with judge_progress(len(inputs) * (1 + min(config.top_k, len(inputs.pool))), "judge", progress) as bar:
        mined = mine_rows(range(len(inputs)), inputs, embeddings, scorer, config, stats, calibration=calibration,
                          calibration_indices=calibration_indices, pairs=pairs, progress=bar, cheap_judge=cheap)
        bar.total = bar.n  # the pool's own positives were excluded: fewer candidates than top_k for some rows
    timings["retrieval, judge and selection"] = time.perf_counter() - start
    result = to_dataset(mined)
    if verbose:
        print(mining_report(stats, result, timings, beta=config.beta,
                            extra_lines=render_judge_audit(mining_judge_audit(pairs, judge))
                            + render_judge_agreement(mining_judge_agreement(pairs, judge))))
    else:
        warn_degenerate(stats, config.beta)
    return MiningResult(result, stats, judged_pairs_dataset(pairs), calibration)


def check_cheap_judge(cheap_judge: Judge | None, config: MiningConfig) -> None:
    """A cheap judge feeds the cascade's estimates: with ``judge_mode: full`` it would be called for nothing."""
    if cheap_judge is not None and config.judge_mode == "full":
        raise ValueError("cheap_judge is the cascade's cheap stage: use it with judge_mode='cascade' (or 'top_m'); "
                         "judge_mode='full' has the large judge score every pair.")


def judge_progress(total: int, description: str, show: bool | None = None, position: int | None = None):
    """The judge stage's progress bar: pairs done of ``total`` (the positive and the candidates of each query), pairs
    per second and time left; shown on a terminal unless ``show`` says otherwise."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="pair", disable=None if show is None else not show,
                position=position, leave=position in (None, 0), dynamic_ncols=True)


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
