"""The model package: config, processor prompt formats, pooling, encode, authors' checkpoints, AutoModel round trip."""

import json
import textwrap

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub import DatasetCard, ModelCard
from PIL import Image
from safetensors import safe_open

from conftest import FAMILIES, run_fresh_python, tiny_backbone_and_embedder
from modeling_unime import UniMEV2Config, UniMEV2Model, UniMEV2Processor
from modeling_unime.configuration_unime import QWEN3_VL_BACKBONES
from modeling_unime.export.convert import convert_checkpoint
from modeling_unime.modeling_unime import pool_last_token
from modeling_unime.tiny import (
    REAL_QWEN2_VOCAB_SIZE,
    build_tiny_backbone_config,
    save_in_authors_layout,
)

RED = Image.new("RGB", (40, 100), (220, 20, 20))
BLUE = Image.new("RGB", (90, 70), (20, 20, 220))
MIXED_TEXTS = ["a red car parked nearby", None, "What colour is the shape?", "a blue square"]
MIXED_IMAGES = [None, RED, BLUE, None]


def tiny(family):
    """(causal LM in the authors' class, UniMEV2Model with the same weights, processor) for one family."""
    return tiny_backbone_and_embedder(family)


def authors_recipe(causal_lm, batch):
    """The authors' embedding recipe: causal-LM forward, every hidden state, last layer, last token, L2-norm; image
    tokens without <|vision_start|> positioned as text, as their transformers 4.49 did (5.x: no token marked as an
    image token in mm_token_type_ids). Qwen3-VL, which they never trained, keeps its own positions."""
    if "mm_token_type_ids" in batch and causal_lm.config.model_type not in QWEN3_VL_BACKBONES:
        batch = dict(batch, mm_token_type_ids=torch.zeros_like(batch["mm_token_type_ids"]))
    with torch.no_grad():
        outputs = causal_lm(**batch, output_hidden_states=True, return_dict=True)
    return F.normalize(outputs.hidden_states[-1][:, -1, :], dim=-1)


# ---------------------------------------------------------------------------------------------------------- config


def test_config_round_trip_keeps_the_backbone(tmp_path):
    config = UniMEV2Config(backbone_config=build_tiny_backbone_config("qwen2_5_vl").to_dict(), matryoshka_dim=32)
    config.save_pretrained(tmp_path)
    loaded = UniMEV2Config.from_pretrained(tmp_path)
    assert loaded.backbone_type == "qwen2_5_vl"
    assert loaded.backbone_config.vision_config.out_hidden_size == 64
    assert loaded.matryoshka_dim == 32 and loaded.normalize and loaded.pooling == "last"


def test_unsupported_backbone_is_a_clear_error():
    with pytest.raises(ValueError, match="Unsupported backbone model_type 'llama'.*qwen2_vl"):
        UniMEV2Config(backbone_config={"model_type": "llama"})
    with pytest.raises(ValueError, match="pooling"):
        UniMEV2Config(backbone_config=build_tiny_backbone_config("qwen2_vl"), pooling="mean")


def test_real_vocabulary_option():
    config = build_tiny_backbone_config("qwen2_vl", real_vocab=True, hidden_size=256)
    assert config.text_config.vocab_size == REAL_QWEN2_VOCAB_SIZE
    assert sum(config.text_config.rope_parameters["mrope_section"]) == 256 // 4 // 2


# ------------------------------------------------------------------------------------------------------- processor


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_prompt_format_has_no_chat_template(family):
    _, _, processor = tiny(family)
    tokenizer = processor.tokenizer
    instruction = "Find an image caption describing the given image."
    batch = processor(texts=[None, "a red car"], images=[RED, None], instruction=instruction)
    image_row = tokenizer.decode(batch["input_ids"][0][batch["attention_mask"][0].bool()])
    grid = batch["image_grid_thw"][0]
    image_tokens = int(grid.prod()) // processor.image_processor.merge_size**2
    assert image_row == "<|image_pad|>" * image_tokens + " " + instruction
    text_row = tokenizer.decode(batch["input_ids"][1][batch["attention_mask"][1].bool()])
    assert text_row == instruction + " a red car"
    # Left padding: the shorter row is padded at the front.
    assert batch["attention_mask"][1, 0] == 0 and batch["attention_mask"][1, -1] == 1
    # mm_token_type_ids marks exactly the image tokens.
    assert int(batch["mm_token_type_ids"][0].sum()) == image_tokens


def test_mmeb_phi3v_placeholder_is_converted():
    _, _, processor = tiny("qwen2_vl")
    text = "<|image_1|>\nRepresent the given image with the following question: What is in the image?"
    batch = processor(texts=[text], images=[RED])
    decoded = processor.tokenizer.decode(batch["input_ids"][0])
    assert "<|image_1|>" not in decoded
    assert decoded.endswith(
        "<|image_pad|>\nRepresent the given image with the following question: What is in the image?"
    )
    assert processor.format_prompt(text, has_image=True) == text.replace("<|image_1|>", "<|image_pad|>")


def test_llava_onevision_prompt_is_a_chat_turn_without_the_image_token():
    _, _, processor = tiny("llava_onevision")
    prompt = processor.format_prompt("<image>\nWhat colour is the shape?", has_image=True)
    assert prompt == "<|im_start|>user\n<image>\nWhat colour is the shape?<|im_end|><|im_start|>assistant\n"
    assert processor.format_prompt("a red car", has_image=False) == (
        "<|im_start|>user\n\na red car<|im_end|><|im_start|>assistant\n"
    )
    batch = processor(texts=["<|image_1|> What colour?", "a red car"], images=[BLUE, None])
    assert int((batch["input_ids"][0] == processor.tokenizer.convert_tokens_to_ids("<image>")).sum()) > 1
    assert batch["pixel_values"].shape[0] == 1


def test_processor_save_and_load_back(tmp_path):
    _, _, processor = tiny("llava_onevision")
    processor.save_pretrained(tmp_path)
    loaded = UniMEV2Processor.from_pretrained(tmp_path)
    assert loaded.backbone_type == "llava_onevision" and loaded.num_image_tokens == 16
    a = processor(texts=["a", None], images=[None, RED])
    b = loaded(texts=["a", None], images=[None, RED])
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


# --------------------------------------------------------------------------------------------------------- pooling


def test_pool_last_token_left_and_right_padding():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    assert torch.equal(pool_last_token(hidden, left), hidden[[0, 1], [3, 3]])
    assert torch.equal(pool_last_token(hidden, right), hidden[[0, 1], [1, 2]])


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_side_does_not_change_the_embedding(family):
    _, model, processor = tiny(family)
    left = processor(texts=["a red car parked nearby", "dog"], images=None)
    padded_length = left["input_ids"].shape[1]
    lengths = left["attention_mask"].sum(1)
    right_ids = torch.full_like(left["input_ids"], processor.tokenizer.pad_token_id)
    right_mask = torch.zeros_like(left["attention_mask"])
    for row, length in enumerate(lengths):
        right_ids[row, :length] = left["input_ids"][row, padded_length - length :]
        right_mask[row, :length] = 1
    with torch.no_grad():
        from_left = model(**left).embeddings
        from_right = model(input_ids=right_ids, attention_mask=right_mask).embeddings
    torch.testing.assert_close(from_left, from_right, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------- encode


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_batch_equals_rows_embedded_alone(family):
    _, model, processor = tiny(family)
    together = model.encode(texts=MIXED_TEXTS, images=MIXED_IMAGES, processor=processor, batch_size=4)
    alone = torch.cat(
        [model.encode(texts=[t], images=[i], processor=processor) for t, i in zip(MIXED_TEXTS, MIXED_IMAGES)]
    )
    assert together.shape == (4, model.config.hidden_size) and together.dtype == torch.float32
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(together.norm(dim=1), torch.ones(4), atol=1e-5, rtol=0)
    # Image rows of different sizes and text rows really differ.
    assert (together[1] - together[2]).abs().max() > 1e-3 and (together[0] - together[3]).abs().max() > 1e-3


def test_encode_restores_input_order_and_truncates():
    _, model, processor = tiny("qwen2_vl")
    full = model.encode(texts=MIXED_TEXTS, images=MIXED_IMAGES, processor=processor, batch_size=2)
    permutation = [2, 0, 3, 1]
    permuted = model.encode(
        texts=[MIXED_TEXTS[i] for i in permutation],
        images=[MIXED_IMAGES[i] for i in permutation],
        processor=processor,
        batch_size=3,
    )
    torch.testing.assert_close(permuted, full[permutation], atol=1e-5, rtol=0)
    truncated = model.encode(texts=MIXED_TEXTS, images=MIXED_IMAGES, processor=processor, truncate_dim=16)
    torch.testing.assert_close(truncated, F.normalize(full[:, :16], dim=-1), atol=1e-5, rtol=0)
    model.config.matryoshka_dim = 8
    try:
        default_truncated = model.encode(texts=[MIXED_TEXTS[0]], processor=processor)
    finally:
        model.config.matryoshka_dim = None
    torch.testing.assert_close(default_truncated, F.normalize(full[0:1, :8], dim=-1), atol=1e-5, rtol=0)
    assert model.encode(texts=[], processor=processor).shape == (0, model.config.hidden_size)


def test_encode_turns_dropout_off_and_restores_training_mode():
    _, model, processor = tiny("qwen2_vl")
    texts = ["a red car parked nearby", "a blue square"]
    # Qwen2-VL applies attention dropout functionally, from each attention module's `attention_dropout`.
    dropouts = [module for module in model.modules() if hasattr(module, "attention_dropout")]
    assert dropouts
    reference = model.encode(texts=texts, processor=processor)
    model.train()
    try:
        for module in dropouts:
            module.attention_dropout = 0.5
        again = model.encode(texts=texts, processor=processor)
        assert model.training
    finally:
        for module in dropouts:
            module.attention_dropout = 0.0
        model.eval()
    torch.testing.assert_close(again, reference, atol=0, rtol=0)


def test_instruction_and_paths(tmp_path):
    _, model, processor = tiny("qwen2_vl")
    RED.save(tmp_path / "red.png")
    from_path = model.encode(images=["red.png"], image_root=tmp_path, processor=processor, instruction="Find it.")
    from_pil = model.encode(images=[RED], processor=processor, instruction="Find it.")
    torch.testing.assert_close(from_path, from_pil, atol=0, rtol=0)
    without_instruction = model.encode(images=[RED], processor=processor)
    assert (from_pil - without_instruction).abs().max() > 1e-4


# ------------------------------------------------------------------------------------------------------- bad input


def test_bad_inputs_name_the_row(tmp_path):
    _, model, processor = tiny("qwen2_vl")
    (tmp_path / "corrupt.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"Row 2: image file not found: .*missing\.png"):
        model.encode(texts=["a", "b", "c"], images=[None, None, str(tmp_path / "missing.png")], processor=processor)
    with pytest.raises(ValueError, match=r"Row 1: image file .*corrupt\.jpg.* is not a readable image"):
        model.encode(texts=["a", "b"], images=[None, str(tmp_path / "corrupt.jpg")], processor=processor)
    with pytest.raises(ValueError, match="Row 1: the row has neither text nor image"):
        model.encode(texts=["a", None], images=[None, None], processor=processor)
    with pytest.raises(ValueError, match="texts has 2 rows but images has 3"):
        model.encode(texts=["a", "b"], images=[None, None, RED], processor=processor)
    with pytest.raises(ValueError, match="Row 0: the text has an image placeholder"):
        model.encode(texts=["<|image_1|> what?"], processor=processor)


def test_loading_an_unsupported_checkpoint_is_a_clear_error(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, vocab_size=10).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="holds a 'llama' model"):
        UniMEV2Model.from_pretrained(tmp_path)


# --------------------------------------------------------------------------------------------- authors' checkpoints


@pytest.mark.parametrize("family", FAMILIES)
def test_authors_layout_loads_every_weight_and_matches_their_recipe(family, tmp_path):
    causal_lm, _, processor = tiny(family)
    folder = save_in_authors_layout(causal_lm, processor, tmp_path / "authors")
    with safe_open(folder / "model.safetensors", "pt") as checkpoint:
        keys = list(checkpoint.keys())
    if family in QWEN3_VL_BACKBONES:
        # Qwen3-VL was published with today's names; the wrapper reads them as they are.
        assert any(key.startswith("model.language_model.") for key in keys)
    else:
        # The folder really is in the old layout, not in the names the wrapper uses.
        assert not any(key.startswith("model.language_model.") for key in keys)
        assert any(key.startswith(("model.layers.", "language_model.model.")) for key in keys)

    model = UniMEV2Model.from_pretrained(folder).eval()
    expected = causal_lm.model.state_dict()
    loaded = model.model.state_dict()
    assert expected.keys() == loaded.keys()
    assert [key for key in expected if not torch.equal(expected[key], loaded[key])] == []
    if family not in QWEN3_VL_BACKBONES:
        # Negative control: without the key mapping the same folder leaves weights at their random init.
        unmapped = UniMEV2Model.from_pretrained(folder, key_mapping={}).model.state_dict()
        assert any(not torch.equal(expected[key], unmapped[key]) for key in expected)

    folder_processor = UniMEV2Processor.from_pretrained(folder)
    assert folder_processor.backbone_type == family
    # A plain checkpoint of the authors' families gets their evaluation size; Qwen3-VL (no release of theirs) its own.
    assert folder_processor.image_resize == ("native" if family in QWEN3_VL_BACKBONES else "square:1344")
    folder_processor.image_resize = "native"
    ours = model.encode(texts=MIXED_TEXTS, images=MIXED_IMAGES, processor=folder_processor)
    batch = processor(texts=MIXED_TEXTS, images=MIXED_IMAGES)
    torch.testing.assert_close(ours, authors_recipe(causal_lm, batch), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind, pipeline_tag", [("embedder", "feature-extraction"), ("reranker", "text-ranking")])
def test_model_cards_carry_validated_card_data(tmp_path, kind, pipeline_tag):
    from modeling_unime.export.card import render_model_card, write_model_card

    card = ModelCard(render_model_card(model_name="m", base_model="Qwen/Qwen2-VL-2B-Instruct", kind=kind,
                                       extra_tags=["demo"], repo_id="org/m"))
    assert card.data.base_model == "Qwen/Qwen2-VL-2B-Instruct" and card.data.pipeline_tag == pipeline_tag
    assert card.data.library_name == "transformers" and card.data.license == "mit"
    assert {"unime-v2", "qwen2_vl", "demo"} <= set(card.data.tags)
    assert str(card).startswith("---\nlibrary_name: transformers\npipeline_tag: ")  # the order METADATA_ORDER gives
    # Neither a tiny model, a local folder nor nothing becomes metadata; "unknown" never appears.
    for base_model in (None, "tiny:qwen2_vl", str(tmp_path)):
        text = render_model_card(model_name="m", base_model=base_model, kind=kind)
        assert ModelCard(text).data.base_model is None and "unknown" not in text
    path = write_model_card(tmp_path, model_name="m", base_model=str(tmp_path), kind=kind, training="3 steps")
    assert ModelCard.load(path).data.base_model is None and "3 steps" in path.read_text()
    with pytest.raises(ValueError, match="kind='ranker'"):
        render_model_card(model_name="m", kind="ranker")


def test_dataset_card_lists_the_judge_row_columns():
    import typing

    from modeling_unime.data import MinedRow
    from modeling_unime.export.card import render_dataset_card

    card = DatasetCard(render_dataset_card(
        name="d", rows=1500, embedder="e", judge="j", official_compat=True, report="done", instruction="Judge it.",
        config=dict(top_k=50, similarity_threshold=0.9, beta=0.01, num_negatives=10, interval=5,
                    empty_fallback="paper", seed=3)))
    assert card.data.size_categories == ["1K<n<10K"] and "mllm-as-a-judge" in card.data.tags
    assert card.data.configs[0]["data_files"][0]["path"] == "data/train-*.parquet"
    assert card.data.configs[1]["config_name"] == "judged_pairs"
    rows = [line for line in card.text.splitlines() if line.startswith("| ") and not line.startswith("| column")]
    assert [line.split(" | ")[0].removeprefix("| ") for line in rows] == list(typing.get_type_hints(MinedRow))
    assert rows[-1].startswith("| judge_score_source | list[string] |")
    assert "judge mode: full (the large judge scored every pair)" in card.text
    assert "| neg_images | list[string / null] |" in card.text and "| judge_scores | list[float64] |" in card.text
    assert "delta = 0.9, beta = 0.01" in card.text and "official_compat=True" in card.text


def test_converter_writes_a_self_contained_checkpoint(tmp_path):
    causal_lm, _, processor = tiny("qwen2_vl")
    source = save_in_authors_layout(causal_lm, processor, tmp_path / "UniME-V2-Qwen2VL-tiny")
    destination = convert_checkpoint(source, tmp_path / "converted", repo_id="org/unime-tiny", verify=True)
    config = json.loads((destination / "config.json").read_text())
    assert config["model_type"] == "unime_v2"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_unime.UniMEV2Config",
        "AutoModel": "modeling_unime.UniMEV2Model",
    }
    for code_file in ("configuration_unime.py", "modeling_unime.py", "processing_unime.py"):
        assert (destination / code_file).is_file()
    processor_config = json.loads((destination / "processor_config.json").read_text())
    assert processor_config["auto_map"]["AutoProcessor"] == "processing_unime.UniMEV2Processor"
    card = (destination / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: feature-extraction\n")
    assert 'AutoModel.from_pretrained("org/unime-tiny"' in card
    assert "- qwen2_vl" in card and "$" not in card.split("```bibtex")[0]
    # A local folder is no Hub repo: the card names it in the text, never in the metadata (and never "unknown").
    metadata = ModelCard(card).data
    assert metadata.base_model is None and "base_model" not in card.split("\n---\n", 1)[0]
    assert f"Base model: `{source}`, a local folder" in card
    assert (metadata.library_name, metadata.pipeline_tag, metadata.license) == (
        "transformers", "feature-extraction", "mit"
    )
    converted = UniMEV2Model.from_pretrained(destination)
    assert converted.processor.image_resize == "square:1344"
    assert converted.config.image_position_rule == "vision_start_only"
    converted.processor.image_resize = "native"
    torch.testing.assert_close(
        converted.encode(texts=MIXED_TEXTS, images=MIXED_IMAGES),
        authors_recipe(causal_lm, processor(texts=MIXED_TEXTS, images=MIXED_IMAGES)),
        atol=1e-5,
        rtol=0,
    )


# ------------------------------------------------------------------------------- AutoModel round trip, fresh process


def _lay_out_hub_cache(hub_cache, repo_id, folder):
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<sha>/...}."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo_folder = hub_cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_folder / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for file in folder.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (repo_folder / "refs").mkdir()
    (repo_folder / "refs" / "main").write_text(revision)


FRESH_PROCESS_SCRIPT = textwrap.dedent(
    """
    import json, sys
    # A user's process without this package (even where it is pip-installed, as in CI): the code must travel.
    for name in ("modeling_unime", "trainers", "evaluation"):
        sys.modules[name] = None
    import torch
    from transformers import AutoModel, AutoProcessor
    jobs = json.loads(sys.argv[1])
    for job in jobs:
        for source in (job["path"], job["repo_id"]):
            model = AutoModel.from_pretrained(source, trust_remote_code=True)
            processor = AutoProcessor.from_pretrained(source, trust_remote_code=True)
            assert type(model).__name__ == "UniMEV2Model" and type(processor).__name__ == "UniMEV2Processor"
            auto = model.encode(texts=job["texts"], images=job["images"])
            explicit = model.encode(texts=job["texts"], images=job["images"], processor=processor)
            expected = torch.load(job["expected"])
            print(source, torch.equal(auto, expected), torch.equal(explicit, expected), flush=True)
    """
)


def test_saved_checkpoints_load_in_a_fresh_process_without_the_package(tmp_path):
    images_folder = tmp_path / "images"
    images_folder.mkdir()
    RED.save(images_folder / "red.png")
    BLUE.save(images_folder / "blue.png")
    image_paths = [None, str(images_folder / "red.png"), str(images_folder / "blue.png"), None]
    hub_cache = tmp_path / "hf_home" / "hub"
    jobs = []
    for family in FAMILIES:
        _, model, processor = tiny(family)
        folder = tmp_path / f"saved-{family}"
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        expected = model.encode(texts=MIXED_TEXTS, images=image_paths, processor=processor)
        torch.save(expected, tmp_path / f"{family}.pt")
        repo_id = f"unime-test/tiny-{family.replace('_', '-')}"
        _lay_out_hub_cache(hub_cache, repo_id, folder)
        jobs.append(
            dict(path=str(folder), repo_id=repo_id, texts=MIXED_TEXTS, images=image_paths,
                 expected=str(tmp_path / f"{family}.pt"))
        )
    script = tmp_path / "load.py"
    script.write_text(FRESH_PROCESS_SCRIPT)
    # cwd: not the repository, so the package cannot be imported from the working directory
    result = run_fresh_python([str(script), json.dumps(jobs)], tmp_path, timeout=600,
                              HF_HOME=str(tmp_path / "hf_home"), HF_MODULES_CACHE=str(tmp_path / "modules"))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.endswith(("True", "False"))]
    assert len(lines) == 2 * len(FAMILIES), result.stdout
    assert all(line.endswith("True True") for line in lines), result.stdout
