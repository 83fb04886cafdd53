"""Checking, before any model runs, that every image file a job names exists (mining, MMEB, retrieval, SugarCrepe)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

__all__ = ["MissingImagesError", "missing_image_files", "require_image_files", "resolve_image_path"]


class MissingImagesError(FileNotFoundError, ValueError):
    """Image files a job needs are not there (a FileNotFoundError, and a ValueError as bad input)."""


def resolve_image_path(path: str | os.PathLike, image_root: str | os.PathLike | None) -> str:
    """``path`` under ``image_root`` unless it is absolute (or there is no root).

    Example:
        >>> resolve_image_path("coco/1.jpg", "/data"), resolve_image_path("/abs/1.jpg", "/data")
        ('/data/coco/1.jpg', '/abs/1.jpg')
    """
    path = os.fspath(path)
    if image_root is None or os.fspath(image_root) == "" or os.path.isabs(path):
        return path
    return os.path.join(os.fspath(image_root), path)


def missing_image_files(paths: Iterable[str | os.PathLike], image_root: str | os.PathLike | None) -> list[str]:
    """The paths (as given, first occurrence, in order) whose file does not exist under ``image_root``."""
    missing = []
    for path in dict.fromkeys(os.fspath(path) for path in paths if path):
        if not os.path.isfile(resolve_image_path(path, image_root)):
            missing.append(path)
    return missing


def require_image_files(
    paths: Sequence[str | os.PathLike | None],
    image_root: str | os.PathLike | None,
    what: str,
    how_to_fix: str,
    labels: Sequence[str] | None = None,
) -> None:
    """Raise `MissingImagesError` unless every (non-empty) path exists under ``image_root``.

    The message counts the missing files, names the root and the first five (with their ``labels``, e.g. "row 3
    query_image", when given), then says ``how_to_fix``.

    Example:
        >>> require_image_files(["a.png", None], "/nowhere", "MMEB", "Unzip images.zip there.")
        Traceback (most recent call last):
        ...
        modeling_unime.util.images.MissingImagesError: 1 of 1 MMEB image file(s) not found under image_root='/nowhere' \
(first: 'a.png'). Unzip images.zip there.
    """
    if labels is not None and len(labels) != len(paths):
        raise ValueError(f"{len(labels)} labels for {len(paths)} paths.")
    named = [(os.fspath(path), labels[index] if labels else None) for index, path in enumerate(paths) if path]
    unique = list(dict.fromkeys(path for path, _ in named))
    missing = set(missing_image_files(unique, image_root))
    if not missing:
        return
    shown, seen = [], set()
    for path, label in named:
        if path in missing and (label is not None or path not in seen):
            seen.add(path)
            shown.append(f"{label} {path!r}" if label else repr(path))
    root = None if image_root is None else os.fspath(image_root)
    raise MissingImagesError(
        f"{len(missing)} of {len(unique)} {what} image file(s) not found under image_root={root!r} "
        f"(first: {', '.join(shown[:5])}). {how_to_fix}"
    )
