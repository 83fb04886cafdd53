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


class UniMEV2Config(PretrainedConfig):
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
        if isinstance(backbone_config, dict):
            backbone_config = dict(backbone_config)
            backbone_type = check_backbone_type(backbone_config.pop("model_type", None))
            backbone_config = AutoConfig.for_model(backbone_type, **backbone_config)
        elif backbone_config is not None:
            check_backbone_type(backbone_config.model_type)
        if pooling not in SUPPORTED_POOLING:
            raise ValueError(f"pooling={pooling!r} is not supported; use one of {SUPPORTED_POOLING}.")
        if matryoshka_dim is not None and matryoshka_dim <= 0:
            raise ValueError(f"matryoshka_dim must be a positive integer or None, got {matryoshka_dim}.")
        self.backbone_config = backbone_config
        self.pooling = pooling
        self.normalize = normalize
        self.matryoshka_dim = matryoshka_dim
        super().__init__(**kwargs)

    @property
    def backbone_type(self) -> str | None:
        return None if self.backbone_config is None else self.backbone_config.model_type

    @property
    def hidden_size(self) -> int:
        return self.backbone_config.get_text_config().hidden_size


__all__ = ["UniMEV2Config", "SUPPORTED_BACKBONES", "check_backbone_type"]
