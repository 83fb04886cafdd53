"""UniME-V2 in MTEB / MIEB: an ``AbsEncoder`` and ``ModelMeta`` entries, so that ``mteb.evaluate`` runs image, text
and fused (image + text) tasks with the released embedders or any local UniME-V2 checkpoint.

Every embedding comes from `modeling_unime.UniMEV2Model.encode` (the package's own prompt format, image sizes and
pooling), so MTEB scores are scores of the same embeddings the rest of this package computes. What this module adds
is the choice of the instruction for each row, made the way the authors evaluate:

- Tasks that MTEB shares with MMEB (ImageNet-1K, VOC2007, SUN397, Country211, OK-VQA, VizWiz, MSCOCO i2t / t2i,
  VisualNews i2t / t2i, CIRR, NIGHTS, WebQA, OVEN, EDIS, FashionIQ) get MMEB's own instruction strings, the ones the
  checkpoints were trained and evaluated with (`UNIME_V2_TASK_INSTRUCTIONS`): the query instruction on every query
  row, the target instruction (``"Represent the given image."``...) on document rows that have an image; text-only
  documents (captions, labels, passages) are embedded as raw text, as in MMEB.
- Flickr30K and SugarCrepe follow the authors' zero-shot protocol: every image is embedded with
  ``"Find an image caption describing the given image."``, every caption as raw text, in both directions.
- Any other task gets a default by task type and row modality (`UniMEV2MTEBEncoder.instruction_for`): the zero-shot
  caption protocol for image-caption retrieval and compositionality, MMEB's classification instruction for image
  classification / clustering / zero-shot classification, the task's own MTEB query prompt for other queries, and
  MMEB's target instructions for other rows with an image. Text rows of symmetric and document sides stay raw.

The instruction is prepended by the processor as everywhere in the package: ``<|image_pad|> {instruction} {text}``
for Qwen2-VL, one user turn of the chat template for LLaVA-OneVision. MMEB's stored texts put a newline after the
image placeholder and at the end (``"<|image_1|>\\nRepresent the given image.\\n"``); this module does not copy that
whitespace, so numbers on MTEB's versions of MMEB tasks are not MMEB numbers (the datasets and candidate sets differ
anyway).

mteb is optional: this module imports without it (the classes then raise an ImportError naming the package);
``pip install 'mteb>=2.26'``. ``ModelMeta.load_model`` checks mteb's ``image`` extra, which includes torchvision; this
package's processors do not need torchvision, and `load_unime_v2_encoder` loads a meta's model without that check.

Example (a tiny random model, offline; MTEB's mock image-to-text retrieval task):
    >>> import pytest
    >>> mteb = pytest.importorskip("mteb")
    >>> from mteb.mocks.mock_tasks import MockAny2AnyRetrievalI2TTask
    >>> from modeling_unime.tiny import build_tiny_unime
    >>> model, processor = build_tiny_unime("qwen2_vl")
    >>> model.processor = processor
    >>> encoder = UniMEV2MTEBEncoder.from_model(model, name="local/tiny-unime-v2")
    >>> result = mteb.evaluate(encoder, MockAny2AnyRetrievalI2TTask(), cache=None, co2_tracker=False,
    ...                        show_progress_bar=False)
    >>> result.task_results[0].task_name, "ndcg_at_10" in result.task_results[0].scores["test"][0]
    ('MockAny2AnyRetrievalI2T', True)
    >>> task = mteb.get_task("MSCOCOT2IRetrieval")          # metadata only: nothing is downloaded
    >>> encoder.instruction_for(task.metadata, "query", has_image=False)
    'Find me an everyday image that matches the given caption:'
    >>> encoder.instruction_for(task.metadata, "document", has_image=True)
    'Represent the given image.'

A released checkpoint or a local one (downloads / loads real weights):
    >>> meta = unime_v2_qwen2vl_2b                            # or unime_v2_model_meta("./my-unime-v2-checkpoint")
    >>> encoder = load_unime_v2_encoder(meta)                 # doctest: +SKIP
    >>> tasks = mteb.get_tasks(tasks=["MSCOCOI2TRetrieval", "CIRRIT2IRetrieval", "Imagenet1k"])
    >>> results = mteb.evaluate(encoder, tasks)               # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

try:  # mteb is an optional dependency of this package
    from mteb.models.abs_encoder import AbsEncoder
    from mteb.models.model_meta import ModelMeta, ScoringFunction
    from mteb.types import PromptType

    MTEB_IMPORT_ERROR: ImportError | None = None
except ImportError as _error:  # pragma: no cover - exercised where mteb is absent
    MTEB_IMPORT_ERROR = _error

    class AbsEncoder:  # type: ignore[no-redef]
        """Stand-in base class, so that this module imports without mteb; using it raises `require_mteb`'s error."""

    ModelMeta = ScoringFunction = PromptType = None  # type: ignore[assignment,misc]

if TYPE_CHECKING:
    from mteb.abstasks.task_metadata import TaskMetadata
    from torch.utils.data import DataLoader


MTEB_REQUIREMENT = "mteb>=2.26"


def require_mteb() -> None:
    """Raise a clear ImportError when mteb is not installed."""
    if MTEB_IMPORT_ERROR is not None:
        raise ImportError(
            f"evaluation.mteb_models needs mteb ({MTEB_IMPORT_ERROR}); install it with "
            f"`pip install '{MTEB_REQUIREMENT}'`."
        ) from MTEB_IMPORT_ERROR


# ------------------------------------------------------------------------------------------------ instructions

CAPTION_IMAGE_INSTRUCTION = "Find an image caption describing the given image."
"""The authors' zero-shot retrieval / SugarCrepe instruction for every image (captions are embedded raw)."""
CLASSIFICATION_IMAGE_INSTRUCTION = "Represent the given image for classification"
"""MMEB's instruction for ImageNet-1K / ImageNet-A / ImageNet-R queries (labels are embedded raw)."""
IMAGE_TARGET_INSTRUCTION = "Represent the given image."
"""MMEB's instruction for an image target (CIRR, NIGHTS, MSCOCO_t2i, VisualNews_t2i, FashionIQ)."""
FUSED_TARGET_INSTRUCTION = "Represent the given image with related text information:"
"""MMEB's instruction for an image + text target (EDIS); WebQA and OVEN say "Wikipedia image"."""
VQA_INSTRUCTION = "Represent the given image with the following question:"
"""MMEB's instruction for every VQA query (OK-VQA, A-OKVQA, DocVQA, VizWiz...), followed by the question."""


@dataclass(frozen=True)
class TaskInstructions:
    """The instructions of one MTEB task.

    Attributes:
        query: for every query row, and for the rows with an image of a task without queries and documents
            (classification, clustering, compositionality); None: raw text.
        document: for document rows that have an image; text-only documents are always embedded as raw text.
        source: where the strings come from.
    """

    query: str | None
    document: str | None = None
    source: str = "MMEB"


_MMEB_WIKI_TARGET = "Represent the given Wikipedia image with related text information:"
_CAPTION_PROTOCOL = "authors' zero-shot retrieval protocol (Flickr30K / COCO / ShareGPT4V / Urban1K / SugarCrepe)"

UNIME_V2_TASK_INSTRUCTIONS: dict[str, TaskInstructions] = {
    # Classification: MMEB embeds the image with the instruction and each label as raw text.
    "Imagenet1k": TaskInstructions(CLASSIFICATION_IMAGE_INSTRUCTION, source="MMEB ImageNet-1K"),
    "Imagenet1kZeroShot": TaskInstructions(CLASSIFICATION_IMAGE_INSTRUCTION, source="MMEB ImageNet-1K"),
    "VOC2007": TaskInstructions("Identify the object shown in the image", source="MMEB VOC2007"),
    "VOC2007.v2": TaskInstructions("Identify the object shown in the image", source="MMEB VOC2007"),
    "SUN397": TaskInstructions("Identify the scene shown in the image", source="MMEB SUN397"),
    "SUN397ZeroShot": TaskInstructions("Identify the scene shown in the image", source="MMEB SUN397"),
    "Country211": TaskInstructions("Identify the country depicted in the image", source="MMEB Country211"),
    "Country211ZeroShot": TaskInstructions("Identify the country depicted in the image", source="MMEB Country211"),
    # Image + question -> text: MMEB's VQA query format.
    "OKVQAIT2TRetrieval": TaskInstructions(VQA_INSTRUCTION, source="MMEB OK-VQA"),
    "VizWizIT2TRetrieval": TaskInstructions(VQA_INSTRUCTION, source="MMEB VizWiz"),
    # Retrieval.
    "MSCOCOI2TRetrieval": TaskInstructions(
        "Find an image caption describing the given everyday image.", source="MMEB MSCOCO_i2t"
    ),
    "MSCOCOT2IRetrieval": TaskInstructions(
        "Find me an everyday image that matches the given caption:", IMAGE_TARGET_INSTRUCTION, "MMEB MSCOCO_t2i"
    ),
    "VisualNewsI2TRetrieval": TaskInstructions(
        "Find a caption for the news in the given photo.", source="MMEB VisualNews_i2t"
    ),
    "VisualNewsT2IRetrieval": TaskInstructions(
        "Retrieve an image of this news caption.", IMAGE_TARGET_INSTRUCTION, "MMEB VisualNews_t2i"
    ),
    "CIRRIT2IRetrieval": TaskInstructions(
        "Given an image, find a similar everyday image with the described changes:", IMAGE_TARGET_INSTRUCTION,
        "MMEB CIRR",
    ),
    "NIGHTSI2IRetrieval": TaskInstructions(
        "Find a day-to-day image that looks similar to the provided image.", IMAGE_TARGET_INSTRUCTION, "MMEB NIGHTS"
    ),
    "WebQAT2ITRetrieval": TaskInstructions(
        "Find a Wikipedia image that answers this question:", _MMEB_WIKI_TARGET, "MMEB WebQA"
    ),
    "OVENIT2ITRetrieval": TaskInstructions(
        "Retrieve a Wikipedia image-description pair that provides evidence for the question of this image:",
        _MMEB_WIKI_TARGET,
        "MMEB OVEN",
    ),
    "EDIST2ITRetrieval": TaskInstructions(
        "Find a news image that matches the provided caption:", FUSED_TARGET_INSTRUCTION, "MMEB EDIS"
    ),
    "FashionIQIT2IRetrieval": TaskInstructions(
        "Find an image to match the fashion image and style note:", IMAGE_TARGET_INSTRUCTION, "MMEB FashionIQ"
    ),
    # The authors' zero-shot protocol: images carry the caption instruction, captions are raw, in both directions.
    "Flickr30kI2TRetrieval": TaskInstructions(CAPTION_IMAGE_INSTRUCTION, None, _CAPTION_PROTOCOL),
    "Flickr30kT2IRetrieval": TaskInstructions(None, CAPTION_IMAGE_INSTRUCTION, _CAPTION_PROTOCOL),
    "SugarCrepe": TaskInstructions(CAPTION_IMAGE_INSTRUCTION, None, _CAPTION_PROTOCOL),
}
"""MTEB task name -> the instructions the authors use for it. MMEB strings are the ones stored in MMEB-train /
MMEB-eval (without the ``<|image_1|>`` placeholder and the newlines around them)."""

CLASSIFICATION_TASK_TYPES = frozenset(
    {"ImageClassification", "ImageClustering", "ZeroShotClassification", "MultilabelClassification"}
)
CAPTION_RETRIEVAL_TASK_TYPES = frozenset({"Any2AnyRetrieval", "Any2AnyMultilingualRetrieval"})


def _prompt_type_value(prompt_type: Any) -> str | None:
    if prompt_type is None:
        return None
    value = getattr(prompt_type, "value", prompt_type)
    if value not in ("query", "document"):
        raise ValueError(f"prompt_type must be 'query', 'document' or None, got {prompt_type!r}.")
    return value


def _task_query_prompt(task_metadata: Any) -> str | None:
    """The task's own MTEB prompt for its queries (``metadata.prompt``: a string or ``{"query": ...}``), if any."""
    prompt = getattr(task_metadata, "prompt", None)
    if isinstance(prompt, Mapping):
        prompt = prompt.get("query")
    if not isinstance(prompt, str) or not prompt.strip():
        return None
    return prompt.strip()


def default_instruction(
    task_metadata: Any, prompt_type: str | None, has_image: bool, has_text: bool
) -> str | None:
    """The instruction of a row of a task that `UNIME_V2_TASK_INSTRUCTIONS` does not list (see the module docstring).

    >>> from types import SimpleNamespace
    >>> flickr_like = SimpleNamespace(type="Any2AnyRetrieval", category="t2i", prompt={"query": "Find an image."})
    >>> default_instruction(flickr_like, "query", has_image=False, has_text=True) is None
    True
    >>> default_instruction(flickr_like, "document", has_image=True, has_text=False)
    'Find an image caption describing the given image.'
    >>> cirr_like = SimpleNamespace(type="Any2AnyRetrieval", category="it2i", prompt={"query": "Edit the image."})
    >>> default_instruction(cirr_like, "query", has_image=True, has_text=True)
    'Edit the image.'
    >>> default_instruction(cirr_like, "document", has_image=True, has_text=False)
    'Represent the given image.'
    """
    task_type = getattr(task_metadata, "type", None)
    category = getattr(task_metadata, "category", None)
    if task_type in CLASSIFICATION_TASK_TYPES:
        return CLASSIFICATION_IMAGE_INSTRUCTION if has_image else None
    if task_type == "Compositionality" or (task_type in CAPTION_RETRIEVAL_TASK_TYPES and category in ("i2t", "t2i")):
        return CAPTION_IMAGE_INSTRUCTION if has_image else None
    if prompt_type == "query":
        prompt = _task_query_prompt(task_metadata)
        if prompt is not None or not has_image:
            return prompt
    if not has_image:
        return None
    return FUSED_TARGET_INSTRUCTION if has_text else IMAGE_TARGET_INSTRUCTION


# ------------------------------------------------------------------------------------------------ encoder


def _row_text(text: Any, has_image: bool) -> str | None:
    """A batch's text entry as `UniMEV2Model.encode` takes it: None where an image row has no (or an empty) text."""
    if text is None:
        return None
    if not isinstance(text, str):
        raise ValueError(f"a text input must be a string or None, got {type(text).__name__}.")
    if has_image and not text.strip():
        return None
    return text


class UniMEV2MTEBEncoder(AbsEncoder):
    """MTEB encoder of a UniME-V2 embedder: text-only, image-only and fused (image + text) rows.

    Args:
        model_name: the MTEB name (a Hub repo id for the released checkpoints); loaded from unless ``model_path``
            or ``model`` is given.
        revision: the Hub revision to load.
        model_path: a local folder (or another repo id) to load instead of ``model_name``.
        model: an already loaded `UniMEV2Model` (with its ``processor`` set) to wrap instead of loading one.
        device, dtype, attn_implementation: placement (`modeling_unime.placement`): ``"auto"`` = bf16 and flash
            attention / sdpa on an accelerator, float32 and sdpa on CPU; ``device`` None = this process's device.
        image_resize: resize policy set on the processor (default: the checkpoint's own; the authors' plain
            checkpoints get ``authors-eval``, 1344x1344, how their numbers were measured).
        batch_size: rows per forward pass (default: each MTEB batch in one pass per instruction).
        instructions: overrides, keyed ``"<TaskName>-query"``, ``"<TaskName>-document"``, ``"<TaskName>"``,
            ``"<TaskType>-query"``, ``"<TaskType>-document"`` or ``"<TaskType>"`` (first match wins); the value
            (None = no instruction) applies to every row of that task side.
        use_task_instructions: False embeds every row without an instruction.
    """

    def __init__(
        self,
        model_name: str,
        revision: str | None = None,
        *,
        model_path: str | os.PathLike | None = None,
        model: Any = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = "auto",
        attn_implementation: str | None = "auto",
        image_resize: str | None = None,
        batch_size: int | None = None,
        instructions: Mapping[str, str | None] | None = None,
        use_task_instructions: bool = True,
        **kwargs: Any,
    ) -> None:
        require_mteb()
        if kwargs:
            raise TypeError(f"UniMEV2MTEBEncoder got unexpected keyword arguments: {sorted(kwargs)}.")
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}.")
        self.model_name = model_name
        self.revision = revision
        self.batch_size = batch_size
        self.instructions = dict(instructions or {})
        self.use_task_instructions = use_task_instructions
        if model is None:
            model = _load_model(model_path or model_name, revision, device, dtype, attn_implementation)
        elif device is not None:
            model = model.to(device)
        if image_resize is not None:
            from .loading import apply_image_resize

            apply_image_resize(model, image_resize)
        self.model = model.eval()

    @classmethod
    def from_model(cls, model: Any, name: str = "local/unime-v2", **kwargs: Any) -> UniMEV2MTEBEncoder:
        """Wrap a loaded `UniMEV2Model` (its ``processor`` set), with a `unime_v2_model_meta` built from it."""
        encoder = cls(name, model=model, **kwargs)
        encoder.mteb_model_meta = _meta_from_config(
            model.config, name=name, n_parameters=sum(p.numel() for p in model.parameters())
        )
        return encoder

    # -------------------------------------------------------------------------------------------- instructions

    def instruction_for(
        self, task_metadata: TaskMetadata, prompt_type: PromptType | str | None, *, has_image: bool,
        has_text: bool = True,
    ) -> str | None:
        """The instruction for one row of ``task_metadata`` (overrides, then `UNIME_V2_TASK_INSTRUCTIONS`, then
        `default_instruction`). ``prompt_type`` is ``"query"``, ``"document"`` or None (tasks without sides)."""
        side = _prompt_type_value(prompt_type)
        if not self.use_task_instructions:
            return None
        for key in (task_metadata.name, task_metadata.type):
            for candidate in ((f"{key}-{side}", key) if side else (key,)):
                if candidate in self.instructions:
                    return self.instructions[candidate]
        known = UNIME_V2_TASK_INSTRUCTIONS.get(task_metadata.name)
        if known is None:
            return default_instruction(task_metadata, side, has_image, has_text)
        if side == "document":
            return known.document if has_image else None
        if side is None and not has_image:
            return None  # e.g. the labels of a zero-shot classification task, the captions of SugarCrepe
        return known.query

    # -------------------------------------------------------------------------------------------- encode

    def encode(
        self,
        inputs: DataLoader,
        *,
        task_metadata: TaskMetadata,
        hf_split: str,
        hf_subset: str,
        prompt_type: PromptType | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Embed every row of ``inputs`` (MTEB batches: dicts with ``"text"`` and/or ``"image"`` lists).

        Returns:
            A float32 CPU tensor (rows, dim), L2-normalised, in the order of ``inputs``.
        """
        from tqdm.auto import tqdm

        show_progress_bar = kwargs.get("show_progress_bar", True)
        pieces = []
        for batch in tqdm(inputs, desc="Encoding", disable=not show_progress_bar):
            pieces.append(self._encode_batch(batch, task_metadata, prompt_type))
        if not pieces:
            dim = self.model.config.matryoshka_dim or self.model.config.hidden_size
            return torch.empty(0, dim)
        return torch.cat(pieces)

    def _encode_batch(self, batch: Mapping[str, Any], task_metadata: TaskMetadata, prompt_type: Any) -> torch.Tensor:
        unsupported = sorted(key for key in ("audio", "video") if key in batch)
        if unsupported:
            raise ValueError(
                f"Task {task_metadata.name!r} gives {unsupported} inputs; UniME-V2 embeds texts and images only."
            )
        texts = batch.get("text")
        images = batch.get("image")
        if texts is None and images is None:
            raise ValueError(
                f"Task {task_metadata.name!r}: a batch has neither 'text' nor 'image' (keys: {sorted(batch)})."
            )
        count = len(texts if texts is not None else images)
        texts = list(texts) if texts is not None else [None] * count
        images = list(images) if images is not None else [None] * count
        if len(texts) != len(images):
            raise ValueError(f"Task {task_metadata.name!r}: {len(texts)} texts but {len(images)} images in a batch.")
        rows = [(_row_text(text, image is not None), image) for text, image in zip(texts, images)]
        groups: dict[str | None, list[int]] = {}
        for index, (text, image) in enumerate(rows):
            instruction = self.instruction_for(
                task_metadata, prompt_type, has_image=image is not None, has_text=text is not None
            )
            groups.setdefault(instruction, []).append(index)
        result: torch.Tensor | None = None
        for instruction, members in groups.items():
            embeddings = self.model.encode(
                texts=[rows[index][0] for index in members],
                images=[rows[index][1] for index in members],
                instruction=instruction,
                batch_size=self.batch_size or len(members),
                show_progress_bar=False,
            )
            if result is None:
                result = embeddings.new_empty(count, embeddings.shape[1])
            result[torch.tensor(members)] = embeddings
        return result


# ------------------------------------------------------------------------------------------------ loading


def _load_model(
    path_or_repo: str | os.PathLike, revision: str | None, device: Any, dtype: Any, attn_implementation: Any
) -> Any:
    """A `UniMEV2Model` with its processor, placed as the rest of the package places models
    (`modeling_unime.placement`); both from ``revision`` when given."""
    from modeling_unime import UniMEV2Model
    from modeling_unime.placement import placement, pretrained_kwargs
    from modeling_unime.processing_unime import UniMEV2Processor

    where = placement(dtype, attn_implementation, device=device)
    hub = {"revision": revision} if revision else {}
    model = UniMEV2Model.from_pretrained(path_or_repo, **hub, **pretrained_kwargs(where))
    if revision:
        model.processor = UniMEV2Processor.from_pretrained(
            path_or_repo, plain_checkpoint_image_resize=model.plain_checkpoint_image_resize, **hub
        )
    return model.eval()


def load_unime_v2_encoder(meta: ModelMeta, **kwargs: Any) -> UniMEV2MTEBEncoder:
    """``meta.load_model(**kwargs)`` without mteb's check of its ``image`` extra (torchvision, which this package's
    processors do not use); the encoder's ``mteb_model_meta`` is ``meta``."""
    require_mteb()
    if meta.loader is None or meta.name is None:
        raise ValueError(f"ModelMeta {meta.name!r} has no loader or no name.")
    encoder = meta.loader(meta.name, revision=meta.revision, **{**meta.loader_kwargs, **kwargs})
    encoder.mteb_model_meta = meta
    return encoder


# ------------------------------------------------------------------------------------------------ metadata

UNIME_V2_CITATION = (
    r"""
@misc{gu2025unimev2mllmasajudgeuniversalmultimodal,
  title={UniME-V2: MLLM-as-a-Judge for Universal Multimodal Embedding Learning},
  author={Tiancheng Gu and Kaicheng Yang and Kaichen Zhang and Xiang An and Ziyong Feng and Yueyi Zhang"""
    r""" and Weidong Cai and Jiankang Deng and Lidong Bing},
  year={2025},
  eprint={2510.13515},
  archivePrefix={arXiv},
  primaryClass={cs.CV},
  url={https://arxiv.org/abs/2510.13515},
}
"""
)

# The MIEB names of the MMEB-train datasets (as in mteb's own UniME-V2 entry).
UNIME_V2_TRAINING_DATASETS = {
    "CIRRIT2IRetrieval",
    "FashionIQIT2IRetrieval",
    "HatefulMemesI2TRetrieval",
    "HatefulMemesT2IRetrieval",
    "Imagenet1k",
    "MSCOCOI2TRetrieval",
    "MSCOCOT2IRetrieval",
    "NIGHTSI2IRetrieval",
    "OKVQAIT2TRetrieval",
    "OVENIT2ITRetrieval",
    "OVENIT2TRetrieval",
    "SUN397",
    "SUN397ZeroShot",
    "VOC2007",
    "VisualNewsI2TRetrieval",
    "VisualNewsT2IRetrieval",
    "VizWizIT2TRetrieval",
    "WebQAT2ITRetrieval",
    "WebQAT2TRetrieval",
}


def _bf16_megabytes(n_parameters: int) -> int:
    return round(n_parameters * 2 / 2**20)


def _released_meta(
    name: str, revision: str | None, release_date: str | None, n_parameters: int, n_embedding_parameters: int,
    embed_dim: int, adapted_from: str,
) -> ModelMeta:
    return ModelMeta(
        loader=UniMEV2MTEBEncoder,
        name=name,
        revision=revision,
        release_date=release_date,
        languages=["eng-Latn"],
        n_parameters=n_parameters,
        n_embedding_parameters=n_embedding_parameters,
        memory_usage_mb=_bf16_megabytes(n_parameters),
        max_tokens=32_768,
        embed_dim=embed_dim,
        license="apache-2.0",
        open_weights=True,
        public_training_code="https://github.com/GaryGuTC/UniME-v2",
        public_training_data="https://huggingface.co/datasets/TIGER-Lab/MMEB-train",
        framework=["PyTorch", "Transformers", "safetensors"],
        reference=f"https://huggingface.co/{name}",
        similarity_fn_name=ScoringFunction.COSINE,
        use_instructions=True,
        training_datasets=set(UNIME_V2_TRAINING_DATASETS),
        adapted_from=adapted_from,
        modalities=["image", "text"],
        model_type=["dense"],
        citation=UNIME_V2_CITATION,
        extra_requirements_groups=["transformers-v5"],
    )


RELEASED_CHECKPOINTS = (
    "TianchengGu/UniME-V2-Qwen2VL-2B",
    "TianchengGu/UniME-V2-Qwen2VL-7B",
    "TianchengGu/UniME-V2-LLaVA-OneVision-8B",
)

if MTEB_IMPORT_ERROR is None:
    # Parameter counts: the checkpoints as stored (Qwen2-VL-2B ties its LM head; the 7B and the 8B store theirs,
    # which the embedder does not load). Revisions and release dates of the two Qwen2-VL repos are to be filled in
    # from the Hub before this is proposed upstream; the LLaVA-OneVision ones are mteb's.
    unime_v2_qwen2vl_2b = _released_meta(
        "TianchengGu/UniME-V2-Qwen2VL-2B", None, None, 2_208_985_600, 233_373_696, 1_536, "Qwen/Qwen2-VL-2B-Instruct"
    )
    unime_v2_qwen2vl_7b = _released_meta(
        "TianchengGu/UniME-V2-Qwen2VL-7B", None, None, 8_291_375_616, 544_997_376, 3_584, "Qwen/Qwen2-VL-7B-Instruct"
    )
    unime_v2_llava_onevision_8b = _released_meta(
        "TianchengGu/UniME-V2-LLaVA-OneVision-8B", "36ef54da9f3dc3a2bfba115c4fb403b1a1f7cb0c", "2025-10-15",
        8_030_807_584, 545_226_752, 3_584, "llava-hf/llava-onevision-qwen2-7b-ov-hf",
    )
    UNIME_V2_MODEL_METAS: dict[str, ModelMeta] = {
        meta.name: meta for meta in (unime_v2_qwen2vl_2b, unime_v2_qwen2vl_7b, unime_v2_llava_onevision_8b)
    }


def __getattr__(name: str) -> Any:
    if name in {"unime_v2_qwen2vl_2b", "unime_v2_qwen2vl_7b", "unime_v2_llava_onevision_8b", "UNIME_V2_MODEL_METAS"}:
        require_mteb()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _meta_from_config(
    config: Any, name: str, revision: str | None = None, n_parameters: int | None = None,
    loader_kwargs: dict[str, Any] | None = None, **overrides: Any,
) -> ModelMeta:
    """A ModelMeta for a UniME-V2 config (``UniMEV2Config``) or a plain backbone config (the authors' layout)."""
    require_mteb()
    if "/" not in name:
        raise ValueError(f"MTEB model names have the form 'organization/model_name', got {name!r}.")
    backbone = getattr(config, "backbone_config", None) or config
    text_config = backbone.get_text_config() if hasattr(backbone, "get_text_config") else backbone
    embed_dim = getattr(config, "matryoshka_dim", None) or text_config.hidden_size
    fields: dict[str, Any] = {
        "loader": UniMEV2MTEBEncoder,
        "loader_kwargs": dict(loader_kwargs or {}),
        "name": name,
        "revision": revision,
        "release_date": None,
        "languages": ["eng-Latn"],
        "n_parameters": n_parameters,
        "memory_usage_mb": None,
        "max_tokens": getattr(text_config, "max_position_embeddings", None),
        "embed_dim": embed_dim,
        "license": None,
        "open_weights": None,
        "public_training_code": "https://github.com/GaryGuTC/UniME-v2",
        "public_training_data": None,
        "framework": ["PyTorch", "Transformers", "safetensors"],
        "similarity_fn_name": ScoringFunction.COSINE,
        "use_instructions": True,
        "training_datasets": None,
        "modalities": ["image", "text"],
        "model_type": ["dense"],
        "citation": UNIME_V2_CITATION,
    }
    fields.update(overrides)
    return ModelMeta(**fields)


def _count_safetensors_parameters(folder: Path) -> int | None:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    from safetensors import safe_open

    total = 0
    for file in files:
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():
                if "lm_head" not in key:  # the embedder leaves the LM head out
                    total += math.prod(handle.get_slice(key).get_shape())
    return total


def unime_v2_model_meta(
    path_or_repo: str | os.PathLike,
    *,
    name: str | None = None,
    revision: str | None = None,
    loader_kwargs: dict[str, Any] | None = None,
    **overrides: Any,
) -> ModelMeta:
    """A ModelMeta for any UniME-V2 checkpoint: a folder saved by this package, a plain backbone checkpoint in the
    authors' layout, or a Hub repo; ``meta.load_model()`` (or `load_unime_v2_encoder`) then loads its encoder.

    The released repo ids give their registered metas (`UNIME_V2_MODEL_METAS`). Otherwise the embedding size and
    context length are read from ``config.json`` and, for a folder, the parameter count from the safetensors
    headers. ``name`` defaults to the repo id, or ``local/<folder name>`` for a folder; ``loader_kwargs`` go to
    `UniMEV2MTEBEncoder` (``dtype``, ``image_resize``, ``instructions``...); ``overrides`` set other ModelMeta
    fields (``license``, ``release_date``, ``training_datasets``...).
    """
    require_mteb()
    from transformers import AutoConfig

    from modeling_unime import UniMEV2Config
    from modeling_unime.configuration_unime import SUPPORTED_BACKBONES

    folder = Path(path_or_repo)
    is_folder = folder.is_dir()
    key = os.fspath(path_or_repo)
    if not is_folder and key in UNIME_V2_MODEL_METAS and name is None and revision is None:
        meta = UNIME_V2_MODEL_METAS[key]
        updates = {"loader_kwargs": {**meta.loader_kwargs, **(loader_kwargs or {})}, **overrides}
        return meta.model_copy(update=updates, deep=True)
    hub = {"revision": revision} if revision else {}
    config_dict, _ = UniMEV2Config.get_config_dict(key, **hub)
    model_type = config_dict.get("model_type")
    if model_type == UniMEV2Config.model_type:
        config = UniMEV2Config.from_dict(config_dict)
    elif model_type in SUPPORTED_BACKBONES:
        config = AutoConfig.from_pretrained(key, **hub)
    else:
        raise ValueError(
            f"{key!r} holds a {model_type!r} model; a UniME-V2 checkpoint or a plain {', '.join(SUPPORTED_BACKBONES)} "
            "checkpoint is needed."
        )
    if name is None:
        name = f"local/{folder.resolve().name}" if is_folder else key
    kwargs = dict(loader_kwargs or {})
    if is_folder or name != key:
        kwargs.setdefault("model_path", str(folder.resolve()) if is_folder else key)
    n_parameters = overrides.pop("n_parameters", None)
    if n_parameters is None and is_folder:
        n_parameters = _count_safetensors_parameters(folder)
    return _meta_from_config(config, name, revision, n_parameters, kwargs, **overrides)


__all__ = [
    "CAPTION_IMAGE_INSTRUCTION",
    "CLASSIFICATION_IMAGE_INSTRUCTION",
    "FUSED_TARGET_INSTRUCTION",
    "IMAGE_TARGET_INSTRUCTION",
    "MTEB_IMPORT_ERROR",
    "RELEASED_CHECKPOINTS",
    "TaskInstructions",
    "UNIME_V2_TASK_INSTRUCTIONS",
    "UNIME_V2_TRAINING_DATASETS",
    "UniMEV2MTEBEncoder",
    "VQA_INSTRUCTION",
    "default_instruction",
    "load_unime_v2_encoder",
    "require_mteb",
    "unime_v2_model_meta",
]
