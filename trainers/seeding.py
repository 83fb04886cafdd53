"""Per-row random generators: a row's draws depend on the seed, the epoch, what is drawn and the row's content, never
on batch order, worker or process count (so 1 and 2 processes, or a resumed run, draw the same), nor on where the
images lie (two runs whose images sit in different folders draw the same)."""

from __future__ import annotations

import functools
import hashlib
import os
import random
from collections.abc import Mapping
from typing import Any

__all__ = ["ROW_KEY_COLUMNS", "row_rng", "stable_key"]

ROW_KEY_COLUMNS = ("query_text", "query_image", "pos_text", "pos_image")
"""The columns that identify a judge-dataset row (its query and positive)."""


def stable_key(value: Any, image_root: str | os.PathLike | None = None) -> str:
    """A run-independent key for a row value: texts and relative image paths as they are, an absolute path under
    ``image_root`` relative to it, any other absolute path by its file's content (a run writing its images into its
    own output folder must draw as another run does), image bytes and pixels hashed (a PIL image's repr holds a
    memory address).

    Example:
        >>> stable_key("shapes/red.png"), stable_key({"path": "a.png", "bytes": None})
        ("'shapes/red.png'", "'a.png'")
        >>> stable_key("/data/run-1/shapes/red.png", "/data/run-1") == stable_key("shapes/red.png")
        True
    """
    if isinstance(value, str) and os.path.isabs(value):
        return _absolute_path_key(value, None if image_root is None else os.fspath(image_root))
    if value is None or isinstance(value, (str, int, float)):
        return repr(value)
    if isinstance(value, dict):
        if value.get("path"):
            return stable_key(value["path"], image_root)
        if value.get("bytes") is not None:
            return hashlib.sha256(value["bytes"]).hexdigest()
    if hasattr(value, "tobytes") and hasattr(value, "size"):  # a PIL image
        return hashlib.sha256(repr((value.mode, value.size)).encode() + value.tobytes()).hexdigest()
    return repr(value)


@functools.lru_cache(maxsize=1 << 16)
def _absolute_path_key(path: str, image_root: str | None) -> str:
    if image_root is not None:
        relative = os.path.relpath(path, image_root)
        if not relative.startswith(os.pardir):
            return repr(relative.replace(os.sep, "/"))
    try:
        with open(path, "rb") as handle:
            return hashlib.sha256(handle.read()).hexdigest()
    except OSError:  # a missing file fails later, where it is loaded, with the row named
        return repr(path)


def row_rng(seed: int, epoch: int, row: Mapping[str, Any], purpose: str,
            image_root: str | os.PathLike | None = None) -> random.Random:
    """A generator seeded by ``seed``, ``epoch``, ``purpose`` (what is drawn: "negatives", "list"...) and the row's
    query and positive (`ROW_KEY_COLUMNS`, image paths keyed by `stable_key` under ``image_root``).

    Example:
        >>> row = {"query_text": "a red circle", "query_image": None, "pos_text": "red", "pos_image": None}
        >>> row_rng(0, 0, row, "negatives").random() == row_rng(0, 0, dict(row), "negatives").random()
        True
        >>> row_rng(0, 1, row, "negatives").random() == row_rng(0, 0, row, "negatives").random()
        False
    """
    key = repr((seed, epoch, purpose, *(stable_key(row.get(column), image_root) for column in ROW_KEY_COLUMNS)))
    return random.Random(hashlib.sha256(key.encode()).digest())
