"""The documented mining defaults are the paper's (arXiv 2510.13515, "MLLM-as-a-Judge for Hard Negatives Mining"):
top-50 retrieval, no similarity threshold (delta is unpublished), beta 0.01, 10 negatives, cyclical interval 5, the
paper's empty-set fallback scored 1.0."""

from __future__ import annotations

import inspect

import yaml

from conftest import REPO_ROOT
from modeling_unime.mining import MiningConfig
from modeling_unime.mining.rules import FALLBACK_SCORE, cyclical_sample

PAPER = {"top_k": 50, "similarity_threshold": None, "beta": 0.01, "num_negatives": 10, "interval": 5,
         "empty_fallback": "paper"}


def test_mining_config_defaults_are_the_papers():
    config = MiningConfig()
    assert {name: getattr(config, name) for name in PAPER} == PAPER


def test_selection_defaults_are_the_papers():
    defaults = {name: parameter.default for name, parameter in inspect.signature(cyclical_sample).parameters.items()}
    assert (defaults["num_negatives"], defaults["interval"], defaults["empty_fallback"]) == (10, 5, "paper")
    assert FALLBACK_SCORE == 1.0


def test_the_papers_recipe_config_has_the_papers_settings():
    settings = yaml.safe_load((REPO_ROOT / "recipes" / "configs" / "mine-qwen25vl-7b.yaml").read_text())
    assert {name: settings["mining"][name] for name in PAPER} == PAPER
    assert settings["judge"] == "Qwen/Qwen2.5-VL-7B-Instruct"
