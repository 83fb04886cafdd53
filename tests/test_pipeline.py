"""The main job's --quick mode (CI's smoke test): every stage runs and writes its outputs; numbers are not checked."""

import json
import runpy
import sys

import pytest
import torch

from conftest import REPO_ROOT


def run_recipe(monkeypatch, *arguments: str) -> None:
    """recipes/pipeline.py as from the command line, in this process."""
    monkeypatch.setattr(sys, "argv", ["pipeline", *arguments])
    runpy.run_path(str(REPO_ROOT / "recipes" / "pipeline.py"), run_name="__main__")


def test_quick_pipeline_runs_every_stage_and_writes_its_outputs(tmp_path, monkeypatch, capsys):
    pytest.importorskip("easy_vqa")
    from PIL import Image

    from evaluation.easyvqa import TASKS

    output = tmp_path / "run"
    run_recipe(monkeypatch, "--quick", "--output_dir", str(output))
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
    assert "Held-out pairwise accuracy" in capsys.readouterr().out
    assert set(results["reranker_pairwise_accuracy"]) == {"vqa_colour", "vqa_shape"}


def test_rerunning_the_quick_pipeline_resumes_from_the_saved_stages(tmp_path, monkeypatch, capsys):
    pytest.importorskip("easy_vqa")
    output = tmp_path / "run"
    run_recipe(monkeypatch, "--quick", "--output_dir", str(output))
    first = json.loads((output / "results.json").read_text())
    capsys.readouterr()
    run_recipe(monkeypatch, "--quick", "--output_dir", str(output))
    second = json.loads((output / "results.json").read_text())
    resumed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[resume]")]
    assert len(resumed) == 7  # baseline, judge, four variants, reranker: none trained again
    assert second["table"] == first["table"]
    assert second["curves"] == first["curves"]
    # a changed setting is a different run: the saved stages are not reused
    run_recipe(monkeypatch, "--quick", "--output_dir", str(output), "--seed", "1")
    assert not [line for line in capsys.readouterr().out.splitlines() if line.startswith("[resume]")]


def test_quick_ablation_reports_means_and_paired_differences_over_seeds(tmp_path):
    pytest.importorskip("easy_vqa")
    import statistics

    from evaluation.easyvqa import TASKS
    from evaluation.pipeline import PipelineConfig, ablation_variants, run_ablation

    config = PipelineConfig.quick(output_dir=str(tmp_path))
    report = run_ablation(config, seeds=[0, 1])
    assert set(report["per_seed"]) == {"seed-0", "seed-1"}
    labels = ["InfoNCE baseline", *ablation_variants(config)]
    for table in report["per_seed"].values():
        assert list(table) == labels
        assert all(set(scores) == {*TASKS, "mean"} for scores in table.values())
    control = "InfoNCE continued (control)"
    for label in labels:
        tables = list(report["per_seed"].values())
        means = [table[label]["mean"] for table in tables]
        differences = [table[label]["mean"] - table[control]["mean"] for table in tables]
        row = report["summary"][label]
        assert row["mean"] == pytest.approx(sum(means) / 2)
        assert row["mean_std"] == pytest.approx(abs(means[0] - means[1]) / 2 ** 0.5)
        assert row["minus_control"] == pytest.approx(statistics.fmean(differences))
    assert report["summary"][control]["minus_control"] == 0
    assert "| soft labels, tau 0.05 | 2 |" in (tmp_path / "ablation.md").read_text()


def test_judge_and_reranker_start_from_the_embedder_with_the_vision_tower_frozen():
    from evaluation.pipeline import PipelineConfig, _judge_from, _new_embedder
    from modeling_unime.testing import build_tiny_tokenizer

    embedder = _new_embedder(PipelineConfig.quick(), build_tiny_tokenizer("qwen2_vl"))
    judge = _judge_from(embedder)
    trainable = {name for name, parameter in judge.named_parameters() if parameter.requires_grad}
    assert trainable and not any(name.startswith("model.visual.") for name in trainable)
    assert any(name.startswith("model.language_model.") for name in trainable) and "lm_head.weight" in trainable
    assert all(torch.equal(value, judge.model.state_dict()[key]) for key, value in embedder.model.state_dict().items())
    assert torch.equal(judge.lm_head.weight, judge.model.get_input_embeddings().weight)


def test_a_changed_setting_redoes_only_the_stages_that_depend_on_it(tmp_path, capsys):
    pytest.importorskip("easy_vqa")
    from evaluation.pipeline import PipelineConfig, run_pipeline

    run_pipeline(PipelineConfig.quick(output_dir=str(tmp_path)))
    mined_markers = {name: (tmp_path / f"mined-{name}" / "pipeline_stage.json").stat().st_mtime_ns
                     for name in ("oracle", "mllm")}
    capsys.readouterr()
    run_pipeline(PipelineConfig.quick(output_dir=str(tmp_path), finetune_steps=3, rerank_top_k=3))
    out = capsys.readouterr().out
    resumed = {line.split()[1] for line in out.splitlines() if line.startswith("[resume]")}
    # the variants depend on finetune_steps; the baseline, the judge and the reranker do not, nor does evaluation
    assert resumed == {str(tmp_path / folder) for folder in ("baseline", "mllm-judge", "reranker")}
    assert {name: (tmp_path / f"mined-{name}" / "pipeline_stage.json").stat().st_mtime_ns
            for name in mined_markers} == mined_markers  # mining was loaded, not redone
