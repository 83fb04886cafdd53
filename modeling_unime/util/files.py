"""Files that survive interruptions (atomic writes, the warning for a damaged cache file), and JSON reads whose errors
name the file."""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["DamagedCacheWarning", "atomic_write", "read_json", "read_json_lines", "warn_damaged"]


class DamagedCacheWarning(UserWarning):
    """A cache or finished-shard file could not be read (cut by a full disk, a kill or an interrupted copy); it is
    ignored and what it held is computed again."""


def warn_damaged(path: Path, what: str, error: BaseException | str, action: str) -> None:
    message = (
        f"{path}: damaged {what} ({error}); {action} Caches are disposable: deleting the folder "
        f"{path.parent} only costs recomputation. If this repeats, check the disk (full?) and the copy of output_dir."
    )
    warnings.warn(message, DamagedCacheWarning, stacklevel=3)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder and rename it: a killed run leaves no half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.close(handle)
    try:
        write(Path(temporary))
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """The content of a JSON file; a file that is not valid JSON raises ValueError naming the file, the line and
    the column (``json.JSONDecodeError`` alone names neither the file nor what it was for)."""
    import json

    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{os.fspath(path)}: not valid JSON ({what}): {error.msg} at line {error.lineno}, column "
                         f"{error.colno}. A truncated download or a hand edit often causes this.") from None


def read_json_lines(path: str | os.PathLike, what: str = "JSON Lines file") -> list[Any]:
    """One value per non-empty line of a JSON Lines file; a bad line raises ValueError naming the file and line."""
    import json

    values = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                values.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{os.fspath(path)}, line {number}: not valid JSON ({what}): {error.msg} at column "
                                 f"{error.colno}.") from None
    return values
