"""Files that survive interruptions: atomic writes, and the warning for a damaged cache file."""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

__all__ = ["DamagedCacheWarning", "atomic_write", "warn_damaged"]


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
