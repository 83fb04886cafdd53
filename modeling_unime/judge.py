"""The judge of hard-negative mining: the `Judge` interface, `MLLMJudge`, and the cache key of a judge's scores.

`MLLMJudge` gives soft semantic matching scores s(q, c) = P(Yes) / (P(Yes) + P(No)) (arXiv 2510.13515, "MLLM-as-a-Judge for Hard Negatives Mining",
"MLLM-as-a-Judge"): the judge sees the paper's instruction, the query (image, text) and one candidate (image, text)
in one user turn of its chat template, then the generation prompt; the score is the two-way softmax of the "Yes" and
"No" logits at the answer position, from ONE forward pass. The scoring engine, with prefix sharing, is
`modeling_unime.scoring_unime.MultimodalScorer`, shared with the reranker.

Anything with ``score(query_text, query_image, candidates)`` is a `Judge` to mining: `MLLMJudge`, the server judge
(`modeling_unime.judge_server.ServerJudge`), the scoring engine itself, mining's on-disk `CachedJudge`, or the
ground-truth oracle of the synthetic demo data (``recipes/mine_hard_negatives.py``). `judge_fingerprint` keys their
scores in mining's cache.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from .util.fingerprint import model_fingerprint, processor_settings
from .scoring_unime import (
    JUDGE_INSTRUCTION,
    JudgeStats,
    MultimodalScorer,
    official_repetition_penalty,
    strip_image_placeholders,
)


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
        >>> from modeling_unime.testing import build_tiny_judge
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
        A ``tiny:<family>`` spec builds a tiny random judge (`modeling_unime.util.models.load_model_spec`).
        """
        from .placement import placement
        from .util.models import load_model_spec

        where = placement(dtype, attn_implementation, device)
        model, processor = load_model_spec(os.fspath(pretrained_model_name_or_path), "judge", where)
        return cls(model, processor, **judge_kwargs)


@runtime_checkable
class Judge(Protocol):
    """What mining asks of a judge: ``score(query_text, query_image, candidates)``, a 1-D tensor with one score per
    candidate, in the candidates' order (P(Yes) for the model judges; higher means a better match).

    ``query_image`` and each candidate's image are paths (mining passes absolute ones) or None; a candidate is a
    ``(text, image)`` pair. A judge may also define ``fingerprint() -> str``, the key of its scores in mining's cache,
    when its weights are not a local ``model`` (`FingerprintedJudge`; see `judge_fingerprint`). A trained
    `UniMEV2Reranker` judges through ``reranker.scorer(processor)``: its own ``score(query, candidates)`` takes a
    query item instead (a runtime ``isinstance`` check only sees the method's name).

    Example:
        >>> class Constant:
        ...     def score(self, query_text, query_image, candidates):
        ...         return torch.full((len(candidates),), 0.5)
        >>> isinstance(Constant(), Judge)
        True
    """

    def score(self, query_text: str | None, query_image: Any, candidates: Sequence[Any]) -> torch.Tensor: ...


@runtime_checkable
class FingerprintedJudge(Judge, Protocol):
    """A `Judge` that computes the cache key of its own scores (`modeling_unime.judge_server.ServerJudge`, whose
    weights live on a server)."""

    def fingerprint(self) -> str: ...


def judge_settings(judge: Any) -> dict[str, Any]:
    """Every setting of a judge, besides its weights, that changes a score: the answer rule (``official_compat``,
    ``repetition_penalty``, the Yes/No token ids and strings), the prompt (``instruction``; the chat template and a
    hash of the tokenizer) and the images (``image_resize``, the image processor's settings).

    Left out on purpose: ``batch_size`` and ``prefix_sharing`` move a score in the last bits only (padding), and
    ``image_root``, which is part of each pair's cache key instead (`modeling_unime.mining.CachedJudge`).
    """
    settings: dict[str, Any] = {
        name: getattr(judge, name, None)
        for name in ("official_compat", "repetition_penalty", "instruction", "image_resize", "answer_token_ids")
    }
    tokenizer = getattr(judge, "tokenizer", None)
    answer_ids = settings["answer_token_ids"]
    if tokenizer is not None and answer_ids is not None and hasattr(tokenizer, "convert_ids_to_tokens"):
        settings["answer_tokens"] = tokenizer.convert_ids_to_tokens(list(answer_ids))
    settings.update(processor_settings(getattr(judge, "processor", None), tokenizer))
    return settings


def judge_fingerprint(judge: Judge) -> str:
    """Cache key of a judge's scores: its weights (every byte, `model_fingerprint`) and every setting that changes a
    score (`judge_settings`). A `FingerprintedJudge` gives its own key; a judge without a ``model`` is keyed by its
    class name."""
    if isinstance(judge, FingerprintedJudge) and callable(judge.fingerprint):
        return judge.fingerprint()
    if not hasattr(judge, "model"):
        return type(judge).__name__
    return model_fingerprint(judge.model, judge_settings(judge))


__all__ = [
    "FingerprintedJudge",
    "JUDGE_INSTRUCTION",
    "Judge",
    "JudgeStats",
    "MLLMJudge",
    "judge_fingerprint",
    "judge_settings",
    "official_repetition_penalty",
    "strip_image_placeholders",
]
