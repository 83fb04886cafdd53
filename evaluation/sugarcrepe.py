"""SugarCrepe: compositional image-text matching (arXiv 2510.13515 reports UniME-V2 2B at Replace 70.9, Swap 51.2,
Add 70.2; the authors' ``Embedding/evaluation/eval_sugar_crepe.py``).

Each example is a COCO val2017 image, its true caption and a hard negative caption that differs by one replaced,
swapped or added object, attribute or relation. The model is right when the image is closer to the true caption:
sim(image, caption) > sim(image, negative_caption), cosine of L2-normalised embeddings; a tie counts as wrong.

Data: the seven annotation files of github.com/RAIVNLab/sugar-crepe (folder ``data/``; the clone itself may be given,
its ``data/`` is found) and the COCO val2017 images (http://images.cocodataset.org/zips/val2017.zip).

    python -m evaluation.sugarcrepe --annotations DIR --images DIR --model PATH_OR_tiny:qwen2_vl [--cache DIR] \
        [--max_rows N]

Models are loaded as the evaluation recipe loads them (`evaluation.loading.load_embedder`): on this process's device,
bf16 on a GPU and float32 on CPU unless ``--dtype`` says otherwise, with ``--image_resize`` applied to the processor.
Flags are snake_case like the recipes' (``--batch_size``); the kebab spellings (``--batch_size``) are still accepted.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from modeling_unime.util.embedding_cache import Item, embed_with_cache
from modeling_unime.util.images import require_image_files

SUGARCREPE_SUBSETS: dict[str, int] = {
    "add_att": 692,
    "add_obj": 2062,
    "replace_att": 788,
    "replace_obj": 1652,
    "replace_rel": 1406,
    "swap_att": 666,
    "swap_obj": 245,
}
"""The seven annotation files (``<name>.json``) and their row counts in the public release."""

SUGARCREPE_GROUPS: dict[str, tuple[str, ...]] = {
    "Replace": ("replace_obj", "replace_att", "replace_rel"),
    "Swap": ("swap_obj", "swap_att"),
    "Add": ("add_obj", "add_att"),
}
"""Each reported group is the unweighted mean of its subsets' accuracies."""

SUGARCREPE_IMAGE_INSTRUCTION = "Find an image caption describing the given image."
"""Text that goes with every image (the authors' ``Embedding/evaluation/utils/sugarcrepe.py``); captions are embedded
as raw text."""

SUGARCREPE_SOURCE = "https://github.com/RAIVNLab/sugar-crepe (folder data/)"
COCO_VAL2017_SOURCE = "http://images.cocodataset.org/zips/val2017.zip"

_FIELDS = ("filename", "caption", "negative_caption")


@dataclass(frozen=True)
class SugarCrepeExample:
    """One row of a SugarCrepe annotation file.

    Attributes:
        id: the row's key in the file (a string such as ``"0"``).
        filename: COCO val2017 image file name, relative to the image root.
        caption: the true caption.
        negative_caption: the hard negative caption.
    """

    id: str
    filename: str
    caption: str
    negative_caption: str


def _check_subsets(subsets: Iterable[str] | None) -> list[str]:
    if subsets is None:
        return list(SUGARCREPE_SUBSETS)
    if isinstance(subsets, str):
        subsets = [subsets]
    names = list(dict.fromkeys(subsets))
    unknown = [name for name in names if name not in SUGARCREPE_SUBSETS]
    if unknown:
        raise ValueError(f"Unknown SugarCrepe subset(s) {unknown}; choose from {list(SUGARCREPE_SUBSETS)}.")
    if not names:
        raise ValueError(f"subsets is empty; choose from {list(SUGARCREPE_SUBSETS)} or pass None for all seven.")
    return names


def _read_subset(path: Path) -> list[SugarCrepeExample]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}).") from error
    if not isinstance(data, dict):
        raise ValueError(
            f"{path}: expected a JSON object {{id: {{filename, caption, negative_caption}}}}, "
            f"got {type(data).__name__}."
        )
    examples = []
    for example_id, entry in data.items():
        if not isinstance(entry, dict):
            raise ValueError(f"{path}, id {example_id!r}: expected an object with {list(_FIELDS)}, got {entry!r}.")
        for field in _FIELDS:
            value = entry.get(field)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(
                    f"{path}, id {example_id!r}: field {field!r} must be a non-empty string, got {value!r} "
                    f"(entry: {entry!r})."
                )
        examples.append(
            SugarCrepeExample(str(example_id), entry["filename"], entry["caption"], entry["negative_caption"])
        )
    if not examples:
        raise ValueError(f"{path} holds no examples.")
    return examples


def resolve_annotation_dir(annotation_dir: str | os.PathLike, subsets: Iterable[str] | None = None) -> Path:
    """The folder holding the ``<subset>.json`` files: ``annotation_dir`` itself, or its ``data/`` folder when
    ``annotation_dir`` is a clone of the repository (github.com/RAIVNLab/sugar-crepe keeps them in ``data/``).
    When neither holds the first requested file, ``annotation_dir`` is returned and `load_sugarcrepe` names what is
    missing.

    >>> import tempfile
    >>> clone = Path(tempfile.mkdtemp())
    >>> (clone / "data").mkdir()
    >>> _ = (clone / "data" / "swap_obj.json").write_text("{}")
    >>> resolve_annotation_dir(clone, ["swap_obj"]) == clone / "data"
    True
    """
    folder = Path(annotation_dir)
    first = _check_subsets(subsets)[0]
    if not (folder / f"{first}.json").is_file() and (folder / "data" / f"{first}.json").is_file():
        return folder / "data"
    return folder


def load_sugarcrepe(
    annotation_dir: str | os.PathLike, subsets: Iterable[str] | None = None, max_rows: int | None = None
) -> dict[str, list[SugarCrepeExample]]:
    """Read SugarCrepe annotation files ``<annotation_dir>/<subset>.json``, in the public format
    ``{"id": {"filename", "caption", "negative_caption"}}``.

    Args:
        annotation_dir: folder holding the files (the repository's ``data/`` folder, or the clone: see
            `resolve_annotation_dir`).
        subsets: names from `SUGARCREPE_SUBSETS`; all seven when None.
        max_rows: only the first ``max_rows`` examples of each subset (a smoke test); None for all.

    Returns:
        {subset: examples in file order}. A row count that differs from the public release only warns (not when
        ``max_rows`` cut the file).

    Raises:
        FileNotFoundError: a file is missing (the message names the path and where to download it).
        ValueError: an unknown subset, invalid JSON, or a malformed entry (named by file and id).

    Example:
        >>> import json, tempfile
        >>> folder = tempfile.mkdtemp()
        >>> rows = {"0": {"filename": "000000000139.jpg", "caption": "A cat on a sofa.",
        ...               "negative_caption": "A dog on a sofa."}}
        >>> _ = (Path(folder) / "swap_obj.json").write_text(json.dumps(rows))
        >>> import warnings
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")  # 1 row instead of the release's 245
        ...     loaded = load_sugarcrepe(folder, subsets=["swap_obj"])
        >>> example = loaded["swap_obj"][0]
        >>> example.id, example.filename, example.negative_caption
        ('0', '000000000139.jpg', 'A dog on a sofa.')
    """
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be >= 1 (or None for every row), got {max_rows}.")
    folder = resolve_annotation_dir(annotation_dir, subsets)
    loaded = {}
    for name in _check_subsets(subsets):
        path = folder / f"{name}.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"SugarCrepe annotation file {name}.json not found: looked for {path}"
                + ("" if folder.name == "data" else f" and {folder / 'data' / (name + '.json')}")
                + ". Clone the repository (`git clone https://github.com/RAIVNLab/sugar-crepe`; the files are in its "
                "data/ folder) and pass the clone or its data/ folder."
            )
        examples = _read_subset(path)
        if len(examples) != SUGARCREPE_SUBSETS[name] and (max_rows is None or len(examples) < max_rows):
            warnings.warn(
                f"{path} has {len(examples)} rows; the public release has {SUGARCREPE_SUBSETS[name]}.", stacklevel=2
            )
        loaded[name] = examples[:max_rows]
    return loaded


def _check_images(filenames: Sequence[str], image_root: str | os.PathLike | None) -> None:
    # Each file joined to the root as the images are read, so the message shows the path that is missing.
    root = None if image_root is None else os.fspath(image_root)
    require_image_files(
        [name if root is None else os.path.join(root, name) for name in filenames], root, "SugarCrepe",
        f"The images are COCO val2017 ({COCO_VAL2017_SOURCE}); "
        "pass the folder that holds the .jpg files as image_root.",
    )


def check_sugarcrepe_data(
    annotation_dir: str | os.PathLike, image_root: str | os.PathLike | None, subsets: Iterable[str] | None = None,
    max_rows: int | None = None,
) -> Path:
    """Read the annotation files and check that every image they name (in the first ``max_rows`` rows of each, when
    given) is under ``image_root``, without embedding anything; returns the folder the files were read from (see
    `resolve_annotation_dir`).

    Raises:
        FileNotFoundError / ValueError: as `load_sugarcrepe` and `evaluate_sugarcrepe` would, but up front.
    """
    folder = resolve_annotation_dir(annotation_dir, subsets)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the row-count warning comes again when the benchmark runs
        examples = load_sugarcrepe(folder, subsets, max_rows)
    _check_images(list(dict.fromkeys(example.filename for rows in examples.values() for example in rows)), image_root)
    return folder


def _summarise(
    subset_names: Sequence[str], positive: Mapping[str, torch.Tensor], negative: Mapping[str, torch.Tensor]
) -> dict[str, Any]:
    """Per-subset accuracy through the shared metric, then the group means over complete groups."""
    from evaluation.metrics import load_metric

    metric = load_metric("pairwise_accuracy")
    accuracies = {
        name: float(
            metric.compute(positive_scores=positive[name].tolist(), negative_scores=negative[name].tolist())["accuracy"]
        )
        for name in subset_names
    }
    groups, incomplete = {}, {}
    for group, members in SUGARCREPE_GROUPS.items():
        absent = [name for name in members if name not in accuracies]
        if absent:
            incomplete[group] = absent
        else:
            groups[group] = sum(accuracies[name] for name in members) / len(members)
    return {
        "subsets": accuracies,
        "groups": groups,
        "incomplete_groups": incomplete,
        "counts": {name: len(positive[name]) for name in subset_names},
    }


def evaluate_sugarcrepe(
    embedder: Any,
    annotation_dir: str | os.PathLike,
    image_root: str | os.PathLike | None,
    subsets: Iterable[str] | None = None,
    batch_size: int = 32,
    cache_dir: str | os.PathLike | None = None,
    reranker: Any = None,
    *,
    rerank_query_text: str | None = SUGARCREPE_IMAGE_INSTRUCTION,
    max_rows: int | None = None,
) -> dict[str, Any]:
    """SugarCrepe accuracy of an embedder (and optionally of a pairwise reranker).

    Every distinct image (with `SUGARCREPE_IMAGE_INSTRUCTION` as its text) and every distinct caption is embedded
    once over all the requested subsets: many examples share an image and some captions recur.

    Args:
        embedder: anything with ``encode(texts=, images=, image_root=, batch_size=)`` returning one row per item
            (e.g. `modeling_unime.UniMEV2Model`). Rows are re-normalised, so the similarity is always a cosine.
        annotation_dir: folder of the ``<subset>.json`` files (see `load_sugarcrepe`).
        image_root: folder of the COCO val2017 images; every image is checked before anything is embedded.
        subsets: names from `SUGARCREPE_SUBSETS`; all seven when None.
        batch_size: rows per embedding batch.
        cache_dir: when given, embeddings go through the on-disk cache of
            `modeling_unime.util.embedding_cache.cached_embeddings` (keyed by model weights and item content), so a
            rerun or another benchmark on the same images reuses them.
        reranker: when given, also decides each example with ``reranker.score(query, [caption_item, negative_item],
            image_root=image_root)`` (two P(Yes) values, e.g. `modeling_unime.UniMEV2Reranker`); query =
            (``rerank_query_text``, image), candidates = (caption, None).
        rerank_query_text: the query's text for the reranker; the retrieval instruction by default, since the
            reranker was trained on MMEB queries that carry their task instruction. None sends the image alone.
        max_rows: only the first ``max_rows`` examples of each subset (a smoke test; the accuracies are then not
            SugarCrepe's).

    Returns:
        ``{"subsets": {name: accuracy}, "groups": {"Replace"|"Swap"|"Add": mean}, "incomplete_groups": {group:
        [subsets not run]}, "counts": {name: examples}}``; a group is reported only when all its subsets ran. With a
        reranker, the same structure for its decisions under ``"rerank"``.

    Raises:
        FileNotFoundError: an annotation file or any image is missing (named, with the folder looked in).

    Example:
        >>> import json, tempfile, warnings
        >>> from PIL import Image
        >>> from modeling_unime.tiny import build_tiny_unime
        >>> folder = Path(tempfile.mkdtemp())
        >>> Image.new("RGB", (32, 32), "red").save(folder / "red.png")
        >>> rows = {"0": {"filename": "red.png", "caption": "A red square.", "negative_caption": "A blue square."}}
        >>> _ = (folder / "swap_att.json").write_text(json.dumps(rows))
        >>> model, processor = build_tiny_unime("qwen2_vl")
        >>> model.processor = processor
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     result = evaluate_sugarcrepe(model, folder, folder, subsets=["swap_att"])
        >>> result["counts"], result["incomplete_groups"]["Swap"], sorted(result["groups"])
        ({'swap_att': 1}, ['swap_obj'], [])
    """
    examples = load_sugarcrepe(annotation_dir, subsets, max_rows)
    all_examples = [example for rows in examples.values() for example in rows]
    filenames = list(dict.fromkeys(example.filename for example in all_examples))
    _check_images(filenames, image_root)
    captions = list(
        dict.fromkeys(text for example in all_examples for text in (example.caption, example.negative_caption))
    )

    image_items: list[Item] = [(SUGARCREPE_IMAGE_INSTRUCTION, filename) for filename in filenames]
    caption_items: list[Item] = [(caption, None) for caption in captions]
    image_vectors = torch.nn.functional.normalize(
        embed_with_cache(embedder, image_items, image_root, batch_size, cache_dir).float(), dim=-1
    )
    caption_vectors = torch.nn.functional.normalize(
        embed_with_cache(embedder, caption_items, image_root, batch_size, cache_dir).float(), dim=-1
    )
    for what, vectors, items in (("image", image_vectors, image_items), ("caption", caption_vectors, caption_items)):
        if vectors.shape[0] != len(items):
            raise ValueError(f"The embedder returned {vectors.shape[0]} {what} rows for {len(items)} {what} items.")

    image_row = {filename: row for row, filename in enumerate(filenames)}
    caption_row = {caption: row for row, caption in enumerate(captions)}
    positive, negative = {}, {}
    for name, rows in examples.items():
        images = image_vectors[[image_row[example.filename] for example in rows]]
        positive[name] = (images * caption_vectors[[caption_row[example.caption] for example in rows]]).sum(-1)
        negative[name] = (images * caption_vectors[[caption_row[example.negative_caption] for example in rows]]).sum(-1)
    result = _summarise(list(examples), positive, negative)

    if reranker is not None:
        rerank_positive, rerank_negative = {}, {}
        for name, rows in examples.items():
            pairs = [
                torch.as_tensor(
                    reranker.score(
                        (rerank_query_text, example.filename),
                        [(example.caption, None), (example.negative_caption, None)],
                        image_root=image_root,
                    ),
                    dtype=torch.float64,
                ).reshape(-1)
                for example in rows
            ]
            for example, pair in zip(rows, pairs):
                if pair.numel() != 2:
                    raise ValueError(
                        f"reranker.score returned {pair.numel()} scores for 2 candidates ({name}, id {example.id})."
                    )
            stacked = torch.stack(pairs)
            rerank_positive[name], rerank_negative[name] = stacked[:, 0], stacked[:, 1]
        result["rerank"] = _summarise(list(examples), rerank_positive, rerank_negative)
    return result


def format_table(result: Mapping[str, Any]) -> str:
    """A plain-text table of an `evaluate_sugarcrepe` result (accuracies in percent); a group none of whose subsets
    ran is left out.

    Example:
        >>> print(format_table({"subsets": {"swap_obj": 0.5}, "groups": {}, "counts": {"swap_obj": 4},
        ...                     "incomplete_groups": {"Replace": ["replace_obj", "replace_att", "replace_rel"],
        ...                                           "Swap": ["swap_att"], "Add": ["add_obj", "add_att"]}}))
        subset            n  embedding
        swap_obj          4      50.00
        Swap    incomplete: missing swap_att
    """
    rerank = result.get("rerank")
    header = f"{'subset':<14}{'n':>5}{'embedding':>11}" + (f"{'rerank':>9}" if rerank else "")
    lines = [header]
    for name, accuracy in result["subsets"].items():
        line = f"{name:<14}{result['counts'][name]:>5}{100 * accuracy:>11.2f}"
        lines.append(line + (f"{100 * rerank['subsets'][name]:>9.2f}" if rerank else ""))
    for group in SUGARCREPE_GROUPS:
        if group in result["groups"]:
            line = f"{group:<19}{100 * result['groups'][group]:>11.2f}"
            lines.append(line + (f"{100 * rerank['groups'][group]:>9.2f}" if rerank else ""))
        elif any(name in result["subsets"] for name in SUGARCREPE_GROUPS[group]):
            missing = result["incomplete_groups"].get(group, [])
            lines.append(f"{group:<8}incomplete: missing {', '.join(missing)}")
    return "\n".join(lines)


def _load(
    spec: str, reranker: bool = False, dtype: str = "auto", attn_implementation: str = "auto",
    image_resize: str | None = None,
) -> Any:
    """A model from a checkpoint path or Hub id, or ``tiny:<family>`` (random weights, for smoke tests), placed on
    this process's device with ``dtype`` / ``attn_implementation`` (`modeling_unime.placement`) and with
    ``image_resize`` set on its processor: the recipe's own loaders (`evaluation.loading`)."""
    from .loading import load_embedder, load_reranker

    loader = load_reranker if reranker else load_embedder
    return loader(spec, dtype=dtype, attn_implementation=attn_implementation, image_resize=image_resize)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotations", required=True, help="folder of the seven <subset>.json files")
    parser.add_argument("--images", required=True, help="folder of the COCO val2017 images")
    parser.add_argument("--model", required=True, help="embedder checkpoint (path or Hub id) or tiny:<family>")
    parser.add_argument("--reranker", help="optional reranker checkpoint (path or Hub id) or tiny:<family>")
    parser.add_argument("--cache", help="embedding cache folder (reused across runs)")
    parser.add_argument("--subsets", nargs="+", choices=list(SUGARCREPE_SUBSETS), help="default: all seven")
    parser.add_argument("--max_rows", "--max-rows", type=int, default=None,
                        help="only the first N examples of each subset (a smoke test)")
    parser.add_argument("--batch_size", "--batch-size", type=int, default=32)
    parser.add_argument("--output", help="also write the result as JSON here")
    parser.add_argument("--dtype", default="auto",
                        help="auto (bf16 on GPU, float32 on CPU), float32, bfloat16, float16")
    parser.add_argument("--attn_implementation", "--attn-implementation", default="auto",
                        help="auto, sdpa, eager or flash_attention_2")
    parser.add_argument("--image_resize", "--image-resize", default=None,
                        help="embedder image policy, e.g. authors-eval (the published numbers: 1344x1344) or native")
    parser.add_argument("--reranker_image_resize", "--reranker-image-resize", default=None,
                        help="reranker image policy, e.g. authors-reranker-eval (how the authors' rerank stage ran)")
    args = parser.parse_args(argv)

    placement_args = {"dtype": args.dtype, "attn_implementation": args.attn_implementation}
    reranker = (_load(args.reranker, reranker=True, image_resize=args.reranker_image_resize, **placement_args)
                if args.reranker else None)
    result = evaluate_sugarcrepe(
        _load(args.model, image_resize=args.image_resize, **placement_args), args.annotations, args.images,
        subsets=args.subsets, batch_size=args.batch_size, cache_dir=args.cache, reranker=reranker,
        max_rows=args.max_rows,
    )
    print(format_table(result))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        main()
    except (FileNotFoundError, ValueError) as error:  # data problems: the message says what to fix, no traceback
        raise SystemExit(f"error: {error}") from None
