"""Real coordinator processes for tests and benchmarks: uvicorn over TLS on a free loopback port,
against a SQLite file or a fresh PostgreSQL database of its own (see the fixtures in conftest.py)."""

from __future__ import annotations

import fcntl
import hashlib
import logging
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from coordinator.launch import LocalCoordinator, free_port, start_local, stop_local

__all__ = [
    "PG_ADMIN",
    "Server",
    "free_port",
    "fresh_pg_database",
    "pg_available",
    "start_server",
    "stop_server",
    "tiny_build",
]

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"
ROOT = Path(__file__).resolve().parents[1]
TINY_CACHE = ROOT / ".cache" / "test-bundles"


def _code_hash() -> str:
    h = hashlib.sha256()
    for pkg in ("model_export", "edge_client", "protocol"):
        for f in sorted((ROOT / pkg).rglob("*.py")):
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def tiny_build() -> Path:
    """Directory holding ``bundle/`` (tiny profile, full trainable set, int8) and ``work/``.

    Built once per version of the code that shapes it and shared between pytest-xdist workers
    and benchmarks through a file lock (building it takes about a minute).
    """
    from model_export.pipeline import build
    from model_export.profiles import get_profile

    root = TINY_CACHE / _code_hash()
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "bundle" / "manifest.json").exists():
            logging.getLogger(__name__).info("building the tiny bundle in %s", root)
            build(get_profile("tiny"), root / "bundle", root / "work", evaluate=False)
        fcntl.flock(lock, fcntl.LOCK_UN)
    return root


def pg_available() -> bool:
    try:
        import psycopg

        with psycopg.connect(PG_ADMIN, connect_timeout=3):
            return True
    except Exception:
        return False


@contextmanager
def fresh_pg_database() -> Iterator[str]:
    """A PostgreSQL database with a random name (CI reuses the server), dropped afterwards."""
    import psycopg

    name = f"fedkeys_test_{secrets.token_hex(6)}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')


Server = LocalCoordinator


def start_server(tmp: Path, db_url: str, **kw: Any) -> Server:
    """A coordinator for a test: see coordinator.launch.start_local (same keywords)."""
    return start_local(tmp, db_url, ready_timeout=60, **kw)


stop_server = stop_local


if __name__ == "__main__":  # `python -m tests.servers`: the tiny bundle's path (built if needed)
    import contextlib
    import sys

    with contextlib.redirect_stdout(sys.stderr):  # the build's progress is not the answer
        path = tiny_build() / "bundle"
    print(path)
