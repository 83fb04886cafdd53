"""Embedding the items of a benchmark: through the on-disk cache when a folder is given, else straight from the
embedder. The one place MMEB, retrieval and SugarCrepe turn items into vectors."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from modeling_unime.util.embedding_cache import cached_embeddings, embed_items

Item = tuple[str | None, str | None]

__all__ = ["Item", "embed_benchmark_items"]


def embed_benchmark_items(
    embedder: Any,
    items: Sequence[Item],
    image_root: str | os.PathLike | None,
    batch_size: int,
    cache_dir: str | os.PathLike | None = None,
    state: Any = None,
) -> torch.Tensor:
    """One row per item: `modeling_unime.util.embedding_cache.cached_embeddings` under ``cache_dir`` (only what the
    cache lacks is embedded, split over the processes of ``state``), or ``embedder.encode`` when ``cache_dir`` is None.

    Example:
        >>> class Lengths:
        ...     def encode(self, texts, images, image_root=None, batch_size=32):
        ...         return torch.tensor([[float(len(text or ""))] for text in texts])
        >>> embed_benchmark_items(Lengths(), [("ab", None), ("abc", None)], None, 8).tolist()
        [[2.0], [3.0]]
    """
    if cache_dir is None:
        return embed_items(embedder, items, image_root, batch_size)
    return cached_embeddings(embedder, items, cache_dir, image_root, batch_size, state)
