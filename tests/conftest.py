"""Shared fixtures. The tiny model bundle is built once per code version and shared between
pytest-xdist workers through a file lock (building it takes about a minute)."""

from __future__ import annotations

import fcntl
import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "test-bundles"


def _code_hash() -> str:
    h = hashlib.sha256()
    for pkg in ("model_export", "edge_client", "protocol"):
        for f in sorted((ROOT / pkg).rglob("*.py")):
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


@pytest.fixture(scope="session")
def tiny_build() -> Iterator[Path]:
    """Directory holding ``bundle/`` (tiny profile, full trainable set, int8) and ``work/``."""
    from model_export.pipeline import build
    from model_export.profiles import get_profile

    root = CACHE / _code_hash()
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "bundle" / "manifest.json").exists():
            logging.getLogger(__name__).info("building the tiny bundle in %s", root)
            build(get_profile("tiny"), root / "bundle", root / "work", evaluate=False)
        fcntl.flock(lock, fcntl.LOCK_UN)
    yield root


@pytest.fixture(scope="session")
def tiny_bundle_dir(tiny_build: Path) -> Path:
    return tiny_build / "bundle"
