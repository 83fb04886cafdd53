"""Embedding throughput: UniMEV2Model.encode against the authors' recipe, same weights, same inputs, same run.

The authors' recipe is a full causal-LM forward with ``output_hidden_states=True`` (every layer kept, logits over the
whole vocabulary at every position), then the last layer's last token, L2-normalised. Ours runs the base model only
and gathers one row per sequence. The backbone is a tiny Qwen2-VL with the real 151,936-token vocabulary.

    python benchmarks/embed_throughput.py [--threads 1] [--rows 48] [--batch_size 8] [--hidden_size 256]

Last line: JSON with ours_items_per_s, reference_items_per_s, speedup, max_abs_diff.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from modeling_unime import UniMEV2Config, UniMEV2Model  # noqa: E402
from modeling_unime.tiny import build_tiny_causal_lm, build_tiny_processor, build_tiny_tokenizer  # noqa: E402

INSTRUCTION = "Find an image caption describing the given image."


def make_inputs(rows: int, seed: int = 0) -> tuple[list[str | None], list[Image.Image | None]]:
    rng = random.Random(seed)
    colours = ["red", "green", "blue", "yellow", "black", "white"]
    shapes = ["circle", "square", "triangle", "car", "dog", "street"]
    texts, images = [], []
    for row in range(rows):
        caption = " ".join(
            f"a {rng.choice(colours)} {rng.choice(shapes)}" for _ in range(rng.randint(1, 4))
        )
        if row % 2:
            side = rng.choice([112, 168, 224])
            pixels = torch.randint(0, 256, (side, side, 3), generator=torch.Generator().manual_seed(row))
            images.append(Image.fromarray(pixels.to(torch.uint8).numpy()))
            texts.append(f"{INSTRUCTION} {caption}")
        else:
            images.append(None)
            texts.append(caption)
    return texts, images


def authors_recipe(causal_lm, processor, texts, images, batch_size):
    pieces = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = processor(texts=texts[start : start + batch_size], images=images[start : start + batch_size])
            # Their transformers 4.49 positioned image tokens without <|vision_start|> as text; in 5.x: no token
            # marked as an image token.
            batch["mm_token_type_ids"] = torch.zeros_like(batch["mm_token_type_ids"])
            hidden = causal_lm(**batch, output_hidden_states=True, return_dict=True).hidden_states[-1]
            pieces.append(F.normalize(hidden[:, -1, :].float(), dim=-1))
    return torch.cat(pieces)


def best_time(function, repeats):
    timings, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        timings.append(time.perf_counter() - start)
    return min(timings), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps ratios stable on shared CPUs)")
    parser.add_argument("--rows", type=int, default=48)
    parser.add_argument("--batch_size", "--batch-size", type=int, default=8)
    parser.add_argument("--hidden_size", "--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    tokenizer = build_tiny_tokenizer("qwen2_vl")
    processor = build_tiny_processor("qwen2_vl", tokenizer, max_pixels=256 * 28 * 28)
    causal_lm = build_tiny_causal_lm(
        "qwen2_vl", tokenizer=tokenizer, real_vocab=True, hidden_size=args.hidden_size, num_hidden_layers=args.layers
    )
    model = UniMEV2Model(UniMEV2Config(backbone_config=causal_lm.config.to_dict())).eval()
    model.model.load_state_dict(causal_lm.model.state_dict())
    texts, images = make_inputs(args.rows)

    # Warm-up of both paths (allocator, kernels), not timed.
    model.encode(texts=texts[:4], images=images[:4], processor=processor, show_progress_bar=False)
    authors_recipe(causal_lm, processor, texts[:4], images[:4], args.batch_size)

    ours_s, ours = best_time(
        lambda: model.encode(
            texts=texts, images=images, processor=processor, batch_size=args.batch_size, show_progress_bar=False
        ),
        args.repeats,
    )
    reference_s, reference = best_time(
        lambda: authors_recipe(causal_lm, processor, texts, images, args.batch_size), args.repeats
    )
    result = {
        "rows": args.rows,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "vocab_size": causal_lm.config.text_config.vocab_size,
        "hidden_size": args.hidden_size,
        "ours_s": round(ours_s, 4),
        "reference_s": round(reference_s, 4),
        "ours_items_per_s": round(args.rows / ours_s, 2),
        "reference_items_per_s": round(args.rows / reference_s, 2),
        "speedup": round(reference_s / ours_s, 2),
        "max_abs_diff": float((ours - reference).abs().max()),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
