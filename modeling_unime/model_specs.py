"""Model specs of recipes and evaluation: a folder or Hub repo id, or ``tiny:<family>`` (a tiny random model built in
memory, for demos, smoke tests and CI). One resolver for every recipe, so a spec means the same thing everywhere."""

from __future__ import annotations

from typing import Any

import torch

from .configuration_unime import SUPPORTED_BACKBONES
from .placement import Placement, place, pretrained_kwargs

__all__ = ["MODEL_KINDS", "TINY_PREFIX", "load_model_spec", "tiny_family"]

TINY_PREFIX = "tiny:"
MODEL_KINDS = ("embedder", "reranker", "judge")


def tiny_family(spec: str) -> str | None:
    """The backbone family of a ``tiny:<family>`` spec (checked), None for a folder or repo id.

    Example:
        >>> tiny_family("tiny:qwen2_vl"), tiny_family("TianchengGu/UniME-V2-Qwen2VL-2B")
        ('qwen2_vl', None)
    """
    if not spec.startswith(TINY_PREFIX):
        return None
    family = spec[len(TINY_PREFIX):]
    if family not in SUPPORTED_BACKBONES:
        raise ValueError(f"{spec!r}: the family of a tiny: spec must be one of {list(SUPPORTED_BACKBONES)}.")
    return family


def _build_tiny(kind: str, family: str) -> tuple[Any, Any]:
    # The tiny builders live with the test helpers; only tiny: specs ever reach them.
    from . import tiny

    builder = {"embedder": tiny.build_tiny_unime, "reranker": tiny.build_tiny_reranker,
               "judge": tiny.build_tiny_judge}[kind]
    return builder(family)


def _load_pretrained(kind: str, spec: str, kwargs: dict[str, Any]) -> tuple[Any, Any]:
    if kind == "judge":
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from .processing_unime import BACKBONE_PROCESSOR_CLASSES

        model = AutoModelForImageTextToText.from_pretrained(spec, **kwargs)
        processor_class = BACKBONE_PROCESSOR_CLASSES.get(model.config.model_type, AutoProcessor)
        return model, processor_class.from_pretrained(spec)
    from .modeling_unime import UniMEV2Model, UniMEV2Reranker

    model = (UniMEV2Reranker if kind == "reranker" else UniMEV2Model).from_pretrained(spec, **kwargs)
    return model, model.processor


def load_model_spec(
    spec: str, kind: str, where: Placement, device_map: bool = True, tiny_device: torch.device | str | None = None
) -> tuple[Any, Any]:
    """``(model, processor)`` for ``spec``: an embedder (`UniMEV2Model`), a reranker (`UniMEV2Reranker`) or a judge
    (an image-text-to-text model), with the dtype and attention kernel of ``where``.

    A folder or repo id is read straight onto ``where["device"]`` (``device_map=False`` leaves the weights on the CPU
    for a Trainer to place); a ``tiny:<family>`` model is built and moved to ``tiny_device`` (default
    ``where["device"]``). A UniME-V2 model gets its processor attached (``model.processor``).

    Example:
        >>> from modeling_unime.placement import placement
        >>> model, processor = load_model_spec("tiny:qwen2_vl", "embedder", placement("float32", "sdpa", "cpu"))
        >>> type(model).__name__, model.processor is processor
        ('UniMEV2Model', True)
    """
    if kind not in MODEL_KINDS:
        raise ValueError(f"kind={kind!r}: use one of {MODEL_KINDS}.")
    family = tiny_family(spec)
    if family is None:
        return _load_pretrained(kind, spec, pretrained_kwargs(where, device_map=device_map))
    model, processor = _build_tiny(kind, family)
    if kind != "judge":
        model.processor = processor
    device = where["device"] if tiny_device is None else tiny_device
    return place(model, device, where["dtype"], where["attn_implementation"]), processor
