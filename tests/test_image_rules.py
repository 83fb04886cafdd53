"""The two image rules of the authors' stack: M-RoPE positions of image tokens (transformers 4.49) and image sizes.

Checked here against independent computations (transformers 5.x's own position code for the images it positions
the same way, plain aranges for the others, PIL resizes written out by hand); the comparison with the real 4.49
stack is in test_authors_checkpoints.py.
"""


import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from modeling_unime import UniMEV2Config, UniMEV2Model, UniMEV2Processor
from modeling_unime.modeling_unime import vision_start_position_ids
from modeling_unime.processing_unime import canonical_image_resize, load_image, resize_image, resized_size
from modeling_unime.tiny import build_tiny_causal_lm, build_tiny_processor, build_tiny_tokenizer

QWEN_FAMILIES = ["qwen2_vl", "qwen2_5_vl"]
RED = Image.new("RGB", (56, 84), (220, 20, 20))
BLUE = Image.new("RGB", (112, 56), (20, 20, 220))


def _sharpened(causal_lm):
    """Sharper attention than the random init, so that a position error changes the embeddings visibly."""
    with torch.no_grad():
        for name, parameter in causal_lm.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                parameter.mul_(4)
    return causal_lm


def _pair(family, rule="vision_start_only"):
    tokenizer = build_tiny_tokenizer(family)
    processor = build_tiny_processor(family, tokenizer)
    causal_lm = _sharpened(build_tiny_causal_lm(family, tokenizer=tokenizer)).eval()
    model = UniMEV2Model(UniMEV2Config(backbone_config=causal_lm.config.to_dict(), image_position_rule=rule)).eval()
    model.model.load_state_dict(causal_lm.model.state_dict(), strict=True)
    return causal_lm, model, processor


def _stock_recipe(causal_lm, batch):
    with torch.no_grad():
        hidden = causal_lm(**batch, output_hidden_states=True, return_dict=True).hidden_states[-1][:, -1]
    return F.normalize(hidden, dim=-1)


# ------------------------------------------------------------------------------------------------ positions


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_without_vision_start_image_tokens_get_text_positions(family):
    causal_lm, model, processor = _pair(family)
    batch = processor(texts=["a photo", "a longer text-only row here", None], images=[RED, None, BLUE])
    config = causal_lm.config
    positions = vision_start_position_ids(
        batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"], config.image_token_id,
        config.vision_start_token_id, config.vision_config.spatial_merge_size,
    )
    mask = batch["attention_mask"].bool()
    for row in range(3):
        expected = torch.arange(int(mask[row].sum())).expand(3, -1)
        assert torch.equal(positions[:, row, mask[row]], expected)
        assert (positions[:, row, ~mask[row]] == 1).all()  # padding, as 4.49 fills it
    # transformers 5.x gives the same image tokens 3-D positions: the rule is not a no-op on these rows.
    native, _ = causal_lm.model.get_rope_index(
        batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"], image_grid_thw=batch["image_grid_thw"],
        attention_mask=batch["attention_mask"],
    )
    assert not torch.equal(native[:, 0, mask[0]], positions[:, 0, mask[0]])


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_images_after_vision_start_get_the_3d_positions_transformers_gives_them(family):
    causal_lm, _, processor = _pair(family)
    tokenizer = processor.tokenizer
    wrapped = "<|vision_start|><|image_pad|><|vision_end|>"
    texts = [f"{wrapped}a red shape", "plain text row", f"two {wrapped} then {wrapped} end"]
    batch = processor._backbone_processor(
        text=texts, images=[RED, BLUE, RED], padding=True, padding_side="left", return_tensors="pt"
    )
    config = causal_lm.config
    ours = vision_start_position_ids(
        batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"], config.image_token_id,
        config.vision_start_token_id, config.vision_config.spatial_merge_size,
    )
    native, _ = causal_lm.model.get_rope_index(
        batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"], image_grid_thw=batch["image_grid_thw"],
        attention_mask=batch["attention_mask"],
    )
    mask = batch["attention_mask"].bool()
    assert tokenizer.padding_side == "left" and (~mask).any()
    for row in range(3):
        assert torch.equal(ours[:, row, mask[row]], native[:, row, mask[row]])


def test_a_mixed_batch_assigns_each_image_its_own_grid():
    """Row 0's image has no vision start (text positions), row 1's has (3-D): row 1 must use its own grid."""
    ids = torch.tensor([[7] * 6 + [5], [9] + [7] * 4 + [5, 6]])  # 7: image token, 9: vision start
    grids = torch.tensor([[1, 6, 4], [1, 4, 4]])                 # 6 tokens (3x2), then 4 tokens (2x2)
    positions = vision_start_position_ids(ids, None, grids, image_token_id=7, vision_start_token_id=9,
                                          spatial_merge_size=2)
    assert positions[:, 0].tolist() == [list(range(7))] * 3
    assert positions[:, 1].tolist() == [[0, 1, 1, 1, 1, 3, 4], [0, 1, 1, 2, 2, 3, 4], [0, 1, 2, 1, 2, 3, 4]]
    with pytest.raises(ValueError, match="more images than image_grid_thw"):
        vision_start_position_ids(ids, None, grids[:1], 7, 9, 2)


@pytest.mark.parametrize("family", QWEN_FAMILIES)
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_embeddings_under_each_rule_match_the_stock_class(family, padding_side):
    causal_lm, model, processor = _pair(family)
    texts, images = ["a photo", "a longer text-only row here", None], [RED, None, BLUE]
    batch = processor(texts=texts, images=images)
    if padding_side == "right":
        processor.tokenizer.padding_side = "right"
        batch = processor._backbone_processor(
            text=[processor.format_prompt(text, image is not None) for text, image in zip(texts, images)],
            images=[RED, BLUE], padding=True, padding_side="right", return_tensors="pt",
        )
        processor.tokenizer.padding_side = "left"
    with torch.no_grad():
        ours = model(**batch).embeddings
        model.config.image_position_rule = "all_images"
        ours_all_images = model(**batch).embeddings
    # 4.49 positions, obtained independently: transformers 5.x marks no token as an image token.
    text_positions = dict(batch, mm_token_type_ids=torch.zeros_like(batch["mm_token_type_ids"]))
    stock_positions = dict(batch)
    if padding_side == "right":  # the stock class pools the last position; gather each row's last real token
        last = batch["attention_mask"].sum(1) - 1
        pool = lambda recipe_batch: F.normalize(causal_lm(**recipe_batch, output_hidden_states=True).hidden_states[-1][  # noqa: E731
            torch.arange(3), last], dim=-1)
        with torch.no_grad():
            expected, expected_all_images = pool(text_positions), pool(stock_positions)
    else:
        expected, expected_all_images = (_stock_recipe(causal_lm, text_positions),
                                         _stock_recipe(causal_lm, stock_positions))
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours_all_images, expected_all_images, atol=1e-5, rtol=0)
    assert (ours[[0, 2]] - ours_all_images[[0, 2]]).abs().max() > 1e-3  # image rows: the rule matters
    torch.testing.assert_close(ours[1], ours_all_images[1], atol=1e-6, rtol=0)  # text row: it does not


def test_rule_is_a_saved_setting(tmp_path):
    _, model, _ = _pair("qwen2_vl", rule="all_images")
    model.save_pretrained(tmp_path)
    assert UniMEV2Model.from_pretrained(tmp_path).config.image_position_rule == "all_images"
    assert UniMEV2Config(backbone_config=model.config.backbone_config).image_position_rule == "vision_start_only"
    with pytest.raises(ValueError, match="image_position_rule"):
        UniMEV2Config(backbone_config=model.config.backbone_config, image_position_rule="3d")


def test_llava_onevision_has_no_position_rule_to_apply():
    causal_lm, model, processor = _pair("llava_onevision")
    batch = processor(texts=["a photo", None], images=[RED, BLUE])
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).embeddings, _stock_recipe(causal_lm, batch), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------ image sizes


def test_presets_are_the_authors_sizes():
    assert [canonical_image_resize(name) for name in
            ("authors-eval", "authors-train-qwen2vl", "authors-train-llava-ov", "authors-default",
             "authors-reranker", None)] == ["square:1344", "square:672", "square:336", "max_side:1344",
                                            f"max_pixels:{300 * 28 * 28}", "native"]
    for bad in ("square", "square:0", "square:-3", "huge", "max_pixels:1e5", "native:3"):
        with pytest.raises(ValueError, match="image_resize"):
            canonical_image_resize(bad)


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((640, 480), (1344, 1344)),
        ((4000, 10), (1344, 1344)),
    ],
)
def test_square_rule(size, expected):
    assert resized_size(*size, "authors-eval") == expected


def test_max_side_rule_only_touches_large_images():
    assert resized_size(1344, 900, "authors-default") == (1344, 900)
    assert resized_size(1345, 900, "authors-default") == (1344, 1344)


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((100, 100), (112, 112)),     # rounded to 28: 3.57 -> 4 patches each way, 12544 px <= 235200
        ((2000, 1000), (672, 336)),   # beta = sqrt(2e6 / 235200) = 2.916: 685.9 -> 672, 342.9 -> 336
        ((1344, 1344), (476, 476)),   # beta = 2.771: 484.9 -> 476 (floor to 28)
        ((30, 20), (84, 56)),
        ((500, 1200), (308, 728)),    # beta = 1.597: 313.0/28 = 11.18 -> 11, 751.3/28 = 26.83 -> 26 (floor, not round)
        ((1200, 500), (728, 308)),    # 28x28 < 4*28*28: beta = sqrt(3136/600) = 2.286: ceil(68.6/28), ceil(45.7/28)
    ],
)
def test_pixel_cap_rule(size, expected):
    new_width, new_height = resized_size(*size, "authors-reranker")
    assert (new_width % 28, new_height % 28) == (0, 0)
    assert 4 * 28 * 28 <= new_width * new_height <= 300 * 28 * 28
    assert (new_width, new_height) == expected


def test_resize_happens_before_rgb_conversion_like_the_authors():
    """A palette image is resized with PIL's default filter for its mode, then converted (their dataset code)."""
    palette = Image.new("P", (50, 30))
    palette.putpalette([value for index in range(256) for value in (index, 255 - index, (7 * index) % 256)])
    palette.putdata([(x * 5 + y) % 256 for y in range(30) for x in range(50)])
    expected = palette.resize((1344, 1344)).convert("RGB")
    assert list(resize_image(palette, "authors-eval").getdata()) == list(expected.getdata())
    rgba = Image.new("RGBA", (40, 40), (255, 0, 0, 0))  # fully transparent: the reranker lays it on white
    assert resize_image(rgba, "authors-reranker").getpixel((0, 0)) == (255, 255, 255)


def test_processor_applies_and_saves_its_policy(tmp_path):
    processor = build_tiny_processor("qwen2_vl")
    processor.image_processor.size = {"shortest_edge": 3136, "longest_edge": 12845056}  # the real Qwen2-VL limits
    processor.image_resize = "authors-eval"
    batch = processor(texts=[None], images=[Image.new("RGB", (300, 200), "red")])
    assert batch["image_grid_thw"].tolist() == [[1, 1344 // 14, 1344 // 14]]
    assert int((batch["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum()) == 48 * 48
    processor.save_pretrained(tmp_path)
    assert UniMEV2Processor.from_pretrained(tmp_path).image_resize == "square:1344"
    assert UniMEV2Processor.from_pretrained(tmp_path, image_resize="native").image_resize == "native"
    with pytest.raises(ValueError, match="image_resize"):
        processor.image_resize = "square:zero"


def test_image_paths_and_bytes_are_resized_too(tmp_path):
    path = tmp_path / "shape.png"
    Image.new("RGB", (90, 60), "blue").save(path)
    assert load_image(str(path), 0, image_resize="square:64").size == (64, 64)
    assert load_image({"bytes": path.read_bytes(), "path": None}, 0, image_resize="square:32").size == (32, 32)
    assert load_image(str(path), 0).size == (90, 60)


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_gradcache_chunks_embed_like_one_batch_under_the_rule(family):
    """Chunks of 2 rows (GradCache) and one batch of every row give the same embeddings, and both follow the rule."""
    from trainers.collator import UniMEV2Collator

    causal_lm, model, processor = _pair(family)
    rows = [
        dict(query_text="<|image_1|>\nWhat colour is it?", query_image=RED, pos_text="red", pos_image=None,
             neg_texts=["blue", None], neg_images=[None, BLUE], judge_scores=[0.9, 0.2, 0.1]),
        dict(query_text="a blue shape", query_image=None, pos_text=None, pos_image=BLUE,
             neg_texts=["a red shape", "green"], neg_images=[RED, None], judge_scores=[0.8, 0.3, 0.1]),
    ]
    one_batch = UniMEV2Collator(processor, num_negatives=2)(rows)
    chunked = UniMEV2Collator(processor, num_negatives=2, chunk_size=2)(rows)
    assert len(one_batch["chunks"]) == 1 and len(chunked["chunks"]) == 4
    with torch.no_grad():
        whole = model(**one_batch["chunks"][0]).embeddings
        pieces = torch.cat([model(**chunk).embeddings for chunk in chunked["chunks"]])
        expected = _stock_recipe(causal_lm, dict(one_batch["chunks"][0], mm_token_type_ids=torch.zeros_like(
            one_batch["chunks"][0]["mm_token_type_ids"])))
    torch.testing.assert_close(pieces, whole, atol=1e-5, rtol=0)
    torch.testing.assert_close(whole, expected, atol=1e-5, rtol=0)


def test_training_collator_resizes_under_the_training_rule_only_once():
    from trainers.collator import UniMEV2Collator

    processor = build_tiny_processor("qwen2_vl")
    processor.image_processor.size = {"shortest_edge": 3136, "longest_edge": 12845056}
    processor.image_resize = "authors-eval"  # the checkpoint's inference rule must not apply during training
    row = dict(query_text="a red shape", query_image=None, pos_text=None, pos_image=RED, neg_texts=[],
               neg_images=[], judge_scores=[1.0])
    grids = UniMEV2Collator(processor, num_negatives=0, image_resize="square:112")([row])["chunks"][0]["image_grid_thw"]
    assert grids.tolist() == [[1, 8, 8]]
    grids = UniMEV2Collator(processor, num_negatives=0)([row])["chunks"][0]["image_grid_thw"]
    assert grids.tolist() == [[1, 96, 96]]  # default: the processor's rule
    with pytest.raises(ValueError, match="not both"):
        UniMEV2Collator(processor, image_resize="square:112", image_size=112)


def test_a_changed_image_rule_never_reuses_cached_embeddings_or_scores(tmp_path):
    from modeling_unime.judge import MLLMJudge, judge_fingerprint
    from modeling_unime.tiny import build_tiny_judge, build_tiny_unime
    from modeling_unime.util.embedding_cache import cached_embeddings

    model, processor = build_tiny_unime("qwen2_vl")
    model.processor = processor
    picture = Image.new("RGB", (56, 84), (220, 20, 20))
    picture.paste((20, 20, 220), (0, 0, 28, 40))  # not one colour: a resize changes what the patches hold
    picture.save(tmp_path / "red.png")
    items = [(None, "red.png"), ("a red shape", None)]
    native = cached_embeddings(model, items, tmp_path / "cache", tmp_path, batch_size=2)
    processor.image_resize = "square:112"
    resized = cached_embeddings(model, items, tmp_path / "cache", tmp_path, batch_size=2)
    expected = model.encode(texts=[None], images=[picture])[0]
    torch.testing.assert_close(resized[0], expected)  # recomputed under the new rule, not read from the cache
    assert not torch.allclose(native[0], resized[0])
    judge = MLLMJudge(*build_tiny_judge())
    before = judge_fingerprint(judge)
    judge.image_resize = "square:112"
    assert judge_fingerprint(judge) != before


@pytest.mark.parametrize("size", [(433, 12), (12, 433), (13, 13), (27, 600), (5, 900), (100, 100), (2000, 1000),
                                  (1344, 1344), (30, 20), (500, 1200), (2799, 14), (15, 2900)])
def test_the_pixel_cap_is_the_authors_reranker_rule_also_under_14_px(size):
    # The authors resize with their vision process first, then the stock Qwen2-VL processor runs transformers'
    # smart_resize on the result, which leaves a size already on the 28 grid and within its bounds unchanged: so the
    # authors' rule decides, and for 433x12 that is 420x28 (transformers' rule alone would give 364x28).
    from authors_fixtures import _builder
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    # the builder's replay of the authors' reranker vision process (GaryGuTC/UniME-v2,
    # Embedding/src/vlm_backbone/qwen2_5_vl_Rerank/LamRA_qwen2_5_vision_process.py, `smart_resize`)
    width, height = size
    expected_height, expected_width = _builder().rerank_smart_resize(height, width)
    assert resized_size(width, height, "authors-reranker") == (expected_width, expected_height)
    assert smart_resize(expected_height, expected_width, 28, 56 * 56, 28 * 28 * 1280) == (expected_height,
                                                                                          expected_width)
    if size == (433, 12):
        assert (expected_width, expected_height) == (420, 28) and smart_resize(12, 433, 28, 56 * 56) == (28, 364)
