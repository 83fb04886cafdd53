"""Convert a checkpoint in the authors' layout into a self-contained UniME-V2 checkpoint.

    python -m modeling_unime.convert SRC DST [--base_model ID] [--repo_id ORG/NAME] [--verify] [--vllm DIR]

SRC is a folder or Hub repo id of a plain Qwen2-VL / Qwen2.5-VL / LLaVA-OneVision checkpoint (e.g. the authors'
TianchengGu/UniME-V2-Qwen2VL-2B). DST receives the config with ``auto_map``, the model code, the weights, the
processor files and a model card, so that ``AutoModel.from_pretrained(DST, trust_remote_code=True)`` works without
this package, and the sentence-transformers files, so that ``SentenceTransformer(DST, trust_remote_code=True)`` does
too (`modeling_unime.sentence_unime`).
"""

from __future__ import annotations

import argparse
import copy
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from .. import UniMEV2Model, UniMEV2Processor
from ..configuration_unime import MROPE_BACKBONES
from ..sentence_unime import add_sentence_transformers_files
from .card import write_model_card

PROBE_TEXTS = ["A man is crossing the street with a red car parked nearby.", "a photo of a dog"]
PROBE_INSTRUCTION = "Find an image caption describing the given image."
PROBE_QUESTION = "<|image_1|>\nRepresent the given image with the following question: What is in the image?\n"


def probe_image() -> Image.Image:
    """A small non-square drawing: enough structure that wrong image positions change the embedding."""
    image = Image.new("RGB", (96, 64), (235, 235, 225))
    draw = ImageDraw.Draw(image)
    draw.rectangle((8, 8, 40, 56), fill=(200, 30, 30))
    draw.ellipse((50, 12, 90, 52), fill=(30, 60, 200))
    return image


def probe_rows() -> tuple[list[str | None], list[Image.Image | None], list[str | None]]:
    """(texts, images, instructions): two texts, an image with the retrieval instruction, an MMEB image+text row."""
    image = probe_image()
    return (
        [*PROBE_TEXTS, None, PROBE_QUESTION],
        [None, None, image, image],
        [None, None, PROBE_INSTRUCTION, None],
    )


def _native_size(processor: UniMEV2Processor) -> UniMEV2Processor:
    """A copy that feeds the small probe image at its own size: a 1344x1344 probe would cost a 7B model minutes on
    CPU and tests nothing more about the weights or the positions."""
    native = copy.copy(processor)
    native.image_resize = "native"
    return native


def _embed_probes(model: UniMEV2Model, processor: UniMEV2Processor) -> torch.Tensor:
    processor = _native_size(processor)
    texts, images, instructions = probe_rows()
    rows = [model.encode(texts=[text], images=[image], instruction=instruction, processor=processor)
            for text, image, instruction in zip(texts, images, instructions)]
    return torch.cat(rows)


@torch.inference_mode()
def reference_embeddings(source: str | os.PathLike, processor: UniMEV2Processor, **load_kwargs) -> torch.Tensor:
    """The probes embedded by the authors' recipe on the SOURCE checkpoint, through transformers' stock class.

    Their recipe: a causal-LM forward with every hidden state, ``hidden_states[-1][:, -1]``, L2-normalised. Their
    transformers (4.49) gave image tokens without ``<|vision_start|>`` text positions; here that is obtained the way
    transformers 5.x allows, by marking no token as an image token in ``mm_token_type_ids``, independently of the
    position code in `UniMEV2Model`.
    """
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(source, **load_kwargs).eval()
    processor = _native_size(processor)
    texts, images, instructions = probe_rows()
    embeddings = []
    for row, (text, image, instruction) in enumerate(zip(texts, images, instructions)):
        batch = processor(texts=[text], images=[image], instruction=instruction)
        if model.config.model_type in MROPE_BACKBONES and "mm_token_type_ids" in batch:
            batch["mm_token_type_ids"] = torch.zeros_like(batch["mm_token_type_ids"])
        batch = {key: value.to(model.device, model.dtype) if value.is_floating_point() else value.to(model.device)
                 for key, value in batch.items()}
        hidden = model(**batch, output_hidden_states=True, return_dict=True).hidden_states[-1][:, -1]
        embeddings.append(F.normalize(hidden.float(), dim=-1).cpu())
    del model
    return torch.cat(embeddings)


def convert_checkpoint(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    base_model: str | None = None,
    repo_id: str | None = None,
    verify: bool = False,
    verify_atol: float | None = None,
    **load_kwargs,
) -> Path:
    """Load ``source`` (every backbone weight must load), save it to ``destination`` as a UniME-V2 checkpoint.

    With ``verify=True`` the written checkpoint is loaded back and must embed the probes (texts, an image with the
    retrieval instruction, an MMEB image+text row) like the authors' recipe run on ``source`` with transformers' stock
    class (see `reference_embeddings`), to ``verify_atol``; the largest difference is printed.
    """
    model, loading_info = UniMEV2Model.from_pretrained(source, output_loading_info=True, **load_kwargs)
    if loading_info["missing_keys"]:
        missing = sorted(loading_info["missing_keys"])
        raise ValueError(
            f"{len(missing)} backbone weights of {os.fspath(source)!r} were not found under any known key layout "
            f"(first: {missing[:5]}); the checkpoint is not a supported Qwen2-VL/Qwen2.5-VL/LLaVA-OneVision layout."
        )
    processor = UniMEV2Processor.from_pretrained(source)
    destination = Path(destination)
    model.save_pretrained(destination)
    processor.save_pretrained(destination)
    add_sentence_transformers_files(destination)
    name = os.fspath(source).rstrip("/")
    write_model_card(
        destination,
        model_name=repo_id.split("/")[-1] if repo_id else destination.name,
        repo_id=repo_id or destination.name,
        base_model=base_model or name,
        backbone_type=model.config.backbone_type,
        embedding_dim=model.config.hidden_size,
        image_resize=processor.image_resize,
        image_position_rule=model.config.image_position_rule,
        training=f"Converted from `{name}` (the authors' release) by `python -m modeling_unime.convert`; "
        "no further training.",
    )
    if verify:
        del model  # one model in memory at a time: the 7B checkpoints are large
        verify_checkpoint(source, destination, atol=verify_atol, **load_kwargs)
    return destination


def verify_checkpoint(
    source: str | os.PathLike, converted: str | os.PathLike, atol: float | None = None, **load_kwargs
) -> float:
    """Check a converted checkpoint against the authors' recipe on its source; returns the largest difference.

    The probes (two texts, an image with the retrieval instruction, an MMEB image+text row) embedded by the
    converted checkpoint through `UniMEV2Model` must equal `reference_embeddings` on ``source`` to ``atol``
    (default 1e-4 in float32, 2e-2 in lower precision); a RuntimeError says by how much they differ otherwise.
    """
    expected = reference_embeddings(source, UniMEV2Processor.from_pretrained(source), **load_kwargs)
    reloaded = UniMEV2Model.from_pretrained(converted, **load_kwargs)
    actual = _embed_probes(reloaded, UniMEV2Processor.from_pretrained(converted))
    difference = float((actual - expected).abs().max())
    atol = atol if atol is not None else (1e-4 if reloaded.dtype == torch.float32 else 2e-2)
    print(f"verify: {len(actual)} probe rows (2 texts, 1 image, 1 image+text), max |diff| {difference:.2e} against "
          f"the authors' recipe (tolerance {atol:g}, dtype {reloaded.dtype})")
    if not difference <= atol:
        raise RuntimeError(
            f"The converted checkpoint embeds the probes differently from the authors' recipe on the source "
            f"(max |diff| {difference:.3g} > {atol:g})."
        )
    return difference


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="folder or Hub repo id in the authors' layout")
    parser.add_argument("destination", help="output folder")
    # snake_case like the recipes' flags; the kebab spellings still work
    parser.add_argument("--base_model", "--base-model", default=None,
                        help="base_model recorded in the card (default: SOURCE)")
    parser.add_argument("--repo_id", "--repo-id", default=None,
                        help="the Hub repo id the card's usage snippet should name")
    parser.add_argument("--dtype", default="auto", help="weights dtype: auto, float32, bfloat16, float16")
    parser.add_argument("--verify", action="store_true",
                        help="reload the output; its probe embeddings (texts, image, image+text) must equal the "
                             "authors' recipe on SOURCE")
    parser.add_argument("--vllm", metavar="DIR", default=None,
                        help="also write a folder vLLM serves as an embedder (stock architecture and key names, a "
                             "chat template rendering the embedding prompt, unime_vllm.json with the server command; "
                             "see modeling_unime.export.vllm)")
    args = parser.parse_args(argv)
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    path = convert_checkpoint(
        args.source, args.destination, base_model=args.base_model, repo_id=args.repo_id, verify=args.verify, dtype=dtype
    )
    print(f"UniME-V2 checkpoint written to {path}")
    if args.vllm:
        from .vllm import export_for_vllm

        # From the converted folder, so that the export records the checkpoint's image rule.
        print(f"vLLM embedder folder written to {export_for_vllm(path, args.vllm, dtype=dtype)}")


if __name__ == "__main__":
    main()
