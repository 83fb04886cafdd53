"""MMEB evaluation (36 datasets): precision@1 per dataset, category / IND / OOD / overall means, optional rerank.

Each MMEB-eval dataset (Hub: ``TIGER-Lab/MMEB-eval``, one config per dataset, split ``test``) has columns
``qry_text``, ``qry_img_path``, ``tgt_text`` (list), ``tgt_img_path`` (list); candidate 0 is the positive. Texts keep
the Phi-3V ``<|image_1|>`` placeholder, which the processor converts per backbone. Every distinct query and candidate
is embedded once, through an on-disk cache keyed by model and content, so an interrupted run resumes.

Scoring rule: a query is correct when the positive's cosine is strictly above every other candidate's (a tie counts
as wrong, so a degenerate embedder cannot score by ties).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from modeling_unime.mining import cached_embeddings

from .metrics import load_metric

MMEB_HUB_ID = "TIGER-Lab/MMEB-eval"
MMEB_CATEGORIES: dict[str, dict[str, list[str]]] = {
    "Classification": {
        "IND": ["ImageNet-1K", "N24News", "HatefulMemes", "VOC2007", "SUN397"],
        "OOD": ["Place365", "ImageNet-A", "ImageNet-R", "ObjectNet", "Country211"],
    },
    "VQA": {
        "IND": ["OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W"],
        "OOD": ["ScienceQA", "VizWiz", "GQA", "TextVQA"],
    },
    "Retrieval": {
        "IND": ["VisDial", "CIRR", "VisualNews_t2i", "VisualNews_i2t", "MSCOCO_t2i", "MSCOCO_i2t", "NIGHTS", "WebQA"],
        "OOD": ["OVEN", "FashionIQ", "EDIS", "Wiki-SS-NQ"],
    },
    "Visual Grounding": {
        "IND": ["MSCOCO"],
        "OOD": ["RefCOCO", "RefCOCO-Matching", "Visual7W-Pointing"],
    },
}
MMEB_DATASETS = [name for split in MMEB_CATEGORIES.values() for names in split.values() for name in names]
IND_DATASETS = [name for split in MMEB_CATEGORIES.values() for name in split["IND"]]
OOD_DATASETS = [name for split in MMEB_CATEGORIES.values() for name in split["OOD"]]

# method.md section 3: published MMEB overall scores.
PUBLISHED_MMEB = {
    "TianchengGu/UniME-V2-Qwen2VL-2B": {"Overall": 63.6, "Overall (rerank)": 67.6},
    "TianchengGu/UniME-V2-Qwen2VL-7B": {"Overall": 68.0, "Overall (rerank)": 69.6},
    "TianchengGu/UniME-V2-LLaVA-OneVision-8B": {"Overall": 71.2},
    "TIGER-Lab/VLM2Vec-Qwen2VL-2B": {"Overall": 60.1},
    "TIGER-Lab/VLM2Vec-Qwen2VL-7B": {"Overall": 65.8},
}

Item = tuple[str | None, str | None]


@dataclass
class MMEBDataset:
    """One MMEB-eval dataset: per row a query item and its candidate items (candidate 0 is the positive)."""

    name: str
    queries: list[Item]
    candidates: list[list[Item]]

    def __len__(self) -> int:
        return len(self.queries)


def _rows_to_dataset(name: str, rows: Sequence[dict[str, Any]]) -> MMEBDataset:
    queries, candidates = [], []
    for index, row in enumerate(rows):
        for column in ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path"):
            if column not in row:
                raise ValueError(f"MMEB dataset {name!r}, row {index}: no {column!r} column (columns: {sorted(row)}).")
        texts, images = list(row["tgt_text"]), list(row["tgt_img_path"])
        if len(texts) != len(images) or not texts:
            raise ValueError(
                f"MMEB dataset {name!r}, row {index}: tgt_text has {len(texts)} entries and tgt_img_path {len(images)}."
            )
        queries.append((row["qry_text"] or None, row["qry_img_path"] or None))
        candidates.append([(text or None, image or None) for text, image in zip(texts, images)])
    return MMEBDataset(name, queries, candidates)


def load_mmeb_dataset(name: str, root: str | os.PathLike | None = None) -> MMEBDataset:
    """Load one MMEB-eval dataset from a local copy of the Hub repo (``root/<name>/*.parquet``) or, without
    ``root``, from the Hub (``TIGER-Lab/MMEB-eval``, config ``name``, split ``test``)."""
    from datasets import load_dataset

    if name not in MMEB_DATASETS:
        raise ValueError(f"{name!r} is not an MMEB-eval dataset; known: {', '.join(MMEB_DATASETS)}.")
    if root is None:
        rows = load_dataset(MMEB_HUB_ID, name, split="test")
    else:
        folder = Path(root) / name
        files = sorted(folder.glob("*.parquet"))
        if not files:
            raise FileNotFoundError(
                f"MMEB dataset {name!r}: no parquet file in {folder} (expected the layout of the Hub repo "
                f"{MMEB_HUB_ID}: <root>/{name}/test-00000-of-00001.parquet; download it with "
                f"`huggingface-cli download {MMEB_HUB_ID} --repo-type dataset --local-dir <root>`)."
            )
        rows = load_dataset("parquet", data_files=[str(file) for file in files], split="train")
    return _rows_to_dataset(name, rows.to_list())


def check_images(dataset: MMEBDataset, image_root: str | os.PathLike | None) -> None:
    """Every image of a dataset must exist before any embedding starts; the error names what is missing."""
    paths = {image for item in dataset.queries for image in [item[1]] if image}
    paths |= {image for items in dataset.candidates for _, image in items if image}
    missing = sorted(path for path in paths if not os.path.isfile(os.path.join(os.fspath(image_root or ""), path)))
    if missing:
        raise FileNotFoundError(
            f"MMEB dataset {dataset.name!r}: {len(missing)} image(s) not found under image_root="
            f"{None if image_root is None else os.fspath(image_root)!r} (first: {missing[:3]}). MMEB images come from "
            f"the images.zip of {MMEB_HUB_ID}, unpacked into the image root."
        )


def predictions_from_scores(scores: Sequence[torch.Tensor]) -> list[int]:
    """Index of the top candidate per query; when another candidate ties the positive, that candidate wins."""
    predictions = []
    for row in scores:
        others = row[1:]
        if len(others) == 0 or row[0] > others.max():
            predictions.append(0)
        else:
            predictions.append(1 + int(others.argmax()))
    return predictions


@dataclass
class MMEBResult:
    """Per-dataset precision@1 (%), predictions, and the means over the datasets that ran."""

    scores: dict[str, float] = field(default_factory=dict)
    predictions: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """Category, IND, OOD and overall means (%); a mean over a partial set is listed under ``incomplete``."""
        means: dict[str, float] = {}
        incomplete: dict[str, list[str]] = {}
        groups = {category: split["IND"] + split["OOD"] for category, split in MMEB_CATEGORIES.items()}
        groups.update({"IND": IND_DATASETS, "OOD": OOD_DATASETS, "Overall": MMEB_DATASETS})
        for group, names in groups.items():
            present = [name for name in names if name in self.scores]
            if not present:
                continue
            means[group] = sum(self.scores[name] for name in present) / len(present)
            if len(present) < len(names):
                incomplete[group] = sorted(set(names) - set(present))
        return {"datasets": dict(self.scores), "means": means, "incomplete": incomplete}


def evaluate_mmeb(
    embedder: Any,
    datasets: Sequence[str] | None = None,
    root: str | os.PathLike | None = None,
    image_root: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 32,
    reranker: Any = None,
    rerank_top_k: int = 10,
    rerank_mode: str = "listwise",
    state: Any = None,
) -> tuple[MMEBResult, MMEBResult | None]:
    """Evaluate on MMEB datasets (all 36 by default). Returns (embedder result, rerank result or None).

    With ``reranker``, the embedder's top ``rerank_top_k`` candidates of each query are re-ordered by
    ``reranker.rerank(query, candidates, mode=rerank_mode)`` and the new first candidate is the prediction; the
    candidates below the top k keep their order.
    """
    result, reranked = MMEBResult(), (MMEBResult() if reranker is not None else None)
    for name in datasets or MMEB_DATASETS:
        evaluate_task(
            embedder, load_mmeb_dataset(name, root), result, reranked, image_root=image_root, cache_dir=cache_dir,
            batch_size=batch_size, reranker=reranker, rerank_top_k=rerank_top_k, rerank_mode=rerank_mode, state=state,
        )
    return result, reranked


def evaluate_task(
    embedder: Any,
    dataset: MMEBDataset,
    result: MMEBResult,
    reranked: MMEBResult | None = None,
    image_root: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 32,
    reranker: Any = None,
    rerank_top_k: int = 10,
    rerank_mode: str = "listwise",
    state: Any = None,
) -> None:
    """The MMEB protocol on one dataset in the MMEB shape (any task: MMEB's own or one built elsewhere): adds its
    precision@1 (%) and predictions to ``result`` (and, with a reranker, to ``reranked``)."""
    metric = load_metric("precision_at_1")
    name = dataset.name
    check_images(dataset, image_root)
    items = list(dict.fromkeys([*dataset.queries, *(item for items in dataset.candidates for item in items)]))
    if cache_dir is None:
        embeddings = embedder.encode(texts=[text for text, _ in items], images=[image for _, image in items],
                                     image_root=image_root, batch_size=batch_size)
    else:
        embeddings = cached_embeddings(embedder, items, Path(cache_dir) / "mmeb", image_root, batch_size, state)
    position = {item: index for index, item in enumerate(items)}
    scores = [
        embeddings[[position[item] for item in candidates]] @ embeddings[position[query]]
        for query, candidates in zip(dataset.queries, dataset.candidates)
    ]
    predictions = predictions_from_scores(scores)
    result.scores[name] = 100 * metric.compute(predictions=predictions, references=[0] * len(predictions))[
        "precision_at_1"
    ]
    result.predictions[name] = [
        {"row": row, "prediction": prediction, "correct": prediction == 0,
         "positive_score": float(row_scores[0]), "top_score": float(row_scores.max())}
        for row, (prediction, row_scores) in enumerate(zip(predictions, scores))
    ]
    if reranker is None or reranked is None:
        return
    reranked_predictions = []
    for query, candidates, row_scores in zip(dataset.queries, dataset.candidates, scores):
        ranking = sorted(range(len(candidates)), key=lambda index: (-float(row_scores[index]), index == 0, index))
        top = ranking[:rerank_top_k]
        order, _ = reranker.rerank(query, [candidates[index] for index in top], mode=rerank_mode, image_root=image_root)
        reranked_predictions.append(top[order[0]])
    reranked.scores[name] = 100 * metric.compute(
        predictions=reranked_predictions, references=[0] * len(reranked_predictions)
    )["precision_at_1"]
    reranked.predictions[name] = [
        {"row": row, "prediction": prediction, "correct": prediction == 0}
        for row, prediction in enumerate(reranked_predictions)
    ]


def write_predictions(result: MMEBResult, folder: str | os.PathLike) -> None:
    """One JSON-lines file of predictions per dataset."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in result.predictions.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


__all__ = [
    "MMEB_CATEGORIES",
    "MMEB_DATASETS",
    "IND_DATASETS",
    "OOD_DATASETS",
    "PUBLISHED_MMEB",
    "MMEBDataset",
    "MMEBResult",
    "load_mmeb_dataset",
    "evaluate_mmeb",
    "evaluate_task",
    "predictions_from_scores",
    "write_predictions",
]
