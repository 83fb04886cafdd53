"""Checks and readers for benchmark data files as users have them on disk: Git LFS pointers left by a clone
without ``git lfs pull``, split files found by name, a JSON list read only as far as needed, folder listings for
error messages, missing files named with how to get them."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from modeling_unime.util.files import atomic_write
from modeling_unime.util.images import require_image_files

LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/v1"
"""The first bytes of a Git LFS pointer file (what a clone holds in place of a large file before ``git lfs pull``)."""
SPLIT_NAMES = ("train", "test", "validation", "valid", "val", "dev")


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


def folder_listing(folder: Path, limit: int = 8) -> str:
    if not folder.is_dir():
        return "the folder does not exist"
    names = sorted(entry.name + ("/" if entry.is_dir() else "") for entry in folder.iterdir())
    if not names:
        return "the folder is empty"
    return "it holds " + ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def split_of(relative: Path) -> str | None:
    """The split a Hub parquet file belongs to, from its name (``test-00000-of-00001.parquet``) or a folder
    (``default/test/0000.parquet``); None when neither names one."""
    match = re.match(r"([A-Za-z]+)(?:[-_.]|$)", relative.name)
    if match and match.group(1).lower() in SPLIT_NAMES:
        return match.group(1).lower()
    return next((part.lower() for part in relative.parts[:-1] if part.lower() in SPLIT_NAMES), None)


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
    splits = {path: split_of(path.relative_to(folder)) for path in files}
    chosen = [path for path in files if splits[path] == split]
    if chosen:
        return chosen
    if files and all(value is None for value in splits.values()):
        return files
    return []


def write_bytes_once(target: Path, data: bytes) -> None:
    """Write ``data`` to ``target`` unless an equal-sized file is there, atomically (`modeling_unime.util.files`), so
    that a killed run (or another process writing the same file) never leaves a half-written image."""
    if target.is_file() and target.stat().st_size == len(data):
        return
    atomic_write(target, lambda temporary: temporary.write_bytes(data))


def require_file(path: Path, what: str, how_to_get: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: looked for {path.resolve()}. {how_to_get}")
    return path


def check_image_files(images: Sequence[str], image_root: Path, how_to_get: str) -> None:
    # Absolute paths in the message: the user sees exactly which file is missing.
    root = image_root.resolve()
    require_image_files([str(root / image) for image in images], root, "retrieval", how_to_get)


def read_json(path: Path) -> Any:
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


__all__ = [
    "LFS_POINTER_PREFIX",
    "SPLIT_NAMES",
    "check_image_files",
    "check_not_lfs_pointers",
    "find_split_parquet_files",
    "folder_listing",
    "is_lfs_pointer",
    "read_json",
    "read_json_list_head",
    "require_file",
    "split_of",
    "write_bytes_once",
]
