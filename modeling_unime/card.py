"""Model cards made from the ``model_card.md`` template (Hub metadata, usage, training, evaluation, citation)."""

from __future__ import annotations

import os
from pathlib import Path
from string import Template
from typing import Any

TEMPLATE_NAME = "model_card.md"
DEFAULT_TAGS = (
    "unime-v2", "multimodal-embedding", "sentence-similarity", "sentence-transformers", "image-text-retrieval"
)
RERANKER_TAGS = ("unime-v2", "reranker", "multimodal-reranking", "image-text-retrieval")

EMBEDDER_USAGE = """```python
from sentence_transformers import SentenceTransformer

model = SentenceTransformer("$repo_id", trust_remote_code=True)
captions = model.encode(["A man is crossing the street with a red car parked nearby."])
images = model.encode(["demo.png"], prompt_name="image")      # "Find an image caption describing the given image."
fused = model.encode([{"image": "demo.png", "text": "What is in the image?"}])
print(model.similarity(images, captions))
```

With transformers alone:

```python
from transformers import AutoModel

model = AutoModel.from_pretrained("$repo_id", trust_remote_code=True)
text_embeddings = model.encode(texts=["A man is crossing the street with a red car parked nearby."])
image_embeddings = model.encode(images=["demo.png"], instruction="Find an image caption describing the given image.")
print(image_embeddings @ text_embeddings.T)
```

Texts from MMEB may keep their `<|image_1|>` placeholder: it is converted to the backbone's image token.
`encode(..., truncate_dim=256)` returns Matryoshka-truncated, re-normalised embeddings."""

RERANKER_USAGE = """```python
from transformers import AutoModel

reranker = AutoModel.from_pretrained("$repo_id", trust_remote_code=True)
query = ("What is shown in the image?", "demo.png")            # text, image, or (text, image)
candidates = ["A man is crossing the street.", "A dog on a beach.", "A red car parked nearby."]
order, scores = reranker.rerank(query, candidates, top_k=2)        # listwise: one forward over the list
yes_probabilities = reranker.score(query, candidates)              # pairwise P(Yes)
```"""

DESCRIPTIONS = {
    "embedder": "A [UniME-V2](https://arxiv.org/abs/2510.13515) universal multimodal embedding model: a "
    "`$backbone_type` backbone whose final hidden state at the last token, L2-normalised, embeds a text, an image or "
    "both ($embedding_dim dimensions).",
    "reranker": "A [UniME-V2](https://arxiv.org/abs/2510.13515) reranker: a `$backbone_type` model that scores a "
    "(query, candidate) pair by P(Yes) and a list of candidates by the probability of each candidate's index.",
}


IMAGE_RESIZE_WORDS = {
    "native": "images are fed at their own size (the backbone's image processor still bounds the pixel count)",
    "square:1344": "every image is resized to 1344x1344 first: the authors' evaluation rule, under which every "
    "published number of the released embedders was measured (about 2,300 image tokens for Qwen2-VL)",
    "square:672": "every image is resized to 672x672 first (the authors' Qwen2-VL training size)",
    "square:336": "every image is resized to 336x336 first (the authors' LLaVA-OneVision training size)",
    "max_side:1344": "an image whose longest side exceeds 1344 is resized to 1344x1344 first",
    "max_pixels:235200": "images are scaled to at most 300*28*28 pixels, sides multiples of 28 (the authors' "
    "reranker training rule)",
    "square:1344,max_pixels:235200": "every image is resized to 1344x1344 and then capped at 300*28*28 pixels, i.e. "
    "476x476: what the reranker saw in the authors' evaluation, under which their rerank numbers were measured",
}


def describe_inputs(
    kind: str, backbone_type: str, image_resize: str = "native", image_position_rule: str | None = None
) -> str:
    """The "Inputs" section of a card: the image-size policy the processor applies and, for Qwen embedders, the
    M-RoPE position rule, so that a user knows what the checkpoint expects.

    Example:
        >>> "1344x1344" in describe_inputs("embedder", "qwen2_vl", "square:1344", "vision_start_only")
        True
    """
    size = IMAGE_RESIZE_WORDS.get(image_resize, f"images are resized by the rule `{image_resize}` first")
    lines = [
        f"- Image size: `image_resize = \"{image_resize}\"` is saved with the processor: {size}. Change it with "
        "`model.processor.image_resize = \"native\"` (or a preset such as `\"authors-eval\"`); numbers measured "
        "under one rule do not carry over to another."
    ]
    if kind == "embedder" and backbone_type in ("qwen2_vl", "qwen2_5_vl"):
        rule = image_position_rule or "vision_start_only"
        meaning = (
            "image tokens take text positions, because the prompt has no `<|vision_start|>`: the rule of "
            "transformers 4.49, under which the authors trained and evaluated"
            if rule == "vision_start_only" else "every image token takes 3-D M-RoPE positions (transformers 5.x)"
        )
        lines.append(f"- Image positions: `image_position_rule = \"{rule}\"` in the config: {meaning}.")
    return "\n".join(lines)


def find_card_template() -> Path:
    """The template shipped inside the package (wheel install) or at the repository root (source checkout)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / TEMPLATE_NAME, here.parent / TEMPLATE_NAME):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{TEMPLATE_NAME} was found neither in {here} nor in {here.parent}; reinstall unime-v2 or run from a checkout."
    )


def render_model_card(
    *,
    model_name: str,
    repo_id: str | None = None,
    base_model: str | None = None,
    backbone_type: str = "qwen2_vl",
    embedding_dim: int | str = "?",
    license: str = "mit",
    training: str | None = None,
    evaluation: str | None = None,
    extra_tags: list[str] | None = None,
    kind: str = "embedder",
    image_resize: str = "native",
    image_position_rule: str | None = None,
) -> str:
    """Fill the model card template (``kind``: "embedder" or "reranker").

    Example:
        >>> card = render_model_card(model_name="my-unime", base_model="Qwen/Qwen2-VL-2B-Instruct", embedding_dim=1536)
        >>> card.splitlines()[1]
        'library_name: transformers'
    """
    if kind not in DESCRIPTIONS:
        raise ValueError(f"kind={kind!r}: use 'embedder' or 'reranker'.")
    fields: dict[str, Any] = {
        "model_name": model_name,
        "repo_id": repo_id or model_name,
        "base_model": base_model or "unknown",
        "backbone_type": backbone_type,
        "embedding_dim": embedding_dim,
        "license": license,
        "training": training or "Not recorded for this checkpoint.",
        "evaluation": evaluation or "Not recorded for this checkpoint.",
    }
    tags = RERANKER_TAGS if kind == "reranker" else DEFAULT_TAGS
    fields["tags"] = "\n".join(f"- {tag}" for tag in [*tags, backbone_type, *(extra_tags or [])])
    fields["pipeline_tag"] = "text-ranking" if kind == "reranker" else "feature-extraction"
    fields["usage"] = Template(RERANKER_USAGE if kind == "reranker" else EMBEDDER_USAGE).substitute(fields)
    fields["description"] = Template(DESCRIPTIONS[kind]).substitute(fields)
    fields["inputs"] = describe_inputs(kind, backbone_type, image_resize, image_position_rule)
    return Template(find_card_template().read_text(encoding="utf-8")).substitute(fields)


def write_model_card(directory: str | os.PathLike, **fields: Any) -> Path:
    """Write ``README.md`` (the Hub model card) into ``directory``."""
    path = Path(directory) / "README.md"
    path.write_text(render_model_card(**fields), encoding="utf-8")
    return path


DATASET_CARD_TEMPLATE = """---
task_categories:
- feature-extraction
- image-text-to-text
tags:
- unime-v2
- hard-negatives
- mllm-as-a-judge
configs:
- config_name: default
  data_files:
  - split: train
    path: data/*.parquet
---

# $name

Hard negatives mined with UniME-V2's MLLM-as-a-Judge pipeline (the `unime-v2` package): global retrieval with an
embedder, judge scores for every (query, candidate) pair, false-negative filter, cyclical sampling.

- rows: $rows
- embedder (global retrieval): `$embedder`
- judge: `$judge` (score = P(Yes) / (P(Yes) + P(No)) at the answer position; official_compat=$official_compat)
- top_k = $top_k, similarity threshold delta = $delta, beta = $beta, negatives = $num_negatives,
  interval = $interval, empty-set fallback = $empty_fallback, seed = $seed

## Columns

| column | type | meaning |
|---|---|---|
| query_text | string | instruction + query text (`<|image_1|>` where the query image goes) |
| query_image | string / null | query image path, relative to the image root |
| pos_text, pos_image | string, string / null | the positive target |
| neg_texts, neg_images | list[string], list[string / null] | mined hard negatives, in sampled order (duplicates possible when fewer were left) |
| judge_scores | list[float64] | judge scores of [positive, negative_1, ..., negative_n]: index 0 is the positive; 1.0 marks the paper's empty-set fallback |
| task, source | string | where the row came from |

## Judge prompt

One user turn of the judge's chat template: the instruction, `Query:` (query image, query text), `Candidate:`
(candidate image, candidate text), then the generation prompt. The instruction:

> $instruction

## Mining report

```
$report
```
"""


def render_dataset_card(
    *, name: str, rows: int, embedder: str, judge: str, official_compat: bool, config: dict[str, Any],
    instruction: str, report: str,
) -> str:
    """The README pushed with a mined dataset: columns, judge, prompt and every mining setting.

    Example:
        >>> card = render_dataset_card(name="d", rows=2, embedder="e", judge="j", official_compat=False,
        ...     config=dict(top_k=50, similarity_threshold=None, beta=0.01, num_negatives=10, interval=5,
        ...                 empty_fallback="paper", seed=0), instruction="I will provide...", report="...")
        >>> "beta = 0.01" in card
        True
    """
    return Template(DATASET_CARD_TEMPLATE).substitute(
        name=name, rows=rows, embedder=embedder, judge=judge, official_compat=official_compat,
        top_k=config["top_k"], delta=config["similarity_threshold"], beta=config["beta"],
        num_negatives=config["num_negatives"], interval=config["interval"], empty_fallback=config["empty_fallback"],
        seed=config["seed"], instruction=instruction, report=report,
    )
