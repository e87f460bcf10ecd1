"""Shared fixtures. The tiny model bundle is built once per code version and shared between
pytest-xdist workers through a file lock (tests.servers.tiny_build). Coordinator
fixtures start the real server (uvicorn over TLS on loopback) against a SQLite file or a fresh
PostgreSQL database of the test's own."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import servers
from tests.servers import Server, fresh_pg_database, pg_available, start_server, stop_server


@pytest.fixture(scope="session")
def tiny_build() -> Path:
    """Directory holding ``bundle/`` (tiny profile) and ``work/``: see tests.servers.tiny_build."""
    return servers.tiny_build()


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
