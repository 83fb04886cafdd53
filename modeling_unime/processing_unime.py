"""UniMEV2Processor: texts, images and an instruction -> backbone inputs in the authors' prompt format.

This file travels with every checkpoint (``auto_map``): it imports only ``torch``, ``transformers`` and PIL (which
``transformers`` image processing already needs). No torchvision: the backbone processors are used through
subclasses that leave the video processor out.
"""

from __future__ import annotations

import copy
import inspect
import io
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any, Union

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, BatchFeature, ProcessorMixin
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil
from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

from .configuration_unime import (
    CHAT_PROMPT_BACKBONES,
    HUB_KWARGS,
    QWEN3_VL_BACKBONES,
    SUPPORTED_BACKBONES,
    check_backbone_type,
)
from .video_unime import (
    STOCK_VIDEO_DEFAULTS,
    VIDEO_TOKEN,
    VideoFrames,
    VideoSettings,
    expand_video_placeholders,
    load_video_frames,
    patchify_video,
    second_per_grid_ts,
    video_placeholder_text,
)

ImageInput = Union[Image.Image, str, os.PathLike, dict, None]
# A video: a file (decoded with PyAV), a folder of frame images, or a list of frames (PIL images or image paths).
VideoInput = Union[str, os.PathLike, Sequence[Union[Image.Image, str, os.PathLike]], None]
# Backbones whose video processing is reproduced (modeling_unime.video_unime), and the rules each follows.
VIDEO_FAMILY_OF = {
    "qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_5_vl", "qwen3_vl": "qwen3_vl", "qwen3_vl_moe": "qwen3_vl",
}

# MMEB stores its texts in the Phi-3V format; every backbone has its own placeholder.
PHI3V_IMAGE_TOKEN = "<|image_1|>"
BACKBONE_IMAGE_TOKENS = {
    "qwen2_vl": "<|image_pad|>", "qwen2_5_vl": "<|image_pad|>", "llava_onevision": "<image>",
    "qwen3_vl": "<|image_pad|>", "qwen3_vl_moe": "<|image_pad|>",
}


class Qwen2VLImageTextProcessor(Qwen2VLProcessor):
    """Qwen2-VL processor without the video processor (which needs torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class Qwen2_5_VLImageTextProcessor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL processor without the video processor (which needs torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class Qwen3VLImageTextProcessor(Qwen3VLProcessor):
    """Qwen3-VL processor (dense and MoE) without the video processor (which needs torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class LlavaOnevisionImageTextProcessor(LlavaOnevisionProcessor):
    """LLaVA-OneVision processor without the video processor (which needs torchvision)."""

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_image_tokens=None,
        vision_feature_select_strategy=None,
        chat_template=None,
        image_token="<image>",
        video_token="<video>",
        vision_aspect_ratio="anyres_max_9",
        **kwargs,
    ):
        super().__init__(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            num_image_tokens=num_image_tokens,
            vision_feature_select_strategy=vision_feature_select_strategy,
            chat_template=chat_template,
            image_token=image_token,
            video_token=video_token,
            vision_aspect_ratio=vision_aspect_ratio,
            **kwargs,
        )


class LlavaOnevisionImageProcessorFloorPadding(LlavaOnevisionImageProcessorPil):
    """LLaVA-OneVision image processing with the anyres padding of transformers 4.49 (the authors' stack): a tile grid
    wider (taller) than the resized image is padded by floor(gap / 2) on BOTH sides, so an odd gap leaves the padded
    image one pixel short and its last tile is stretched to the tile size. transformers 5.x puts the odd pixel on one
    side instead; pixel values then differ in the edge tiles of non-square images (measured against 4.49: tiles equal
    bit for bit with this class, up to 1.8 apart without it)."""

    def _get_padding_size(self, original_resolution: tuple, target_resolution: tuple):
        (original_height, original_width), (target_height, target_width) = original_resolution, target_resolution
        paste_x, paste_y = (target_width - original_width) // 2, (target_height - original_height) // 2
        return (paste_y, paste_y), (paste_x, paste_x)


# Saved processor_config.json files then name the stock class, so a setup with torchvision opens them as usual.
for _subclass, _stock in (
    (Qwen2VLImageTextProcessor, Qwen2VLProcessor),
    (Qwen2_5_VLImageTextProcessor, Qwen2_5_VLProcessor),
    (Qwen3VLImageTextProcessor, Qwen3VLProcessor),
    (LlavaOnevisionImageTextProcessor, LlavaOnevisionProcessor),
    (LlavaOnevisionImageProcessorFloorPadding, LlavaOnevisionImageProcessorPil),
):
    _subclass.__name__ = _subclass.__qualname__ = _stock.__name__

BACKBONE_PROCESSOR_CLASSES = {
    "qwen2_vl": Qwen2VLImageTextProcessor,
    "qwen2_5_vl": Qwen2_5_VLImageTextProcessor,
    "llava_onevision": LlavaOnevisionImageTextProcessor,
    "qwen3_vl": Qwen3VLImageTextProcessor,
    "qwen3_vl_moe": Qwen3VLImageTextProcessor,
}
LLAVA_ONEVISION_SETTINGS = ("num_image_tokens", "vision_feature_select_strategy", "vision_aspect_ratio")
ANYRES_PADDINGS = ("transformers-4.49", "centered")


# The authors' image sizes (their Embedding/src/dataset.py `process_image` and the reranker's vision process):
# every embedder image is resized to a square for training (672 Qwen2-VL, 336 LLaVA-OneVision) and for evaluation
# (1344, all three); without a resolution flag the longest side is capped at 1344; reranker images are scaled to at
# most 300*28*28 pixels with sides that are multiples of 28.
IMAGE_RESIZE_PRESETS = {
    "native": "native",
    "authors-eval": "square:1344",
    "authors-train-qwen2vl": "square:672",
    "authors-train-llava-ov": "square:336",
    "authors-default": "max_side:1344",
    "authors-reranker": "max_pixels:235200",
    # The reranker stage of the authors' evaluation gets the embedder's 1344x1344 image and caps that: 476x476.
    "authors-reranker-eval": "square:1344,max_pixels:235200",
}
IMAGE_RESIZE_MODES = ("native", "square", "max_side", "max_pixels")
# The reranker's vision process: sides rounded to multiples of 28, at least 4*28*28 pixels, aspect ratio <= 200.
PIXEL_FACTOR, MIN_PIXELS, MAX_ASPECT_RATIO = 28, 4 * 28 * 28, 200


def canonical_image_resize(spec: str | None) -> str:
    """The canonical form of an image-resize policy (a preset name, ``mode:value``, or steps joined by commas);
    raises a ValueError on a bad spec.

    Policies: ``native`` (no resize); ``square:N`` (every image to N x N, the authors' embedder rule);
    ``max_side:N`` (N x N only when the longest side exceeds N: the authors' rule without a resolution flag);
    ``max_pixels:N`` (keep the aspect ratio, sides multiples of 28, between 4*28*28 and N pixels: the reranker's
    rule); ``a,b`` applies ``a`` then ``b``. Presets: ``authors-eval`` (square:1344), ``authors-train-qwen2vl``
    (square:672), ``authors-train-llava-ov`` (square:336), ``authors-default`` (max_side:1344), ``authors-reranker``
    (max_pixels:235200, the reranker's training rule), ``authors-reranker-eval`` (square:1344,max_pixels:235200: at
    evaluation the reranker gets the embedder's 1344x1344 image, hence 476x476).

    Example:
        >>> canonical_image_resize("authors-eval"), canonical_image_resize(None), canonical_image_resize("square:64")
        ('square:1344', 'native', 'square:64')
        >>> canonical_image_resize("authors-reranker-eval")
        'square:1344,max_pixels:235200'
    """
    spec = IMAGE_RESIZE_PRESETS.get(spec or "native", spec)
    steps = [IMAGE_RESIZE_PRESETS.get(step.strip(), step.strip()) for step in str(spec).split(",")]
    for step in steps:
        mode, _, value = step.partition(":")
        valid = mode in IMAGE_RESIZE_MODES and (mode == "native") == (value == "") and "," not in step
        if valid and value:
            valid = value.isdigit() and int(value) > 0
        if not valid:
            raise ValueError(
                f"image_resize={spec!r}: use a preset ({', '.join(IMAGE_RESIZE_PRESETS)}) or square:N, max_side:N, "
                "max_pixels:N with a positive integer N (steps may be joined by commas)."
            )
    steps = [step for step in steps if step != "native"] or ["native"]
    return ",".join(steps)


def _round_to(value: float, factor: int, rounding=round) -> int:
    return int(rounding(value / factor) * factor)


def _capped_size(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """The reranker's rule: sides multiples of 28, pixels within [4*28*28, max_pixels], aspect ratio kept."""
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"An image of {width}x{height} has an aspect ratio above {MAX_ASPECT_RATIO}, which the authors' reranker "
            "rule refuses."
        )
    new_height = max(PIXEL_FACTOR, _round_to(height, PIXEL_FACTOR))
    new_width = max(PIXEL_FACTOR, _round_to(width, PIXEL_FACTOR))
    if new_height * new_width > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        new_height = _round_to(height / beta, PIXEL_FACTOR, math.floor)
        new_width = _round_to(width / beta, PIXEL_FACTOR, math.floor)
    elif new_height * new_width < MIN_PIXELS:
        beta = math.sqrt(MIN_PIXELS / (height * width))
        new_height = _round_to(height * beta, PIXEL_FACTOR, math.ceil)
        new_width = _round_to(width * beta, PIXEL_FACTOR, math.ceil)
    # Rounding can push the ratio past the limit again; the authors clamp the long side.
    if new_height / new_width > MAX_ASPECT_RATIO:
        new_height = new_width * MAX_ASPECT_RATIO
    elif new_width / new_height > MAX_ASPECT_RATIO:
        new_width = new_height * MAX_ASPECT_RATIO
    return new_width, new_height


def _step_size(width: int, height: int, step: str) -> tuple[int, int]:
    mode, _, value = step.partition(":")
    if mode == "square":
        return int(value), int(value)
    if mode == "max_side":
        return (int(value), int(value)) if max(width, height) > int(value) else (width, height)
    if mode == "max_pixels":
        return _capped_size(width, height, int(value))
    return width, height


def resized_size(width: int, height: int, image_resize: str | None) -> tuple[int, int]:
    """(width, height) an image of this size gets under ``image_resize`` (see `canonical_image_resize`).

    Example:
        >>> resized_size(640, 480, "authors-eval"), resized_size(640, 480, "authors-default")
        ((1344, 1344), (640, 480))
        >>> resized_size(2000, 1000, "authors-reranker"), resized_size(2000, 1000, "authors-reranker-eval")
        ((672, 336), (476, 476))
    """
    for step in canonical_image_resize(image_resize).split(","):
        width, height = _step_size(width, height, step)
    return width, height


def _to_rgb(image: Image.Image, composite_on_white: bool) -> Image.Image:
    if image.mode == "RGB":
        return image
    if composite_on_white and image.mode == "RGBA":
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.split()[3])
        return background
    return image.convert("RGB")


def resize_image(image: Image.Image, image_resize: str | None) -> Image.Image:
    """``image`` resized under ``image_resize`` and converted to RGB, in the authors' order of operations.

    The embedder rules resize the image as opened (PIL's default filter for its mode) and leave the conversion to
    RGB for later, as the authors' dataset code does before their processor converts it; the reranker rule first
    converts (an RGBA image is laid on white) and then resizes, as their reranker's vision process does.
    """
    for step in canonical_image_resize(image_resize).split(","):
        if step.startswith("max_pixels"):
            image = _to_rgb(image, composite_on_white=True)
        size = _step_size(image.width, image.height, step)
        if size != image.size:
            image = image.resize(size)
    return _to_rgb(image, composite_on_white=False)


def resolve_image_path(path: str | os.PathLike, image_root: str | os.PathLike | None) -> str:
    """``path`` under ``image_root`` unless it is absolute (or there is no root). The package's
    `modeling_unime.util.images` has the same rule; this copy travels with the checkpoint's code, which imports only
    torch and transformers.

    Example:
        >>> resolve_image_path("coco/1.jpg", "/data"), resolve_image_path("/abs/1.jpg", "/data")
        ('/data/coco/1.jpg', '/abs/1.jpg')
    """
    path = os.fspath(path)
    if image_root is None or os.fspath(image_root) == "" or os.path.isabs(path):
        return path
    return os.path.join(os.fspath(image_root), path)


def load_image(
    image: ImageInput, row: int | str, image_root: str | os.PathLike | None = None, image_resize: str | None = None
) -> Image.Image | None:
    """Open one image input as an RGB PIL image, resized under ``image_resize`` (default: native size).

    Accepts a PIL image, a path (relative paths are resolved against ``image_root``), a ``datasets`` image dict
    (``{"bytes": ..., "path": ...}``) or None. A missing or unreadable file raises a ValueError naming the row
    (``row``: a row number, or a label such as ``"query 'a red car' positive"``).
    """
    if image is None:
        return None
    where = f"Row {row}" if isinstance(row, int) else str(row)
    if isinstance(image, Image.Image):
        return resize_image(image, image_resize)
    if isinstance(image, dict):
        if image.get("bytes"):
            try:
                opened = Image.open(io.BytesIO(image["bytes"]))
                opened.load()
            except Exception as error:
                raise ValueError(f"{where}: the image bytes could not be decoded ({error}).") from error
            return resize_image(opened, image_resize)
        image = image.get("path")
        if not image:
            return None
    if isinstance(image, (str, os.PathLike)):
        if os.fspath(image) == "":
            return None
        path = resolve_image_path(image, image_root)
        if not os.path.isfile(path):
            hint = "pass image_root=" if image_root is None else f"check image_root={os.fspath(image_root)!r}"
            raise ValueError(f"{where}: image file not found: {path!r} ({hint} or fix the path).")
        try:
            with Image.open(path) as opened:
                opened.load()
                loaded = resize_image(opened, image_resize)
                # Closing the file would invalidate an image returned as opened.
                return loaded.copy() if loaded is opened else loaded
        except Exception as error:
            raise ValueError(f"{where}: image file {path!r} is not a readable image ({error}).") from error
    raise ValueError(
        f"{where}: unsupported image input of type {type(image).__name__}; use a PIL image, a path or None."
    )


def align_rows(
    texts: Any, images: Any, row_ids: Sequence[int] | None = None, videos: Sequence[VideoInput] | None = None
) -> tuple[list[str | None], list[ImageInput]]:
    """The texts and images of a batch as two lists of one entry per row (a single text or image becomes a list; None
    fills the side a row lacks); a row with nothing to embed, or lists of different lengths, raise ValueError naming
    the row. ``videos`` (a list, one entry per row, None where a row has none) counts as a row's content and must be
    as long as the other lists; it is returned by `align_videos`."""
    if videos is not None and texts is None and images is None:
        texts = [None] * len(videos)
    if isinstance(texts, str):
        texts = [texts]
    elif texts is not None and (not isinstance(texts, Iterable) or isinstance(texts, (bytes, dict))):
        raise TypeError(f"texts must be a string, a list of strings (None for an image-only row) or None; got "
                        f"{type(texts).__name__}.")
    if images is not None and not isinstance(images, (list, tuple)):
        images = [images]
    if texts is None and images is None:
        raise ValueError("Give texts, images or both.")
    texts = list(texts) if texts is not None else [None] * len(images)
    images = list(images) if images is not None else [None] * len(texts)
    if len(texts) != len(images):
        raise ValueError(
            f"texts has {len(texts)} rows but images has {len(images)}; use None for a missing text or image so "
            "that both lists have one entry per row."
        )
    if videos is not None and len(videos) != len(texts):
        raise ValueError(f"videos has {len(videos)} rows but texts and images have {len(texts)}; use None for a row "
                         "without a video so that every list has one entry per row.")
    for index, (text, image) in enumerate(zip(texts, images)):
        row = row_ids[index] if row_ids is not None else index
        if text is not None and not isinstance(text, str):
            raise ValueError(f"Row {row}: text must be a string or None, got {type(text).__name__}.")
        has_video = videos is not None and videos[index] is not None
        has_image = not (image is None or (isinstance(image, str) and image == ""))
        if has_video and has_image:
            raise ValueError(f"Row {row}: the row has both an image and a video; give one of them (one visual "
                             "input per row).")
        if (not text or text.isspace()) and not has_image and not has_video:
            what = f"only whitespace ({text!r})" if text else "neither text nor image"
            raise ValueError(f"Row {row}: the row has {what}; give a text, an image or a video.")
    return texts, images


def align_videos(videos: Any, rows: int | None = None) -> list[VideoInput] | None:
    """``videos`` as a list of one entry per row (None for none). A single video (a path, or a list of frames for
    one row) must be wrapped in a list: ``videos=[frames]``; a string is taken as one video."""
    if videos is None:
        return None
    if isinstance(videos, (str, os.PathLike)):
        videos = [videos]
    if not isinstance(videos, (list, tuple)):
        raise TypeError(f"videos must be a list with one video (a file or folder path, or a list of frames) or None "
                        f"per row; got {type(videos).__name__}.")
    return list(videos)


def drop_orphan_placeholder(text: str | None, has_image: bool) -> str | None:
    """The text without its MMEB image placeholder (``<|image_1|>`` and the newline after it) when the row has no
    image; otherwise unchanged. The authors' training file has such rows (WebQA queries: "<|image_1|>\\nFind a
    Wikipedia image that answers this question: ...", no image); their code embedded the placeholder as a plain
    ``<|image_pad|>`` token with no image behind it. `encode` refuses such a row (a placeholder without an image is
    usually a mistake); the training collator and mining, which read released data, drop the placeholder instead and
    say how often they did.

    Example:
        >>> drop_orphan_placeholder("<|image_1|>\\nFind a Wikipedia image: why?\\n", has_image=False)
        'Find a Wikipedia image: why?\\n'
        >>> drop_orphan_placeholder("<|image_1|>\\nWhat is it?", has_image=True)
        '<|image_1|>\\nWhat is it?'
    """
    if has_image or not text or PHI3V_IMAGE_TOKEN not in text:
        return text
    return text.replace(PHI3V_IMAGE_TOKEN + "\n", "").replace(PHI3V_IMAGE_TOKEN, "")


def check_instruction(instruction: Any) -> None:
    """One instruction for the whole call: a string or None (a list per row is not supported)."""
    if instruction is not None and not isinstance(instruction, str):
        raise TypeError(f"instruction must be one string (prepended to every row) or None, got "
                        f"{type(instruction).__name__}; to give rows different instructions, encode them in "
                        "separate calls or put the instruction in each row's text.")


def missing_image_rows(images: Sequence[ImageInput], image_root: str | os.PathLike | None = None
                       ) -> list[tuple[int, str]]:
    """(row, resolved path) of every image given as a path (or a ``datasets`` dict without bytes) whose file does
    not exist: checked before any forward pass, so a bad row 40 is reported before 10 batches run."""
    missing = []
    for row, image in enumerate(images):
        if isinstance(image, dict) and not image.get("bytes"):
            image = image.get("path")
        if isinstance(image, (str, os.PathLike)) and os.fspath(image):
            path = resolve_image_path(image, image_root)
            if not os.path.isfile(path):
                missing.append((row, path))
    return missing


def _read_backbone_type(pretrained_model_name_or_path: str | os.PathLike, **hub_kwargs: Any) -> str | None:
    """The backbone family named by a checkpoint's config.json (UniME-V2 or a plain backbone), if it has one."""
    from transformers import PretrainedConfig

    try:
        config_dict, _ = PretrainedConfig.get_config_dict(pretrained_model_name_or_path, **hub_kwargs)
    except OSError:
        return None
    if config_dict.get("model_type") == "unime_v2":
        return (config_dict.get("backbone_config") or {}).get("model_type")
    return config_dict.get("model_type")


def _saved_video_budget(source: str | os.PathLike, processor_dict: dict[str, Any], hub_kwargs: dict[str, Any]
                        ) -> dict[str, int]:
    """``video_min_pixels`` / ``video_max_pixels`` from a checkpoint's own video processor config (the nested
    ``video_processor`` of ``processor_config.json``, else ``video_preprocessor_config.json``), the files transformers'
    ``AutoVideoProcessor`` reads first; empty when there is none."""
    import json

    from transformers.utils import cached_file

    config = processor_dict.get("video_processor")
    if not isinstance(config, dict):
        try:
            path = cached_file(source, "video_preprocessor_config.json", **hub_kwargs)
        except OSError:  # no such file: the image processor's size applies
            return {}
        if path is None:
            return {}
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
    size = config.get("size") or {}
    budget = {"video_min_pixels": size.get("shortest_edge", config.get("min_pixels")),
              "video_max_pixels": size.get("longest_edge", config.get("max_pixels"))}
    return {name: int(value) for name, value in budget.items() if value is not None}


def plain_checkpoint_image_rule(source: str | os.PathLike) -> str:
    """The image rule the authors ran a checkpoint of their plain layout under: ``authors-reranker-eval`` for their
    reranker, ``authors-eval`` for their embedders. Their folders carry no setting that tells the two apart (both
    are stock Qwen-VL saves; they also trained Qwen2.5-VL embedders), so the reranker is known by its name, as
    released (``TianchengGu/UniME-V2-Reranker-Qwen25VL-7B``, or a local copy whose path says ``rerank``). A folder
    saved by `UniMEV2Processor` names its own rule and never needs this; ``plain_checkpoint_image_resize=``
    overrides it.

    Example:
        >>> plain_checkpoint_image_rule("TianchengGu/UniME-V2-Reranker-Qwen25VL-7B")
        'authors-reranker-eval'
        >>> plain_checkpoint_image_rule("TianchengGu/UniME-V2-Qwen2VL-7B")
        'authors-eval'
    """
    return "authors-reranker-eval" if "rerank" in os.fspath(source).lower() else "authors-eval"


class UniMEV2Processor(ProcessorMixin):
    """Turns texts, images and an instruction into inputs of a UniME-V2 backbone, in the authors' prompt format.

    Per backbone family (``backbone_type``):

    - ``qwen2_vl`` / ``qwen2_5_vl``: no chat template and no vision start/end tokens. A row is
      ``[<|image_pad|> ][instruction ][text]``; the image token goes where the text has a placeholder, else first,
      followed by a space (the authors' image prompt ``<|image_pad|> Find an image caption describing the given
      image.``). A caption is embedded as the raw text.
    - ``llava_onevision``, ``qwen3_vl`` and ``qwen3_vl_moe``: the image placeholder is removed from the text, which
      goes into one user turn of the chat template (with an image item first when the row has an image), followed by
      the generation prompt. The authors used this form for LLaVA-OneVision; Qwen3-VL has no UniME-V2 checkpoint of
      theirs and gets the same form, the one it was instruction-tuned on (its template wraps the image in
      ``<|vision_start|>`` / ``<|vision_end|>``), so its 3-D positions and deepstack features see what they expect.

    The Phi-3V placeholder ``<|image_1|>`` of MMEB texts is converted to the backbone's image token. Batches are
    left-padded. Text-only rows and image rows of any size can be mixed in one batch.

    ``image_resize`` (saved with the processor, so a checkpoint carries its own) resizes every image before the
    backbone's image processor sees it: ``"native"`` (default for new processors), or the authors' rules as presets,
    ``"authors-eval"`` (1344x1344, how every published number of the released embedders was measured),
    ``"authors-train-qwen2vl"`` (672x672), ``"authors-train-llava-ov"`` (336x336), ``"authors-reranker"`` (at most
    300*28*28 pixels), ``"authors-default"`` (longest side capped at 1344); see `canonical_image_resize`. A plain
    backbone checkpoint (the authors' release) gets ``"authors-eval"`` when loaded with `from_pretrained`.

    ``anyres_padding`` (LLaVA-OneVision only, saved): ``"transformers-4.49"`` (default) pads anyres tiles as the
    authors' stack did (see `LlavaOnevisionImageProcessorFloorPadding`); ``"centered"`` as transformers 5.x does.

    Videos (Qwen2-VL, Qwen2.5-VL, Qwen3-VL; ``videos=`` of `__call__`) go where an image would, sampled and cut into
    patches as the backbone's video processor does (`modeling_unime.video_unime`, no torchvision), under the saved
    settings ``video_num_frames`` (frames spread evenly; None: a file sampled at ``video_fps``, a folder or list
    taken as given), ``video_fps`` (2), ``video_max_frames`` (64) and ``video_min_pixels`` / ``video_max_pixels``
    (default: the checkpoint's video processor config, else the image processor's size; see `video_settings`).

    Example:
        >>> from modeling_unime.tiny import build_tiny_processor
        >>> processor = build_tiny_processor("qwen2_vl")
        >>> from PIL import Image
        >>> batch = processor(texts=["a red car", None], images=[None, Image.new("RGB", (56, 56))],
        ...                   instruction=None)
        >>> sorted(batch.keys())[:3]
        ['attention_mask', 'image_grid_thw', 'input_ids']
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template: str | None = None,
        backbone_type: str = "qwen2_vl",
        num_image_tokens: int | None = None,
        vision_feature_select_strategy: str | None = None,
        vision_aspect_ratio: str | None = None,
        image_resize: str = "native",
        anyres_padding: str = "transformers-4.49",
        video_num_frames: int | None = None,
        video_fps: float = 2.0,
        video_max_frames: int = 64,
        video_min_pixels: int | None = None,
        video_max_pixels: int | None = None,
        **kwargs: Any,
    ) -> None:
        check_backbone_type(backbone_type)
        if video_num_frames is not None and (isinstance(video_num_frames, bool) or int(video_num_frames) < 1):
            raise ValueError(f"video_num_frames={video_num_frames!r}: a positive number of frames, or None.")
        if not video_fps or float(video_fps) <= 0:
            raise ValueError(f"video_fps={video_fps!r}: a positive frame rate (frames kept per second of video).")
        if isinstance(video_max_frames, bool) or int(video_max_frames) < 1:
            raise ValueError(f"video_max_frames={video_max_frames!r}: a positive number of frames.")
        self.video_num_frames = video_num_frames
        self.video_fps = float(video_fps)
        self.video_max_frames = int(video_max_frames)
        self.video_min_pixels = video_min_pixels
        self.video_max_pixels = video_max_pixels
        if anyres_padding not in ANYRES_PADDINGS:
            raise ValueError(f"anyres_padding={anyres_padding!r}: use one of {ANYRES_PADDINGS}.")
        self.anyres_padding = anyres_padding
        if backbone_type == "llava_onevision" and isinstance(image_processor, LlavaOnevisionImageProcessorPil):
            image_processor = copy.copy(image_processor)  # the caller's object keeps its class
            image_processor.__class__ = (
                LlavaOnevisionImageProcessorFloorPadding if anyres_padding == "transformers-4.49"
                else LlavaOnevisionImageProcessorPil
            )
        self.backbone_type = backbone_type
        self.image_resize = canonical_image_resize(image_resize)
        self.num_image_tokens = num_image_tokens
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.vision_aspect_ratio = vision_aspect_ratio
        if chat_template is None and tokenizer is not None:
            chat_template = getattr(tokenizer, "chat_template", None)
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        tokenizer.padding_side = "left"
        settings = {}
        if backbone_type == "llava_onevision":
            settings = {name: getattr(self, name) for name in LLAVA_ONEVISION_SETTINGS if getattr(self, name)}
        self._backbone_processor = BACKBONE_PROCESSOR_CLASSES[backbone_type](
            image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **settings
        )

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "image_resize":
            value = canonical_image_resize(value)  # a bad policy fails where it is set, not at the first image
        super().__setattr__(name, value)

    @property
    def backbone_processor(self) -> ProcessorMixin:
        """The backbone family's own processor (Qwen2-VL, Qwen2.5-VL or LLaVA-OneVision) that this one drives: the
        judge and reranker prompts are rendered with its chat template."""
        return self._backbone_processor

    @property
    def image_token(self) -> str:
        return BACKBONE_IMAGE_TOKENS[self.backbone_type]

    @property
    def video_settings(self) -> VideoSettings:
        """How videos are cut into patches: the image processor's patching, mean and std, and the video pixel budget
        (per frame for Qwen2-VL / Qwen2.5-VL, for the whole clip for Qwen3-VL): ``video_min_pixels`` /
        ``video_max_pixels``, which `from_pretrained` reads from a checkpoint's ``video_preprocessor_config.json``;
        unset, the image processor's ``size``, as transformers' ``AutoVideoProcessor`` falls back to
        ``preprocessor_config.json`` when a checkpoint has no video processor config."""
        family = self._video_family()
        return VideoSettings.from_image_processor(
            self.image_processor, family, min_pixels=self.video_min_pixels, max_pixels=self.video_max_pixels,
            max_video_tokens=STOCK_VIDEO_DEFAULTS[family]["max_video_tokens"],
        )

    def _video_family(self) -> str:
        if self.backbone_type not in VIDEO_FAMILY_OF:
            raise ValueError(f"Videos are supported for {', '.join(VIDEO_FAMILY_OF)} backbones, not "
                             f"{self.backbone_type}.")
        return VIDEO_FAMILY_OF[self.backbone_type]

    def load_video(self, video: VideoInput, row: int | str, image_root: str | os.PathLike | None = None
                   ) -> VideoFrames:
        """The frames of one video under this processor's settings: ``video_num_frames`` frames spread evenly when
        set (VLM2Vec's MMEB-V2 rule, 8 there), else a video file sampled at ``video_fps`` frames per second of
        video, and a folder or list of frames taken as given; at most ``video_max_frames`` in every case."""
        family = self._video_family()
        path = video if isinstance(video, (str, os.PathLike)) else None
        is_file = path is not None and os.path.isfile(resolve_image_path(path, image_root))
        settings = self.video_settings
        return load_video_frames(
            video, row, image_root=image_root, num_frames=self.video_num_frames,
            fps=self.video_fps if is_file and self.video_num_frames is None else None,
            max_frames=self.video_max_frames, fps_rule="qwen3_vl" if family == "qwen3_vl" else "qwen2_vl",
            temporal_patch_size=settings.temporal_patch_size,
        )

    @property
    def model_input_names(self) -> list[str]:
        return self._backbone_processor.model_input_names

    def to_dict(self) -> dict[str, Any]:
        # The inner backbone processor is rebuilt from the saved attributes; it must not be deep-copied or saved.
        inner = self.__dict__.pop("_backbone_processor")
        try:
            return super().to_dict()
        finally:
            self._backbone_processor = inner

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        backbone_type: str | None = None,
        image_resize: str | None = None,
        plain_checkpoint_image_resize: str | None = None,
        **kwargs: Any,
    ) -> "UniMEV2Processor":
        """Load a UniME-V2 processor, or build one from a plain backbone checkpoint (the authors' layout).

        The backbone family comes from ``processor_config.json`` when it names one, else from the folder's
        ``config.json``; pass ``backbone_type=`` to override. ``image_resize`` overrides the saved policy; a plain
        backbone checkpoint, which saves none, gets ``plain_checkpoint_image_resize``, by default the authors' rule
        for what the folder holds (`plain_checkpoint_image_rule`): their reranker's evaluation rule for their
        reranker, their embedder evaluation size otherwise. A plain Qwen3-VL folder (a family the authors never
        released) gets ``"native"``. Other keyword arguments (``cache_dir``, ``revision``,
        ``token``, ``local_files_only``...) work as for any processor.
        """
        hub_kwargs = {key: kwargs[key] for key in HUB_KWARGS if key in kwargs}
        init_parameters = inspect.signature(cls.__init__).parameters
        settings_given = {key: kwargs.pop(key) for key in list(kwargs) if key in init_parameters}
        # Public API only: the saved settings (and chat template) from get_processor_dict, each sub-processor from
        # its own Auto class (which reads the nested processor_config.json as well as the authors' plain
        # preprocessor_config.json), then our own __init__. ProcessorMixin's private sub-processor loader changed
        # in transformers 5.25 (see tests/test_transformers_compat.py).
        processor_dict, _ = cls.get_processor_dict(pretrained_model_name_or_path, **hub_kwargs)
        plain_layout = "backbone_type" not in processor_dict  # not saved by UniMEV2Processor: the authors' layout
        if backbone_type is None:
            backbone_type = processor_dict.get("backbone_type") or _read_backbone_type(
                pretrained_model_name_or_path, **hub_kwargs
            )
        if image_resize is not None:
            processor_dict["image_resize"] = image_resize
        elif plain_layout and backbone_type in QWEN3_VL_BACKBONES:
            # The authors released no Qwen3-VL model: a plain Qwen3-VL folder is the base model, at its own sizes.
            processor_dict["image_resize"] = "native"
        elif plain_layout:
            processor_dict["image_resize"] = plain_checkpoint_image_resize or plain_checkpoint_image_rule(
                pretrained_model_name_or_path)
        if backbone_type is None:
            raise ValueError(
                f"Cannot tell the backbone family of {os.fspath(pretrained_model_name_or_path)!r}: neither "
                "processor_config.json nor config.json names one. Pass backbone_type= (one of "
                f"{', '.join(SUPPORTED_BACKBONES)})."
            )
        processor_dict["backbone_type"] = check_backbone_type(backbone_type)
        for name, value in _saved_video_budget(pretrained_model_name_or_path, processor_dict, hub_kwargs).items():
            if processor_dict.get(name) is None:
                processor_dict[name] = value
        # backbone_type and the other UniME-V2 settings (popped above) must not reach the sub-processor loaders: a
        # tokenizer keeps unknown keyword arguments in its saved config.
        loader_kwargs = kwargs
        if "image_processor" not in settings_given:
            settings_given["image_processor"] = AutoImageProcessor.from_pretrained(
                pretrained_model_name_or_path, **loader_kwargs
            )
        if "tokenizer" not in settings_given:
            settings_given["tokenizer"] = AutoTokenizer.from_pretrained(pretrained_model_name_or_path, **loader_kwargs)
        saved_settings = {
            key: value for key, value in processor_dict.items()
            if key in init_parameters and key not in ("self", "kwargs", "image_processor", "tokenizer")
        }
        return cls(**{**saved_settings, **settings_given})

    def format_prompt(self, text: str | None, has_image: bool, instruction: str | None = None, row: int = 0,
                      has_video: bool = False) -> str:
        """The prompt string of one row, before image- and video-token expansion (see the class docstring). A video
        goes where an image would, as ``<|video_pad|>`` (the form VLM2Vec's MMEB-V2 prompts use for Qwen2-VL) or as a
        video item of the chat turn."""
        body = " ".join(part for part in (instruction, text) if part)
        if has_video:
            self._video_family()
            kind, token, present = "video", VIDEO_TOKEN, True
        else:
            if VIDEO_TOKEN in body:
                raise ValueError(f"Row {row}: the text has a video placeholder ({VIDEO_TOKEN}) but no video was "
                                 "given.")
            body = body.replace(PHI3V_IMAGE_TOKEN, self.image_token)
            kind, token, present = "image", self.image_token, has_image
        placeholders = body.count(token)
        if placeholders > 1:
            raise ValueError(
                f"Row {row}: the text has {placeholders} {kind} placeholders; one {kind} per row is supported."
            )
        if has_video and (PHI3V_IMAGE_TOKEN in body or self.image_token in body):
            raise ValueError(f"Row {row}: the text has an image placeholder but the row has a video.")
        if placeholders and not present:
            raise ValueError(
                f"Row {row}: the text has an image placeholder ({token}) but no image was given for it."
            )
        if self.backbone_type in CHAT_PROMPT_BACKBONES:
            body = body.replace(token + "\n", "").replace(token, "").strip()
            content = ([{"type": kind}] if present else []) + [{"type": "text", "text": body}]
            conversation = [{"role": "user", "content": content}]
            return self._backbone_processor.apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=True
            )
        if present and not placeholders:
            body = f"{token} {body}" if body else token
        return body

    def __call__(
        self,
        texts: str | Sequence[str | None] | None = None,
        images: ImageInput | Sequence[ImageInput] | None = None,
        instruction: str | None = None,
        image_root: str | os.PathLike | None = None,
        return_tensors: str = "pt",
        row_ids: Sequence[int] | None = None,
        image_resize: str | None = None,
        videos: Sequence[VideoInput] | None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """Build one left-padded batch.

        Args:
            texts: one text or a list (None for an image-only row).
            images: one image or a list (PIL image, path, ``datasets`` image dict, or None for a text-only row).
            videos: a list with one video per row or None (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): a video file, a folder
                of frame images, or a list of frames; sampled under the processor's ``video_*`` settings
                (`load_video`). A row has at most one image or one video.
            instruction: prepended to every row's text (e.g. ``"Find an image caption describing the given image."``).
            image_root: folder that relative image paths are resolved against.
            row_ids: the caller's numbers for these rows, used in error messages (default 0, 1, ...).
            image_resize: this call's image rule instead of ``self.image_resize`` (a training collator resizes
                under the training rule itself and passes ``"native"``).

        Returns:
            A `BatchFeature` with every tensor the backbone needs (including ``mm_token_type_ids`` for Qwen).
        """
        if "text" in kwargs and texts is None:
            texts = kwargs.pop("text")
        check_instruction(instruction)
        videos = align_videos(videos)
        texts, images = align_rows(texts, images, row_ids, videos=videos)
        row_ids = list(row_ids) if row_ids is not None else list(range(len(texts)))
        videos = videos if videos is not None else [None] * len(texts)
        image_resize = self.image_resize if image_resize is None else image_resize
        pil_images = [load_image(image, row, image_root, image_resize) for row, image in zip(row_ids, images)]
        clips = [self.load_video(video, row, image_root) if video is not None else None
                 for row, video in zip(row_ids, videos)]
        prompts = [
            self.format_prompt(text, image is not None, instruction, row, has_video=clip is not None)
            for row, text, image, clip in zip(row_ids, texts, pil_images, clips)
        ]
        present_images = [image for image in pil_images if image is not None]
        if any(clip is not None for clip in clips):
            if return_tensors != "pt":
                raise ValueError("Video rows are built as torch tensors: use return_tensors='pt'.")
            return self._batch_with_videos(prompts, present_images, clips, **kwargs)
        return self._backbone_processor(
            text=prompts,
            images=present_images or None,
            padding=True,
            padding_side="left",
            return_tensors=return_tensors,
            **kwargs,
        )

    def _batch_with_videos(self, prompts: list[str], images: list[Image.Image], clips: list[VideoFrames | None],
                           **kwargs: Any) -> BatchFeature:
        """A batch with video rows, built as the backbone processor builds one: the stock processors need a video
        processor (torchvision) for videos, and refuse pre-expanded video tokens. Images go through the image
        processor and are expanded to ``t*h*w / merge**2`` image tokens, videos through `patchify_video` and
        `video_placeholder_text`; the tokenizer tokenizes and left-pads, and ``mm_token_type_ids`` marks image (1) and
        video (2) tokens. Checked against the backbone processor on batches without videos
        (tests/test_video_rows.py)."""
        settings, family = self.video_settings, self._video_family()
        merge = settings.merge_size
        features: dict[str, torch.Tensor] = {}
        prompts = list(prompts)
        if images:
            image_features = self.image_processor(images=images, return_tensors="pt")
            features.update(image_features)
            counts = iter((image_features["image_grid_thw"].prod(-1) // merge**2).tolist())
            prompts = [self._expand_image_tokens(prompt, counts) for prompt in prompts]
        pixel_values, grids, seconds = [], [], []
        for index, clip in enumerate(clips):
            if clip is None:
                continue
            patches = patchify_video(clip, settings)
            replacement = video_placeholder_text(
                patches["video_grid_thw"][0], family, merge, frame_indices=clip.frame_indices, fps=clip.fps,
                temporal_patch_size=settings.temporal_patch_size)
            prompts[index] = expand_video_placeholders(prompts[index], [replacement], family)
            pixel_values.append(patches["pixel_values_videos"])
            grids.append(patches["video_grid_thw"])
            seconds.append(second_per_grid_ts(len(clip), settings.temporal_patch_size, clip.fps, clip.total_frames))
        text = self.tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt", **kwargs)
        input_ids = text["input_ids"]
        video_id = self.tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)
        image_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        mm_token_type_ids = (input_ids == image_id).long() + 2 * (input_ids == video_id).long()
        batch = {"input_ids": input_ids, "attention_mask": text["attention_mask"],
                 "mm_token_type_ids": mm_token_type_ids, **features,
                 "pixel_values_videos": torch.cat(pixel_values), "video_grid_thw": torch.cat(grids)}
        if self.backbone_type == "qwen2_5_vl":
            batch["second_per_grid_ts"] = torch.tensor(seconds)
        return BatchFeature(batch)

    def _expand_image_tokens(self, prompt: str, counts: Iterable[int]) -> str:
        pieces = prompt.split(self.image_token)
        expanded = [pieces[0]]
        for piece in pieces[1:]:
            expanded += [self.image_token * next(counts), piece]
        return "".join(expanded)

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> str:
        return self.tokenizer.decode(*args, **kwargs)


__all__ = [
    "IMAGE_RESIZE_PRESETS",
    "align_rows",
    "align_videos",
    "check_instruction",
    "drop_orphan_placeholder",
    "plain_checkpoint_image_rule",
    "missing_image_rows",
    "resolve_image_path",
    "UniMEV2Processor",
    "canonical_image_resize",
    "resize_image",
    "resized_size",
    "Qwen2VLImageTextProcessor",
    "Qwen2_5_VLImageTextProcessor",
    "Qwen3VLImageTextProcessor",
    "LlavaOnevisionImageTextProcessor",
    "load_image",
]
