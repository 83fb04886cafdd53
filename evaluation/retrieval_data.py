"""The zero-shot image-text retrieval sets as users have them: Flickr30K (1K test), COCO (5K test), ShareGPT4V (first
1K), Urban1K; each loader detects the layout of the folder it is given (see `evaluation.retrieval` for the
protocol and the layouts) and says which in ``ImageTextRetrievalSet.layout``. `load_retrieval_set_from_hub` fetches
the authors' copies from the Hub instead."""

from __future__ import annotations

import os
import zipfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from .data_files import (
    check_image_files,
    check_not_lfs_pointers,
    find_split_parquet_files,
    folder_listing,
    read_json,
    read_json_list_head,
    require_file,
    write_bytes_once,
)

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


LAYOUT_HUB_PARQUET = "hub-parquet"
"""A clone of a Hub dataset repo in parquet (``royokong/flickr30k_test``, ``royokong/coco_test``)."""
LAYOUT_KARPATHY = "karpathy-json"
"""Karpathy's split file (``dataset_flickr30k.json`` / ``dataset_coco.json``) beside an image folder."""
LAYOUT_SHAREGPT4V = "sharegpt4v-json"
"""The ShareCaptioner JSON list with images in ShareGPT4V's folders."""
LAYOUT_URBAN1K = "urban1k-folders"
"""Urban1K's ``image/`` and ``caption/`` folders."""

_CAPTION_SET_TITLES = {"flickr30k": "Flickr30K", "coco": "COCO"}



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


# ---------------------------------------------------------------------------------- Flickr30K / COCO


def _check_max_rows(max_rows: int | None) -> None:
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be >= 1 (or None for every image), got {max_rows}.")


def _from_karpathy(
    name: str, annotation: Path, image_root: Path, split: str, captions_per_image: int | None, with_filepath: bool,
    how_to_get: str, check_images: bool, max_rows: int | None = None,
) -> ImageTextRetrievalSet:
    entries = read_json(annotation)
    if not isinstance(entries, dict) or "images" not in entries:
        raise ValueError(f"{annotation} is not a Karpathy split file: expected a JSON object with an 'images' list.")
    images, captions, caption_to_image = [], [], []
    for entry in entries["images"]:
        if max_rows is not None and len(images) >= max_rows:
            break
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
        check_image_files(images, image_root, how_to_get)
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
             else folder_listing(root))
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
    max_rows: int | None = None,
) -> ImageTextRetrievalSet:
    """A retrieval set from a clone of its Hub dataset repo in parquet (``royokong/flickr30k_test``,
    ``royokong/coco_test``): one row per image, an ``image`` column and a ``text`` column (a list of captions).

    The ``image`` column is the ``datasets`` Image type stored in parquet, a struct ``{bytes, path}``: the bytes are
    written once, unchanged, to ``image_dir/<row>.<ext>`` (default ``root/images``), so that images can be referred to
    by path (and cached by path). A struct without bytes, or a plain string, is a path relative to ``root``.
    Captions are kept as stored, the first ``captions_per_image`` of each row (COCO rows have up to 7; the authors keep
    5), in file order. ``max_rows``: only the first rows (images), and only their images are written.

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
    _check_max_rows(max_rows)
    images, captions, caption_to_image = [], [], []
    for file in files:
        if max_rows is not None and len(images) >= max_rows:
            break
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
                if max_rows is not None and len(images) >= max_rows:
                    break
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
        write_bytes_once(image_dir / filename, value["bytes"])
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
    max_rows: int | None = None,
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
                             captions_per_image, check_images, extract_dir, how_to_get, max_rows)


def load_coco5k(
    root: str | os.PathLike,
    annotation_file: str | os.PathLike = COCO_ANNOTATION,
    image_root: str | os.PathLike | None = None,
    split: str = "test",
    captions_per_image: int | None = 5,
    check_images: bool = True,
    extract_dir: str | os.PathLike | None = None,
    max_rows: int | None = None,
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
                             extract_dir, how_to_get, max_rows)


def _load_caption_set(
    name: str, root: Path, annotation_file: str | os.PathLike, image_root: str | os.PathLike | None,
    default_image_root: Path, split: str, captions_per_image: int | None, check_images: bool,
    extract_dir: str | os.PathLike | None, how_to_get: str, max_rows: int | None = None,
) -> ImageTextRetrievalSet:
    # Flickr30K and COCO: a Hub parquet clone or Karpathy's split file beside the images (COCO's entries carry a
    # filepath folder). max_rows keeps the first images (a smoke test).
    _check_max_rows(max_rows)
    title = _CAPTION_SET_TITLES[name]
    if not root.is_dir():
        raise FileNotFoundError(f"{title} folder not found: {root.resolve()}. {how_to_get}")
    if detect_caption_layout(name, root, annotation_file, how_to_get, split) == LAYOUT_HUB_PARQUET:
        return load_hub_parquet_set(name, root, image_root or extract_dir, split, captions_per_image, max_rows)
    annotation = require_file(root / annotation_file, f"{title} Karpathy split file", how_to_get)
    image_root = require_file(Path(image_root) if image_root is not None else default_image_root,
                          f"{title} image folder", how_to_get)
    return _from_karpathy(name, annotation, image_root, split, captions_per_image, name == "coco", how_to_get,
                          check_images, max_rows)


# --------------------------------------------------------------------------------------- ShareGPT4V


def _first_existing(candidates: Sequence[Path]) -> Path | None:
    return next((path for path in candidates if path.is_file()), None)


def image_folders(images: Sequence[str]) -> dict[str, int]:
    """How many images each folder holds, in order of first appearance: for ShareGPT4V, the image sets to download.

    >>> image_folders(["sam/images/sa_1.jpg", "coco/train2017/1.jpg", "sam/images/sa_2.jpg"])
    {'sam/images': 2, 'coco/train2017': 1}
    """
    return dict(Counter(os.path.dirname(image) for image in images))


def sharegpt4v_image_folders(annotation: str | os.PathLike, limit: int = 1000) -> dict[str, int]:
    """The folders the first ``limit`` entries of the ShareCaptioner file name images in, with their counts (e.g.
    ``{"sam/images": 1000}``): which of ShareGPT4V's image sets the benchmark needs. Reads only the file's head.

    >>> import json, tempfile
    >>> annotation = Path(tempfile.mkdtemp()) / SHAREGPT4V_ANNOTATION
    >>> _ = annotation.write_text(json.dumps([{"image": "sam/images/sa_1.jpg"}, {"image": "sam/images/sa_7.jpg"}]))
    >>> sharegpt4v_image_folders(annotation)
    {'sam/images': 2}
    """
    return image_folders([entry.get("image") or "" for entry in read_json_list_head(annotation, limit)
                          if isinstance(entry, dict)])


def load_sharegpt4v(
    root: str | os.PathLike,
    annotation_file: str | os.PathLike = SHAREGPT4V_ANNOTATION,
    image_root: str | os.PathLike | None = None,
    limit: int = 1000,
    check_images: bool = True,
    max_rows: int | None = None,
) -> ImageTextRetrievalSet:
    """ShareGPT4V long-caption retrieval: the first ``limit`` (1,000) entries of the ShareCaptioner file (the first
    ``max_rows`` of those when given, a smoke test).

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
            f"({folder_listing(root)}). {how_to_get}"
        )
    check_not_lfs_pointers([annotation], "ShareGPT4V")
    _check_max_rows(max_rows)
    entries = read_json_list_head(annotation, limit if max_rows is None else min(limit, max_rows))
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
            needed = ", ".join(f"{folder}/ ({count})" for folder, count in image_folders(images).items())
            raise FileNotFoundError(
                f"ShareGPT4V: the first image {images[0]!r} is under none of "
                f"{', '.join(str(path.resolve()) for path in roots)}. {how_to_get} The {len(images)} entries read "
                f"name images in {needed}."
            )
    # Which image sets the entries read need: the one thing a user cannot tell from ShareGPT4V's docs.
    needed = ", ".join(f"{folder}/ ({count})" for folder, count in image_folders(images).items())
    how_to_get += f" The {len(images)} entries read name images in {needed}."
    image_root = Path(image_root)
    if check_images:
        check_image_files(images, image_root, how_to_get)
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
        f"{(root / 'Urban1k' / 'caption').resolve()} ({folder_listing(root)}). {how_to_get}"
    )


def _numeric_first(path: Path) -> tuple[bool, int, str]:
    return not path.stem.isdigit(), int(path.stem) if path.stem.isdigit() else 0, path.stem


def load_urban1k(
    root: str | os.PathLike, image_root: str | os.PathLike | None = None, check_images: bool = True,
    max_rows: int | None = None,
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
    does not change any recall. ``max_rows`` keeps the first pairs in that order (a smoke test).

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
    image_root = require_file(Path(image_root) if image_root is not None else folder / "image", "Urban1K image folder",
                          how_to_get)
    _check_max_rows(max_rows)
    caption_files = sorted(caption_dir.glob("*.txt"), key=_numeric_first)[:max_rows]
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
        check_image_files(images, image_root, how_to_get)
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
    layouts it holds (see each ``load_*``; ``ImageTextRetrievalSet.layout`` says which was found). Every loader takes
    ``max_rows``: only the first images (with their captions), for a smoke test.

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


__all__ = [
    "COCO_ANNOTATION",
    "FLICKR30K_ANNOTATION",
    "HUB_REPOS",
    "ImageTextRetrievalSet",
    "KARPATHY_SPLITS_URL",
    "LAYOUT_HUB_PARQUET",
    "LAYOUT_KARPATHY",
    "LAYOUT_SHAREGPT4V",
    "LAYOUT_URBAN1K",
    "RETRIEVAL_LOADERS",
    "SHAREGPT4V_ANNOTATION",
    "detect_caption_layout",
    "image_folders",
    "load_coco5k",
    "load_flickr30k",
    "load_hub_parquet_set",
    "load_retrieval_set",
    "load_retrieval_set_from_hub",
    "load_sharegpt4v",
    "load_urban1k",
    "sharegpt4v_image_folders",
]
