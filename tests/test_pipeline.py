"""The main job's --quick mode (CI's smoke test): every stage runs and writes its outputs; numbers are not checked.
The listwise measurements are checked against an independent computation with stand-in models."""

import hashlib
import json
import runpy
import sys

import pytest
import torch

from conftest import REPO_ROOT, run_recipe


def run_pipeline_recipe(monkeypatch, *arguments: str) -> None:
    run_recipe(monkeypatch, "pipeline.py", *arguments)


def test_quick_pipeline_runs_every_stage_and_writes_its_outputs(tmp_path, monkeypatch, capsys):
    pytest.importorskip("easy_vqa")
    from PIL import Image

    from evaluation.demo.easyvqa import TASKS

    output = tmp_path / "run"
    run_pipeline_recipe(monkeypatch, "--quick", "--output_dir", str(output))
    results = json.loads((output / "results.json").read_text())
    assert list(results["seconds"]) == ["data", "baseline embedder", "judges", "mining", "UniME-V2 embedders",
                                        "reranker", "evaluation", "listwise evaluation", "judge budget and audit"]
    assert set(results["judge_pairwise_accuracy"]) == {"oracle", "mllm"}
    assert results["judge_pairwise_accuracy"]["oracle"] == {"vqa_colour": 100.0, "vqa_shape": 100.0}
    rows = results["table"]
    assert {"blind text-only baseline", "InfoNCE baseline", "+ InfoNCE continued (no hard negatives, no soft labels)",
            "+ hard negatives, hard labels", "+ UniME-V2 soft labels (oracle judge)",
            "+ UniME-V2 soft labels (mllm judge)"} <= set(rows)
    # one row per rerank mode: with its numbers where the held-out check says it helps, else the embedder's, marked
    checks = results["reranker_checks"]
    assert set(checks) == {"pairwise", "listwise", "fused"} and set(results["rerank_rows"]) == set(checks)
    best = rows["+ UniME-V2 soft labels (oracle judge)"]
    for mode, label in results["rerank_rows"].items():
        assert label.startswith(f"+ UniME-V2 soft labels (oracle judge) + reranker ({mode}, top-5)")
        assert checks[mode]["applied"] == (checks[mode]["reranked_p1"] > checks[mode]["embedder_p1"])
        if not checks[mode]["applied"]:
            assert "[skipped: on" in label and rows[label] == best
    # the judge budget (oracle with a trained embedder per budget), the judge audit, the slot bias
    budget = results["judge_budget"]
    assert [row["budget"] for row in budget["oracle"]] == [1.0, 0.5, None] and budget["mllm"][1]["mean_p1"] is None
    assert budget["oracle"][0]["mean_p1"] == best["mean"] and budget["oracle"][1]["mean_p1"] is not None
    # the full judge's data and the uncapped cascade's trained at a second seed too: its own folder, its own score
    full_seeds, cascade_seeds = budget["oracle"][0]["mean_p1_by_seed"], budget["oracle"][2]["mean_p1_by_seed"]
    assert full_seeds[0] == best["mean"] and len(full_seeds) == len(cascade_seeds) == 2
    assert cascade_seeds[0] == budget["oracle"][2]["mean_p1"]
    seeded = json.loads((output / "embedder-mined-oracle-seed-1" / "pipeline_stage.json").read_text())
    assert '"seed": 1' in seeded["fingerprint"]
    assert "training seeds" in (output / "results.md").read_text()
    assert set(results["judge_audit"]) == {"oracle", "mllm", "reranker"}
    assert results["judge_audit"]["oracle"]["raw"]["auc"] == 1.0
    assert set(results["reranker_slot_bias"]) == set(TASKS)
    for name, report in results["reranker_slot_bias"].items():
        assert report["rows"] == 4 and report["list_length"] == (3 if name == "vqa_shape" else 5)
        assert sum(report["content_free_histogram"]) == pytest.approx(4)
    assert (output / "judge_budget.png").is_file() and (output / "judge_audit.png").is_file()
    assert (output / "judged-pairs-oracle").is_dir() and (output / "cache" / "mining" / "judge").is_dir()
    assert all(set(scores) == {*TASKS, "mean"} for scores in rows.values())
    for folder in ("mined-oracle", "mined-mllm", "baseline", "reranker", "mllm-judge"):
        assert (output / folder).is_dir(), folder
    from datasets import load_from_disk

    mined = load_from_disk(str(output / "mined-oracle"))
    assert "judge_scores" in mined.column_names and len(mined) > 0
    assert Image.open(output / "summary.png").size[0] == 1100
    assert "| setting | judge |" in (output / "results.md").read_text()
    printed = capsys.readouterr().out
    assert "Held-out pairwise accuracy" in printed
    assert "placement: models: cpu torch.float32 attention=sdpa, compute torch.float32 (float32)" in printed
    assert set(results["reranker_pairwise_accuracy"]) == {"vqa_colour", "vqa_shape"}
    # listwise: trained on lists as long as the rerank stage's top-5, reported in the embedder's order
    marker = json.loads((output / "reranker" / "pipeline_stage.json").read_text())
    assert '"listwise_negatives": 4' in marker["fingerprint"]
    listwise = results["listwise_reranking"]
    assert listwise["top_k"] == 5 and listwise["embedder"] == "+ UniME-V2 soft labels (oracle judge)"
    assert list(listwise["tasks"]) == list(TASKS)
    measures = ("embedder_p1", "embedder_order_p1", "chance")
    for name, task in listwise["tasks"].items():
        assert task["rows"] == 16
        assert task["list_length"] == (3 if name == "vqa_shape" else 5)  # easy-vqa has 3 shapes
        assert task["chance"] == pytest.approx(100 / task["list_length"])
        assert all(0 <= task[key] <= 100 for key in measures)
    assert listwise["mean"]["chance"] == pytest.approx((20 * 3 + 100 / 3) / 4)
    markdown = (output / "results.md").read_text()
    assert "| listwise rerank of the embedder's top-k, embedder order: P@1 |" in markdown
    for block in ("Reranker check on held-out training rows", "Reranker slot bias", "Reranker listwise index loss",
                  "Judge budget", "Judge audit on held-out pairs"):
        assert block in markdown, block


def test_rerunning_the_quick_pipeline_resumes_from_the_saved_stages(tmp_path, monkeypatch, capsys):
    pytest.importorskip("easy_vqa")
    output = tmp_path / "run"
    run_pipeline_recipe(monkeypatch, "--quick", "--output_dir", str(output))
    first = json.loads((output / "results.json").read_text())
    capsys.readouterr()
    run_pipeline_recipe(monkeypatch, "--quick", "--output_dir", str(output))
    second = json.loads((output / "results.json").read_text())
    resumed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[resume]")]
    # baseline, judge, four variants, reranker, the embedders of the 50% and uncapped judge budgets, and the full and
    # uncapped runs' second training seed: none trained again
    assert len(resumed) == 11
    assert second["table"] == first["table"] and second["judge_budget"] == first["judge_budget"]
    assert second["curves"] == first["curves"]
    # a changed setting is a different run: the saved stages are not reused
    run_pipeline_recipe(monkeypatch, "--quick", "--output_dir", str(output), "--seed", "1")
    assert not [line for line in capsys.readouterr().out.splitlines() if line.startswith("[resume]")]


def test_quick_ablation_reports_means_and_paired_differences_over_seeds(tmp_path):
    pytest.importorskip("easy_vqa")
    import statistics

    from evaluation.demo.easyvqa import TASKS
    from evaluation.demo.pipeline import PipelineConfig, ablation_variants, run_ablation

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
    from evaluation.demo.pipeline import PipelineConfig, _judge_from, _new_embedder
    from modeling_unime.tiny import build_tiny_tokenizer

    embedder = _new_embedder(PipelineConfig.quick(), build_tiny_tokenizer("qwen2_vl"))
    judge = _judge_from(embedder)
    trainable = {name for name, parameter in judge.named_parameters() if parameter.requires_grad}
    assert trainable and not any(name.startswith("model.visual.") for name in trainable)
    assert any(name.startswith("model.language_model.") for name in trainable) and "lm_head.weight" in trainable
    assert all(torch.equal(value, judge.model.state_dict()[key]) for key, value in embedder.model.state_dict().items())
    assert torch.equal(judge.lm_head.weight, judge.model.get_input_embeddings().weight)


def test_a_changed_setting_redoes_only_the_stages_that_depend_on_it(tmp_path, capsys):
    pytest.importorskip("easy_vqa")
    from evaluation.demo.pipeline import PipelineConfig, run_pipeline

    run_pipeline(PipelineConfig.quick(output_dir=str(tmp_path)))
    mined_markers = {name: (tmp_path / f"mined-{name}" / "pipeline_stage.json").stat().st_mtime_ns
                     for name in ("oracle", "mllm")}
    capsys.readouterr()
    results = run_pipeline(PipelineConfig.quick(output_dir=str(tmp_path), finetune_steps=3, rerank_top_k=3,
                                                listwise_eval_rows=8))
    out = capsys.readouterr().out
    resumed = {line.split()[1] for line in out.splitlines() if line.startswith("[resume]")}
    # the variants depend on finetune_steps and the reranker on rerank_top_k (its lists are as long); the baseline
    # and the judge do not, nor do evaluation sizes
    assert resumed == {str(tmp_path / folder) for folder in ("baseline", "mllm-judge")}
    marker = json.loads((tmp_path / "reranker" / "pipeline_stage.json").read_text())
    assert '"listwise_negatives": 2' in marker["fingerprint"]
    assert results["listwise_reranking"]["top_k"] == 3
    assert {task["rows"] for task in results["listwise_reranking"]["tasks"].values()} == {8}
    assert {name: (tmp_path / f"mined-{name}" / "pipeline_stage.json").stat().st_mtime_ns
            for name in mined_markers} == mined_markers  # mining was loaded, not redone


# ------------------------------------------------------------------------------------- listwise measurements


class HashEmbedder:
    """Stand-in embedder: a fixed random vector per distinct (text, image) item, so equal items embed equally."""

    def encode(self, texts, images, batch_size=32, **kwargs):
        vectors = []
        for text, image in zip(texts, images):
            seed = int(hashlib.sha256(repr((text, image)).encode()).hexdigest()[:12], 16)
            vectors.append(torch.randn(16, generator=torch.Generator().manual_seed(seed)))
        return torch.stack(vectors)


class RecordingReranker:
    """Stand-in listwise reranker: probabilities from the candidates' content (a fixed score per text, the
    positive's raised) or, ``blind``, from their slots only (``tilt`` "late" or "early"); every call is recorded."""

    def __init__(self, blind: bool = False, tilt: str = "late") -> None:
        self.blind, self.tilt, self.calls = blind, tilt, []

    def probabilities(self, query, candidates) -> torch.Tensor:
        if self.blind:
            weights = torch.arange(1, len(candidates) + 1, dtype=torch.float64)
            weights = weights if self.tilt == "late" else weights.flip(0)
        else:
            weights = torch.tensor([
                int(hashlib.sha256(repr((query, item)).encode()).hexdigest()[:6], 16) / 2**24
                + (0.6 if item[0].startswith("right") else 0.0)
                for item in candidates
            ], dtype=torch.float64).exp()
        return weights / weights.sum()

    def rerank(self, query, candidates, mode="listwise", **kwargs):
        assert mode == "listwise"
        scores = self.probabilities(query, candidates)
        self.calls.append((query, list(candidates), scores))
        return sorted(range(len(candidates)), key=lambda index: (-float(scores[index]), index)), scores


def toy_tasks(rows: int, sizes: dict[str, int], perfect: bool = False):
    """MMEB-shaped tasks; candidate 0 ("right ...") is the positive. ``perfect``: the positive is the query's own
    item, so the embedder always ranks it first."""
    from evaluation.mmeb import MMEBDataset

    tasks = {}
    for name, size in sizes.items():
        queries, candidates = [], []
        for row in range(rows):
            query = (f"right {name} {row}", None) if perfect else (f"query {name} {row}", None)
            queries.append(query)
            candidates.append([query if perfect else (f"right {name} {row}", None)]
                              + [(f"wrong {name} {row} {index}", None) for index in range(size - 1)])
        tasks[name] = MMEBDataset(name, queries, candidates)
    return tasks


def test_listwise_measurements_match_an_independent_computation():
    from evaluation.demo.pipeline import listwise_reranking

    tasks = toy_tasks(60, {"ten": 10, "three": 3})
    embedder, reranker = HashEmbedder(), RecordingReranker()
    report = listwise_reranking(embedder, reranker, tasks, top_k=5, rows_per_task=40, seed=3, keep_rows=True)
    for name, task in tasks.items():
        measured = report["tasks"][name]
        kept = measured["per_row"]
        assert len(kept) == measured["rows"] == 40 and len({entry["row"] for entry in kept}) == 40
        expected = dict.fromkeys(("embedder_p1", "embedder_order_p1"), 0.0)
        for entry in kept:
            query, candidates = task.queries[entry["row"]], task.candidates[entry["row"]]
            vectors = torch.nn.functional.normalize(embedder.encode(*zip(query, *candidates)), dim=-1)
            cosines = (vectors[1:] @ vectors[0]).tolist()
            ranking = sorted(range(len(candidates)), key=lambda index: (-cosines[index], index))
            length = min(5, len(candidates))
            assert entry["listed"] == ranking[:length]
            expected["embedder_p1"] += ranking[0] == 0
            top = [candidates[index] for index in ranking[:length]]
            scores = reranker.probabilities(query, top)
            expected["embedder_order_p1"] += top[int(torch.argmax(scores))] == candidates[0]
        for key, value in expected.items():
            assert measured[key] == pytest.approx(100 * value / 40), (name, key)
        assert measured["chance"] == pytest.approx(100 / min(5, len(task.candidates[0])))
    for key in ("embedder_p1", "chance"):
        assert report["mean"][key] == pytest.approx(sum(report["tasks"][name][key] for name in tasks) / 2)


@pytest.mark.parametrize(("tilt", "embedder_order", "preferred"), [("late", 0.0, 4), ("early", 100.0, 0)])
def test_a_content_blind_reranker_is_chance_in_the_slot_bias_report(tilt, embedder_order, preferred):
    """With the positive always first in the embedder's order, a reranker that only prefers a slot scores 0% or
    100% on embedder-ordered lists; the slot-bias report gives it exactly 1/K and names the slot it prefers."""
    from evaluation.demo.judge_studies import reranker_slot_bias
    from evaluation.demo.pipeline import listwise_reranking

    tasks = toy_tasks(60, {"eight": 8}, perfect=True)
    reranker = RecordingReranker(blind=True, tilt=tilt)
    report = listwise_reranking(HashEmbedder(), reranker, tasks, top_k=5, rows_per_task=None, seed=0)
    measured = report["tasks"]["eight"]
    assert measured["embedder_p1"] == 100 and measured["embedder_order_p1"] == embedder_order
    bias = reranker_slot_bias(HashEmbedder(), reranker, tasks, top_k=5, rows_per_task=20, seed=0)["eight"]
    assert bias["rotation_mean_accuracy"] == pytest.approx(20.0) and bias["chance"] == pytest.approx(20.0)
    assert bias["preferred_slot"] == preferred and bias["preferred_share"] == 100.0
    assert bias["positive_log_loss"] >= bias["chance_log_loss"]


# ------------------------------------------------------------------------------------- recipe, table, optional extras


def test_pipeline_help_lists_every_field():
    import dataclasses
    import os
    import subprocess

    run = subprocess.run([sys.executable, str(REPO_ROOT / "recipes" / "pipeline.py"), "--help"], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert run.returncode == 0, run.stderr[-2000:]
    namespace = runpy.run_path(str(REPO_ROOT / "recipes" / "pipeline.py"))
    for field in dataclasses.fields(namespace["PipelineScriptArguments"]):
        assert f"--{field.name}" in run.stdout and field.metadata["help"][:25] in " ".join(run.stdout.split())


def test_pipeline_flags_build_the_config():
    from evaluation.demo.pipeline import PipelineConfig
    from modeling_unime.util.arguments import parse_recipe_arguments

    arguments_class = runpy.run_path(str(REPO_ROOT / "recipes" / "pipeline.py"))["PipelineScriptArguments"]
    (args,) = parse_recipe_arguments([arguments_class], ["--ablation", "--seeds", "0", "1", "2", "--output_dir", "x"])
    assert (args.ablation, args.seeds, args.config().output_dir) == (True, [0, 1, 2], "x")
    (args,) = parse_recipe_arguments([arguments_class], ["--quick", "--seed", "3"])
    assert args.config() == PipelineConfig.quick(output_dir="runs/pipeline", seed=3)
    (args,) = parse_recipe_arguments([arguments_class], ["--ablation"])
    assert args.config() == PipelineConfig(output_dir="runs/ablation")


def test_pipeline_models_go_where_the_placement_flags_say():
    import torch

    from evaluation.demo.pipeline import inference_precision, pipeline_placement
    from modeling_unime.util.arguments import parse_recipe_arguments

    arguments_class = runpy.run_path(str(REPO_ROOT / "recipes" / "pipeline.py"))["PipelineScriptArguments"]
    (args,) = parse_recipe_arguments([arguments_class], ["--quick", "--dtype", "bfloat16",
                                                         "--attn_implementation", "eager"])
    where = pipeline_placement(args.config())
    assert (where["device"].type, where["dtype"], where["attn_implementation"]) == ("cpu", torch.bfloat16, "eager")
    with inference_precision(where):  # the inference stages compute in bf16 under autocast
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert torch.nn.Linear(4, 4)(torch.ones(1, 4)).dtype == torch.bfloat16
    (args,) = parse_recipe_arguments([arguments_class], ["--quick"])
    where = pipeline_placement(args.config())  # CPU default: float32, sdpa, no autocast
    assert (where["dtype"], where["attn_implementation"]) == (torch.float32, "sdpa")
    with inference_precision(where):
        assert not torch.is_autocast_enabled("cpu")


def test_the_table_reads_each_rows_judge_from_data():
    from evaluation.demo.pipeline import render_table

    scores = {"vqa_colour": 50.0, "vqa_shape": 40.0, "image_to_caption": 30.0, "caption_to_image": 20.0,
              "mean": 35.0}
    table = {"a control": scores, "a setting named after the oracle": scores, "trained on the weak judge": scores}
    judges = {"a control": None, "a setting named after the oracle": None, "trained on the weak judge": "mllm"}
    quality = {"oracle": {"vqa_colour": 100.0, "vqa_shape": 100.0}, "mllm": {"vqa_colour": 50.0, "vqa_shape": 52.0}}
    lines = render_table(table, judges, quality).splitlines()
    assert lines[2].startswith("| a control | - |")
    assert lines[3].startswith("| a setting named after the oracle | - |")  # the label says nothing about the judge
    assert lines[4].startswith("| trained on the weak judge [judge at chance: does not count] | mllm |")


def test_matplotlib_and_easy_vqa_are_optional(monkeypatch):
    import os
    import subprocess

    blocked = "import sys; sys.modules['matplotlib'] = sys.modules['easy_vqa'] = None\n"
    run = subprocess.run(
        [sys.executable, "-c",
         blocked + "import evaluation.demo.pipeline, evaluation.harness, evaluation.demo.easyvqa"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert run.returncode == 0, run.stderr[-2000:]

    from evaluation.demo import easyvqa, pipeline

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "easy_vqa", None)
    with pytest.raises(ImportError, match=r'pip install "unime-v2\[demo\]"'):
        pipeline.draw_summary({"table": {}, "curves": {}}, REPO_ROOT / "never-written.png")
    with pytest.raises(ImportError, match=r'pip install "unime-v2\[demo\]"'):
        easyvqa.load_easyvqa("test")


def test_summary_png_has_the_curves_and_the_table(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    from evaluation.demo.pipeline import draw_summary

    scores = {"vqa_colour": 50.0, "vqa_shape": 40.0, "image_to_caption": 30.0, "caption_to_image": 20.0, "mean": 35.0}
    results = {"table": {"baseline": scores, "soft labels": scores},
               "curves": {"baseline": [(1, 4.0), (2, 2.0), (3, 1.0)], "judge": [(1, 0.5)], "empty": []}}
    draw_summary(results, tmp_path / "summary.png")
    image = Image.open(tmp_path / "summary.png")
    assert image.size[0] == 1100 and image.size[1] > 400
    # not blank: the curves and the table put ink on the page
    assert len(image.convert("L").getcolors(1 << 16)) > 10


def test_the_seeded_cascade_comparison_matches_statistics():
    import statistics

    from evaluation.demo.judge_studies import seeded_comparison

    full, cascade = [62.0, 63.5, 61.0], [62.5, 62.0, 61.5]
    rows = [{"budget": 1.0, "mean_p1_by_seed": full}, {"budget": 0.5, "mean_p1": 60.0},
            {"budget": None, "mean_p1_by_seed": cascade}]
    line = seeded_comparison(rows)[-1]
    differences = [c - f for c, f in zip(cascade, full)]
    # the paired difference's 95% interval: mean +- t(0.975, n - 1) * sd / sqrt(n), t(0.975, 2) = 4.303
    half = 4.303 * statistics.stdev(differences) / 3 ** 0.5
    mean = statistics.mean(differences)
    assert f"full judge {statistics.mean(full):.2f} +- {statistics.stdev(full):.2f}" in line
    assert f"uncapped cascade {statistics.mean(cascade):.2f} +- {statistics.stdev(cascade):.2f}" in line
    assert f"{mean:+.2f}, 95% interval [{mean - half:+.2f}, {mean + half:+.2f}]" in line
    assert line.endswith("within the seeds' noise.")
    # the main job's measured case: a small but consistent difference is still inside a 3-seed interval
    measured = [{"budget": 1.0, "mean_p1_by_seed": [62.507, 62.548, 62.579]},
                {"budget": None, "mean_p1_by_seed": [62.524, 62.639, 62.721]}]
    assert seeded_comparison(measured)[-1].endswith("within the seeds' noise.")
    far = [{"budget": 1.0, "mean_p1_by_seed": full}, {"budget": None, "mean_p1_by_seed": [50.0, 51.6, 49.0]}]
    assert seeded_comparison(far)[-1].endswith("outside the seeds' noise.")
    assert seeded_comparison(rows[:2]) == []  # no uncapped cascade trained at several seeds: no line
