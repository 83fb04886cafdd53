"""Mining caches: every setting that changes a score or an embedding changes its cache key, and a damaged
cache or finished-shard file is reported by name and recomputed, giving the clean run's dataset."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from test_mining_recipe import counting  # counts the pairs the judge really scores (judge.pairs)

import modeling_unime.mining as mining
from modeling_unime.judge import MLLMJudge, judge_fingerprint
from modeling_unime.mining import MiningConfig, mine_hard_negatives, run_mining
from modeling_unime.tiny import build_tiny_judge, build_tiny_unime, draw_shape, synthetic_pairs
from modeling_unime.util import fingerprint
from modeling_unime.util.files import DamagedCacheWarning
from modeling_unime.util.fingerprint import model_fingerprint


@pytest.fixture(scope="module")
def embedder():
    model, processor = build_tiny_unime("qwen2_vl")
    model.processor = processor
    return model


# -------------------------------------------------------------------------------------------------- cache keys


def image_rows(root: Path, colours: list[str]) -> Dataset:
    """Image queries whose pictures live under ``root`` at the same relative paths whatever the root."""
    for index, colour in enumerate(colours):
        (root / "shapes").mkdir(parents=True, exist_ok=True)
        draw_shape(colour, ("circle", "square", "triangle")[index % 3]).save(root / "shapes" / f"q{index}.png")
    return Dataset.from_list([
        {"query_text": "<|image_1|>\nWhat colour is the shape?", "query_image": f"shapes/q{index}.png",
         "pos_text": f"answer {index}", "pos_image": None}
        for index in range(len(colours))
    ])


def test_judge_scores_are_not_shared_between_image_roots(tmp_path, embedder):
    colours = ["red", "green", "blue", "yellow", "black"]
    data = image_rows(tmp_path / "a", colours)
    assert image_rows(tmp_path / "b", colours[::-1]).to_list() == data.to_list()  # same rows, other pictures
    settings = dict(top_k=4, num_negatives=2, beta=0.0, verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mining.DegenerateMiningWarning)  # a tiny random judge is at chance
        under_a, _ = mine_hard_negatives(data, embedder, MLLMJudge(*build_tiny_judge()), image_root=tmp_path / "a",
                                         cache_dir=tmp_path / "cache", **settings)
        judge = counting(MLLMJudge(*build_tiny_judge()))
        under_b, _ = mine_hard_negatives(data, embedder, judge, image_root=tmp_path / "b",
                                         cache_dir=tmp_path / "cache", **settings)
        fresh_b, _ = mine_hard_negatives(data, embedder, MLLMJudge(*build_tiny_judge()), image_root=tmp_path / "b",
                                         **settings)
    # Every (query, positive) pair of the second root was scored again, and the scores are those of its pictures.
    assert judge.pairs >= len(data)
    for cached_row, fresh_row in zip(under_b, fresh_b):
        assert cached_row["neg_texts"] == fresh_row["neg_texts"]  # retrieved with the second root's embeddings
        assert cached_row["judge_scores"] == pytest.approx(fresh_row["judge_scores"], abs=1e-6)
    assert any(a["judge_scores"][0] != pytest.approx(b["judge_scores"][0], abs=1e-5) for a, b in zip(under_a, under_b))


def test_one_image_root_given_two_ways_shares_the_cache(tmp_path, embedder, monkeypatch):
    data = image_rows(tmp_path / "images", ["red", "blue", "green"])
    monkeypatch.chdir(tmp_path)
    settings = dict(top_k=2, num_negatives=1, beta=0.0, verbose=False, cache_dir=tmp_path / "cache")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mining.DegenerateMiningWarning)
        first, _ = mine_hard_negatives(data, embedder, MLLMJudge(*build_tiny_judge()), image_root="images", **settings)
        judge = counting(MLLMJudge(*build_tiny_judge()))
        again, _ = mine_hard_negatives(data, embedder, judge, image_root=tmp_path / "images", **settings)
    assert judge.pairs == 0 and again.to_list() == first.to_list()


def fresh_mllm_judge(**kwargs) -> MLLMJudge:
    """A new tiny judge each call (tests change its settings)."""
    return MLLMJudge(*build_tiny_judge(), **kwargs)


def changed_processor_max_pixels() -> MLLMJudge:
    judge = fresh_mllm_judge()
    judge.processor.image_processor.size = {"shortest_edge": 56 * 56, "longest_edge": 32 * 28 * 28}
    return judge


def changed_chat_template() -> MLLMJudge:
    judge = fresh_mllm_judge()
    judge.processor.chat_template = judge.processor.chat_template.replace("<|im_start|>", "<|im_start|> ")
    return judge


def changed_weight() -> MLLMJudge:
    judge = fresh_mllm_judge()
    with torch.no_grad():
        weight = judge.model.get_output_embeddings().weight
        weight.view(-1)[-1] += 0.5
    return judge


def compat(judge: MLLMJudge) -> MLLMJudge:
    judge.official_compat = True
    return judge


SCORE_SETTINGS = {
    "repetition_penalty": lambda: fresh_mllm_judge(official_compat=True, repetition_penalty=1.2),
    "answer tokens (Yes/No swapped)": lambda: fresh_mllm_judge(official_compat=True, yes_token="No", no_token="Yes"),
    "official_compat": lambda: fresh_mllm_judge(official_compat=False),
    "instruction": lambda: fresh_mllm_judge(official_compat=True, instruction="Answer Yes or No."),
    "image_resize": lambda: fresh_mllm_judge(official_compat=True, image_resize="square:56"),
    "image processor size": lambda: compat(changed_processor_max_pixels()),
    "chat template": lambda: compat(changed_chat_template()),
    "one weight value": lambda: compat(changed_weight()),
}


@pytest.mark.parametrize("setting", list(SCORE_SETTINGS))
def test_every_setting_that_changes_a_score_changes_the_judge_fingerprint(setting):
    reference = judge_fingerprint(fresh_mllm_judge(official_compat=True))
    assert judge_fingerprint(SCORE_SETTINGS[setting]()) != reference, setting


def test_judge_fingerprint_ignores_what_does_not_change_a_score():
    judge = fresh_mllm_judge(official_compat=True)
    reference = judge_fingerprint(judge)
    judge.score("What colour?", None, [("red", None), ("a blue square", None)])  # the tokenizer's padding state moves
    assert judge_fingerprint(judge) == reference
    assert judge_fingerprint(fresh_mllm_judge(official_compat=True, batch_size=3, prefix_sharing=False)) == reference


def test_a_changed_repetition_penalty_rescores_instead_of_reusing(tmp_path):
    """End to end through the cache: official_compat scores with penalty 1.05, then 2.0 (the released labels' rule
    with another penalty) must be the 2.0 scores, not the cached 1.05 ones."""
    data = Dataset.from_list([{"query_text": f"What colour is shape {i}?", "query_image": None, "pos_text": colour,
                               "pos_image": None} for i, colour in enumerate(["red", "blue", "green", "teal"])])
    settings = dict(top_k=3, num_negatives=2, beta=0.0, verbose=False)

    class TextEmbedder:
        """Embeds a text from its content alone (whatever the batch)."""

        def encode(self, texts, images, **kwargs):
            rows = [[len(text or ""), 1.0 + sum(map(ord, text or "")) % 7] for text in texts]
            return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mining.DegenerateMiningWarning)
        mine_hard_negatives(data, TextEmbedder(), fresh_mllm_judge(official_compat=True), cache_dir=tmp_path,
                            **settings)
        cached, _ = mine_hard_negatives(data, TextEmbedder(),
                                        fresh_mllm_judge(official_compat=True, repetition_penalty=2.0),
                                        cache_dir=tmp_path, **settings)
        fresh, _ = mine_hard_negatives(data, TextEmbedder(),
                                       fresh_mllm_judge(official_compat=True, repetition_penalty=2.0), **settings)
    for cached_row, fresh_row in zip(cached, fresh):
        assert cached_row["judge_scores"] == pytest.approx(fresh_row["judge_scores"], abs=1e-6)


@pytest.mark.parametrize("chunk_bytes", [None, 64, 1000])
def test_model_fingerprint_sees_every_value(monkeypatch, chunk_bytes):
    if chunk_bytes:
        monkeypatch.setattr(fingerprint, "FINGERPRINT_CHUNK_BYTES", chunk_bytes)
    model, _ = build_tiny_unime("qwen2_vl")
    reference = model_fingerprint(model)
    name, tensor = max(model.state_dict().items(), key=lambda item: item[1].numel())
    assert tensor.numel() > 1000
    for position in (16, tensor.numel() // 2, tensor.numel() - 1):  # all beyond the 16 values once sampled
        with torch.no_grad():
            original = tensor.view(-1)[position].item()
            tensor.view(-1)[position] = original + 1e-3
            changed = model_fingerprint(model)
            tensor.view(-1)[position] = original
        assert changed != reference, (name, position)
    assert model_fingerprint(model) == reference
    assert model_fingerprint(model, workers=1) == model_fingerprint(model, workers=2) == reference
    assert model_fingerprint(model, "authors-eval") != reference  # extra settings count too


def test_tensor_hash_reads_values_not_layout_or_chunking():
    values = torch.randn(37, 53)
    reference = fingerprint._hash_tensor(values.T.contiguous())
    for chunk_bytes in (1, 7, 64, 4096, None):
        assert fingerprint._hash_tensor(values.T, chunk_bytes) == reference  # non-contiguous: made contiguous by blocks
        assert fingerprint._hash_tensor(values.T.contiguous(), chunk_bytes) == reference
    assert fingerprint._hash_tensor(values.T.to(torch.bfloat16)) != fingerprint._hash_tensor(values.T.to(torch.float16))
    assert fingerprint._hash_tensor(torch.tensor(3.0)) != fingerprint._hash_tensor(torch.tensor(4.0))
    assert fingerprint._hash_tensor(torch.empty(0, 5)) == fingerprint._hash_tensor(torch.empty(0))
    with pytest.raises(ValueError, match="meta device"):
        fingerprint._hash_tensor(torch.empty(3, device="meta"))


# -------------------------------------------------------------------------------------------------- damaged files


CONFIG = MiningConfig(top_k=8, beta=0.0, num_negatives=4, shard_size=3, seed=1, batch_size=2)


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, embedder):
    """One clean run (10 rows, 4 shards, several embedding cache parts) to copy and damage."""
    root = tmp_path_factory.mktemp("mining-damage")
    dataset = synthetic_pairs(10, root / "images")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DamagedCacheWarning)
        warnings.simplefilter("ignore", mining.DegenerateMiningWarning)
        reference = run_mining(dataset, embedder, MLLMJudge(*build_tiny_judge()), root / "clean", CONFIG,
                               image_root=root / "images", verbose=False)
    return root, dataset, reference.to_list()


def rerun(root: Path, dataset, embedder, output: Path, judge=None) -> list[dict]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mining.DegenerateMiningWarning)
        mined = run_mining(dataset, embedder, judge or MLLMJudge(*build_tiny_judge()), output, CONFIG,
                           image_root=root / "images", verbose=False)
    return mined.to_list()


def cut_in_half(path: Path) -> None:
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])


def copy_of(clean_root: Path, name: str) -> Path:
    target = clean_root / name
    shutil.copytree(clean_root / "clean", target)
    return target


def test_an_embedding_cache_part_cut_in_half_is_named_and_recomputed(clean_run, embedder):
    root, dataset, reference = clean_run
    output = copy_of(root, "embedding-part")
    parts = sorted((output / "cache" / "embeddings").glob("*/part-*.safetensors"))
    assert len(parts) >= 2
    cut_in_half(parts[0])
    shutil.rmtree(output / "shards")  # mining redone with the recomputed embeddings
    encode, embedded = embedder.encode, []
    embedder.encode = lambda *args, **kwargs: (embedded.append(len(kwargs["texts"])), encode(*args, **kwargs))[1]
    try:
        with pytest.warns(DamagedCacheWarning, match=re.escape(str(parts[0])) + ".*embedding cache part"):
            mined = rerun(root, dataset, embedder, output)
    finally:
        embedder.encode = encode
    assert mined == reference
    assert 0 < sum(embedded) < len(dataset) + 30  # only what the damaged part held was embedded again
    assert not parts[0].exists()  # removed: the next run is quiet and embeds nothing
    embedder.encode = lambda *args, **kwargs: pytest.fail("every embedding should be cached again")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", DamagedCacheWarning)
            assert rerun(root, dataset, embedder, output) == reference
    finally:
        embedder.encode = encode


def test_a_finished_shard_cut_in_half_is_named_and_mined_again(clean_run, embedder):
    root, dataset, reference = clean_run
    output = copy_of(root, "shard")
    shard = output / "shards" / "shard-00001.json"
    cut_in_half(shard)
    judge = counting(MLLMJudge(*build_tiny_judge()))
    with pytest.warns(DamagedCacheWarning, match=re.escape(str(shard)) + ".*finished-shard file"):
        mined = rerun(root, dataset, embedder, output, judge)
    assert mined == reference
    assert judge.pairs == 0  # its judge scores came from the cache
    content = json.loads(shard.read_text())
    assert content["stats"]["queries"] == 3 and content["mined_by"] == {"process_index": 0, "num_processes": 1}


def test_a_shard_whose_counts_do_not_add_up_is_mined_again(clean_run, embedder):
    root, dataset, reference = clean_run
    output = copy_of(root, "shard-counts")
    shard = output / "shards" / "shard-00002.json"
    content = json.loads(shard.read_text())
    content["rows"] = content["rows"][:1]  # valid JSON, but rows went missing
    shard.write_text(json.dumps(content))
    with pytest.warns(DamagedCacheWarning, match=re.escape(str(shard)) + ".*1 rows for 3 queries"):
        assert rerun(root, dataset, embedder, output) == reference


def test_a_judge_log_cut_mid_line_rescores_one_pair(clean_run, embedder):
    root, dataset, reference = clean_run
    output = copy_of(root, "judge-log")
    logs = list((output / "cache" / "judge").glob("*/rank-0.jsonl"))
    assert len(logs) == 1
    log = logs[0]
    lines = log.read_text().splitlines()
    last_shard = json.loads(lines[-1])["shard"]
    log.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])  # killed while writing
    (output / "shards" / f"shard-{last_shard:05d}.json").unlink()  # ... in the middle of its shard

    judge = counting(MLLMJudge(*build_tiny_judge()))
    with pytest.warns(DamagedCacheWarning, match=re.escape(str(log)) + f".*judge log line {len(lines)}"):
        mined = rerun(root, dataset, embedder, output, judge)
    assert judge.pairs == 1
    for got, expected in zip(mined, reference):
        assert {k: v for k, v in got.items() if k != "judge_scores"} == {k: v for k, v in expected.items()
                                                                        if k != "judge_scores"}
        assert got["judge_scores"] == pytest.approx(expected["judge_scores"], abs=1e-6)
    # The log was repaired (the cut line dropped, the rescored pair on a line of its own): a later run of that shard
    # is quiet and scores nothing.
    repaired = log.read_text()
    assert repaired.endswith("\n") and len(repaired.splitlines()) == len(lines)
    assert all(json.loads(line)["key"] for line in repaired.splitlines())
    (output / "shards" / f"shard-{last_shard:05d}.json").unlink()
    judge = counting(MLLMJudge(*build_tiny_judge()))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DamagedCacheWarning)
        rerun(root, dataset, embedder, output, judge)
    assert judge.pairs == 0
