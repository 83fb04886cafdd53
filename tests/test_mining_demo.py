"""The README's tiny mining demo (recipes/configs/mine-tiny-cpu.yaml) and the degenerate-run WARNING of the mining
summary: the shipped demo stays on the method's main path, says that its random judge is at chance, and a judge that
works (the synthetic oracle) gives a summary without any WARNING."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import REPO_ROOT, run_recipe
from modeling_unime.mining.stats import DEGENERATE_FALLBACK_SHARE

TINY_CONFIG = REPO_ROOT / "recipes" / "configs" / "mine-tiny-cpu.yaml"


def mine(monkeypatch, config: str, *arguments: str) -> None:
    run_recipe(monkeypatch, "mine_hard_negatives.py", "--config", config, *arguments)


def degenerate_config(tmp_path, beta: float):
    """The tiny demo with another beta (the paper's 0.01 was the degenerate setting)."""
    settings = yaml.safe_load(TINY_CONFIG.read_text())
    settings["mining"]["beta"] = beta
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("demo") / "run"
    with pytest.MonkeyPatch.context() as monkeypatch:
        mine(monkeypatch, str(TINY_CONFIG), "--output_dir", str(output))
    return output


def test_the_shipped_tiny_demo_is_on_the_main_path_and_says_its_judge_is_at_chance(demo_run):
    summary = json.loads((demo_run / "summary.json").read_text())
    stats = summary["stats"]
    assert summary["rows_written"] == stats["queries"] == 48
    emptied = (stats["queries_used_fallback"] + stats["queries_dropped"]) / stats["queries"]
    assert emptied <= DEGENERATE_FALLBACK_SHARE, "the demo fell back to random negatives again"
    assert stats["removed_as_false_negative"] < 0.9 * stats["candidates_retrieved"]
    # Its judge is a tiny random model: the summary says so, in summary.txt and in the card.
    assert len(summary["degenerate"]) == 1
    assert summary["degenerate"][0].startswith("the judge scored the positive above only")
    text = (demo_run / "summary.txt").read_text()
    assert text.rstrip().splitlines()[-1].startswith("WARNING: likely cause and fix: a judge at chance")
    assert "WARNING: degenerate mining run" in (demo_run / "dataset" / "README.md").read_text()


def test_the_papers_beta_on_the_tiny_random_judge_is_flagged_degenerate(tmp_path, monkeypatch, capsys):
    mine(monkeypatch, str(degenerate_config(tmp_path, 0.01)), "--output_dir", str(tmp_path / "run"))
    printed = capsys.readouterr().out
    text = (tmp_path / "run" / "summary.txt").read_text()
    for report in (printed, text):
        assert "WARNING: degenerate mining run" in report
        assert "of queries (" in report and "had no candidate left after the false-negative filter" in report
        assert "lower beta below that gap" in report and "raise top_k" in report and "empty_fallback: drop" in report
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stats"]["queries_used_fallback"] > DEGENERATE_FALLBACK_SHARE * summary["stats"]["queries"]


def test_the_demo_with_the_oracle_judge_is_not_degenerate(tmp_path, monkeypatch, capsys):
    mine(monkeypatch, str(TINY_CONFIG), "--output_dir", str(tmp_path / "run"), "--judge", "oracle")
    out = capsys.readouterr().out
    assert "judge: oracle (no model)" in out and "WARNING" not in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["degenerate"] == [] and summary["stats"]["queries_used_fallback"] == 0
    assert summary["stats"]["candidates_below_positive"] == summary["stats"]["candidates_judged"] > 0
    assert "WARNING" not in (tmp_path / "run" / "summary.txt").read_text()


def test_the_oracle_judge_refuses_other_data(tmp_path, monkeypatch):
    config = tmp_path / "mine.yaml"
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps([{"query_text": "q", "query_image": None, "pos_text": "a", "pos_image": None}]))
    config.write_text(f"data: {rows}\nembedder: tiny:qwen2_vl\njudge: oracle\n")
    with pytest.raises(ValueError, match="oracle knows only the synthetic:N data"):
        mine(monkeypatch, str(config), "--output_dir", str(tmp_path / "run"))


def test_oracle_judge_scores():
    from modeling_unime.tiny import SYNTHETIC_COLOURS, SYNTHETIC_SHAPES, OracleJudge

    judge = OracleJudge(SYNTHETIC_COLOURS, SYNTHETIC_SHAPES)  # what the recipe's --judge oracle builds
    vqa = judge.score("<|image_1|>\nWhat colour is the shape?", "shapes/blue-square.png",
                      [("blue", None), ("red", None), (None, "shapes/blue-square.png")])
    assert vqa.tolist() == pytest.approx([0.95, 0.05, 0.05])
    caption = judge.score("Find an image of a blue square.", None,
                          [(None, "shapes/blue-square.png"), (None, "shapes/blue-circle.png"),
                           (None, "shapes/red-circle.png"), ("blue", None)])
    assert caption.tolist() == pytest.approx([0.95, 0.5, 0.05, 0.05])
