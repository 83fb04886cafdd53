"""sentence-transformers support: a UniME-V2 checkpoint folder loads with ``SentenceTransformer(path,
trust_remote_code=True)`` and embeds exactly as `UniMEV2Model.encode` does.

The checkpoint's ``modules.json`` names one module, `UniMEV2SentenceEmbedder`, defined in this file, which travels
with the checkpoint (sentence-transformers loads it from the folder or the Hub repo, with the modeling files beside
it). The module runs UniME-V2's own processor and forward, so the prompt format (no chat template for Qwen2-VL, the
image token first), the transformers-4.49 image positions of the released Qwen2-VL checkpoints
(``image_position_rule``) and the last-token pooling are the ones `UniMEV2Model.encode` uses: sentence-transformers'
stock ``Transformer`` module would render inputs through a chat template and give images 3-D positions.

Inputs, one per row, in sentence-transformers' conventions:

- a string: a text; a string that names an existing image file (``.png``, ``.jpg``...) is an image, as
  sentence-transformers decides for every model;
- a PIL image, encoded image bytes (``bytes`` or a file object such as ``BytesIO``), or a ``datasets`` image dict
  (``{"bytes": ..., "path": ...}``);
- ``{"image": ..., "text": ...}``: an image+text row (either key may be missing or None);
- a one-turn chat (``[{"role": "user", "content": [{"type": "image", "image": ...}, {"type": "text", "text":
  ...}]}]``, with an optional system turn taken as the instruction).

A prompt (``prompt=``, ``prompt_name=``, ``encode_query`` / ``encode_document`` when the checkpoint defines
``query`` / ``document`` prompts) is the instruction of `UniMEV2Model.encode`: it is joined to each row's text with
a space, as the authors' prompts are. Checkpoints written by this package define one prompt, ``"image"``: the
authors' instruction for image queries ("Find an image caption describing the given image."); captions are embedded
without one.

``truncate_dim``: sentence-transformers truncates the (unit) embeddings without normalising them again, which keeps
cosine similarities; pass ``normalize_embeddings=True`` as well to get `UniMEV2Model.encode(truncate_dim=...)`'s
unit vectors. sentence-transformers slices ``[..., :truncate_dim]`` itself, after this module, and checks nothing
(-1 keeps all but one dimension, 0 none); it never hands the value to a module. The module checks the one it can
see, the model's ``truncate_dim`` (``SentenceTransformer(..., truncate_dim=...)``, the saved config, the
``truncate_embeddings`` context manager), when the model is built and at every forward: a ValueError unless it is a
positive int up to the embedding size. A value given to one ``encode(..., truncate_dim=...)`` call alone is not seen.

Example:
    >>> import tempfile
    >>> from sentence_transformers import SentenceTransformer
    >>> from modeling_unime.tiny import build_tiny_unime
    >>> from modeling_unime.sentence_unime import add_sentence_transformers_files
    >>> model, processor = build_tiny_unime("qwen2_vl")
    >>> folder = tempfile.mkdtemp()
    >>> model.save_pretrained(folder); _ = processor.save_pretrained(folder)
    >>> _ = add_sentence_transformers_files(folder)
    >>> st_model = SentenceTransformer(folder, trust_remote_code=True, device="cpu")
    >>> from PIL import Image
    >>> red = Image.new("RGB", (56, 56), "red")
    >>> embeddings = st_model.encode(["a red square", red, {"image": red, "text": "a square"}])
    >>> embeddings.shape
    (3, 64)
    >>> ours = model.encode(texts=["a red square", None, "a square"], images=[None, red, red], processor=processor)
    >>> bool(abs(embeddings - ours.numpy()).max() < 1e-5)
    True
"""

from __future__ import annotations

import io
import json
import numbers
import os
import shutil
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

try:
    from sentence_transformers.base.modality import is_image_url_or_path
    from sentence_transformers.base.modules import InputModule
except ImportError:  # this file also ships inside checkpoints; only sentence-transformers ever runs it
    InputModule = torch.nn.Module

    def is_image_url_or_path(text: str) -> bool:
        return False


from .modeling_unime import UniMEV2Model
from .processing_unime import UniMEV2Processor

IMAGE_QUERY_PROMPT = "Find an image caption describing the given image."
MODULE_CONFIG_FILE = "sentence_unime_config.json"
MODULE_TYPE = "sentence_unime.UniMEV2SentenceEmbedder"
# Model loading arguments sentence-transformers passes that name the weights' location or dtype.
_LOAD_KWARGS = ("dtype", "torch_dtype", "attn_implementation", "device_map", "low_cpu_mem_usage")


def _is_message_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(turn, dict) and "role" in turn for turn in value)


def _row_from_messages(messages: list[dict[str, Any]], row: int) -> tuple[str | None, Any, str | None]:
    """(text, image, instruction) of a one-turn chat; a system turn is the instruction."""
    instruction, texts, images = None, [], []
    for turn in messages:
        content = turn.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content or [])
        if turn["role"] == "system":
            instruction = " ".join(part.get("text", "") for part in parts if part.get("type") == "text") or None
            continue
        if turn["role"] != "user":
            raise ValueError(f"Row {row}: only system and user turns can be embedded, got a {turn['role']!r} turn.")
        for part in parts:
            if part.get("type") == "text":
                texts.append(part.get("text") or "")
            elif part.get("type") in ("image", "image_url"):
                images.append(part.get("image", part.get("image_url")))
            else:
                raise ValueError(f"Row {row}: UniME-V2 embeds text and image parts, got a {part.get('type')!r} part.")
    if len(images) > 1:
        raise ValueError(f"Row {row}: the chat has {len(images)} images; UniME-V2 embeds one image per row.")
    return " ".join(texts) or None, (images[0] if images else None), instruction


def parse_row(value: Any, row: int = 0) -> tuple[str | None, Any, str | None]:
    """One sentence-transformers input as (text, image, instruction from the input itself or None).

    Example:
        >>> parse_row("a red car")
        ('a red car', None, None)
        >>> parse_row({"image": "car.png", "text": "What colour is it?"})
        ('What colour is it?', 'car.png', None)
    """
    if isinstance(value, str):
        return (None, value, None) if is_image_url_or_path(value) else (value, None, None)
    if _is_message_list(value):
        return _row_from_messages(value, row)
    if isinstance(value, dict):
        if "bytes" in value or "path" in value:  # a `datasets` image
            return None, value, None
        unknown = set(value) - {"text", "image"}
        if unknown:
            raise ValueError(
                f"Row {row}: a dict input has the keys {sorted(value)}; UniME-V2 takes {{'image': ..., 'text': ...}}."
            )
        return value.get("text"), value.get("image"), None
    if isinstance(value, tuple):
        raise ValueError(
            f"Row {row}: UniME-V2 embeds one input per row, got a pair; give {{'image': ..., 'text': ...}} for an "
            "image+text row."
        )
    if hasattr(value, "convert") and hasattr(value, "size"):  # a PIL image
        return None, value, None
    if isinstance(value, (bytes, bytearray)) or hasattr(value, "read"):  # encoded image bytes (LlamaIndex: BytesIO)
        from PIL import Image

        try:
            image = Image.open(io.BytesIO(value) if isinstance(value, (bytes, bytearray)) else value)
            image.load()
        except Exception as error:
            raise ValueError(f"Row {row}: the image bytes could not be decoded ({error}).") from error
        return None, image, None
    raise ValueError(
        f"Row {row}: unsupported input of type {type(value).__name__}; give a text, a PIL image, an image path or "
        "{'image': ..., 'text': ...}."
    )


class UniMEV2SentenceEmbedder(InputModule):
    """The sentence-transformers module of a UniME-V2 embedder: UniME-V2's processor and forward, nothing else.

    ``features["sentence_embedding"]`` is `UniMEV2Model`'s output (last-token pooled, L2-normalised, truncated to
    ``config.matryoshka_dim`` when the checkpoint sets one); ``features["token_embeddings"]`` the final hidden states.

    Args:
        model: a loaded `UniMEV2Model`.
        processor: its `UniMEV2Processor`.
        image_root: folder that relative image paths are resolved against (saved with the module).
    """

    config_file_name = MODULE_CONFIG_FILE
    config_keys = ["image_root"]
    save_in_root = True

    def __init__(self, model: UniMEV2Model, processor: UniMEV2Processor, image_root: str | None = None) -> None:
        super().__init__()
        self.model = model
        self.processor = processor
        self.image_root = image_root
        # The SentenceTransformer holding this module (`on_model_ready`), weakly: it owns this module.
        self._owner: weakref.ReferenceType | None = None
        # Reported, never applied: UniME-V2 does not truncate its inputs (LlamaIndex needs a number here).
        backbone = model.config.backbone_config
        text_config = getattr(backbone, "text_config", None) or backbone
        self.max_seq_length = int(getattr(text_config, "max_position_embeddings", 32768))

    @property
    def modalities(self) -> list[Any]:
        # "message": batches that mix texts and images (sentence-transformers calls them messages) and chats.
        return ["text", "image", ("image", "text"), "message"]

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    def get_embedding_dimension(self) -> int:
        return self.model.config.matryoshka_dim or self.model.config.hidden_size

    def get_sentence_embedding_dimension(self) -> int:
        return self.get_embedding_dimension()

    def check_truncate_dim(self, truncate_dim: Any) -> None:
        """ValueError unless ``truncate_dim`` is None or a positive int up to the embedding size.

        sentence-transformers slices the embeddings to ``[..., :truncate_dim]`` without a check: -1 would drop the
        last dimension, 0 every one, True keep one, and a size past the embedding's would silently keep them all.
        """
        if truncate_dim is None:
            return
        size = self.get_embedding_dimension()
        if isinstance(truncate_dim, bool) or not isinstance(truncate_dim, numbers.Integral) or not (
            1 <= truncate_dim <= size
        ):
            raise ValueError(
                f"truncate_dim={truncate_dim!r}: give a positive int up to the embedding size {size}, or None for "
                "the whole embedding."
            )

    def on_model_ready(self, model: Any) -> None:
        """Checks the SentenceTransformer's ``truncate_dim`` once it is built, and keeps the model (weakly) so that
        `forward` checks it again: sentence-transformers truncates after this module and never passes it the value."""
        parent_hook = getattr(super(), "on_model_ready", None)
        if parent_hook is not None:
            parent_hook(model)
        self.check_truncate_dim(getattr(model, "truncate_dim", None))
        self._owner = weakref.ref(model)

    def __getstate__(self) -> dict[str, Any]:
        # A weak reference cannot be pickled (multi-process encoding pickles the model): the copy forgets its owner.
        state = dict(self.__dict__)
        state["_owner"] = None
        return state

    def preprocess(self, inputs: Sequence[Any], prompt: str | None = None, **kwargs: Any) -> dict[str, Any]:
        """Processor outputs for a batch of inputs (see the module docstring), the prompt as the instruction.

        ``task`` and ``max_length`` (passed by sentence-transformers' collators) are accepted and not used: UniME-V2
        does not truncate its inputs.
        """
        rows = [parse_row(value, row) for row, value in enumerate(inputs)]
        instructions = {instruction for _, _, instruction in rows if instruction is not None}
        if prompt and instructions:
            raise ValueError("Give the instruction either as a prompt or as a system turn, not both.")
        if len(instructions) > 1:
            raise ValueError("The chats of one batch have different system turns; embed them in separate calls.")
        instruction = prompt or (instructions.pop() if instructions else None)
        texts = [text for text, _, _ in rows]
        images = [image for _, image, _ in rows]
        batch = dict(self.processor(texts=texts, images=images, instruction=instruction, image_root=self.image_root))
        # Lets sentence-transformers' cached (GradCache) losses cut image tensors into mini-batches by row.
        batch["num_images_per_sample"] = torch.tensor([int(image is not None) for image in images])
        return batch

    def forward(self, features: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        owner = self._owner() if self._owner is not None else None
        if owner is not None:  # set or changed after loading: `truncate_embeddings(...)`, an assignment
            self.check_truncate_dim(getattr(owner, "truncate_dim", None))
        model_inputs = {
            key: value for key, value in features.items()
            if key not in ("num_images_per_sample", "sentence_embedding", "token_embeddings")
        }
        dtype = self.model.dtype
        model_inputs = {
            key: value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() else value
            for key, value in model_inputs.items()
        }
        output = self.model(**model_inputs)
        features["sentence_embedding"] = output.embeddings
        features["token_embeddings"] = output.last_hidden_state
        return features

    def save(self, output_path: str, *args: Any, safe_serialization: bool = True, **kwargs: Any) -> None:
        self.model.save_pretrained(output_path, safe_serialization=safe_serialization)
        self.processor.save_pretrained(output_path)
        self.save_config(output_path)

    @classmethod
    def load(
        cls,
        model_name_or_path: str,
        subfolder: str = "",
        token: bool | str | None = None,
        cache_folder: str | None = None,
        revision: str | None = None,
        local_files_only: bool = False,
        trust_remote_code: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        processor_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> "UniMEV2SentenceEmbedder":
        hub_kwargs = {"token": token, "cache_dir": cache_folder, "revision": revision,
                      "local_files_only": local_files_only}
        if subfolder:
            hub_kwargs["subfolder"] = subfolder
        model_kwargs = {key: value for key, value in (model_kwargs or {}).items() if key in _LOAD_KWARGS}
        if "dtype" not in model_kwargs and "torch_dtype" not in model_kwargs and torch.cuda.is_available():
            model_kwargs["dtype"] = torch.bfloat16  # the accelerator's precision; float32 on CPU (the saved dtype)
        # sentence-transformers only runs this class under trust_remote_code=True; the same code loads both.
        model = UniMEV2Model.from_pretrained(
            model_name_or_path, trust_remote_code=trust_remote_code, **hub_kwargs, **model_kwargs
        )
        processor = UniMEV2Processor.from_pretrained(
            model_name_or_path, trust_remote_code=trust_remote_code, **hub_kwargs, **(processor_kwargs or {})
        )
        model.processor = processor
        config = cls.load_config(
            model_name_or_path=model_name_or_path, subfolder=subfolder, token=token, cache_folder=cache_folder,
            revision=revision, local_files_only=local_files_only,
        ) if hasattr(cls, "load_config") else {}
        config = {key: value for key, value in config.items() if key in cls.config_keys}
        return cls(model, processor, **config)


def add_sentence_transformers_files(
    directory: str | os.PathLike,
    prompts: dict[str, str] | None = None,
    default_prompt_name: str | None = None,
    image_root: str | None = None,
) -> Path:
    """Make a UniME-V2 checkpoint folder loadable with ``SentenceTransformer(directory, trust_remote_code=True)``.

    Writes ``modules.json`` (one `UniMEV2SentenceEmbedder` module), ``config_sentence_transformers.json`` (prompts,
    cosine similarity), the module's config, and copies this file into the folder (sentence-transformers loads the
    module class from there). The weights, the processor and the model card are left as they are.

    Args:
        prompts: named instructions (default ``{"image": IMAGE_QUERY_PROMPT}``).
        default_prompt_name: the prompt used when ``encode`` gets none (default: no instruction).
        image_root: folder relative image paths resolve against (default: as given, relative to the caller).
    """
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise ValueError(f"{os.fspath(directory)!r} has no config.json: save the UniME-V2 model there first.")
    prompts = {"image": IMAGE_QUERY_PROMPT} if prompts is None else dict(prompts)
    if default_prompt_name is not None and default_prompt_name not in prompts:
        raise ValueError(f"default_prompt_name={default_prompt_name!r} is not one of the prompts {sorted(prompts)}.")
    shutil.copyfile(Path(__file__), directory / "sentence_unime.py")
    modules = [{"idx": 0, "name": "0", "path": "", "type": MODULE_TYPE}]
    (directory / "modules.json").write_text(json.dumps(modules, indent=2) + "\n")
    settings = {
        "model_type": "SentenceTransformer",
        "prompts": prompts,
        "default_prompt_name": default_prompt_name,
        "similarity_fn_name": "cosine",
    }
    (directory / "config_sentence_transformers.json").write_text(json.dumps(settings, indent=2) + "\n")
    (directory / MODULE_CONFIG_FILE).write_text(json.dumps({"image_root": image_root}, indent=2) + "\n")
    return directory


__all__ = [
    "IMAGE_QUERY_PROMPT",
    "UniMEV2SentenceEmbedder",
    "add_sentence_transformers_files",
    "parse_row",
]
