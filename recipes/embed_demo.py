"""Embedding demo on a tiny offline model: the whole model-package path, end to end, in about ten seconds.

1. builds a tiny Qwen2-VL (random weights, a tokenizer trained on the fly) and saves it in the authors' layout;
2. converts it to a self-contained UniME-V2 checkpoint (``python -m modeling_unime.convert``);
3. loads it back the way users do, ``AutoModel.from_pretrained(path, trust_remote_code=True)``;
4. embeds captions, images and image+text rows and prints the image-caption cosine matrix.

The weights are random, so the similarities carry no meaning: the demo shows the API and the file layout.
Outputs go to ``--output_dir`` (default ``runs/embed-demo``).

    python recipes/embed_demo.py [--family qwen2_vl|qwen2_5_vl|llava_onevision] [--threads 1] [--output_dir DIR]
                                 [--dtype auto] [--attn_implementation auto]

The loaded model goes where the other recipes put theirs (`modeling_unime.placement`): this process's device, bf16
and the best attention kernel on an accelerator, float32 and sdpa on CPU; the line ``placement: ...`` says where.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoModel  # noqa: E402

import modeling_unime  # noqa: E402,F401  (registers the auto classes)
from modeling_unime.export.convert import convert_checkpoint  # noqa: E402
from modeling_unime.placement import ATTN_IMPLEMENTATIONS, DTYPE_NAMES, describe, pretrained_kwargs  # noqa: E402
from modeling_unime.recipe_engine import start_recipe  # noqa: E402
from modeling_unime.tiny import (  # noqa: E402  # noqa: E402
    build_tiny_causal_lm,
    build_tiny_processor,
    build_tiny_tokenizer,
    draw_shape,
    save_in_authors_layout,
)
from modeling_unime.util.arguments import parse_recipe_arguments  # noqa: E402

SHAPES = [("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "circle")]


@dataclass
class EmbedDemoArguments:
    family: str = field(default="qwen2_vl", metadata={
        "help": "backbone family of the tiny model", "choices": list(modeling_unime.SUPPORTED_BACKBONES)})
    output_dir: str = field(default="runs/embed-demo", metadata={"help": "where the checkpoints and embeddings go"})
    threads: int = field(default=1, metadata={"help": "torch threads"})
    dtype: str = field(default="auto", metadata={
        "choices": DTYPE_NAMES, "help": "model dtype; auto: bfloat16 on a GPU, float32 on CPU"})
    attn_implementation: str = field(default="auto", metadata={
        "choices": ATTN_IMPLEMENTATIONS,
        "help": "attention kernel; auto: flash_attention_2 where it can run, else sdpa"})


def main(argv: list[str] | None = None) -> None:
    (args,) = parse_recipe_arguments([EmbedDemoArguments], argv, description=__doc__)
    run = start_recipe(args.threads, args.dtype, args.attn_implementation)
    output = Path(args.output_dir)

    tokenizer = build_tiny_tokenizer(args.family)
    authors_folder = save_in_authors_layout(
        build_tiny_causal_lm(args.family, tokenizer=tokenizer), build_tiny_processor(args.family, tokenizer),
        output / "authors-layout",
    )
    print(f"[1/4] tiny {args.family} saved in the authors' layout: {authors_folder}")
    checkpoint = convert_checkpoint(authors_folder, output / "unime-v2-tiny", verify=True)
    print(f"[2/4] converted to a UniME-V2 checkpoint: {checkpoint} ({', '.join(sorted(os.listdir(checkpoint)))})")
    model = AutoModel.from_pretrained(checkpoint, trust_remote_code=True, **pretrained_kwargs(run.where))
    print(f"[3/4] loaded with AutoModel (trust_remote_code=True): {type(model).__name__}")
    print(f"placement: {describe(model, 'embedder')}")

    captions = [f"a {colour} {shape}" for colour, shape in SHAPES]
    images = [draw_shape(colour, shape) for colour, shape in SHAPES]
    caption_embeddings = model.encode(texts=captions)
    image_embeddings = model.encode(images=images, instruction="Find an image caption describing the given image.")
    both = model.encode(texts=["What colour is the shape?"] * len(images), images=images)
    similarity = image_embeddings @ caption_embeddings.T
    print("[4/4] image x caption cosine similarity (random weights: the numbers carry no meaning)")
    print("            " + "".join(f"{caption:>18}" for caption in captions))
    for (colour, shape), row in zip(SHAPES, similarity.tolist()):
        print(f"{colour + ' ' + shape:>12}" + "".join(f"{value:18.4f}" for value in row))

    save_file(
        {"captions": caption_embeddings, "images": image_embeddings, "image_and_text": both},
        str(output / "embeddings.safetensors"),
    )
    summary = {
        "family": args.family,
        "placement": describe(model, "embedder"),
        "checkpoint": str(checkpoint),
        "embedding_dim": caption_embeddings.shape[1],
        "rows": {"captions": len(captions), "images": len(images), "image_and_text": len(images)},
        "max_norm_error": float((torch.cat([caption_embeddings, image_embeddings, both]).norm(dim=1) - 1).abs().max()),
        "image_caption_similarity": similarity.tolist(),
    }
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"embeddings and summary written to {output}")


if __name__ == "__main__":
    main()
