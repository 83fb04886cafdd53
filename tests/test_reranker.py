"""UniMEV2Reranker: prompts without the authors' bugs, one-forward listwise scores, training, checkpoints."""

import os
import random
import subprocess
import sys
import textwrap
from functools import lru_cache

import pytest
import torch
from PIL import Image

from modeling_unime import UniMEV2Reranker
from modeling_unime.scoring_unime import JUDGE_INSTRUCTION, LISTWISE_INSTRUCTION
from modeling_unime.testing import (
    build_tiny_causal_lm,
    build_tiny_reranker,
    build_tiny_tokenizer,
    build_tiny_processor,
    save_in_authors_layout,
    synthetic_judge_dataset,
)
from trainers.adapters import RERANKER_ADAPTER, prepare_for_training, save_checkpoint
from trainers.reranker_trainer import (
    LISTWISE,
    PAIRWISE,
    RerankerCollator,
    UniMEV2RerankerTrainer,
    UniMEV2RerankerTrainingArguments,
)

RED = Image.new("RGB", (56, 84), (220, 20, 20))
ROW = dict(query_text="<|image_1|>\nWhat colour is the shape?", query_image=None, pos_text="deep red",
           pos_image=None, neg_texts=["light blue", "dark green", "pale teal", "warm orange", "cold grey"],
           neg_images=[None] * 5, judge_scores=[0.9, 0.2, 0.7, 0.7, 0.1, 0.4])


@lru_cache(maxsize=None)
def tiny():
    reranker, processor = build_tiny_reranker()
    with torch.no_grad():  # larger answer rows: scores then differ well above float noise
        reranker.lm_head.weight.mul_(8)
    return reranker, processor


def last_logits(reranker, processor, text, images):
    """Independent reference: a full forward with logits over the whole vocabulary at the last position."""
    batch = processor._backbone_processor(text=[text], images=images or None, return_tensors="pt")
    with torch.no_grad():
        return reranker(**batch).logits[0, -1].float()


# -------------------------------------------------------------------------------------------------------- prompts


def test_listwise_position_is_uniform():
    collator = RerankerCollator(build_tiny_processor("qwen2_5_vl"), listwise_negatives=4, seed=0)
    counts = [0] * 5
    for index in range(5000):
        counts[collator.listwise_candidates(dict(ROW, query_text=f"query {index}"))[1]] += 1
    expected = 5000 / 5
    chi_square = sum((count - expected) ** 2 / expected for count in counts)
    assert chi_square < 18.47, counts  # the 0.999 quantile of chi-square with 4 degrees of freedom
    # The last slot is used too (the authors' code never put the positive last).
    assert min(counts) > 800
    # And a new draw per epoch for the same row.
    draws = set()
    for epoch in range(20):
        collator.set_epoch(epoch)
        draws.add(collator.listwise_candidates(ROW)[1])
    assert len(draws) >= 4


def test_hardest_negative_is_the_highest_judge_score():
    assert RerankerCollator.hardest_negative(ROW) == 1  # scores 0.2, 0.7, 0.7, ...: the first of the two 0.7s
    assert RerankerCollator.hardest_negative(dict(ROW, judge_scores=[0.9, 0.1, 0.2, 0.3, 0.95, 0.4])) == 3
    with pytest.raises(ValueError, match="no negatives"):
        RerankerCollator.hardest_negative(dict(ROW, neg_texts=[], judge_scores=[0.9]))


def test_texts_reach_the_prompts_and_training_uses_the_inference_prompts():
    reranker, processor = tiny()
    collator = RerankerCollator(processor, listwise_negatives=3, seed=1)
    batch = collator([ROW])
    assert batch["example_kind"].tolist() == [PAIRWISE, PAIRWISE, LISTWISE]
    decoded = [processor.tokenizer.decode(ids, skip_special_tokens=False) for ids in batch["input_ids"]]
    for text in decoded:
        assert "What colour is the shape?" in text and "<|image_1|>" not in text
    assert "deep red" in decoded[0] and decoded[0].endswith("assistant\nYes")
    assert "dark green" in decoded[1] and decoded[1].endswith("assistant\nNo")  # the hardest negative
    negatives, slot = collator.listwise_candidates(ROW)
    assert all(ROW["neg_texts"][p] in decoded[2] for p in negatives) and "deep red" in decoded[2]
    assert decoded[2].endswith(f"Ans: ({slot + 1})")
    assert JUDGE_INSTRUCTION in decoded[0] and LISTWISE_INSTRUCTION in decoded[2]
    # Labels cover the answer tokens only.
    answer = [processor.tokenizer.decode(ids[labels != -100]) for ids, labels in zip(batch["input_ids"], batch["labels"])]
    assert answer == ["Yes", "No", f"Ans: ({slot + 1})"]
    # The training prompt is, token for token, the prompt inference scores.
    scorer = reranker.scorer(processor)
    query, positive = ("What colour is the shape?", None), ("deep red", None)
    assert decoded[0].endswith(scorer.render(query, positive).split("<|im_start|>user\n")[1] + "Yes")


# -------------------------------------------------------------------------------------------------------- inference


def test_pairwise_score_is_the_yes_no_softmax_of_a_full_forward():
    reranker, processor = tiny()
    candidates = ["deep red", ("a shape", RED), "light blue"]
    scores = reranker.score(("What colour is the shape?", RED), candidates, processor=processor)
    scorer = reranker.scorer(processor)
    yes, no = (processor.tokenizer.convert_tokens_to_ids(word) for word in ("Yes", "No"))
    for candidate, score in zip(candidates, scores):
        item = (candidate, None) if isinstance(candidate, str) else candidate
        images = [RED] + ([item[1]] if item[1] is not None else [])
        logits = last_logits(reranker, processor, scorer.render(("What colour is the shape?", RED), item), images)
        expected = torch.softmax(logits[[yes, no]], dim=0)[0]
        assert abs(float(score) - float(expected)) < 1e-5
    assert scores.max() - scores.min() > 1e-3


@pytest.mark.parametrize("count", [3, 12])
def test_listwise_scores_come_from_one_forward_and_match_a_full_forward(count):
    reranker, processor = tiny()
    candidates = [f"candidate number {index}" for index in range(count)]
    calls = []
    hook = reranker.model.register_forward_hook(lambda module, args, kwargs_or_output: calls.append(1))
    try:
        order, scores = reranker.rerank(("What colour?", RED), candidates, processor=processor)
    finally:
        hook.remove()
    # One forward over the list; lists of 10+ add one small batch for the second digit.
    assert len(calls) == (1 if count <= 9 else 2)
    assert abs(float(scores.sum()) - 1) < 1e-5
    assert order == sorted(range(count), key=lambda index: -float(scores[index]))

    scorer = reranker.scorer(processor)
    prompt = scorer.render_listwise(("What colour?", RED), [(text, None) for text in candidates])
    digits = [processor.tokenizer.convert_tokens_to_ids(str(digit)) for digit in range(10)]
    close = processor.tokenizer.convert_tokens_to_ids(")")
    first = torch.softmax(last_logits(reranker, processor, prompt, [RED])[digits[1 : min(count, 9) + 1]], dim=0)
    expected = torch.zeros(count)
    for index in range(1, count + 1):
        if count <= 9:
            expected[index - 1] = first[index - 1]
            continue
        lead = int(str(index)[0])
        valid = [close] + [digits[e] for e in range(10) if 10 * lead + e <= count]
        second = torch.softmax(last_logits(reranker, processor, prompt + str(lead), [RED])[valid], dim=0)
        expected[index - 1] = first[lead - 1] * (second[0] if index < 10 else second[1 + index % 10])
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)


def test_rerank_top_k_modes_and_limits():
    reranker, processor = tiny()
    candidates = ["deep red", "light blue", "dark green", "pale teal"]
    order, scores = reranker.rerank("What colour?", candidates, top_k=2, mode="pairwise", processor=processor)
    assert len(order) == 2 and scores.shape == (4,)
    assert float(scores[order[0]]) == float(scores.max())
    with pytest.raises(ValueError, match="mode="):
        reranker.rerank("q", candidates, mode="pointwise", processor=processor)
    with pytest.raises(ValueError, match="at most 99"):
        reranker.rerank("q", [f"c{index}" for index in range(100)], processor=processor)


# ------------------------------------------------------------------------------------------------ checkpoints


def test_authors_reranker_layout_loads_every_weight(tmp_path):
    tokenizer = build_tiny_tokenizer("qwen2_5_vl")
    causal_lm = build_tiny_causal_lm("qwen2_5_vl", tokenizer=tokenizer)
    folder = save_in_authors_layout(causal_lm, build_tiny_processor("qwen2_5_vl", tokenizer), tmp_path / "authors")
    reranker = UniMEV2Reranker.from_pretrained(folder)
    expected = causal_lm.state_dict()
    loaded = reranker.state_dict()
    assert expected.keys() == loaded.keys()  # lm_head included
    assert [key for key in expected if not torch.equal(expected[key], loaded[key])] == []
    unmapped = UniMEV2Reranker.from_pretrained(folder, key_mapping={}).state_dict()
    assert any(not torch.equal(expected[key], unmapped[key]) for key in expected)


FRESH_PROCESS = textwrap.dedent(
    """
    import sys
    for name in ("modeling_unime", "trainers", "evaluation"):
        sys.modules[name] = None
    import torch
    from PIL import Image
    from transformers import AutoModel
    reranker = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True)
    query = ("What colour is the shape?", sys.argv[2])
    candidates = ["a red circle", "a blue square", ("a shape", sys.argv[2])]
    scores = reranker.score(query, candidates)
    order, listwise = reranker.rerank(query, candidates)
    expected = torch.load(sys.argv[3])
    print(type(reranker).__name__, torch.equal(scores, expected["score"]), torch.equal(listwise, expected["listwise"]))
    """
)


def test_training_raises_the_yes_margin_and_the_checkpoint_reloads_in_a_fresh_process(tmp_path):
    reranker, processor = build_tiny_reranker()
    root = tmp_path / "images"
    train = synthetic_judge_dataset(512, root, num_negatives=8, seed=0)
    held_out = synthetic_judge_dataset(48, root, num_negatives=8, seed=99)
    args = UniMEV2RerankerTrainingArguments(
        str(tmp_path / "run"), report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
        per_device_train_batch_size=16, learning_rate=5e-3, warmup_steps=10, max_steps=180, listwise_weight=0.2,
        listwise_negatives=4, seed=0, eval_on_start=True, eval_strategy="no", logging_steps=30,
    )
    trainer = UniMEV2RerankerTrainer(model=reranker, args=args, train_dataset=train, eval_dataset=held_out,
                                     processing_class=processor, image_root=root)
    trainer.train()
    before = next(entry for entry in trainer.state.log_history if "eval_yes_margin" in entry)
    after = trainer.evaluate()
    assert abs(before["eval_yes_margin"]) < 0.01
    assert after["eval_yes_margin"] > 0.04  # P(Yes | positive) - P(Yes | hardest negative) on held-out rows
    assert after["eval_loss_pairwise"] < before["eval_loss_pairwise"]
    assert after["eval_loss_listwise"] < before["eval_loss_listwise"]

    folder = save_checkpoint(trainer.model, processor, tmp_path / "final", card=dict(training="180 tiny steps"))
    card = (folder / "README.md").read_text()
    assert "pipeline_tag: text-ranking" in card and "reranker.rerank(" in card and "180 tiny steps" in card
    image = str(root / held_out[0]["query_image"])
    loaded = UniMEV2Reranker.from_pretrained(folder)
    query = ("What colour is the shape?", image)
    candidates = ["a red circle", "a blue square", ("a shape", image)]
    expected = {"score": loaded.score(query, candidates), "listwise": loaded.rerank(query, candidates)[1]}
    torch.save(expected, tmp_path / "expected.pt")
    script = tmp_path / "load.py"
    script.write_text(FRESH_PROCESS)
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    environment.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run([sys.executable, str(script), str(folder), image, str(tmp_path / "expected.pt")],
                            cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("UniMEV2Reranker True True")


def test_reranker_adapter_defaults():
    assert RERANKER_ADAPTER["r"] == 128 and RERANKER_ADAPTER["alpha"] == 256 and RERANKER_ADAPTER["dropout"] == 0.05
    model = prepare_for_training(build_tiny_reranker()[0], "lora", **RERANKER_ADAPTER)
    trainable = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    assert trainable and all(".language_model." in name for name in trainable)  # vision tower frozen
    assert not any("visual" in name for name in trainable)


def test_recipe_runs_on_two_processes(tmp_path):
    from conftest import REPO_ROOT

    config = tmp_path / "reranker.yaml"
    config.write_text(textwrap.dedent(f"""
        model: tiny:qwen2_5_vl
        data: {{train: "synthetic-judge:16"}}
        finetuning: lora
        adapter: {{r: 8, alpha: 16}}
        training: {{output_dir: {tmp_path / "run"}, per_device_train_batch_size: 2, max_steps: 2, seed: 0,
                   disable_tqdm: true, save_steps: 2}}
    """))
    port = random.Random(os.getpid()).randint(20000, 40000)
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--main_process_port", str(port), str(REPO_ROOT / "recipes" / "train_reranker.py"), "--config", str(config)],
        env=environment, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "final" / "modeling_unime.py").is_file()
    assert (tmp_path / "run" / "final" / "scoring_unime.py").is_file()
    assert (tmp_path / "run" / "checkpoint-2").is_dir()
