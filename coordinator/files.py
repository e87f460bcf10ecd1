"""Files written whole or not at all, owner-only from their first byte (the coordinator's
artifacts and its secrets alike)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write", "write_open"]


def _write_temp(path: Path, data: bytes) -> Path:
    """``data`` in a new owner-only file next to ``path`` (``mkstemp``: 0600 from its first
    byte), flushed to disk; the caller renames it into place (or removes it on error)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``path`` whole or not at all (a temporary file renamed over it), owner-only."""
    tmp = _write_temp(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_open(path: Path, data: bytes) -> BinaryIO:
    """:func:`atomic_write`, with the file opened for reading before the rename: the reader
    holds the file before anyone else can see (or evict) it."""
    tmp = _write_temp(path, data)
    try:
        reader = open(tmp, "rb")  # noqa: SIM115 - the caller closes it
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return reader
