"""Per-row random generators: a row's draws depend on the seed, the epoch, what is drawn and the row's content, never
on batch order, worker or process count (so 1 and 2 processes, or a resumed run, draw the same)."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping
from typing import Any

__all__ = ["ROW_KEY_COLUMNS", "row_rng", "stable_key"]

ROW_KEY_COLUMNS = ("query_text", "query_image", "pos_text", "pos_image")
"""The columns that identify a judge-dataset row (its query and positive)."""


def stable_key(value: Any) -> str:
    """A run-independent key for a row value: texts and image paths as they are, image bytes and pixels hashed (a PIL
    image's repr holds a memory address).

    Example:
        >>> stable_key("shapes/red.png"), stable_key({"path": "a.png", "bytes": None})
        ("'shapes/red.png'", "'a.png'")
    """
    if value is None or isinstance(value, (str, int, float)):
        return repr(value)
    if isinstance(value, dict):
        if value.get("path"):
            return repr(value["path"])
        if value.get("bytes") is not None:
            return hashlib.sha256(value["bytes"]).hexdigest()
    if hasattr(value, "tobytes") and hasattr(value, "size"):  # a PIL image
        return hashlib.sha256(repr((value.mode, value.size)).encode() + value.tobytes()).hexdigest()
    return repr(value)


def row_rng(seed: int, epoch: int, row: Mapping[str, Any], purpose: str) -> random.Random:
    """A generator seeded by ``seed``, ``epoch``, ``purpose`` (what is drawn: "negatives", "list"...) and the row's
    query and positive (`ROW_KEY_COLUMNS`).

    Example:
        >>> row = {"query_text": "a red circle", "query_image": None, "pos_text": "red", "pos_image": None}
        >>> row_rng(0, 0, row, "negatives").random() == row_rng(0, 0, dict(row), "negatives").random()
        True
        >>> row_rng(0, 1, row, "negatives").random() == row_rng(0, 0, row, "negatives").random()
        False
    """
    key = repr((seed, epoch, purpose, *(stable_key(row.get(column)) for column in ROW_KEY_COLUMNS)))
    return random.Random(hashlib.sha256(key.encode()).digest())
