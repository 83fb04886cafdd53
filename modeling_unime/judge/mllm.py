"""`MLLMJudge`: an image-text-to-text model as the judge of hard-negative mining (P(Yes) against P(No))."""

from __future__ import annotations

import os
from typing import Any

import torch

from ..scoring_unime import MultimodalScorer


class MLLMJudge(MultimodalScorer):
    """Scores (query, candidate) pairs with an image-text-to-text model as P(Yes) against P(No).

    Args:
        model: a ``*ForConditionalGeneration`` model (Qwen2.5-VL by default in the paper; Qwen2-VL and
            LLaVA-OneVision work too).
        processor: its processor (text + images, with a chat template).
        official_compat: reproduce the released labels by applying the repetition penalty (1.05) to the two logits.
        batch_size: pairs (plain path) or candidates (shared path) per forward pass.
        prefix_sharing: encode each query's prefix once and reuse its key/value cache for all its candidates.
        image_root: folder that relative image paths are resolved against.

    Example:
        >>> from modeling_unime.tiny import build_tiny_judge
        >>> judge = MLLMJudge(*build_tiny_judge())
        >>> scores = judge.score("What colour is the car?", None, [("red", None), ("blue", None)])
        >>> scores.shape, bool(((scores > 0) & (scores < 1)).all())
        (torch.Size([2]), True)
    """

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        dtype: str | torch.dtype | None = "auto",
        device: torch.device | str | None = None,
        attn_implementation: str | None = "auto",
        **judge_kwargs: Any,
    ) -> "MLLMJudge":
        """Load a judge from a folder or Hub repo id (e.g. ``Qwen/Qwen2.5-VL-7B-Instruct``), ready on its device.

        Args:
            dtype: ``"auto"`` (bfloat16 on an accelerator, float32 on CPU: `modeling_unime.placement`), a name
                (``"float32"``, ``"bfloat16"``, ``"float16"``) or a ``torch.dtype``.
            device: where the judge runs; default: this process's device under ``accelerate launch``
                (``PartialState().device``, e.g. ``cuda:3``), ``cpu`` without an accelerator. The weights are read
                straight onto it.
            attn_implementation: ``"auto"`` (flash_attention_2 when installed on a CUDA GPU in half precision, else
                sdpa), ``"sdpa"``, ``"eager"`` or ``"flash_attention_2"`` (a clear error where it cannot run).
            **judge_kwargs: constructor arguments (``official_compat=``, ``batch_size=``...).

        Qwen2-VL, Qwen2.5-VL and LLaVA-OneVision processors are built without torchvision; other models use their
        ``AutoProcessor``.
        A ``tiny:<family>`` spec builds a tiny random judge (`modeling_unime.model_specs.load_model_spec`).
        """
        from ..model_specs import load_model_spec
        from ..placement import placement

        where = placement(dtype, attn_implementation, device)
        model, processor = load_model_spec(os.fspath(pretrained_model_name_or_path), "judge", where)
        return cls(model, processor, **judge_kwargs)


__all__ = ["MLLMJudge"]
