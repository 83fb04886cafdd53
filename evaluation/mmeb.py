"""MMEB evaluation (36 datasets): precision@1 per dataset, category / IND / OOD / overall means, optional rerank.

Each MMEB-eval dataset (Hub: ``TIGER-Lab/MMEB-eval``, one config per dataset, split ``test``) has columns
``qry_text``, ``qry_img_path``, ``tgt_text`` (list), ``tgt_img_path`` (list); candidate 0 is the positive. Texts keep
the Phi-3V ``<|image_1|>`` placeholder, which the processor converts per backbone. Every distinct query and candidate
is embedded once, through an on-disk cache keyed by model and content, so an interrupted run resumes.

Local data: a clone of the Hub repo (``git clone https://huggingface.co/datasets/TIGER-Lab/MMEB-eval``) has
``<root>/<Dataset>/test-00000-of-00001.parquet`` per dataset and ``images.zip``, unpacked with
``unzip images.zip -d eval_images/``; image paths are relative to ``<root>/eval_images``. The clone also holds a 37th
config, CIFAR-100, which is not one of MMEB's 36 datasets and is never read. Query texts are used exactly as stored
(instruction, ``<|image_1|>\n`` placeholder, trailing newline).

Scoring rule (``tie_rule``): the score of a candidate is its cosine with the query (both VLM2Vec's and the authors'
scorers run with ``--normalize True``). The rules differ only when candidates tie for the top score:

- ``"argmax"`` (default, VLM2Vec's official scorer, ``np.argmax``; the rule of VLM2Vec's published numbers, e.g.
  ``TIGER-Lab/VLM2Vec-Qwen2VL-2B`` 60.1): the first tied candidate wins, and candidate 0 is the positive, so a tie
  with the positive counts as correct. A row whose candidate list repeats the positive scores 100.
- ``"authors"`` (the UniME-V2 authors' ``Embedding/eval.py``: ``get_pred`` in ``evaluation/utils/utils.py`` orders
  the top 10 with ``np.argpartition`` then ``np.argsort`` and the row is right when the first is index 0; the rule of
  the published UniME-V2 numbers, e.g. 2B 63.6): numpy's unstable sorts decide a tie, so a tie with the positive is
  right or wrong as numpy orders it (about half the time for lists of 10 or more). numpy itself is called, so a run
  reproduces theirs on the same numpy and CPU (its SIMD sorts order ties differently across versions and CPUs).
- ``"strict"``: correct only when the positive's cosine is strictly above every other candidate's; a tie counts as
  wrong (the repeated-positive row scores 0, and a collapsed embedder cannot score by ties).

Rerank stage (``rerank_match``): the reranker's pick is right when its (text, image) equals the positive's
(``"content"``, default: the authors' ``Embedding/eval_rerank.py`` compares the picked candidate's content with the
positive's, so a repeated copy of the positive counts), or only when it is candidate 0 (``"index"``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modeling_unime.util.embedding_cache import Item, embed_with_cache
from modeling_unime.util.images import require_image_files

from .metrics import load_metric
from .rerank import rerank_head

MMEB_HUB_ID = "TIGER-Lab/MMEB-eval"
MMEB_CLONE_FOLDER = "MMEB-eval"
"""The folder name a clone of the Hub repo gets (the authors' evaluation points at ``<path>/MMEB-eval``)."""
MMEB_IMAGE_FOLDER = "eval_images"
"""Where ``images.zip`` is unpacked inside the clone (VLM2Vec's ``unzip images.zip -d eval_images/``)."""
UNUSED_CONFIGS = ("CIFAR-100",)
"""Configs of the Hub repo that are not among MMEB's 36 datasets."""
TIE_RULES = {
    "argmax": "VLM2Vec's official scorer (the rule of VLM2Vec's published numbers): argmax over the candidates, the "
              "first index wins a tie, so a tie with the positive counts as correct",
    "authors": "the UniME-V2 authors' scorer (the rule of the published UniME-V2 numbers): numpy's argpartition then "
               "argsort over the top 10, right when index 0 comes first, so numpy's unstable sort decides a tie",
    "strict": "correct only when the positive scores strictly above every other candidate, so a tie counts as wrong",
}
AUTHORS_TOP_K = 10
"""``get_pred(..., topk=10)`` in the authors' ``Embedding/eval.py``: the candidates their scorer orders (and the list
their rerank stage gets)."""
RERANK_MATCH_RULES = {
    "content": "the authors' rerank scorer: the pick is right when its (text, image) equals the positive's, so a "
               "repeated copy of the positive counts",
    "index": "the pick is right only when it is candidate 0",
}
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

# Published MMEB overall scores, as arXiv 2510.13515 reports them (its MMEB table, the VLM2Vec baselines included;
# the rerank rows from its reranker results) and the authors' README.
PUBLISHED_MMEB = {
    "TianchengGu/UniME-V2-Qwen2VL-2B": {"Overall": 63.6, "Overall (rerank)": 67.6},
    "TianchengGu/UniME-V2-Qwen2VL-7B": {"Overall": 68.0, "Overall (rerank)": 69.6},
    "TianchengGu/UniME-V2-LLaVA-OneVision-8B": {"Overall": 71.2},
    "TIGER-Lab/VLM2Vec-Qwen2VL-2B": {"Overall": 60.1},
    "TIGER-Lab/VLM2Vec-Qwen2VL-7B": {"Overall": 65.8},
}

@dataclass
class MMEBDataset:
    """One MMEB-eval dataset: per row a query item and its candidate items (candidate 0 is the positive)."""

    name: str
    queries: list[Item]
    candidates: list[list[Item]]
    source: str | None = None

    def __len__(self) -> int:
        return len(self.queries)


def _rows_to_dataset(name: str, rows: Sequence[dict[str, Any]], source: str | None = None) -> MMEBDataset:
    """Rows of the Hub schema as an `MMEBDataset`; texts are kept exactly as stored ("" means no text / no image)."""
    where = f" ({source})" if source else ""
    queries, candidates = [], []
    for index, row in enumerate(rows):
        for column in ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path"):
            if column not in row:
                raise ValueError(
                    f"MMEB dataset {name!r}{where}, row {index}: no {column!r} column (columns: {sorted(row)}); "
                    "the Hub schema is qry_text, qry_img_path, tgt_text (list), tgt_img_path (list)."
                )
        texts, images = list(row["tgt_text"]), list(row["tgt_img_path"])
        if len(texts) != len(images) or not texts:
            raise ValueError(
                f"MMEB dataset {name!r}{where}, row {index}: tgt_text has {len(texts)} entries and tgt_img_path "
                f"{len(images)}."
            )
        queries.append((row["qry_text"] or None, row["qry_img_path"] or None))
        candidates.append([(text or None, image or None) for text, image in zip(texts, images)])
    return MMEBDataset(name, queries, candidates, source)


def mmeb_dataset_folder(name: str, root: str | os.PathLike) -> Path:
    """The folder of one dataset in a local copy: ``root/<name>``, or ``root/MMEB-eval/<name>`` when ``root`` is the
    folder the clone was made in."""
    root = Path(root)
    folder = root / name
    if not folder.is_dir() and (root / MMEB_CLONE_FOLDER / name).is_dir():
        return root / MMEB_CLONE_FOLDER / name
    return folder


def load_mmeb_dataset(name: str, root: str | os.PathLike | None = None, max_rows: int | None = None) -> MMEBDataset:
    """Load one MMEB-eval dataset from a local copy of the Hub repo (``root/<name>/test-*.parquet``; see
    `mmeb_dataset_folder`) or, without ``root``, from the Hub (``TIGER-Lab/MMEB-eval``, config ``name``, split
    ``test``); only its first ``max_rows`` rows when given.

    Raises:
        ValueError: ``name`` is not one of the 36 datasets; a parquet file is a Git LFS pointer; a column is missing;
            ``max_rows`` < 1.
        FileNotFoundError: no parquet file for ``name`` (the message says where it looked and how to download).
    """
    if name not in MMEB_DATASETS:
        unused = f" ({name} is in the Hub repo but not one of MMEB's 36 datasets)" if name in UNUSED_CONFIGS else ""
        raise ValueError(f"{name!r} is not an MMEB-eval dataset{unused}; known: {', '.join(MMEB_DATASETS)}.")
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be >= 1 (or None for every row), got {max_rows}.")
    if root is None:
        from datasets import load_dataset

        split = "test" if max_rows is None else f"test[:{max_rows}]"
        return _rows_to_dataset(name, load_dataset(MMEB_HUB_ID, name, split=split).to_list())
    import pyarrow.parquet as parquet

    from .data_files import check_not_lfs_pointers

    folder = mmeb_dataset_folder(name, root)
    files = sorted(folder.glob("test-*.parquet")) or sorted(folder.glob("*.parquet"))
    if not files:
        raise FileNotFoundError(
            f"MMEB dataset {name!r}: no parquet file in {folder} (expected the layout of the Hub repo "
            f"{MMEB_HUB_ID}: <root>/{name}/test-00000-of-00001.parquet; download it with "
            f"`git clone https://huggingface.co/datasets/{MMEB_HUB_ID}` or `huggingface-cli download {MMEB_HUB_ID} "
            f"--repo-type dataset --local-dir <root>`, and pass that folder as root)."
        )
    check_not_lfs_pointers(files, f"MMEB dataset {name!r}")
    rows: list[dict[str, Any]] = []
    for file in files:
        for batch in parquet.ParquetFile(file).iter_batches(batch_size=1024):
            rows.extend(batch.to_pylist())
            if max_rows is not None and len(rows) >= max_rows:
                return _rows_to_dataset(name, rows[:max_rows], source=str(files[0]))
    return _rows_to_dataset(name, rows, source=str(files[0]))


def _first_image(dataset: MMEBDataset) -> str | None:
    for query, candidates in zip(dataset.queries, dataset.candidates):
        for _, image in [query, *candidates]:
            if image:
                return image
    return None


def resolve_mmeb_image_root(
    dataset: MMEBDataset, root: str | os.PathLike | None, image_root: str | os.PathLike | None
) -> str | None:
    """The folder a dataset's image paths are relative to.

    Tried in order (the first that holds the dataset's first image wins): ``image_root`` when given, else
    ``root/eval_images`` (VLM2Vec's ``unzip images.zip -d eval_images/``), ``root/images`` and ``root``; for each, also
    its subfolders one level down (an archive unpacked with its own top folder). A dataset without images needs none.

    Raises:
        FileNotFoundError: the first image is under none of them; the message names the file, the folders tried and,
            when ``images.zip`` sits there unpacked, the command to unpack it.
    """
    probe = _first_image(dataset)
    if probe is None:
        return None if image_root is None else os.fspath(image_root)
    if image_root is not None:
        candidates = [Path(image_root)]
    elif root is not None:
        base = mmeb_dataset_folder(dataset.name, root).parent
        candidates = [base / MMEB_IMAGE_FOLDER, base / "images", base]
    else:
        raise FileNotFoundError(
            f"MMEB dataset {dataset.name!r} has images (e.g. {probe!r}) but no image_root was given: download "
            f"images.zip from {MMEB_HUB_ID}, run `unzip images.zip -d eval_images/` and pass that folder as image_root."
        )
    tried = []
    for candidate in candidates:
        nested = sorted(path for path in candidate.iterdir() if path.is_dir()) if candidate.is_dir() else []
        for folder in [candidate, *nested]:
            tried.append(folder)
            if (folder / probe).is_file():
                return os.fspath(folder)
    base = candidates[-1] if image_root is None else Path(image_root).parent
    archive = base / "images.zip"
    hint = (f"{archive} is there but not unpacked: run `unzip {archive} -d {base / MMEB_IMAGE_FOLDER}`."
            if archive.is_file() else
            f"MMEB images come from the images.zip of {MMEB_HUB_ID}: unzip it with `unzip images.zip -d "
            f"{MMEB_IMAGE_FOLDER}/` inside the clone (or pass the folder it was unpacked to as image_root).")
    if archive.is_file():
        from .data_files import check_not_lfs_pointers

        check_not_lfs_pointers([archive], "MMEB images")
    raise FileNotFoundError(
        f"MMEB dataset {dataset.name!r}: its image {probe!r} is under none of "
        f"{', '.join(os.fspath(folder) for folder in tried[:6])}{' ...' if len(tried) > 6 else ''}. {hint}"
    )


def check_images(dataset: MMEBDataset, image_root: str | os.PathLike | None) -> None:
    """Every image of a dataset must exist before any embedding starts; the error (`MissingImagesError`, a
    FileNotFoundError) names what is missing."""
    paths = [image for _, image in dataset.queries] + [image for items in dataset.candidates for _, image in items]
    require_image_files(
        paths, image_root, f"MMEB dataset {dataset.name!r}",
        f"MMEB images come from the images.zip of {MMEB_HUB_ID}, unpacked into the image root.",
    )


def authors_order(row_scores: torch.Tensor, top_k: int = AUTHORS_TOP_K) -> list[int]:
    """The first ``top_k`` candidate indices, best first, exactly as the authors' ``get_pred`` orders them:
    ``np.argpartition(scores, -top_k)[-top_k:]``, then those sorted by ``np.argsort(-scores[...])``.

    Both numpy calls are unstable, so the order of tied candidates is whatever numpy gives; numpy is called here on
    the same float32 scores so that ties fall as they fell in the authors' run (on the same numpy and CPU).

    >>> authors_order(torch.tensor([0.1, 0.9, 0.5, 0.3]), top_k=3)
    [1, 2, 3]
    """
    scores = row_scores.detach().float().cpu().numpy()
    top_k = min(top_k, len(scores))
    head = np.argpartition(scores, -top_k)[-top_k:]
    return [int(index) for index in head[np.argsort(-scores[head])]]


def predictions_from_scores(scores: Sequence[torch.Tensor], tie_rule: str = "argmax") -> list[int]:
    """Index of the predicted candidate per query (candidate 0 is the positive).

    ``tie_rule="argmax"``: the first index among those with the top score (``torch.argmax``, like VLM2Vec's
    ``np.argmax``), so a tie with the positive predicts the positive. ``"authors"``: the first of `authors_order`
    (numpy decides a tie). ``"strict"``: when another candidate ties the positive, that candidate wins (the first
    such one), so a tie counts as wrong.

    >>> scores = [torch.tensor([0.5, 0.5, 0.1]), torch.tensor([0.2, 0.9, 0.9])]
    >>> predictions_from_scores(scores), predictions_from_scores(scores, tie_rule="strict")
    ([0, 1], [1, 1])
    """
    _check_tie_rule(tie_rule)
    predictions = []
    for row in scores:
        if tie_rule == "argmax":
            predictions.append(int(torch.argmax(row)))
            continue
        if tie_rule == "authors":
            predictions.append(authors_order(row)[0])
            continue
        others = row[1:]
        if len(others) == 0 or row[0] > others.max():
            predictions.append(0)
        else:
            predictions.append(1 + int(others.argmax()))
    return predictions


def _check_tie_rule(tie_rule: str) -> None:
    if tie_rule not in TIE_RULES:
        rules = "; ".join(f"{name}: {meaning}" for name, meaning in TIE_RULES.items())
        raise ValueError(f"tie_rule={tie_rule!r}: use one of {', '.join(TIE_RULES)} ({rules}).")


def _check_rerank_match(rerank_match: str) -> None:
    if rerank_match not in RERANK_MATCH_RULES:
        rules = "; ".join(f"{name}: {meaning}" for name, meaning in RERANK_MATCH_RULES.items())
        raise ValueError(f"rerank_match={rerank_match!r}: use one of {', '.join(RERANK_MATCH_RULES)} ({rules}).")


@dataclass
class MMEBTaskResult:
    """What `evaluate_task` measured on one dataset: precision@1 (%), the rows where another candidate ties the
    positive for the top score, per-row predictions and, with a reranker, the same after the rerank stage."""

    name: str
    score: float
    ties: int
    predictions: list[dict[str, Any]]
    tie_rule: str = "argmax"
    reranked_score: float | None = None
    reranked_predictions: list[dict[str, Any]] | None = None
    rerank_match: str | None = None


@dataclass
class MMEBResult:
    """Per-dataset precision@1 (%), predictions, and the means over the datasets that ran.

    ``tie_rule`` is the rule the scores were computed with (see `TIE_RULES`); ``ties`` counts, per dataset, the rows
    where another candidate ties the positive for the top score (the rows where the rules may disagree).
    ``rerank_match`` (results after the rerank stage only) is the rule a pick was judged by (`RERANK_MATCH_RULES`).
    """

    scores: dict[str, float] = field(default_factory=dict)
    predictions: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    tie_rule: str = "argmax"
    ties: dict[str, int] = field(default_factory=dict)
    data: dict[str, dict[str, Any]] = field(default_factory=dict)
    rerank_match: str | None = None

    @classmethod
    def from_tasks(cls, tasks: Sequence[MMEBTaskResult], tie_rule: str = "argmax", reranked: bool = False
                   ) -> "MMEBResult":
        """The embedder's results of ``tasks`` as one result; ``reranked=True``: those after the rerank stage (the
        embedder's ties are not repeated there)."""
        result = cls(tie_rule=tie_rule)
        for task in tasks:
            if not reranked:
                result.scores[task.name], result.predictions[task.name] = task.score, task.predictions
                result.ties[task.name] = task.ties
            elif task.reranked_score is None:
                raise ValueError(f"MMEB dataset {task.name!r} was evaluated without a reranker.")
            else:
                result.scores[task.name], result.predictions[task.name] = task.reranked_score, task.reranked_predictions
                result.rerank_match = task.rerank_match
        return result

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
        summary = {"datasets": dict(self.scores), "means": means, "incomplete": incomplete, "tie_rule": self.tie_rule,
                   "ties": dict(self.ties)}
        if self.rerank_match is not None:
            summary["rerank_match"] = self.rerank_match
        return summary


@dataclass(frozen=True)
class MMEBOptions:
    """How `evaluate_task` embeds and scores a dataset.

    Attributes:
        batch_size: rows per embedding batch.
        cache_dir: on-disk embedding cache (keyed by model and content; ``<cache_dir>/mmeb``), so an interrupted run
            resumes; None embeds without a cache.
        state: an ``accelerate`` state: encoding is split over its processes.
        tie_rule: ``"argmax"`` (VLM2Vec's scorer, the default), ``"authors"`` (the UniME-V2 authors' scorer) or
            ``"strict"``; see `TIE_RULES`.
        reranker: optional; the embedder's top ``rerank_top_k`` candidates of each query are re-ordered by
            ``reranker.rerank(query, candidates, mode=rerank_mode)`` and the new first candidate is the prediction.
        rerank_top_k: how many of the embedder's candidates the reranker sees.
        rerank_mode: ``"listwise"`` or ``"pairwise"``, passed to ``reranker.rerank``.
        rerank_match: how the reranker's pick is judged: ``"content"`` (the authors' rule, default: right when its
            (text, image) equals the positive's) or ``"index"`` (right only when it is candidate 0); see
            `RERANK_MATCH_RULES`.
    """

    batch_size: int = 32
    cache_dir: str | os.PathLike | None = None
    state: Any = None
    tie_rule: str = "argmax"
    reranker: Any = None
    rerank_top_k: int = 10
    rerank_mode: str = "listwise"
    rerank_match: str = "content"

    def __post_init__(self) -> None:
        _check_tie_rule(self.tie_rule)
        _check_rerank_match(self.rerank_match)


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
    tie_rule: str = "argmax",
    prepared: Sequence[tuple[MMEBDataset, str | None]] | None = None,
    rerank_match: str = "content",
    max_rows: int | None = None,
) -> tuple[MMEBResult, MMEBResult | None]:
    """Evaluate on MMEB datasets (all 36 by default). Returns (embedder result, rerank result or None).

    Args:
        embedder: has ``encode(texts=, images=, image_root=, batch_size=)`` (e.g. `UniMEV2Model`).
        datasets: names from `MMEB_DATASETS`; all 36 when None.
        root: a local copy of the Hub repo (see `load_mmeb_dataset`); the Hub when None.
        image_root: the folder image paths are relative to; found by `resolve_mmeb_image_root` when None.
        prepared: the output of `prepare_mmeb` (datasets already loaded and checked); ``datasets``, ``root``,
            ``image_root`` and ``max_rows`` are then not used.
        max_rows: only the first ``max_rows`` rows of each dataset (a smoke test; the scores are then not MMEB's).
        cache_dir, batch_size, reranker, rerank_top_k, rerank_mode, rerank_match, state, tie_rule: see
            `MMEBOptions`.
    """
    options = MMEBOptions(batch_size=batch_size, cache_dir=cache_dir, state=state, tie_rule=tie_rule,
                          reranker=reranker, rerank_top_k=rerank_top_k, rerank_mode=rerank_mode,
                          rerank_match=rerank_match)
    if prepared is None:
        prepared = prepare_mmeb(datasets, root, image_root, max_rows)
    tasks, data = [], {}
    for dataset, dataset_image_root in prepared:
        data[dataset.name] = {"source": dataset.source or f"{MMEB_HUB_ID} (Hub)", "image_root": dataset_image_root,
                              "rows": len(dataset)}
        tasks.append(evaluate_task(embedder, dataset, dataset_image_root, options))
    result = MMEBResult.from_tasks(tasks, tie_rule)
    result.data = data
    return result, MMEBResult.from_tasks(tasks, tie_rule, reranked=True) if reranker is not None else None


def prepare_mmeb(
    datasets: Sequence[str] | None = None,
    root: str | os.PathLike | None = None,
    image_root: str | os.PathLike | None = None,
    max_rows: int | None = None,
) -> list[tuple[MMEBDataset, str | None]]:
    """Load every requested dataset (its first ``max_rows`` rows when given), find its image folder and check that
    every image is there: the whole of MMEB's data is validated (in seconds) before anything is embedded. Returns
    ``[(dataset, image_root)]`` in order."""
    prepared = []
    for name in datasets or MMEB_DATASETS:
        dataset = load_mmeb_dataset(name, root, max_rows)
        dataset_image_root = resolve_mmeb_image_root(dataset, root, image_root)
        check_images(dataset, dataset_image_root)
        prepared.append((dataset, dataset_image_root))
    return prepared


def candidate_scores(embeddings: torch.Tensor, query: int, candidates: Sequence[int]) -> torch.Tensor:
    """Cosine of one query with its candidates (rows of ``embeddings``). A candidate listed twice gets the very same
    score (each distinct row is scored once), so a repeated item always ties exactly."""
    distinct = list(dict.fromkeys(candidates))
    values = embeddings[distinct] @ embeddings[query]
    lookup = dict(zip(distinct, values))
    return torch.stack([lookup[index] for index in candidates])


def ranking_from_scores(row_scores: torch.Tensor, tie_rule: str = "argmax", top_k: int = AUTHORS_TOP_K) -> list[int]:
    """Candidate indices best first. Equal scores keep candidate order under ``"argmax"`` (so a tie with the
    positive, candidate 0, puts it first) and put the positive after the candidates it ties under ``"strict"``.
    Under ``"authors"`` the first ``top_k`` are `authors_order` (the list the authors' rerank stage gets), the rest
    follow in ``"argmax"`` order.

    >>> ranking_from_scores(torch.tensor([0.5, 0.9, 0.5])), ranking_from_scores(torch.tensor([0.5, 0.9, 0.5]), "strict")
    ([1, 0, 2], [1, 2, 0])
    """
    _check_tie_rule(tie_rule)
    strict = tie_rule == "strict"
    ranking = sorted(range(len(row_scores)),
                     key=lambda index: (-float(row_scores[index]), strict and index == 0, index))
    if tie_rule != "authors":
        return ranking
    head = authors_order(row_scores, top_k)
    chosen = set(head)
    return head + [index for index in ranking if index not in chosen]


def evaluate_task(
    embedder: Any,
    dataset: MMEBDataset,
    image_root: str | os.PathLike | None = None,
    options: MMEBOptions = MMEBOptions(),
) -> MMEBTaskResult:
    """The MMEB protocol on one dataset in the MMEB shape (any task: MMEB's own or one built elsewhere): its
    precision@1 (%), ties and predictions, scored with ``options.tie_rule`` (and, with ``options.reranker``, the same
    after the rerank stage).

    With a reranker, the candidates handed to it are the embedder's top ``options.rerank_top_k`` in the order
    `ranking_from_scores` gives (a tie with the positive puts the positive first under ``"argmax"``, last under
    ``"strict"``, where numpy puts it under ``"authors"``); the reranker's order is checked
    (`evaluation.rerank.rerank_head`), and its pick is judged by ``options.rerank_match``."""
    metric = load_metric("precision_at_1")
    check_images(dataset, image_root)
    items = list(dict.fromkeys([*dataset.queries, *(item for items in dataset.candidates for item in items)]))
    cache_dir = None if options.cache_dir is None else Path(options.cache_dir) / "mmeb"
    embeddings = embed_with_cache(embedder, items, image_root, options.batch_size, cache_dir, options.state)
    # Cosine, as VLM2Vec's scorer: embedders that do not normalise are scored the same way.
    embeddings = torch.nn.functional.normalize(torch.as_tensor(embeddings).float(), dim=-1)
    position = {item: index for index, item in enumerate(items)}
    scores = [
        candidate_scores(embeddings, position[query], [position[item] for item in candidates])
        for query, candidates in zip(dataset.queries, dataset.candidates)
    ]
    predictions = predictions_from_scores(scores, options.tie_rule)
    tied = [len(row) > 1 and bool(row[0] == row[1:].max()) for row in scores]
    result = MMEBTaskResult(
        name=dataset.name,
        score=100 * metric.compute(predictions=predictions, references=[0] * len(predictions))["precision_at_1"],
        ties=sum(tied),
        predictions=[
            {"row": row, "prediction": prediction, "correct": prediction == 0, "positive_tied": tie,
             "positive_score": float(row_scores[0]), "top_score": float(row_scores.max())}
            for row, (prediction, row_scores, tie) in enumerate(zip(predictions, scores, tied))
        ],
        tie_rule=options.tie_rule,
    )
    if options.reranker is None:
        return result
    reranked = [
        rerank_head(ranking_from_scores(row_scores, options.tie_rule, options.rerank_top_k), query, candidates,
                    options.reranker, options.rerank_top_k, image_root, options.rerank_mode, query_index=row)[0]
        for row, (query, candidates, row_scores) in enumerate(zip(dataset.queries, dataset.candidates, scores))
    ]
    # Under "content" a pick whose (text, image) equals the positive's is the positive, whatever its index.
    judged = [0 if options.rerank_match == "content" and candidates[prediction] == candidates[0] else prediction
              for prediction, candidates in zip(reranked, dataset.candidates)]
    result.reranked_score = 100 * metric.compute(predictions=judged, references=[0] * len(judged))["precision_at_1"]
    result.reranked_predictions = [{"row": row, "prediction": prediction, "correct": verdict == 0}
                                   for row, (prediction, verdict) in enumerate(zip(reranked, judged))]
    result.rerank_match = options.rerank_match
    return result


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
    "AUTHORS_TOP_K",
    "PUBLISHED_MMEB",
    "RERANK_MATCH_RULES",
    "TIE_RULES",
    "UNUSED_CONFIGS",
    "MMEBDataset",
    "MMEBOptions",
    "MMEBResult",
    "MMEBTaskResult",
    "authors_order",
    "candidate_scores",
    "check_images",
    "load_mmeb_dataset",
    "mmeb_dataset_folder",
    "prepare_mmeb",
    "resolve_mmeb_image_root",
    "evaluate_mmeb",
    "evaluate_task",
    "predictions_from_scores",
    "ranking_from_scores",
    "write_predictions",
]
