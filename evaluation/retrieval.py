"""Zero-shot image-text retrieval: Flickr30K (1K test), COCO (5K test), ShareGPT4V (first 1K), Urban1K.

Protocol (arXiv 2510.13515, zero-shot retrieval, Table 2; the authors'
``Embedding/evaluation/eval_flickr_coco_sharegpt4v_urban1k.py``): every image is a query against all captions
(image->text, a hit when ANY of its captions is in the top k) and every caption is a query against all images
(text->image, its one image); recall@1/5/10 in both directions. Images are embedded with the instruction "Find an
image caption describing the given image.", captions as raw text (the authors'
``evaluation/utils/flickr_coco_sharegpt4v_urban1K.py``). The authors' script prints text->image under the label
"Image->Text"; here ``image_to_text`` always means image queries retrieving captions.

Data, as users get it (each loader detects the layout of the folder it is given and says which in
``ImageTextRetrievalSet.layout``):

- Flickr30K / COCO: a clone of ``royokong/flickr30k_test`` / ``royokong/coco_test`` (parquet with an ``image`` and a
  ``text`` column: the authors' data), or Karpathy's ``dataset_flickr30k.json`` / ``dataset_coco.json`` beside the
  images.
- ShareGPT4V: ``share-captioner_coco_lcs_sam_1246k_1107.json`` (first 1,000 entries), flat or in the authors' layout
  ``data/shareGPT4v/<json>`` with the images under ``data/``.
- Urban1K: ``image/<id>.jpg`` + ``caption/<id>.txt``, or the same one level down (``Urban1k/Urban1k/...``, what a
  clone of ``BeichenZhang/Urban1k`` gives once its zip is unpacked).

>>> import torch
>>> images = torch.eye(3)                                   # 3 images
>>> captions = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0.6, 0.8], [0, 1, 0]])
>>> recall_at_k(captions, images, [[0], [1], [1], [2]], ks=(1, 2))          # text->image
{'recall@1': 0.5, 'recall@2': 0.75}
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from modeling_unime.util.embedding_cache import Item, embed_with_cache
from modeling_unime.util.retrieval import chunked_top_k

from .metrics import load_metric
from .rerank import rerank_head
from .retrieval_data import ImageTextRetrievalSet

IMAGE_QUERY_INSTRUCTION = "Find an image caption describing the given image."


# --------------------------------------------------------------------------------------------- ranking


def recall_from_rankings(
    rankings: Sequence[Sequence[int]], relevant: Sequence[Sequence[int]], ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Recall@k of ranked candidate lists through the ``retrieval_recall`` metric module.

    >>> recall_from_rankings([[2, 0], [1, 0]], [[0], [1]], ks=(1, 2))
    {'recall@1': 0.5, 'recall@2': 1.0}
    """
    if len(rankings) != len(relevant):
        raise ValueError(f"{len(rankings)} rankings but {len(relevant)} lists of relevant candidates.")
    metric = load_metric("retrieval_recall")
    return metric.compute(
        predictions=[list(map(int, ranking)) for ranking in rankings],
        references=[list(map(int, items)) for items in relevant],
        k=[int(k) for k in ks],
    )


def recall_at_k(
    query_embeddings: torch.Tensor,
    candidate_embeddings: torch.Tensor,
    relevant: list[list[int]],
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Recall@k of every query against all candidates (dot product), a hit when any relevant candidate is in the top k.

    Args:
        query_embeddings: (Q, D), usually L2-normalised.
        candidate_embeddings: (C, D).
        relevant: for each query, the indices of its relevant candidates (at least one).
        ks: the cut-offs.
        chunk_size: rows per chunk of queries and of candidates (`modeling_unime.util.retrieval.chunked_top_k`).

    Returns:
        ``{"recall@1": ..., "recall@5": ..., "recall@10": ...}`` (one key per k), fractions in [0, 1].

    >>> images = torch.eye(2)
    >>> captions = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.6, 0.8]])
    >>> recall_at_k(images, captions, [[0, 1], [2, 3]], ks=(1, 2))             # image->text, 2 captions each
    {'recall@1': 0.5, 'recall@2': 1.0}
    """
    if len(relevant) != query_embeddings.shape[0]:
        raise ValueError(f"{query_embeddings.shape[0]} queries but {len(relevant)} lists of relevant candidates.")
    candidate_count = candidate_embeddings.shape[0]
    for query, items in enumerate(relevant):
        bad = [index for index in items if not 0 <= index < candidate_count]
        if bad:
            raise ValueError(f"relevant[{query}] has indices {bad} outside the {candidate_count} candidates.")
    if candidate_count == 0:
        raise ValueError("No candidates to rank.")
    _, indices = chunked_top_k(query_embeddings, candidate_embeddings, min(max(ks), candidate_count), chunk_size)
    return recall_from_rankings(indices.tolist(), relevant, ks)


def rerank_rankings(
    rankings: Sequence[Sequence[int]],
    query_items: Sequence[Item],
    candidate_items: Sequence[Item],
    reranker: Any,
    top_k: int = 10,
    image_root: str | os.PathLike | None = None,
    mode: str = "listwise",
) -> list[list[int]]:
    """Re-order the first ``top_k`` entries of each ranking with ``reranker.rerank``; the rest stays as it was
    (`evaluation.rerank.rerank_head` per query: the reranker's order is checked).

    >>> class Reverse:
    ...     def rerank(self, query, candidates, mode, image_root):
    ...         return list(range(len(candidates)))[::-1], None
    >>> rerank_rankings([[4, 3, 2, 1, 0]], [("q", None)], [(str(i), None) for i in range(5)], Reverse(), top_k=3)
    [[2, 3, 4, 1, 0]]
    """
    if len(rankings) != len(query_items):
        raise ValueError(f"{len(rankings)} rankings but {len(query_items)} queries.")
    return [
        rerank_head(ranking, query_items[query_index], candidate_items, reranker, top_k, image_root, mode, query_index)
        for query_index, ranking in enumerate(tqdm(rankings, desc="Reranking", unit="query", disable=None))
    ]


# --------------------------------------------------------------------------------------------- evaluation


def retrieval_items(dataset: ImageTextRetrievalSet) -> tuple[list[Item], list[Item]]:
    """(image items, caption items) as embedded: images with the retrieval instruction, captions as raw text."""
    image_items = [(IMAGE_QUERY_INSTRUCTION, image) for image in dataset.images]
    return image_items, [(caption, None) for caption in dataset.captions]


def _embed(
    embedder: Any, items: list[Item], embed_fn: Callable[[Sequence[Item]], torch.Tensor] | None,
    image_root: str | None, batch_size: int, cache_dir: str | os.PathLike | None,
) -> torch.Tensor:
    if embed_fn is not None:
        if cache_dir is not None:
            # The cache is keyed by the embedder's class name when it is not a torch module: name the folder after
            # the function so that two embed_fns never share vectors.
            cache_dir = Path(cache_dir) / f"embed_fn-{getattr(embed_fn, '__qualname__', type(embed_fn).__name__)}"
        embedder = _EmbedFnAdapter(embed_fn)
    embeddings = torch.as_tensor(embed_with_cache(embedder, items, image_root, batch_size, cache_dir))
    if embeddings.dim() != 2 or embeddings.shape[0] != len(items):
        raise ValueError(
            f"Embedding {len(items)} items returned shape {tuple(embeddings.shape)}; expected ({len(items)}, D)."
        )
    return embeddings.float().cpu()


class _EmbedFnAdapter:
    def __init__(self, embed_fn: Callable[[Sequence[Item]], torch.Tensor]) -> None:
        self.embed_fn = embed_fn

    def encode(self, texts: Sequence[str | None], images: Sequence[str | None], **_: Any) -> torch.Tensor:
        return torch.as_tensor(self.embed_fn(list(zip(texts, images))))


def evaluate_retrieval(
    embedder: Any,
    dataset: ImageTextRetrievalSet,
    embed_fn: Callable[[Sequence[Item]], torch.Tensor] | None = None,
    reranker: Any = None,
    rerank_top_k: int = 10,
    ks: Sequence[int] = (1, 5, 10),
    batch_size: int = 32,
    cache_dir: str | os.PathLike | None = None,
    chunk_size: int = 1024,
    rerank_mode: str = "listwise",
) -> dict[str, dict[str, float]]:
    """Recall@k in both directions of an image-text retrieval set.

    Args:
        embedder: has ``encode(texts=, images=, image_root=, batch_size=)`` returning L2-normalised (N, D) tensors
            (e.g. `UniMEV2Model`); unused when ``embed_fn`` is given.
        dataset: see the ``load_*`` functions.
        embed_fn: optional replacement for ``embedder.encode``: ``embed_fn(items) -> (N, D)``, items being
            ``(text or None, image path or None)`` tuples, image paths relative to ``dataset.image_root``.
        reranker: optional; has ``rerank(query_item, candidate_items, mode=, image_root=) -> (order, scores)``
            (e.g. `UniMEV2Reranker`). It re-orders the embedder's top ``rerank_top_k`` of every query; the ranking
            below stays. The query and candidates are the same items that were embedded.
        rerank_top_k: how many of the embedder's candidates the reranker sees per query.
        ks: the recall cut-offs.
        batch_size: rows per embedding batch.
        cache_dir: when given, embeddings go through `modeling_unime.util.embedding_cache.cached_embeddings`
            (on-disk, keyed by model and content), so a rerun embeds nothing again.
        chunk_size: rows per chunk of queries and of candidates (`modeling_unime.util.retrieval.chunked_top_k`).
        rerank_mode: passed to ``reranker.rerank``.

    Returns:
        ``{"image_to_text": {"recall@1": ..., ...}, "text_to_image": {...}}``, fractions in [0, 1];
        ``image_to_text`` = each image retrieves among all captions (a hit when any of its captions is in the top k),
        ``text_to_image`` = each caption retrieves among all images.
    """
    image_items, caption_items = retrieval_items(dataset)
    image_embeddings = _embed(embedder, image_items, embed_fn, dataset.image_root, batch_size, cache_dir)
    caption_embeddings = _embed(embedder, caption_items, embed_fn, dataset.image_root, batch_size, cache_dir)
    depth = max(max(ks), rerank_top_k if reranker is not None else 0)
    directions = {
        "image_to_text": (image_embeddings, caption_embeddings, image_items, caption_items, dataset.image_to_captions),
        "text_to_image": (caption_embeddings, image_embeddings, caption_items, image_items,
                          [[image] for image in dataset.caption_to_image]),
    }
    results = {}
    for direction, (queries, candidates, query_items, candidate_items, relevant) in directions.items():
        _, indices = chunked_top_k(queries, candidates, min(depth, candidates.shape[0]), chunk_size)
        rankings = indices.tolist()
        if reranker is not None:
            rankings = rerank_rankings(rankings, query_items, candidate_items, reranker, rerank_top_k,
                                       dataset.image_root, rerank_mode)
        results[direction] = recall_from_rankings(rankings, relevant, ks)
    return results


__all__ = [
    "IMAGE_QUERY_INSTRUCTION",
    "evaluate_retrieval",
    "recall_at_k",
    "recall_from_rankings",
    "rerank_rankings",
    "retrieval_items",
]
