"""Model and dataset cards: `huggingface_hub.ModelCard` / `DatasetCard` with validated card data.

A model card is the ``model_card.md`` template (a Jinja template, as ``ModelCard.from_template`` reads) filled with
the checkpoint's usage, inputs, training and evaluation; its metadata is a `huggingface_hub.ModelCardData`
(library_name, pipeline_tag, base_model, license, tags). ``base_model`` is set only to a Hub repo id: a local folder or
a ``tiny:`` model is named in the text instead, since the Hub reads ``base_model`` as a link to a repo. The dataset card
of a mined judge dataset lists its columns from `modeling_unime.data.JudgeRow` and `UNIME_FEATURES`.
"""

from __future__ import annotations

import os
import typing
from pathlib import Path
from typing import Any

from huggingface_hub import DatasetCard, DatasetCardData, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from ..data import MINED_FEATURES, MinedRow

TEMPLATE_NAME = "model_card.md"
DEFAULT_TAGS = (
    "unime-v2", "multimodal-embedding", "sentence-similarity", "sentence-transformers", "image-text-retrieval"
)
RERANKER_TAGS = ("unime-v2", "reranker", "multimodal-reranking", "image-text-retrieval")
PIPELINE_TAGS = {"embedder": "feature-extraction", "reranker": "text-ranking"}
# The metadata keys in the order the card shows them.
METADATA_ORDER = ["library_name", "pipeline_tag", "base_model", "license", "tags"]

EMBEDDER_USAGE = """```python
from sentence_transformers import SentenceTransformer

model = SentenceTransformer("{{ repo_id }}", trust_remote_code=True)
captions = model.encode(["A man is crossing the street with a red car parked nearby."])
images = model.encode(["demo.png"], prompt_name="image")      # "Find an image caption describing the given image."
fused = model.encode([{"image": "demo.png", "text": "What is in the image?"}])
print(model.similarity(images, captions))
```

With transformers alone:

```python
from transformers import AutoModel

model = AutoModel.from_pretrained("{{ repo_id }}", trust_remote_code=True)
text_embeddings = model.encode(texts=["A man is crossing the street with a red car parked nearby."])
image_embeddings = model.encode(images=["demo.png"], instruction="Find an image caption describing the given image.")
print(image_embeddings @ text_embeddings.T)
```

Texts from MMEB may keep their `<|image_1|>` placeholder: it is converted to the backbone's image token.
`encode(..., truncate_dim=256)` returns Matryoshka-truncated, re-normalised embeddings."""

RERANKER_USAGE = """```python
from transformers import AutoModel

reranker = AutoModel.from_pretrained("{{ repo_id }}", trust_remote_code=True)
query = ("What is shown in the image?", "demo.png")            # text, image, or (text, image)
candidates = ["A man is crossing the street.", "A dog on a beach.", "A red car parked nearby."]
order, scores = reranker.rerank(query, candidates, top_k=2)        # listwise: one forward over the list
yes_probabilities = reranker.score(query, candidates)              # pairwise P(Yes)
```"""

DESCRIPTIONS = {
    "embedder": "A [UniME-V2](https://arxiv.org/abs/2510.13515) universal multimodal embedding model: a "
    "`{{ backbone_type }}` backbone whose final hidden state at the last token, L2-normalised, embeds a text, an "
    "image or both ({{ embedding_dim }} dimensions).",
    "reranker": "A [UniME-V2](https://arxiv.org/abs/2510.13515) reranker: a `{{ backbone_type }}` model that scores a "
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
    elif kind == "embedder" and backbone_type in ("qwen3_vl", "qwen3_vl_moe"):
        lines.append("- Prompt and positions: each input is one user turn of Qwen3-VL's chat template (the image "
                     "wrapped in `<|vision_start|>`/`<|vision_end|>`, then the instruction and the text), followed "
                     "by the assistant prompt; image tokens take Qwen3-VL's own 3-D M-RoPE positions.")
    return "\n".join(lines)


def find_card_template() -> Path:
    """The template shipped inside the package (wheel install) or at the repository root (source checkout)."""
    package = Path(__file__).resolve().parent.parent  # modeling_unime/
    for candidate in (package / TEMPLATE_NAME, package.parent / TEMPLATE_NAME):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{TEMPLATE_NAME} was found neither in {package} nor in {package.parent}; reinstall unime-v2 or run from a "
        "checkout."
    )


def hub_repo_id(spec: str | os.PathLike | None) -> str | None:
    """``spec`` when it names a Hub repo (``owner/name`` or ``name``), else None: a local folder, a ``tiny:`` model
    or nothing.

    Example:
        >>> hub_repo_id("Qwen/Qwen2-VL-2B-Instruct"), hub_repo_id("/data/UniME-V2-Qwen2VL-2B")
        ('Qwen/Qwen2-VL-2B-Instruct', None)
        >>> hub_repo_id("tiny:qwen2_vl") is None
        True
    """
    if not spec:
        return None
    text = os.fspath(spec)
    if os.path.exists(text):
        return None
    try:
        validate_repo_id(text)
    except HFValidationError:
        return None
    return text


def _render(template: str, **fields: Any) -> str:
    import jinja2

    return jinja2.Template(template, undefined=jinja2.StrictUndefined, keep_trailing_newline=True).render(**fields)


def build_model_card(
    *,
    model_name: str,
    repo_id: str | None = None,
    base_model: str | os.PathLike | None = None,
    backbone_type: str = "qwen2_vl",
    embedding_dim: int | str = "?",
    license: str = "mit",
    training: str | None = None,
    evaluation: str | None = None,
    extra_tags: list[str] | None = None,
    kind: str = "embedder",
    image_resize: str = "native",
    image_position_rule: str | None = None,
) -> ModelCard:
    """The `huggingface_hub.ModelCard` of a checkpoint (``kind``: "embedder" or "reranker").

    Example:
        >>> card = build_model_card(model_name="my-unime", base_model="Qwen/Qwen2-VL-2B-Instruct", embedding_dim=1536)
        >>> card.data.base_model, card.data.pipeline_tag, str(card).splitlines()[1]
        ('Qwen/Qwen2-VL-2B-Instruct', 'feature-extraction', 'library_name: transformers')
        >>> build_model_card(model_name="m", base_model="/data/my-folder").data.base_model is None
        True
    """
    if kind not in DESCRIPTIONS:
        raise ValueError(f"kind={kind!r}: use one of {sorted(DESCRIPTIONS)}.")
    base_repo = hub_repo_id(base_model)
    tags = [*(RERANKER_TAGS if kind == "reranker" else DEFAULT_TAGS), backbone_type, *(extra_tags or [])]
    data = ModelCardData(library_name="transformers", pipeline_tag=PIPELINE_TAGS[kind], base_model=base_repo,
                         license=license, tags=tags)
    snippet_fields = dict(repo_id=repo_id or model_name, backbone_type=backbone_type, embedding_dim=embedding_dim)
    base_model_note = None
    if base_model and base_repo is None:
        base_model_note = (f"Base model: `{os.fspath(base_model)}`, a local folder rather than a Hub repo, so the "
                           "card's metadata names no `base_model`.")
    return ModelCard.from_template(
        data,
        template_path=str(find_card_template()),
        metadata=data.to_yaml(original_order=METADATA_ORDER),
        model_name=model_name,
        description=_render(DESCRIPTIONS[kind], **snippet_fields),
        base_model_note=base_model_note,
        usage=_render(RERANKER_USAGE if kind == "reranker" else EMBEDDER_USAGE, **snippet_fields),
        inputs=describe_inputs(kind, backbone_type, image_resize, image_position_rule),
        training=training or "Not recorded for this checkpoint.",
        evaluation=evaluation or "Not recorded for this checkpoint.",
    )


def render_model_card(**fields: Any) -> str:
    """The model card as text (`build_model_card`'s arguments).

    Example:
        >>> card = render_model_card(model_name="my-unime", base_model="Qwen/Qwen2-VL-2B-Instruct", embedding_dim=1536)
        >>> card.splitlines()[1]
        'library_name: transformers'
    """
    return str(build_model_card(**fields))


def write_model_card(directory: str | os.PathLike, **fields: Any) -> Path:
    """Write ``README.md`` (the Hub model card) into ``directory``."""
    path = Path(directory) / "README.md"
    build_model_card(**fields).save(path)
    return path


# ------------------------------------------------------------------------------------------------- dataset cards

COLUMN_MEANINGS = {
    "query_text": "instruction + query text (`<|image_1|>` where the query image goes)",
    "query_image": "query image path, relative to the image root",
    "pos_text": "the positive target's text",
    "pos_image": "the positive target's image path",
    "neg_texts": "mined hard negatives, in sampled order (duplicates possible when fewer were left)",
    "neg_images": "the negatives' image paths, one per negative (null for a text-only one)",
    "judge_scores": "judge scores of [positive, negative_1, ..., negative_n]: index 0 is the positive; 1.0 marks the "
    "paper's empty-set fallback",
    "task": "the task the row came from",
    "source": "the file or dataset the row came from",
    "judge_score_source": "where each judge score came from: judge (the large judge), estimate (the cascade's "
    "calibrated estimate) or fallback (the empty-set fallback's 1.0)",
}


def _column_type(feature: Any, hint: Any) -> str:
    """A column's type as stored (the `UNIME_FEATURES` dtype), with ``/ null`` where `JudgeRow` allows None."""
    arguments = typing.get_args(hint)
    nullable = type(None) in arguments
    if nullable:
        hint = next(argument for argument in arguments if argument is not type(None))
    if hasattr(feature, "dtype"):
        text = feature.dtype
    else:
        text = f"list[{_column_type(feature.feature, typing.get_args(hint)[0])}]"
    return f"{text} / null" if nullable else text


def judge_dataset_columns() -> str:
    """The markdown table of a mined judge dataset's columns: every `MinedRow` field, its stored type and its meaning.

    Example:
        >>> print(judge_dataset_columns().splitlines()[3])
        | query_image | string / null | query image path, relative to the image root |
    """
    hints = typing.get_type_hints(MinedRow)
    lines = ["| column | type | meaning |", "|---|---|---|"]
    for column, hint in hints.items():
        lines.append(f"| {column} | {_column_type(MINED_FEATURES[column], hint)} | {COLUMN_MEANINGS[column]} |")
    return "\n".join(lines)


SIZE_CATEGORIES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                   (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B"))


def size_category(rows: int) -> str:
    """The Hub's ``size_categories`` value for a dataset of ``rows`` rows.

    Example:
        >>> size_category(48), size_category(662_000)
        ('n<1K', '100K<n<1M')
    """
    return next((name for bound, name in SIZE_CATEGORIES if rows < bound), "n>1B")


DATASET_CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ name }}

Hard negatives mined with UniME-V2's MLLM-as-a-Judge pipeline \
(arXiv 2510.13515, "MLLM-as-a-Judge for Hard Negatives Mining"; the `unime-v2` package):
global retrieval with an embedder, judge scores for every (query, candidate) pair, false-negative filter, cyclical
sampling.

- rows: {{ rows }}
- embedder (global retrieval): `{{ embedder }}`
- judge: `{{ judge }}` (score = P(Yes) / (P(Yes) + P(No)) at the answer position; official_compat={{ official_compat }})
- top_k = {{ top_k }}, similarity threshold delta = {{ delta }}, beta = {{ beta }}, negatives = {{ num_negatives }},
  interval = {{ interval }}, empty-set fallback = {{ empty_fallback }}, seed = {{ seed }}
- judge mode: {{ judge_mode }}{{ budget }}

The `judged_pairs` configuration holds every retrieved (query, candidate) pair with its similarity, its score and
where the score came from, so that audits and calibrations can be computed after the fact.

## Columns

{{ columns }}

## Judge prompt

One user turn of the judge's chat template: the instruction, `Query:` (query image, query text), `Candidate:`
(candidate image, candidate text), then the generation prompt. The instruction:

> {{ instruction }}

## Mining report

```
{{ report }}
```
"""


def build_dataset_card(
    *, name: str, rows: int, embedder: str, judge: str, official_compat: bool, config: dict[str, Any],
    instruction: str, report: str,
) -> DatasetCard:
    """The `huggingface_hub.DatasetCard` of a mined judge dataset: columns, judge, prompt and every mining setting
    (``config``: top_k, similarity_threshold, beta, num_negatives, interval, empty_fallback, seed)."""
    data = DatasetCardData(
        task_categories=["feature-extraction", "image-text-to-text"],
        size_categories=[size_category(rows)],
        tags=["unime-v2", "hard-negatives", "mllm-as-a-judge"],
        configs=[{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*.parquet"}]},
                 {"config_name": "judged_pairs",
                  "data_files": [{"split": "train", "path": "judged_pairs/train-*.parquet"}]}],
    )
    return DatasetCard.from_template(
        data, template_str=DATASET_CARD_TEMPLATE, name=name, rows=rows, embedder=embedder, judge=judge,
        official_compat=official_compat, top_k=config["top_k"], delta=config["similarity_threshold"],
        beta=config["beta"], num_negatives=config["num_negatives"], interval=config["interval"],
        empty_fallback=config["empty_fallback"], seed=config["seed"], columns=judge_dataset_columns(),
        instruction=instruction, report=report, judge_mode=config.get("judge_mode", "full"),
        budget=_budget_text(config),
    )


def _budget_text(config: dict[str, Any]) -> str:
    mode = config.get("judge_mode", "full")
    if mode == "full":
        return " (the large judge scored every pair)"
    cap = config.get("judge_budget")
    cap_text = f", at most {100 * cap:g}% of each query's pairs" if cap else ""
    if mode == "top_m":
        return (f" (the positive and the {config.get('cascade_top_m')} most similar candidates judged, the rest "
                f"calibrated estimates{cap_text})")
    return (f" (the large judge scored only the pairs whose score could change the selection{cap_text}: margin "
            f"{config.get('cascade_margin')} sigma, sigma floor {config.get('cascade_sigma_floor')}, calibration on "
            f"{100 * config.get('cascade_calibration_share', 0):g}% of the queries judged in full; the rest keep "
            "calibrated estimates; see the report for the counts)")


def render_dataset_card(
    *, name: str, rows: int, embedder: str, judge: str, official_compat: bool, config: dict[str, Any],
    instruction: str, report: str,
) -> str:
    """The README pushed with a mined dataset, as text (see `build_dataset_card`).

    Example:
        >>> card = render_dataset_card(name="d", rows=2, embedder="e", judge="j", official_compat=False,
        ...     config=dict(top_k=50, similarity_threshold=None, beta=0.01, num_negatives=10, interval=5,
        ...                 empty_fallback="paper", seed=0), instruction="I will provide...", report="...")
        >>> "beta = 0.01" in card, DatasetCard(card).data.size_categories
        (True, ['n<1K'])
    """
    return str(build_dataset_card(name=name, rows=rows, embedder=embedder, judge=judge,
                                  official_compat=official_compat, config=config, instruction=instruction,
                                  report=report))


__all__ = [
    "build_dataset_card",
    "build_model_card",
    "describe_inputs",
    "find_card_template",
    "hub_repo_id",
    "judge_dataset_columns",
    "render_dataset_card",
    "render_model_card",
    "size_category",
    "write_model_card",
]
