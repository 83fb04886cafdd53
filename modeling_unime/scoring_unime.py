"""Yes/No scoring of (query, candidate) pairs with an image-text-to-text model, the query prefix shared.

This file travels with reranker checkpoints (``auto_map``): it imports only ``torch``, ``transformers`` and the
sibling processing file. The judge of the mining pipeline (`modeling_unime.judge.MLLMJudge`) and
`UniMEV2Reranker.score` both run on it.

s(q, c) = P(Yes) / (P(Yes) + P(No)) at the answer position, from ONE forward pass: the paper's soft semantic matching
score (arXiv 2510.13515, MLLM-as-a-Judge), which the authors never released code for. Prefix sharing:
everything before the candidate (template, instruction, query image, query text) is encoded once per query and its
key/value cache is reused for all of the query's candidates, text or image; Qwen2-VL/Qwen2.5-VL 3-D rotary positions
are continued exactly as in the unshared sequence.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from transformers import DynamicCache

from .configuration_unime import MAX_LISTWISE_CANDIDATES
from .processing_unime import ImageInput, canonical_image_resize, load_image

JUDGE_INSTRUCTION = (
    "I will provide you with a query and a candidate. Please evaluate whether the candidate meets the requirements "
    "of the query. If it does, respond with 'Yes'; if it doesn't, respond with 'No'."
)
LISTWISE_INSTRUCTION = (
    "I will provide you with a query followed by multiple candidates in the format: (1) cand1 (2) cand2, etc. Each "
    "candidate is independent of the others. Evaluate each candidate against the query, and respond with the number "
    "corresponding to the candidate that best meets the requirements of the query."
)
LISTWISE_ANSWER_PREFIX = "Ans: ("


def listwise_answer(position: int) -> str:
    """The listwise target for the (1-based) position of the best candidate: ``Ans: (k)``."""
    return f"{LISTWISE_ANSWER_PREFIX}{position})"


# The prompt is cut right before this colon: the Qwen2 pre-tokenizer glues ":" to a following word, never to the
# word before, so the ids of the prefix and of the suffix concatenate to the ids of the whole prompt.
CANDIDATE_MARKER = "Candidate"
IMAGE_PLACEHOLDERS = ("<|image_1|>\n", "<|image_1|>", "<|image_pad|>\n", "<|image_pad|>", "<image>\n", "<image>")
Item = tuple[str | None, ImageInput]


IMAGE_FILE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def as_item(value: Any, what: str = "item") -> Item:
    """One query or candidate as ``(text, image)``: the input convention of the reranker and the judge.

    - a string is a TEXT (never a path: ``"photo.jpg"`` is the text "photo.jpg"; a warning is given when such a
      string names an existing image file);
    - a PIL image, or an ``os.PathLike``, is an IMAGE;
    - ``(text, image)`` (tuple or list of two) or ``{"text": ..., "image": ...}`` is both; either may be None, and an
      image given as a string there is a path (or a ``datasets`` image dict).

    A None, an empty text with no image, or anything else raises a ValueError naming ``what``.

    Example:
        >>> as_item("a red car"), as_item(("What is shown?", "photo.jpg")), as_item({"image": "photo.jpg"})
        (('a red car', None), ('What is shown?', 'photo.jpg'), (None, 'photo.jpg'))
        >>> as_item(None, "candidate 2")
        Traceback (most recent call last):
        ...
        ValueError: candidate 2 is None: give a text, an image (PIL) or a (text, image) pair.
    """
    if value is None:
        raise ValueError(f"{what} is None: give a text, an image (PIL) or a (text, image) pair.")
    if isinstance(value, str):
        text, image = value, None
        if value.lower().endswith(IMAGE_FILE_SUFFIXES) and os.path.isfile(value):
            warnings.warn(
                f"{what} {value!r} is taken as a text, though it names an image file: pass (None, {value!r}) or "
                f"{{'image': {value!r}}} for the image.",
                stacklevel=3,
            )
    elif isinstance(value, dict):
        unknown = set(value) - {"text", "image"}
        if unknown:
            raise ValueError(f"{what}: unknown keys {sorted(unknown)}; a dict item has 'text' and/or 'image'.")
        text, image = value.get("text"), value.get("image")
    elif isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{what}: a sequence item must be (text, image), got {len(value)} elements.")
        text, image = value
    elif isinstance(value, (Image.Image, os.PathLike)):
        text, image = None, value
    else:
        raise ValueError(
            f"{what}: unsupported type {type(value).__name__}; give a text, an image (PIL) or a (text, image) pair."
        )
    if text is not None and not isinstance(text, str):
        raise ValueError(f"{what}: the text must be a string or None, got {type(text).__name__}.")
    if image is not None and isinstance(image, str) and image == "":
        image = None
    if (not text or text.isspace()) and image is None:
        raise ValueError(f"{what} has " + (f"only whitespace ({text!r})" if text else "neither text nor image") + ".")
    return (text or None), image


def check_candidates(candidates: Any) -> None:
    """A list (or tuple) of candidates: a lone string, image or dict is refused rather than scored item by item
    (``rerank("q", "abc")`` would otherwise score the three characters)."""
    if isinstance(candidates, (str, bytes, dict, Image.Image, os.PathLike)) or not isinstance(candidates, Iterable):
        raise TypeError(f"candidates must be a list of candidates (texts, images, (text, image) pairs), got one "
                        f"{type(candidates).__name__}: wrap a single candidate in a list, e.g. [candidate].")


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
    "No" both occur in the instruction, so both answer logits were penalised: every score of the authors' released
    training file (TianchengGu/UniME-V2-Training-Datasets) equals sigmoid(k * 0.125 / 1.05) for an integer k.
    """
    return torch.where(logits > 0, logits / penalty, logits * penalty)


@dataclass
class JudgeStats:
    """What the judge did: pairs scored, and through which path."""

    pairs: int = 0
    shared_prefix_pairs: int = 0
    plain_pairs: int = 0
    boundary_fallbacks: int = 0


class PromptBuilder:
    """The prompts of the judge and of the reranker, pairwise and listwise: one implementation for training and
    inference, so the instruction strings and the place of every text cannot drift apart.

    Example:
        >>> from modeling_unime.tiny import build_tiny_processor
        >>> prompts = PromptBuilder(build_tiny_processor("qwen2_5_vl").backbone_processor)
        >>> "Query:What colour?Candidate:red<|im_end|>" in prompts.render(("What colour?", None), ("red", None))
        True
    """

    def __init__(self, processor: Any, instruction: str = JUDGE_INSTRUCTION) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.instruction = instruction

    def _single_token_id(self, word: str) -> int:
        """The id of an answer word (Yes, No) that the tokenizer keeps as one token; a clear error otherwise."""
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

    def listwise_messages(self, query: Item, candidates: Sequence[Item]) -> list[dict[str, Any]]:
        """One user turn: the listwise instruction, "Query:" with the query, "Candidates:" then "(1) " + the first
        candidate's image and text, "(2) " ..."""
        content: list[dict[str, Any]] = [
            {"type": "text", "text": LISTWISE_INSTRUCTION}, {"type": "text", "text": "Query:"}
        ]
        if query[1] is not None:
            content.append({"type": "image"})
        if strip_image_placeholders(query[0]):
            content.append({"type": "text", "text": strip_image_placeholders(query[0])})
        content.append({"type": "text", "text": "Candidates:"})
        for position, (text, image) in enumerate(candidates, start=1):
            content.append({"type": "text", "text": f"({position}) "})
            if image is not None:
                content.append({"type": "image"})
            if strip_image_placeholders(text):
                content.append({"type": "text", "text": strip_image_placeholders(text)})
        return [{"role": "user", "content": content}]

    def render_listwise(self, query: Item, candidates: Sequence[Item], answer: str = LISTWISE_ANSWER_PREFIX) -> str:
        """The listwise prompt followed by the start of the assistant's answer (training appends the full one)."""
        prompt = self.processor.apply_chat_template(
            self.listwise_messages(query, candidates), tokenize=False, add_generation_prompt=True
        )
        return prompt + answer



class MultimodalScorer(PromptBuilder):
    """Scores (query, candidate) pairs with an image-text-to-text model as P(Yes) against P(No).

    The engine behind `MLLMJudge` (mining) and `UniMEV2Reranker.score` (reranking): prompts, one forward per pair
    with the last position projected on the two answer rows only, and the shared query prefix.

    Args:
        model: a model exposing ``base_model`` (the backbone without LM head), ``get_output_embeddings()`` (the LM
            head), ``device`` and ``dtype``: a ``*ForConditionalGeneration`` or a `UniMEV2Reranker`.
        processor: the backbone's processor (text + images, with a chat template).
        official_compat: apply the repetition penalty (1.05) to the two logits, as the released labels were made.
        batch_size: pairs (plain path) or candidates (shared path) per forward pass.
        prefix_sharing: encode each query's prefix once and reuse its key/value cache for all its candidates.
        image_root: folder that relative image paths are resolved against.
        image_resize: how images are resized before the processor (see
            `modeling_unime.processing_unime.canonical_image_resize`; ``"authors-reranker"`` is the authors' reranker
            rule, at most 300*28*28 pixels); default native size.
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
        image_resize: str | None = None,
    ) -> None:
        super().__init__(processor, instruction)
        self.image_resize = canonical_image_resize(image_resize)
        self.model = model.eval()
        self.official_compat = official_compat
        self.repetition_penalty = repetition_penalty
        self.batch_size = batch_size
        self.prefix_sharing = prefix_sharing
        self.image_root = image_root
        self.answer_token_ids = [self._single_token_id(yes_token), self._single_token_id(no_token)]
        self.stats = JudgeStats()
        self._uses_mrope = hasattr(self.model.base_model, "get_rope_index")

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

    def _answer_logits(self, hidden_at_answer: torch.Tensor, token_ids: Sequence[int] | None = None) -> torch.Tensor:
        """Logits of a few tokens only (default: Yes, No): the hidden states times those rows of the LM head."""
        head = self.model.get_output_embeddings()
        rows = head.weight[list(token_ids if token_ids is not None else self.answer_token_ids)]
        logits = hidden_at_answer.to(rows.dtype) @ rows.T
        if getattr(head, "bias", None) is not None:
            logits = logits + head.bias[list(token_ids if token_ids is not None else self.answer_token_ids)]
        return logits

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        device, dtype = self.model.device, self.model.dtype
        return {
            key: value.to(device=device, dtype=dtype) if value.is_floating_point() else value.to(device)
            for key, value in batch.items()
        }

    def _image(self, image: ImageInput, name: str):
        try:
            return load_image(image, 0, self.image_root, self.image_resize)
        except ValueError as error:
            raise ValueError(f"{name}: {str(error).removeprefix('Row 0: ')}") from error

    @torch.inference_mode()
    def score_pairs(self, pairs: Sequence[tuple[Item, Item]]) -> torch.Tensor:
        """Plain path: whole prompts, left-padded, batched; one forward per batch, last position only."""
        pairs = [(as_item(query, f"pair {index} query"), as_item(candidate, f"pair {index} candidate"))
                 for index, (query, candidate) in enumerate(pairs)]
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
    def score(self, query_text: str | None, query_image: ImageInput, candidates: Sequence[Any]) -> torch.Tensor:
        """P(Yes) of every candidate for one query; the query prefix is encoded once when prefix sharing is on.

        Candidates follow `as_item`: a string is a text, a PIL image an image, ``(text, image)`` or a dict both.
        """
        query = as_item((query_text, query_image), "the query")
        query_text, query_image = query
        check_candidates(candidates)
        candidates = [as_item(candidate, f"candidate {index}") for index, candidate in enumerate(candidates)]
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
            prefix = self._encode_prefix(prefix_text, [query_pil] if query_pil is not None else [])
            text_rows = [index for index in shareable if candidates[index][1] is None]
            image_rows = [index for index in shareable if candidates[index][1] is not None]
            for rows in (text_rows, image_rows):
                for start in range(0, len(rows), self.batch_size):
                    chunk = rows[start : start + self.batch_size]
                    images = [self._image(candidates[index][1], f"candidate {index}") for index in chunk]
                    logits = self._answer_logits(
                        self._score_suffixes(prefix, [splits[index][1] for index in chunk], images)
                    )
                    scores[chunk] = self.logits_to_scores(logits, [f"candidate {index}" for index in chunk]).cpu()
            self.stats.pairs += len(shareable)
            self.stats.shared_prefix_pairs += len(shareable)
        return scores

    def _boundary_is_stable(self, prefix: str, suffix: str) -> bool:
        encode = self.tokenizer.encode
        return encode(prefix, add_special_tokens=False) + encode(suffix, add_special_tokens=False) == encode(
            prefix + suffix, add_special_tokens=False
        )

    # ------------------------------------------------------------------------------------------------ listwise

    def _index_token_ids(self) -> tuple[list[int], int]:
        digits = [self._single_token_id(str(digit)) for digit in range(10)]
        return digits, self._single_token_id(")")

    @torch.inference_mode()
    def score_listwise(
        self, query_text: str | None, query_image: ImageInput, candidates: Sequence[Item]
    ) -> torch.Tensor:
        """Probability that each candidate is the answer, from the index tokens after ``Ans: (``.

        The list is encoded in ONE forward; the first digit's distribution is read at its last position, restricted
        to valid indices. For lists of 10 or more, one extra token per possible first digit (a batch of at most 9
        one-token rows on the cached list) gives the distribution over ")" and the second digit. The scores sum to 1.
        """
        query_text, query_image = as_item((query_text, query_image), "the query")
        check_candidates(candidates)
        candidates = [as_item(candidate, f"candidate {index}") for index, candidate in enumerate(candidates)]
        count = len(candidates)
        if count == 0:
            return torch.empty(0)
        if count > MAX_LISTWISE_CANDIDATES:
            raise ValueError(f"{count} candidates: listwise scoring handles at most {MAX_LISTWISE_CANDIDATES}.")
        digits, close = self._index_token_ids()
        query = (query_text, query_image)
        prompt = self.render_listwise(query, candidates)
        images = [self._image(query_image, "query")] if query_image is not None else []
        images += [
            self._image(image, f"candidate {index}") for index, (_, image) in enumerate(candidates) if image is not None
        ]
        prefix = self._encode_prefix(prompt, images)
        first_digits = list(range(1, min(count, 9) + 1))
        first = torch.softmax(
            self._answer_logits(prefix["last_hidden"], [digits[d] for d in first_digits]).float(), -1
        )[0]
        self._check_finite(first, "the listwise index logits")
        scores = torch.zeros(count)
        scores[: len(first_digits)] = first.cpu()
        two_digit_firsts = [d for d in range(1, 10) if 10 * d <= count]
        if two_digit_firsts:
            hidden = self._score_suffixes(prefix, [str(d) for d in two_digit_firsts], [None] * len(two_digit_firsts))
            for row, d in enumerate(two_digit_firsts):
                seconds = [e for e in range(10) if 10 * d + e <= count]
                following = torch.softmax(
                    self._answer_logits(hidden[row : row + 1], [close] + [digits[e] for e in seconds]).float(), -1
                )[0].cpu()
                self._check_finite(following, f"the second-digit logits after {d}")
                scores[d - 1] = first[d - 1].cpu() * following[0]
                for offset, e in enumerate(seconds, start=1):
                    scores[10 * d + e - 1] = first[d - 1].cpu() * following[offset]
        return scores

    @staticmethod
    def _check_finite(values: torch.Tensor, what: str) -> None:
        if not torch.isfinite(values).all():
            raise ValueError(f"Non-finite values in {what}; check the model weights and dtype (fp16 overflow).")

    # ------------------------------------------------------------------------------------------ prefix sharing

    def _encode_prefix(self, prefix_text: str, images: list) -> dict[str, Any]:
        """One forward over a prompt; its cache, length, next rotary position and last hidden state."""
        batch = self.processor(text=[prefix_text], images=images or None, return_tensors="pt")
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
        return {
            "cache": outputs.cache,
            "length": length,
            "next_position": next_position,
            "last_hidden": outputs.last_hidden_state[:, -1],
        }

    def _score_suffixes(self, prefix: dict[str, Any], suffixes: list[str], images: list) -> torch.Tensor:
        """Hidden state at the last real token of each suffix, every suffix attending to the cached prefix."""
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
            config=self.model.base_model.config,
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
        return hidden[torch.arange(rows, device=device), last]


__all__ = [
    "as_item",
    "check_candidates",
    "JUDGE_INSTRUCTION",
    "LISTWISE_INSTRUCTION",
    "LISTWISE_ANSWER_PREFIX",
    "listwise_answer",
    "MultimodalScorer",
    "PromptBuilder",
    "JudgeStats",
    "official_repetition_penalty",
    "strip_image_placeholders",
]
