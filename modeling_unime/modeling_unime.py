"""UniMEV2Model: a multimodal LLM whose last-token final hidden state, L2-normalised, is the embedding.

This file travels with every checkpoint (``auto_map``): it imports only ``torch`` and ``transformers`` (and the two
sibling traveling files).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput, logging

from .configuration_unime import (
    HUB_KWARGS,
    MROPE_BACKBONES,
    SUPPORTED_BACKBONES,
    UniMEV2Config,
    UniMEV2RerankerConfig,
)
from .processing_unime import (
    ImageInput,
    UniMEV2Processor,
    VideoInput,
    align_rows,
    align_videos,
    check_instruction,
    missing_image_rows,
    resolve_image_path,
)
from .scoring_unime import MultimodalScorer, as_item, check_candidates

logger = logging.get_logger(__name__)

# Key names of plain backbone checkpoints (the authors' release was written by transformers 4.4x; 4.5x and 5.x
# layouts differ again) -> the names inside UniMEV2Model, whose backbone lives at `model.`.
BACKBONE_KEY_MAPPINGS: dict[str, dict[str, str]] = {
    "qwen2_vl": {
        r"^visual\.": "model.visual.",
        r"^model\.(?!language_model\.|visual\.)": "model.language_model.",
    },
    "llava_onevision": {
        r"^language_model\.model\.": "model.language_model.",
        r"^language_model\.lm_head\.": "lm_head.",
        r"^vision_tower\.(vision_model\.)?": "model.vision_tower.",
        r"^model\.vision_tower\.vision_model\.": "model.vision_tower.",
        r"^multi_modal_projector\.": "model.multi_modal_projector.",
        r"^image_newline": "model.image_newline",
    },
}
# Qwen3-VL was published under today's names (model.language_model.*, model.visual.*), which the old Qwen2-VL
# patterns leave alone; they still rename a Qwen3-VL folder saved under the old ones.
for _family in ("qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"):
    BACKBONE_KEY_MAPPINGS[_family] = BACKBONE_KEY_MAPPINGS["qwen2_vl"]



@dataclass
class UniMEV2Output(ModelOutput):
    """Output of [`UniMEV2Model`].

    Args:
        embeddings: (batch, hidden) float32 pooled embeddings, L2-normalised when ``config.normalize``.
        last_hidden_state: (batch, sequence, hidden) final hidden states of the backbone.
    """

    embeddings: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None


def pool_last_token(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Hidden state of each row's last non-padding token; works for left and right padding alike."""
    if attention_mask is None:
        return hidden_states[:, -1]
    positions = torch.arange(1, attention_mask.shape[1] + 1, device=attention_mask.device)
    last_index = (attention_mask.to(positions.dtype) * positions).argmax(dim=1)
    return hidden_states[torch.arange(hidden_states.shape[0], device=hidden_states.device), last_index]


def vision_start_position_ids(
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None,
    image_grid_thw: torch.LongTensor | None,
    image_token_id: int,
    vision_start_token_id: int,
    spatial_merge_size: int,
) -> torch.LongTensor:
    """M-RoPE position ids (3, batch, sequence) under the transformers 4.49 rule (``image_position_rule=
    "vision_start_only"``): an image whose first token follows ``<|vision_start|>`` gets 3-D (t, h, w) positions;
    every other token, image tokens included, gets the next text position. Padding positions are 1, as in 4.49.

    Images are matched to ``image_grid_thw`` rows in batch order, one grid per image (``t*h*w / merge**2`` tokens),
    so adjacent images and mixed, left- or right-padded batches are handled. (4.49 itself gave a counted image the
    grid of the batch's first *counted* image, which differs only when a batch mixes images with and without
    ``<|vision_start|>``: a prompt format no UniME-V2 checkpoint uses.)

    Example:
        >>> ids = torch.tensor([[0, 0, 7, 7, 7, 7, 5, 6], [0, 9, 7, 7, 7, 7, 5, 6]])   # 7: image, 9: vision start
        >>> mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1, 1]])
        >>> grids = torch.tensor([[1, 4, 4], [1, 4, 4]])                            # 2x2 tokens after a 2x2 merge
        >>> vision_start_position_ids(ids, mask, grids, 7, 9, 2)[:, :, 2:].tolist()  # (t, h, w) of each token
        [[[0, 1, 2, 3, 4, 5], [1, 1, 1, 1, 3, 4]], [[0, 1, 2, 3, 4, 5], [1, 1, 2, 2, 3, 4]], \
[[0, 1, 2, 3, 4, 5], [1, 2, 1, 2, 3, 4]]]
    """
    batch_size, length = input_ids.shape
    device = input_ids.device
    position_ids = torch.ones(3, batch_size, length, dtype=torch.long, device=device)
    grids = iter(image_grid_thw.tolist()) if image_grid_thw is not None else iter(())
    for row in range(batch_size):
        kept = (
            attention_mask[row].bool()
            if attention_mask is not None
            else torch.ones(length, dtype=torch.bool, device=device)
        )
        ids = input_ids[row][kept]
        image_starts = (ids == image_token_id).nonzero().flatten().tolist()
        pieces: list[torch.Tensor] = []
        cursor = position = 0  # cursor: index into ids; position: the next text position
        while image_starts:
            start = image_starts[0]
            t, h, w = next(grids, (None, None, None))
            if t is None:
                raise ValueError(f"Row {row} has more images than image_grid_thw has rows.")
            grid_h, grid_w = h // spatial_merge_size, w // spatial_merge_size
            tokens = t * grid_h * grid_w
            if start > cursor:
                pieces.append(torch.arange(position, position + start - cursor, device=device).expand(3, -1))
                position += start - cursor
            if start > 0 and int(ids[start - 1]) == vision_start_token_id:
                temporal = torch.arange(t, device=device).view(-1, 1, 1).expand(t, grid_h, grid_w)
                height = torch.arange(grid_h, device=device).view(1, -1, 1).expand(t, grid_h, grid_w)
                width = torch.arange(grid_w, device=device).view(1, 1, -1).expand(t, grid_h, grid_w)
                pieces.append(torch.stack([temporal, height, width]).reshape(3, -1) + position)
                position += max(t, grid_h, grid_w)
            else:
                pieces.append(torch.arange(position, position + tokens, device=device).expand(3, -1))
                position += tokens
            cursor = start + tokens
            image_starts = [index for index in image_starts if index >= cursor]
        if cursor < len(ids):
            pieces.append(torch.arange(position, position + len(ids) - cursor, device=device).expand(3, -1))
        if pieces:
            position_ids[:, row, kept] = torch.cat(pieces, dim=1)
    return position_ids


def truncate_and_normalize(embeddings: torch.Tensor, dim: int | None, normalize: bool = True) -> torch.Tensor:
    """Keep the first ``dim`` dimensions (Matryoshka) and L2-normalise again."""
    if dim is not None:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"truncate_dim must be a positive integer, got {dim!r}.")
        if dim > embeddings.shape[-1]:
            raise ValueError(f"truncate_dim={dim} is larger than the embedding size {embeddings.shape[-1]}.")
        embeddings = embeddings[..., :dim]
    return F.normalize(embeddings, dim=-1) if normalize else embeddings


@contextlib.contextmanager
def evaluation_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Dropout off inside the block (the same input always gets the same output); the caller's train or eval mode
    comes back after it, also on an error: a Trainer's model must still be training after an evaluation call."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


class UniMEV2PreTrainedModel(PreTrainedModel):
    """Shared by the embedder and the reranker: loading the authors' layouts, saving, the processor."""

    config_class = UniMEV2Config
    base_model_prefix = "unime"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _can_compile_fullgraph = False
    # Image size for a plain backbone checkpoint's processor (the authors' evaluation rule; the reranker's differs).
    plain_checkpoint_image_resize = "authors-eval"

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """Save under the model's own key names.

        transformers would otherwise reverse the key mapping a model was loaded with (the authors' layout) and
        write old names that a UniME-V2 checkpoint does not use.
        """
        kwargs.setdefault("save_original_format", False)
        return super().save_pretrained(save_directory, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, **kwargs: Any):
        """Load a UniME-V2 checkpoint, or a plain backbone checkpoint in the authors' layout.

        A folder (or Hub repo) whose ``config.json`` is a Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision or Qwen3-VL config is
        wrapped as a UniME-V2 model and its weights are renamed from every known layout (``model.layers.*``,
        ``visual.*``, ``language_model.model.*``, ...), so no weight stays randomly initialised. The embedder leaves
        the LM head out; the reranker keeps it.
        """
        if kwargs.get("config") is None:
            hub_kwargs = {key: kwargs[key] for key in HUB_KWARGS if key in kwargs}
            config_dict, _ = PretrainedConfig.get_config_dict(pretrained_model_name_or_path, **hub_kwargs)
            model_type = config_dict.get("model_type")
            if model_type in SUPPORTED_BACKBONES:
                backbone_config = AutoConfig.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
                kwargs["config"] = cls.config_class(backbone_config=backbone_config)
                kwargs.setdefault("key_mapping", BACKBONE_KEY_MAPPINGS[model_type])
            elif model_type != cls.config_class.model_type:
                raise ValueError(
                    f"{os.fspath(pretrained_model_name_or_path)!r} holds a {model_type!r} model; {cls.__name__} loads "
                    f"{cls.config_class.model_type} checkpoints and plain {', '.join(SUPPORTED_BACKBONES)} checkpoints."
                )
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    @property
    def processor(self) -> UniMEV2Processor:
        """The processor saved beside the weights (loaded on first use).

        Any failure to load it is raised as a ValueError naming the source and the cause: an AttributeError raised
        inside a property would otherwise reach the caller as "object has no attribute 'processor'".
        """
        if self._processor is None:
            source = self.config.name_or_path
            if not source:
                raise ValueError(
                    "This model was not loaded from a folder or repo, so it has no processor to load: pass "
                    "processor= to encode() or set model.processor = UniMEV2Processor(...)."
                )
            try:
                # The processor's code is the code this model already runs from the same source.
                self._processor = UniMEV2Processor.from_pretrained(
                    source, trust_remote_code=True, plain_checkpoint_image_resize=self.plain_checkpoint_image_resize
                )
            except Exception as error:  # noqa: BLE001 - re-raised with the source named, never as AttributeError
                raise ValueError(
                    f"Could not load the processor saved with {source!r}: {type(error).__name__}: {error}. Pass "
                    "processor= to encode(), or set model.processor = UniMEV2Processor.from_pretrained(...)."
                ) from error
        return self._processor

    @processor.setter
    def processor(self, value: UniMEV2Processor | None) -> None:
        self._processor = value

class UniMEV2Model(UniMEV2PreTrainedModel):
    """UniME-V2 embedder: a Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision or Qwen3-VL base model (no LM head) whose final
    hidden state at the last non-padding token, L2-normalised, is the embedding of a text, an image or both.

    Example:
        >>> from modeling_unime.tiny import build_tiny_unime
        >>> model, processor = build_tiny_unime("qwen2_vl")
        >>> from PIL import Image
        >>> embeddings = model.encode(texts=["a red car", None], images=[None, Image.new("RGB", (64, 64), "red")],
        ...                           processor=processor)
        >>> embeddings.shape, round(float(embeddings[0].norm()), 4)
        (torch.Size([2, 64]), 1.0)
    """

    # The authors' checkpoints are causal LMs: their LM head is not part of an embedder.
    _keys_to_ignore_on_load_unexpected = [r"(^|\.)lm_head\."]

    def __init__(self, config: UniMEV2Config) -> None:
        super().__init__(config)
        self.model = AutoModel.from_config(config.backbone_config)
        self._processor: UniMEV2Processor | None = None
        self.post_init()

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        truncate_dim: int | None = None,
        **backbone_inputs: Any,
    ) -> UniMEV2Output:
        """Embed one batch of processor outputs.

        Args:
            input_ids, attention_mask: as returned by [`UniMEV2Processor`].
            truncate_dim: keep the first dimensions only (defaults to ``config.matryoshka_dim``).
            **backbone_inputs: every other processor output (``pixel_values``, ``image_grid_thw``,
                ``mm_token_type_ids``, ``image_sizes``, ``batch_num_images``...), passed to the backbone as is.
        """
        backbone_inputs.pop("return_dict", None)
        if self._positions_by_vision_start(input_ids, backbone_inputs):
            backbone_inputs["position_ids"] = vision_start_position_ids(
                input_ids,
                attention_mask,
                backbone_inputs.get("image_grid_thw"),
                image_token_id=self.config.backbone_config.image_token_id,
                vision_start_token_id=self.config.backbone_config.vision_start_token_id,
                spatial_merge_size=self.config.backbone_config.vision_config.spatial_merge_size,
            )
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **backbone_inputs)
        last_hidden_state = outputs.last_hidden_state
        # Normalised in float32 whatever the backbone dtype, so bf16 models give stable unit vectors.
        embeddings = pool_last_token(last_hidden_state, attention_mask).float()
        dim = truncate_dim if truncate_dim is not None else self.config.matryoshka_dim
        embeddings = truncate_and_normalize(embeddings, dim, self.config.normalize)
        return UniMEV2Output(embeddings=embeddings, last_hidden_state=last_hidden_state)

    def _positions_by_vision_start(self, input_ids: torch.Tensor | None, backbone_inputs: dict[str, Any]) -> bool:
        """Whether this forward computes its own M-RoPE positions under the 4.49 rule (see UniMEV2Config)."""
        if self.config.backbone_type not in MROPE_BACKBONES:
            return False
        if getattr(self.config, "image_position_rule", "vision_start_only") != "vision_start_only":
            return False
        if input_ids is None or backbone_inputs.get("position_ids") is not None:
            return False
        if backbone_inputs.get("video_grid_thw") is not None:
            # Under 4.49 a video right after <|vision_start|> got 3-D positions from its grid, which this rule does
            # not reproduce; the embedding prompt puts none there, so its video tokens take text positions.
            config = self.config.backbone_config
            follows_start = (input_ids[:, :-1] == config.vision_start_token_id) & (
                input_ids[:, 1:] == config.video_token_id)
            if bool(follows_start.any()):
                raise ValueError(
                    "image_position_rule='vision_start_only' gives video tokens text positions, as transformers 4.49 "
                    "did for a video without <|vision_start|>; this prompt has <|vision_start|> before a video. Use "
                    "image_position_rule='all_images' (3-D positions) or the processor's prompt."
                )
        return True

    @torch.inference_mode()
    def encode(
        self,
        texts: str | Sequence[str | None] | None = None,
        images: ImageInput | Sequence[ImageInput] | None = None,
        instruction: str | None = None,
        batch_size: int = 16,
        show_progress_bar: bool | None = None,
        truncate_dim: int | None = None,
        processor: UniMEV2Processor | None = None,
        image_root: str | os.PathLike | None = None,
        videos: Sequence[VideoInput] | None = None,
    ) -> torch.Tensor:
        """Embed texts, images, videos, or an image or video with a text.

        Rows are sorted by modality and length so that each batch carries little padding; the output keeps the
        input order.

        Args:
            texts: one text or a list; None for an image-only row.
            images: one image or a list (PIL image, path, ``datasets`` image dict); None for a text-only row.
            instruction: prepended to every row (e.g. ``"Find an image caption describing the given image."``).
            batch_size: rows per forward pass.
            show_progress_bar: defaults to showing one when there is more than one batch.
            truncate_dim: Matryoshka truncation (re-normalised); defaults to ``config.matryoshka_dim``.
            processor: defaults to the processor saved with the checkpoint.
            image_root: folder that relative image and video paths are resolved against.
            videos: one entry per row, None for a row without a video (Qwen2-VL, Qwen2.5-VL, Qwen3-VL backbones):
                a video file (decoding needs ``pip install "unime-v2[video]"``), a folder of frame images (the
                MMEB-V2 layout), or a list of frames (PIL images or paths). Frames are sampled under the processor's
                ``video_num_frames`` / ``video_fps`` / ``video_max_frames`` settings, saved with it.

        Returns:
            A float32 CPU tensor of shape (rows, dim), L2-normalised when ``config.normalize``.

        Example:
            >>> from PIL import Image
            >>> from modeling_unime.tiny import build_tiny_unime
            >>> model, processor = build_tiny_unime("qwen2_vl")
            >>> frames = [Image.new("RGB", (56, 56), (20 * i, 0, 0)) for i in range(4)]
            >>> model.encode(texts=["a red car", "What happens?"], videos=[None, frames], processor=processor).shape
            torch.Size([2, 64])
        """
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        if truncate_dim is not None and (isinstance(truncate_dim, bool) or not isinstance(truncate_dim, int)
                                         or truncate_dim < 1):
            raise ValueError(f"truncate_dim must be a positive integer or None, got {truncate_dim!r}.")
        check_instruction(instruction)
        if truncate_dim is not None and truncate_dim > self.config.hidden_size:
            raise ValueError(
                f"truncate_dim={truncate_dim} is larger than the embedding size {self.config.hidden_size}."
            )
        processor = processor or self.processor
        videos = align_videos(videos)
        texts, images = align_rows(texts, images, videos=videos)
        videos = videos if videos is not None else [None] * len(texts)
        missing = [(row, path, "image file") for row, path in missing_image_rows(images, image_root)] + [
            (row, resolve_image_path(video, image_root), "video file or frame folder")
            for row, video in enumerate(videos)
            if isinstance(video, (str, os.PathLike)) and not os.path.exists(resolve_image_path(video, image_root))]
        missing.sort()
        if missing:
            hint = "pass image_root=" if image_root is None else f"check image_root={os.fspath(image_root)!r}"
            others = ", ".join(f"row {row}: {path!r}" for row, path, _ in missing[1:4])
            ellipsis = ", ..." if len(missing) > 4 else ""
            more = f"; {len(missing) - 1} more missing ({others}{ellipsis})" if others else ""
            row, path, what = missing[0]
            raise ValueError(f"Row {row}: {what} not found: {path!r} ({hint} or fix the path){more}; checked before "
                             "encoding, nothing was encoded.")
        order = sorted(
            range(len(texts)),
            key=lambda row: (videos[row] is not None, images[row] is not None, len(texts[row] or "")),
            reverse=True,
        )
        starts = range(0, len(order), batch_size)
        if show_progress_bar is None:
            show_progress_bar = len(starts) > 1 and logging.is_progress_bar_enabled()
        progress = logging.tqdm(starts, desc="Encoding", disable=not show_progress_bar, unit="batch")
        dim = truncate_dim if truncate_dim is not None else self.config.matryoshka_dim
        device, dtype = self.device, self.dtype
        pieces = []
        with evaluation_mode(self):
            for start in progress:
                rows = order[start : start + batch_size]
                batch = processor(
                    texts=[texts[row] for row in rows],
                    images=[images[row] for row in rows],
                    instruction=instruction,
                    image_root=image_root,
                    row_ids=rows,
                    videos=[videos[row] for row in rows] if any(videos[row] is not None for row in rows) else None,
                )
                # Pixels in the model's dtype; other floats (Qwen2.5-VL's seconds per grid) keep their precision.
                batch = {
                    key: value.to(device=device, dtype=dtype) if key.startswith("pixel_values") else value.to(device)
                    for key, value in batch.items()
                }
                pieces.append(self(**batch, truncate_dim=dim).embeddings.cpu())
        if not pieces:
            return torch.empty(0, dim or self.config.hidden_size)
        stacked = torch.cat(pieces)
        result = torch.empty_like(stacked)
        result[torch.tensor(order)] = stacked
        return result


@dataclass
class UniMEV2RerankerOutput(ModelOutput):
    """Output of [`UniMEV2Reranker`]: ``logits`` at the kept positions (all, or ``logits_to_keep``) and the
    backbone's final hidden states."""

    logits: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None


class UniMEV2Reranker(UniMEV2PreTrainedModel):
    """UniME-V2 reranker: an image-text-to-text backbone with its LM head (Qwen2.5-VL in the paper).

    - ``score(query, candidates)``: P(Yes) against P(No) per candidate with the pairwise prompt (the judge's
      instruction), one forward per pair, logits of the two answer tokens at the last position only, the query
      prefix encoded once for all candidates.
    - ``rerank(query, candidates, top_k=None, mode="listwise")``: ``"listwise"`` reads the probability of every
      candidate index after ``Ans: (`` from ONE forward over the whole list, so every candidate gets a score and the
      list a full order; ``"pairwise"`` uses ``score``.

    Queries and candidates follow `modeling_unime.scoring_unime.as_item`: a string is a text (never a path), a PIL
    image is an image, ``(text, image)`` or ``{"text": ..., "image": ...}`` is both (an image there may be a path).
    A None, an empty query or an empty candidate raises a ValueError naming it.

    Example:
        >>> from modeling_unime.tiny import build_tiny_reranker
        >>> reranker, processor = build_tiny_reranker()
        >>> order, scores = reranker.rerank("What colour is the car?", ["red", "blue", "green"], processor=processor)
        >>> sorted(order), round(float(scores.sum()), 4)
        ([0, 1, 2], 1.0)
    """

    config_class = UniMEV2RerankerConfig
    base_model_prefix = "model"
    plain_checkpoint_image_resize = "authors-reranker-eval"  # how their rerank numbers were measured
    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: UniMEV2RerankerConfig) -> None:
        super().__init__(config)
        self.model = AutoModel.from_config(config.backbone_config)
        text_config = config.backbone_config.get_text_config()
        self.lm_head = torch.nn.Linear(text_config.hidden_size, text_config.vocab_size, bias=False)
        self._processor = None
        self.post_init()

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.lm_head

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **backbone_inputs: Any,
    ) -> UniMEV2RerankerOutput:
        """Backbone forward and LM-head logits; ``logits_to_keep`` = n keeps the last n positions (0: all), or a
        boolean (batch, sequence) mask keeps those positions only (training reads the answer tokens alone)."""
        backbone_inputs.pop("return_dict", None)
        backbone_inputs.setdefault("use_cache", False)
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, **backbone_inputs).last_hidden_state
        if isinstance(logits_to_keep, torch.Tensor) and logits_to_keep.dtype == torch.bool:
            selected = hidden[logits_to_keep]
        elif isinstance(logits_to_keep, int) and logits_to_keep > 0:
            selected = hidden[:, -logits_to_keep:]
        else:
            selected = hidden
        return UniMEV2RerankerOutput(logits=self.lm_head(selected), last_hidden_state=hidden)

    def scorer(self, processor: UniMEV2Processor | None = None, **scorer_kwargs: Any) -> MultimodalScorer:
        """The scoring engine over this model and the backbone processor (shared with the mining judge)."""
        processor = processor or self.processor
        backbone_processor = getattr(processor, "backbone_processor", processor)
        scorer_kwargs.setdefault("image_resize", getattr(processor, "image_resize", None))
        with evaluation_mode(self):  # the scorer switches the model to eval; a training caller keeps training
            return MultimodalScorer(self, backbone_processor, **scorer_kwargs)

    @torch.inference_mode()
    def score(
        self,
        query: Any,
        candidates: Sequence[Any],
        processor: UniMEV2Processor | None = None,
        batch_size: int = 16,
        image_root: str | os.PathLike | None = None,
    ) -> torch.Tensor:
        """P(Yes) of each candidate for the query (pairwise prompt), in the candidates' order."""
        check_candidates(candidates)
        with evaluation_mode(self):
            query_text, query_image = as_item(query, "the query")
            scorer = self.scorer(processor, batch_size=batch_size, image_root=image_root)
            return scorer.score(query_text, query_image, candidates)

    @torch.inference_mode()
    def rerank(
        self,
        query: Any,
        candidates: Sequence[Any],
        top_k: int | None = None,
        mode: str = "listwise",
        processor: UniMEV2Processor | None = None,
        batch_size: int = 16,
        image_root: str | os.PathLike | None = None,
    ) -> tuple[list[int], torch.Tensor]:
        """Order candidates by the reranker's scores.

        Returns:
            ``order``: candidate indices, best first (the first ``top_k`` when given); ``scores``: one score per
            candidate in the input order: P(Yes) (pairwise), or the probability that the candidate is the answer
            (listwise; the scores of a list sum to 1). Lists longer than 9 are scored with two-digit indices: the
            first digit is read from the list's forward, the second from one extra token per first digit, both
            restricted to valid indices, so each index gets the probability of its whole digit sequence.
        """
        if mode not in ("listwise", "pairwise"):
            raise ValueError(f"mode={mode!r}: use 'listwise' or 'pairwise'.")
        check_candidates(candidates)
        candidates = list(candidates)
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be a positive integer (how many of the best to return) or None for all, got "
                             f"{top_k!r}.")
        if mode == "pairwise":
            scores = self.score(query, candidates, processor, batch_size, image_root)
        else:
            if len(candidates) > self.config.max_listwise_candidates:
                raise ValueError(
                    f"{len(candidates)} candidates: listwise scoring handles at most "
                    f"{self.config.max_listwise_candidates} (two-digit indices); rerank the embedder's top-k, or use "
                    "mode='pairwise'."
                )
            with evaluation_mode(self):
                query_text, query_image = as_item(query, "the query")
                scorer = self.scorer(processor, batch_size=batch_size, image_root=image_root)
                scores = scorer.score_listwise(query_text, query_image, candidates)
        order = sorted(range(len(candidates)), key=lambda index: (-float(scores[index]), index))
        return (order[:top_k] if top_k is not None else order), scores


__all__ = [
    "UniMEV2Model",
    "UniMEV2Output",
    "UniMEV2PreTrainedModel",
    "UniMEV2Reranker",
    "UniMEV2RerankerOutput",
    "pool_last_token",
    "vision_start_position_ids",
    "evaluation_mode",
    "BACKBONE_KEY_MAPPINGS",
]
