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

import json
import os
import re
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
from tqdm.auto import tqdm

from evaluation.metrics import load_metric
from modeling_unime.util.images import require_image_files
from modeling_unime.util.rerank import rerank_head
from modeling_unime.util.retrieval import chunked_top_k

from modeling_unime.util.embedding_cache import Item, embed_with_cache


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
    (`modeling_unime.util.rerank.rerank_head` per query: the reranker's order is checked).

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


# --------------------------------------------------------------------------------------------- datasets

LAYOUT_HUB_PARQUET = "hub-parquet"
"""A clone of a Hub dataset repo in parquet (``royokong/flickr30k_test``, ``royokong/coco_test``)."""
LAYOUT_KARPATHY = "karpathy-json"
"""Karpathy's split file (``dataset_flickr30k.json`` / ``dataset_coco.json``) beside an image folder."""
LAYOUT_SHAREGPT4V = "sharegpt4v-json"
"""The ShareCaptioner JSON list with images in ShareGPT4V's folders."""
LAYOUT_URBAN1K = "urban1k-folders"
"""Urban1K's ``image/`` and ``caption/`` folders."""

_CAPTION_SET_TITLES = {"flickr30k": "Flickr30K", "coco": "COCO"}

LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/v1"
_SPLIT_NAMES = ("train", "test", "validation", "valid", "val", "dev")


@dataclass(repr=False)
class ImageTextRetrievalSet:
    """An image-text retrieval benchmark: images, captions and which image each caption describes.

    Attributes:
        name: e.g. ``"flickr30k"``.
        images: image paths relative to ``image_root`` (or absolute).
        captions: all captions, usually grouped by image, exactly as they are embedded.
        caption_to_image: for each caption, the index of its image in ``images``.
        image_root: folder the image paths are relative to.
        layout: which on-disk layout the set was read from (``LAYOUT_*``), or None when built by hand.
        source: the file or folder it was read from.

    >>> data = ImageTextRetrievalSet("toy", ["a.jpg", "b.jpg"], ["a cat", "a dog", "a dog again"], [0, 1, 1], ".")
    >>> data.image_to_captions
    [[0], [1, 2]]
    """

    name: str
    images: list[str]
    captions: list[str]
    caption_to_image: list[int]
    image_root: str | os.PathLike | None = None
    layout: str | None = None
    source: str | None = None

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

    def describe(self) -> dict[str, Any]:
        """What was read, for reports: layout, source, image root and counts."""
        return {"layout": self.layout, "source": self.source, "image_root": self.image_root,
                "images": len(self.images), "captions": len(self.captions)}

    def __repr__(self) -> str:
        return (
            f"ImageTextRetrievalSet(name={self.name!r}, images={len(self.images)}, captions={len(self.captions)}, "
            f"image_root={self.image_root!r}, layout={self.layout!r})"
        )


# ------------------------------------------------------------------------------------ layout helpers


def is_lfs_pointer(path: str | os.PathLike) -> bool:
    """True when ``path`` is a Git LFS pointer file (what a clone made without Git LFS holds), not the data itself.

    >>> import tempfile
    >>> pointer = Path(tempfile.mkdtemp()) / "test-00000-of-00001.parquet"
    >>> _ = pointer.write_text("version https://git-lfs.github.com/spec/v1\\noid sha256:0\\nsize 1\\n")
    >>> is_lfs_pointer(pointer)
    True
    """
    try:
        with open(path, "rb") as handle:
            return handle.read(len(LFS_POINTER_PREFIX)) == LFS_POINTER_PREFIX
    except OSError:
        return False


def check_not_lfs_pointers(paths: Sequence[str | os.PathLike], what: str) -> None:
    """Raise a ValueError that says how to fetch the data when any of ``paths`` is a Git LFS pointer file."""
    pointers = [Path(path) for path in paths if is_lfs_pointer(path)]
    if not pointers:
        return
    clone = next((parent for parent in pointers[0].resolve().parents if (parent / ".git").exists()),
                 pointers[0].resolve().parent)
    raise ValueError(
        f"{what}: {pointers[0]} is a Git LFS pointer, not the data ({len(pointers)} such file(s)): the dataset was "
        f"cloned without Git LFS. Fetch the files with `git lfs install && git -C {clone} lfs pull` (or download "
        f"the repository with `huggingface-cli download <repo> --repo-type dataset --local-dir {clone}`)."
    )


def _folder_listing(folder: Path, limit: int = 8) -> str:
    if not folder.is_dir():
        return "the folder does not exist"
    names = sorted(entry.name + ("/" if entry.is_dir() else "") for entry in folder.iterdir())
    if not names:
        return "the folder is empty"
    return "it holds " + ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _split_of(relative: Path) -> str | None:
    """The split a Hub parquet file belongs to, from its name (``test-00000-of-00001.parquet``) or a folder
    (``default/test/0000.parquet``); None when neither names one."""
    match = re.match(r"([A-Za-z]+)(?:[-_.]|$)", relative.name)
    if match and match.group(1).lower() in _SPLIT_NAMES:
        return match.group(1).lower()
    return next((part.lower() for part in relative.parts[:-1] if part.lower() in _SPLIT_NAMES), None)


def find_split_parquet_files(folder: str | os.PathLike, split: str = "test") -> list[Path]:
    """The parquet files of one split in a clone of a Hub dataset repo.

    Recognised names, as the Hub writes them: ``data/test-00000-of-00001.parquet`` (also with a hash suffix),
    ``test.parquet``, ``<config>/test/0000.parquet``. A folder whose parquet files name no split at all is taken as
    a single-split dataset (all its files). Hidden folders (``.git``, caches) are skipped.

    Returns:
        The files in name order; [] when the folder holds no parquet file or only other splits' files.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    files = sorted(
        path for path in folder.rglob("*.parquet")
        if not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )
    splits = {path: _split_of(path.relative_to(folder)) for path in files}
    chosen = [path for path in files if splits[path] == split]
    if chosen:
        return chosen
    if files and all(value is None for value in splits.values()):
        return files
    return []


def _atomic_write_bytes(target: Path, data: bytes) -> None:
    """Write ``data`` to ``target`` unless an equal-sized file is there; through a temporary file, so that a killed
    run (or another process writing the same file) never leaves a half-written image."""
    if target.is_file() and target.stat().st_size == len(data):
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _require(path: Path, what: str, how_to_get: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: looked for {path.resolve()}. {how_to_get}")
    return path


def _check_images(images: Sequence[str], image_root: Path, how_to_get: str) -> None:
    # Absolute paths in the message: the user sees exactly which file is missing.
    root = image_root.resolve()
    require_image_files([str(root / image) for image in images], root, "retrieval", how_to_get)


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def read_json_list_head(path: str | os.PathLike, limit: int, chunk_size: int = 1 << 20) -> list[Any]:
    """The first ``limit`` items of a file holding one JSON list, reading only as much of the file as they need.

    The ShareGPT4V file has 1.2M entries (over 1 GB); the benchmark uses the first 1,000.

    Raises:
        ValueError: the file does not start with a JSON list, or an item is malformed (the message names the file).

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "list.json"
    >>> _ = path.write_text('[{"a": 1}, {"a": [2, "]"]},\\n {"a": 3}]')
    >>> read_json_list_head(path, 2, chunk_size=4)
    [{'a': 1}, {'a': [2, ']']}]
    """
    decoder = json.JSONDecoder()
    items: list[Any] = []
    with open(path, encoding="utf-8") as handle:
        buffer, position, exhausted = "", 0, False

        def fill() -> bool:
            nonlocal buffer, position, exhausted
            if exhausted:
                return False
            chunk = handle.read(chunk_size)
            exhausted = not chunk
            buffer, position = buffer[position:] + chunk, 0
            return bool(chunk)

        def skip(characters: str) -> str | None:
            nonlocal position
            while True:
                while position < len(buffer) and buffer[position] in characters:
                    position += 1
                if position < len(buffer):
                    return buffer[position]
                if not fill():
                    return None

        if skip(" \t\r\n\ufeff") != "[":
            raise ValueError(f"{path} is not a JSON list (it must start with '[').")
        position += 1
        while len(items) < limit:
            character = skip(" \t\r\n,")
            if character is None or character == "]":
                break
            while True:
                try:
                    item, end = decoder.raw_decode(buffer, position)
                    break
                except json.JSONDecodeError as error:
                    if not fill():
                        raise ValueError(f"{path}: item {len(items)} is not valid JSON ({error}).") from error
            items.append(item)
            position = end
    return items


# ---------------------------------------------------------------------------------- Flickr30K / COCO


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
    return ImageTextRetrievalSet(name, images, captions, caption_to_image, image_root, LAYOUT_KARPATHY,
                                 str(annotation))


def detect_caption_layout(
    name: str, root: str | os.PathLike, annotation_file: str | os.PathLike, how_to_get: str, split: str = "test"
) -> str:
    """Which layout a Flickr30K / COCO folder holds: `LAYOUT_HUB_PARQUET` (a clone of ``royokong/<name>_test``:
    parquet files of the test split) or `LAYOUT_KARPATHY` (the Karpathy split file). Parquet wins when both are there:
    it is what the authors evaluated on.

    Raises:
        FileNotFoundError: neither layout is there; the message names the folder, what it holds and both ways to
            get the data.
    """
    root = Path(root)
    if find_split_parquet_files(root, split):
        return LAYOUT_HUB_PARQUET
    if (root / annotation_file).is_file():
        return LAYOUT_KARPATHY
    other_splits = sorted(root.rglob("*.parquet")) if root.is_dir() else []
    found = (f"it holds parquet files, but none of the {split!r} split (e.g. {other_splits[0]})" if other_splits
             else _folder_listing(root))
    raise FileNotFoundError(
        f"{name}: {root.resolve()} holds no layout this loader knows ({found}). Expected either a clone of the Hub "
        f"dataset {HUB_REPOS[name]} (the authors' data: parquet files such as data/test-00000-of-00001.parquet with "
        f"an 'image' and a 'text' column; `git clone https://huggingface.co/datasets/{HUB_REPOS[name]}`), or "
        f"Karpathy's split file {(root / annotation_file).resolve()} beside the images. {how_to_get}"
    )


def load_hub_parquet_set(
    name: str,
    root: str | os.PathLike,
    image_dir: str | os.PathLike | None = None,
    split: str = "test",
    captions_per_image: int | None = 5,
) -> ImageTextRetrievalSet:
    """A retrieval set from a clone of its Hub dataset repo in parquet (``royokong/flickr30k_test``,
    ``royokong/coco_test``): one row per image, an ``image`` column and a ``text`` column (a list of captions).

    The ``image`` column is the ``datasets`` Image type stored in parquet, a struct ``{bytes, path}``: the bytes are
    written once, unchanged, to ``image_dir/<row>.<ext>`` (default ``root/images``), so that images can be referred to
    by path (and cached by path). A struct without bytes, or a plain string, is a path relative to ``root``.
    Captions are kept as stored, the first ``captions_per_image`` of each row (COCO rows have up to 7; the authors keep
    5), in file order.

    Raises:
        FileNotFoundError: no parquet file of ``split`` under ``root``.
        ValueError: a Git LFS pointer instead of a parquet file, a missing column, a row without captions or image.
    """
    import pyarrow.parquet as parquet

    root = Path(root)
    files = find_split_parquet_files(root, split)
    if not files:
        raise FileNotFoundError(f"{name}: no parquet file of the {split!r} split under {root.resolve()}.")
    check_not_lfs_pointers(files, f"{name} ({HUB_REPOS.get(name, 'Hub clone')})")
    image_dir = Path(image_dir) if image_dir is not None else root / "images"
    images, captions, caption_to_image = [], [], []
    for file in files:
        reader = parquet.ParquetFile(file)
        columns = reader.schema_arrow.names
        missing = [column for column in ("image", "text") if column not in columns]
        if missing:
            raise ValueError(
                f"{file}: no {missing} column (columns: {columns}); a {HUB_REPOS.get(name, name)} clone has an "
                "'image' column (datasets Image: {bytes, path}) and a 'text' column (a list of captions)."
            )
        for batch in reader.iter_batches(columns=["image", "text"], batch_size=64):
            for row in batch.to_pylist():
                index = len(images)
                where = f"{file}, row {index}"
                texts = row["text"]
                texts = [texts] if isinstance(texts, str) else list(texts or [])
                texts = texts[:captions_per_image]
                if not texts:
                    raise ValueError(f"{where}: the 'text' column holds no caption.")
                images.append(_stored_image(row["image"], index, root, image_dir, where))
                captions.extend(texts)
                caption_to_image.extend([index] * len(texts))
    return ImageTextRetrievalSet(name, images, captions, caption_to_image, image_dir, LAYOUT_HUB_PARQUET, str(root))


def _stored_image(value: Any, index: int, root: Path, image_dir: Path, where: str) -> str:
    """One ``image`` cell as a path usable under ``image_dir``: embedded bytes are written out, paths resolved."""
    if isinstance(value, dict) and value.get("bytes"):
        suffix = Path(value.get("path") or "").suffix.lower() or ".jpg"
        filename = f"{index:05d}{suffix}"
        _atomic_write_bytes(image_dir / filename, value["bytes"])
        return filename
    path = value.get("path") if isinstance(value, dict) else value
    if not isinstance(path, str) or not path:
        raise ValueError(f"{where}: the 'image' cell has neither bytes nor a path ({type(value).__name__}).")
    resolved = Path(path) if os.path.isabs(path) else root / path
    if not resolved.is_file():
        raise FileNotFoundError(f"{where}: the image path {path!r} does not exist (looked for {resolved.resolve()}).")
    return str(resolved.resolve())


def load_flickr30k(
    root: str | os.PathLike,
    annotation_file: str | os.PathLike = FLICKR30K_ANNOTATION,
    image_root: str | os.PathLike | None = None,
    split: str = "test",
    captions_per_image: int | None = 5,
    check_images: bool = True,
    extract_dir: str | os.PathLike | None = None,
) -> ImageTextRetrievalSet:
    """Flickr30K retrieval test set (1,000 images x 5 captions) from a local folder, in either layout:

    - a clone of the Hub dataset ``royokong/flickr30k_test`` (the authors' data)::

          root/                      # git clone https://huggingface.co/datasets/royokong/flickr30k_test
            data/test-*.parquet      # columns image ({bytes, path}) and text (list of 5 captions)

      see `load_hub_parquet_set`; the embedded images are written to ``image_root`` if given, else ``extract_dir``,
      else ``root/images``.
    - Karpathy's split file (``image_root`` defaults to ``root/flickr30k-images``)::

          root/
            dataset_flickr30k.json   # {"images": [{"filename", "split", "sentences": [{"raw"}]}]}
            flickr30k-images/        # <filename> for every test image, e.g. 1007129816.jpg

      ``dataset_flickr30k.json`` comes from Karpathy's caption_datasets.zip; the images from the Flickr30K release.
      Only entries with ``split == "test"`` are kept, captions in file order (``raw`` text, stripped).

    >>> data = load_flickr30k("data/flickr30k_test")                           # doctest: +SKIP
    >>> len(data.images), len(data.captions), data.layout                      # doctest: +SKIP
    (1000, 5000, 'hub-parquet')
    """
    root = Path(root)
    how_to_get = (
        f"Download {FLICKR30K_ANNOTATION} from Karpathy's splits ({KARPATHY_SPLITS_URL}) and the Flickr30K images "
        f"(flickr30k-images/, https://shannon.cs.illinois.edu/DenotationGraph/) into {root.resolve()}, or clone "
        f"{HUB_REPOS['flickr30k']} there."
    )
    return _load_caption_set("flickr30k", root, annotation_file, image_root, root / "flickr30k-images", split,
                             captions_per_image, check_images, extract_dir, how_to_get)


def load_coco5k(
    root: str | os.PathLike,
    annotation_file: str | os.PathLike = COCO_ANNOTATION,
    image_root: str | os.PathLike | None = None,
    split: str = "test",
    captions_per_image: int | None = 5,
    check_images: bool = True,
    extract_dir: str | os.PathLike | None = None,
) -> ImageTextRetrievalSet:
    """COCO 5K retrieval test set (5,000 images, the first 5 captions of each) from a local folder, in either layout:

    - a clone of the Hub dataset ``royokong/coco_test`` (the authors' data; parquet, ``image`` and ``text`` columns,
      see `load_hub_parquet_set` and `load_flickr30k`);
    - Karpathy's split file::

          root/
            dataset_coco.json        # {"images": [{"filepath", "filename", "split", "sentences"}]}
            val2014/                 # COCO 2014 val images, e.g. COCO_val2014_000000391895.jpg

      Images are ``<filepath>/<filename>`` relative to ``image_root`` (``root`` by default).

    Some COCO images have 6 or 7 captions: only the first 5 are kept, as in the standard protocol and the authors'
    evaluation.

    >>> data = load_coco5k("data/coco_test")                                   # doctest: +SKIP
    >>> len(data.images), len(data.captions)                                   # doctest: +SKIP
    (5000, 25000)
    """
    root = Path(root)
    how_to_get = (
        f"Download {COCO_ANNOTATION} from Karpathy's splits ({KARPATHY_SPLITS_URL}) and the COCO val2014 images "
        f"(http://images.cocodataset.org/zips/val2014.zip, unzipped to val2014/) into {root.resolve()}, or clone "
        f"{HUB_REPOS['coco']} there."
    )
    return _load_caption_set("coco", root, annotation_file, image_root, root, split, captions_per_image, check_images,
                             extract_dir, how_to_get)


def _load_caption_set(
    name: str, root: Path, annotation_file: str | os.PathLike, image_root: str | os.PathLike | None,
    default_image_root: Path, split: str, captions_per_image: int | None, check_images: bool,
    extract_dir: str | os.PathLike | None, how_to_get: str,
) -> ImageTextRetrievalSet:
    # Flickr30K and COCO: a Hub parquet clone or Karpathy's split file beside the images (COCO's entries carry a
    # filepath folder).
    title = _CAPTION_SET_TITLES[name]
    if not root.is_dir():
        raise FileNotFoundError(f"{title} folder not found: {root.resolve()}. {how_to_get}")
    if detect_caption_layout(name, root, annotation_file, how_to_get, split) == LAYOUT_HUB_PARQUET:
        return load_hub_parquet_set(name, root, image_root or extract_dir, split, captions_per_image)
    annotation = _require(root / annotation_file, f"{title} Karpathy split file", how_to_get)
    image_root = _require(Path(image_root) if image_root is not None else default_image_root,
                          f"{title} image folder", how_to_get)
    return _from_karpathy(name, annotation, image_root, split, captions_per_image, name == "coco", how_to_get,
                          check_images)


# --------------------------------------------------------------------------------------- ShareGPT4V


def _first_existing(candidates: Sequence[Path]) -> Path | None:
    return next((path for path in candidates if path.is_file()), None)


def load_sharegpt4v(
    root: str | os.PathLike,
    annotation_file: str | os.PathLike = SHAREGPT4V_ANNOTATION,
    image_root: str | os.PathLike | None = None,
    limit: int = 1000,
    check_images: bool = True,
) -> ImageTextRetrievalSet:
    """ShareGPT4V long-caption retrieval: the first ``limit`` (1,000) entries of the ShareCaptioner file.

    The JSON (a list of ``{"id", "image", "conversations"}``) is looked for at ``root/<annotation_file>``, then in
    the authors' layout ``root/data/shareGPT4v/<annotation_file>``, then ``root/data/``; ``annotation_file`` may
    also be a path. The authors' layout::

        root/                                   # data/shareGPT4v in the authors' repo
          data/
            shareGPT4v/share-captioner_coco_lcs_sam_1246k_1107.json
            coco/train2017/...  sam/images/...  llava/...   # the images, at the JSON's "image" paths

    ``image_root`` (the folder the ``image`` paths are relative to) defaults to the first of ``root/data``, ``root``,
    the JSON's folder and its parent that holds the first entry's image. The caption is ``conversations[1]["value"]``
    with newlines replaced by spaces, as in the authors' loader. One caption per image.

    The JSON is in the Hub dataset ``Lin-Chen/ShareGPT4V``; the images follow ShareGPT4V's data preparation (the
    authors point to the ModelScope repo ``hjh0119/sharegpt4v-images``). Only the first ``limit`` entries are read.

    >>> data = load_sharegpt4v("data/shareGPT4v")                              # doctest: +SKIP
    >>> len(data.images), len(data.captions)                                   # doctest: +SKIP
    (1000, 1000)
    """
    root = Path(root)
    how_to_get = (
        f"Download {SHAREGPT4V_ANNOTATION} from the Hub dataset {HUB_REPOS['sharegpt4v']} "
        f"(`git clone https://huggingface.co/datasets/{HUB_REPOS['sharegpt4v']}`) into {root.resolve()} (or "
        f"{(root / 'data' / 'shareGPT4v').resolve()}, the authors' layout) and the images it names (coco/train2017/, "
        f"sam/images/, llava/... per ShareGPT4V's docs/Data.md) under {(root / 'data').resolve()} or pass image_root."
    )
    annotation_file = Path(annotation_file)
    candidates = [annotation_file] if annotation_file.is_absolute() else [
        root / annotation_file, root / "data" / "shareGPT4v" / annotation_file, root / "data" / annotation_file,
        root / "ShareGPT4V" / annotation_file,
    ]
    annotation = _first_existing(candidates)
    if annotation is None:
        raise FileNotFoundError(
            f"ShareGPT4V annotation file not found: looked for {', '.join(str(path.resolve()) for path in candidates)} "
            f"({_folder_listing(root)}). {how_to_get}"
        )
    check_not_lfs_pointers([annotation], "ShareGPT4V")
    entries = read_json_list_head(annotation, limit)
    images, captions = [], []
    for position, entry in enumerate(entries):
        conversations = entry.get("conversations") if isinstance(entry, dict) else None
        if not isinstance(entry, dict) or not entry.get("image") or not conversations or len(conversations) < 2:
            raise ValueError(
                f"{annotation}: entry {position} has no 'image' or fewer than 2 'conversations' turns (the caption is "
                "conversations[1]['value'])."
            )
        images.append(entry["image"])
        captions.append(conversations[1]["value"].replace("\n", " "))
    if not images:
        raise ValueError(f"{annotation} holds no entry.")
    if image_root is None:
        roots = list(dict.fromkeys([root / "data", root, annotation.parent, annotation.parent.parent]))
        image_root = next((folder for folder in roots if (folder / images[0]).is_file()), None)
        if image_root is None:
            raise FileNotFoundError(
                f"ShareGPT4V: the first image {images[0]!r} is under none of "
                f"{', '.join(str(path.resolve()) for path in roots)}. {how_to_get}"
            )
    image_root = Path(image_root)
    if check_images:
        _check_images(images, image_root, how_to_get)
    return ImageTextRetrievalSet("sharegpt4v", images, captions, list(range(len(images))), image_root,
                                 LAYOUT_SHAREGPT4V, str(annotation))


# ------------------------------------------------------------------------------------------- Urban1K


def _urban1k_folder(root: Path, how_to_get: str) -> Path:
    """``root`` or ``root/Urban1k`` (what unzipping Urban1k.zip inside a clone of the Hub repo gives), whichever holds
    ``image/`` and ``caption/``."""
    for folder in (root, root / "Urban1k"):
        if (folder / "caption").is_dir() and (folder / "image").is_dir():
            return folder
    archives = sorted(root.glob("*.zip")) if root.is_dir() else []
    if archives:
        check_not_lfs_pointers(archives, "Urban1K")
        raise FileNotFoundError(
            f"Urban1K: {archives[0].resolve()} is not unpacked: run `unzip {archives[0]} -d {root}` so that "
            f"{(root / 'Urban1k').resolve()} holds image/ and caption/."
        )
    raise FileNotFoundError(
        f"Urban1K caption folder not found: looked for {(root / 'caption').resolve()} and "
        f"{(root / 'Urban1k' / 'caption').resolve()} ({_folder_listing(root)}). {how_to_get}"
    )


def _numeric_first(path: Path) -> tuple[bool, int, str]:
    return not path.stem.isdigit(), int(path.stem) if path.stem.isdigit() else 0, path.stem


def load_urban1k(
    root: str | os.PathLike, image_root: str | os.PathLike | None = None, check_images: bool = True
) -> ImageTextRetrievalSet:
    """Urban1K long-caption retrieval (1,000 image / caption pairs).

    Layout: ``image/<id>.jpg`` and ``caption/<id>.txt`` in ``root`` or in ``root/Urban1k``: cloning the Hub dataset
    ``BeichenZhang/Urban1k`` and unzipping its Urban1k.zip there gives ``Urban1k/Urban1k/{image,caption}`` (the
    authors' layout), so either folder may be passed::

        Urban1k/                     # git clone https://huggingface.co/datasets/BeichenZhang/Urban1k
          Urban1k.zip
          Urban1k/image/<id>.jpg
          Urban1k/caption/<id>.txt   # the long caption of image/<id>.jpg

    ``image_root`` defaults to the ``image`` folder. The caption is the file's first line exactly as
    ``open(path).readlines()[0]`` returns it (the authors' loader), trailing newline included: with last-token
    pooling the newline is the pooled token. Pairs are ordered by id (numerically when ids are numbers); the order
    does not change any recall.

    >>> data = load_urban1k("data/Urban1k")                                    # doctest: +SKIP
    >>> len(data.images), len(data.captions)                                   # doctest: +SKIP
    (1000, 1000)
    """
    root = Path(root)
    how_to_get = (
        f"Clone the Hub dataset {HUB_REPOS['urban1k']} (`git clone https://huggingface.co/datasets/"
        f"{HUB_REPOS['urban1k']}`) and unzip its Urban1k.zip inside it, so that {root.resolve()} or "
        f"{(root / 'Urban1k').resolve()} holds image/ and caption/ (or use load_retrieval_set_from_hub('urban1k', "
        "output_dir))."
    )
    folder = _urban1k_folder(root, how_to_get)
    caption_dir = folder / "caption"
    image_root = _require(Path(image_root) if image_root is not None else folder / "image", "Urban1K image folder",
                          how_to_get)
    caption_files = sorted(caption_dir.glob("*.txt"), key=_numeric_first)
    if not caption_files:
        raise FileNotFoundError(f"No Urban1K captions: {caption_dir.resolve()} has no *.txt file. {how_to_get}")
    images = [f"{path.stem}.jpg" for path in caption_files]
    captions = []
    for path in caption_files:
        with open(path, encoding="utf-8") as handle:
            lines = handle.readlines()
        if not lines:
            raise ValueError(f"Urban1K caption file {path} is empty.")
        captions.append(lines[0])
    if check_images:
        _check_images(images, image_root, how_to_get)
    return ImageTextRetrievalSet("urban1k", images, captions, list(range(len(images))), image_root, LAYOUT_URBAN1K,
                                 str(folder))


RETRIEVAL_LOADERS: dict[str, Callable[..., ImageTextRetrievalSet]] = {
    "flickr30k": load_flickr30k,
    "coco": load_coco5k,
    "sharegpt4v": load_sharegpt4v,
    "urban1k": load_urban1k,
}


def load_retrieval_set(
    name: str, root: str | os.PathLike, image_root: str | os.PathLike | None = None, **kwargs: Any
) -> ImageTextRetrievalSet:
    """Load ``flickr30k``, ``coco``, ``sharegpt4v`` or ``urban1k`` from its local folder, whichever of the known
    layouts it holds (see each ``load_*``; ``ImageTextRetrievalSet.layout`` says which was found).

    >>> data = load_retrieval_set("coco", "data/coco_test")                     # doctest: +SKIP
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
    return ImageTextRetrievalSet(name, images, captions, caption_to_image, image_dir, LAYOUT_HUB_PARQUET, repo_id)


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
    "ImageTextRetrievalSet",
    "LAYOUT_HUB_PARQUET",
    "LAYOUT_KARPATHY",
    "LAYOUT_SHAREGPT4V",
    "LAYOUT_URBAN1K",
    "check_not_lfs_pointers",
    "detect_caption_layout",
    "find_split_parquet_files",
    "is_lfs_pointer",
    "load_hub_parquet_set",
    "read_json_list_head",
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
