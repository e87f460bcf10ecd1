"""Keeping the device process's resident memory small: glibc's allocator, torch's import.

glibc serves large blocks with ``mmap`` and returns them to the system when they are freed, but
its threshold for "large" adapts: after a freed block of N bytes it rises to N (up to 32 MB), so
the round's multi-megabyte temporaries (downloads, weight vectors, the codec's work arrays) end
up in the heap, where freed memory stays resident until the heap's top is free. A fixed
threshold keeps every block of 1 MB or more in its own mapping; :func:`trim` gives free heap
pages back after a round. Elsewhere (musl, macOS) both are no-ops.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import mmap
import os
import sys
import types
from collections.abc import Sequence
from functools import cache
from typing import Any

__all__ = [
    "MMAP_THRESHOLD",
    "defer_torch_registrations",
    "peak_rss_mb",
    "release_pages",
    "rss_mb",
    "trim",
    "tune_allocator",
]

log = logging.getLogger(__name__)

MMAP_THRESHOLD = 1 << 20  # blocks of at least this many bytes get their own mapping
_M_TRIM_THRESHOLD = -1  # mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3


@cache
def _libc() -> Any:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError, TypeError):
        return None  # not glibc
    return libc


def tune_allocator(mmap_threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold (and trim free heap above 4 MB). True if applied."""
    libc = _libc()
    if libc is None:
        return False
    ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold))
    ok &= bool(libc.mallopt(_M_TRIM_THRESHOLD, 4 * mmap_threshold))
    if not ok:
        log.debug("mallopt refused the allocator settings")
    return ok


def trim() -> None:
    """Return free heap pages to the system (after a round's big temporaries are gone)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def release_pages(vec: Any) -> None:
    """Drop the pages of a memory-mapped array (or a view of one) from this process's resident
    set: they stay in the page cache and are read back on the next access. A no-op for an
    ordinary array."""
    base = vec
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None) if not isinstance(base, memoryview) else base.obj
    if isinstance(base, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
        base.madvise(mmap.MADV_DONTNEED)


def _status_mb(key: str) -> float:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def rss_mb() -> float:
    """Resident set size of this process now (MB; NaN where /proc is missing)."""
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MB)."""
    return _status_mb("VmHWM")


# torch's own import registers Python "meta" kernels (shape functions for tracing, export and
# torch.compile) and GPU kernel overrides: about 18 MB that a device, which only runs
# ExecuTorch programs and a few eager CPU ops, never uses.
_DEFERRED_TORCH_MODULES = ("torch._meta_registrations", "torch._native")


class _DeferredFinder(importlib.abc.MetaPathFinder):
    """Loads the named modules lazily: they run on their first attribute access, not at import."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = frozenset(names)

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.names:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = importlib.util.LazyLoader(spec.loader)
        return spec


def defer_torch_registrations() -> bool:
    """Make ``import torch`` skip its tracing-only registrations (device processes only).

    Call it before torch is imported, in a process that never traces, exports or compiles
    (``fedkeys client``): those need the meta kernels. Eager CPU ops, ExecuTorch programs and
    ``torch.from_numpy`` are unaffected. ``FEDKEYS_FULL_TORCH=1`` turns it off. True if applied.
    """
    if "torch" in sys.modules or os.environ.get("FEDKEYS_FULL_TORCH") == "1":
        return False
    if not any(isinstance(f, _DeferredFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _DeferredFinder(_DEFERRED_TORCH_MODULES))
    return True
