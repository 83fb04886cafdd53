"""MLLMJudge: soft semantic matching scores s(q, c) = P(Yes) / (P(Yes) + P(No)) from an image-text-to-text model.

The judge sees the paper's instruction, the query (image, text) and one candidate (image, text) in one user turn of
its chat template, then the generation prompt; the score is the two-way softmax of the "Yes" and "No" logits at the
answer position, from ONE forward pass (method.md (b)). Only the hidden state of the last position is projected, and
only onto the two answer rows of the LM head.

Prefix sharing: everything before the candidate (template, instruction, query image, query text) is encoded once per
query and its key/value cache is reused for all of the query's candidates, text or image. Qwen2-VL/Qwen2.5-VL 3-D
rotary positions are continued exactly as in the unshared sequence. Scores equal the plain path to ~1e-6 in fp32.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from .processing_unime import ImageInput, load_image

JUDGE_INSTRUCTION = (
    "I will provide you with a query and a candidate. Please evaluate whether the candidate meets the requirements "
    "of the query. If it does, respond with 'Yes'; if it doesn't, respond with 'No'."
)
# The prompt is cut right before this colon: the Qwen2 pre-tokenizer glues ":" to a following word, never to the
# word before, so the ids of the prefix and of the suffix concatenate to the ids of the whole prompt.
CANDIDATE_MARKER = "Candidate"
IMAGE_PLACEHOLDERS = ("<|image_1|>\n", "<|image_1|>", "<|image_pad|>\n", "<|image_pad|>", "<image>\n", "<image>")
Item = tuple[str | None, ImageInput]


def strip_image_placeholders(text: str | None) -> str | None:
    """Remove image placeholders from a text: the judge's chat template inserts its own image tokens."""
    if text is None:
        return None
    for placeholder in IMAGE_PLACEHOLDERS:
        text = text.replace(placeholder, "")
    return text


def official_repetition_penalty(logits: torch.Tensor, penalty: float = 1.05) -> torch.Tensor:
    """HF's repetition-penalty rule on logits of tokens present in the prompt: positive / penalty, negative * penalty.

    The released judge scores were made by ``generate`` with Qwen's default ``repetition_penalty=1.05``; "Yes" and
    "No" both occur in the instruction, so both answer logits were penalised (method.md (b)).
    """
    return torch.where(logits > 0, logits / penalty, logits * penalty)


@dataclass
class JudgeStats:
    """What the judge did: pairs scored, and through which path."""

    pairs: int = 0
    shared_prefix_pairs: int = 0
    plain_pairs: int = 0
    boundary_fallbacks: int = 0


class MLLMJudge:
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

    def __init__(
        self,
        model: Any,
        processor: Any,
        official_compat: bool = False,
        repetition_penalty: float = 1.05,
        batch_size: int = 16,
        prefix_sharing: bool = True,
        instruction: str = JUDGE_INSTRUCTION,
        yes_token: str = "Yes",
        no_token: str = "No",
        image_root: str | os.PathLike | None = None,
    ) -> None:
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.official_compat = official_compat
        self.repetition_penalty = repetition_penalty
        self.batch_size = batch_size
        self.prefix_sharing = prefix_sharing
        self.instruction = instruction
        self.image_root = image_root
        self.answer_token_ids = [self._single_token_id(yes_token), self._single_token_id(no_token)]
        self.stats = JudgeStats()
        self._uses_mrope = hasattr(self.model.base_model, "get_rope_index")

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, dtype: Any = "auto", device: str | None = None,
        **judge_kwargs: Any,
    ) -> "MLLMJudge":
        """Load a judge from a folder or Hub repo id (e.g. ``Qwen/Qwen2.5-VL-7B-Instruct``).

        Qwen2-VL, Qwen2.5-VL and LLaVA-OneVision processors are built without torchvision; other models use their
        ``AutoProcessor``. Keyword arguments go to the constructor (``official_compat=``, ``batch_size=``...).
        """
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from .processing_unime import BACKBONE_PROCESSOR_CLASSES

        model = AutoModelForImageTextToText.from_pretrained(pretrained_model_name_or_path, dtype=dtype)
        if device is not None:
            model = model.to(device)
        processor_class = BACKBONE_PROCESSOR_CLASSES.get(model.config.model_type, AutoProcessor)
        processor = processor_class.from_pretrained(pretrained_model_name_or_path)
        return cls(model, processor, **judge_kwargs)

    # ------------------------------------------------------------------------------------------------ prompts

    def _single_token_id(self, word: str) -> int:
        ids = self.tokenizer.encode(word, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(
                f"The judge's tokenizer splits {word!r} into {len(ids)} tokens ({ids}); the score needs the answer "
                "word as one token. Pass yes_token=/no_token= with words that are single tokens for this tokenizer."
            )
        return ids[0]

    def messages(self, query: Item, candidate: Item) -> list[dict[str, Any]]:
        """One user turn: instruction, "Query:", query image, query text, "Candidate:", candidate image and text."""
        content: list[dict[str, Any]] = [{"type": "text", "text": self.instruction}]
        for label, (text, image) in (("Query:", query), (f"{CANDIDATE_MARKER}:", candidate)):
            content.append({"type": "text", "text": label})
            if image is not None:
                content.append({"type": "image"})
            text = strip_image_placeholders(text)
            if text:
                content.append({"type": "text", "text": text})
        return [{"role": "user", "content": content}]

    def render(self, query: Item, candidate: Item) -> str:
        return self.processor.apply_chat_template(
            self.messages(query, candidate), tokenize=False, add_generation_prompt=True
        )

    def split_prompt(self, query: Item, candidate: Item) -> tuple[str, str]:
        """(prefix, suffix) of the rendered prompt, cut right before the colon of "Candidate:"."""
        prompt = self.render(query, candidate)
        cut = prompt.rindex(f"{CANDIDATE_MARKER}:") + len(CANDIDATE_MARKER)
        return prompt[:cut], prompt[cut:]

    # ------------------------------------------------------------------------------------------------ scores

    def logits_to_scores(self, answer_logits: torch.Tensor, pair_names: Sequence[str] | None = None) -> torch.Tensor:
        """(pairs, 2) [Yes, No] logits -> P(Yes) over the two; non-finite logits raise a ValueError naming the pair."""
        answer_logits = answer_logits.float()
        bad = (~torch.isfinite(answer_logits)).any(dim=1).nonzero().flatten().tolist()
        if bad:
            names = [pair_names[i] if pair_names else str(i) for i in bad[:5]]
            raise ValueError(
                f"The judge produced non-finite Yes/No logits for {len(bad)} pair(s) (first: {', '.join(names)}). "
                "Check the model weights and dtype (fp16 overflow: use bfloat16 or float32)."
            )
        if self.official_compat:
            answer_logits = official_repetition_penalty(answer_logits, self.repetition_penalty)
        return torch.softmax(answer_logits, dim=1)[:, 0]

    def _answer_logits(self, hidden_at_answer: torch.Tensor) -> torch.Tensor:
        answer_rows = self.model.get_output_embeddings().weight[self.answer_token_ids]
        return hidden_at_answer.to(answer_rows.dtype) @ answer_rows.T

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        device, dtype = self.model.device, self.model.dtype
        return {
            key: value.to(device=device, dtype=dtype) if value.is_floating_point() else value.to(device)
            for key, value in batch.items()
        }

    def _image(self, image: ImageInput, name: str):
        try:
            return load_image(image, 0, self.image_root)
        except ValueError as error:
            raise ValueError(f"{name}: {str(error).removeprefix('Row 0: ')}") from error

    @torch.inference_mode()
    def score_pairs(self, pairs: Sequence[tuple[Item, Item]]) -> torch.Tensor:
        """Plain path: whole prompts, left-padded, batched; one forward per batch, last position only."""
        scores = []
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start : start + self.batch_size]
            prompts, images = [], []
            for offset, (query, candidate) in enumerate(chunk):
                prompts.append(self.render(query, candidate))
                for role, item in (("query", query), ("candidate", candidate)):
                    if item[1] is not None:
                        images.append(self._image(item[1], f"pair {start + offset} {role}"))
            batch = self.processor(
                text=prompts, images=images or None, padding=True, padding_side="left", return_tensors="pt"
            )
            hidden = self.model.base_model(**self._to_device(batch), use_cache=False).last_hidden_state[:, -1]
            names = [f"pair {start + offset}" for offset in range(len(chunk))]
            scores.append(self.logits_to_scores(self._answer_logits(hidden), names).cpu())
        self.stats.pairs += len(pairs)
        self.stats.plain_pairs += len(pairs)
        return torch.cat(scores) if scores else torch.empty(0)

    @torch.inference_mode()
    def score(self, query_text: str | None, query_image: ImageInput, candidates: Sequence[Item]) -> torch.Tensor:
        """P(Yes) of every candidate for one query; the query prefix is encoded once when prefix sharing is on."""
        query = (query_text, query_image)
        if not candidates:
            return torch.empty(0)
        if not self.prefix_sharing:
            return self.score_pairs([(query, candidate) for candidate in candidates])
        splits = [self.split_prompt(query, candidate) for candidate in candidates]
        prefix_text = splits[0][0]
        shareable = [
            index
            for index, (prefix, suffix) in enumerate(splits)
            if prefix == prefix_text and self._boundary_is_stable(prefix, suffix)
        ]
        scores = torch.empty(len(candidates))
        unshareable = sorted(set(range(len(candidates))) - set(shareable))
        if unshareable:
            self.stats.boundary_fallbacks += len(unshareable)
            scores[unshareable] = self.score_pairs([(query, candidates[index]) for index in unshareable])
        if shareable:
            query_pil = self._image(query_image, "query") if query_image is not None else None
            prefix = self._encode_prefix(prefix_text, query_pil)
            text_rows = [index for index in shareable if candidates[index][1] is None]
            image_rows = [index for index in shareable if candidates[index][1] is not None]
            for rows in (text_rows, image_rows):
                for start in range(0, len(rows), self.batch_size):
                    chunk = rows[start : start + self.batch_size]
                    images = [self._image(candidates[index][1], f"candidate {index}") for index in chunk]
                    logits = self._score_suffixes(prefix, [splits[index][1] for index in chunk], images)
                    scores[chunk] = self.logits_to_scores(logits, [f"candidate {index}" for index in chunk]).cpu()
            self.stats.pairs += len(shareable)
            self.stats.shared_prefix_pairs += len(shareable)
        return scores

    def _boundary_is_stable(self, prefix: str, suffix: str) -> bool:
        encode = self.tokenizer.encode
        return encode(prefix, add_special_tokens=False) + encode(suffix, add_special_tokens=False) == encode(
            prefix + suffix, add_special_tokens=False
        )

    # ------------------------------------------------------------------------------------------ prefix sharing

    def _encode_prefix(self, prefix_text: str, query_image) -> dict[str, Any]:
        batch = self.processor(
            text=[prefix_text], images=[query_image] if query_image is not None else None, return_tensors="pt"
        )
        batch = self._to_device(batch)
        length = batch["input_ids"].shape[1]
        base = self.model.base_model
        position_ids, next_position = None, length
        if self._uses_mrope and "image_grid_thw" in batch:
            position_ids, delta = base.get_rope_index(
                batch["input_ids"],
                batch["mm_token_type_ids"],
                image_grid_thw=batch["image_grid_thw"],
                attention_mask=batch["attention_mask"],
            )
            next_position = length + int(delta.flatten()[0])
        elif self._uses_mrope:
            position_ids = torch.arange(length, device=self.model.device).view(1, 1, -1).expand(3, 1, -1)
        outputs = base(**batch, position_ids=position_ids, use_cache=True)
        return {"cache": outputs.cache, "length": length, "next_position": next_position}

    def _score_suffixes(self, prefix: dict[str, Any], suffixes: list[str], images: list) -> torch.Tensor:
        present = [image for image in images if image is not None]
        batch = self.processor(
            text=suffixes, images=present or None, padding=True, padding_side="right", return_tensors="pt"
        )
        batch = self._to_device(batch)
        input_ids, suffix_mask = batch.pop("input_ids"), batch.pop("attention_mask")
        rows, suffix_length = input_ids.shape
        device = input_ids.device
        if self._uses_mrope:
            if present:
                position_ids, _ = self.model.base_model.get_rope_index(
                    input_ids, batch["mm_token_type_ids"], image_grid_thw=batch["image_grid_thw"],
                    attention_mask=suffix_mask,
                )
            else:
                position_ids = torch.arange(suffix_length, device=device).view(1, 1, -1).expand(3, rows, -1)
            position_ids = position_ids + prefix["next_position"]
        else:
            position_ids = (torch.arange(suffix_length, device=device) + prefix["next_position"]).expand(rows, -1)
        # Expanded views: the DynamicCache constructor copies them, so the prefix cache itself is never mutated.
        cache = DynamicCache(
            ddp_cache_data=[
                (layer.keys.expand(rows, -1, -1, -1), layer.values.expand(rows, -1, -1, -1))
                for layer in prefix["cache"].layers
            ],
            config=self.model.config,
        )
        attention_mask = torch.cat(
            [torch.ones(rows, prefix["length"], dtype=suffix_mask.dtype, device=device), suffix_mask], dim=1
        )
        hidden = self.model.base_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            **batch,
        ).last_hidden_state
        last = suffix_mask.sum(dim=1) - 1
        return self._answer_logits(hidden[torch.arange(rows, device=device), last])


__all__ = [
    "JUDGE_INSTRUCTION",
    "MLLMJudge",
    "JudgeStats",
    "official_repetition_penalty",
    "strip_image_placeholders",
]
