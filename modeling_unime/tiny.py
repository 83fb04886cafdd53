"""Tiny worlds built offline: UniME-V2 backbones (random weights, a tokenizer trained on the fly, the matching
processor), coloured-shape data, and the oracle judge that knows their ground truth.

The ``tiny:<family>`` model specs of every recipe, the demos, benchmarks and tests use these; no download is
involved. Three families are supported: ``qwen2_vl``,
``qwen2_5_vl`` and ``llava_onevision``. A tiny backbone can be kept in memory, saved in the authors' layout (a plain
``*ForConditionalGeneration`` checkpoint with the old key names such as ``model.layers.*`` and ``visual.*``), or
wrapped as a UniME-V2 model.

Example:
    >>> from modeling_unime.tiny import build_tiny_unime
    >>> model, processor = build_tiny_unime("qwen2_vl")
    >>> model.encode(texts=["a red car"], processor=processor).shape
    torch.Size([1, 64])
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
)
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from .configuration_unime import QWEN3_VL_BACKBONES, UniMEV2Config, check_backbone_type
from .processing_unime import BACKBONE_PROCESSOR_CLASSES, UniMEV2Processor

REAL_QWEN2_VOCAB_SIZE = 151_936

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
LLAVA_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]

# The pre-tokenizer regex of the Qwen2 tokenizer family.
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The items of a Qwen chat turn: images and videos wrapped in vision tokens (numbered with add_vision_id), texts.
_QWEN_CONTENT_ITEMS = (
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}"
)
_QWEN_COUNTERS = "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"

# The public Qwen2-VL chat template (Qwen2.5-VL uses the same one).
QWEN2_VL_CHAT_TEMPLATE = (
    _QWEN_COUNTERS
    + "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}" + _QWEN_CONTENT_ITEMS + "<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# The structure of the Qwen3-VL-Instruct chat template for the messages UniME-V2 renders (text, image and video items;
# its tool and reasoning branches are left out): unlike Qwen2-VL's, it adds no default system turn.
QWEN3_VL_CHAT_TEMPLATE = (
    _QWEN_COUNTERS
    + "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}" + _QWEN_CONTENT_ITEMS + "{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# The llava-hf LLaVA-OneVision chat template: images first, then each text on a new line.
LLAVA_ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\n' + content['text'] }}"
    "{% endfor %}{{ '<|im_end|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_COLOURS = ["red", "green", "blue", "yellow", "black", "white", "gray", "teal", "brown", "orange"]
_SHAPES = ["circle", "square", "triangle", "rectangle", "star", "car", "dog", "cat", "man", "woman", "street"]
_PHRASES = [
    "Find an image caption describing the given image.",
    "Represent the given image with the following question:",
    "Represent the given text for retrieval.",
    "I will provide you with a query and a candidate. Please evaluate whether the candidate meets the "
    "requirements of the query. If it does, respond with 'Yes'; if it doesn't, respond with 'No'.",
    "Query: Candidate: Candidates: Ans: (1) (2) (3) (4) (5) (6) (7) (8) (9) (10)",
    "What is the colour of the shape? What shape is in the image? Is there a red circle? Yes No",
    "A man is crossing the street with a red car parked nearby.",
    "You are a helpful assistant. system user assistant",
]


def _training_corpus(seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = list(_PHRASES) * 20
    for _ in range(600):
        colour, shape = rng.choice(_COLOURS), rng.choice(_SHAPES)
        lines.append(
            rng.choice(
                [
                    f"a {colour} {shape}",
                    f"A photo of a {colour} {shape} next to a {rng.choice(_COLOURS)} {rng.choice(_SHAPES)}.",
                    f"What colour is the {shape}? {colour}",
                    f"Is the {shape} {colour}? {rng.choice(['Yes', 'No'])}",
                    f"There are {rng.randint(0, 99)} {shape}s in the image.",
                ]
            )
        )
    return lines


@lru_cache(maxsize=4)
def _trained_tokenizer_json(special_tokens: tuple[str, ...], vocab_size: int) -> str:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_training_corpus(), trainer)
    return tokenizer.to_str()


def build_tiny_tokenizer(backbone_type: str = "qwen2_vl", vocab_size: int = 800) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in about a second, with the family's special tokens and chat template."""
    from tokenizers import Tokenizer

    check_backbone_type(backbone_type)
    special = LLAVA_SPECIAL_TOKENS if backbone_type == "llava_onevision" else QWEN_SPECIAL_TOKENS
    backend = Tokenizer.from_str(_trained_tokenizer_json(tuple(special), vocab_size))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>" if backbone_type == "llava_onevision" else "<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=special[1:],
        padding_side="left",
    )
    tokenizer.chat_template = (
        LLAVA_ONEVISION_CHAT_TEMPLATE if backbone_type == "llava_onevision"
        else QWEN3_VL_CHAT_TEMPLATE if backbone_type in QWEN3_VL_BACKBONES
        else QWEN2_VL_CHAT_TEMPLATE
    )
    return tokenizer


def _mrope_section(head_dim: int) -> list[int]:
    half = head_dim // 2
    temporal = half // 4
    height = (half - temporal) // 2
    return [temporal, height, half - temporal - height]


def build_tiny_backbone_config(
    backbone_type: str = "qwen2_vl",
    tokenizer: PreTrainedTokenizerFast | None = None,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    vocab_size: int | None = None,
    real_vocab: bool = False,
) -> Any:
    """The config of a tiny backbone of the given family (``real_vocab=True``: the real 151,936-token vocabulary)."""
    check_backbone_type(backbone_type)
    tokenizer = tokenizer or build_tiny_tokenizer(backbone_type)
    if vocab_size is None:
        vocab_size = REAL_QWEN2_VOCAB_SIZE if real_vocab else len(tokenizer)
    head_dim = hidden_size // num_attention_heads
    text_config = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=max(1, num_attention_heads // 2),
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
    )
    if backbone_type == "llava_onevision":
        from transformers import Qwen2Config, SiglipVisionConfig

        vision = SiglipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=56,
            patch_size=14,
            vision_use_head=False,
        )
        return LlavaOnevisionConfig(
            vision_config=vision,
            text_config=Qwen2Config(**text_config),
            image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
            video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
            vision_feature_select_strategy="full",
            vision_feature_layer=-1,
            image_grid_pinpoints=[[56, 56], [56, 112], [112, 56], [112, 112]],
            vision_aspect_ratio="anyres_max_9",
            tie_word_embeddings=False,
        )
    text_config["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": 1_000_000.0,
        "mrope_section": _mrope_section(head_dim),
    }
    token_ids = dict(
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    )
    if backbone_type in QWEN3_VL_BACKBONES:
        # Qwen3-VL: 16-pixel patches, a learned position table of 8x8 (interpolated to each grid) and deepstack
        # features from both vision blocks, added into the first two decoder layers.
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden_size,
                      patch_size=16, num_position_embeddings=64, deepstack_visual_indexes=[0, 1])
        text_config.update(head_dim=head_dim, rope_parameters=dict(text_config["rope_parameters"],
                                                                   mrope_interleaved=True))
        if backbone_type == "qwen3_vl_moe":
            text_config.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=hidden_size,
                               decoder_sparse_step=1)
            return Qwen3VLMoeConfig(text_config=text_config, vision_config=vision, tie_word_embeddings=False,
                                    **token_ids)
        return Qwen3VLConfig(text_config=text_config, vision_config=vision, tie_word_embeddings=False, **token_ids)
    if backbone_type == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=hidden_size, num_heads=2, mlp_ratio=2)
        return Qwen2VLConfig(text_config=text_config, vision_config=vision, tie_word_embeddings=False, **token_ids)
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=hidden_size,
        window_size=56,
        fullatt_block_indexes=[1],
    )
    return Qwen2_5_VLConfig(text_config=text_config, vision_config=vision, tie_word_embeddings=False, **token_ids)


def build_tiny_processor(
    backbone_type: str = "qwen2_vl",
    tokenizer: PreTrainedTokenizerFast | None = None,
    max_pixels: int = 64 * 28 * 28,
) -> UniMEV2Processor:
    """A UniMEV2Processor for a tiny backbone (images of at most ``max_pixels`` pixels for the Qwen families)."""
    check_backbone_type(backbone_type)
    tokenizer = tokenizer or build_tiny_tokenizer(backbone_type)
    if backbone_type == "llava_onevision":
        image_processor = LlavaOnevisionImageProcessorPil(
            size={"height": 56, "width": 56},
            image_grid_pinpoints=[[56, 56], [56, 112], [112, 56], [112, 112]],
            image_mean=[0.5] * 3,
            image_std=[0.5] * 3,
        )
        return UniMEV2Processor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            backbone_type=backbone_type,
            num_image_tokens=(56 // 14) ** 2,
            vision_feature_select_strategy="full",
            vision_aspect_ratio="anyres_max_9",
        )
    if backbone_type in QWEN3_VL_BACKBONES:
        # Qwen3-VL's own settings: 16-pixel patches merged 2x2 (sides multiples of 32), mean and std 0.5.
        image_processor = Qwen2VLImageProcessorPil(
            patch_size=16, merge_size=2, temporal_patch_size=2, min_pixels=4 * 32 * 32, max_pixels=max_pixels,
            image_mean=[0.5] * 3, image_std=[0.5] * 3,
        )
    else:
        image_processor = Qwen2VLImageProcessorPil(min_pixels=4 * 28 * 28, max_pixels=max_pixels)
    return UniMEV2Processor(image_processor=image_processor, tokenizer=tokenizer, backbone_type=backbone_type)


_CAUSAL_LM_CLASSES = {
    "qwen2_vl": Qwen2VLForConditionalGeneration,
    "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
    "llava_onevision": LlavaOnevisionForConditionalGeneration,
    "qwen3_vl": Qwen3VLForConditionalGeneration,
    "qwen3_vl_moe": Qwen3VLMoeForConditionalGeneration,
}


def build_tiny_causal_lm(
    backbone_type: str = "qwen2_vl",
    seed: int = 0,
    tokenizer: PreTrainedTokenizerFast | None = None,
    **config_kwargs: Any,
) -> PreTrainedModel:
    """A tiny ``*ForConditionalGeneration`` backbone with random weights (the authors' model class)."""
    config = build_tiny_backbone_config(backbone_type, tokenizer=tokenizer, **config_kwargs)
    torch.manual_seed(seed)
    return _CAUSAL_LM_CLASSES[backbone_type](config).eval()


def build_tiny_unime(
    backbone_type: str = "qwen2_vl", seed: int = 0, max_pixels: int = 64 * 28 * 28, **config_kwargs: Any
) -> tuple[Any, UniMEV2Processor]:
    """A tiny UniMEV2Model with random weights and its processor."""
    from .modeling_unime import UniMEV2Model

    tokenizer = build_tiny_tokenizer(backbone_type)
    config = UniMEV2Config(backbone_config=build_tiny_backbone_config(backbone_type, tokenizer, **config_kwargs))
    torch.manual_seed(seed)
    model = UniMEV2Model(config).eval()
    return model, build_tiny_processor(backbone_type, tokenizer, max_pixels=max_pixels)


def build_tiny_judge(
    backbone_type: str = "qwen2_5_vl",
    seed: int = 0,
    sharpen: float = 4.0,
    max_pixels: int = 64 * 28 * 28,
    **config_kwargs: Any,
) -> tuple[PreTrainedModel, Any]:
    """A tiny image-text-to-text judge (Qwen2.5-VL by default) and its processor, for ``MLLMJudge``.

    ``sharpen`` scales the query/key projections: random attention is almost uniform, which would hide position
    and masking bugs from any comparison of two scoring paths.
    """
    tokenizer = build_tiny_tokenizer(backbone_type)
    model = build_tiny_causal_lm(backbone_type, seed=seed, tokenizer=tokenizer, **config_kwargs)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                parameter.mul_(sharpen)
    return model, build_tiny_processor(backbone_type, tokenizer, max_pixels=max_pixels).backbone_processor


def build_tiny_reranker(
    backbone_type: str = "qwen2_5_vl", seed: int = 0, sharpen: float = 4.0, **config_kwargs: Any
) -> tuple[Any, UniMEV2Processor]:
    """A tiny UniMEV2Reranker (random weights, query/key projections sharpened as in `build_tiny_judge`) and its
    processor."""
    from .configuration_unime import UniMEV2RerankerConfig
    from .modeling_unime import UniMEV2Reranker

    tokenizer = build_tiny_tokenizer(backbone_type)
    config = UniMEV2RerankerConfig(
        backbone_config=build_tiny_backbone_config(backbone_type, tokenizer, **config_kwargs)
    )
    torch.manual_seed(seed)
    model = UniMEV2Reranker(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                parameter.mul_(sharpen)
    return model, build_tiny_processor(backbone_type, tokenizer)


SYNTHETIC_COLOURS = ("red", "green", "blue", "yellow", "black", "orange")
SYNTHETIC_SHAPES = ("circle", "square", "triangle")


def draw_shape(colour: str, shape: str, size: int = 112):
    """A white image with one coloured circle, square or triangle in its middle."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), "white")
    canvas = ImageDraw.Draw(image)
    box = (size // 4, size // 4, 3 * size // 4, 3 * size // 4)
    if shape == "circle":
        canvas.ellipse(box, fill=colour)
    elif shape == "square":
        canvas.rectangle(box, fill=colour)
    else:
        canvas.polygon(
            [(size // 2, size // 4), (size // 4, 3 * size // 4), (3 * size // 4, 3 * size // 4)], fill=colour
        )
    return image


def synthetic_pairs(count: int, image_root: str | os.PathLike, seed: int = 0, write_images: bool = True):
    """A small (query, positive) dataset of coloured shapes, images written under ``image_root/shapes/``.

    Even rows ask the colour of the shape in an image (image -> text); odd rows describe a shape and the positive is
    its image (text -> image). Paths in the rows are relative to ``image_root``.
    """
    from datasets import Dataset

    rng = random.Random(seed)
    folder = Path(image_root) / "shapes"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(count):
        colour, shape = rng.choice(SYNTHETIC_COLOURS), rng.choice(SYNTHETIC_SHAPES)
        relative = f"shapes/{colour}-{shape}.png"
        if write_images and not (Path(image_root) / relative).exists():
            draw_shape(colour, shape).save(Path(image_root) / relative)
        if index % 2 == 0:
            rows.append(dict(query_text="<|image_1|>\nWhat colour is the shape?", query_image=relative,
                             pos_text=colour, pos_image=None, task="synthetic-colour-vqa"))
        else:
            rows.append(dict(query_text=f"Find an image of a {colour} {shape}.", query_image=None, pos_text="",
                             pos_image=relative, task="synthetic-caption-to-image"))
    return Dataset.from_list(rows)


ORACLE_MATCH, ORACLE_PARTIAL, ORACLE_MISS = 0.95, 0.5, 0.05
"""The oracle's graded credit: every attribute matches, one attribute in common, none."""


def graded_credit(truth: dict[str, str], offered: dict[str, str]) -> float:
    """The oracle's score of what a candidate offers (``{"colour": ..., "shape": ...}``, either may be missing)
    against what the query asks: `ORACLE_MATCH` when it names exactly the asked attributes, all equal;
    `ORACLE_PARTIAL` when one is shared; `ORACLE_MISS` otherwise."""
    shared = sum(offered.get(key) == value for key, value in truth.items() if key in offered)
    if truth and shared == len(truth) and offered.keys() == truth.keys():
        return ORACLE_MATCH
    return ORACLE_PARTIAL if shared else ORACLE_MISS


def oracle_score(query: tuple[str, str], candidate: tuple[str, str]) -> float:
    """Ground-truth score of two (colour, shape) pairs: match 0.95, same colour or same shape 0.5, neither 0.05."""
    return graded_credit(dict(zip(("colour", "shape"), query)), dict(zip(("colour", "shape"), candidate)))


def question_kind(question: str) -> str:
    """``colour`` or ``shape`` for the two "what" question families of the coloured-shape worlds, else ``yes/no``
    (an image placeholder and capitals are ignored).

    >>> question_kind("what color is the shape?"), question_kind("<|image_1|>\\nWhat is the blue shape?")
    ('colour', 'shape')
    """
    question = question.replace("<|image_1|>", " ").strip().lower()
    if question.startswith("what"):
        return "shape" if ("what shape" in question or re.match(r"what is the \w+ shape\?", question)) else "colour"
    return "yes/no"


class OracleJudge:
    """The ground-truth judge of the coloured-shape demo worlds (the mining recipe's ``synthetic:N`` data and the
    main job's easy-vqa): a stand-in for a strong MLLM judge that reads the colour and shape each image and each
    text names, and scores with `graded_credit`.

    - An image's attributes come from ``attributes_by_path`` (path -> ``{"colour", "shape"}``) when given, else from
      its file name, ``<colour>-<shape>.png``; a text's are the vocabulary words it contains.
    - A candidate of the wrong kind for the query (an image offered as an answer or a caption, a text offered as an
      image) is a miss.
    - An image query asking "what colour / what shape" is answered by that attribute alone; any other image query
      (an instruction such as "Find an image caption describing the given image.") wants a caption naming the
      image's attributes; a text query wants an image with the attributes it names.

    Example:
        >>> judge = OracleJudge(SYNTHETIC_COLOURS, SYNTHETIC_SHAPES)
        >>> judge.score("<|image_1|>\\nWhat colour is the shape?", "shapes/red-circle.png",
        ...             [("red", None), ("blue", None), (None, "shapes/red-square.png")]).tolist()
        [0.949999988079071, 0.05000000074505806, 0.05000000074505806]
        >>> judge.score("Find an image of a red circle.", None,
        ...             [(None, "shapes/red-circle.png"), (None, "shapes/red-square.png"), ("red", None)]).tolist()
        [0.949999988079071, 0.5, 0.05000000074505806]
        >>> easy = OracleJudge(("red", "blue"), ("circle",), {"a.png": {"colour": "red", "shape": "circle"}})
        >>> easy.score("<|image_1|> Find an image caption describing the given image.", "a.png",
        ...            [("a red circle", None), ("a blue circle", None)]).tolist()
        [0.949999988079071, 0.5]
    """

    def __init__(
        self,
        colours: Sequence[str],
        shapes: Sequence[str],
        attributes_by_path: dict[str, dict[str, str]] | None = None,
    ) -> None:
        self.colours, self.shapes = tuple(colours), tuple(shapes)
        self.attributes_by_path = attributes_by_path

    def image_attributes(self, path: Any) -> dict[str, str]:
        if not isinstance(path, (str, os.PathLike)):  # an image the oracle has no ground truth for (a blank one)
            return {}
        if self.attributes_by_path is not None:
            return dict(self.attributes_by_path.get(os.fspath(path), {}))
        colour, _, shape = Path(path).stem.partition("-")
        return {key: value for key, value in (("colour", colour), ("shape", shape)) if value}

    def text_attributes(self, text: str | None) -> dict[str, str]:
        words = set((text or "").replace(".", " ").replace("?", " ").replace(",", " ").split())
        colour = next((colour for colour in self.colours if colour in words), None)
        shape = next((shape for shape in self.shapes if shape in words), None)
        return {key: value for key, value in (("colour", colour), ("shape", shape)) if value}

    def pair_score(self, query_text: str | None, query_image: str | None,
                   candidate: tuple[str | None, str | None]) -> float:
        """The oracle's score of one candidate ``(text, image)`` for one query."""
        text, image = candidate
        if (image is None) == (query_image is None):
            return ORACLE_MISS
        if query_image is None:
            return graded_credit(self.text_attributes(query_text), self.image_attributes(image))
        truth, offered = self.image_attributes(query_image), self.text_attributes(text)
        kind = question_kind(query_text or "")
        if kind in ("colour", "shape"):
            return ORACLE_MATCH if kind in offered and offered[kind] == truth.get(kind) else ORACLE_MISS
        return graded_credit(truth, offered)

    def score(self, query_text: str | None, query_image: str | None,
              candidates: Sequence[tuple[str | None, str | None]]) -> torch.Tensor:
        return torch.tensor([self.pair_score(query_text, query_image, tuple(candidate)) for candidate in candidates])


def synthetic_judge_dataset(count: int, image_root: str | os.PathLike, num_negatives: int = 8, seed: int = 0):
    """Rows of the judge dataset schema for image -> caption retrieval of coloured shapes, scored by `oracle_score`.

    Negatives are other captions in random order; their scores give graded partial credit, so a model that learns
    colour and shape learns the judge's ranking.
    """
    from datasets import Dataset

    from .data import UNIME_FEATURES

    rng = random.Random(seed)
    combinations = [(colour, shape) for colour in SYNTHETIC_COLOURS for shape in SYNTHETIC_SHAPES]
    (Path(image_root) / "shapes").mkdir(parents=True, exist_ok=True)
    rows = []
    for _ in range(count):
        query = rng.choice(combinations)
        relative = f"shapes/{query[0]}-{query[1]}.png"
        if not (Path(image_root) / relative).exists():
            draw_shape(*query).save(Path(image_root) / relative)
        negatives = rng.sample([pair for pair in combinations if pair != query], num_negatives)
        rows.append(
            dict(
                query_text="<|image_1|>\nFind an image caption describing the given image.",
                query_image=relative,
                pos_text=f"a {query[0]} {query[1]}",
                pos_image=None,
                neg_texts=[f"a {colour} {shape}" for colour, shape in negatives],
                neg_images=[None] * num_negatives,
                judge_scores=[oracle_score(query, query), *[oracle_score(query, pair) for pair in negatives]],
                task="synthetic-image-to-caption",
                source="synthetic_judge_dataset",
            )
        )
    return Dataset.from_list(rows, features=UNIME_FEATURES)


def authors_state_dict(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The state dict of a ``*ForConditionalGeneration`` backbone under the key names of the authors' checkpoints.

    Those checkpoints were written by transformers 4.4x: Qwen2-VL as ``model.layers.*``, ``model.embed_tokens``,
    ``visual.*``, ``lm_head.weight``; LLaVA-OneVision as ``language_model.model.*``, ``language_model.lm_head``,
    ``vision_tower.vision_model.*``, ``multi_modal_projector.*``, ``image_newline``. Qwen3-VL was published (under
    transformers 4.57) with the names the model has today (``model.language_model.*``, ``model.visual.*``), which
    are kept.
    """
    renamed = {}
    for key, tensor in model.state_dict().items():
        if model.config.model_type in QWEN3_VL_BACKBONES:
            pass
        elif model.config.model_type == "llava_onevision":
            key = (
                key.replace("model.language_model.", "language_model.model.", 1)
                .replace("lm_head.", "language_model.lm_head.", 1)
                .replace("model.vision_tower.", "vision_tower.vision_model.", 1)
                .replace("model.multi_modal_projector.", "multi_modal_projector.", 1)
                .replace("model.image_newline", "image_newline", 1)
            )
        else:
            key = key.replace("model.language_model.", "model.", 1).replace("model.visual.", "visual.", 1)
        renamed[key] = tensor.detach().clone().contiguous()
    return renamed


def save_in_authors_layout(
    model: PreTrainedModel, processor: UniMEV2Processor, directory: str | os.PathLike
) -> Path:
    """Write a backbone in the key layout of the authors' release: a plain backbone checkpoint with 4.4x key names,
    and the backbone's own processor, tokenizer and chat template files beside it.

    An approximation written by this stack (transformers 5.x), for quick tests of key mapping; the checkpoints and
    outputs of the authors' real stack (transformers 4.49) are built by tests/fixtures/build_authors_checkpoints.py.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(directory)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(directory)
    save_file(authors_state_dict(model), directory / "model.safetensors", metadata={"format": "pt"})
    backbone_processor = processor.backbone_processor
    BACKBONE_PROCESSOR_CLASSES[processor.backbone_type].save_pretrained(backbone_processor, directory)
    return directory


__all__ = [
    "REAL_QWEN2_VOCAB_SIZE",
    "build_tiny_tokenizer",
    "build_tiny_backbone_config",
    "build_tiny_processor",
    "build_tiny_causal_lm",
    "build_tiny_unime",
    "build_tiny_judge",
    "build_tiny_reranker",
    "draw_shape",
    "synthetic_pairs",
    "synthetic_judge_dataset",
    "ORACLE_MATCH",
    "ORACLE_MISS",
    "ORACLE_PARTIAL",
    "OracleJudge",
    "graded_credit",
    "oracle_score",
    "question_kind",
    "authors_state_dict",
    "save_in_authors_layout",
]
