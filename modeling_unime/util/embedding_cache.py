"""The embedding cache: embeddings on disk keyed by the embedder's fingerprint and each item's content, used by
mining and by every evaluation ("embed what the cache lacks, read the rest")."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .files import atomic_write, warn_damaged
from .fingerprint import model_fingerprint, processor_settings

Item = tuple[str | None, str | None]
"""(text, image) of one row to embed; an item may carry a third element, its video (a sequence of frame paths, or
None), which `embed_items` passes as ``encode(videos=...)`` and the cache key includes."""

__all__ = ["EmbeddingCache", "Item", "accepts_videos", "cached_embeddings", "embed_items", "embed_with_cache",
           "item_key", "root_key"]


def item_key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode()).hexdigest()


def root_key(image_root: str | os.PathLike | None) -> str | None:
    """The image root as it enters cache keys: absolute, so that one relative root seen from two working folders, or
    two roots holding files under the same relative paths, never share an entry."""
    return None if image_root is None or os.fspath(image_root) == "" else os.path.abspath(os.fspath(image_root))


class EmbeddingCache:
    """Embeddings on disk, keyed by the embedder's fingerprint and each item's content (text, image path, absolute
    image root).

    Files are ``<folder>/<fingerprint>/part-*.safetensors``, each written atomically, so an interrupted run keeps
    every part it finished. A part that cannot be read (cut in half by a full disk or an interrupted copy) is
    reported with a `DamagedCacheWarning` naming it, deleted, and its embeddings are computed again.
    """

    def __init__(self, folder: str | os.PathLike, fingerprint: str, image_root: Any = None) -> None:
        self.folder = Path(folder) / fingerprint
        self.image_root = root_key(image_root)
        self.vectors: dict[str, torch.Tensor] = {}
        self.reload()

    def reload(self) -> None:
        """Read every part of the folder; damaged parts are reported, removed and left to be recomputed."""
        for part in sorted(self.folder.glob("part-*.safetensors")):
            try:
                vectors = load_file(part)
            except FileNotFoundError:  # another process removed it as damaged
                continue
            except (SafetensorError, OSError, ValueError, RuntimeError) as error:
                warn_damaged(part, "embedding cache part", error,
                              "it was removed and the embeddings it held are computed again.")
                part.unlink(missing_ok=True)
                continue
            self.vectors.update(vectors)

    def key(self, item: Item) -> str:
        text, image, *video = item
        frames = video[0] if video else None
        if frames is None:  # the key every (text, image) item has always had
            return item_key(text, image, self.image_root)
        return item_key(text, image, [os.fspath(frame) for frame in frames], self.image_root)

    def missing(self, items: Sequence[Item]) -> list[Item]:
        return list(dict.fromkeys(item for item in items if self.key(item) not in self.vectors))

    def add(self, items: Sequence[Item], embeddings: torch.Tensor) -> None:
        tensors = {self.key(item): vector.contiguous().clone() for item, vector in zip(items, embeddings)}
        part = self.folder / f"part-{uuid.uuid4().hex}.safetensors"
        atomic_write(part, lambda path: save_file(tensors, str(path)))
        self.vectors.update(tensors)

    def lookup(self, items: Sequence[Item]) -> torch.Tensor:
        return torch.stack([self.vectors[self.key(item)] for item in items])


def accepts_videos(embedder: Any) -> bool:
    """Whether ``embedder.encode`` takes ``videos=`` (by name or through ``**kwargs``)."""
    try:
        parameters = inspect.signature(embedder.encode).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(parameter.name == "videos" or parameter.kind is inspect.Parameter.VAR_KEYWORD
               for parameter in parameters)


def embed_items(embedder: Any, items: Sequence[Item], image_root: Any, batch_size: int) -> torch.Tensor:
    """``embedder.encode`` on the items; ``videos=`` (a list of frame paths or None per row) only when some item has a
    video, so embedders without video support still embed texts and images.

    Raises:
        TypeError: items have videos but ``encode`` takes no ``videos=``.
    """
    kwargs: dict[str, Any] = {"texts": [item[0] for item in items], "images": [item[1] for item in items],
                              "image_root": image_root, "batch_size": batch_size}
    videos = [list(item[2]) if len(item) > 2 and item[2] is not None else None for item in items]
    if any(video is not None for video in videos):
        if not accepts_videos(embedder):
            raise TypeError(f"{type(embedder).__name__}.encode() takes no videos= argument, which video rows need "
                            "(one list of frame paths per row): use an embedder with video support.")
        kwargs["videos"] = videos
    return embedder.encode(**kwargs)


def cached_embeddings(
    embedder: Any, items: Sequence[Item], cache_dir: str | os.PathLike, image_root: Any, batch_size: int,
    state: Any = None,
) -> torch.Tensor:
    """Embeddings of ``items`` through the on-disk `EmbeddingCache`: only missing items are embedded, split over the
    processes of ``state`` (when given), saved part by part, then read back by every process."""
    if isinstance(embedder, torch.nn.Module):
        # The processor (image rule, image sizes, tokenizer) changes embeddings without touching the weights.
        try:
            processor = embedder.processor
        except (AttributeError, ValueError):  # no processor of its own: the caller passes one to encode()
            processor = None
        fingerprint = model_fingerprint(embedder, processor_settings(processor))
    else:
        fingerprint = type(embedder).__name__
    cache = EmbeddingCache(cache_dir, fingerprint, image_root)
    missing = cache.missing(items)
    if state is not None:
        # Every process must split the same list: nobody writes a part before all have read the folder.
        state.wait_for_everyone()
        missing = missing[state.process_index :: state.num_processes]
    flush_every = max(batch_size * 8, 1)
    for start in range(0, len(missing), flush_every):
        part = missing[start : start + flush_every]
        cache.add(part, embed_items(embedder, part, image_root, batch_size))
    if state is not None:
        state.wait_for_everyone()
        cache.reload()
    return cache.lookup(items)


def embed_with_cache(
    embedder: Any,
    items: Sequence[Item],
    image_root: Any,
    batch_size: int,
    cache_dir: str | os.PathLike | None = None,
    state: Any = None,
) -> torch.Tensor:
    """One row per item: `cached_embeddings` under ``cache_dir`` (only what the cache lacks is embedded, split over
    the processes of ``state``), or ``embedder.encode`` when ``cache_dir`` is None. The one place mining and every
    benchmark turn items into vectors.

    Example:
        >>> class Lengths:
        ...     def encode(self, texts, images, image_root=None, batch_size=32):
        ...         return torch.tensor([[float(len(text or ""))] for text in texts])
        >>> embed_with_cache(Lengths(), [("ab", None), ("abc", None)], None, 8).tolist()
        [[2.0], [3.0]]
    """
    if cache_dir is None:
        return embed_items(embedder, items, image_root, batch_size)
    return cached_embeddings(embedder, items, cache_dir, image_root, batch_size, state)
