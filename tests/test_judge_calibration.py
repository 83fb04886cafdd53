"""Contextual calibration of the judge's Yes prior and the judge audit, against independent computations."""

from __future__ import annotations

import math
import random

import pytest
import torch

from conftest import tiny_judge
from modeling_unime.judge import MLLMJudge, judge_fingerprint
from modeling_unime.judge.calibration import ContextualCalibration, blank_image, judge_audit
from modeling_unime.mining.judging import CachedJudge


def sigmoid(value):
    return 1 / (1 + math.exp(-value))


def logit(value):
    return math.log(value / (1 - value))


def test_calibrated_scores_are_the_raw_scores_with_the_prior_divided_out(tmp_path):
    judge = MLLMJudge(*tiny_judge())
    calibrated = ContextualCalibration(judge)
    image = blank_image(56).copy()
    image.putpixel((3, 3), (255, 0, 0))
    candidates = [("red", None), ("a blue square", None), (None, image), ("a shape", image)]
    got = calibrated.score("What colour is the shape?", None, candidates)
    # independently: the raw judge on each candidate and on each content-free candidate, one call each
    raw = [float(judge.score("What colour is the shape?", None, [candidate])[0]) for candidate in candidates]
    free = {kind: float(judge.score("What colour is the shape?", None, [item])[0]) for kind, item in (
        ("text", ("N/A", None)), ("image", (None, calibrated.content_free_image)),
        ("image+text", ("N/A", calibrated.content_free_image)))}
    kinds = ["text", "text", "image", "image+text"]
    expected = [sigmoid(logit(score) - logit(free[kind])) for score, kind in zip(raw, kinds)]
    assert got.tolist() == pytest.approx(expected, abs=1e-5)
    assert set(calibrated.priors) == {"text", "image", "image+text"}
    assert calibrated.mean_priors()["text"] == pytest.approx(free["text"], abs=1e-5)


def test_calibration_is_applied_once_and_keyed_apart_from_the_raw_judge(tmp_path):
    judge = MLLMJudge(*tiny_judge())
    calibrated = ContextualCalibration(judge)
    with pytest.raises(ValueError, match="applied twice"):
        ContextualCalibration(calibrated)
    assert judge_fingerprint(calibrated) != judge_fingerprint(judge)
    cached = CachedJudge(calibrated, tmp_path, judge_fingerprint(calibrated))
    first = cached.score("a red circle", None, [("red", None), ("blue", None)])
    again = CachedJudge(calibrated, tmp_path, judge_fingerprint(calibrated)).score(
        "a red circle", None, [("red", None), ("blue", None)])
    assert again.tolist() == first.tolist()


def brute_force_auc(scores, labels):
    positives = [s for s, label in zip(scores, labels) if label]
    negatives = [s for s, label in zip(scores, labels) if not label]
    total = 0.0
    for p in positives:
        for n in negatives:
            total += 1.0 if p > n else 0.5 if p == n else 0.0
    return total / (len(positives) * len(negatives))


def test_judge_audit_against_independent_computation():
    rng = random.Random(3)
    labels = [rng.random() < 0.3 for _ in range(200)]
    scores = [min(1.0, max(0.0, rng.gauss(0.7 if label else 0.4, 0.2))) for label in labels]
    scores[:4] = [0.5, 0.5, 0.5, 0.5]  # ties
    groups = [index // 10 for index in range(200)]
    audit = judge_audit(scores, labels, groups)
    assert audit["auc"] == pytest.approx(brute_force_auc(scores, labels), abs=1e-6)
    assert audit["brier"] == pytest.approx(sum((s - y) ** 2 for s, y in zip(scores, labels)) / 200, abs=1e-6)
    # ECE from numpy histogram bins
    import numpy as np

    s, y = np.array(scores), np.array(labels, dtype=float)
    index = np.minimum((s * 10).astype(int), 9)
    ece = sum((index == b).mean() * abs(s[index == b].mean() - y[index == b].mean())
              for b in range(10) if (index == b).any())
    assert audit["ece"] == pytest.approx(ece, abs=1e-6)
    assert audit["histogram"] == np.bincount(index, minlength=10).tolist()
    won = compared = 0.0
    for group in set(groups):
        members = [(sc, la) for sc, la, gr in zip(scores, labels, groups) if gr == group]
        for p, lp in members:
            for n, ln in members:
                if lp and not ln:
                    compared += 1
                    won += 1.0 if p > n else 0.5 if p == n else 0.0
    assert audit["pairwise_accuracy"] == pytest.approx(won / compared, abs=1e-6)


def test_a_judge_that_always_says_its_prior_is_not_calibrated_by_luck():
    class Constant:
        def score(self, query_text, query_image, candidates):
            return torch.full((len(candidates),), 0.7)

    calibrated = ContextualCalibration(Constant())
    assert calibrated.score("q", None, ["a", "b"]).tolist() == pytest.approx([0.5, 0.5])
    audit = judge_audit([0.5, 0.5, 0.5], [1, 0, 0])
    assert audit["auc"] == 0.5 and audit["pairwise_accuracy"] == 0.5


def test_the_mining_recipe_calibrates_the_judge_and_audits_it(tmp_path, monkeypatch, capsys):
    import json

    from datasets import load_from_disk

    from conftest import run_recipe

    config = tmp_path / "mine.yaml"
    config.write_text(f"data: synthetic:8\nembedder: tiny:qwen2_vl\njudge: tiny:qwen2_5_vl\noutput_dir: {tmp_path}\n"
                      "judge_calibration: contextual\nmining: {top_k: 4, beta: 0.0, num_negatives: 2, interval: 2}\n")
    run_recipe(monkeypatch, "mine_hard_negatives.py", "--config", str(config))
    out = capsys.readouterr().out
    assert "(contextual calibration of its Yes prior)" in out and "judge Yes prior on content-free candidates" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    audit = summary["judge_audit"]
    assert set(audit["prior"]) == {"text", "image"}  # synthetic:N has colour words and shape images
    # the audit equals an independent computation from the side table
    pairs = load_from_disk(str(tmp_path / "judged_pairs"))
    positives = {row: score for row, score in zip(pairs["row"], pairs["positive_score"])}
    scores = [*pairs["score"], *positives.values()]
    labels = [0] * len(pairs) + [1] * len(positives)
    assert audit["auc"] == pytest.approx(brute_force_auc(scores, labels), abs=1e-6)
    assert audit["positives"] == 8 and audit["negatives"] == len(pairs)
    card = (tmp_path / "dataset" / "README.md").read_text()
    assert "judge audit (each row's positive against its judged candidates" in card
