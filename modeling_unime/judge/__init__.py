"""The judge of hard-negative mining: the `Judge` interface and the cache key of a judge's scores; the judges
themselves live beside it.

- `modeling_unime.judge.mllm.MLLMJudge` gives soft semantic matching scores s(q, c) = P(Yes) / (P(Yes) + P(No))
  (arXiv 2510.13515, "MLLM-as-a-Judge for Hard Negatives Mining") from one forward pass of an image-text-to-text
  model; its scoring engine, with prefix sharing, is `modeling_unime.scoring_unime.MultimodalScorer`, shared with
  the reranker.
- `modeling_unime.judge.server.ServerJudge` asks the same question of an OpenAI-compatible (vLLM) server.

Anything with ``score(query_text, query_image, candidates)`` is a `Judge` to mining: the two above, the scoring
engine itself, mining's on-disk `modeling_unime.mining.judging.CachedJudge`, or the ground-truth
`modeling_unime.tiny.OracleJudge` of the demo worlds. `judge_fingerprint` keys their scores in mining's cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from ..scoring_unime import JUDGE_INSTRUCTION, JudgeStats, official_repetition_penalty, strip_image_placeholders
from ..util.fingerprint import model_fingerprint, processor_settings


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
    """A `Judge` that computes the cache key of its own scores (`modeling_unime.judge.server.ServerJudge`, whose
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

# The judges, importable from here as before (modeling_unime.judge.MLLMJudge): below the protocol they implement.
from .mllm import MLLMJudge  # noqa: E402

