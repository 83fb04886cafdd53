"""Configuration of UniME-V2 embedding models.

This file travels with every checkpoint (``auto_map``): it imports only ``transformers``.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PretrainedConfig

SUPPORTED_BACKBONES = ("qwen2_vl", "qwen2_5_vl", "llava_onevision")
SUPPORTED_POOLING = ("last",)


def check_backbone_type(model_type: str | None) -> str:
    """Return ``model_type`` if it is a supported backbone family, else raise a ValueError that says what to do."""
    if model_type not in SUPPORTED_BACKBONES:
        raise ValueError(
            f"Unsupported backbone model_type {model_type!r}. UniME-V2 supports {', '.join(SUPPORTED_BACKBONES)}: "
            "pass a Qwen2-VL, Qwen2.5-VL or LLaVA-OneVision config (or a checkpoint folder of one)."
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
            ``qwen2_vl``, ``qwen2_5_vl``, ``llava_onevision``).
        pooling: how the sequence is reduced to one vector; ``"last"`` takes the final hidden state of the last
            non-padding token (the authors' recipe).
        normalize: L2-normalise the embeddings.
        matryoshka_dim: default truncation of the embedding (re-normalised after truncation); ``None`` keeps all
            dimensions.

    Example:
        >>> from transformers import Qwen2VLConfig
        >>> config = UniMEV2Config(backbone_config=Qwen2VLConfig().to_dict())
        >>> config.backbone_type
        'qwen2_vl'
    """

    model_type = "unime_v2"
    sub_configs = {"backbone_config": AutoConfig}

    def __init__(
        self,
        backbone_config: PretrainedConfig | dict[str, Any] | None = None,
        pooling: str = "last",
        normalize: bool = True,
        matryoshka_dim: int | None = None,
        **kwargs: Any,
    ) -> None:
        backbone_config = backbone_config_from(backbone_config)
        if pooling not in SUPPORTED_POOLING:
            raise ValueError(f"pooling={pooling!r} is not supported; use one of {SUPPORTED_POOLING}.")
        if matryoshka_dim is not None and matryoshka_dim <= 0:
            raise ValueError(f"matryoshka_dim must be a positive integer or None, got {matryoshka_dim}.")
        self.backbone_config = backbone_config
        self.pooling = pooling
        self.normalize = normalize
        self.matryoshka_dim = matryoshka_dim
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
        max_listwise_candidates: int = 99,
        **kwargs: Any,
    ) -> None:
        backbone_config = backbone_config_from(backbone_config)
        if not 1 <= max_listwise_candidates <= 99:
            raise ValueError("max_listwise_candidates must be between 1 and 99 (indices of at most two digits).")
        self.backbone_config = backbone_config
        self.max_listwise_candidates = max_listwise_candidates
        if backbone_config is not None:
            kwargs.setdefault("tie_word_embeddings", bool(getattr(backbone_config, "tie_word_embeddings", False)))
        super().__init__(**kwargs)


__all__ = ["UniMEV2Config", "UniMEV2RerankerConfig", "SUPPORTED_BACKBONES", "check_backbone_type", "backbone_config_from"]
