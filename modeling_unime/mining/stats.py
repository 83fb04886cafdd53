"""`SelectionStats`: what each selection rule of mining did, summed over queries and processes, and the report
(with hints, and a WARNING block when a run is degenerate: too many fallbacks, a filter that removes almost
everything, a judge at chance)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from .rules import FALLBACK_SCORE

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




@dataclass
class SelectionStats:
    """Counts of what each selection rule did, summed over queries (and over workers with `merge`).

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
    judge_pairs: int = 0
    estimated_pairs: int = 0
    calibration_queries: int = 0
    cheap_judge_pairs: int = 0
    audit_rows: int = 0
    audit_identical_sets: int = 0
    audit_overlap_sum: float = 0.0
    audit_fallback_agreement: int = 0
    audit_kl_sum: float = 0.0
    audit_estimate_error_sum: float = 0.0
    audit_estimates: int = 0
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
        judge_pairs: int = 0,
        estimated_pairs: int = 0,
        calibration_queries: int = 0,
        cheap_judge_pairs: int = 0,
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
            "judge_pairs": judge_pairs,
            "estimated_pairs": estimated_pairs,
            "calibration_queries": calibration_queries,
            "cheap_judge_pairs": cheap_judge_pairs,
        }
        for name, increment in increments.items():
            increment = int(increment)
            if increment < 0:
                raise ValueError(f"counts only grow; got {name} += {increment}")
            setattr(self, name, getattr(self, name) + increment)

    def add_audit(self, values: dict[str, float]) -> None:
        """Add one row's cascade audit (`modeling_unime.mining.cascade.audit_row`) in place."""
        for name, value in values.items():
            if not name.startswith("audit_") or not hasattr(self, name):
                raise ValueError(f"not an audit count: {name!r}")
            if not value >= 0:
                raise ValueError(f"counts only grow; got {name} += {value}")
            setattr(self, name, getattr(self, name) + value)

    def judge_budget(self) -> dict[str, float | int]:
        """The large judge's share of the work: pairs it scored (positives included), pairs given an estimate
        instead, and the share of all pairs it scored; with the audit, how close the cascade came to the full
        judge (identical negative sets, overlap, fallback agreement, mean soft-label KL, mean estimate error)."""
        pairs = self.judge_pairs + self.estimated_pairs
        budget: dict[str, float | int] = {
            "judge_pairs": self.judge_pairs, "estimated_pairs": self.estimated_pairs, "pairs": pairs,
            "judge_share": self.judge_pairs / pairs if pairs else 0.0, "calibration_queries": self.calibration_queries,
            "cheap_judge_pairs": self.cheap_judge_pairs,
        }
        if self.audit_rows:
            budget.update(
                audit_rows=self.audit_rows,
                identical_sets=self.audit_identical_sets / self.audit_rows,
                mean_overlap=self.audit_overlap_sum / self.audit_rows,
                fallback_agreement=self.audit_fallback_agreement / self.audit_rows,
                mean_soft_label_kl=self.audit_kl_sum / self.audit_rows,
                mean_estimate_error=(self.audit_estimate_error_sum / self.audit_estimates
                                     if self.audit_estimates else 0.0),
            )
        return budget

    def merge(self, other: SelectionStats) -> SelectionStats:
        """A new `SelectionStats` with both sets of counts added (e.g. one per worker); neither is changed."""
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
        if self.estimated_pairs:
            budget = self.judge_budget()
            lines.append(f"  {'pairs the large judge scored (positives included)':<{width}}  "
                         f"{self.judge_pairs:>10,}  ({100 * budget['judge_share']:.1f}% of {budget['pairs']:,} "
                         f"pairs; {self.calibration_queries:,} calibration queries judged in full)")
            lines.append(f"  {'pairs given a calibrated estimate instead':<{width}}  {self.estimated_pairs:>10,}")
        if self.cheap_judge_pairs:
            lines.append(f"  {'pairs the cheap judge scored (its estimates)':<{width}}  {self.cheap_judge_pairs:>10,}")
        if self.audit_rows:
            budget = self.judge_budget()
            lines.append(
                f"Audit against the full judge over {self.audit_rows:,} queries: identical negative sets "
                f"{100 * budget['identical_sets']:.1f}%, mean overlap {100 * budget['mean_overlap']:.1f}%, fallback "
                f"agreement {100 * budget['fallback_agreement']:.1f}%, mean soft-label KL "
                f"{budget['mean_soft_label_kl']:.4f} nats, mean |estimate - judge| "
                f"{budget['mean_estimate_error']:.4f}")
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

        A run is flagged when more than `DEGENERATE_FALLBACK_SHARE` of the queries had no candidate left after
        the false-negative filter (the paper reports under 1%: those rows get random negatives scored 1.0, or are
        dropped), when the filter removed more than `DEGENERATE_FILTER_SHARE` of the retrieved candidates, or
        when the judge scored the positive above fewer than `CHANCE_WIN_RATE` of at least
        `MIN_JUDGED_FOR_CHANCE` judged candidates (a judge at chance scores it above about half of them).

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

        def share(count: int) -> str:
            return f"{100 * count / queries:.1f}% of queries"

        if self.queries_short_of_negatives:
            hints.append(f"{share(self.queries_short_of_negatives)} had fewer than {self.num_negatives} unique "
                         "negatives: raise top_k or lower beta.")
        if self.queries_used_fallback:
            hints.append(
                f"{share(self.queries_used_fallback)} used the paper's fallback (random top-k candidates scored 1.0, "
                "which puts more target mass on negatives than on the positive): lower beta, raise top_k, or use "
                "empty_fallback='drop'."
            )
        if self.queries_dropped:
            hints.append(f"{share(self.queries_dropped)} were dropped: raise top_k or lower beta to keep them.")
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
            hints.append(
                f"{share(self.queries_positive_below_all)}: the judge scored the positive below every candidate (a "
                "noisy pair or a weak judge); inspect these rows or use a stronger judge."
            )
        if self.removed_as_positive > 2 * queries:
            hints.append(
                f"{self.removed_as_positive / queries:.1f} pool items per query were the positive or a duplicate "
                "of it: the pool holds many repeated targets; deduplicate it."
            )
        return hints


__all__ = [
    "CHANCE_WIN_RATE",
    "DEGENERATE_FALLBACK_SHARE",
    "DEGENERATE_FILTER_SHARE",
    "MIN_JUDGED_FOR_CHANCE",
    "SelectionStats",
]
