"""The UniME-V2 judge dataset: the authors' released JSON <-> a ``datasets.Dataset``, without loss.

The authors release their training file (``train_data_*_scores.json``) as one JSON list of objects::

    {"query_text", "query_image", "pos_text", "pos_image", "query_pos_scores",
     "hard_negatives": [[text, image_path], ...], "hard_negatives_scores": [...]}

``load_official_json`` turns it into a dataset with the columns of ``UNIME_FEATURES`` (one row per training query)
and ``save_official_json`` writes such a dataset back; for a file in the authors' format the written bytes equal the
original ones (row order, duplicated rows and negatives, image paths, ``""`` for no image, scores to the last bit,
``json.dump(rows, f, indent=4, ensure_ascii=False)`` layout in UTF-8).

Images stay path strings relative to an image root (the MMEB-train image folder): the released data has ~660K rows
x 11 image references, far too many to embed as bytes. ``resolve_image`` joins a stored path with the root, which
``load_official_json`` records in ``dataset.info.description`` (read it back with ``image_root_of``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path, PurePosixPath
from typing import Any, TypedDict

from datasets import Dataset, DatasetInfo, Features, List, Value

from .util.files import read_json

# Float64, not the float32 of the design draft: a JSON number is a float64, and only float64 stores every one exactly,
# so the file round trip is bit-exact for any input. The released judge scores happen to be float32 values (all 550
# in the sample widen back exactly), but a rescored file or a hand edit (0.1 -> 0.10000000149011612 in float32) would
# silently change. The cost is 4 bytes per score, 44 per row.
UNIME_FEATURES = Features(
    {
        "query_text": Value("string"),
        "query_image": Value("string"),  # null when the query has no image
        "pos_text": Value("string"),
        "pos_image": Value("string"),  # null when the positive has no image
        "neg_texts": List(Value("string")),
        "neg_images": List(Value("string")),  # null entries for text-only negatives
        "judge_scores": List(Value("float64")),  # [positive, negative_1, ..., negative_n]
        "task": Value("string"),
        "source": Value("string"),
    }
)



SCORE_SOURCES = ("judge", "estimate", "fallback")
"""Where a mined judge score came from: the (large) judge, a calibrated estimate of the judge cascade
(`modeling_unime.mining.cascade`), or the empty-set fallback's fixed score (the paper's 1.0)."""

MINED_FEATURES = Features({**UNIME_FEATURES, "judge_score_source": List(Value("string"))})
"""The columns a mining run writes: `UNIME_FEATURES` and ``judge_score_source``, one of `SCORE_SOURCES` per entry of
``judge_scores``. Trainers read `UNIME_FEATURES` and ignore the rest."""


class JudgeRow(TypedDict):
    """One row of a judge dataset: the columns of `UNIME_FEATURES`, as `datasets` gives a row back (``row = ds[i]``)
    and as mining writes it. ``judge_scores`` is ``[positive, negative_1, ..., negative_n]``, aligned with
    ``neg_texts`` and ``neg_images`` (one entry per negative; ``None`` for no image)."""

    query_text: str
    query_image: str | None
    pos_text: str
    pos_image: str | None
    neg_texts: list[str]
    neg_images: list[str | None]
    judge_scores: list[float]
    task: str
    source: str


class MinedRow(JudgeRow):
    """A `JudgeRow` as mining writes it: with ``judge_score_source`` (see `MINED_FEATURES`)."""

    judge_score_source: list[str]


OFFICIAL_FIELDS = (
    "query_text",
    "query_image",
    "pos_text",
    "pos_image",
    "query_pos_scores",
    "hard_negatives",
    "hard_negatives_scores",
)
UNKNOWN_TASK = "unknown"
_IMAGE_ROOT_PREFIX = "image_root: "
_BATCH_SIZE = 1000


def resolve_image(path: str | None, image_root: str | os.PathLike | None) -> str | None:
    """Return the file a stored image path points to: ``path`` joined with ``image_root``.

    ``None`` or ``""`` (no image) gives ``None``; an absolute ``path`` or a missing ``image_root`` gives ``path``.

    Example:
        >>> resolve_image("images/A-OKVQA/Train/A-OKVQA_image_3179.jpg", "/data/MMEB-train")
        '/data/MMEB-train/images/A-OKVQA/Train/A-OKVQA_image_3179.jpg'
        >>> resolve_image(None, "/data/MMEB-train") is None
        True
    """
    if not path:
        return None
    if image_root is None or os.path.isabs(path):
        return path
    return os.path.join(os.fspath(image_root), path)


def image_root_of(dataset: Dataset) -> str | None:
    """The ``image_root`` that ``load_official_json`` recorded in ``dataset.info.description``, or ``None``.

    Example:
        >>> ds = Dataset.from_dict({"query_image": ["images/a.jpg"]}, info=DatasetInfo(description="image_root: /d"))
        >>> image_root_of(ds)
        '/d'
    """
    for line in (dataset.info.description or "").splitlines():
        if line.startswith(_IMAGE_ROOT_PREFIX):
            return line[len(_IMAGE_ROOT_PREFIX) :]
    return None


def task_from_image_path(path: str | None) -> str | None:
    """The dataset folder of an MMEB-train image path (``images/<dataset>/...``), or ``None`` when there is none.

    Example:
        >>> task_from_image_path("images/A-OKVQA/Train/A-OKVQA_image_3179.jpg")
        'A-OKVQA'
        >>> task_from_image_path("MSCOCO_t2i/Train/1.jpg"), task_from_image_path("cat.jpg"), task_from_image_path("")
        ('MSCOCO_t2i', None, None)
    """
    if not path:
        return None
    parts = PurePosixPath(path).parts
    if parts and parts[0] == "images":
        parts = parts[1:]
    return parts[0] if len(parts) >= 2 else None


def _is_score(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0 <= value <= 1


def _validate_official_row(row: Any, index: int, file: str) -> None:
    """Raise ValueError naming the file, the row and the fix for the first problem of one released row."""

    def fail(problem: str) -> None:
        raise ValueError(f"{file}: row {index}: {problem}")

    if not isinstance(row, dict):
        fail(f"expected a JSON object with fields {list(OFFICIAL_FIELDS)}, got {type(row).__name__}; fix or remove it.")
    missing = [field for field in OFFICIAL_FIELDS if field not in row]
    if missing:
        fail(f"missing field(s) {missing}; every row needs {list(OFFICIAL_FIELDS)}. Add them or remove the row.")
    unexpected = sorted(set(row) - set(OFFICIAL_FIELDS))
    if unexpected:
        fail(f"unexpected field(s) {unexpected} would be lost in conversion; remove them or extend UNIME_FEATURES.")
    for field in ("query_text", "query_image", "pos_text", "pos_image"):
        if not isinstance(row[field], str):
            fail(f"{field} must be a string (\"\" for no image), got {row[field]!r}; fix the value.")
    negatives, scores = row["hard_negatives"], row["hard_negatives_scores"]
    if not isinstance(negatives, list) or not isinstance(scores, list):
        fail("hard_negatives and hard_negatives_scores must be JSON lists; fix the row.")
    if len(negatives) != len(scores):
        fail(
            f"{len(negatives)} hard_negatives but {len(scores)} hard_negatives_scores; they must be aligned one "
            "score per negative. Re-score the row or remove it."
        )
    for position, negative in enumerate(negatives):
        if not (isinstance(negative, list) and len(negative) == 2 and all(isinstance(x, str) for x in negative)):
            fail(
                f"hard_negatives[{position}] = {negative!r} is not a [text, image_path] pair of two strings "
                "(use \"\" for no image); fix the pair."
            )
    for name, value in [("query_pos_scores", row["query_pos_scores"])] + [
        (f"hard_negatives_scores[{position}]", score) for position, score in enumerate(scores)
    ]:
        if not _is_score(value):
            fail(f"{name} = {value!r} is not a finite number in [0, 1]; re-score the row or remove it.")


def load_official_json(path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> Dataset:
    """Read the authors' released training JSON into a dataset with the columns of ``UNIME_FEATURES``.

    Every row is validated first (a ValueError names the file, the row index and the fix). ``""`` image paths become
    ``None``; other paths are kept verbatim (resolve them with ``resolve_image(path, image_root_of(dataset))``).
    ``judge_scores`` is ``[query_pos_scores, *hard_negatives_scores]``; ``task`` is the dataset folder of the first
    image path among query, positive and negatives (``"unknown"`` without one); ``source`` is the file name.
    Duplicated rows and negatives are kept as they are. An integer score (``1``) is stored as a float, so it is
    written back as ``1.0``: the only case where ``save_official_json`` does not reproduce the input bytes.

    Example:
        >>> import tempfile
        >>> row = {"query_text": "<|image_1|>\\nWhat is it?\\n", "query_image": "images/A-OKVQA/Train/1.jpg",
        ...        "pos_text": "a cat", "pos_image": "", "query_pos_scores": 0.75,
        ...        "hard_negatives": [["a dog", ""]], "hard_negatives_scores": [0.25]}
        >>> file = Path(tempfile.mkdtemp()) / "train_data_scores.json"
        >>> _ = file.write_text(json.dumps([row], indent=4))
        >>> ds = load_official_json(file, image_root="/data/MMEB-train")
        >>> ds[0]["judge_scores"], ds[0]["pos_image"], ds[0]["task"], ds[0]["source"]
        ([0.75, 0.25], None, 'A-OKVQA', 'train_data_scores.json')
        >>> resolve_image(ds[0]["query_image"], image_root_of(ds))
        '/data/MMEB-train/images/A-OKVQA/Train/1.jpg'
    """
    file = os.fspath(path)
    rows = read_json(file, "the authors' judge-scored training file")
    if not isinstance(rows, list):
        kind = type(rows).__name__
        raise ValueError(f"{file}: expected a JSON list of row objects (the authors' format), not a {kind}.")
    source = Path(file).name
    columns: dict[str, list[Any]] = {name: [] for name in UNIME_FEATURES}
    for index, row in enumerate(rows):
        _validate_official_row(row, index, file)
        negatives = row["hard_negatives"]
        image_paths = [row["query_image"], row["pos_image"]] + [image for _, image in negatives]
        tasks = (task_from_image_path(image) for image in image_paths)
        columns["query_text"].append(row["query_text"])
        columns["query_image"].append(row["query_image"] or None)
        columns["pos_text"].append(row["pos_text"])
        columns["pos_image"].append(row["pos_image"] or None)
        columns["neg_texts"].append([text for text, _ in negatives])
        columns["neg_images"].append([image or None for _, image in negatives])
        negative_scores = [float(score) for score in row["hard_negatives_scores"]]
        columns["judge_scores"].append([float(row["query_pos_scores"])] + negative_scores)
        columns["task"].append(next((task for task in tasks if task), UNKNOWN_TASK))
        columns["source"].append(source)
    description = f"UniME-V2 judge-scored training rows converted from {source} by modeling_unime.data."
    if image_root is not None:
        description += f"\n{_IMAGE_ROOT_PREFIX}{os.fspath(image_root)}"
    info = DatasetInfo(description=description, features=UNIME_FEATURES)
    return Dataset.from_dict(columns, features=UNIME_FEATURES, info=info)


def _official_row(batch: dict[str, list[Any]], position: int, index: int) -> dict[str, Any]:
    texts, images, scores = batch["neg_texts"][position], batch["neg_images"][position], batch["judge_scores"][position]
    if len(images) != len(texts) or len(scores) != len(texts) + 1:
        raise ValueError(
            f"row {index}: {len(texts)} neg_texts, {len(images)} neg_images and {len(scores)} judge_scores; "
            "judge_scores must be [positive, one per negative] and neg_images one per negative. Fix the row."
        )
    return {
        "query_text": batch["query_text"][position],
        "query_image": batch["query_image"][position] or "",
        "pos_text": batch["pos_text"][position],
        "pos_image": batch["pos_image"][position] or "",
        "query_pos_scores": float(scores[0]),
        "hard_negatives": [[text, image or ""] for text, image in zip(texts, images)],
        "hard_negatives_scores": [float(score) for score in scores[1:]],
    }


def save_official_json(dataset: Dataset, path: str | os.PathLike) -> None:
    """Write a dataset with the ``UNIME_FEATURES`` columns back in the authors' JSON format.

    The output is what ``json.dump(rows, f, indent=4, ensure_ascii=False)`` writes to a UTF-8 file (non-ASCII text
    as is, no trailing newline), streamed row by row so
    the full ~660K-row file needs no second copy in memory. ``None`` images become ``""``; ``task`` and ``source`` are
    not part of the authors' format and are dropped.

    Example:
        >>> import tempfile
        >>> ds = Dataset.from_dict({"query_text": ["a cat"], "query_image": [None], "pos_text": [""],
        ...     "pos_image": ["images/MSCOCO_t2i/Train/1.jpg"], "neg_texts": [[""]],
        ...     "neg_images": [["images/MSCOCO_t2i/Train/2.jpg"]], "judge_scores": [[0.5, 0.25]],
        ...     "task": ["MSCOCO_t2i"], "source": ["x.json"]}, features=UNIME_FEATURES)
        >>> file = Path(tempfile.mkdtemp()) / "out.json"
        >>> save_official_json(ds, file)
        >>> json.loads(file.read_text())[0]["hard_negatives"], json.loads(file.read_text())[0]["query_image"]
        ([['', 'images/MSCOCO_t2i/Train/2.jpg']], '')
    """
    needed = [name for name in UNIME_FEATURES if name not in ("task", "source")]
    missing = [name for name in needed if name not in dataset.column_names]
    if missing:
        raise ValueError(f"the dataset lacks column(s) {missing}; build it with load_official_json or UNIME_FEATURES.")
    plain = dataset.with_format(None).select_columns(needed)
    # Written beside the target and moved into place, so an invalid row leaves no half-written file behind.
    partial = Path(f"{os.fspath(path)}.partial")
    try:
        with open(partial, "w", encoding="utf-8", newline="") as handle:
            handle.write("[\n" if len(plain) else "[]")
            index = 0
            for batch in plain.iter(batch_size=_BATCH_SIZE):
                for position in range(len(batch["query_text"])):
                    # json escapes control characters inside strings, so every "\n" is layout: indent it one level.
                    encoded = json.dumps(_official_row(batch, position, index), indent=4, ensure_ascii=False)
                    handle.write((",\n" if index else "") + "    " + encoded.replace("\n", "\n    "))
                    index += 1
            if index:
                handle.write("\n]")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
