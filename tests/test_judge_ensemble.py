"""Judge ensembles: the mean, each pair's disagreement kept through the cache and the side table, and the agreement
statistics against independent computations."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from modeling_unime.judge import judge_fingerprint
from modeling_unime.judge.ensemble import EnsembleJudge, cohen_kappa, judge_agreement, spearman
from modeling_unime.mining import MiningConfig, run_mining
from modeling_unime.tiny import SYNTHETIC_COLOURS, SYNTHETIC_SHAPES, OracleJudge, build_tiny_unime, synthetic_pairs


class Noisy:
    """The oracle plus seeded noise per pair: a second, imperfect judge."""

    def __init__(self, oracle, scale, seed):
        self.oracle, self.scale, self.seed = oracle, scale, seed

    def score(self, query_text, query_image, candidates):
        base = self.oracle.score(query_text, query_image, candidates).double()
        noise = [random.Random(f"{self.seed}:{query_text}:{query_image}:{tuple(c)}").uniform(-1, 1)
                 for c in candidates]
        return (base + self.scale * torch.tensor(noise, dtype=torch.float64)).clamp(0, 1)


def numpy_spearman(a, b):
    def ranks(values):
        values = np.asarray(values)
        order = values.argsort(kind="stable")
        ranked = np.empty(len(values))
        ranked[order] = np.arange(1, len(values) + 1)
        for value in np.unique(values):  # ties share their mean rank
            ranked[values == value] = ranked[values == value].mean()
        return ranked

    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def test_agreement_statistics_against_independent_computations():
    rng = random.Random(2)
    a = [round(rng.random(), 1) for _ in range(300)]  # rounded: ties
    b = [min(1.0, max(0.0, value + rng.gauss(0, 0.3))) for value in a]
    assert spearman(a, b) == pytest.approx(numpy_spearman(a, b), abs=1e-9)
    yes_a, yes_b = np.array(a) >= 0.5, np.array(b) >= 0.5
    observed = (yes_a == yes_b).mean()
    expected = yes_a.mean() * yes_b.mean() + (1 - yes_a.mean()) * (1 - yes_b.mean())
    assert cohen_kappa(a, b) == pytest.approx((observed - expected) / (1 - expected), abs=1e-9)
    report = judge_agreement(list(zip(a, b)), ["a", "b"])
    assert report["agreement"]["a / b"]["spearman"] == pytest.approx(spearman(a, b))
    assert report["mean_disagreement"] == pytest.approx(float(np.mean(np.std(np.array([a, b]), axis=0))))


def test_ensemble_mean_weights_and_refusals():
    oracle = OracleJudge(SYNTHETIC_COLOURS, SYNTHETIC_SHAPES)
    panel = EnsembleJudge([oracle, Noisy(oracle, 0.2, 1)], weights=[3, 1], names=["oracle", "noisy"])
    candidates = [("red", None), ("blue", None)]
    mean, details = panel.score_with_details("<|image_1|> what colour?", "shapes/red-circle.png", candidates)
    members = np.array([detail["members"] for detail in details])
    assert mean.tolist() == pytest.approx((members @ np.array([0.75, 0.25])).tolist())
    assert judge_fingerprint(panel) != judge_fingerprint(EnsembleJudge([oracle, Noisy(oracle, 0.2, 1)]))
    with pytest.raises(ValueError, match="at least two judges"):
        EnsembleJudge([oracle])
    with pytest.raises(ValueError, match="one distinct name per judge"):
        EnsembleJudge([oracle, oracle], names=["x", "x"])


def test_mining_with_an_ensemble_keeps_each_pairs_disagreement_through_the_cache(tmp_path):
    from datasets import load_from_disk

    rows = synthetic_pairs(12, tmp_path / "images", seed=4)
    embedder, processor = build_tiny_unime("qwen2_vl")
    embedder.processor = processor
    oracle = OracleJudge(SYNTHETIC_COLOURS, SYNTHETIC_SHAPES)
    panel = EnsembleJudge([oracle, Noisy(oracle, 0.3, 7)], names=["oracle", "noisy"])
    config = MiningConfig(top_k=4, num_negatives=2, interval=2, shard_size=6)
    run_mining(rows, embedder, panel, tmp_path / "run", config, image_root=tmp_path / "images", verbose=False)
    pairs = load_from_disk(str(tmp_path / "run" / "judged_pairs"))
    for pair in pairs:
        members = pair["member_scores"]
        assert len(members) == 2 and pair["score"] == pytest.approx(sum(members) / 2)
        assert pair["disagreement"] == pytest.approx(abs(members[0] - members[1]) / 2)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    agreement = summary["judge_agreement"]
    assert agreement["judges"] == ["oracle", "noisy"] and agreement["pairs"] == len(pairs)
    columns = list(zip(*pairs["member_scores"]))
    assert agreement["agreement"]["oracle / noisy"]["spearman"] == pytest.approx(spearman(*columns))
    assert "judge ensemble over" in (tmp_path / "run" / "summary.txt").read_text()
    # the shards gone, a second run is served from the judge cache: the member scores come back from its logs
    import shutil

    shutil.rmtree(tmp_path / "run" / "shards")
    run_mining(rows, embedder, panel, tmp_path / "run", config, image_root=tmp_path / "images", verbose=False)
    again = load_from_disk(str(tmp_path / "run" / "judged_pairs"))
    assert again["member_scores"] == pairs["member_scores"]
    assert all(not math.isnan(value) for value in again["disagreement"])


def test_the_mining_recipe_takes_several_judges_as_an_ensemble(tmp_path, monkeypatch, capsys):
    from conftest import run_recipe

    config = tmp_path / "mine.yaml"
    config.write_text(f"data: synthetic:6\nembedder: tiny:qwen2_vl\njudge: oracle, tiny:qwen2_5_vl\n"
                      f"output_dir: {tmp_path}\nmining: {{top_k: 4, beta: 0.0, num_negatives: 2, interval: 2}}\n")
    run_recipe(monkeypatch, "mine_hard_negatives.py", "--config", str(config))
    assert "judge: ensemble of oracle (no model), tiny:qwen2_5_vl: cpu" in capsys.readouterr().out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["judge_agreement"]["judges"] == ["oracle", "tiny:qwen2_5_vl"]
