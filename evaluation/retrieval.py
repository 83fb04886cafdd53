"""Zero-shot image-text retrieval: Flickr30K (1K test), COCO (5K test), ShareGPT4V (first 1K), Urban1K.

Protocol (method.md section 2): every image is a query against all captions (image->text, a hit when ANY of its
captions is in the top k) and every caption is a query against all images (text->image, its one image); recall@1/5/10
in both directions. Images are embedded with the instruction "Find an image caption describing the given image.",
captions as raw text (method.md (g)). The authors' script prints text->image under the label "Image->Text"; here
``image_to_text`` always means image queries retrieving captions.

>>> import torch
>>> images = torch.eye(3)                                   # 3 images
>>> captions = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0.6, 0.8], [0, 1, 0]])
>>> recall_at_k(captions, images, [[0], [1], [1], [2]], ks=(1, 2))          # text->image
{'recall@1': 0.5, 'recall@2': 0.75}
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
from tqdm.auto import tqdm

from evaluation.metrics import load_metric

Item = tuple[str | None, str | None]

IMAGE_QUERY_INSTRUCTION = "Find an image caption describing the given image."

FLICKR30K_ANNOTATION = "dataset_flickr30k.json"
COCO_ANNOTATION = "dataset_coco.json"
SHAREGPT4V_ANNOTATION = "share-captioner_coco_lcs_sam_1246k_1107.json"

KARPATHY_SPLITS_URL = "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip"
HUB_REPOS = {
    "flickr30k": "royokong/flickr30k_test",
    "coco": "royokong/coco_test",
    "sharegpt4v": "Lin-Chen/ShareGPT4V",
    "urban1k": "BeichenZhang/Urban1k",
}

# --------------------------------------------------------------------------------------------- ranking


def chunked_topk(
    query_embeddings: torch.Tensor, candidate_embeddings: torch.Tensor, k: int, chunk_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k candidates of every query by dot product, without forming the full (queries, candidates) matrix.

    Queries and candidates are both cut into chunks of ``chunk_size`` rows, so the largest score block is
    ``chunk_size x chunk_size`` (COCO's 25K captions x 5K images is never materialised). Half-precision inputs are
    scored in float32. Exact ties are broken deterministically: the lower candidate index ranks first.

    Args:
        query_embeddings: (Q, D).
        candidate_embeddings: (C, D).
        k: how many to keep; clipped to C.
        chunk_size: rows per chunk, for queries and for candidates.

    Returns:
        ``(scores, indices)``, both (Q, min(k, C)), best first; indices are int64 candidate positions.

    >>> queries = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> candidates = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    >>> scores, indices = chunked_topk(queries, candidates, k=2, chunk_size=1)
    >>> indices.tolist()                       # query 0 ties candidates 1 and 2: the lower index first
    [[1, 2], [0, 1]]
    """
    if query_embeddings.dim() != 2 or candidate_embeddings.dim() != 2:
        raise ValueError(
            f"Expected 2-D embeddings; got queries {tuple(query_embeddings.shape)} and candidates "
            f"{tuple(candidate_embeddings.shape)}."
        )
    if query_embeddings.shape[1] != candidate_embeddings.shape[1]:
        raise ValueError(
            f"Embedding sizes differ: queries have {query_embeddings.shape[1]}, candidates "
            f"{candidate_embeddings.shape[1]}."
        )
    if candidate_embeddings.shape[0] == 0:
        raise ValueError("No candidates to rank.")
    if k < 1 or chunk_size < 1:
        raise ValueError(f"k and chunk_size must be >= 1; got k={k}, chunk_size={chunk_size}.")
    k = min(k, candidate_embeddings.shape[0])
    queries, candidates = _at_least_float32(query_embeddings), _at_least_float32(candidate_embeddings)
    all_scores, all_indices = [], []
    for query_start in range(0, queries.shape[0], chunk_size):
        query_chunk = queries[query_start : query_start + chunk_size]
        best_scores = query_chunk.new_empty((query_chunk.shape[0], 0))
        best_indices = torch.empty((query_chunk.shape[0], 0), dtype=torch.long, device=query_chunk.device)
        for candidate_start in range(0, candidates.shape[0], chunk_size):
            block = torch.matmul(query_chunk, candidates[candidate_start : candidate_start + chunk_size].T)
            block_scores, block_indices = _topk_lowest_index_first(block, k)
            # Every kept index is lower than every index of this block, so a stable merge keeps ties index-ordered.
            merged_scores = torch.cat([best_scores, block_scores], dim=1)
            merged_indices = torch.cat([best_indices, block_indices + candidate_start], dim=1)
            merged_scores, order = torch.sort(merged_scores, dim=1, descending=True, stable=True)
            best_scores, best_indices = merged_scores[:, :k], merged_indices.gather(1, order[:, :k])
        all_scores.append(best_scores)
        all_indices.append(best_indices)
    return torch.cat(all_scores), torch.cat(all_indices)


def _topk_lowest_index_first(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk along dim 1 with ties broken towards the lower column, which torch.topk does not promise.

    A full stable sort is exact but several times slower than topk; ties are rare, so topk is used and only the rows
    where a tie straddles the k-th place (the choice among equal scores matters) are sorted in full.
    """
    k = min(k, scores.shape[1])
    values, columns = torch.topk(scores, k, dim=1)
    # Inside the selection: order by column, then stably by score, so equal scores come out lowest column first.
    columns, by_column = columns.sort(dim=1)
    values, by_score = values.gather(1, by_column).sort(dim=1, descending=True, stable=True)
    columns = columns.gather(1, by_score)
    kth = values[:, -1:]
    straddling = ((scores == kth).sum(dim=1) != (values == kth).sum(dim=1)).nonzero().flatten()
    if len(straddling):
        exact_values, exact_columns = torch.sort(scores[straddling], dim=1, descending=True, stable=True)
        values[straddling], columns[straddling] = exact_values[:, :k], exact_columns[:, :k]
    return values, columns


def _at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


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
        chunk_size: see `chunked_topk`.

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
    _, indices = chunked_topk(query_embeddings, candidate_embeddings, max(ks), chunk_size)
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
    """Re-order the first ``top_k`` entries of each ranking with ``reranker.rerank``; the rest stays as it was.

    ``reranker.rerank(query_item, candidate_items, mode=mode, image_root=image_root)`` must return ``(order,
    scores)`` where ``order`` lists positions into the given candidate list, best first. Positions it leaves out
    keep the embedder's order after those it lists.

    >>> class Reverse:
    ...     def rerank(self, query, candidates, mode, image_root):
    ...         return list(range(len(candidates)))[::-1], None
    >>> rerank_rankings([[4, 3, 2, 1, 0]], [("q", None)], [(str(i), None) for i in range(5)], Reverse(), top_k=3)
    [[2, 3, 4, 1, 0]]
    """
    if len(rankings) != len(query_items):
        raise ValueError(f"{len(rankings)} rankings but {len(query_items)} queries.")
    reranked = []
    for query_index, ranking in enumerate(tqdm(rankings, desc="Reranking", unit="query", disable=None)):
        head, tail = list(ranking[:top_k]), list(ranking[top_k:])
        order, _ = reranker.rerank(
            query_items[query_index], [candidate_items[index] for index in head], mode=mode, image_root=image_root
        )
        reranked.append(_apply_order(head, order, query_index) + tail)
    return reranked


def _apply_order(head: list[int], order: Sequence[int] | torch.Tensor, query_index: int) -> list[int]:
    positions = [int(position) for position in (order.tolist() if isinstance(order, torch.Tensor) else order)]
    if any(not 0 <= position < len(head) for position in positions) or len(set(positions)) != len(positions):
        raise ValueError(
            f"Query {query_index}: the reranker returned order {positions}, which is not a list of distinct "
            f"positions into its {len(head)} candidates."
        )
    chosen = set(positions)
    return [head[position] for position in positions] + [index for position, index in enumerate(head)
                                                            if position not in chosen]


# --------------------------------------------------------------------------------------------- datasets


@dataclass(repr=False)
class ImageTextRetrievalSet:
    """An image-text retrieval benchmark: images, captions and which image each caption describes.

    Attributes:
        name: e.g. ``"flickr30k"``.
        images: image paths relative to ``image_root``.
        captions: all captions, usually grouped by image.
        caption_to_image: for each caption, the index of its image in ``images``.
        image_root: folder the image paths are relative to.

    >>> data = ImageTextRetrievalSet("toy", ["a.jpg", "b.jpg"], ["a cat", "a dog", "a dog again"], [0, 1, 1], ".")
    >>> data.image_to_captions
    [[0], [1, 2]]
    """

    name: str
    images: list[str]
    captions: list[str]
    caption_to_image: list[int]
    image_root: str | os.PathLike | None = None

    def __post_init__(self) -> None:
        if self.image_root is not None:
            self.image_root = os.fspath(self.image_root)
        if len(self.captions) != len(self.caption_to_image):
            raise ValueError(
                f"{self.name}: {len(self.captions)} captions but {len(self.caption_to_image)} caption_to_image entries."
            )
        bad = [index for index in self.caption_to_image if not 0 <= index < len(self.images)]
        if bad:
            raise ValueError(
                f"{self.name}: caption_to_image has indices {bad[:5]} outside the {len(self.images)} images."
            )
        without_caption = sorted(set(range(len(self.images))) - set(self.caption_to_image))
        if without_caption:
            # Such an image query would have nothing to retrieve: recall is undefined for it.
            raise ValueError(f"{self.name}: images {without_caption[:5]} have no caption.")

    @property
    def image_to_captions(self) -> list[list[int]]:
        """For each image, the indices of its captions (image->text relevant sets)."""
        groups: list[list[int]] = [[] for _ in self.images]
        for caption_index, image_index in enumerate(self.caption_to_image):
            groups[image_index].append(caption_index)
        return groups

    def __repr__(self) -> str:
        return (
            f"ImageTextRetrievalSet(name={self.name!r}, images={len(self.images)}, captions={len(self.captions)}, "
            f"image_root={self.image_root!r})"
        )


def _require(path: Path, what: str, how_to_get: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: looked for {path.resolve()}. {how_to_get}")
    return path


def _check_images(images: Sequence[str], image_root: Path, how_to_get: str) -> None:
    missing = [image_root / image for image in images if not (image_root / image).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(images)} images not found under {image_root.resolve()}, e.g. "
            f"{missing[0].resolve()}. {how_to_get}"
        )


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _from_karpathy(
    name: str, annotation: Path, image_root: Path, split: str, captions_per_image: int | None, with_filepath: bool,
    how_to_get: str, check_images: bool,
) -> ImageTextRetrievalSet:
    entries = _read_json(annotation)
    if not isinstance(entries, dict) or "images" not in entries:
        raise ValueError(f"{annotation} is not a Karpathy split file: expected a JSON object with an 'images' list.")
    images, captions, caption_to_image = [], [], []
    for entry in entries["images"]:
        if entry["split"] != split:
            continue
        path = entry["filename"]
        if with_filepath and entry.get("filepath"):
            path = f"{entry['filepath']}/{path}"
        sentences = [sentence["raw"].strip() for sentence in entry["sentences"]][:captions_per_image]
        captions.extend(sentences)
        caption_to_image.extend([len(images)] * len(sentences))
        images.append(path)
    if not images:
        raise ValueError(f"{annotation} has no image with split == {split!r}.")
    if check_images:
        _check_images(images, image_root, how_to_get)
    return ImageTextRetrievalSet(name, images, captions, caption_to_image, image_root)


def load_flickr30k(
    root: str | os.PathLike,
    annotation_file: str | os.PathLike = FLICKR30K_ANNOTATION,
    image_root: str | os.PathLike | None = None,
    split: str = "test",
    captions_per_image: int | None = 5,
    check_images: bool = True,
) -> ImageTextRetrievalSet:
    """Flickr30K retrieval test set (Karpathy split: 1,000 images x 5 captions) from a local folder.

    Expected layout (``annotation_file`` may be absolute; ``image_root`` defaults to ``root/flickr30k-images``)::

        root/
          dataset_flickr30k.json     # Karpathy split: {"images": [{"filename", "split", "sentences": [{"raw"}]}]}
          flickr30k-images/          # <filename> for every test image, e.g. 1007129816.jpg

    ``dataset_flickr30k.json`` comes from Karpathy's caption_datasets.zip; the images from the Flickr30K release.
    Only entries with ``split == "test"`` are kept, captions in file order (``raw`` text, stripped).

    >>> data = load_flickr30k("data/flickr30k")                                # doctest: +SKIP
    >>> len(data.images), len(data.captions)                                   # doctest: +SKIP
    (1000, 5000)
    """
    root = Path(root)
    how_to_get = (
        f"Download {FLICKR30K_ANNOTATION} from Karpathy's splits ({KARPATHY_SPLITS_URL}) and the Flickr30K images "
        f"(flickr30k-images/, https://shannon.cs.illinois.edu/DenotationGraph/) into {root.resolve()}, or use "
        f"load_retrieval_set_from_hub('flickr30k', output_dir) ({HUB_REPOS['flickr30k']})."
    )
    annotation = _require(root / annotation_file, "Flickr30K Karpathy split file", how_to_get)
    image_root = _require(Path(image_root) if image_root is not None else root / "flickr30k-images",
                          "Flickr30K image folder", how_to_get)
    return _from_karpathy("flickr30k", annotation, image_root, split, captions_per_image, False, how_to_get,
                          check_images)


def load_coco5k(
    root: str | os.PathLike,
    annotation_file: str | os.PathLike = COCO_ANNOTATION,
    image_root: str | os.PathLike | None = None,
    split: str = "test",
    captions_per_image: int | None = 5,
    check_images: bool = True,
) -> ImageTextRetrievalSet:
    """COCO 5K retrieval test set (Karpathy split: 5,000 val2014 images, first 5 captions each) from a local folder.

    Expected layout::

        root/
          dataset_coco.json          # Karpathy split: {"images": [{"filepath", "filename", "split", "sentences"}]}
          val2014/                   # COCO 2014 val images, e.g. COCO_val2014_000000391895.jpg

    Images are ``<filepath>/<filename>`` relative to ``image_root`` (``root`` by default). Some COCO images have 6
    or 7 captions: only the first 5 are kept, as in the standard protocol and the authors' evaluation.

    >>> data = load_coco5k("data/coco")                                        # doctest: +SKIP
    >>> len(data.images), len(data.captions)                                   # doctest: +SKIP
    (5000, 25000)
    """
    root = Path(root)
    image_root = Path(image_root) if image_root is not None else root
    how_to_get = (
        f"Download {COCO_ANNOTATION} from Karpathy's splits ({KARPATHY_SPLITS_URL}) and the COCO val2014 images "
        f"(http://images.cocodataset.org/zips/val2014.zip, unzipped to val2014/) into {root.resolve()}, or use "
        f"load_retrieval_set_from_hub('coco', output_dir) ({HUB_REPOS['coco']})."
    )
    annotation = _require(root / annotation_file, "COCO Karpathy split file", how_to_get)
    _require(image_root, "COCO image root", how_to_get)
    return _from_karpathy("coco", annotation, image_root, split, captions_per_image, True, how_to_get, check_images)


def load_sharegpt4v(
    root: str | os.PathLike,
    annotation_file: str | os.PathLike = SHAREGPT4V_ANNOTATION,
    image_root: str | os.PathLike | None = None,
    limit: int = 1000,
    check_images: bool = True,
) -> ImageTextRetrievalSet:
    """ShareGPT4V long-caption retrieval: the first ``limit`` (1,000) entries of the ShareCaptioner file.

    Expected layout::

        root/
          share-captioner_coco_lcs_sam_1246k_1107.json   # [{"image": "coco/train2017/....jpg",
                                                         #   "conversations": [{"from": "human", ...},
                                                         #                     {"from": "gpt", "value": caption}]}]
          coco/train2017/ ...        # the images, at the "image" paths relative to image_root (root by default)

    The JSON is in the Hub dataset ``Lin-Chen/ShareGPT4V``; the images follow ShareGPT4V's data preparation (COCO
    train2017, SAM, LLaVA pretrain, ...). The caption is the first ``gpt`` turn with newlines replaced by spaces,
    as in Long-CLIP's and the authors' loaders. One caption per image.

    >>> data = load_sharegpt4v("data/sharegpt4v")                               # doctest: +SKIP
    >>> len(data.images), len(data.captions)                                   # doctest: +SKIP
    (1000, 1000)
    """
    root = Path(root)
    image_root = Path(image_root) if image_root is not None else root
    how_to_get = (
        f"Download {SHAREGPT4V_ANNOTATION} from the Hub dataset {HUB_REPOS['sharegpt4v']} into {root.resolve()} and "
        f"the images it names (coco/train2017/, sam/images/, ... per ShareGPT4V's docs/Data.md) under "
        f"{image_root.resolve()}."
    )
    annotation = _require(root / annotation_file, "ShareGPT4V annotation file", how_to_get)
    entries = _read_json(annotation)
    if not isinstance(entries, list):
        raise ValueError(f"{annotation} is not a ShareGPT4V file: expected a JSON list of conversations.")
    images, captions = [], []
    for position, entry in enumerate(entries[:limit]):
        replies = [turn["value"] for turn in entry.get("conversations", []) if turn.get("from") == "gpt"]
        if "image" not in entry or not replies:
            raise ValueError(f"{annotation}: entry {position} has no 'image' or no 'gpt' turn.")
        images.append(entry["image"])
        captions.append(replies[0].replace("\n", " "))
    if check_images:
        _check_images(images, image_root, how_to_get)
    return ImageTextRetrievalSet("sharegpt4v", images, captions, list(range(len(images))), image_root)


def load_urban1k(
    root: str | os.PathLike, image_root: str | os.PathLike | None = None, check_images: bool = True
) -> ImageTextRetrievalSet:
    """Urban1K long-caption retrieval (1,000 image / caption pairs) from the unzipped ``Urban1k`` folder.

    Expected layout::

        root/                        # the folder inside Urban1k.zip (Hub dataset BeichenZhang/Urban1k)
          image/<id>.jpg
          caption/<id>.txt           # the long caption of image/<id>.jpg, on its first line

    ``image_root`` defaults to ``root/image``.

    Pairs are ordered by id (numerically when ids are numbers). The caption is the file's first line, stripped,
    as the authors' loader reads it.

    >>> data = load_urban1k("data/Urban1k")                                    # doctest: +SKIP
    >>> len(data.images), len(data.captions)                                   # doctest: +SKIP
    (1000, 1000)
    """
    root = Path(root)
    how_to_get = (
        f"Download Urban1k.zip from the Hub dataset {HUB_REPOS['urban1k']} and unzip it so that {root.resolve()} "
        f"holds image/ and caption/, or use load_retrieval_set_from_hub('urban1k', output_dir)."
    )
    caption_dir = _require(root / "caption", "Urban1K caption folder", how_to_get)
    image_root = _require(Path(image_root) if image_root is not None else root / "image", "Urban1K image folder",
                          how_to_get)
    caption_files = sorted(caption_dir.glob("*.txt"), key=lambda path: (not path.stem.isdigit(),
                                                                      int(path.stem) if path.stem.isdigit() else 0,
                                                                      path.stem))
    if not caption_files:
        raise FileNotFoundError(f"No Urban1K captions: {caption_dir.resolve()} has no *.txt file. {how_to_get}")
    images = [f"{path.stem}.jpg" for path in caption_files]
    captions = []
    for path in caption_files:
        lines = path.read_text(encoding="utf-8").splitlines()
        captions.append(lines[0].strip() if lines else "")
    if check_images:
        _check_images(images, image_root, how_to_get)
    return ImageTextRetrievalSet("urban1k", images, captions, list(range(len(images))), image_root)


RETRIEVAL_LOADERS: dict[str, Callable[..., ImageTextRetrievalSet]] = {
    "flickr30k": load_flickr30k,
    "coco": load_coco5k,
    "sharegpt4v": load_sharegpt4v,
    "urban1k": load_urban1k,
}


def load_retrieval_set(
    name: str, root: str | os.PathLike, image_root: str | os.PathLike | None = None, **kwargs: Any
) -> ImageTextRetrievalSet:
    """Load ``flickr30k``, ``coco``, ``sharegpt4v`` or ``urban1k`` from its local folder (see each ``load_*``).

    >>> data = load_retrieval_set("coco", "data/coco", image_root="data/coco")  # doctest: +SKIP
    """
    if name not in RETRIEVAL_LOADERS:
        raise ValueError(f"Unknown retrieval set {name!r}; choose one of {sorted(RETRIEVAL_LOADERS)}.")
    return RETRIEVAL_LOADERS[name](root, image_root=image_root, **kwargs)


def load_retrieval_set_from_hub(
    name: str,
    output_dir: str | os.PathLike,
    repo_id: str | None = None,
    split: str = "test",
    image_root: str | os.PathLike | None = None,
    captions_per_image: int | None = 5,
) -> ImageTextRetrievalSet:
    """Fetch a retrieval set from the Hugging Face Hub (needs network) and write it as local files.

    - ``flickr30k`` / ``coco``: ``datasets.load_dataset(repo_id, split=split)`` on ``royokong/flickr30k_test`` /
      ``royokong/coco_test`` (the authors' sources: columns ``image`` and ``text``, a list of captions, truncated to
      ``captions_per_image``). The original image bytes are written to ``output_dir/images/<row>.<ext>``.
      ``repo_id`` may also be a local clone of those repositories (a folder ``load_dataset`` reads offline).
    - ``urban1k``: the ``BeichenZhang/Urban1k`` snapshot; its zip files are extracted into ``output_dir``.
    - ``sharegpt4v``: only the annotation JSON is on the Hub (``Lin-Chen/ShareGPT4V``); the images must already be
      under ``image_root``.

    >>> data = load_retrieval_set_from_hub("flickr30k", "data/flickr30k-hub")   # doctest: +SKIP
    """
    output_dir = Path(output_dir)
    if name not in HUB_REPOS:
        raise ValueError(f"Unknown retrieval set {name!r}; choose one of {sorted(HUB_REPOS)}.")
    repo_id = repo_id or HUB_REPOS[name]
    if name == "urban1k":
        from huggingface_hub import snapshot_download

        snapshot = Path(snapshot_download(repo_id, repo_type="dataset"))
        for archive in sorted(snapshot.rglob("*.zip")):
            with zipfile.ZipFile(archive) as handle:
                handle.extractall(output_dir)
        for search_root in (output_dir, snapshot):
            found = sorted(path.parent for path in search_root.rglob("caption")
                           if (path.parent / "image").is_dir() and "__MACOSX" not in path.parts)
            if found:
                return load_urban1k(found[0])
        raise FileNotFoundError(f"No folder with image/ and caption/ in {repo_id} (extracted to {output_dir}).")
    if name == "sharegpt4v":
        from huggingface_hub import hf_hub_download

        if image_root is None:
            raise ValueError("sharegpt4v: the Hub has only the captions; pass image_root, the folder of its images.")
        annotation = hf_hub_download(repo_id, SHAREGPT4V_ANNOTATION, repo_type="dataset", local_dir=output_dir)
        return load_sharegpt4v(output_dir, annotation, image_root=image_root)
    rows = datasets.load_dataset(repo_id, split=split)
    missing = {"image", "text"} - set(rows.column_names)
    if missing:
        raise ValueError(f"{repo_id} has columns {rows.column_names}; expected 'image' and a caption list 'text'.")
    # Undecoded, so the images are written byte for byte rather than re-encoded.
    rows = rows.cast_column("image", datasets.Image(decode=False))
    image_dir = output_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    images, captions, caption_to_image = [], [], []
    for row_index, row in enumerate(rows):
        image = row["image"]
        suffix = Path(image.get("path") or "").suffix or ".jpg"
        filename = f"{row_index:05d}{suffix}"
        target = image_dir / filename
        if not target.exists():
            if image.get("bytes") is not None:
                target.write_bytes(image["bytes"])
            else:
                target.write_bytes(Path(image["path"]).read_bytes())
        texts = row["text"] if isinstance(row["text"], list) else [row["text"]]
        texts = texts[:captions_per_image]
        captions.extend(texts)
        caption_to_image.extend([len(images)] * len(texts))
        images.append(filename)
    return ImageTextRetrievalSet(name, images, captions, caption_to_image, image_dir)


# --------------------------------------------------------------------------------------------- evaluation


def retrieval_items(dataset: ImageTextRetrievalSet) -> tuple[list[Item], list[Item]]:
    """(image items, caption items) as embedded: images with the retrieval instruction, captions as raw text."""
    image_items = [(IMAGE_QUERY_INSTRUCTION, image) for image in dataset.images]
    return image_items, [(caption, None) for caption in dataset.captions]


def _embed(
    embedder: Any, items: list[Item], embed_fn: Callable[[Sequence[Item]], torch.Tensor] | None,
    image_root: str | None, batch_size: int, cache_dir: str | os.PathLike | None,
) -> torch.Tensor:
    if cache_dir is not None:
        from modeling_unime.mining import cached_embeddings

        if embed_fn is not None:
            # The cache is keyed by the embedder's class name when it is not a torch module: name the folder after
            # the function so that two embed_fns never share vectors.
            cache_dir = Path(cache_dir) / f"embed_fn-{getattr(embed_fn, '__qualname__', type(embed_fn).__name__)}"
            embedder = _EmbedFnAdapter(embed_fn)
        embeddings = cached_embeddings(embedder, items, cache_dir, image_root, batch_size)
    elif embed_fn is not None:
        embeddings = embed_fn(items)
    else:
        embeddings = embedder.encode(texts=[text for text, _ in items], images=[image for _, image in items],
                                     image_root=image_root, batch_size=batch_size)
    embeddings = torch.as_tensor(embeddings)
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
        cache_dir: when given, embeddings go through `modeling_unime.mining.cached_embeddings` (on-disk, keyed by
            model and content), so a rerun embeds nothing again.
        chunk_size: see `chunked_topk`.
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
        _, indices = chunked_topk(queries, candidates, depth, chunk_size)
        rankings = indices.tolist()
        if reranker is not None:
            rankings = rerank_rankings(rankings, query_items, candidate_items, reranker, rerank_top_k,
                                       dataset.image_root, rerank_mode)
        results[direction] = recall_from_rankings(rankings, relevant, ks)
    return results


__all__ = [
    "IMAGE_QUERY_INSTRUCTION",
    "ImageTextRetrievalSet",
    "chunked_topk",
    "evaluate_retrieval",
    "load_coco5k",
    "load_flickr30k",
    "RETRIEVAL_LOADERS",
    "load_retrieval_set",
    "load_retrieval_set_from_hub",
    "load_sharegpt4v",
    "load_urban1k",
    "recall_at_k",
    "recall_from_rankings",
    "rerank_rankings",
    "retrieval_items",
]
