"""Export a UniME-V2 embedder as a checkpoint that vLLM serves as an embedder.

    python -m modeling_unime.vllm_export SRC DST [--dtype auto|float32|bfloat16]

SRC is a UniME-V2 checkpoint folder (``model_type: unime_v2``) or a plain backbone checkpoint in the authors' layout.
DST receives what vLLM (``--runner pooling --convert embed``) loads without custom code:

- ``config.json``: the backbone's own config, ``architectures`` naming the stock class
  (``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``,
  ``LlavaOnevisionForConditionalGeneration``, ``Qwen3VLForConditionalGeneration``,
  ``Qwen3VLMoeForConditionalGeneration``) and ``model_type`` the backbone's;
- the weights under the key names transformers writes for that stock class (its default ``save_pretrained``), with
  the LM head tied to the input embeddings: an embedder has no LM head and the export invents no weights;
- the backbone's processor and tokenizer files, and ``chat_template.jinja``: a chat template that renders a
  ``/v1/embeddings`` request's messages into exactly the prompt `UniMEV2Processor.format_prompt` builds;
- ``unime_vllm.json``: what vLLM must be told beside the folder (``hf_overrides`` for the image-position rule of
  Qwen2-VL/Qwen2.5-VL embedders, LAST pooling and normalisation, the image-resize policy the client must apply) and
  the matching offline and server invocations.

This module runs in the package's environment (transformers 5.x); vLLM itself runs in its own environment (see
``parity/vllm/``), so only torch and transformers are imported here.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
from pathlib import Path
from typing import Any

import torch
import transformers

EXPORT_FORMAT = 1
METADATA_FILE = "unime_vllm.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"

STOCK_ARCHITECTURES = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
    "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration",
}
MROPE_BACKBONES = ("qwen2_vl", "qwen2_5_vl")
# Embedders whose prompt is one user turn of the checkpoint's own chat template (the image placeholder removed).
CHAT_PROMPT_BACKBONES = {"llava_onevision": "<image>", "qwen3_vl": "<|image_pad|>", "qwen3_vl_moe": "<|image_pad|>"}

# Content-part types vLLM (and transformers) hand to a chat template for an image.
_IMAGE_PART_TYPES = "('image', 'image_url', 'image_pil', 'image_embeds')"

# Collects every text part of every message (a string content counts as one text part) and counts image parts.
_COLLECT_PARTS = (
    "{%- set unime = namespace(texts=[], images=0) -%}\n"
    "{%- for message in messages -%}\n"
    "  {%- if message['content'] is string -%}\n"
    "    {%- set unime.texts = unime.texts + [message['content']] -%}\n"
    "  {%- else -%}\n"
    "    {%- for part in message['content'] -%}\n"
    "      {%- if part['type'] == 'text' -%}\n"
    "        {%- set unime.texts = unime.texts + [part['text']] -%}\n"
    f"      {{%- elif part['type'] in {_IMAGE_PART_TYPES} -%}}\n"
    "        {%- set unime.images = unime.images + 1 -%}\n"
    "      {%- endif -%}\n"
    "    {%- endfor -%}\n"
    "  {%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if unime.images > 1 -%}{{ raise_exception('UniME-V2 embeds one image per input.') }}{%- endif -%}\n"
    # format_prompt: " ".join(part for part in (instruction, text) if part), the MMEB placeholder converted.
    "{%- set body = unime.texts | select | join(' ') | replace('<|image_1|>', IMAGE_TOKEN) -%}\n"
)

# Qwen2-VL / Qwen2.5-VL embedders use no chat format: "[<|image_pad|> ]instruction text" (the image token where the
# text has a placeholder, else first followed by a space), no <|vision_start|>.
_QWEN_TEMPLATE = (
    "{#- UniME-V2 embedding prompt (qwen2_vl family), written by modeling_unime.export.vllm.\n"
    "    Text parts are joined with one space (send the instruction, then the text), an image goes first. -#}\n"
    "{%- set IMAGE_TOKEN = '<|image_pad|>' -%}\n"
    + _COLLECT_PARTS
    + "{%- if unime.images and IMAGE_TOKEN not in body -%}\n"
    "  {%- set body = (IMAGE_TOKEN ~ ' ' ~ body) if body else IMAGE_TOKEN -%}\n"
    "{%- endif -%}\n"
    "{%- if body.count(IMAGE_TOKEN) > unime.images -%}"
    "{{ raise_exception('The text has an image placeholder but no image was given for it.') }}{%- endif -%}\n"
    "{{- body -}}"
)

# LLaVA-OneVision and Qwen3-VL embedders: the placeholder is removed from the text, which goes into ONE user turn of
# the checkpoint's own chat template (an image item first when there is an image), plus the generation prompt.
_CHAT_PREAMBLE = (
    "{#- UniME-V2 embedding prompt (BACKBONE), written by modeling_unime.export.vllm: the messages are reduced\n"
    "    to one user turn (image first, text parts joined with one space) and rendered by the checkpoint's own chat\n"
    "    template below, with the generation prompt. -#}\n"
    "{%- set IMAGE_TOKEN = 'PLACEHOLDER' -%}\n"
    + _COLLECT_PARTS
    + "{%- set body = body | replace(IMAGE_TOKEN ~ '\\n', '') | replace(IMAGE_TOKEN, '') | trim -%}\n"
    "{%- set messages = [{'role': 'user', 'content': ([{'type': 'image'}] if unime.images else [])"
    " + [{'type': 'text', 'text': body}]}] -%}\n"
    "{%- set add_generation_prompt = true -%}\n"
)


def embedding_chat_template(backbone_type: str, backbone_chat_template: str | None = None) -> str:
    """A chat template that renders messages into the UniME-V2 embedding prompt of ``backbone_type``.

    A request's text parts are joined with one space (the instruction first, then the text, as
    `UniMEV2Processor.format_prompt` joins them) and its image part, if any, is placed as the processor places it.
    For LLaVA-OneVision the reduced user turn is rendered by ``backbone_chat_template`` (the checkpoint's own).

    Example:
        >>> from jinja2 import Environment
        >>> template = Environment().from_string(embedding_chat_template("qwen2_vl"))
        >>> template.render(messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text",
        ...     "text": "Find an image caption describing the given image."}]}])
        '<|image_pad|> Find an image caption describing the given image.'
    """
    if backbone_type in MROPE_BACKBONES:
        return _QWEN_TEMPLATE
    if backbone_type in CHAT_PROMPT_BACKBONES:
        if not backbone_chat_template:
            raise ValueError(f"A {backbone_type} export needs the checkpoint's chat template (none was found).")
        preamble = _CHAT_PREAMBLE.replace("BACKBONE", backbone_type, 1).replace(
            "PLACEHOLDER", CHAT_PROMPT_BACKBONES[backbone_type], 1)
        return preamble + backbone_chat_template
    raise ValueError(f"No vLLM export for backbone {backbone_type!r}; supported: {', '.join(STOCK_ARCHITECTURES)}.")


def position_overrides(backbone_config: Any, image_position_rule: str) -> dict[str, Any]:
    """The ``hf_overrides`` that make vLLM position image tokens like the UniME-V2 model does.

    vLLM (like transformers 5.x) finds images by their ``<|image_pad|>`` tokens and gives them 3-D M-RoPE (t, h, w)
    positions. Under ``image_position_rule="vision_start_only"`` (transformers 4.49, how the released Qwen2-VL
    embedders were trained and evaluated) only an image right after ``<|vision_start|>`` gets 3-D positions, and the
    embedding prompt never contains ``<|vision_start|>`` (see `embedding_chat_template`): every token, image tokens
    included, gets the next text position, t = h = w. M-RoPE with t = h = w is plain RoPE, whatever the
    ``mrope_section``, so replacing the text config's rope parameters by plain RoPE with the same theta (and dropping
    the 4.49-style ``rope_scaling`` that would bring ``mrope_section`` back) gives exactly those positions. This holds
    only for prompts without ``<|vision_start|>``: the override is for this embedder, not for the chat model.

    Example:
        >>> from transformers import Qwen2VLConfig
        >>> position_overrides(Qwen2VLConfig(), "vision_start_only")
        {'text_config': {'rope_parameters': {'rope_type': 'default', 'rope_theta': 1000000.0}, 'rope_scaling': None}}
        >>> position_overrides(Qwen2VLConfig(), "all_images")
        {}
    """
    if backbone_config.model_type not in MROPE_BACKBONES or image_position_rule != "vision_start_only":
        return {}
    text_config = backbone_config.get_text_config()
    rope = getattr(text_config, "rope_parameters", None) or getattr(text_config, "rope_scaling", None) or {}
    theta = rope.get("rope_theta", getattr(text_config, "rope_theta", None))
    if theta is None:
        raise ValueError("The backbone config names no rope_theta; cannot write the position override.")
    return {
        "text_config": {"rope_parameters": {"rope_type": "default", "rope_theta": float(theta)}, "rope_scaling": None}
    }


# Key names of the stock checkpoints (Qwen/Qwen2-VL-*, llava-hf/llava-onevision-*, the authors' releases: written by
# transformers 4.4x), from the UniME-V2 backbone's names (`model.` + the 5.x base model's names). These are what vLLM
# loads. transformers 5.19-5.24's own save_pretrained writes the Qwen names the same way, but for LLaVA-OneVision it
# writes `vision_tower.embeddings.*` (its vision tower lost the `vision_model.` level), which vLLM 0.32 refuses ("no
# module or parameter named 'vision_tower.embeddings'"); both transformers versions load the names below.
RELEASE_KEY_NAMES: dict[str, tuple[tuple[str, str], ...]] = {
    "qwen2_vl": (("model.language_model.", "model."), ("model.visual.", "visual.")),
    "llava_onevision": (
        ("model.language_model.", "language_model.model."),
        ("model.vision_tower.vision_model.", "vision_tower.vision_model."),
        ("model.vision_tower.", "vision_tower.vision_model."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("model.image_newline", "image_newline"),
    ),
}
RELEASE_KEY_NAMES["qwen2_5_vl"] = RELEASE_KEY_NAMES["qwen2_vl"]
# Qwen3-VL's published checkpoints already use the names the model has today.
RELEASE_KEY_NAMES["qwen3_vl"] = RELEASE_KEY_NAMES["qwen3_vl_moe"] = (
    ("model.language_model.", "model.language_model."), ("model.visual.", "model.visual."))


def release_state_dict(unime_model: Any) -> dict[str, torch.Tensor]:
    """The backbone's weights under the stock checkpoints' key names (no LM head: it is tied on load)."""
    renames = RELEASE_KEY_NAMES[unime_model.config.backbone_type]
    state = {}
    for key, tensor in unime_model.state_dict().items():
        for old, new in renames:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        else:
            raise ValueError(f"Unexpected weight {key!r} in a {unime_model.config.backbone_type} embedder.")
        state[key] = tensor
    return state


def _stock_model(unime_model: Any) -> Any:
    """The stock ``*ForConditionalGeneration`` around the UniME-V2 backbone (the same tensors, no copy), LM head
    tied to the input embeddings."""
    config = unime_model.config.backbone_config
    config = config.__class__.from_dict(config.to_dict())
    architecture = STOCK_ARCHITECTURES[config.model_type]
    config.architectures = [architecture]
    config.tie_word_embeddings = True
    text_config = config.get_text_config()
    if text_config is not config:
        text_config.tie_word_embeddings = True
    config.use_cache = True
    stock_class = getattr(transformers, architecture)
    with torch.device("meta"):
        stock = stock_class(config)
    stock.model = unime_model.model
    stock.config = config
    stock.lm_head.weight = stock.model.get_input_embeddings().weight
    return stock


def _without_keys(data: Any, keys: tuple[str, ...]) -> Any:
    if isinstance(data, dict):
        return {key: _without_keys(value, keys) for key, value in data.items() if key not in keys}
    return data


def _write_processor_files(processor: Any, destination: Path) -> str:
    """Save the backbone processor and tokenizer; the chat template becomes the embedding template. Returns it."""
    from ..processing_unime import BACKBONE_PROCESSOR_CLASSES

    backbone_processor = processor.backbone_processor
    template = embedding_chat_template(processor.backbone_type, backbone_processor.chat_template)
    BACKBONE_PROCESSOR_CLASSES[processor.backbone_type].save_pretrained(backbone_processor, destination)
    # One chat template in the folder, the embedding one: older files or keys would shadow it in some loaders. No
    # auto_map either: the folder is loaded by the stock classes, never by UniME-V2 code.
    (destination / "chat_template.json").unlink(missing_ok=True)
    for name in ("tokenizer_config.json", "processor_config.json", "preprocessor_config.json"):
        path = destination / name
        if path.is_file():
            data = json.loads(path.read_text())
            cleaned = _without_keys(data, ("chat_template", "auto_map"))
            if cleaned != data:
                path.write_text(json.dumps(cleaned, indent=2, ensure_ascii=False) + "\n")
    _add_video_processor(destination, processor.backbone_type)
    (destination / CHAT_TEMPLATE_FILE).write_text(template)
    return template


VIDEO_PROCESSOR_TYPES = {
    "qwen2_vl": "Qwen2VLVideoProcessor",
    "qwen2_5_vl": "Qwen2VLVideoProcessor",
    "llava_onevision": "LlavaOnevisionVideoProcessor",
    "qwen3_vl": "Qwen3VLVideoProcessor",
    "qwen3_vl_moe": "Qwen3VLVideoProcessor",
}
_SHARED_WITH_VIDEO = ("do_convert_rgb", "do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std",
                      "resample", "patch_size", "temporal_patch_size", "merge_size")


def _add_video_processor(destination: Path, backbone_type: str) -> None:
    """The stock processors (vLLM's transformers) require a video processor, which the package's processors leave
    out (it needs torchvision): describe one in processor_config.json from the image processor's settings. UniME-V2
    embeds no videos; this only lets the stock processor load."""
    path = destination / "processor_config.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    if "video_processor" in data or (destination / "video_preprocessor_config.json").is_file():
        return
    image = data.get("image_processor")
    if image is None and (destination / "preprocessor_config.json").is_file():
        image = json.loads((destination / "preprocessor_config.json").read_text())
    image = image or {}
    video = {key: image[key] for key in _SHARED_WITH_VIDEO if key in image}
    if backbone_type == "llava_onevision" and "size" in image:
        video["size"] = image["size"]
    video["video_processor_type"] = VIDEO_PROCESSOR_TYPES[backbone_type]
    data["video_processor"] = video
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def vllm_metadata(unime_config: Any, processor: Any, destination: str | os.PathLike) -> dict[str, Any]:
    """The content of ``unime_vllm.json``: how to run the exported folder in vLLM."""
    backbone = unime_config.backbone_config
    rule = getattr(unime_config, "image_position_rule", "vision_start_only")
    overrides = position_overrides(backbone, rule)
    normalize = bool(getattr(unime_config, "normalize", True))
    # vLLM's PoolerConfig: LAST pooling; use_activation is the L2 normalisation of embed poolers ("normalize" was
    # its old name, refused by vLLM 0.32).
    pooler = {"pooling_type": "LAST", "use_activation": normalize}
    notes = [
        "Prompts: send one string with ONE image token (vLLM expands it), or messages through /v1/embeddings "
        "with the chat template of this folder (text parts: the instruction, then the text).",
        "Images: vLLM feeds them at the size it receives them; resize them first under image_resize "
        "(modeling_unime.processing_unime.resize_image) to embed like UniMEV2Model.encode.",
    ]
    # Each note only where it applies: an all_images checkpoint needs no override and must not be told it does.
    if overrides:
        notes.append("hf_overrides (Qwen2-VL/Qwen2.5-VL, image_position_rule vision_start_only): plain RoPE gives "
                     "image tokens text positions, as transformers 4.49 did for the embedding prompt (which has no "
                     "<|vision_start|>).")
    elif backbone.model_type in MROPE_BACKBONES:
        notes.append(f"No hf_overrides: under image_position_rule {rule} image tokens get 3-D M-RoPE positions, as "
                     "stock vLLM gives them.")
    if not normalize:
        notes.append("The checkpoint does not normalise its embeddings (normalize=False): the pooler leaves them as "
                     "they are (use_activation false).")
    if getattr(unime_config, "matryoshka_dim", None):
        notes.append("matryoshka_dim: keep the first dimensions and L2-normalise again on the client.")
    folder = os.fspath(destination)
    server = [
        "python", "-m", "vllm.entrypoints.openai.api_server", "--model", folder,
        "--runner", "pooling", "--convert", "embed",
        "--pooler-config", json.dumps(pooler),
        "--chat-template", os.path.join(folder, CHAT_TEMPLATE_FILE), "--chat-template-content-format", "openai",
    ]
    if overrides:
        server += ["--hf-overrides", json.dumps(overrides)]
    return {
        "format": EXPORT_FORMAT,
        "exported_by": "modeling_unime.export.vllm",
        "backbone_type": backbone.model_type,
        "architecture": STOCK_ARCHITECTURES[backbone.model_type],
        "runner": "pooling",
        "convert": "embed",
        "hf_overrides": overrides,
        "pooler_config": pooler,
        "image_position_rule": rule if backbone.model_type in MROPE_BACKBONES else None,
        "image_token": processor.image_token,
        "image_resize": processor.image_resize,
        "embedding_dim": unime_config.hidden_size,
        "matryoshka_dim": getattr(unime_config, "matryoshka_dim", None),
        "chat_template": CHAT_TEMPLATE_FILE,
        "notes": notes,
        "offline": {
            "runner": "pooling", "convert": "embed", "hf_overrides": overrides or None, "pooler_config": pooler,
        },
        "server_command": " ".join(shlex.quote(part) for part in server),
    }


def export_for_vllm(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    dtype: torch.dtype | str | None = "auto",
    max_shard_size: str | int = "5GB",
    **load_kwargs: Any,
) -> Path:
    """Write ``destination``: a stock-architecture checkpoint of the UniME-V2 embedder at ``source`` that vLLM loads
    with ``runner="pooling", convert="embed"``, plus ``unime_vllm.json`` (see the module docstring).

    ``source`` is a UniME-V2 checkpoint or a plain backbone checkpoint in the authors' layout (anything
    `UniMEV2Model.from_pretrained` loads). Returns the destination path.
    """
    from .. import UniMEV2Model, UniMEV2Processor

    if dtype is not None:
        load_kwargs["dtype"] = dtype
    unime = UniMEV2Model.from_pretrained(source, **load_kwargs)
    backbone_type = unime.config.backbone_type
    if backbone_type not in STOCK_ARCHITECTURES:
        raise ValueError(f"No vLLM export for backbone {backbone_type!r}.")
    processor = UniMEV2Processor.from_pretrained(source)
    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    stock = _stock_model(unime)
    # Key names written explicitly (see RELEASE_KEY_NAMES), not by transformers' reverse mapping.
    stock.save_pretrained(destination, state_dict=release_state_dict(unime), max_shard_size=max_shard_size,
                          save_original_format=False)
    _write_processor_files(processor, destination)
    metadata = vllm_metadata(unime.config, processor, destination)
    (destination / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    return destination


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a UniME-V2 checkpoint folder, or a plain backbone checkpoint (authors' layout)")
    parser.add_argument("destination", help="output folder")
    parser.add_argument("--dtype", default="auto", help="weights dtype: auto, float32, bfloat16, float16")
    args = parser.parse_args(argv)
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    path = export_for_vllm(args.source, args.destination, dtype=dtype)
    metadata = json.loads((path / METADATA_FILE).read_text())
    print(f"vLLM embedder checkpoint written to {path} ({metadata['architecture']}).")
    print(f"Serve it (in the vLLM environment):\n  {metadata['server_command']}")


if __name__ == "__main__":
    main()


__all__ = ["export_for_vllm", "embedding_chat_template", "position_overrides", "vllm_metadata", "STOCK_ARCHITECTURES"]
