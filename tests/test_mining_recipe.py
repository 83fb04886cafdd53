"""The mining recipe: shards, resume after a kill in the middle of a shard, caches, 2 processes, dataset card, push."""

import json
import os
import re
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch
from accelerate import PartialState
from datasets import load_dataset, load_from_disk

from conftest import REPO_ROOT, free_port, run_recipe
from modeling_unime.judge import JUDGE_INSTRUCTION, MLLMJudge
from modeling_unime.mining import MiningConfig, retrieval_device, run_mining
from modeling_unime.mining.stats import SelectionStats
from modeling_unime.placement import attention_kernels, placement, process_state
from modeling_unime.tiny import build_tiny_judge, build_tiny_unime, synthetic_pairs

CONFIG = MiningConfig(top_k=8, beta=0.0, num_negatives=4, shard_size=3, seed=1)


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    image_root = tmp_path_factory.mktemp("images")
    dataset = synthetic_pairs(10, image_root)
    embedder, processor = build_tiny_unime("qwen2_vl")
    embedder.processor = processor
    return dataset, embedder, image_root


def counting(judge):
    """Count the pairs the judge really scores."""
    score = judge.score
    judge.pairs = 0

    def counted(query_text, query_image, candidates):
        judge.pairs += len(candidates)
        return score(query_text, query_image, candidates)

    judge.score = counted
    return judge


def test_resume_after_a_kill_in_the_middle_of_a_shard(tiny_world, tmp_path):
    dataset, embedder, image_root = tiny_world
    reference_judge = counting(MLLMJudge(*build_tiny_judge()))
    reference = run_mining(dataset, embedder, reference_judge, tmp_path / "whole", CONFIG, image_root=image_root,
                           verbose=False)

    judge = counting(MLLMJudge(*build_tiny_judge()))
    score = judge.score
    calls = {"queries": 0}

    def killed_after_four_judge_calls(*args):
        calls["queries"] += 1
        if calls["queries"] > 4:
            raise KeyboardInterrupt("simulated kill")
        return score(*args)

    judge.score = killed_after_four_judge_calls
    with pytest.raises(KeyboardInterrupt):
        run_mining(dataset, embedder, judge, tmp_path / "resumed", CONFIG, image_root=image_root, verbose=False)
    shards = sorted(path.name for path in (tmp_path / "resumed" / "shards").iterdir())
    # Some shards finished, the one being mined left no file (not even a partial one).
    assert shards and shards == [f"shard-{index:05d}.json" for index in range(len(shards))] and len(shards) < 4
    scored_before_kill = judge.pairs

    again = counting(MLLMJudge(*build_tiny_judge()))
    resumed = run_mining(dataset, embedder, again, tmp_path / "resumed", CONFIG, image_root=image_root, verbose=False)
    assert resumed.to_list() == reference.to_list()
    # Nothing scored before the kill is scored again.
    assert scored_before_kill + again.pairs == reference_judge.pairs
    assert again.pairs < reference_judge.pairs


def test_second_run_reuses_every_embedding_and_refuses_other_settings(tiny_world, tmp_path):
    dataset, embedder, image_root = tiny_world
    run_mining(dataset, embedder, MLLMJudge(*build_tiny_judge()), tmp_path, CONFIG, image_root=image_root,
               verbose=False)
    encode = embedder.encode
    embedder.encode = lambda *args, **kwargs: pytest.fail("embeddings should come from the cache")
    try:
        run_mining(dataset, embedder, MLLMJudge(*build_tiny_judge()), tmp_path, CONFIG, image_root=image_root,
                   verbose=False)
        other = MiningConfig(**{**vars(CONFIG), "beta": 0.05})
        with pytest.raises(ValueError, match="mined with other settings"):
            run_mining(dataset, embedder, MLLMJudge(*build_tiny_judge()), tmp_path, other, image_root=image_root,
                       verbose=False)
    finally:
        embedder.encode = encode
    summary = (tmp_path / "summary.txt").read_text()
    assert "rows written: 10" in summary and "from cache" in summary


def assert_summary_sums_the_shards(output_dir, queries):
    """summary.json's statistics, and the counts printed in summary.txt, are the sums of the finished shards'."""
    summary = json.loads((output_dir / "summary.json").read_text())
    shards = [json.loads(path.read_text()) for path in sorted((output_dir / "shards").glob("shard-*.json"))]
    assert len(shards) > 1
    total = SelectionStats(num_negatives=summary["stats"]["num_negatives"])
    for shard in shards:
        total = total.merge(SelectionStats(**shard["stats"]))
    expected = {**asdict(total), "duplicate_rows": summary["stats"]["duplicate_rows"]}
    assert summary["stats"] == pytest.approx(expected)
    assert summary["stats"]["queries"] == queries == sum(record["queries"] for record in summary["shards"])
    assert summary["rows_written"] == sum(len(shard["rows"]) for shard in shards)
    text = (output_dir / "summary.txt").read_text()
    assert f"Hard-negative selection over {queries:,} queries" in text
    for label, field in (("candidates retrieved (top-k)", "candidates_retrieved"),
                         ("candidates removed by the false-negative filter (beta)", "removed_as_false_negative"),
                         ("queries with fewer than", "queries_short_of_negatives"),
                         ("judged candidates scored below the positive", "candidates_below_positive")):
        line = next(line for line in text.splitlines() if line.strip().startswith(label))
        assert re.search(rf"\s{expected[field]:,}\s+\(", line), (line, expected[field])


def test_merged_summary_is_the_sum_of_the_shards(tiny_world, tmp_path):
    dataset, embedder, image_root = tiny_world
    run_mining(dataset, embedder, MLLMJudge(*build_tiny_judge()), tmp_path, CONFIG, image_root=image_root,
               verbose=False)
    assert_summary_sums_the_shards(tmp_path, queries=len(dataset))


def test_two_processes_give_the_one_process_dataset(tmp_path):
    config = tmp_path / "mine.yaml"
    config.write_text(
        "data: synthetic:12\nembedder: tiny:qwen2_vl\njudge: tiny:qwen2_5_vl\nthreads: 1\n"
        "mining: {top_k: 8, beta: 0.0, num_negatives: 4, shard_size: 3, seed: 1}\n"
    )
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    script = str(REPO_ROOT / "recipes" / "mine_hard_negatives.py")
    one = subprocess.run([sys.executable, script, "--config", str(config), "--output_dir", str(tmp_path / "one")],
                         env=environment, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--main_process_port", str(free_port()), script, "--config", str(config), "--output_dir",
         str(tmp_path / "two")],
        env=environment, capture_output=True, text=True, timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    # Both processes did work: each wrote its own judge log.
    logs = sorted((tmp_path / "two" / "cache" / "judge").glob("*/*.jsonl"))
    assert [log.name for log in logs] == ["rank-0.jsonl", "rank-1.jsonl"]
    # Each shard was mined once, by the process it belongs to (shard s -> process s % 2): the finished shard says
    # who mined it, and no process judged a pair for a shard of the other.
    shards = sorted((tmp_path / "two" / "shards").glob("shard-*.json"))
    assert len(shards) == 4
    for path in shards:
        shard = int(path.stem.split("-")[1])
        assert json.loads(path.read_text())["mined_by"] == {"process_index": shard % 2, "num_processes": 2}, path
    for rank, log in enumerate(logs):
        judged_shards = {json.loads(line)["shard"] for line in log.read_text().splitlines()}
        assert judged_shards and {shard % 2 for shard in judged_shards} == {rank}, (log, judged_shards)
    summary = (tmp_path / "two" / "summary.txt").read_text()
    assert "shards mined per process: process 0: 2 (0, 2); process 1: 2 (1, 3)" in summary
    # The merged summary is the sum of the shards' counts, over both processes' shards.
    assert_summary_sums_the_shards(tmp_path / "two", queries=12)
    single = load_from_disk(str(tmp_path / "one" / "dataset")).to_list()
    double = load_from_disk(str(tmp_path / "two" / "dataset")).to_list()
    assert len(single) == 12
    # A pair scored in another query's batch can differ in the last bits (documented): scores to 1e-6, rest exact.
    for one, two in zip(single, double):
        assert ({k: v for k, v in one.items() if k != "judge_scores"}
                == {k: v for k, v in two.items() if k != "judge_scores"})
        assert one["judge_scores"] == pytest.approx(two["judge_scores"], abs=1e-6)


def test_recipe_writes_the_dataset_card_and_pushes_the_folder(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo",
                        lambda self, repo_id, **kw: calls.append(("create", repo_id, kw)))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder",
                        lambda self, **kw: calls.append(("upload", kw["repo_id"], kw)) or "https://hub/commit/1")
    config = tmp_path / "mine.yaml"
    config.write_text(
        "data: synthetic:6\nembedder: tiny:qwen2_vl\njudge: tiny:qwen2_5_vl\nofficial_compat: true\n"
        "mining: {top_k: 5, beta: 0.02, num_negatives: 3, interval: 2, shard_size: 4, seed: 7}\n"
    )
    run_recipe(monkeypatch, "mine_hard_negatives.py", "--config", str(config), "--output_dir", str(tmp_path / "run"),
               "--push_to_hub", "org/tiny-negatives")
    assert [call[:2] for call in calls] == [("create", "org/tiny-negatives"), ("upload", "org/tiny-negatives")]
    assert calls[0][2]["repo_type"] == "dataset" and calls[1][2]["repo_type"] == "dataset"
    folder = calls[1][2]["folder_path"]
    card = open(os.path.join(folder, "README.md")).read()
    for fact in ("beta = 0.02", "top_k = 5", "interval = 2", "seed = 7", "negatives = 3", "official_compat=True",
                 "judge: `tiny:qwen2_5_vl`", JUDGE_INSTRUCTION, "| judge_scores | list[float64] |"):
        assert fact in card, fact
    pushed = load_dataset(folder, split="train", cache_dir=str(tmp_path / "datasets-cache"))  # not an earlier run's
    saved = load_from_disk(str(tmp_path / "run" / "dataset"))
    assert pushed.to_list() == saved.to_list() and len(saved) == 6
    assert all(len(row["judge_scores"]) == 1 + len(row["neg_texts"]) for row in saved)
    out = capsys.readouterr().out
    assert "pushed to https://hub/commit/1" in out
    # The recipe says where its models ran: this process's device, float32 (auto on CPU), sdpa.
    device = PartialState().device
    assert (f"placement: process 0: embedder: {device} torch.float32 attention=sdpa; judge: {device} torch.float32 "
            "attention=sdpa") in out


def _recipe_functions():
    import modeling_unime.mining.recipe as recipe

    return vars(recipe)


@pytest.mark.parametrize("dtype, attn", [("auto", "auto"), ("bfloat16", "eager")])
def test_recipe_models_are_on_the_process_device(dtype, attn):
    recipe = _recipe_functions()
    where = placement(dtype, attn, process_state().device)
    expected_dtype = torch.float32 if dtype == "auto" and where["device"].type == "cpu" else torch.bfloat16
    embedder = recipe["load_embedder"]("tiny:qwen2_vl", where)
    judge = recipe["load_judge"]("tiny:qwen2_5_vl", where, batch_size=4)
    for model in (embedder, judge.model):
        assert model.device == PartialState().device and model.dtype == expected_dtype
        assert attention_kernels(model) == {where["attn_implementation"]}
    assert where["attn_implementation"] == ("eager" if attn == "eager" else "sdpa")
    # The judge and the embedder run in that dtype and still give finite, in-range results.
    assert judge.score("What colour?", None, [("red", None), ("blue", None)]).isfinite().all()
    assert embedder.encode(texts=["a red circle"]).dtype == torch.float32


def test_recipe_loads_saved_models_on_the_process_device(tmp_path):
    recipe = _recipe_functions()
    embedder, processor = build_tiny_unime("qwen2_vl")
    embedder.save_pretrained(tmp_path / "embedder")
    processor.save_pretrained(tmp_path / "embedder")
    judge_model, judge_processor = build_tiny_judge()
    judge_model.save_pretrained(tmp_path / "judge")
    judge_processor.save_pretrained(tmp_path / "judge")
    where = placement("bfloat16", "eager", process_state().device)
    loaded_embedder = recipe["load_embedder"](str(tmp_path / "embedder"), where)
    loaded_judge = recipe["load_judge"](str(tmp_path / "judge"), where, official_compat=True)
    for model in (loaded_embedder, loaded_judge.model):
        assert model.device == PartialState().device and model.dtype == torch.bfloat16
        assert attention_kernels(model) == {"eager"}
    assert loaded_judge.official_compat


def test_retrieval_runs_on_the_embedder_device(tiny_world, monkeypatch):
    """The pool and the shard's queries go to the embedder's device before the top-k (CPU here: the same code path
    puts them on the GPU there)."""
    import modeling_unime.mining as mining
    import modeling_unime.mining.selection as selection

    dataset, embedder, image_root = tiny_world
    devices = []
    top_k = selection.chunked_top_k

    def recording(queries, pool, *args, **kwargs):
        devices.append((queries.device, pool.device))
        return top_k(queries, pool, *args, **kwargs)

    monkeypatch.setattr(selection, "chunked_top_k", recording)
    mining.mine_hard_negatives(dataset, embedder, MLLMJudge(*build_tiny_judge()), config=CONFIG,
                               image_root=image_root, verbose=False)
    assert devices and set(devices) == {(retrieval_device(embedder), retrieval_device(embedder))}
    assert retrieval_device(embedder) == next(embedder.parameters()).device
    assert retrieval_device(object()) == torch.device("cpu")


def test_help_lists_every_field_of_the_recipe(capsys):
    import dataclasses

    recipe = _recipe_functions()
    with pytest.raises(SystemExit):
        recipe["parse_arguments"](["--help"])
    out = "".join(capsys.readouterr().out.split())  # argparse wraps the help text
    for kind in (recipe["MiningScriptArguments"], MiningConfig):
        for item in dataclasses.fields(kind):
            assert f"--{item.name}" in out and "".join(item.metadata["help"].split()) in out, item.name
    assert "--config" in out


@pytest.mark.parametrize("config", sorted((REPO_ROOT / "recipes" / "configs").glob("mine-*.yaml")),
                         ids=lambda p: p.name)
def test_every_shipped_config_parses_with_flags_over_it(config):
    import yaml

    recipe = _recipe_functions()
    settings = yaml.safe_load(config.read_text())
    script, mining = recipe["parse_arguments"](["--config", str(config), "--judge", "oracle", "--seed", "5",
                                                "--output_dir", "elsewhere", "--dtype", "float32"])
    assert (script.data, script.embedder, script.judge, script.output_dir) == (
        settings["data"], settings["embedder"], "oracle", "elsewhere")
    assert (script.dtype, script.official_compat, script.threads) == ("float32", settings["official_compat"],
                                                                     settings["threads"])
    assert mining == MiningConfig(**{**settings["mining"], "seed": 5})


@pytest.mark.parametrize("text, key", [
    ("data: synthetic:4\nembedder: tiny:qwen2_vl\njudge: oracle\njudge_batchsize: 4\n", "'judge_batchsize'"),
    ("data: synthetic:4\nembedder: tiny:qwen2_vl\njudge: oracle\nmining: {top_kk: 5}\n", "'top_kk'"),
])
def test_a_misspelt_config_key_is_an_error_naming_it(tmp_path, text, key):
    config = tmp_path / "mine.yaml"
    config.write_text(text)
    with pytest.raises(ValueError, match=f"unknown key {key}"):
        _recipe_functions()["parse_arguments"](["--config", str(config)])
