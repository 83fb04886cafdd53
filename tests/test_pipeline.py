"""The main job's --quick mode (CI's smoke test): every stage runs and writes its outputs; numbers are not checked."""

import json
import runpy
import sys

import pytest

from conftest import REPO_ROOT


def test_quick_pipeline_runs_every_stage_and_writes_its_outputs(tmp_path, monkeypatch, capsys):
    pytest.importorskip("easy_vqa")
    from PIL import Image

    from evaluation.easyvqa import TASKS

    output = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["pipeline", "--quick", "--output_dir", str(output)])
    runpy.run_path(str(REPO_ROOT / "recipes" / "pipeline.py"), run_name="__main__")
    results = json.loads((output / "results.json").read_text())
    assert list(results["seconds"]) == ["data", "baseline embedder", "judges", "mining", "UniME-V2 embedders",
                                        "reranker", "evaluation"]
    assert set(results["judge_pairwise_accuracy"]) == {"oracle", "mllm"}
    assert results["judge_pairwise_accuracy"]["oracle"] == {"vqa_colour": 100.0, "vqa_shape": 100.0}
    rows = results["table"]
    assert {"blind text-only baseline", "InfoNCE baseline", "+ InfoNCE continued (no hard negatives, no soft labels)",
            "+ hard negatives, hard labels", "+ UniME-V2 soft labels (oracle judge)",
            "+ UniME-V2 soft labels (mllm judge)"} <= set(rows)
    assert any(label.endswith("+ reranker (top-5)") for label in rows)
    assert all(set(scores) == {*TASKS, "mean"} for scores in rows.values())
    for folder in ("mined-oracle", "mined-mllm", "baseline", "reranker", "mllm-judge"):
        assert (output / folder).is_dir(), folder
    from datasets import load_from_disk

    mined = load_from_disk(str(output / "mined-oracle"))
    assert "judge_scores" in mined.column_names and len(mined) > 0
    assert Image.open(output / "summary.png").size[0] == 1100
    assert "| setting | judge |" in (output / "results.md").read_text()
    assert "Judge held-out pairwise accuracy" in capsys.readouterr().out
