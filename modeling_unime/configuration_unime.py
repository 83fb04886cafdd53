"""Configuration of UniME-V2 embedding models.

This file travels with every checkpoint (``auto_map``): it imports only ``transformers``.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PretrainedConfig

SUPPORTED_BACKBONES = ("qwen2_vl", "qwen2_5_vl", "llava_onevision", "qwen3_vl", "qwen3_vl_moe")
SUPPORTED_POOLING = ("last",)
# Backbones whose released UniME-V2 checkpoints were made under transformers 4.49's M-RoPE rule (see below).
MROPE_BACKBONES = ("qwen2_vl", "qwen2_5_vl")
# Qwen3-VL (dense and MoE): 16-pixel patches, interleaved M-RoPE with positions from `mm_token_type_ids`, and deepstack
# visual features added into the first decoder layers. No UniME-V2 checkpoint predates it, so it runs under the
# backbone's own position rule.
QWEN3_VL_BACKBONES = ("qwen3_vl", "qwen3_vl_moe")
# Backbones whose embedding prompt is one user turn of the chat template, not the raw text (the Qwen2-VL family).
CHAT_PROMPT_BACKBONES = ("llava_onevision", *QWEN3_VL_BACKBONES)
# How image tokens of a Qwen2-VL / Qwen2.5-VL embedder get their M-RoPE positions:
# - "vision_start_only": as transformers 4.49 (the authors' pinned version, and their own modeling copy) computes them:
#   3-D (t, h, w) positions only for an image whose tokens follow <|vision_start|>; any other image token gets a plain
#   text position. The authors' embedding prompt has no <|vision_start|>, so in their training and evaluation, and in
#   the released checkpoints' numbers, image tokens are positioned like text.
# - "all_images": as transformers 5.x computes them: every image token gets 3-D positions.
IMAGE_POSITION_RULES = ("vision_start_only", "all_images")


HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")
"""``from_pretrained`` keyword arguments that say where files come from, passed on when a loader reads other files of
the same checkpoint (its config, its processor)."""

MAX_LISTWISE_CANDIDATES = 99
"""Listwise reranking numbers the candidates with at most two digits (the authors' prompt, "Ans: (k)")."""


def check_backbone_type(model_type: str | None) -> str:
    """Return ``model_type`` if it is a supported backbone family, else raise a ValueError that says what to do."""
    if model_type not in SUPPORTED_BACKBONES:
        raise ValueError(
            f"Unsupported backbone model_type {model_type!r}. UniME-V2 supports {', '.join(SUPPORTED_BACKBONES)}: "
            "pass a Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision or Qwen3-VL config (or a checkpoint folder of one)."
        )
    return model_type


def backbone_config_from(backbone_config: PretrainedConfig | dict[str, Any] | None) -> PretrainedConfig | None:
    """A backbone config object from a config or its dict; the family must be supported."""
    if isinstance(backbone_config, dict):
        backbone_config = dict(backbone_config)
        backbone_type = check_backbone_type(backbone_config.pop("model_type", None))
        return AutoConfig.for_model(backbone_type, **backbone_config)
    if backbone_config is not None:
        check_backbone_type(backbone_config.model_type)
    return backbone_config


class _BackboneProperties:
    """Read-only views of the nested backbone config, shared by both UniME-V2 configs."""

    @property
    def backbone_type(self) -> str | None:
        return None if self.backbone_config is None else self.backbone_config.model_type

    @property
    def hidden_size(self) -> int:
        return self.backbone_config.get_text_config().hidden_size


class UniMEV2Config(_BackboneProperties, PretrainedConfig):
    """Configuration of a [`UniMEV2Model`]: a multimodal LLM backbone whose last-token hidden state is the embedding.

    Args:
        backbone_config: the backbone's configuration (a config object or its dict, with ``model_type`` one of
            ``qwen2_vl``, ``qwen2_5_vl``, ``llava_onevision``, ``qwen3_vl``, ``qwen3_vl_moe``).
        pooling: how the sequence is reduced to one vector; ``"last"`` takes the final hidden state of the last
            non-padding token (the authors' recipe).
        normalize: L2-normalise the embeddings.
        matryoshka_dim: default truncation of the embedding (re-normalised after truncation); ``None`` keeps all
            dimensions.
        image_position_rule: M-RoPE positions of image tokens (Qwen2-VL / Qwen2.5-VL backbones only; Qwen3-VL always
            runs under its own rule, which gives every image token 3-D positions).
            ``"vision_start_only"`` (default) reproduces transformers 4.49, under which the released checkpoints were
            trained and evaluated: 3-D positions only for an image right after ``<|vision_start|>``, which the
            authors' embedding prompt never has, so image tokens get text positions. ``"all_images"`` gives every
            image token 3-D positions, as transformers 5.x does; embeddings of the released checkpoints then differ
            (by up to 0.28 per dimension, measured).

    Example:
        >>> from transformers import Qwen2VLConfig
        >>> config = UniMEV2Config(backbone_config=Qwen2VLConfig().to_dict())
        >>> config.backbone_type, config.image_position_rule
        ('qwen2_vl', 'vision_start_only')
    """

    model_type = "unime_v2"
    sub_configs = {"backbone_config": AutoConfig}

    def __init__(
        self,
        backbone_config: PretrainedConfig | dict[str, Any] | None = None,
        pooling: str = "last",
        normalize: bool = True,
        matryoshka_dim: int | None = None,
        image_position_rule: str = "vision_start_only",
        **kwargs: Any,
    ) -> None:
        backbone_config = backbone_config_from(backbone_config)
        if image_position_rule not in IMAGE_POSITION_RULES:
            raise ValueError(
                f"image_position_rule={image_position_rule!r}: use one of {IMAGE_POSITION_RULES} (see the docstring)."
            )
        if pooling not in SUPPORTED_POOLING:
            raise ValueError(f"pooling={pooling!r} is not supported; use one of {SUPPORTED_POOLING}.")
        if matryoshka_dim is not None and matryoshka_dim <= 0:
            raise ValueError(f"matryoshka_dim must be a positive integer or None, got {matryoshka_dim}.")
        self.backbone_config = backbone_config
        self.pooling = pooling
        self.normalize = normalize
        self.matryoshka_dim = matryoshka_dim
        self.image_position_rule = image_position_rule
        super().__init__(**kwargs)


class UniMEV2RerankerConfig(_BackboneProperties, PretrainedConfig):
    """Configuration of a [`UniMEV2Reranker`]: an image-text-to-text backbone (Qwen2.5-VL in the paper; Qwen2-VL
    too) with its LM head, scoring pairs by P(Yes) and lists by the probability of each candidate's index.

    Args:
        backbone_config: the backbone's configuration (object or dict with ``model_type``).
        max_listwise_candidates: longest list ``rerank(mode="listwise")`` scores (indices are written with up to two
            digits).

    Example:
        >>> from transformers import Qwen2_5_VLConfig
        >>> UniMEV2RerankerConfig(backbone_config=Qwen2_5_VLConfig().to_dict()).backbone_type
        'qwen2_5_vl'
    """

    model_type = "unime_v2_reranker"
    sub_configs = {"backbone_config": AutoConfig}

    def __init__(
        self,
        backbone_config: PretrainedConfig | dict[str, Any] | None = None,
        max_listwise_candidates: int = MAX_LISTWISE_CANDIDATES,
        **kwargs: Any,
    ) -> None:
        backbone_config = backbone_config_from(backbone_config)
        if not 1 <= max_listwise_candidates <= MAX_LISTWISE_CANDIDATES:
            raise ValueError(
                f"max_listwise_candidates must be between 1 and {MAX_LISTWISE_CANDIDATES} "
                "(indices of at most two digits)."
            )
        self.backbone_config = backbone_config
        self.max_listwise_candidates = max_listwise_candidates
        if backbone_config is not None:
            kwargs.setdefault("tie_word_embeddings", bool(getattr(backbone_config, "tie_word_embeddings", False)))
        super().__init__(**kwargs)


__all__ = [
    "UniMEV2Config", "UniMEV2RerankerConfig", "SUPPORTED_BACKBONES", "IMAGE_POSITION_RULES", "MROPE_BACKBONES",
    "QWEN3_VL_BACKBONES", "CHAT_PROMPT_BACKBONES",
    "check_backbone_type", "backbone_config_from",
]
