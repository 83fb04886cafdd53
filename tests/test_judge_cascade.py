"""The judge cascade (modeling_unime.mining.cascade): calibration, the decision rule, the walk it follows, and a mining
run through it (sources, side table, audit, resume, budget), checked against independent computations."""

from __future__ import annotations

import itertools
import json
import math
import random

import pytest
import torch
from datasets import load_from_disk

from modeling_unime.mining import MiningConfig, run_mining
from modeling_unime.mining.cascade import (
    Estimate,
    JudgeCalibration,
    audit_row,
    calibration_rows,
    decide_row,
    flip_distance,
    isotonic_fit,
    isotonic_predict,
    isotonic_values,
    kl_divergence,
    soft_label_weight,
    soft_labels,
)
from modeling_unime.mining.selection import mine_with_pairs, walk
from modeling_unime.tiny import SYNTHETIC_COLOURS, SYNTHETIC_SHAPES, OracleJudge, build_tiny_unime, synthetic_pairs

# ------------------------------------------------------------------------------------------------ calibration


def isotonic_by_min_max(targets):
    """The isotonic fit at each point by the min-max formula (independent of pool-adjacent-violators):
    f_i = max_{j <= i} min_{k >= i} mean(y_j..y_k)."""
    n = len(targets)
    return [max(min(sum(targets[j:k + 1]) / (k + 1 - j) for k in range(i, n)) for j in range(i + 1)) for i in range(n)]


@pytest.mark.parametrize("seed", range(8))
def test_isotonic_fit_equals_the_min_max_formula(seed):
    rng = random.Random(seed)
    features = rng.sample(range(1000), 12)  # unsorted on purpose
    targets = [rng.random() for _ in features]
    order = sorted(range(12), key=lambda index: features[index])
    expected = isotonic_by_min_max([targets[index] for index in order])
    values = isotonic_values(features, targets)
    assert [values[index] for index in order] == pytest.approx(expected, abs=1e-12)
    knots_x, knots_y = isotonic_fit(features, targets)
    assert all(b > a for a, b in itertools.pairwise(knots_y)) and knots_x == sorted(knots_x)
    assert sorted(set(round(value, 12) for value in values)) == [round(value, 12) for value in knots_y]


def test_calibration_groups_fall_back_and_sigma_has_a_floor():
    features = [i / 100 for i in range(100)]
    scores = [feature for feature in features]  # exact: residuals 0, so sigma is the floor
    groups = [("vqa", "text")] * 60 + [("caption", "image")] * 40
    calibration = JudgeCalibration.fit(features, scores, groups, bins=4, sigma_floor=0.07, min_points=50)
    assert set(calibration.groups) == {"vqa|text", "*|text", "*|*"}  # caption|image and *|image have < 50 points
    estimate, sigma = calibration.predict(0.3, ("vqa", "text"))
    assert estimate == pytest.approx(0.3) and sigma == 0.07
    # an unfitted group uses the broader one: (caption, image) -> (*, image) is not fitted -> (*, *)
    assert calibration.predict(0.9, ("caption", "image")) == calibration.groups["*|*"].predict(0.9, 0.07)
    again = JudgeCalibration.from_dict(json.loads(json.dumps(calibration.to_dict())))
    assert again.predict(0.55, ("vqa", "text")) == calibration.predict(0.55, ("vqa", "text"))


def test_sigma_is_the_residual_spread_per_bin():
    # two similarities, four judge scores each: the fit is each one's mean, the spread their deviation from it
    features = [0.1] * 4 + [0.9] * 4
    scores = [0.0, 0.2, 0.0, 0.2, 1.0, 0.6, 1.0, 0.6]
    calibration = JudgeCalibration.fit(features, scores, [("t", "text")] * 8, bins=2, sigma_floor=1e-6, min_points=1)
    group = calibration.groups["t|text"]
    assert group.knots_x == pytest.approx([0.1, 0.9]) and group.knots_y == pytest.approx([0.1, 0.8])
    assert group.bin_sigmas == pytest.approx([0.1, 0.2])
    assert calibration.predict(0.1, ("t", "text")) == pytest.approx((0.1, 0.1))
    assert calibration.predict(0.95, ("t", "text")) == pytest.approx((0.8, 0.2))
    assert calibration.predict(0.5, ("t", "text"))[0] == pytest.approx(0.45)  # linear between the knots


def test_calibration_rows_are_seeded_and_sized():
    assert calibration_rows(1000, 0.05, 20, seed=0) == calibration_rows(1000, 0.05, 20, seed=0)
    assert len(calibration_rows(1000, 0.05, 20, seed=0)) == 50
    assert len(calibration_rows(100, 0.05, 20, seed=0)) == 20
    assert calibration_rows(10, 0.05, 20, seed=0) == list(range(10))
    assert calibration_rows(1000, 0.05, 20, seed=0) != calibration_rows(1000, 0.05, 20, seed=1)


# ------------------------------------------------------------------------------------------------ the decision


def select_like_mining(scores, positive, beta=0.01, num_negatives=4, interval=2):
    config = MiningConfig(beta=beta, num_negatives=num_negatives, interval=interval)
    selection = walk(scores, positive, config, row_index=0)
    return [] if selection.used_fallback else selection.chosen


def run_cascade(truth, estimates, sigmas, positive, margin=2.0, budget=None, exact=True, label_weight=0.0):
    calls = []

    def judge(positions):
        calls.extend(positions)
        return [truth[position] for position in positions]

    # residual tails at 0: the interval is estimate +- margin * sigma
    intervals = [Estimate(value, sigma, 0.0, 0.0) for value, sigma in zip(estimates, sigmas)]
    scored = decide_row(judge, positive, intervals, lambda scores: select_like_mining(scores, positive),
                        positive - 0.01, "cascade", margin, budget, exact, label_weight=label_weight)
    return scored, calls


@pytest.mark.parametrize("seed", range(40))
def test_when_every_estimate_is_within_the_margin_the_cascade_selects_what_the_full_judge_selects(seed):
    rng = random.Random(seed)
    count, positive = 20, 0.6
    truth = [rng.random() for _ in range(count)]
    sigmas = [rng.uniform(0.02, 0.1) for _ in range(count)]
    # every true score within margin * sigma of its estimate (the cascade's promise holds exactly then)
    estimates = [value + rng.uniform(-0.99, 0.99) * 2.0 * sigma for value, sigma in zip(truth, sigmas)]
    scored, calls = run_cascade(truth, estimates, sigmas, positive)
    assert select_like_mining(scored.candidates, positive) == select_like_mining(truth, positive)
    chosen = select_like_mining(scored.candidates, positive)
    assert all(scored.sources[position] == "judge" for position in chosen)  # exact soft labels
    assert len(calls) == len(set(calls))  # no pair judged twice
    # every candidate whose interval holds the threshold was judged: nothing skipped next to it
    threshold = positive - 0.01
    for position in range(count):
        if abs(estimates[position] - threshold) < 2.0 * sigmas[position]:
            assert scored.sources[position] == "judge", position
    # and the rest kept their estimates
    for position, source in enumerate(scored.sources):
        expected = truth[position] if source == "judge" else estimates[position]
        assert scored.candidates[position] == expected


def test_a_wrong_estimate_of_a_picked_negative_moves_the_walk_and_the_cascade_follows():
    positive = 0.9
    truth = [0.2, 0.95, 0.3, 0.1, 0.4, 0.2]     # candidate 1 is a false negative: the judge drops it
    estimates = [0.2, 0.3, 0.3, 0.1, 0.4, 0.2]  # ... but its estimate says keep, far from the threshold
    sigmas = [0.05] * 6
    scored, calls = run_cascade(truth, estimates, sigmas, positive)
    assert 1 in calls  # picked by the walk on the estimates, so judged: then dropped
    assert select_like_mining(scored.candidates, positive) == select_like_mining(truth, positive)


@pytest.mark.parametrize("seed", range(10))
def test_a_picked_negative_keeps_its_estimate_only_where_its_soft_label_weight_cannot_reach_the_floor(seed):
    rng = random.Random(seed)
    count, positive, tau, floor = 16, 0.9, 0.02, 1e-3
    truth = [rng.choice([rng.uniform(0.0, 0.6), rng.uniform(0.7, 0.88)]) for _ in range(count)]
    sigmas = [0.03] * count
    estimates = [value + rng.uniform(-0.05, 0.05) for value in truth]
    scored, calls = run_cascade(truth, estimates, sigmas, positive, label_weight=floor)
    chosen = select_like_mining(scored.candidates, positive)
    for position in chosen:
        top = estimates[position] + 2.0 * sigmas[position]
        weight_at_top = math.exp((top - positive) / tau)  # the soft label's weight against the positive's
        assert (scored.sources[position] == "judge") == (weight_at_top >= floor), (position, top)
    # what the estimates changed in the soft labels is bounded by the floor: the KL stays tiny
    kept = soft_labels([positive, *[scored.candidates[position] for position in chosen]], tau)
    exact = soft_labels([positive, *[truth[position] for position in chosen]], tau)
    assert kl_divergence(exact, kept) < 2 * floor * len(chosen)
    assert soft_label_weight(0.81, 0.95) == pytest.approx(math.exp(-7.0))
    assert soft_label_weight(0.99, 0.95) == 1.0  # above the positive it weighs as much as the positive


def test_the_tail_quantiles_widen_the_interval_where_the_judge_strayed():
    # 99 pairs where the judge agrees with the similarity, one where it says 0.95 at a low similarity
    features = [i / 100 for i in range(100)]
    scores = [0.05] * 100
    scores[10] = 0.95
    calibration = JudgeCalibration.fit(features, scores, [("t", "text")] * 100, bins=2, sigma_floor=0.01,
                                       min_points=1, tail=0.0)
    group = calibration.groups["t|text"]
    low_bin = calibration.estimate(0.2, ("t", "text"))
    strayed = 0.95 - isotonic_predict(group.knots_x, group.knots_y, 0.10)
    assert low_bin.high == pytest.approx(strayed)  # the largest residual of the bin
    assert low_bin.interval(2.0)[1] == pytest.approx(low_bin.value + strayed)
    high_bin = calibration.estimate(0.8, ("t", "text"))
    assert high_bin.interval(2.0)[1] == pytest.approx(high_bin.value + 2 * 0.01)  # nothing strayed there
    assert flip_distance(low_bin, 0.94, 2.0) < 1 < flip_distance(high_bin, 0.94, 2.0)


def test_a_budget_caps_the_calls_and_judges_the_most_uncertain_first():
    positive = 0.5
    truth = [0.1, 0.48, 0.52, 0.3, 0.7, 0.2, 0.495, 0.9]
    estimates = [0.1, 0.47, 0.5, 0.3, 0.7, 0.2, 0.49, 0.9]
    sigmas = [0.05] * 8
    scored, calls = run_cascade(truth, estimates, sigmas, positive, budget=2, exact=False)
    assert len(calls) == 2
    # |e - 0.49| / (2 * 0.05): candidate 6 is 0, candidate 2 is 0.1, candidate 1 is 0.2
    assert sorted(calls) == [2, 6]
    # a budget the rules leave unused goes to the next most doubtful: all of it is spent
    scored, calls = run_cascade(truth, estimates, sigmas, positive, budget=5, exact=False)
    assert calls[:2] == [6, 2] and len(calls) == 5 and calls[2] == 1


def test_top_m_judges_the_first_m():
    calls = []
    scored = decide_row(lambda positions: calls.extend(positions) or [0.0] * len(positions), 0.5,
                        [Estimate(0.2, 0.1, 0.0, 0.0)] * 6, lambda scores: [], 0.49, "top_m", top_m=3)
    assert calls == [0, 1, 2] and scored.sources == ["judge"] * 3 + ["estimate"] * 3


# ------------------------------------------------------------------------------------------------ audit


def test_audit_row_against_hand_computation():
    scores = [0.2, 0.5, 0.3]
    full = [0.25, 0.5, 0.3]
    values = audit_row([0, 2], False, scores, [1, 2], False, full, 0.9, ["estimate", "judge", "judge"])
    assert values["audit_identical_sets"] == 0 and values["audit_overlap_sum"] == 0.5
    assert values["audit_estimate_error_sum"] == pytest.approx(0.05) and values["audit_estimates"] == 1
    truth, kept = soft_labels([0.9, 0.25, 0.3]), soft_labels([0.9, 0.2, 0.3])
    expected = sum(p * math.log(p / q) for p, q in zip(truth, kept))
    assert values["audit_kl_sum"] == pytest.approx(expected)
    assert kl_divergence([0.5, 0.5], [0.5, 0.5]) == 0.0


# ------------------------------------------------------------------------------------------------ a mining run


def oracle_world(tmp_path, count=24):
    rows = synthetic_pairs(count, tmp_path / "images", seed=3)
    embedder, processor = build_tiny_unime("qwen2_vl")
    embedder.processor = processor
    return rows, embedder, OracleJudge(SYNTHETIC_COLOURS, SYNTHETIC_SHAPES)


class Counting:
    def __init__(self, judge):
        self.judge, self.pairs = judge, 0

    def score(self, query_text, query_image, candidates):
        self.pairs += len(candidates)
        return self.judge.score(query_text, query_image, candidates)


def test_cascade_mining_records_sources_pairs_and_budget(tmp_path):
    rows, embedder, oracle = oracle_world(tmp_path)
    judge = Counting(oracle)
    config = MiningConfig(top_k=8, num_negatives=3, interval=2, judge_mode="cascade", cascade_calibration_min_rows=6,
                          cascade_audit=True, beta=0.01)
    result = mine_with_pairs(rows, embedder, judge, config=config, image_root=tmp_path / "images", verbose=False)
    dataset, stats, pairs = result.dataset, result.stats, result.pairs
    assert len(pairs) == sum(1 for _ in pairs) and set(pairs["source"]) <= {"judge", "estimate"}
    judged_in_table = pairs["source"].count("judge")
    # the large judge scored: each row's positive, each judged candidate; plus the calibration (cached: counted once
    # in the table, the judge saw those pairs twice: once to calibrate, once when their row was mined)
    assert stats.judge_pairs == len(rows) + judged_in_table
    assert stats.estimated_pairs == pairs["source"].count("estimate") > 0
    for row in dataset:
        assert len(row["judge_score_source"]) == len(row["judge_scores"]) and row["judge_score_source"][0] == "judge"
        # a negative keeps its estimate only where its soft label weighs under 1e-3 of the positive's
        for score, source in zip(row["judge_scores"][1:], row["judge_score_source"][1:]):
            assert source in ("judge", "fallback") or soft_label_weight(score, row["judge_scores"][0]) < 1e-3
    exact = mine_with_pairs(rows, embedder, judge, config=config, image_root=tmp_path / "images", verbose=False,
                            cascade_label_weight=0.0).dataset
    assert {source for sources in exact["judge_score_source"] for source in sources[1:]} <= {"judge", "fallback"}
    budget = stats.judge_budget()
    assert budget["judge_share"] == pytest.approx(stats.judge_pairs / (stats.judge_pairs + stats.estimated_pairs))
    assert budget["audit_rows"] == len(rows)
    # the calibration rows were judged in full
    calibrated = set(calibration_rows(len(rows), 0.05, 6, 0))
    for index in calibrated:
        assert set(pairs.filter(lambda pair, index=index: pair["row"] == index)["source"]) == {"judge"}


def test_a_margin_that_judges_everything_agrees_with_the_full_judge(tmp_path):
    rows, embedder, oracle = oracle_world(tmp_path)
    common = dict(top_k=8, num_negatives=3, interval=2, image_root=tmp_path / "images", verbose=False)
    full = mine_with_pairs(rows, embedder, oracle, **common)
    everything = mine_with_pairs(rows, embedder, oracle, judge_mode="cascade", cascade_margin=1e9,
                                 cascade_calibration_min_rows=6, cascade_audit=True, **common)
    assert everything.dataset.select_columns(["neg_texts", "neg_images", "judge_scores"]).to_list() == \
        full.dataset.select_columns(["neg_texts", "neg_images", "judge_scores"]).to_list()
    assert everything.stats.estimated_pairs == 0 and everything.stats.audit_identical_sets == len(rows)


def test_run_mining_with_the_cascade_writes_the_side_table_and_resumes_without_judging(tmp_path):
    rows, embedder, oracle = oracle_world(tmp_path)
    config = MiningConfig(top_k=8, num_negatives=3, interval=2, judge_mode="cascade", cascade_calibration_min_rows=6,
                          shard_size=8)
    judge = Counting(oracle)
    first = run_mining(rows, embedder, judge, tmp_path / "run", config, image_root=tmp_path / "images", verbose=False)
    pairs = load_from_disk(str(tmp_path / "run" / "judged_pairs"))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["judge_budget"]["judge_pairs"] == summary["stats"]["judge_pairs"] > 0
    assert summary["judge_budget"]["calibration_queries"] == 6
    assert len(pairs) == summary["judge_budget"]["pairs"] - len(rows)  # every candidate, not the positives
    calibration = json.loads((tmp_path / "run" / "calibration.json").read_text())
    assert len(calibration["rows"]) == 6 and "*|*" in calibration["groups"]
    # a second run with the shards gone mines again through the judge cache: not one new judge call
    import shutil

    shutil.rmtree(tmp_path / "run" / "shards")
    again = Counting(oracle)
    second = run_mining(rows, embedder, again, tmp_path / "run", config, image_root=tmp_path / "images",
                        verbose=False)
    assert again.pairs == 0
    assert second.to_list() == first.to_list()


class HashJudge:
    """Scores no similarity can predict: a fixed pseudo-random number per pair, the positive scored 0.9 (about one
    candidate in ten scores above it and is a false negative)."""

    def __init__(self, positives):
        self.positives = positives

    def score(self, query_text, query_image, candidates):
        import hashlib

        scores = []
        for candidate in candidates:
            if (query_text, query_image, tuple(candidate)) in self.positives:
                scores.append(0.9)
                continue
            digest = hashlib.sha256(repr((query_text, query_image, tuple(candidate))).encode()).digest()
            scores.append(int.from_bytes(digest[:4], "big") / 2**32)
        return torch.tensor(scores)


def test_audit_finds_the_cascades_mistakes(tmp_path):
    """A judge the similarity cannot predict and a zero margin (nothing judged but the positives and the picked
    negatives): the cascade keeps false negatives the full judge drops; the audit's counts must equal a direct
    comparison of the two datasets."""
    rows, embedder, _ = oracle_world(tmp_path, count=36)
    root = tmp_path / "images"
    positives = {(row["query_text"], str(root / row["query_image"]) if row["query_image"] else None,
                  (row["pos_text"] or None, str(root / row["pos_image"]) if row["pos_image"] else None))
                 for row in rows}
    judge = HashJudge(positives)
    common = dict(top_k=8, num_negatives=3, interval=2, image_root=root, verbose=False)
    full = mine_with_pairs(rows, embedder, judge, **common)
    # margin 0, a tiny floor and the residuals' middle quantiles: the cascade judges almost nothing but positives
    cascade = mine_with_pairs(rows, embedder, judge, judge_mode="cascade", cascade_margin=0.0,
                              cascade_sigma_floor=1e-6, cascade_tail=0.49, cascade_exact_labels=False,
                              cascade_calibration_min_rows=6, cascade_audit=True, **common)
    identical = sum(
        sorted(zip(a["neg_texts"], a["neg_images"])) == sorted(zip(b["neg_texts"], b["neg_images"]))
        for a, b in zip(cascade.dataset, full.dataset)
    )
    assert cascade.stats.audit_rows == len(rows)
    assert cascade.stats.audit_identical_sets == identical
    assert identical < len(rows)  # the audit has something to find
    true_score = {(pair["row"], pair["candidate_text"], pair["candidate_image"]): pair["score"] for pair in full.pairs}
    kept_false_negatives = sum(
        true_score[(index, text or None, image)] > 0.89
        for index, row in enumerate(cascade.dataset) for text, image in zip(row["neg_texts"], row["neg_images"])
    )
    assert kept_false_negatives > 0 and cascade.stats.audit_estimates > 0


def test_judge_answers_are_checked_and_name_the_judge_and_the_query(tmp_path):
    rows, embedder, oracle = oracle_world(tmp_path, count=4)

    class Short:
        def score(self, query_text, query_image, candidates):
            return torch.zeros(len(candidates) - 1)

    class AsList:
        def score(self, query_text, query_image, candidates):
            return [0.1] * len(candidates)

    class WithNan:
        def score(self, query_text, query_image, candidates):
            return torch.tensor([float("nan")] * len(candidates))

    common = dict(top_k=3, num_negatives=2, image_root=tmp_path / "images", verbose=False)
    with pytest.raises(ValueError, match=r"the judge \(Short\) for row 0 .* answered \d+ score\(s\) for \d+ candidate"):
        mine_with_pairs(rows, embedder, Short(), **common)
    assert len(mine_with_pairs(rows, embedder, AsList(), **common).dataset) == 4  # a list is a fine answer
    with pytest.raises(ValueError, match=r"WithNan.*answered nan for candidate 0"):
        mine_with_pairs(rows, embedder, WithNan(), **common)


def test_progress_counts_every_pair(tmp_path):
    from modeling_unime.mining.inputs import MiningInputs, embed_inputs
    from modeling_unime.mining.selection import mine_rows
    from modeling_unime.mining.stats import SelectionStats

    rows, embedder, oracle = oracle_world(tmp_path, count=8)
    inputs = MiningInputs.from_dataset(rows, None, tmp_path / "images")
    embeddings = embed_inputs(embedder, inputs, tmp_path / "images", 8, None)

    class Recording:
        total = 0

        def update(self, count):
            self.total += count

    judge, progress = Counting(oracle), Recording()
    mine_rows(range(len(inputs)), inputs, embeddings, judge, MiningConfig(top_k=4, num_negatives=2),
              SelectionStats(num_negatives=2), progress=progress)
    assert progress.total == judge.pairs


def test_two_processes_give_the_one_process_cascade_dataset(tmp_path):
    import os
    import subprocess
    import sys

    from conftest import REPO_ROOT, free_port

    script = tmp_path / "mine.py"
    script.write_text(
        "import sys\n"
        "from modeling_unime.mining import MiningConfig, run_mining\n"
        "from modeling_unime.tiny import SYNTHETIC_COLOURS, SYNTHETIC_SHAPES, OracleJudge, build_tiny_unime, "
        "synthetic_pairs\n"
        "from pathlib import Path\n"
        "root = Path(sys.argv[1])\n"
        "rows = synthetic_pairs(24, root / 'images', seed=3)\n"
        "embedder, processor = build_tiny_unime('qwen2_vl'); embedder.processor = processor\n"
        "config = MiningConfig(top_k=8, num_negatives=3, interval=2, judge_mode='cascade', "
        "cascade_calibration_min_rows=6, shard_size=6)\n"
        "run_mining(rows, embedder, OracleJudge(SYNTHETIC_COLOURS, SYNTHETIC_SHAPES), root / sys.argv[2], config, "
        "image_root=root / 'images', verbose=False)\n"
    )
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    one = subprocess.run([sys.executable, str(script), str(tmp_path), "one"], env=environment, capture_output=True,
                         text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--main_process_port", str(free_port()), str(script), str(tmp_path), "two"],
                         env=environment, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    datasets = [load_from_disk(str(tmp_path / name / "dataset")).to_list() for name in ("one", "two")]
    # negatives that keep an estimate carry it as their score: equal up to the embeddings' last bits
    assert [{k: v for k, v in row.items() if k != "judge_scores"} for row in datasets[0]] == \
        [{k: v for k, v in row.items() if k != "judge_scores"} for row in datasets[1]]
    assert any("estimate" in row["judge_score_source"] for row in datasets[0])
    for one_row, two_row in zip(*datasets):
        assert one_row["judge_scores"] == pytest.approx(two_row["judge_scores"], abs=1e-5)
        judged = [index for index, source in enumerate(one_row["judge_score_source"]) if source != "estimate"]
        assert [one_row["judge_scores"][index] for index in judged] == \
            [two_row["judge_scores"][index] for index in judged]
    pairs = [load_from_disk(str(tmp_path / name / "judged_pairs")).to_list() for name in ("one", "two")]
    # embeddings computed in other batches differ in the last bits: so do similarities and estimates, nothing else
    floats = ("similarity", "estimate", "sigma", "score")
    assert [{k: v for k, v in pair.items() if k not in floats} for pair in pairs[0]] == \
        [{k: v for k, v in pair.items() if k not in floats} for pair in pairs[1]]
    for name in floats:
        assert [pair[name] for pair in pairs[0]] == pytest.approx([pair[name] for pair in pairs[1]], abs=1e-5)
    judged = [[pair["score"] for pair in side if pair["source"] == "judge"] for side in pairs]
    assert judged[0] == judged[1]  # judge scores are the same to the bit
    shards = json.loads((tmp_path / "two" / "summary.json").read_text())["shards"]
    assert {shard["mined_by"]["process_index"] for shard in shards} == {0, 1}


class NoisyJudge:
    """A smaller judge's stand-in: the oracle's score plus seeded noise per pair (the same pair, the same noise)."""

    def __init__(self, judge, noise):
        self.judge, self.noise, self.pairs = judge, noise, 0

    def score(self, query_text, query_image, candidates):
        self.pairs += len(candidates)
        exact = self.judge.score(query_text, query_image, candidates)
        return [float(value) + random.Random(repr((query_text, query_image, candidate))).uniform(-self.noise,
                                                                                                 self.noise)
                for value, candidate in zip(exact, candidates)]


def test_a_cheap_judge_drives_the_cascade_and_saves_large_judge_calls(tmp_path):
    rows, embedder, oracle = oracle_world(tmp_path, count=36)
    config = MiningConfig(top_k=10, num_negatives=3, interval=2, judge_mode="cascade", cascade_calibration_min_rows=6,
                          cascade_audit=True)
    by_similarity = mine_with_pairs(rows, embedder, Counting(oracle), config=config, image_root=tmp_path / "images",
                                    verbose=False)
    cheap = NoisyJudge(oracle, noise=0.03)
    result = mine_with_pairs(rows, embedder, Counting(oracle), config=config, image_root=tmp_path / "images",
                             verbose=False, cheap_judge=cheap)
    budget, baseline = result.stats.judge_budget(), by_similarity.stats.judge_budget()
    # the cheap judge's estimates are far closer to the large judge than the similarity's, so the cascade keeps the
    # full judge's negatives for no more large-judge calls (benchmarks/judge_cascade.py measures the saving where
    # the similarity cannot tell false negatives apart)
    assert budget["identical_sets"] == 1.0 and budget["mean_soft_label_kl"] < 1e-3
    assert budget["judge_share"] <= baseline["judge_share"]
    assert budget["mean_estimate_error"] < 0.25 * baseline["mean_estimate_error"]
    assert result.calibration.feature == "cheap_judge" and by_similarity.calibration.feature == "similarity"
    # every pair was scored once by the cheap judge while mining, and once more for the calibration rows
    assert result.stats.cheap_judge_pairs == len(result.pairs) == budget["cheap_judge_pairs"]
    assert cheap.pairs == result.stats.cheap_judge_pairs + result.calibration.pairs
    assert "pairs the cheap judge scored (its estimates)" in result.stats.summary()
    assert f"{result.stats.cheap_judge_pairs:>10,}" in result.stats.summary()
    replay = NoisyJudge(oracle, noise=0.03)
    for pair in result.pairs.select(range(0, len(result.pairs), 7)):
        image = None if pair["candidate_image"] is None else str(tmp_path / "images" / pair["candidate_image"])
        query_image = None if pair["query_image"] is None else str(tmp_path / "images" / pair["query_image"])
        expected = replay.score(pair["query_text"], query_image, [(pair["candidate_text"], image)])[0]
        assert pair["cheap_score"] == pytest.approx(expected)
    assert set(by_similarity.pairs["cheap_score"]) == {None}
    with pytest.raises(ValueError, match="cheap_judge is the cascade's cheap stage"):
        mine_with_pairs(rows, embedder, oracle, image_root=tmp_path / "images", verbose=False, cheap_judge=cheap)


def test_a_resumed_run_with_another_cheap_judge_is_refused(tmp_path):
    rows, embedder, oracle = oracle_world(tmp_path)
    config = MiningConfig(top_k=8, num_negatives=3, interval=2, judge_mode="cascade", cascade_calibration_min_rows=6,
                          shard_size=12)
    first = run_mining(rows, embedder, oracle, tmp_path / "run", config, image_root=tmp_path / "images",
                       verbose=False, cheap_judge=NoisyJudge(oracle, noise=0.03))
    assert (tmp_path / "run" / "cache" / "cheap_judge").is_dir()
    assert json.loads((tmp_path / "run" / "calibration.json").read_text())["feature"] == "cheap_judge"
    again = run_mining(rows, embedder, oracle, tmp_path / "run", config, image_root=tmp_path / "images",
                       verbose=False, cheap_judge=NoisyJudge(oracle, noise=0.03))
    assert again.to_list() == first.to_list()
    with pytest.raises(ValueError, match="was mined with another cheap judge"):
        run_mining(rows, embedder, oracle, tmp_path / "run", config, image_root=tmp_path / "images", verbose=False)
