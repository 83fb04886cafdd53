"""Video rows through UniMEV2Processor and UniMEV2Model.encode: the batch against the official processors' outputs
(tests/fixtures/video, made with torchvision by make_reference.py), the batch builder against the backbone
processor, the embedding against the stock backbone forward, settings saved with the processor, and bad input."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_video import REFERENCE, TENSORS, case_video, collapse_runs, write_video
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from conftest import tiny_backbone_and_embedder
from modeling_unime import UniMEV2Model, UniMEV2Processor
from modeling_unime.configuration_unime import QWEN3_VL_BACKBONES
from modeling_unime.tiny import build_tiny_processor, build_tiny_tokenizer
from modeling_unime.video_unime import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

VIDEO_FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
SMALL_VIDEO = dict(video_min_pixels=8 * 28 * 28, video_max_pixels=32 * 32 * 24)  # a few dozen tokens per clip


def clip(count=5, width=72, height=56, shift=0):
    return [Image.new("RGB", (width, height), ((40 * index + shift) % 256, 90, 200 - 30 * index))
            for index in range(count)]


@lru_cache(maxsize=None)
def tiny(family):
    """(stock causal LM, UniMEV2Model with its weights, a processor of its own with a small video budget)."""
    causal_lm, model, shared = tiny_backbone_and_embedder(family)
    processor = build_tiny_processor(family, shared.tokenizer)
    for name, value in SMALL_VIDEO.items():
        setattr(processor, name, value)
    return causal_lm, model, processor


def official_settings_processor(family, settings):
    """A UniMEV2Processor whose image processor has the patching of a reference case (patch 6) and the stock video
    processor's mean and std, so its video rows can be compared with the official outputs of that case."""
    qwen3 = family == "qwen3_vl"
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=settings["patch_size"], merge_size=settings["merge_size"],
        temporal_patch_size=settings["temporal_patch_size"],
        image_mean=[0.5] * 3 if qwen3 else list(OPENAI_CLIP_MEAN),
        image_std=[0.5] * 3 if qwen3 else list(OPENAI_CLIP_STD))
    return UniMEV2Processor(image_processor=image_processor, tokenizer=build_tiny_tokenizer(family),
                            backbone_type=family, video_min_pixels=settings["min_pixels"],
                            video_max_pixels=settings["max_pixels"])


# ------------------------------------------------------------------------------------------ against the official


@pytest.mark.parametrize("name", ["qwen2_odd_down", "qwen2_even_up", "qwen3_odd_down", "qwen3_small_up"])
def test_a_video_row_carries_the_official_pixels_and_token_expansion(name):
    case = REFERENCE["cases"][name]
    family = case["family"]
    processor = official_settings_processor(family, case["settings"])
    frames = [Image.fromarray(frame) for frame in case_video(case)]
    batch = processor(texts=["Describe the video."], videos=[frames])
    torch.testing.assert_close(batch["pixel_values_videos"], TENSORS[f"{name}.pixel_values_videos"], atol=1e-6,
                               rtol=0)
    assert batch["video_grid_thw"].tolist() == [case["grid"]]
    decoded = collapse_runs(processor.tokenizer.decode(batch["input_ids"][0]))
    official = case["prompts"][f"{family}.bare"]  # the official processor on "<|video_pad|> Describe the video."
    if family == "qwen3_vl":
        # The same expansion, inside one chat turn (the official bare prompt had none).
        video_part = official["expanded"].removesuffix(" Describe the video.")
        assert decoded == f"<|im_start|>user\n{video_part}Describe the video.<|im_end|>\n<|im_start|>assistant\n"
    else:
        assert decoded == official["expanded"]
    video_tokens = int((batch["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")).sum())
    assert int((batch["mm_token_type_ids"] == 2).sum()) == video_tokens == np.prod(case["grid"]) // 4


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_batches_with_videos_build_the_other_rows_as_the_backbone_processor_does(family):
    """The video batch builder (tokenizer + image processor) against the stock backbone processor, row by row."""
    _, _, processor = tiny(family)
    texts, images = ["a red car parked nearby", "What colour is it?"], [None, Image.new("RGB", (60, 44), "red")]
    with_video = processor(texts=[*texts, "What happens?"], images=[*images, None], videos=[None, None, clip()])
    stock = processor(texts=texts, images=images)
    for key in ("pixel_values", "image_grid_thw"):
        assert torch.equal(with_video[key], stock[key]), key
    for row in range(2):
        for key in ("input_ids", "mm_token_type_ids"):
            ours = with_video[key][row][with_video["attention_mask"][row].bool()]
            theirs = stock[key][row][stock["attention_mask"][row].bool()]
            assert torch.equal(ours, theirs), (key, row)
    assert with_video["attention_mask"][:2, 0].sum() == 0  # left-padded: the long video row sets the length


# -------------------------------------------------------------------------------------------------------- encode


def stock_embedding(causal_lm, batch, family):
    """The stock backbone's last hidden state at the last token, on a processor batch of one unpadded row; Qwen2-VL
    families with their video tokens at text positions (the 4.49 rule the embedder keeps: no <|vision_start|>)."""
    batch = dict(batch)
    if family not in QWEN3_VL_BACKBONES:
        batch["mm_token_type_ids"] = torch.zeros_like(batch["mm_token_type_ids"])
    with torch.no_grad():
        hidden = causal_lm(**batch, output_hidden_states=True, return_dict=True).hidden_states[-1]
    return F.normalize(hidden[0, -1].float(), dim=-1)


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_video_rows_embed_like_the_stock_backbone_and_alone_as_in_a_mixed_batch(family):
    causal_lm, model, processor = tiny(family)
    texts = ["a red car parked nearby", None, "What happens in the video?", "What colour?"]
    images = [None, None, None, Image.new("RGB", (60, 44), "red")]
    videos = [None, clip(), clip(4, 56, 84, shift=30), None]
    together = model.encode(texts=texts, images=images, videos=videos, processor=processor, batch_size=4)
    for row in (1, 2):
        alone = processor(texts=[texts[row]], videos=[videos[row]])
        torch.testing.assert_close(together[row], stock_embedding(causal_lm, alone, family), atol=2e-5, rtol=0)
    alone = torch.cat([model.encode(texts=[t], images=[i], videos=[v], processor=processor)
                       for t, i, v in zip(texts, images, videos)])
    torch.testing.assert_close(together, alone, atol=2e-5, rtol=0)
    # The frames matter: a different clip, and the same clip reversed, embed differently.
    reversed_clip = model.encode(texts=[texts[2]], videos=[videos[2][::-1]], processor=processor)
    assert (together[1] - together[2]).abs().max() > 1e-3 and (reversed_clip[0] - together[2]).abs().max() > 1e-4


def test_qwen2_vl_video_under_the_3d_rule_matches_the_stock_positions():
    """image_position_rule="all_images": video tokens take the stock 3-D M-RoPE positions (Qwen2.5-VL with its
    seconds per grid); the 4.49 rule gives text positions, a different embedding."""
    causal_lm, model, processor = tiny("qwen2_5_vl")
    batch = processor(texts=["What happens?"], videos=[clip()])
    assert batch["second_per_grid_ts"].tolist() == pytest.approx([2 / 24])  # a bare frame list: 24 fps assumed
    model.config.image_position_rule = "all_images"
    try:
        three_d = model.encode(texts=["What happens?"], videos=[clip()], processor=processor)
    finally:
        model.config.image_position_rule = "vision_start_only"
    with torch.no_grad():
        stock = causal_lm(**batch, output_hidden_states=True, return_dict=True).hidden_states[-1][0, -1]
    torch.testing.assert_close(three_d[0], F.normalize(stock.float(), dim=-1), atol=2e-5, rtol=0)
    text_positions = model.encode(texts=["What happens?"], videos=[clip()], processor=processor)
    assert (three_d - text_positions).abs().max() > 1e-3


def test_a_video_file_a_frame_folder_and_a_frame_list_embed_alike(tmp_path):
    """The same frames from an mp4 (lossless, decoded with PyAV), from a folder of frame files and from a list."""
    pytest.importorskip("av")
    _, model, processor = tiny("qwen3_vl")
    video = np.stack([np.asarray(frame) for frame in clip(6, 64, 48)])
    write_video(tmp_path / "clip.mp4", video, fps=3, codec="libx264rgb", pix_fmt="rgb24")
    folder = tmp_path / "frames"
    folder.mkdir()
    for index, frame in enumerate(video):
        Image.fromarray(frame).save(folder / f"frame_{index + 1:04d}.png")
    processor.video_fps = 3.0  # every frame of the 3 fps file
    try:
        embeddings = model.encode(videos=["clip.mp4", "frames", [Image.fromarray(frame) for frame in video]],
                                  image_root=tmp_path, processor=processor)
    finally:
        processor.video_fps = 2.0
    # The file's timestamps come from its real 3 fps; a folder or list has none, and Qwen3-VL's prompt then assumes
    # 24 fps (as transformers does): the pixels are equal, the prompt's seconds differ.
    torch.testing.assert_close(embeddings[1], embeddings[2], atol=1e-6, rtol=0)
    assert (embeddings[0] - embeddings[1]).abs().max() > 1e-5
    # A file is sampled at video_fps frames per second of video: 2 of the 3 a second, so 4 of its 6 frames.
    assert len(processor.load_video("clip.mp4", row=0, image_root=tmp_path).frame_indices) == 4
    assert len(processor.load_video("frames", row=0, image_root=tmp_path).frame_indices) == 6  # folders as given


def test_pixels_take_the_model_dtype_and_seconds_per_grid_keep_float32():
    """Under bf16 the pixels are cast; Qwen2.5-VL's seconds per grid (1/12 here) would lose digits in bf16."""
    _, model, processor = tiny("qwen2_5_vl")
    model = UniMEV2Model(model.config).to(torch.bfloat16).eval()
    seen = {}
    hook = model.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update({key: value.dtype for key, value in kwargs.items()
                                                  if isinstance(value, torch.Tensor)}), with_kwargs=True)
    try:
        model.encode(texts=["What happens?"], videos=[clip()], processor=processor)
    finally:
        hook.remove()
    assert seen["pixel_values_videos"] == torch.bfloat16 and seen["second_per_grid_ts"] == torch.float32


def test_sampling_settings_are_saved_with_the_processor_and_applied(tmp_path):
    _, _, processor = tiny("qwen2_vl")
    processor.save_pretrained(tmp_path)
    loaded = UniMEV2Processor.from_pretrained(tmp_path, video_num_frames=4, video_max_frames=16)
    assert (loaded.video_num_frames, loaded.video_max_frames, loaded.video_fps) == (4, 16, 2.0)
    assert (loaded.video_min_pixels, loaded.video_max_pixels) == (SMALL_VIDEO["video_min_pixels"],
                                                                  SMALL_VIDEO["video_max_pixels"])
    loaded.save_pretrained(tmp_path / "again")
    again = UniMEV2Processor.from_pretrained(tmp_path / "again")
    assert again.video_num_frames == 4 and again.video_max_frames == 16
    # 10 frames, 4 kept by VLM2Vec's rule (np.linspace(0, 9, 4, dtype=int)): grid t = 2 temporal groups.
    frames = clip(10)
    assert again.load_video(frames, row=0).frame_indices == [0, 3, 6, 9]
    assert again(texts=["x"], videos=[frames])["video_grid_thw"][0, 0] == 2
    processor.video_max_frames = 3
    try:
        assert processor.load_video(frames, row=0).frame_indices == [0, 4, 9]
    finally:
        processor.video_max_frames = 64
    with pytest.raises(ValueError, match="video_num_frames"):
        UniMEV2Processor.from_pretrained(tmp_path, video_num_frames=0)


def test_bad_video_input_names_the_row(tmp_path):
    _, model, processor = tiny("qwen2_vl")
    (tmp_path / "broken.mp4").write_bytes(b"not a video at all")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"Row 2: video file or frame folder not found: .*gone\.mp4.*nothing was "
                                         r"encoded"):
        model.encode(texts=["a", "b", None], videos=[None, None, "gone.mp4"], image_root=tmp_path,
                     processor=processor)
    if __import__("importlib").util.find_spec("av") is not None:
        with pytest.raises(ValueError, match=r"Row 1: .*broken\.mp4"):
            model.encode(texts=["a", None], videos=[None, str(tmp_path / "broken.mp4")], processor=processor)
    with pytest.raises(ValueError, match=r"Row 0: .*no frame"):
        model.encode(videos=[str(tmp_path / "empty")], processor=processor)
    with pytest.raises(ValueError, match="Row 1: the row has both an image and a video"):
        model.encode(texts=["a", "b"], images=[None, Image.new("RGB", (30, 30))], videos=[None, clip()],
                     processor=processor)
    with pytest.raises(ValueError, match="videos has 3 rows but texts and images have 2"):
        model.encode(texts=["a", "b"], videos=[None, None, clip()], processor=processor)
    with pytest.raises(ValueError, match="video placeholder .* but no video"):
        model.encode(texts=["<|video_pad|> what happens?"], processor=processor)
    llava = build_tiny_processor("llava_onevision")
    with pytest.raises(ValueError, match="Videos are supported for qwen2_vl, qwen2_5_vl, qwen3_vl, qwen3_vl_moe"):
        llava(texts=["x"], videos=[clip()])


def test_the_video_budget_is_the_checkpoints_as_transformers_resolves_it(tmp_path):
    """transformers' AutoVideoProcessor reads a checkpoint's video processor config, else its image processor config:
    unset, the budget is the image processor's size; a folder's video_preprocessor_config.json (or a nested
    video_processor entry) sets it on load; an explicit setting wins."""
    import json

    from modeling_unime.tiny import build_tiny_causal_lm, save_in_authors_layout

    processor = build_tiny_processor("qwen2_vl")   # image processor: 3136 to 50176 pixels
    grid = processor(texts=["x"], videos=[clip(4, 640, 480)])["video_grid_thw"][0]
    pixels = int(grid[1] * grid[2]) * 14 * 14
    assert 3136 <= pixels <= 50176 < 128 * 28 * 28   # the stock class default would upscale to >= 100352
    tokenizer = build_tiny_tokenizer("qwen3_vl")
    folder = save_in_authors_layout(build_tiny_causal_lm("qwen3_vl", tokenizer=tokenizer),
                                    build_tiny_processor("qwen3_vl", tokenizer), tmp_path / "plain")
    assert UniMEV2Processor.from_pretrained(folder).video_max_pixels is None
    (folder / "video_preprocessor_config.json").write_text(json.dumps({
        "video_processor_type": "Qwen3VLVideoProcessor", "size": {"longest_edge": 123456, "shortest_edge": 4096},
        "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2, "fps": 2}))
    loaded = UniMEV2Processor.from_pretrained(folder)
    assert (loaded.video_min_pixels, loaded.video_max_pixels) == (4096, 123456)
    assert (loaded.video_settings.min_pixels, loaded.video_settings.max_pixels) == (4096, 123456)
    assert UniMEV2Processor.from_pretrained(folder, video_max_pixels=99999).video_max_pixels == 99999
    saved = folder / "processor_config.json"
    nested = json.loads(saved.read_text()) if saved.is_file() else {}
    nested["video_processor"] = {"size": {"longest_edge": 777777, "shortest_edge": 8192}}
    saved.write_text(json.dumps(nested))
    assert UniMEV2Processor.from_pretrained(folder).video_max_pixels == 777777
