"""What mining works on: the validated (query, positive) rows, the candidate pool, the pool positions each row must
never take as a negative, and the embeddings of all of them."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from datasets import Dataset

from ..processing_unime import drop_orphan_placeholder
from ..util.embedding_cache import Item, embed_with_cache
from ..util.images import require_image_files

IMAGE_COLUMNS = ("query_image", "pos_image")


def _image_key(image: Any, where: str) -> str | None:
    if image is None or image == "":
        return None
    if not isinstance(image, str):
        raise ValueError(
            f"{where}: mining takes image paths (strings) or None, got {type(image).__name__}; save images to files "
            "(relative to image_root) so that identical candidates can be recognised and cached."
        )
    return image


def read_pairs(dataset: Dataset) -> tuple[list[dict[str, Any]], list[Item], list[Item]]:
    """(rows, queries, positives) of a dataset of (query text/image, positive text/image) rows, validated."""
    if len(dataset) == 0:
        raise ValueError("The dataset is empty: nothing to mine.")
    for column in ("query_text", "query_image", "pos_text", "pos_image"):
        if column not in dataset.column_names:
            raise ValueError(
                f"The dataset has no {column!r} column; it needs query_text/query_image/pos_text/pos_image."
            )
    rows = dataset.to_list()
    queries, positives, orphans = [], [], []
    for index, row in enumerate(rows):
        query = (row["query_text"] or None, _image_key(row["query_image"], f"row {index} query_image"))
        positive = (row["pos_text"] or None, _image_key(row["pos_image"], f"row {index} pos_image"))
        fixed = [(drop_orphan_placeholder(text, image is not None), image) for text, image in (query, positive)]
        if fixed != [query, positive]:
            orphans.append(index)
            query, positive = fixed
        for name, item in (("query", query), ("positive", positive)):
            if item == (None, None):
                raise ValueError(f"Row {index}: the {name} has neither text nor image.")
        queries.append(query)
        positives.append(positive)
    if orphans:
        warnings.warn(f"{len(orphans)} row(s) have a text with an image placeholder but no image (first: row "
                      f"{orphans[0]}; the authors' WebQA queries are such): the placeholder was dropped for embedding "
                      "and judging (modeling_unime.processing_unime.drop_orphan_placeholder).", stacklevel=2)
    return rows, queries, positives


def check_images(rows: Sequence[dict[str, Any]], image_root: str | os.PathLike | None) -> None:
    """Every image path of the (query, positive) rows must exist: fail before any model runs, naming the row
    (`modeling_unime.util.images.MissingImagesError`, a ValueError)."""
    paths = [row.get(column) for row in rows for column in IMAGE_COLUMNS]
    labels = [f"row {index} {column}" for index in range(len(rows)) for column in IMAGE_COLUMNS]
    require_image_files(paths, image_root, "query/positive", "Fix the paths or pass the right image_root.", labels)


def build_pool(positives: Sequence[Item], pool: Sequence[Item] | None = None) -> list[Item]:
    """The candidate pool: the given items, or every positive of the dataset, deduplicated in first-seen order."""
    if pool is None:
        return list(dict.fromkeys(positives))
    pool = [(text or None, _image_key(image, f"pool item {index}")) for index, (text, image) in enumerate(pool)]
    if not pool:
        raise ValueError("The candidate pool is empty.")
    return pool


def exclusions(pool: Sequence[Item], positives: Sequence[Item]) -> list[list[int]]:
    """For each row, the pool positions holding its own positive (every exact duplicate of it): never a negative."""
    positions: dict[Item, list[int]] = {}
    for index, item in enumerate(pool):
        positions.setdefault(item, []).append(index)
    return [positions.get(positive, []) for positive in positives]


def count_duplicate_rows(queries: Sequence[Item], positives: Sequence[Item]) -> int:
    """Rows whose (query, positive) pair appeared earlier: kept as given (their judge pairs are scored once)."""
    return len(queries) - len(set(zip(queries, positives)))


@dataclass(frozen=True)
class MiningInputs:
    """The rows of one mining run, validated, with their candidate pool and exclusions (`from_dataset`)."""

    rows: list[dict[str, Any]]
    queries: list[Item]
    positives: list[Item]
    pool: list[Item]
    excluded: list[list[int]]

    @classmethod
    def from_dataset(
        cls, dataset: Dataset, pool: Sequence[Item] | None = None, image_root: str | os.PathLike | None = None
    ) -> MiningInputs:
        """Read and check the pairs (`read_pairs`, `check_images`), build the pool (`build_pool`) and each row's
        excluded pool positions (`exclusions`)."""
        rows, queries, positives = read_pairs(dataset)
        check_images(rows, image_root)
        pool = build_pool(positives, pool)
        return cls(rows, queries, positives, pool, exclusions(pool, positives))

    def __len__(self) -> int:
        return len(self.rows)


class MiningEmbeddings(NamedTuple):
    """The embeddings of the queries (on the CPU) and of the pool (on the device the top-k runs on)."""

    queries: torch.Tensor
    pool: torch.Tensor


def retrieval_device(embedder: Any) -> torch.device:
    """Where the similarity search runs: the embedder's device (a GPU makes the top-k over a 600K pool take seconds
    instead of CPU hours), CPU for anything that is not a torch module."""
    if isinstance(embedder, torch.nn.Module):
        parameter = next(embedder.parameters(), None)
        if parameter is not None:
            return parameter.device
    return torch.device("cpu")


def embed_inputs(
    embedder: Any,
    inputs: MiningInputs,
    image_root: str | os.PathLike | None,
    batch_size: int,
    cache_dir: str | os.PathLike | None = None,
    state: Any = None,
) -> MiningEmbeddings:
    """Embed the queries and the pool: through the on-disk embedding cache under ``cache_dir`` (split over the
    processes of ``state``) when given, else directly (`embed_with_cache`)."""
    embeddings = embed_with_cache(embedder, [*inputs.queries, *inputs.pool], image_root, batch_size, cache_dir, state)
    query_embeddings, pool_embeddings = embeddings[: len(inputs.queries)], embeddings[len(inputs.queries) :]
    return MiningEmbeddings(query_embeddings, pool_embeddings.to(retrieval_device(embedder)))
