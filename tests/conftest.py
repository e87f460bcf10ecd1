"""Shared fixtures. The tiny model bundle is built once per code version and shared between
pytest-xdist workers through a file lock (building it takes about a minute). Coordinator
fixtures start the real server (uvicorn over TLS on loopback) against a SQLite file or a fresh
PostgreSQL database of the test's own."""

from __future__ import annotations

import fcntl
import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import Server, fresh_pg_database, pg_available, start_server, stop_server

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


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database with a random name, dropped after the test."""
    if not pg_available():
        pytest.fail("PostgreSQL at 127.0.0.1:5432 is not reachable (the tests need it)")
    with fresh_pg_database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'coordinator.db'}"
    else:
        yield request.getfixturevalue("pg_url")


@pytest.fixture
def server(tmp_path: Path, db_url: str) -> Iterator[Server]:
    s = start_server(tmp_path, db_url)
    try:
        yield s
    finally:
        stop_server(s)


@pytest.fixture
def sqlite_server(tmp_path: Path) -> Iterator[Server]:
    s = start_server(tmp_path, f"sqlite:///{tmp_path / 'coordinator.db'}")
    try:
        yield s
    finally:
        stop_server(s)
