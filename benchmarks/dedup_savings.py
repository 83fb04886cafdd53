"""What de-duplicating a training step's inputs saves: rows and tokens encoded per step, with and without
(`trainers.collator.UniMEV2Collator`, ``deduplicate``), on realistic batches.

- **The authors' sample**: the 50 judge-scored rows of their released training file (``--authors_file``; default
  ``../shared/data/unime_v2_official_example_data.json`` when present), as one step of 50 queries x (1 + k).
- **MMEB-train-shaped steps**, built from the released task structure: classification tasks whose candidates are
  the class-label texts (ImageNet-1K 1000 labels, SUN397 397, N24News 24, VOC2007 20, HatefulMemes 2), one image
  query per row with its label as the positive and k other labels as the mined negatives; and a retrieval task whose
  captions and images are all distinct (MSCOCO_t2i-like), where nothing can be saved.

Rows are counted through the real collator (its chunks). Tokens are counted as Qwen2-VL-2B would see them at the
authors' training size: the text tokens of the real Qwen2 tokenizer (``--tokenizer``, default the authors' fixture
folder when it has been built) plus 576 tokens per image (672x672, 28-pixel merged patches); images are drawn tiny, as
they do not change the counts.

    python benchmarks/dedup_savings.py [--batch_size 256] [--num_negatives 8] [--threads 1]

Last line: JSON with, per batch kind, rows and tokens encoded with and without, and the saving ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from modeling_unime.data import load_official_json  # noqa: E402
from modeling_unime.tiny import build_tiny_processor  # noqa: E402
from trainers.collator import UniMEV2Collator, distinct_inputs  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
AUTHORS_FILE = REPO.parent / "shared" / "data" / "unime_v2_official_example_data.json"
AUTHORS_TOKENIZER = REPO / "tests" / "fixtures" / "authors" / "qwen2vl-2b"
IMAGE_TOKENS = (672 // 28) ** 2  # Qwen2-VL at the authors' training size: one token per 28x28 merged patch
CLASSIFICATION_LABELS = {"ImageNet_1K": 1000, "SUN397": 397, "N24News": 24, "VOC2007": 20, "HatefulMemes": 2}


def classification_rows(task: str, labels: int, batch: int, negatives: int, rng: random.Random) -> list[dict]:
    names = [f"{task} class {index}" for index in range(labels)]
    rows = []
    for query in range(batch):
        answer = rng.randrange(labels)
        others = rng.sample([index for index in range(labels) if index != answer], min(negatives, labels - 1))
        rows.append(dict(query_text="<|image_1|> Represent the given image for classification",
                         query_image=f"{task}/{query}.png", pos_text=names[answer], pos_image=None,
                         neg_texts=[names[index] for index in others], neg_images=[None] * len(others),
                         judge_scores=[0.9, *[0.1] * len(others)]))
    return rows


def retrieval_rows(batch: int, negatives: int) -> list[dict]:
    return [dict(query_text=f"a caption of picture {query}", query_image=None, pos_text="",
                 pos_image=f"coco/{query}.png", neg_texts=[""] * negatives,
                 neg_images=[f"coco/{batch + query * negatives + index}.png" for index in range(negatives)],
                 judge_scores=[0.9, *[0.1] * negatives]) for query in range(batch)]


def authors_rows(path: Path, negatives: int) -> list[dict]:
    dataset = load_official_json(path)
    return [dict(row, neg_texts=row["neg_texts"][:negatives], neg_images=row["neg_images"][:negatives],
                 judge_scores=row["judge_scores"][:negatives + 1]) for row in dataset]


def draw_images(rows: list[dict], root: Path) -> None:
    """A tiny picture at every image path of the rows (a distinct colour per path), so the collator can load them."""
    paths = {row["query_image"] for row in rows} | {row["pos_image"] for row in rows}
    paths |= {image for row in rows for image in row["neg_images"] or []}
    for number, path in enumerate(sorted(path for path in paths if path)):
        target = root / path
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (28, 28), (number % 251, number // 251 % 251, 90)).save(target)


def count(rows: list[dict], root: Path, negatives: int, deduplicate: bool, text_tokens) -> dict[str, int]:
    """Rows the collator encodes for one step and their tokens (Qwen2 text tokens + image tokens)."""
    collator = UniMEV2Collator(build_tiny_processor("qwen2_vl"), num_negatives=negatives, image_root=root,
                               deduplicate=deduplicate)
    batch = collator(rows)
    encoded = sum(chunk["input_ids"].shape[0] for chunk in batch["chunks"])
    # the same rows, as (text, image) pairs, in the order the collator encoded them
    items = [(row["query_text"], row["query_image"]) for row in rows]
    for row in rows:
        chosen = collator.choose_negatives(row)
        items += [(row["pos_text"], row["pos_image"])]
        items += [(row["neg_texts"][position], (row["neg_images"] or [None] * 99)[position]) for position in chosen]
    if deduplicate:
        items, _ = distinct_inputs(batch["input_index"].tolist(), items)
    assert len(items) == encoded
    tokens = sum(text_tokens(text or "") + (IMAGE_TOKENS if image else 0) for text, image in items)
    return {"rows": encoded, "tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=256, help="queries per step (the authors: 256 per device)")
    parser.add_argument("--num_negatives", type=int, default=8)
    parser.add_argument("--authors_file", type=Path, default=AUTHORS_FILE if AUTHORS_FILE.is_file() else None)
    parser.add_argument("--tokenizer", type=Path, default=AUTHORS_TOKENIZER if AUTHORS_TOKENIZER.is_dir() else None,
                        help="a folder with the Qwen2 tokenizer (default: the authors' fixture when built)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.tokenizer is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(args.tokenizer))
        tokenizer_name = f"Qwen2 ({args.tokenizer.name})"
    else:
        tokenizer = build_tiny_processor("qwen2_vl").tokenizer
        tokenizer_name = "tiny (no Qwen2 tokenizer found: token counts are only indicative)"

    def text_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    rng = random.Random(args.seed)
    kinds: dict[str, list[dict]] = {}
    if args.authors_file is not None:
        kinds["authors' 50-row sample"] = authors_rows(args.authors_file, args.num_negatives)
    for task, labels in CLASSIFICATION_LABELS.items():
        kinds[f"{task} ({labels} labels)"] = classification_rows(task, labels, args.batch_size, args.num_negatives,
                                                                 rng)
    kinds["retrieval (distinct captions and images)"] = retrieval_rows(args.batch_size, args.num_negatives)
    root = Path(tempfile.mkdtemp(prefix="dedup-savings-"))
    results = {}
    for name, rows in kinds.items():
        draw_images(rows, root)
        plain = count(rows, root, args.num_negatives, False, text_tokens)
        shared = count(rows, root, args.num_negatives, True, text_tokens)
        results[name] = {"queries": len(rows), "plain": plain, "deduplicated": shared,
                         "rows_ratio": round(plain["rows"] / shared["rows"], 3),
                         "tokens_ratio": round(plain["tokens"] / shared["tokens"], 3)}
        print(f"{name:>45}: rows {plain['rows']:>6} -> {shared['rows']:>6} ({results[name]['rows_ratio']:.2f}x), "
              f"tokens {plain['tokens']:>9,} -> {shared['tokens']:>9,} ({results[name]['tokens_ratio']:.2f}x)",
              flush=True)
    print(json.dumps({"batch_size": args.batch_size, "num_negatives": args.num_negatives,
                      "image_tokens": IMAGE_TOKENS, "tokenizer": tokenizer_name, "kinds": results}))


if __name__ == "__main__":
    main()
