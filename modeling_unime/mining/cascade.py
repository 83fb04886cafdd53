"""The judge on a budget: a cascade that calls the large judge only where its answer could change what mining selects.

Every query's top-k candidates normally all go through the large MLLM judge (about 33M calls for the paper's 662K
training pairs). The cascade (``judge_mode="cascade"`` of `modeling_unime.mining.config.MiningConfig`) does this:

1. **Calibration.** A random share of the queries (``cascade_calibration_share``, seeded, the same for any number of
   processes) is judged in full. On their (cheap feature, judge score) pairs it fits, per group (the row's task
   x the candidate's modality, falling back to the modality, then to all pairs), an increasing map from the
   cheap feature to the judge's score. The cheap feature is the embedder's similarity (free: retrieval computed it),
   or, given a ``cheap_judge`` (a smaller `modeling_unime.judge.Judge`), that judge's score of every pair
   (isotonic regression), and the spread of the judge around it (residual standard deviation in feature bins,
   never below ``cascade_sigma_floor``: a bin where the few calibration pairs happened to agree must not look
   certain).
2. **Estimates.** Every other query's positive is judged (its score sets the false-negative threshold
   ``s_pos - beta``); each candidate gets the calibrated estimate ``e`` and its uncertainty ``sigma``.
3. **Decisions that could flip.** A candidate whose interval contains the threshold is judged: ``e +-
   cascade_margin * sigma``, widened to the residuals' ``cascade_tail`` quantiles where they reach further (a judge's
   scores are far from Gaussian around an estimate: mostly close, now and then 0.9 away).
4. **The selection walk.** With the decided scores, the false-negative filter and the cyclical walk pick the
   negatives (`modeling_unime.mining.rules`); every picked candidate not judged yet is judged (its score becomes a
   soft label, and judging it may drop it as a false negative, which moves the walk), and the walk is redone until
   every picked negative carries a judge score (``cascade_exact_labels``). Training aligns to softmax(score / tau),
   so a negative whose weight against the positive stays below ``cascade_label_weight`` even at the top of its
   interval (``exp((high - s_pos) / tau)``, tau = ``cascade_label_temperature``) adds nothing a judge score could
   change: it keeps its estimate. The rest keep their estimates.

``judge_budget`` caps the large-judge calls per query (a share of its ``1 + top_k`` pairs, the positive included):
candidates are then judged most-doubtful first (`flip_distance`: the threshold's distance from the estimate over the
interval's reach; a picked negative counts as doubtful), until the cap, which is spent in full.
``judge_mode="top_m"`` is the naive baseline the cascade is measured against: the positive and the ``top_m`` most
similar candidates are judged, the rest keep their estimates.

Every score records its source (``judge`` or ``estimate``, ``fallback`` for the empty-set fallback): the mined
dataset's ``judge_score_source`` column and the judged-pairs side table (`modeling_unime.mining.selection`).

Example:
    >>> calibration = JudgeCalibration.fit([0.1, 0.2, 0.3, 0.8, 0.9], [0.05, 0.1, 0.2, 0.85, 0.9],
    ...                                    [("t", "text")] * 5, bins=2, sigma_floor=0.05, min_points=3)
    >>> estimate, sigma = calibration.predict(0.85, ("t", "text"))
    >>> round(estimate, 3), round(sigma, 3)
    (0.875, 0.05)
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

ALL = "*"
JUDGE_MODES = ("full", "cascade", "top_m")
AUDIT_TEMPERATURE = 0.02
"""The temperature of the soft labels the audit compares (the paper's tau)."""


# ------------------------------------------------------------------------------------------------ calibration


def _isotonic_blocks(features: Sequence[float], targets: Sequence[float]) -> list[tuple[list[int], float]]:
    """Pool-adjacent-violators: (member indices, fitted value) of each block, in increasing feature order. Points
    with the same feature start in one block (they must get one value)."""
    order = sorted(range(len(features)), key=lambda index: features[index])
    blocks: list[tuple[list[int], float]] = []  # (members, sum of targets)
    for index in order:
        if blocks and features[blocks[-1][0][-1]] == features[index]:
            members, total = blocks.pop()
            blocks.append((members + [index], total + float(targets[index])))
        else:
            blocks.append(([index], float(targets[index])))
        while len(blocks) > 1 and blocks[-2][1] / len(blocks[-2][0]) >= blocks[-1][1] / len(blocks[-1][0]):
            members, total = blocks.pop()
            blocks[-1] = (blocks[-1][0] + members, blocks[-1][1] + total)
    return [(members, total / len(members)) for members, total in blocks]


def isotonic_values(features: Sequence[float], targets: Sequence[float]) -> list[float]:
    """The least-squares increasing fit of ``targets`` as a function of ``features``, one value per point.

    >>> isotonic_values([1, 2, 3, 4], [1.0, 3.0, 2.0, 4.0])
    [1.0, 2.5, 2.5, 4.0]
    """
    values = [0.0] * len(features)
    for members, value in _isotonic_blocks(features, targets):
        for index in members:
            values[index] = value
    return values


def isotonic_fit(features: Sequence[float], targets: Sequence[float]) -> tuple[list[float], list[float]]:
    """The increasing step function closest (least squares) to ``targets`` as a function of ``features``
    (pool-adjacent-violators), as knots: the mean feature and the fitted value of each block.

    >>> isotonic_fit([1, 2, 3, 4], [1.0, 3.0, 2.0, 4.0])
    ([1.0, 2.5, 4.0], [1.0, 2.5, 4.0])
    """
    blocks = _isotonic_blocks(features, targets)
    return ([sum(float(features[index]) for index in members) / len(members) for members, _ in blocks],
            [value for _, value in blocks])


def isotonic_predict(knots_x: Sequence[float], knots_y: Sequence[float], feature: float) -> float:
    """The fitted value at ``feature``: linear between the knots, constant beyond the first and the last."""
    if feature <= knots_x[0]:
        return knots_y[0]
    if feature >= knots_x[-1]:
        return knots_y[-1]
    for left in range(len(knots_x) - 1):
        if knots_x[left] <= feature <= knots_x[left + 1]:
            span = knots_x[left + 1] - knots_x[left]
            weight = 0.0 if span == 0 else (feature - knots_x[left]) / span
            return knots_y[left] + weight * (knots_y[left + 1] - knots_y[left])
    return knots_y[-1]


@dataclass
class Estimate:
    """A calibrated estimate of the judge's score and how far the judge was seen to stray from such an estimate:
    ``sigma`` (residual standard deviation, at least the floor) and the residuals' ``low`` and ``high`` tail
    quantiles (the judge's scores are far from Gaussian around an estimate: mostly close, sometimes 0.9 away)."""

    value: float
    sigma: float
    low: float
    high: float

    def interval(self, margin: float) -> tuple[float, float]:
        """Where the judge's score may lie: the wider of ``value +- margin * sigma`` and the tail quantiles."""
        return (self.value - max(margin * self.sigma, -self.low), self.value + max(margin * self.sigma, self.high))


@dataclass
class GroupCalibration:
    """One group's map from similarity to judge score (isotonic knots) and the judge's spread around it, per
    similarity bin (``bin_edges`` are the inner edges; ``bin_sigmas``, ``bin_lows``, ``bin_highs`` one more than
    them: the residuals' standard deviation and tail quantiles)."""

    knots_x: list[float]
    knots_y: list[float]
    bin_edges: list[float]
    bin_sigmas: list[float]
    count: int
    bin_lows: list[float] = field(default_factory=list)
    bin_highs: list[float] = field(default_factory=list)

    def predict(self, feature: float, sigma_floor: float) -> tuple[float, float]:
        estimate = self.estimate(feature, sigma_floor)
        return estimate.value, estimate.sigma

    def estimate(self, feature: float, sigma_floor: float) -> Estimate:
        value = isotonic_predict(self.knots_x, self.knots_y, feature)
        bin_index = sum(feature > edge for edge in self.bin_edges)
        low = self.bin_lows[bin_index] if self.bin_lows else 0.0
        high = self.bin_highs[bin_index] if self.bin_highs else 0.0
        return Estimate(value, max(self.bin_sigmas[bin_index], sigma_floor), min(low, -sigma_floor),
                        max(high, sigma_floor))


def group_keys(task: str | None, modality: str) -> tuple[tuple[str, str], tuple[str, str], tuple[str, str]]:
    """The groups a candidate's estimate is looked up in, most specific first: (task, modality), (all tasks,
    modality), (all, all)."""
    return (task or ALL, modality), (ALL, modality), (ALL, ALL)


def candidate_modality(item: tuple[str | None, str | None]) -> str:
    """``text``, ``image`` or ``image+text``: what a candidate (text, image) shows."""
    text, image = item
    if image and text:
        return "image+text"
    return "image" if image else "text"


@dataclass
class JudgeCalibration:
    """Calibrated estimates of the large judge's score from a cheap feature (the embedder's similarity), per group
    (see `group_keys`); fitted with `fit`, queried with `predict`, saved with `to_dict`."""

    groups: dict[str, GroupCalibration]
    sigma_floor: float
    pairs: int = 0
    feature: str = "similarity"
    """What the estimates are read from: ``similarity`` (the embedder's) or ``cheap_judge`` (a smaller judge's
    score)."""

    @staticmethod
    def key(group: tuple[str, str]) -> str:
        return f"{group[0]}|{group[1]}"

    @classmethod
    def fit(
        cls,
        features: Sequence[float],
        scores: Sequence[float],
        groups: Sequence[tuple[str, str]],
        bins: int = 5,
        sigma_floor: float = 0.05,
        min_points: int = 30,
        tail: float = 0.01,
        feature: str = "similarity",
    ) -> JudgeCalibration:
        """Fit every group (and its broader groups) with at least ``min_points`` pairs; (all, all) always.

        ``groups`` holds each pair's (task, modality). The spread is measured in ``bins`` bins of equal count over
        the group's similarities: the residual standard deviation and the ``tail`` and ``1 - tail`` quantiles of
        the residuals (nearest rank).
        """
        if not features:
            raise ValueError("the calibration has no judged pair: judge some queries in full first (raise "
                             "cascade_calibration_share, or check that retrieval returns candidates).")
        members: dict[tuple[str, str], list[int]] = {}
        for index, (task, modality) in enumerate(groups):
            for group in group_keys(task, modality):
                members.setdefault(group, []).append(index)
        fitted = {}
        for group, indices in members.items():
            if len(indices) < min_points and group != (ALL, ALL):
                continue
            x = [float(features[index]) for index in indices]
            y = [float(scores[index]) for index in indices]
            knots_x, knots_y = isotonic_fit(x, y)
            ordered = sorted(range(len(x)), key=lambda position: x[position])
            per_bin = max(1, math.ceil(len(ordered) / max(1, bins)))
            edges, sigmas, lows, highs = [], [], [], []
            for start in range(0, len(ordered), per_bin):
                chunk = ordered[start:start + per_bin]
                residuals = sorted(y[position] - isotonic_predict(knots_x, knots_y, x[position]) for position in chunk)
                sigmas.append(math.sqrt(sum(value * value for value in residuals) / len(residuals)))
                lows.append(residuals[max(0, math.ceil(tail * len(residuals)) - 1)])
                highs.append(residuals[min(len(residuals) - 1, math.floor((1 - tail) * len(residuals)))])
                if start + per_bin < len(ordered):
                    edges.append(x[ordered[start + per_bin - 1]])
            fitted[cls.key(group)] = GroupCalibration(knots_x, knots_y, edges, sigmas, len(indices), lows, highs)
        return cls(fitted, sigma_floor, len(features), feature)

    def predict(self, feature: float, group: tuple[str, str]) -> tuple[float, float]:
        """(estimate, sigma) of one candidate: from its most specific fitted group."""
        estimate = self.estimate(feature, group)
        return estimate.value, estimate.sigma

    def estimate(self, feature: float, group: tuple[str, str]) -> Estimate:
        """The `Estimate` of one candidate: from its most specific fitted group."""
        for key in group_keys(*group):
            calibration = self.groups.get(self.key(key))
            if calibration is not None:
                return calibration.estimate(float(feature), self.sigma_floor)
        raise KeyError(f"no calibration for {group}")

    def to_dict(self) -> dict[str, Any]:
        return {"sigma_floor": self.sigma_floor, "pairs": self.pairs, "feature": self.feature,
                "groups": {key: vars(value) for key, value in self.groups.items()}}

    @classmethod
    def from_dict(cls, content: dict[str, Any]) -> JudgeCalibration:
        return cls({key: GroupCalibration(**value) for key, value in content["groups"].items()},
                   content["sigma_floor"], content.get("pairs", 0), content.get("feature", "similarity"))


def calibration_rows(row_count: int, share: float, min_rows: int, seed: int) -> list[int]:
    """The rows judged in full to calibrate the cascade: ``max(min_rows, share * row_count)`` of them (all when the
    dataset is smaller), drawn with ``seed``, so that every process and every run draws the same."""
    count = min(row_count, max(min_rows, math.ceil(share * row_count)))
    return sorted(random.Random(f"cascade-calibration-{seed}").sample(range(row_count), count))


# ------------------------------------------------------------------------------------------------ one row


@dataclass
class RowScores:
    """The scores a row's selection works with: the positive's (always judged), one per candidate, where each came
    from, and the cascade's estimate and uncertainty (None where none was made)."""

    positive: float
    candidates: list[float]
    sources: list[str]
    estimates: list[float | None] = field(default_factory=list)
    sigmas: list[float | None] = field(default_factory=list)
    details: list[Any] = field(default_factory=list)

    @property
    def judged_pairs(self) -> int:
        """Pairs the large judge scored for this row, the positive included."""
        return 1 + self.sources.count("judge")


def decide_row(
    judge_candidates: Callable[[list[int]], list[float]],
    positive_score: float,
    estimates: Sequence[Estimate],
    select: Callable[[list[float]], list[int]],
    threshold: float,
    mode: str,
    margin: float = 2.0,
    budget: int | None = None,
    exact_labels: bool = True,
    top_m: int | None = None,
    label_temperature: float = AUDIT_TEMPERATURE,
    label_weight: float = 0.0,
) -> RowScores:
    """The cascade for one row (see the module docstring): which candidates the large judge scores.

    Args:
        judge_candidates: scores the given candidate positions with the large judge.
        positive_score: the positive's judge score.
        estimates: each candidate's calibrated `Estimate`.
        select: the candidate positions the selection picks from a list of scores (empty for the fallback).
        threshold: ``s_pos - beta``: a candidate scored above it is dropped as a false negative.
        mode: ``cascade`` or ``top_m``.
        margin: the cascade judges a candidate whose `Estimate.interval` (``margin`` sigmas, or the tail quantiles
            when wider) contains the threshold: its keep / drop decision could flip.
        budget: at most this many candidate calls (None: no cap).
        exact_labels: judge every picked negative whose soft label could matter (the walk is redone until they all
            are): one whose weight ``exp((high - positive_score) / label_temperature)`` at the top of its interval
            reaches ``label_weight`` (0: every picked negative).
        top_m: ``top_m`` mode: how many of the most similar candidates to judge (the first ones: candidates come in
            retrieval order).
    """
    count = len(estimates)
    scores = [float(estimate.value) for estimate in estimates]
    sources = ["estimate"] * count
    remaining = count if budget is None else max(0, budget)

    def judge(positions: list[int]) -> None:
        nonlocal remaining
        positions = [position for position in positions if sources[position] != "judge"][:remaining]
        if not positions:
            return
        for position, value in zip(positions, judge_candidates(positions)):
            scores[position] = float(value)
            sources[position] = "judge"
        remaining -= len(positions)

    uncertainty = [flip_distance(estimate, threshold, margin) for estimate in estimates]

    def label_matters(position: int) -> bool:
        return label_weight <= 0 or soft_label_weight(estimates[position].interval(margin)[1], positive_score,
                                                      label_temperature) >= label_weight

    def picked_mattering(scores: list[float]) -> list[int]:
        return [position for position in dict.fromkeys(select(scores)) if label_matters(position)]
    if mode == "top_m":
        judge(list(range(min(count, top_m if top_m is not None else remaining))))
    elif mode == "cascade":
        doubtful = sorted((position for position in range(count) if uncertainty[position] < 1),
                          key=lambda position: (uncertainty[position], position))
        if budget is None:
            judge(doubtful)
            while exact_labels:
                pending = [position for position in picked_mattering(scores) if sources[position] != "judge"]
                if not pending:
                    break
                judge(pending)
        else:
            # Most doubtful first (the picked negatives before others as doubtful), a few at a time since each round
            # moves the walk; a budget the rules do not use up goes to the next most doubtful candidates.
            round_size = max(1, math.ceil(budget / 4))
            while remaining > 0:
                picked = set(picked_mattering(scores)) if exact_labels else set()
                waiting = [position for position in range(count) if sources[position] != "judge"]
                if not waiting:
                    break
                waiting.sort(key=lambda position: (min(uncertainty[position], 1.0) if position in picked
                                                   else uncertainty[position], position not in picked, position))
                judge(waiting[:round_size])
    else:
        raise ValueError(f"judge mode {mode!r}: the cascade runs 'cascade' or 'top_m' ('full' judges everything).")
    return RowScores(positive_score, scores, sources, [estimate.value for estimate in estimates],
                     [estimate.sigma for estimate in estimates])


def soft_label_weight(score: float, positive_score: float, temperature: float = AUDIT_TEMPERATURE) -> float:
    """A negative's soft-label weight relative to the positive's: ``exp((score - positive_score) / temperature)``
    (capped at 1 above the positive: it then matters as much as the positive).

    >>> round(soft_label_weight(0.81, 0.95), 6)
    0.000912
    """
    return math.exp(min(0.0, score - positive_score) / temperature)


def flip_distance(estimate: Estimate, threshold: float, margin: float) -> float:
    """How far the threshold lies from the estimate, in units of the estimate's interval on that side: below 1, the
    judge's score may fall on the other side of the threshold and flip the keep / drop decision."""
    low, high = estimate.interval(margin)
    if estimate.value <= threshold:
        reach = high - estimate.value
        return (threshold - estimate.value) / reach if reach > 0 else math.inf
    reach = estimate.value - low
    return (estimate.value - threshold) / reach if reach > 0 else math.inf


# ------------------------------------------------------------------------------------------------ audit


def soft_labels(scores: Sequence[float], temperature: float = AUDIT_TEMPERATURE) -> list[float]:
    """softmax(score / temperature): the soft label distribution training aligns to."""
    top = max(scores)
    weights = [math.exp((value - top) / temperature) for value in scores]
    total = sum(weights)
    return [weight / total for weight in weights]


def kl_divergence(reference: Sequence[float], approximation: Sequence[float]) -> float:
    """KL(reference || approximation) in nats (terms where the reference is 0 add nothing)."""
    return sum(p * math.log(p / max(q, 1e-300)) for p, q in zip(reference, approximation) if p > 0)


def audit_row(chosen: Sequence[int], used_fallback: bool, scores: Sequence[float], full_chosen: Sequence[int],
              full_fallback: bool, full_scores: Sequence[float], positive_score: float,
              sources: Sequence[str]) -> dict[str, float]:
    """What the cascade's choice for one row costs against the full judge's: the same multiset of negatives,
    overlap (shared negatives over the full judge's), fallback agreement, KL between the soft labels of the
    cascade's negatives under the full judge's scores and under the cascade's, and the absolute error of each
    estimate the cascade kept."""
    mine, theirs = sorted(chosen), sorted(full_chosen)
    shared = sum(min(mine.count(position), theirs.count(position)) for position in set(theirs))
    errors = [abs(scores[position] - full_scores[position]) for position in range(len(scores))
              if sources[position] == "estimate"]
    if used_fallback or not chosen:
        kl = 0.0
    else:
        kept = [positive_score, *[scores[position] for position in chosen]]
        truth = [positive_score, *[full_scores[position] for position in chosen]]
        kl = max(0.0, kl_divergence(soft_labels(truth), soft_labels(kept)))  # round-off can give -1e-19
    return {
        "audit_rows": 1,
        "audit_identical_sets": int(mine == theirs and used_fallback == full_fallback),
        "audit_overlap_sum": shared / len(theirs) if theirs else float(not mine),
        "audit_fallback_agreement": int(used_fallback == full_fallback),
        "audit_kl_sum": kl,
        "audit_estimate_error_sum": sum(errors),
        "audit_estimates": len(errors),
    }


__all__ = [
    "AUDIT_TEMPERATURE",
    "Estimate",
    "flip_distance",
    "GroupCalibration",
    "JUDGE_MODES",
    "JudgeCalibration",
    "RowScores",
    "audit_row",
    "calibration_rows",
    "candidate_modality",
    "decide_row",
    "group_keys",
    "isotonic_fit",
    "isotonic_predict",
    "isotonic_values",
    "kl_divergence",
    "soft_label_weight",
    "soft_labels",
]
