"""Video inputs for the Qwen-VL backbones without torchvision: frame loading and sampling, the backbone video
processors' ``pixel_values_videos`` / ``video_grid_thw``, and the prompt text that replaces a video placeholder.

This file travels with model checkpoints: it imports only ``torch``, ``transformers``, ``numpy`` and PIL at module
level. Decoding a video FILE needs PyAV (``pip install "unime-v2[video]"`` or ``pip install av``), imported only when a
file is decoded; folders of pre-extracted frames (the MMEB-V2 layout) and lists of frames need nothing else.

What it reproduces (transformers 5.25, checked against the official processors run with torchvision in
``tests/fixtures/video/``):

- `patchify_video`: ``Qwen2VLVideoProcessor`` (Qwen2-VL and Qwen2.5-VL) and ``Qwen3VLVideoProcessor`` on a list of
  frames with ``do_sample_frames=False``: the resize rule (``smart_resize``; for Qwen3-VL the video variant with the
  temporal factor), the bicubic antialiased uint8 resize the torchvision backend runs on CPU (the same torch kernel),
  the fused rescale/normalise in float32, padding of a frame count that is not a multiple of the temporal patch size
  by repeating the last frame, and the patch order (temporal group, merge rows, merge columns, then per patch channel,
  frame, row, column).
- `video_placeholder_text`: the text the backbone processor puts in place of one ``<|video_pad|>``.
- `second_per_grid_ts`: Qwen2.5-VL's value for one video.
- `sample_frame_indices`: VLM2Vec's MMEB-V2 rule (``np.linspace(0, n - 1, k, dtype=int)``) and the video processors'
  ``fps`` rules.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from dataclasses import replace as _dataclass_replace
from typing import Any, Union

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature
from transformers.video_utils import VideoMetadata

VIDEO_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
VIDEO_TOKEN = "<|video_pad|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
# The frame rate transformers assumes when a video's own is unknown (Qwen3-VL timestamps, Qwen2.5-VL seconds per grid).
DEFAULT_FPS = 24.0
# Frame files of a pre-extracted frame folder (VLM2Vec's IMAGE_EXTENSIONS, compared in lower case).
FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png")
AV_INSTALL_HINT = 'pip install "unime-v2[video]" (or pip install av)'
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# The stock video processors' class defaults (transformers 5.25): used by `VideoSettings.stock`.
STOCK_VIDEO_DEFAULTS = {
    "qwen2_vl": dict(
        patch_size=14, temporal_patch_size=2, merge_size=2, min_pixels=128 * 28 * 28, max_pixels=28 * 28 * 768,
        image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, max_video_tokens=128000,
    ),
    "qwen3_vl": dict(
        patch_size=16, temporal_patch_size=2, merge_size=2, min_pixels=128 * 32 * 32, max_pixels=32 * 32 * 768,
        image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), max_video_tokens=768,
    ),
}
STOCK_VIDEO_DEFAULTS["qwen2_5_vl"] = STOCK_VIDEO_DEFAULTS["qwen2_vl"]
# Both stock video processors (min_frames / max_frames; Qwen3-VL also samples at 2 fps by default).
DEFAULT_MIN_FRAMES, DEFAULT_MAX_FRAMES = 4, 768

FrameInput = Union[Image.Image, str, os.PathLike]
VideoInput = Union[str, os.PathLike, Sequence[FrameInput], np.ndarray]


def _where(row: int | str) -> str:
    return f"Row {row}" if isinstance(row, int) else str(row)


def check_family(family: str) -> str:
    if family not in VIDEO_FAMILIES:
        raise ValueError(f"Video inputs are supported for {', '.join(VIDEO_FAMILIES)}, not {family!r}.")
    return family


# ----------------------------------------------------------------------------------------------------------- sampling
def natural_sort_key(name: str) -> list:
    """VLM2Vec's frame order: digit runs compare as numbers, the rest in lower case (``frame_2`` before
    ``frame_10``)."""
    return [int(text) if text.isdigit() else text.lower() for text in re.split(r"(\d+)", name)]


def sample_frame_indices(
    total_frames: int,
    num_frames: int | None = None,
    fps: float | None = None,
    source_fps: float | None = None,
    min_frames: int = DEFAULT_MIN_FRAMES,
    max_frames: int | None = None,
    rounding: str = "floor",
    fps_rule: str = "qwen3_vl",
    temporal_patch_size: int = 2,
) -> list[int]:
    """Indices of the frames to keep out of ``total_frames``.

    - ``num_frames``: uniform by ``np.linspace(0, total_frames - 1, num_frames)``, truncated to int
      (``rounding="floor"``: VLM2Vec's MMEB-V2 rule, ``sample_frames`` in its ``vision_utils.py``) or rounded
      (``rounding="round"``: ``Qwen3VLVideoProcessor.sample_frames``). As in VLM2Vec, a video with no more frames than
      asked for keeps all of them (nothing is repeated).
    - ``fps``: frames per second of the source (``source_fps`` must be known). ``fps_rule="qwen3_vl"``:
      ``int(total / source_fps * fps)`` frames, clamped to ``[min_frames, max_frames]`` and to ``total_frames``,
      placed by rounded linspace (``Qwen3VLVideoProcessor.sample_frames``); ``fps_rule="qwen2_vl"``:
      ``Qwen2VLVideoProcessor.sample_frames`` (count floored to a multiple of the temporal patch size, indices
      ``arange(0, total, total / count)`` truncated).
    - neither: every frame, or ``max_frames`` of them (uniform, as for ``num_frames``) when the video is longer.

    Example:
        >>> sample_frame_indices(64, num_frames=8)
        [0, 9, 18, 27, 36, 45, 54, 63]
        >>> sample_frame_indices(6, num_frames=4), sample_frame_indices(6, num_frames=4, rounding="round")
        ([0, 1, 3, 5], [0, 2, 3, 5])
        >>> sample_frame_indices(100, fps=2, source_fps=25)
        [0, 14, 28, 42, 57, 71, 85, 99]
    """
    if total_frames <= 0:
        raise ValueError(f"A video needs at least one frame to sample from, got total_frames={total_frames}.")
    if num_frames is not None and fps is not None:
        raise ValueError("num_frames and fps are mutually exclusive: pass one of them.")
    if rounding not in ("floor", "round"):
        raise ValueError(f"rounding={rounding!r}: use 'floor' (VLM2Vec) or 'round' (Qwen3-VL).")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames={max_frames} must be at least 1.")

    def uniform(count: int) -> list[int]:
        if count >= total_frames:
            return list(range(total_frames))
        if rounding == "floor":
            return np.linspace(0, total_frames - 1, count, dtype=int).tolist()
        return np.linspace(0, total_frames - 1, count).round().astype(int).tolist()

    if num_frames is not None:
        if num_frames < 1:
            raise ValueError(f"num_frames={num_frames} must be at least 1.")
        return uniform(num_frames)
    if fps is None:
        return uniform(max_frames) if max_frames is not None else list(range(total_frames))
    if fps <= 0:
        raise ValueError(f"fps={fps} must be positive.")
    if not source_fps:
        raise ValueError(
            "Sampling by fps needs the frame rate of the source; it is unknown for a frame folder or a frame list: "
            "pass source_fps=, or sample with num_frames=."
        )
    max_frames = DEFAULT_MAX_FRAMES if max_frames is None else max_frames
    if fps_rule == "qwen3_vl":
        count = int(total_frames / source_fps * fps)
        count = min(max(count, min_frames), max_frames, total_frames)
        return np.linspace(0, total_frames - 1, count).round().astype(int).tolist()
    if fps_rule == "qwen2_vl":
        cap = math.floor(min(max_frames, total_frames) / temporal_patch_size) * temporal_patch_size
        count = min(max(total_frames / source_fps * fps, min_frames), cap, total_frames)
        count = math.floor(count / temporal_patch_size) * temporal_patch_size
        if count < 1:
            raise ValueError(
                f"fps_rule='qwen2_vl' keeps no frame of a {total_frames}-frame video (fewer frames than "
                f"temporal_patch_size={temporal_patch_size} after capping)."
            )
        return torch.arange(0, total_frames, total_frames / count).int().tolist()
    raise ValueError(f"fps_rule={fps_rule!r}: use 'qwen3_vl' or 'qwen2_vl'.")


# ------------------------------------------------------------------------------------------------------------ loading
@dataclass
class VideoFrames:
    """Frames of one video, as RGB PIL images, with where they came from.

    ``frame_indices`` index the source's frames (file frames, folder files in natural order, or list entries);
    ``total_frames`` is how many the source has; ``fps`` its frame rate when known (video files), else None.
    """

    frames: list[Image.Image]
    frame_indices: list[int]
    total_frames: int
    fps: float | None = None
    source: str | None = None
    frame_paths: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.frames)

    def timestamps(self, default_fps: float = DEFAULT_FPS) -> list[float]:
        """Seconds of each kept frame (``index / fps``; ``default_fps`` when the source's rate is unknown)."""
        fps = self.fps or default_fps
        return [index / fps for index in self.frame_indices]

    def to_metadata(self) -> VideoMetadata:
        """The transformers ``VideoMetadata`` the official video processors take as ``video_metadata=``."""
        width, height = self.frames[0].size
        duration = self.total_frames / self.fps if self.fps else None
        return VideoMetadata(
            total_num_frames=self.total_frames, fps=self.fps, width=width, height=height, duration=duration,
            frames_indices=list(self.frame_indices),
        )


def _resolve(path: str | os.PathLike, root: str | os.PathLike | None) -> str:
    # The rule of processing_unime.resolve_image_path (not imported: that module will import this one).
    path = os.fspath(path)
    if root is None or os.fspath(root) == "" or os.path.isabs(path):
        return path
    return os.path.join(os.fspath(root), path)


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB; transparency is laid on white, as the transformers video processors' ``convert_to_rgb`` blends it."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.split()[3])
        return background
    return image.convert("RGB")


def _open_frame(path: str, where: str) -> Image.Image:
    if not os.path.isfile(path):
        raise ValueError(f"{where}: video frame file not found: {path!r}.")
    try:
        with Image.open(path) as opened:
            opened.load()
            return _to_rgb(opened).copy()
    except Exception as error:
        raise ValueError(f"{where}: video frame {path!r} is not a readable image ({error}).") from error


def list_frame_files(folder: str | os.PathLike) -> list[str]:
    """The frame images of a pre-extracted frame folder (``.jpg``, ``.jpeg``, ``.png``, any case), in natural order:
    the MMEB-V2 layout ``frames/<category>/<dataset>/<video_id>/frame_%04d.jpg`` (VLM2Vec's ``load_frames``)."""
    folder = os.fspath(folder)
    names = [
        name for name in os.listdir(folder)
        if os.path.splitext(name)[1].lower() in FRAME_EXTENSIONS and os.path.isfile(os.path.join(folder, name))
    ]
    return [os.path.join(folder, name) for name in sorted(names, key=natural_sort_key)]


def _import_av(where: str):
    try:
        import av
    except ImportError as error:
        raise ImportError(
            f"{where}: decoding a video file needs PyAV, which is not installed: {AV_INSTALL_HINT}. A folder of "
            "extracted frames or a list of frames needs no decoder."
        ) from error
    return av


def _decode_selected(av, path: str, wanted: set[int], where: str) -> tuple[dict[int, Image.Image], int, bool]:
    """Frames at ``wanted`` (decode order), the number of frames decoded, and whether decoding reached the end."""
    frames: dict[int, Image.Image] = {}
    last = max(wanted) if wanted else -1
    count = 0
    try:
        with av.open(path) as container:
            for frame in container.decode(container.streams.video[0]):
                if count in wanted:
                    frames[count] = frame.to_image()  # RGB (rgb24), as transformers' read_video_pyav
                count += 1
                if count > last >= 0:
                    return frames, count, False
    except Exception as error:  # av.error.FFmpegError and friends: unreadable or corrupt
        raise ValueError(f"{where}: video file {path!r} could not be decoded ({error}).") from error
    return frames, count, True


def _decode_video_file(
    path: str, where: str, choose_indices, source_fps: float | None = None
) -> tuple[list[Image.Image], list[int], int, float | None]:
    av = _import_av(where)
    try:
        with av.open(path) as container:
            streams = list(container.streams.video)
            if streams:
                total = int(streams[0].frames or 0)
                rate = streams[0].average_rate or streams[0].guessed_rate or streams[0].base_rate
                fps = float(rate) if rate else None
                fps = source_fps or fps  # the caller's rate wins over the container's
    except Exception as error:  # av.error.FFmpegError (InvalidDataError...): not a readable container
        raise ValueError(f"{where}: video file {path!r} could not be opened as a video ({error}).") from error
    if not streams:
        raise ValueError(f"{where}: {path!r} has no video stream.")
    if total <= 0:  # the container does not say how many frames it holds: count them
        _, total, _ = _decode_selected(av, path, set(), where)
    if total <= 0:
        raise ValueError(f"{where}: video file {path!r} has no decodable frames.")
    indices = choose_indices(total, fps)
    frames, decoded, reached_end = _decode_selected(av, path, set(indices), where)
    if len(frames) < len(set(indices)) and reached_end:
        # The header promised more frames than decode: sample again over the frames that exist.
        if decoded <= 0:
            raise ValueError(f"{where}: video file {path!r} has no decodable frames.")
        total = decoded
        indices = choose_indices(total, fps)
        frames, _, _ = _decode_selected(av, path, set(indices), where)
    return [frames[index] for index in indices], indices, total, fps


def load_video_frames(
    video: VideoInput,
    row: int | str,
    image_root: str | os.PathLike | None = None,
    num_frames: int | None = None,
    fps: float | None = None,
    max_frames: int | None = None,
    min_frames: int = DEFAULT_MIN_FRAMES,
    source_fps: float | None = None,
    rounding: str = "floor",
    fps_rule: str = "qwen3_vl",
    temporal_patch_size: int = 2,
) -> VideoFrames:
    """Open one video and keep the sampled frames, as RGB PIL images plus where they came from (`VideoFrames`).

    ``video`` is a video file (decoded with PyAV), a folder of extracted frames (``frame_0001.jpg``...: the MMEB-V2
    layout, in natural order), or a list/tuple of frames (PIL images or image paths), or a ``(T, H, W, 3)`` uint8
    array. Relative paths are resolved against ``image_root``. Sampling (`sample_frame_indices`): ``num_frames``
    uniform (``rounding="floor"``: VLM2Vec's MMEB-V2 rule; "round": Qwen3-VL's), or ``fps`` frames per second of
    the source (capped by ``max_frames``, at least ``min_frames``; a folder or list needs ``source_fps=``, which also
    overrides a file's own rate), or all frames (at most ``max_frames``). Only the kept frames of a folder or list are
    opened; a file is decoded up to its last kept frame. A container that does not record its frame count (mkv,
    webm) is counted by decoding it once: transformers' ``load_video`` (pyav backend) fails on those (it trusts the
    header's count, 0), so this function uses PyAV directly; on an mp4 both return the same frames.

    Frames must all have one size (a video processor stacks them into one array): frames of different sizes raise a
    ValueError rather than being silently resized. A missing file or folder, a corrupt or unreadable video or frame,
    an empty folder and zero frames raise a ValueError naming ``row`` (a row number or a label).

    Example:
        >>> from PIL import Image
        >>> clip = load_video_frames([Image.new("RGB", (32, 24), (i, 0, 0)) for i in range(10)], row=0, num_frames=4)
        >>> clip.frame_indices, clip.total_frames, clip.fps, clip.frames[1].getpixel((0, 0))
        ([0, 3, 6, 9], 10, None, (3, 0, 0))
    """
    where = _where(row)

    def choose(total: int, known_fps: float | None) -> list[int]:
        try:
            return sample_frame_indices(
                total, num_frames=num_frames, fps=fps, source_fps=known_fps, min_frames=min_frames,
                max_frames=max_frames, rounding=rounding, fps_rule=fps_rule, temporal_patch_size=temporal_patch_size,
            )
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from error

    frame_paths: list[str] = []
    source: str | None = None
    if isinstance(video, np.ndarray):
        if video.ndim != 4 or video.shape[-1] not in (1, 3, 4) or video.shape[0] == 0:
            raise ValueError(f"{where}: a video array must be (frames, height, width, channels), got {video.shape}.")
        total = video.shape[0]
        indices = choose(total, source_fps)
        frames = [_to_rgb(Image.fromarray(np.ascontiguousarray(video[i]).squeeze(-1) if video.shape[-1] == 1
                                          else np.ascontiguousarray(video[i]))) for i in indices]
        known_fps = source_fps
    elif isinstance(video, (str, os.PathLike)):
        source = _resolve(video, image_root)
        hint = "pass image_root=" if image_root is None else f"check image_root={os.fspath(image_root)!r}"
        if os.path.isdir(source):
            files = list_frame_files(source)
            if not files:
                raise ValueError(
                    f"{where}: the frame folder {source!r} holds no frame images ({', '.join(FRAME_EXTENSIONS)})."
                )
            indices = choose(len(files), source_fps)
            frame_paths = [files[i] for i in indices]
            frames = [_open_frame(path, where) for path in frame_paths]
            total, known_fps = len(files), source_fps
        elif os.path.isfile(source):
            frames, indices, total, known_fps = _decode_video_file(source, where, choose, source_fps)
        else:
            raise ValueError(f"{where}: video file or frame folder not found: {source!r} ({hint} or fix the path).")
    elif isinstance(video, (list, tuple)):
        if not video:
            raise ValueError(f"{where}: the video is an empty list of frames.")
        indices = choose(len(video), source_fps)
        frames = []
        for index in indices:
            frame = video[index]
            if isinstance(frame, Image.Image):
                frames.append(_to_rgb(frame))
            elif isinstance(frame, (str, os.PathLike)):
                frame_paths.append(_resolve(frame, image_root))
                frames.append(_open_frame(frame_paths[-1], where))
            else:
                raise ValueError(
                    f"{where}: frame {index} is a {type(frame).__name__}; frames are PIL images or image paths."
                )
        total, known_fps = len(video), source_fps
    else:
        raise ValueError(
            f"{where}: unsupported video input of type {type(video).__name__}; use a video file, a frame folder, a "
            "list of frames or a (T, H, W, 3) array."
        )
    if not frames:
        raise ValueError(f"{where}: the video has zero frames after sampling.")
    sizes = [frame.size for frame in frames]
    for position, size in enumerate(sizes):
        if size != sizes[0]:
            name = frame_paths[position] if frame_paths else f"frame {indices[position]}"
            raise ValueError(
                f"{where}: video frames differ in size: {name} is {size[0]}x{size[1]}, the first kept frame "
                f"{sizes[0][0]}x{sizes[0][1]}. Resize the frames to one size first."
            )
    return VideoFrames(
        frames=frames, frame_indices=[int(i) for i in indices], total_frames=int(total),
        fps=float(known_fps) if known_fps else None, source=source, frame_paths=frame_paths,
    )


# ---------------------------------------------------------------------------------------------------- patchification
@dataclass(frozen=True)
class VideoSettings:
    """What the backbone's video processor needs: the vision tower's patching and the video pixel budget.

    ``min_pixels`` / ``max_pixels`` are the video processor's ``size["shortest_edge"]`` / ``size["longest_edge"]``
    (per frame for Qwen2-VL; for the whole clip, frames x height x width, for Qwen3-VL).
    """

    family: str
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    min_pixels: int
    max_pixels: int
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    resample: int = Image.Resampling.BICUBIC
    cap_pixels_per_frame: bool = False
    max_video_tokens: int | None = None

    def __post_init__(self):
        check_family(self.family)
        if int(self.resample) not in (Image.Resampling.BICUBIC, Image.Resampling.BILINEAR):
            raise ValueError(f"resample={self.resample!r}: only BICUBIC and BILINEAR are reproduced.")

    @classmethod
    def stock(cls, family: str, **overrides: Any) -> "VideoSettings":
        """The stock video processor's class defaults (``Qwen2VLVideoProcessor`` for Qwen2-VL and Qwen2.5-VL,
        ``Qwen3VLVideoProcessor``), with ``overrides``."""
        return cls(family=check_family(family), **{**STOCK_VIDEO_DEFAULTS[family], **overrides})

    @classmethod
    def from_image_processor(
        cls, image_processor: Any, family: str, min_pixels: int | None = None, max_pixels: int | None = None,
        **overrides: Any,
    ) -> "VideoSettings":
        """Settings read from a Qwen2-VL image processor (``Qwen2VLImageProcessorPil`` or the torchvision one):
        patch, merge and temporal patch sizes, mean, std, rescale factor, resample. The pixel budget defaults to the
        image processor's ``size`` (``shortest_edge`` / ``longest_edge``): what ``AutoVideoProcessor`` builds for a
        checkpoint without ``video_preprocessor_config.json``, which falls back to ``preprocessor_config.json``.
        Pass ``min_pixels`` / ``max_pixels`` when the checkpoint's video processor has its own."""
        size = getattr(image_processor, "size", None) or {}
        get = size.get if isinstance(size, dict) else lambda key: getattr(size, key, None)
        settings = dict(
            patch_size=image_processor.patch_size,
            temporal_patch_size=image_processor.temporal_patch_size,
            merge_size=image_processor.merge_size,
            min_pixels=min_pixels if min_pixels is not None else get("shortest_edge"),
            max_pixels=max_pixels if max_pixels is not None else get("longest_edge"),
            image_mean=tuple(image_processor.image_mean),
            image_std=tuple(image_processor.image_std),
            rescale_factor=image_processor.rescale_factor,
            do_resize=image_processor.do_resize,
            do_rescale=image_processor.do_rescale,
            do_normalize=image_processor.do_normalize,
            resample=int(image_processor.resample),
        )
        return cls(family=check_family(family), **{**settings, **overrides})

    def replace(self, **changes: Any) -> "VideoSettings":
        """A copy with ``changes``."""
        return _dataclass_replace(self, **changes)


def _smart_resize_qwen2(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    # transformers' qwen2_vl smart_resize (image and video alike).
    if max(height, width) / min(height, width) > 200:
        ratio = max(height, width) / min(height, width)
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {ratio}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _smart_resize_qwen3(
    num_frames: int, height: int, width: int, temporal_factor: int, factor: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    # transformers' qwen3_vl video smart_resize: the budget counts frames (rounded to the temporal factor).
    if num_frames < temporal_factor:
        raise ValueError(
            f"Qwen3-VL video processing needs at least temporal_patch_size={temporal_factor} frames, got {num_frames}."
        )
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        ratio = max(height, width) / min(height, width)
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {ratio}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def video_resized_size(num_frames: int, height: int, width: int, settings: VideoSettings) -> tuple[int, int]:
    """(height, width) every frame of a ``num_frames`` x ``height`` x ``width`` clip is resized to (the video
    processor's ``resize``, including ``cap_pixels_per_frame``)."""
    factor = settings.patch_size * settings.merge_size
    max_pixels = settings.max_pixels
    if settings.family == "qwen3_vl":
        if settings.cap_pixels_per_frame:
            tokens = settings.max_video_tokens or STOCK_VIDEO_DEFAULTS["qwen3_vl"]["max_video_tokens"]
            per_frame = max(min(tokens * factor * factor, max_pixels // num_frames), int(settings.min_pixels * 1.05))
            max_pixels = per_frame * num_frames
        return _smart_resize_qwen3(
            num_frames, height, width, settings.temporal_patch_size, factor, settings.min_pixels, max_pixels
        )
    if settings.cap_pixels_per_frame:
        tokens = settings.max_video_tokens or STOCK_VIDEO_DEFAULTS["qwen2_vl"]["max_video_tokens"]
        total_pixels = int(tokens * factor * factor * 0.9)
        max_pixels = max(
            min(max_pixels, total_pixels * settings.temporal_patch_size // num_frames), int(settings.min_pixels * 1.05)
        )
    return _smart_resize_qwen2(height, width, factor, settings.min_pixels, max_pixels)


def frames_to_tensor(frames: VideoFrames | Sequence[Image.Image] | np.ndarray) -> torch.Tensor:
    """A clip as a ``(T, 3, H, W)`` uint8 tensor (PIL frames are converted to RGB; all must have one size)."""
    if isinstance(frames, VideoFrames):
        frames = frames.frames
    if isinstance(frames, np.ndarray):
        array = frames
    else:
        if len(frames) == 0:
            raise ValueError("A video needs at least one frame.")
        arrays = [np.asarray(_to_rgb(frame)) for frame in frames]
        if len({array.shape for array in arrays}) > 1:
            sizes = sorted({array.shape[1::-1] for array in arrays})
            raise ValueError(f"Video frames differ in size: {sizes} (width, height).")
        array = np.stack(arrays)
    if array.ndim != 4 or array.shape[-1] != 3 or array.dtype != np.uint8:
        raise ValueError(f"A video array must be (frames, height, width, 3) uint8, got {array.shape} {array.dtype}.")
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).contiguous()


def _resize_uint8(video: torch.Tensor, height: int, width: int, resample: int) -> torch.Tensor:
    """The torchvision backend's resize on CPU: ``tvF.resize(..., antialias=True)``, which for bicubic (and for
    bilinear on AVX2/AVX512 CPUs) runs torch's native uint8 antialiased kernel, and otherwise interpolates in
    float32 and rounds back."""
    if video.shape[-2:] == (height, width):
        return video
    mode = "bicubic" if int(resample) == Image.Resampling.BICUBIC else "bilinear"
    native = mode == "bicubic" or torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    if native:
        return torch.nn.functional.interpolate(
            video, size=[height, width], mode=mode, align_corners=False, antialias=True
        )
    resized = torch.nn.functional.interpolate(
        video.to(torch.float32), size=[height, width], mode=mode, align_corners=False, antialias=True
    )
    return resized.round_().to(torch.uint8)


def patchify_video(
    frames: VideoFrames | Sequence[Image.Image] | np.ndarray, settings: VideoSettings
) -> BatchFeature:
    """``pixel_values_videos`` ``(N, 3 * T * P * P)`` float32 and ``video_grid_thw`` ``(1, 3)`` int64 for one clip,
    as the backbone's video processor computes them from these frames (``do_sample_frames=False``; sample with
    `load_video_frames` first).

    Steps: resize every frame to `video_resized_size` (bicubic, antialiased, in uint8), rescale and normalise in
    float32 (``(x - 255 * mean) / (255 * std)``, the torchvision backend's fused form), repeat the last frame up to a
    multiple of the temporal patch size, and cut patches: rows ordered by temporal group, merge-block row, merge-block
    column, row and column inside the block; each row holds channel, frame, patch row, patch column.

    Example:
        >>> from PIL import Image
        >>> settings = VideoSettings.stock("qwen2_vl", min_pixels=28 * 28, max_pixels=56 * 56)
        >>> out = patchify_video([Image.new("RGB", (60, 40), (9 * i, 0, 0)) for i in range(3)], settings)
        >>> tuple(out["pixel_values_videos"].shape), out["video_grid_thw"].tolist()
        ((16, 1176), [[2, 2, 4]])
    """
    video = frames_to_tensor(frames)
    num_frames, channel, height, width = video.shape
    if settings.do_resize:
        new_height, new_width = video_resized_size(num_frames, height, width, settings)
        video = _resize_uint8(video, new_height, new_width, settings.resample)
    if settings.do_normalize:
        scale = 1.0 / settings.rescale_factor if settings.do_rescale else 1.0
        mean = (torch.tensor(settings.image_mean) * scale).view(-1, 1, 1)
        std = (torch.tensor(settings.image_std) * scale).view(-1, 1, 1)
        video = video.to(torch.float32).sub_(mean).div_(std)
    elif settings.do_rescale:
        video = video * settings.rescale_factor
    else:
        video = video.to(torch.float32)
    patch, merge, temporal = settings.patch_size, settings.merge_size, settings.temporal_patch_size
    _, _, height, width = video.shape
    if height % (patch * merge) or width % (patch * merge):
        raise ValueError(f"Frames of {width}x{height} are not a multiple of patch_size * merge_size = {patch * merge}.")
    if pad := -num_frames % temporal:
        video = torch.cat((video, video[-1:].expand(pad, -1, -1, -1)), dim=0)
    grid_t, grid_h, grid_w = video.shape[0] // temporal, height // patch, width // patch
    patches = video.reshape(
        grid_t, temporal, channel, grid_h // merge, merge, patch, grid_w // merge, merge, patch
    ).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    flat = patches.reshape(grid_t * grid_h * grid_w, channel * temporal * patch * patch)
    return BatchFeature(
        data={"pixel_values_videos": flat, "video_grid_thw": torch.tensor([[grid_t, grid_h, grid_w]])}
    )


# ------------------------------------------------------------------------------------------------------------ prompts
def video_timestamps(
    frame_indices: Sequence[int], fps: float | None = None, temporal_patch_size: int = 2
) -> list[float]:
    """Seconds of each temporal group, as ``Qwen3VLProcessor._calculate_timestamps``: indices padded to a multiple of
    the temporal patch size with the last one, ``index / fps`` (``fps`` None: 24, transformers' default), then the
    mean of each group's first and last frame.

    Example:
        >>> video_timestamps([0, 3, 6, 9, 12], fps=10)
        [0.15, 0.75, 1.2]
    """
    indices = [int(index) for index in frame_indices]
    if not indices:
        raise ValueError("Timestamps need at least one frame index.")
    indices += [indices[-1]] * (-len(indices) % temporal_patch_size)
    seconds = [index / (fps or DEFAULT_FPS) for index in indices]
    return [
        (seconds[start] + seconds[start + temporal_patch_size - 1]) / 2
        for start in range(0, len(seconds), temporal_patch_size)
    ]


def video_placeholder_text(
    video_grid_thw: Sequence[int] | torch.Tensor,
    family: str,
    merge_size: int = 2,
    frame_indices: Sequence[int] | None = None,
    fps: float | None = None,
    temporal_patch_size: int = 2,
    video_token: str = VIDEO_TOKEN,
    vision_start: str = VISION_START,
    vision_end: str = VISION_END,
) -> str:
    """The text that replaces one ``<|video_pad|>`` of a prompt (``replace_video_token`` of the backbone processor).

    - Qwen2-VL / Qwen2.5-VL: ``<|video_pad|>`` x (t * h * w / merge_size^2). The processor adds no vision start/end:
      they come from the chat template (``<|vision_start|><|video_pad|><|vision_end|>``) or, as in VLM2Vec's MMEB-V2
      prompts, not at all.
    - Qwen3-VL: per temporal group ``<{seconds:.1f} seconds><|vision_start|>`` + ``<|video_pad|>`` x (h * w /
      merge_size^2) + ``<|vision_end|>``, the seconds from `video_timestamps` (``frame_indices`` required:
      ``range(len(frames))`` is what transformers assumes for a bare frame list; ``fps`` None means 24). Use
      `expand_video_placeholders` on a whole prompt: Qwen3-VL first folds a chat template's
      ``<|vision_start|><|video_pad|><|vision_end|>`` into the bare token.

    Example:
        >>> video_placeholder_text([2, 2, 2], "qwen2_vl") == "<|video_pad|>" * 2
        True
        >>> video_placeholder_text([2, 2, 2], "qwen3_vl", frame_indices=[0, 10, 20, 30], fps=10).split("<|vision_end|>")
        ['<0.5 seconds><|vision_start|><|video_pad|>', '<2.5 seconds><|vision_start|><|video_pad|>', '']
    """
    if isinstance(video_grid_thw, torch.Tensor):
        video_grid_thw = video_grid_thw.reshape(-1).tolist()
    grid_t, grid_h, grid_w = (int(value) for value in video_grid_thw)
    check_family(family)
    if family != "qwen3_vl":
        return video_token * (grid_t * grid_h * grid_w // merge_size**2)
    if frame_indices is None:
        raise ValueError(
            "Qwen3-VL video prompts carry timestamps: pass frame_indices (the kept frames' indices in the source; "
            "range(len(frames)) for a bare frame list, as transformers assumes) and fps (None: 24)."
        )
    seconds = video_timestamps(frame_indices, fps, temporal_patch_size)
    if len(seconds) != grid_t:
        raise ValueError(
            f"{len(frame_indices)} frame indices make {len(seconds)} temporal groups, but the grid has {grid_t}."
        )
    tokens = video_token * (grid_h * grid_w // merge_size**2)
    return "".join(f"<{second:.1f} seconds>{vision_start}{tokens}{vision_end}" for second in seconds)


def expand_video_placeholders(
    text: str,
    replacements: Sequence[str],
    family: str,
    video_token: str = VIDEO_TOKEN,
    vision_start: str = VISION_START,
    vision_end: str = VISION_END,
) -> str:
    """``text`` with its ``<|video_pad|>`` placeholders replaced in order by ``replacements`` (from
    `video_placeholder_text`), as the backbone processor does. Qwen3-VL first folds each
    ``<|vision_start|><|video_pad|><|vision_end|>`` into a bare ``<|video_pad|>`` (its replacement carries the
    wrappers per temporal group). The number of placeholders must equal the number of replacements.

    Example:
        >>> expand_video_placeholders("<|vision_start|><|video_pad|><|vision_end|>Hi", ["<V>"], "qwen3_vl")
        '<V>Hi'
        >>> expand_video_placeholders("<|vision_start|><|video_pad|><|vision_end|>Hi", ["<V>"], "qwen2_vl")
        '<|vision_start|><V><|vision_end|>Hi'
    """
    check_family(family)
    if family == "qwen3_vl":
        text = text.replace(vision_start + video_token + vision_end, video_token)
    pieces = text.split(video_token)
    if len(pieces) - 1 != len(replacements):
        raise ValueError(
            f"The text has {len(pieces) - 1} video placeholders ({video_token}) but {len(replacements)} videos."
        )
    out = [pieces[0]]
    for replacement, piece in zip(replacements, pieces[1:]):
        out += [replacement, piece]
    return "".join(out)


def second_per_grid_ts(
    num_frames: int, temporal_patch_size: int = 2, fps: float | None = None, total_frames: int | None = None
) -> float:
    """Qwen2.5-VL's ``second_per_grid_ts`` for one video: ``temporal_patch_size / sampled_fps``, where
    ``sampled_fps`` is ``num_frames / total_frames * fps`` (transformers' ``VideoMetadata.sampled_fps``), or ``fps``
    itself when ``total_frames`` is unknown, or 24 when ``fps`` is (a bare frame list: 2 / 24).

    Example:
        >>> second_per_grid_ts(8, fps=30, total_frames=120), second_per_grid_ts(5)
        (1.0, 0.08333333333333333)
    """
    if not fps:
        sampled = DEFAULT_FPS
    elif total_frames:
        sampled = num_frames / total_frames * fps
    else:
        sampled = fps
    return temporal_patch_size / sampled


__all__ = [
    "DEFAULT_FPS",
    "STOCK_VIDEO_DEFAULTS",
    "VIDEO_FAMILIES",
    "VideoFrames",
    "VideoSettings",
    "expand_video_placeholders",
    "frames_to_tensor",
    "list_frame_files",
    "load_video_frames",
    "natural_sort_key",
    "patchify_video",
    "sample_frame_indices",
    "second_per_grid_ts",
    "video_placeholder_text",
    "video_resized_size",
    "video_timestamps",
]
