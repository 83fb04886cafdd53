"""Qwen3-VL as a backbone family: the embedder against the backbone's own forward, deepstack, the prompt, the MoE
variant, the reranker, and the recipes (mine -> train -> rerank -> evaluate) on tiny models."""

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import run_recipe, tiny_backbone_and_embedder
from modeling_unime import UniMEV2Model, UniMEV2Processor
from modeling_unime.tiny import (
    build_tiny_causal_lm,
    build_tiny_processor,
    build_tiny_reranker,
    build_tiny_tokenizer,
    save_in_authors_layout,
)

RED = Image.new("RGB", (100, 150), (220, 20, 20))  # 96 wide, 160 high after rounding to 32: 15 tokens
BLUE = Image.new("RGB", (70, 64), (20, 20, 220))
TEXTS = ["a red car parked nearby", None, "What colour is the shape?", "dog"]
IMAGES = [None, RED, BLUE, None]


def tiny(family="qwen3_vl"):
    """(Qwen3VLForConditionalGeneration, UniMEV2Model with its weights, processor); attention sharpened."""
    return tiny_backbone_and_embedder(family)


def backbone_embedding(causal_lm, processor, text, image):
    """Independent reference: the stock Qwen3-VL causal LM on one unpadded row, rendered by the stock processor from
    the chat messages, hidden_states[-1] at the last token, L2-normalised."""
    content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": text or ""}]
    prompt = processor.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                     add_generation_prompt=True)
    batch = processor.backbone_processor(text=[prompt], images=[image] if image is not None else None,
                                         return_tensors="pt")
    with torch.no_grad():
        outputs = causal_lm(**batch, output_hidden_states=True, return_dict=True)
    return F.normalize(outputs.hidden_states[-1][0, -1].float(), dim=-1)


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_vl_moe"])
def test_encode_equals_the_backbones_own_forward_for_every_row_kind_in_a_left_padded_batch(family):
    causal_lm, model, processor = tiny(family)
    together = model.encode(texts=TEXTS, images=IMAGES, processor=processor, batch_size=4)
    batch = processor(texts=TEXTS, images=IMAGES)
    assert (batch["attention_mask"] == 0).any(), "the batch must really be padded"
    expected = torch.stack([backbone_embedding(causal_lm, processor, text, image)
                            for text, image in zip(TEXTS, IMAGES)])
    torch.testing.assert_close(together, expected, atol=2e-5, rtol=0)
    assert (together[1] - together[2]).abs().max() > 1e-2 and (together[0] - together[3]).abs().max() > 1e-2


def test_deepstack_features_reach_the_embedding_of_image_rows_only():
    """Negative control for the parity test: without the deepstack features an image row's embedding moves; a text
    row's does not."""
    _, model, processor = tiny()
    reference = model.encode(texts=TEXTS, images=IMAGES, processor=processor)
    mergers = model.model.visual.deepstack_merger_list
    saved = [merger.linear_fc2.weight.detach().clone() for merger in mergers]
    saved_bias = [merger.linear_fc2.bias.detach().clone() for merger in mergers]
    try:
        with torch.no_grad():
            for merger in mergers:
                merger.linear_fc2.weight.zero_()
                merger.linear_fc2.bias.zero_()
        without = model.encode(texts=TEXTS, images=IMAGES, processor=processor)
    finally:
        with torch.no_grad():
            for merger, weight, bias in zip(mergers, saved, saved_bias):
                merger.linear_fc2.weight.copy_(weight)
                merger.linear_fc2.bias.copy_(bias)
    moved = (without - reference).abs().amax(dim=1)
    assert moved[1] > 1e-3 and moved[2] > 1e-3
    assert moved[0] < 1e-6 and moved[3] < 1e-6


def test_image_tokens_get_their_3d_positions():
    """Negative control: the same image row with its image tokens marked as text (1-D positions) embeds differently,
    so the parity test above really checks the M-RoPE positions."""
    _, model, processor = tiny()
    batch = processor(texts=["What colour?"], images=[RED])
    with torch.no_grad():
        right = model(**batch).embeddings
        # Positions all 1-D: every token counted as text (deepstack still gets the image tokens by id).
        flat = torch.arange(batch["input_ids"].shape[1]).view(1, 1, -1).expand(3, 1, -1)
        wrong = model(**batch, position_ids=flat).embeddings
    assert (right - wrong).abs().max() > 1e-3


def test_prompt_is_one_chat_turn_with_the_image_wrapped_in_vision_tokens():
    _, _, processor = tiny()
    prompt = processor.format_prompt("<|image_1|>\nWhat colour is the shape?", has_image=True,
                                     instruction="Represent the image:")
    assert prompt == ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Represent the image: "
                      "What colour is the shape?<|im_end|>\n<|im_start|>assistant\n")
    assert processor.format_prompt("a red car", has_image=False) == (
        "<|im_start|>user\na red car<|im_end|>\n<|im_start|>assistant\n")
    batch = processor(texts=[None], images=[RED])
    grid = batch["image_grid_thw"][0].tolist()
    assert grid == [1, 10, 6]  # 100 wide, 150 high -> 96x160 with 16-pixel patches
    assert int((batch["mm_token_type_ids"][0] == 1).sum()) == 15 == int(batch["input_ids"][0].eq(
        processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum())


def test_plain_qwen3_vl_folder_loads_as_an_embedder_and_processor_at_native_size(tmp_path):
    causal_lm, model, processor = tiny()
    folder = save_in_authors_layout(causal_lm, processor, tmp_path / "plain")
    loaded = UniMEV2Model.from_pretrained(folder).eval()
    expected, got = causal_lm.model.state_dict(), loaded.model.state_dict()
    assert expected.keys() == got.keys() and all(torch.equal(expected[key], got[key]) for key in expected)
    folder_processor = UniMEV2Processor.from_pretrained(folder)
    assert folder_processor.backbone_type == "qwen3_vl" and folder_processor.image_resize == "native"
    assert folder_processor.image_processor.patch_size == 16
    torch.testing.assert_close(loaded.encode(texts=TEXTS, images=IMAGES, processor=folder_processor),
                               model.encode(texts=TEXTS, images=IMAGES, processor=processor), atol=1e-6, rtol=0)


def test_converter_turns_a_plain_qwen3_vl_folder_into_a_self_contained_checkpoint(tmp_path):
    from modeling_unime.export.convert import convert_checkpoint

    causal_lm, model, processor = tiny()
    source = save_in_authors_layout(causal_lm, processor, tmp_path / "Qwen3-VL-tiny")
    destination = convert_checkpoint(source, tmp_path / "converted", repo_id="org/unime-qwen3vl-tiny", verify=True)
    config = json.loads((destination / "config.json").read_text())
    assert config["model_type"] == "unime_v2" and config["backbone_config"]["model_type"] == "qwen3_vl"
    assert "- qwen3_vl" in (destination / "README.md").read_text()
    converted = UniMEV2Model.from_pretrained(destination)
    torch.testing.assert_close(converted.encode(texts=TEXTS, images=IMAGES),
                               model.encode(texts=TEXTS, images=IMAGES, processor=processor), atol=1e-6, rtol=0)


def test_saved_embedder_reloads_through_automodel_with_identical_embeddings(tmp_path):
    from transformers import AutoModel, AutoProcessor

    _, model, processor = tiny()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path, trust_remote_code=True)
    loaded_processor = AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    assert loaded.config.backbone_type == "qwen3_vl"
    torch.testing.assert_close(loaded.encode(texts=TEXTS, images=IMAGES, processor=loaded_processor),
                               model.encode(texts=TEXTS, images=IMAGES, processor=processor), atol=0, rtol=0)


# --------------------------------------------------------------------------------------------------------- reranker


def test_reranker_pairwise_and_listwise_scores_match_full_forwards():
    reranker, processor = build_tiny_reranker("qwen3_vl")
    with torch.no_grad():
        reranker.lm_head.weight.mul_(8)
    query = ("What colour is the shape?", RED)
    candidates = ["deep red", ("a shape", BLUE), "light blue"]
    scorer = reranker.scorer(processor)
    tokenizer = processor.tokenizer

    def last_logits(text, images):
        batch = processor.backbone_processor(text=[text], images=images, return_tensors="pt")
        with torch.no_grad():
            return reranker(**batch).logits[0, -1].float()

    scores = reranker.score(query, candidates, processor=processor)
    yes, no = (tokenizer.convert_tokens_to_ids(word) for word in ("Yes", "No"))
    for candidate, score in zip(candidates, scores):
        item = (candidate, None) if isinstance(candidate, str) else candidate
        images = [RED] + ([item[1]] if item[1] is not None else [])
        expected = torch.softmax(last_logits(scorer.render(query, item), images)[[yes, no]], dim=0)[0]
        assert abs(float(score) - float(expected)) < 1e-5
    assert scores.max() - scores.min() > 1e-3

    texts = ["candidate one", "candidate two", "candidate three"]
    order, listwise = reranker.rerank(query, texts, processor=processor)
    prompt = scorer.render_listwise(query, [(text, None) for text in texts])
    digits = [tokenizer.convert_tokens_to_ids(str(digit)) for digit in (1, 2, 3)]
    expected = torch.softmax(last_logits(prompt, [RED])[digits], dim=0)
    torch.testing.assert_close(listwise, expected, atol=1e-5, rtol=0)
    assert order == sorted(range(3), key=lambda index: -float(listwise[index]))


# ---------------------------------------------------------------------------------------------------------- recipes


def test_recipes_mine_train_rerank_and_evaluate_with_qwen3_vl(tmp_path, monkeypatch):
    """The same recipes as the other families, every stage on tiny Qwen3-VL models: the embedder and judge mine,
    the embedder trains (DoRA, GradCache) on the mined data, the reranker trains, and the evaluation reranks."""
    from datasets import load_from_disk

    mined = tmp_path / "mine"
    (tmp_path / "mine.yaml").write_text(
        "data: synthetic:12\nembedder: tiny:qwen3_vl\njudge: tiny:qwen3_vl\n"
        f"output_dir: {mined}\nmining: {{top_k: 6, num_negatives: 3, interval: 2, shard_size: 6, seed: 1}}\n")
    run_recipe(monkeypatch, "mine_hard_negatives.py", "--config", str(tmp_path / "mine.yaml"))
    dataset = load_from_disk(str(mined / "dataset"))
    assert len(dataset) == 12 and all(len(row["judge_scores"]) == 1 + len(row["neg_texts"]) for row in dataset)
    assert all(0.0 <= score <= 1.0 for row in dataset for score in row["judge_scores"])

    embedder_dir = tmp_path / "embedder"
    (tmp_path / "train.yaml").write_text(
        f"model: tiny:qwen3_vl\ndata: {{train: {mined / 'dataset'}, image_root: {mined / 'images'}}}\n"
        "finetuning: dora\nadapter: {r: 4, alpha: 8, dropout: 0.0}\nmerge: true\n"
        f"training: {{output_dir: {embedder_dir}, num_negatives: 2, per_device_train_batch_size: 4, "
        "gradcache: true, gradcache_chunk_size: 2, max_steps: 2, learning_rate: 0.01, logging_steps: 1, "
        "save_steps: 2, eval_strategy: 'no', seed: 0, disable_tqdm: true}\n")
    run_recipe(monkeypatch, "train_embedding.py", "--config", str(tmp_path / "train.yaml"))
    trained = UniMEV2Model.from_pretrained(embedder_dir / "final")
    assert trained.config.backbone_type == "qwen3_vl"
    losses = [entry["loss"] for entry in json.loads(
        (embedder_dir / "checkpoint-2" / "trainer_state.json").read_text())["log_history"] if "loss" in entry]
    assert len(losses) == 2 and all(loss == loss and loss > 0 for loss in losses)
    untrained = tiny()[1]
    probe = trained.encode(texts=["a red circle"], images=[RED])
    assert probe.shape == (1, 64) and (probe - untrained.encode(
        texts=["a red circle"], images=[RED], processor=trained.processor)).abs().max() > 1e-4

    reranker_dir = tmp_path / "reranker"
    (tmp_path / "reranker.yaml").write_text(
        "model: tiny:qwen3_vl\ndata: {train: 'synthetic-judge:16'}\nfinetuning: full\n"
        f"training: {{output_dir: {reranker_dir}, listwise_negatives: 2, per_device_train_batch_size: 4, "
        "max_steps: 2, learning_rate: 0.001, logging_steps: 1, save_steps: 2, seed: 0, disable_tqdm: true}\n")
    run_recipe(monkeypatch, "train_reranker.py", "--config", str(tmp_path / "reranker.yaml"))
    final_reranker = next(path for path in (reranker_dir / "final", reranker_dir) if (path / "config.json").is_file())

    urban = tmp_path / "Urban1k"
    (urban / "image").mkdir(parents=True)
    (urban / "caption").mkdir()
    for index, colour in enumerate(["red", "blue", "green"], start=1):
        Image.new("RGB", (40, 40), colour).save(urban / "image" / f"{index}.jpg")
        (urban / "caption" / f"{index}.txt").write_text(f"a long caption about something {colour}\n")
    (tmp_path / "eval.yaml").write_text(
        f"model: {embedder_dir / 'final'}\nreranker: {final_reranker}\noutput_dir: {tmp_path / 'eval'}\n"
        f"retrieval: {{urban1k: {{folder: {urban}, rerank_top_k: 2}}}}\n")
    run_recipe(monkeypatch, "run_evaluation.py", "--config", str(tmp_path / "eval.yaml"))
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert set(results["retrieval"]["urban1k"]) == {"embedder", "embedder + rerank"}


def test_a_plain_tied_qwen3_vl_folder_loads_as_a_reranker_with_its_tied_head(tmp_path):
    """Qwen3-VL-2B ties its LM head to the input embeddings (tie_word_embeddings in both configs): the reranker keeps
    the tie and gives the stock model's logits."""
    from transformers import Qwen3VLForConditionalGeneration

    from modeling_unime import UniMEV2Reranker

    tokenizer = build_tiny_tokenizer("qwen3_vl")
    config = build_tiny_causal_lm("qwen3_vl", tokenizer=tokenizer).config
    config.tie_word_embeddings = config.text_config.tie_word_embeddings = True
    torch.manual_seed(0)
    stock = Qwen3VLForConditionalGeneration(config).eval()
    processor = build_tiny_processor("qwen3_vl", tokenizer)
    reranker = UniMEV2Reranker.from_pretrained(save_in_authors_layout(stock, processor, tmp_path / "plain")).eval()
    assert reranker.lm_head.weight.data_ptr() == reranker.model.language_model.embed_tokens.weight.data_ptr()
    batch = processor(texts=["What colour is the shape?"], images=[RED])
    with torch.no_grad():
        torch.testing.assert_close(reranker(**batch).logits, stock(**batch).logits, atol=1e-5, rtol=0)
