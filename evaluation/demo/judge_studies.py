"""The main job's measurements of the judge and of the reranker (`evaluation.demo.pipeline` runs them):

- **judge budget**: the mining redone with the judge cascade (`modeling_unime.mining.cascade`) at a share of the
  large-judge calls, audited against the full judge (identical negative sets, overlap, soft-label KL), and, for the
  oracle, an embedder trained on each budget's data (mean P@1);
- **judge audit and calibration**: each judge on held-out pairs with known labels (the positive and one wrong
  candidate of each test row), raw and with its Yes prior divided out (`modeling_unime.judge.calibration`): pairwise
  accuracy, AUC, expected calibration error, Brier score, the prior;
- **reranker check**: on held-out training rows (queries the reranker never trained on), whether reranking the
  embedder's top-k beats the embedder, per mode (pairwise, listwise, and the rank fusion of embedder and reranker):
  a mode that does not is not applied to the test table;
- **reranker slot bias** per task (`evaluation.slot_bias`): the chosen slot on content-free lists, accuracy with the
  positive forced to each slot, and the listwise index loss on held-out lists against ln K.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from datasets import load_from_disk

from modeling_unime.judge.calibration import ContextualCalibration, blank_image, judge_audit
from modeling_unime.mining import MiningConfig
from modeling_unime.mining.selection import mine_with_pairs
from modeling_unime.util.embedding_cache import embed_with_cache

from ..mmeb import MMEBDataset, candidate_scores, ranking_from_scores
from ..slot_bias import slot_bias

RERANK_MODES = ("pairwise", "listwise", "fused")
FUSION_K = 60


# ------------------------------------------------------------------------------------------------ judge budget


def budget_label(budget: float | None) -> str:
    """``50%`` for a cap on the calls; ``rules`` for the cascade without a cap (its rules decide the calls)."""
    return "rules" if budget is None else f"{100 * budget:g}%"


def mine_at_budget(rows, baseline, judge, budget: float | None, settings: MiningConfig, cache_dir: Path, folder: Path,
                   stage) -> tuple[Any, dict[str, Any]]:
    """Mining with the cascade at ``budget`` of the large-judge calls (None: as many as its rules ask for), audited
    against the full judge; saved in ``folder`` (``stage`` is the caller's saved-stage marker: a re-run with the same
    settings loads it)."""
    saved = stage.saved()
    if saved is not None:
        return load_from_disk(str(folder)), saved["budget"]
    config = MiningConfig(**{**vars(settings), "judge_mode": "cascade", "judge_budget": budget,
                             "cascade_audit": True})
    result = mine_with_pairs(rows, baseline, judge, config=config, cache_dir=cache_dir, verbose=False,
                             progress=False)
    result.dataset.save_to_disk(str(folder))
    measured = result.stats.judge_budget()
    stage.mark({"budget": measured})
    return result.dataset, measured


def render_judge_budget(study: Mapping[str, list[dict[str, Any]]]) -> str:
    """The ``judge_budget`` block of results.md: per judge and budget, the calls, the agreement with the full judge
    and, where an embedder was trained on the data, its mean P@1."""
    lines = ["Judge budget: mining with the judge cascade at a share of the large-judge calls (calibrated similarity "
             "estimates for the rest), against the full judge on the same queries; 'rules': no cap, the cascade's "
             "rules decide (every decision that could flip judged, and every picked negative whose soft label can "
             "matter). The share counts the 5% of queries judged in full to calibrate. P@1: an embedder trained on "
             "that data as the '+ UniME-V2 soft labels' row.", "",
             "| judge | budget | calls (% of pairs) | pairs judged | identical negative sets | mean overlap | "
             "soft-label KL | mean P@1 |", "|---" * 8 + "|"]
    for judge, rows in study.items():
        for row in rows:
            p1 = f"{row['mean_p1']:.1f}" if row.get("mean_p1") is not None else "-"
            lines.append(
                f"| {judge} | {budget_label(row['budget'])} | {100 * row['judge_share']:.1f} | "
                f"{row['judge_pairs']:,} | "
                f"{100 * row['identical_sets']:.1f} | {100 * row['mean_overlap']:.1f} | "
                f"{row['mean_soft_label_kl']:.3f} | {p1} |")
    lines += seeded_comparison(study.get("oracle", []))
    return "\n".join(lines)


# Two-sided 95% quantiles of Student's t for 1..10 degrees of freedom (then 1.96 is close enough for a verdict).
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def seeded_comparison(rows: list[dict[str, Any]]) -> list[str]:
    """The line comparing the embedders trained on the full judge's data and on the uncapped cascade's over the
    training seeds: mean +- s.d. of each, and the paired difference (same seed) with its 95% interval (Student's t):
    "within the seeds' noise" when the interval holds 0."""
    full = next((row for row in rows if row["budget"] == 1.0 and row.get("mean_p1_by_seed")), None)
    cascade = next((row for row in rows if row["budget"] is None and row.get("mean_p1_by_seed")), None)
    if full is None or cascade is None or len(full["mean_p1_by_seed"]) < 2:
        return []
    count = min(len(full["mean_p1_by_seed"]), len(cascade["mean_p1_by_seed"]))
    full_scores, cascade_scores = full["mean_p1_by_seed"][:count], cascade["mean_p1_by_seed"][:count]
    difference, difference_sd = mean_and_sd([mine - theirs for mine, theirs in zip(cascade_scores, full_scores)])
    half_width = (T_975[count - 2] if count - 2 < len(T_975) else 1.96) * difference_sd / math.sqrt(count)
    verdict = ("within the seeds' noise" if abs(difference) <= half_width else "outside the seeds' noise")
    (full_mean, full_sd), (cascade_mean, cascade_sd) = mean_and_sd(full_scores), mean_and_sd(cascade_scores)
    return ["", f"Over {count} training seeds (same baseline and data; data order and dropout vary): full judge "
                f"{full_mean:.2f} +- {full_sd:.2f}, uncapped cascade {cascade_mean:.2f} +- {cascade_sd:.2f} mean P@1; "
                f"paired difference (cascade - full) {difference:+.2f}, 95% interval [{difference - half_width:+.2f}, "
                f"{difference + half_width:+.2f}]: {verdict}."]


def mean_and_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def draw_judge_budget(study: Mapping[str, list[dict[str, Any]]], path: Path, pyplot) -> None:
    """``judge_budget.png``: mean overlap with the full judge's negatives against the share of calls, per judge, and
    the trained embedders' mean P@1 where measured."""
    figure, (overlap_axis, p1_axis) = pyplot.subplots(1, 2, figsize=(11, 4), dpi=100)
    try:
        for judge, rows in study.items():
            rows = sorted(rows, key=lambda row: row["judge_share"])
            overlap_axis.plot([100 * row["judge_share"] for row in rows], [100 * row["mean_overlap"] for row in rows],
                              marker="o", label=judge)
            trained = [row for row in rows if row.get("mean_p1") is not None]
            if trained:
                p1_axis.plot([100 * row["judge_share"] for row in trained], [row["mean_p1"] for row in trained],
                             marker="o", label=judge)
        overlap_axis.set(xlabel="large-judge calls (% of pairs)", ylabel="overlap with the full judge's negatives (%)",
                         title="Negatives kept by the cascade")
        p1_axis.set(xlabel="large-judge calls (% of pairs)", ylabel="mean P@1 (%)",
                    title="Embedder trained on the cascade's data")
        for axis in (overlap_axis, p1_axis):
            axis.grid(True, alpha=0.3)
            if axis.lines:
                axis.legend()
        figure.tight_layout()
        figure.savefig(path)
    finally:
        pyplot.close(figure)


# ------------------------------------------------------------------------------------------------ judge audit


def held_out_pairs(tasks: Mapping[str, MMEBDataset], rows_per_task: int, seed: int
                   ) -> list[tuple[Any, Any, int, tuple[str, int]]]:
    """(query, candidate, label, (task, row)) of held-out rows: each row's positive (1) and one random wrong
    candidate (0)."""
    pairs = []
    for name, task in tasks.items():
        rng = random.Random(f"judge-audit:{seed}:{name}")
        picked = rng.sample(range(len(task)), min(rows_per_task, len(task)))
        for row in picked:
            query, candidates = task.queries[row], task.candidates[row]
            pairs.append((query, candidates[0], 1, (name, row)))
            pairs.append((query, rng.choice(candidates[1:]), 0, (name, row)))
    return pairs


def score_pairs(judge: Any, pairs: Sequence[tuple[Any, Any, int, Any]]) -> list[float]:
    """The judge's score of each pair (one call per query: its pairs together)."""
    by_group: dict[Any, list[int]] = {}
    for index, (_, _, _, group) in enumerate(pairs):
        by_group.setdefault(group, []).append(index)
    scores = [0.0] * len(pairs)
    for indices in by_group.values():
        query = pairs[indices[0]][0]
        values = judge.score(query[0], query[1], [pairs[index][1] for index in indices])
        for index, value in zip(indices, torch.as_tensor(values).reshape(-1).tolist()):
            scores[index] = float(value)
    return scores


def judge_audits(judges: Mapping[str, Any], tasks: Mapping[str, MMEBDataset], rows_per_task: int, seed: int,
                 image_size: int = 64) -> dict[str, dict[str, Any]]:
    """Per judge: the audit of its raw scores and of its contextually calibrated ones on the same held-out pairs."""
    pairs = held_out_pairs(tasks, rows_per_task, seed)
    labels = [label for _, _, label, _ in pairs]
    groups = [group for _, _, _, group in pairs]
    audits = {}
    for name, judge in judges.items():
        calibrated = ContextualCalibration(judge, content_free_image=blank_image(image_size))
        raw_scores, calibrated_scores = score_pairs(judge, pairs), score_pairs(calibrated, pairs)
        audits[name] = {
            "raw": {**judge_audit(raw_scores, labels, groups), "scores": raw_scores},
            "calibrated": {**judge_audit(calibrated_scores, labels, groups, prior=calibrated.mean_priors()),
                           "scores": calibrated_scores},
            "labels": labels,
        }
    return audits


def render_judge_audits(audits: Mapping[str, dict[str, Any]]) -> str:
    lines = ["Judge audit on held-out pairs (each test row's positive and one wrong candidate), raw -> with the Yes "
             "prior measured on content-free candidates divided out (contextual calibration).", "",
             "| judge | pairwise accuracy (%) | AUC | ECE (10 bins) | Brier | Yes prior (text / image) |",
             "|---|---|---|---|---|---|"]
    for name, audit in audits.items():
        raw, calibrated = audit["raw"], audit["calibrated"]
        prior = calibrated.get("prior") or {}
        lines.append(
            f"| {name} | {100 * raw['pairwise_accuracy']:.1f} -> {100 * calibrated['pairwise_accuracy']:.1f} | "
            f"{raw['auc']:.3f} -> {calibrated['auc']:.3f} | {raw['ece']:.3f} -> {calibrated['ece']:.3f} | "
            f"{raw['brier']:.3f} -> {calibrated['brier']:.3f} | "
            + " / ".join(f"{prior[kind]:.3f}" if kind in prior else "-" for kind in ("text", "image")) + " |")
    return "\n".join(lines)


def draw_judge_audits(audits: Mapping[str, dict[str, Any]], path: Path, pyplot) -> None:
    """``judge_audit.png``: per judge, the reliability diagram (mean score against share of positives, 10 bins) of
    its raw and calibrated scores, and their histograms by label."""
    figure, axes = pyplot.subplots(2, len(audits), figsize=(4 * len(audits), 7), dpi=100, squeeze=False)
    try:
        for column, (name, audit) in enumerate(audits.items()):
            labels = audit["labels"]
            for kind, style in (("raw", "o-"), ("calibrated", "s--")):
                scores = audit[kind]["scores"]
                bins: list[list[tuple[float, int]]] = [[] for _ in range(10)]
                for score, label in zip(scores, labels):
                    bins[min(9, int(score * 10))].append((score, label))
                points = [(statistics.fmean(s for s, _ in members), statistics.fmean(y for _, y in members))
                          for members in bins if members]
                axes[0][column].plot(*zip(*points), style, label=f"{kind} (ECE {audit[kind]['ece']:.3f})")
                axes[1][column].hist([s for s, y in zip(scores, labels) if y], bins=20, range=(0, 1), alpha=0.5,
                                     label=f"{kind}: positives")
                axes[1][column].hist([s for s, y in zip(scores, labels) if not y], bins=20, range=(0, 1), alpha=0.5,
                                     label=f"{kind}: negatives")
            axes[0][column].plot([0, 1], [0, 1], color="gray", linewidth=0.8)
            axes[0][column].set(title=name, xlabel="mean score", ylabel="share of positives")
            axes[1][column].set(xlabel="score", ylabel="pairs")
            axes[0][column].legend(fontsize="small")
            axes[1][column].legend(fontsize="x-small")
        figure.tight_layout()
        figure.savefig(path)
    finally:
        pyplot.close(figure)


# ------------------------------------------------------------------------------------------------ the reranker


class RankFusion:
    """The embedder's order and the reranker's fused by reciprocal rank (1 / (k + rank), k = 60): the candidates
    come in the embedder's order (the rerank stage's input), the reranker ranks them in ``mode``."""

    def __init__(self, reranker: Any, mode: str = "pairwise", k: int = FUSION_K) -> None:
        self.reranker, self.mode, self.k = reranker, mode, k

    def rerank(self, query: Any, candidates: Sequence[Any], mode: str = "fused", image_root: Any = None):
        order, _ = self.reranker.rerank(query, list(candidates), mode=self.mode)
        order = [int(position) for position in (order.tolist() if isinstance(order, torch.Tensor) else order)]
        reranker_rank = {position: rank for rank, position in enumerate(order)}
        fused = [1 / (self.k + position + 1) + 1 / (self.k + reranker_rank.get(position, len(order)) + 1)
                 for position in range(len(candidates))]
        fused_order = sorted(range(len(candidates)), key=lambda position: (-fused[position], position))
        return fused_order, torch.tensor([fused[position] for position in fused_order])


def held_out_check_tasks(train_tasks: Mapping[str, MMEBDataset], trained_queries: set, rows_per_task: int,
                         seed: int) -> dict[str, MMEBDataset]:
    """Rows of the training tasks whose query the reranker never trained on (not among the mined queries)."""
    tasks = {}
    for name, task in train_tasks.items():
        rng = random.Random(f"reranker-check:{seed}:{name}")
        unseen = [row for row, query in enumerate(task.queries) if query not in trained_queries]
        picked = sorted(rng.sample(unseen, min(rows_per_task, len(unseen))))
        if picked:
            tasks[name] = MMEBDataset(name, [task.queries[row] for row in picked],
                                      [task.candidates[row] for row in picked])
    return tasks


def reranker_checks(embedder: Any, reranker: Any, check_tasks: Mapping[str, MMEBDataset], top_k: int,
                    evaluate: Callable[..., Any]) -> dict[str, dict[str, Any]]:
    """Per rerank mode: the embedder's mean P@1 and the reranked one on the held-out check rows, and whether the mode
    is applied (it must beat the embedder)."""
    checks = {}
    for mode in RERANK_MODES:
        stage = RankFusion(reranker) if mode == "fused" else reranker
        scores = evaluate(embedder, check_tasks, stage, top_k, "listwise" if mode == "listwise" else
                          "pairwise" if mode == "pairwise" else "fused")
        plain = statistics.fmean(scores.scores[name] for name in check_tasks)
        reranked = statistics.fmean(scores.reranked[name] for name in check_tasks)
        checks[mode] = {"embedder_p1": plain, "reranked_p1": reranked, "applied": reranked > plain,
                        "rows": sum(len(task) for task in check_tasks.values())}
    return checks


def reranker_slot_bias(embedder: Any, reranker: Any, tasks: Mapping[str, MMEBDataset], top_k: int,
                       rows_per_task: int, seed: int, image_size: int = 64) -> dict[str, dict[str, Any]]:
    """Per task: the slot-bias report of the listwise reranker on lists of each sampled row's positive and the
    embedder's top ``top_k - 1`` negatives; content-free candidates of the task's candidate kind."""
    report = {}
    for name, task in tasks.items():
        rng = random.Random(f"slot-bias:{seed}:{name}")
        picked = sorted(rng.sample(range(len(task)), min(rows_per_task, len(task))))
        queries = [task.queries[row] for row in picked]
        candidates = [task.candidates[row] for row in picked]
        items = list(dict.fromkeys([*queries, *(item for row in candidates for item in row)]))
        embeddings = torch.nn.functional.normalize(torch.as_tensor(embed_with_cache(embedder, items, None, 32))
                                                   .float(), dim=-1)
        position = {item: index for index, item in enumerate(items)}
        length = min(top_k, min(len(row) for row in candidates))
        rows = []
        for query, row_candidates in zip(queries, candidates):
            ranking = ranking_from_scores(candidate_scores(embeddings, position[query],
                                                           [position[item] for item in row_candidates]), "argmax")
            negatives = [index for index in ranking if index != 0][: length - 1]
            rows.append((query, [row_candidates[0], *(row_candidates[index] for index in negatives)]))
        image_candidates = row_candidates[0][1] is not None
        content_free = (None, blank_image(image_size)) if image_candidates else ("N/A", None)
        report[name] = slot_bias(reranker, rows, content_free=content_free)
    return report


def render_slot_bias(report: Mapping[str, dict[str, Any]]) -> str:
    tasks = list(report)
    first = next(iter(report.values()))
    lines = [f"Reranker slot bias (listwise, {first['rows']} held-out rows per task; lists of the positive and the "
             "embedder's top negatives). Content-free lists show the slot it prefers; with the positive forced to each "
             "slot in turn, a model blind to content scores exactly 100 / K on average. The index loss on these "
             "lists is below ln K only if the model reads them.", "",
             "| measure | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    rows = {
        "list length K": lambda r: str(r["list_length"]),
        "chosen slot on content-free lists (histogram)": lambda r: " ".join(f"{v:g}" for v in r[
            "content_free_histogram"]),
        "preferred slot (share %)": lambda r: f"{r['preferred_slot']} ({r['preferred_share']:.0f})",
        "accuracy with the positive at each slot (%)": lambda r: " / ".join(f"{v:.0f}" for v in r["accuracy_by_slot"]),
        "mean over slots (%)": lambda r: f"{r['rotation_mean_accuracy']:.1f}",
        "chance (%)": lambda r: f"{r['chance']:.1f}",
        "rotation-averaged scores: accuracy (%)": lambda r: f"{r['rotation_averaged_accuracy']:.1f}",
        "index loss on held-out lists / ln K": lambda r: f"{r['positive_log_loss']:.3f} / {r['chance_log_loss']:.3f}",
    }
    for label, cell in rows.items():
        lines.append(f"| {label} | " + " | ".join(cell(report[task]) for task in tasks) + " |")
    below = [task for task in tasks if report[task]["positive_log_loss"] < report[task]["chance_log_loss"]]
    lines += ["", f"Index loss below ln K on held-out lists: {', '.join(below) if below else 'no task'}."]
    return "\n".join(lines)


def render_reranker_checks(checks: Mapping[str, dict[str, Any]]) -> str:
    return "Reranker check on held-out training rows (mean P@1, %): " + "; ".join(
        f"{mode}: {check['reranked_p1']:.1f} vs embedder {check['embedder_p1']:.1f} "
        f"({'applied' if check['applied'] else 'not applied'})" for mode, check in checks.items())


def skipped_reason(check: Mapping[str, Any]) -> str:
    return (f"skipped: on {check['rows']} held-out rows it gives P@1 {check['reranked_p1']:.1f}, the embedder "
            f"{check['embedder_p1']:.1f}")


__all__ = [
    "RERANK_MODES", "RankFusion", "budget_label", "draw_judge_audits", "draw_judge_budget", "held_out_check_tasks",
    "held_out_pairs", "judge_audits", "mean_and_sd", "mine_at_budget", "render_judge_audits", "render_judge_budget",
    "render_reranker_checks", "render_slot_bias", "reranker_checks", "reranker_slot_bias", "score_pairs",
    "seeded_comparison", "skipped_reason",
]
