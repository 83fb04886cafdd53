"""Video inputs without torchvision (modeling_unime/video_unime.py).

The reference is the OFFICIAL transformers video processors (Qwen2VLVideoProcessor, Qwen3VLVideoProcessor) and
processors (Qwen2VLProcessor, Qwen2_5_VLProcessor, Qwen3VLProcessor), run with torchvision in a side environment by
tests/fixtures/video/make_reference.py; their outputs are committed in tests/fixtures/video/. Independent checks
beside them: a still clip equals the image processor's patches, a hand-built clip fixes the patch order, VLM2Vec's
sampling rule against exact rational arithmetic, and decoding against transformers' own PyAV reader.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_unime.video_unime import (
    VideoSettings,
    expand_video_placeholders,
    load_video_frames,
    patchify_video,
    sample_frame_indices,
    second_per_grid_ts,
    video_placeholder_text,
    video_resized_size,
    video_timestamps,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "video"
sys.path.insert(0, str(FIXTURES))  # synthetic_clips: the clip the references were made from
from synthetic_clips import synthetic_video  # noqa: E402

REFERENCE = json.loads((FIXTURES / "reference.json").read_text())
with np.load(FIXTURES / "reference.npz", allow_pickle=False) as _saved:
    TENSORS = {key: torch.from_numpy(_saved[key]) for key in _saved.files}
# Largest |ours - official| of pixel_values_videos: measured 0.0 on every case (same torch uint8 resize kernel,
# same float32 fused normalisation); the tolerance allows nothing more than float32 rounding.
PIXEL_ATOL = 1e-6


def case_video(case: dict) -> np.ndarray:
    video = synthetic_video(case["frames"], case["height"], case["width"], case["seed"])
    assert hashlib.sha256(video.tobytes()).hexdigest() == case["input_sha256"], "synthetic_video drifted"
    return video


def settings_of(family: str, settings: dict) -> VideoSettings:
    return VideoSettings.stock(family, **settings)


def collapse_runs(text: str, token: str = "<|video_pad|>") -> str:
    return re.sub(f"(?:{re.escape(token)})+", lambda m: "{%s*%d}" % (token, len(m.group(0)) // len(token)), text)


def write_video(path: Path, video: np.ndarray, fps: int, codec: str, pix_fmt: str) -> None:
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = video.shape[2], video.shape[1], pix_fmt
        if codec == "libx264rgb":
            stream.options = {"qp": "0"}  # lossless: decoded frames equal the written ones
        for frame in video:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


PATCH_CASES = [name for name in REFERENCE["cases"] if name != "qwen3_sampled_fps"]


# ------------------------------------------------------------------------------------- against the official outputs
@pytest.mark.parametrize("name", PATCH_CASES)
def test_patchify_matches_official_video_processor(name):
    case = REFERENCE["cases"][name]
    frames = [Image.fromarray(frame) for frame in case_video(case)]
    out = patchify_video(frames, settings_of(case["family"], case["settings"]))
    expected = TENSORS[f"{name}.pixel_values_videos"]
    assert out["video_grid_thw"].tolist() == TENSORS[f"{name}.video_grid_thw"].tolist() == [case["grid"]]
    assert out["pixel_values_videos"].dtype == torch.float32 and out["pixel_values_videos"].shape == expected.shape
    assert (out["pixel_values_videos"] - expected).abs().max().item() <= PIXEL_ATOL


@pytest.mark.parametrize("name", PATCH_CASES)
def test_prompt_text_matches_official_processors(name):
    case = REFERENCE["cases"][name]
    grid, settings = case["grid"], case["settings"]
    for key, reference in case["prompts"].items():
        family, label = key.split(".")
        metadata = reference.get("metadata") or {}
        indices = metadata.get("frames_indices", list(range(case["frames"])))
        replacement = video_placeholder_text(
            grid, family, settings["merge_size"], frame_indices=indices, fps=metadata.get("fps"),
            temporal_patch_size=settings["temporal_patch_size"],
        )
        text = expand_video_placeholders(reference["prompt"], [replacement], family)
        assert collapse_runs(text) == reference["expanded"], key
        if "second_per_grid_ts" in reference:
            value = second_per_grid_ts(len(indices), settings["temporal_patch_size"], metadata.get("fps"),
                                       metadata.get("total_num_frames"))
            assert value == pytest.approx(reference["second_per_grid_ts"][0], rel=1e-6), key


def test_file_sampled_at_fps_matches_official_qwen3_pipeline(tmp_path):
    """A lossless mp4 written here, sampled at 2 fps by our loader, against the official Qwen3-VL processor's own fps
    sampling, pixels and timestamped prompt for the same clip with its metadata."""
    case = REFERENCE["cases"]["qwen3_sampled_fps"]
    video = case_video(case)
    path = tmp_path / "clip.mp4"
    write_video(path, video, int(case["source_fps"]), "libx264rgb", "rgb24")
    clip = load_video_frames(str(path), row=3, fps=2)
    assert clip.frame_indices == case["sampled_indices"] and clip.total_frames == case["frames"]
    assert clip.fps == case["source_fps"]
    for frame, index in zip(clip.frames, clip.frame_indices):
        assert np.array_equal(np.asarray(frame), video[index])
    out = patchify_video(clip, settings_of("qwen3_vl", case["settings"]))
    assert out["video_grid_thw"].tolist() == [case["grid"]]
    assert (out["pixel_values_videos"] - TENSORS["qwen3_sampled_fps.pixel_values_videos"]).abs().max() <= PIXEL_ATOL
    assert video_timestamps(clip.frame_indices, clip.fps) == pytest.approx(case["timestamps"])
    reference = case["prompts"]["qwen3_vl.sampled"]
    replacement = video_placeholder_text(out["video_grid_thw"][0], "qwen3_vl", 2, clip.frame_indices, clip.fps)
    assert collapse_runs(expand_video_placeholders(reference["prompt"], [replacement], "qwen3_vl")) == \
        reference["expanded"]
    # The metadata the official processors take, filled from the clip.
    metadata = clip.to_metadata()
    assert (metadata.fps, metadata.total_num_frames, metadata.frames_indices) == (10.0, 25, case["sampled_indices"])


def test_resize_grids_match_official_table():
    for entry in REFERENCE["resize_table"]:
        settings = VideoSettings.stock(entry["family"], **entry["settings"])
        height, width = video_resized_size(entry["frames"], entry["height"], entry["width"], settings)
        grid_t = -(-entry["frames"] // settings.temporal_patch_size)
        assert [grid_t, height // settings.patch_size, width // settings.patch_size] == entry["grid"], entry


def test_fps_sampling_matches_official_table():
    for entry in REFERENCE["sampling_table"]:
        common = dict(fps=entry["fps"], source_fps=entry["source_fps"], min_frames=entry["min_frames"],
                      max_frames=entry["max_frames"])
        assert sample_frame_indices(entry["total"], fps_rule="qwen3_vl", **common) == entry["qwen3_vl"], entry
        assert sample_frame_indices(entry["total"], fps_rule="qwen2_vl", **common) == entry["qwen2_vl"], entry
    for entry in REFERENCE["num_frames_table"]:
        ours = sample_frame_indices(entry["total"], num_frames=entry["num_frames"], rounding="round")
        assert ours == entry["qwen3_vl"], entry


# ------------------------------------------------------------------------------------------- independent checks
def test_vlm2vec_uniform_sampling_against_independent_expressions():
    """VLM2Vec: np.linspace(0, n - 1, k, dtype=int), all frames when k >= n. In float64 that is
    floor(i * ((n - 1) / (k - 1))) with the last index n - 1; against exact arithmetic, floor(i * (n - 1) / (k - 1)),
    it differs only where the exact value is a whole number that the float product misses by an ulp (e.g. n=31,
    k=23, i=11: 15 exactly, 14.999... in float): VLM2Vec's frames include that quirk, and so do ours."""
    float_quirks = 0
    for total in range(1, 130):
        for count in range(1, total + 3):
            if count >= total:
                expected = exact = list(range(total))
            elif count == 1:
                expected = exact = [0]
            else:
                step = (total - 1) / (count - 1)
                expected = [math.floor(i * step) for i in range(count - 1)] + [total - 1]
                exact = [int(Fraction(i * (total - 1), count - 1)) for i in range(count)]
            ours = sample_frame_indices(total, num_frames=count)
            assert ours == expected, (total, count)
            for i, (got, want) in enumerate(zip(ours, exact)):
                if got != want:
                    assert got == want - 1 and Fraction(i * (total - 1), count - 1).denominator == 1, (total, count)
                    float_quirks += 1
    assert float_quirks > 0  # the quirk is real (n=31, k=23 is one of them)
    assert sample_frame_indices(31, num_frames=23)[11] == 14
    assert sample_frame_indices(64, num_frames=8) == [0, 9, 18, 27, 36, 45, 54, 63]  # MMEB-V2's 8 of 64 frames
    assert sample_frame_indices(300, max_frames=4) == [0, 99, 199, 299]


def test_still_clip_equals_image_processor_patches():
    """The Qwen2-VL image processor tiles one image over the temporal patch: a clip of one repeated frame must give
    the same rows. Exact when no resize is needed; through a resize the image processor's PIL kernel and the video
    processor's torch kernel may differ by one uint8 level (1/255/std). Without a resize the two differ by float32
    rounding only (measured 2.4e-7: the image processor rescales, then normalises; the video processor fuses both)."""
    from transformers import Qwen2VLImageProcessorPil

    rng = np.random.RandomState(0)
    for (height, width), atol in (((56, 84), 1e-6), ((61, 95), 1 / 255 / 0.2613 + 1e-6)):
        frame = Image.fromarray(rng.randint(0, 256, (height, width, 3), dtype=np.uint8))
        image_processor = Qwen2VLImageProcessorPil(min_pixels=4 * 28 * 28, max_pixels=64 * 28 * 28)
        image = image_processor(images=[frame], return_tensors="pt")
        settings = VideoSettings.from_image_processor(image_processor, "qwen2_vl")
        video = patchify_video([frame, frame], settings)
        assert video["video_grid_thw"].tolist() == image["image_grid_thw"].tolist()
        assert (video["pixel_values_videos"] - image["pixel_values"]).abs().max().item() <= atol


def test_patch_order_on_a_hand_built_clip():
    """Four clips whose pixels hold one coordinate each (frame, channel, row, column) pin down where every input value
    lands: rows must run over temporal group, merge-block row, merge-block column, row and column in the block, and
    each row over channel, frame, patch row, patch column; the odd third frame is padded with itself (the last)."""
    frames_count, height, width, patch, merge, temporal = 3, 8, 8, 2, 2, 2
    t, y, x, c = np.meshgrid(np.arange(frames_count), np.arange(height), np.arange(width), np.arange(3), indexing="ij")
    settings = VideoSettings.stock("qwen2_vl", patch_size=patch, merge_size=merge, temporal_patch_size=temporal,
                                   do_resize=False, do_rescale=False, do_normalize=False)
    maps = {}
    for name, coordinate in (("t", t), ("c", c), ("y", y), ("x", x)):
        out = patchify_video(coordinate.astype(np.uint8), settings)
        assert out["video_grid_thw"].tolist() == [[2, height // patch, width // patch]]
        maps[name] = out["pixel_values_videos"].to(torch.int64)
    grid_t, grid_h, grid_w = 2, height // patch, width // patch
    row = 0
    for gt in range(grid_t):
        for block_row in range(grid_h // merge):
            for block_col in range(grid_w // merge):
                for mh in range(merge):
                    for mw in range(merge):
                        column = 0
                        for channel in range(3):
                            for dt in range(temporal):
                                frame = min(gt * temporal + dt, frames_count - 1)  # padding repeats the LAST frame
                                for py in range(patch):
                                    for px in range(patch):
                                        expected = dict(t=frame, c=channel, y=(block_row * merge + mh) * patch + py,
                                                        x=(block_col * merge + mw) * patch + px)
                                        got = {name: int(maps[name][row, column]) for name in expected}
                                        assert got == expected, (row, column)
                                        column += 1
                        row += 1
    assert row == maps["t"].shape[0]


def test_qwen3_needs_two_frames_and_checks_timestamp_groups():
    frame = Image.new("RGB", (64, 64))
    with pytest.raises(ValueError, match="at least temporal_patch_size=2 frames"):
        patchify_video([frame], VideoSettings.stock("qwen3_vl"))
    with pytest.raises(ValueError, match="temporal groups"):
        video_placeholder_text([2, 2, 2], "qwen3_vl", frame_indices=[0, 1, 2, 3, 4], fps=10)
    with pytest.raises(ValueError, match="frame_indices"):
        video_placeholder_text([2, 2, 2], "qwen3_vl")
    with pytest.raises(ValueError, match="2 video placeholders"):
        expand_video_placeholders("<|video_pad|><|video_pad|>", ["x"], "qwen2_vl")


def test_settings_from_image_processor():
    from transformers import Qwen2VLImageProcessorPil

    image_processor = Qwen2VLImageProcessorPil(min_pixels=4 * 28 * 28, max_pixels=64 * 28 * 28, patch_size=16)
    settings = VideoSettings.from_image_processor(image_processor, "qwen3_vl", max_pixels=10_000)
    assert (settings.patch_size, settings.merge_size, settings.temporal_patch_size) == (16, 2, 2)
    assert (settings.min_pixels, settings.max_pixels) == (4 * 28 * 28, 10_000)
    assert settings.image_mean == tuple(image_processor.image_mean) and settings.family == "qwen3_vl"
    with pytest.raises(ValueError, match="not 'llava_onevision'"):
        VideoSettings.stock("llava_onevision")


# ------------------------------------------------------------------------------------------------------- loading
def test_frames_from_a_folder_in_natural_order(tmp_path):
    folder = tmp_path / "frames" / "video_cls" / "UCF101" / "v_001"
    folder.mkdir(parents=True)
    for i in range(12):  # unpadded numbers: frame_10 sorts after frame_9 only in natural order
        Image.new("RGB", (20, 16), (i * 20, 0, 0)).save(folder / f"frame_{i + 1}.png")
    (folder / "notes.txt").write_text("not a frame")
    clip = load_video_frames("frames/video_cls/UCF101/v_001", row=5, image_root=tmp_path, num_frames=4)
    assert clip.frame_indices == [0, 3, 7, 11] and clip.total_frames == 12 and clip.fps is None
    assert [frame.getpixel((0, 0))[0] for frame in clip.frames] == [0, 60, 140, 220]
    assert [os.path.basename(path) for path in clip.frame_paths] == ["frame_1.png", "frame_4.png", "frame_8.png",
                                                                     "frame_12.png"]
    everything = load_video_frames(folder, row=5)
    assert everything.frame_indices == list(range(12)) and all(frame.mode == "RGB" for frame in everything.frames)
    clip = load_video_frames(folder, row=5, fps=2, source_fps=6, min_frames=1)
    assert clip.frame_indices == [0, 4, 7, 11] and clip.fps == 6.0


def test_frames_from_a_list(tmp_path):
    frames = [Image.new("RGBA", (10, 8), (i, 2 * i, 3 * i, 255 if i % 2 else 0)) for i in range(7)]
    clip = load_video_frames(frames, row="query 'cat'", num_frames=3)
    assert clip.frame_indices == [0, 3, 6] and clip.total_frames == 7
    assert all(frame.mode == "RGB" for frame in clip.frames)
    assert clip.frames[0].getpixel((0, 0)) == (255, 255, 255)  # transparent: laid on white
    assert clip.frames[1].getpixel((0, 0)) == (3, 6, 9)
    paths = []
    for i in range(5):
        Image.new("RGB", (10, 8), (0, i, 0)).save(tmp_path / f"{i}.png")
        paths.append(f"{i}.png")
    clip = load_video_frames(paths, row=0, image_root=tmp_path)
    assert [frame.getpixel((0, 0))[1] for frame in clip.frames] == [0, 1, 2, 3, 4]
    array = synthetic_video(6, 8, 10)
    clip = load_video_frames(array, row=0, num_frames=4)
    assert clip.frame_indices == [0, 1, 3, 5] and np.array_equal(np.asarray(clip.frames[2]), array[3])


def test_frames_from_video_files_match_transformers_reader(tmp_path):
    """mp4 (frame count in the header) and mkv (none: frames are counted) decode to the written frames; the mp4
    also to what transformers' own PyAV reader returns for the same indices."""
    from transformers.video_utils import load_video

    video = synthetic_video(11, 24, 32, seed=7)
    mp4, mkv = tmp_path / "a.mp4", tmp_path / "a.mkv"
    write_video(mp4, video, 5, "libx264rgb", "rgb24")
    write_video(mkv, video, 5, "ffv1", "bgr0")
    for path in (mp4, mkv):
        clip = load_video_frames(str(path), row=0, num_frames=4)
        assert clip.frame_indices == [0, 3, 6, 10] and clip.total_frames == 11 and clip.fps == 5.0, path
        assert all(np.array_equal(np.asarray(f), video[i]) for f, i in zip(clip.frames, clip.frame_indices)), path
    clip = load_video_frames(str(mp4), row=0, fps=2, source_fps=2.5, min_frames=1)  # the caller's rate wins
    assert clip.fps == 2.5 and clip.frame_indices == np.linspace(0, 10, 8).round().astype(int).tolist()
    official, metadata = load_video(str(mp4), backend="pyav", sample_indices_fn=lambda metadata, **_: [0, 3, 6, 10])
    assert metadata.fps == 5.0
    clip = load_video_frames(str(mp4), row=0, num_frames=4)
    assert np.array_equal(np.stack([np.asarray(frame) for frame in clip.frames]), official)


# -------------------------------------------------------------------------------------------------------- errors
def test_errors_name_the_row(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"Row 4: video file or frame folder not found: .*missing\.mp4.*image_root"):
        load_video_frames("missing.mp4", row=4)
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video" * 10)
    pytest.importorskip("av")
    with pytest.raises(ValueError, match=r"Row 2: video file .*corrupt\.mp4.* could not be"):
        load_video_frames(str(corrupt), row=2)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=r"query 7: the frame folder .*empty.* holds no frame images"):
        load_video_frames(empty, row="query 7")
    with pytest.raises(ValueError, match="Row 1: the video is an empty list"):
        load_video_frames([], row=1)
    with pytest.raises(ValueError, match="Row 1: num_frames=0 must be at least 1"):
        load_video_frames([Image.new("RGB", (4, 4))], row=1, num_frames=0)
    with pytest.raises(ValueError, match="Row 8: video frames differ in size: frame 1 is 5x4"):
        load_video_frames([Image.new("RGB", (4, 4)), Image.new("RGB", (5, 4))], row=8)
    with pytest.raises(ValueError, match="Row 0: Sampling by fps needs the frame rate"):
        load_video_frames([Image.new("RGB", (4, 4))] * 3, row=0, fps=2)
    (empty / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=r"Row 6: video frame .*bad\.jpg.* is not a readable image"):
        load_video_frames(empty, row=6)
    monkeypatch.setitem(sys.modules, "av", None)  # PyAV not installed
    video = tmp_path / "v.mp4"
    video.write_bytes(b"x")
    with pytest.raises(ImportError, match=r'Row 9: decoding a video file needs PyAV.*pip install "unime-v2\[video\]"'):
        load_video_frames(str(video), row=9)


def test_a_file_without_a_video_stream_names_the_row(tmp_path):
    """An audio-only mp4 (PyAV opens it; it holds no picture) is refused with the row, not decoded to zero frames."""
    av = pytest.importorskip("av")
    path = tmp_path / "sound.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), dtype=np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    with pytest.raises(ValueError, match=r"Row 4: .*sound\.mp4.* has no video stream"):
        load_video_frames(str(path), row=4)
