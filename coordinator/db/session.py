"""Engine and sessions. SQLite runs in WAL mode with a busy timeout so that several workers
can share one file; PostgreSQL is used as is (transactions and row locks do the rest)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

__all__ = [
    "is_sqlite",
    "make_engine",
    "make_sessionmaker",
    "make_soft_engine",
    "session_scope",
    "single_statement",
]


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for ``url``; creates the SQLite file's directory if needed."""
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        if u.database and u.database != ":memory:":
            Path(u.database).parent.mkdir(parents=True, exist_ok=True)
        # One writer at a time anyway: a pool as large as uvicorn's thread pool (40) lets requests
        # queue on SQLite's busy handler (FIFO-ish, 30 s) rather than time out on the pool.
        kwargs.setdefault("pool_size", 40)
        kwargs.setdefault("max_overflow", 0)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, **kwargs)

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin_immediate(conn: Any) -> None:
            # Take the write lock at BEGIN: read-then-write transactions cannot deadlock.
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        # Let SQLAlchemy's own BEGIN be replaced by ours.
        @event.listens_for(engine, "connect")
        def _no_autobegin(dbapi_conn: Any, _: Any) -> None:
            dbapi_conn.isolation_level = None

        return engine
    kwargs.setdefault("pool_size", 10)
    kwargs.setdefault("max_overflow", 20)
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(url, **kwargs)


def make_soft_engine(engine: Engine, pool_size: int = 8) -> Engine:
    """The engine for soft-state writes (check-ins: last seen, a place in a selection pool, at
    most the closing of a selection). On PostgreSQL its connections commit without waiting for
    the WAL flush (``synchronous_commit = off``): a crash can lose the last ~0.2 s of such
    transactions, whole (never half of one), which devices recover from by checking in again,
    and the commit costs no fsync. Durable state (model versions, uploads, stage changes made by
    device messages) never goes through it. SQLite: the same engine."""
    if engine.dialect.name != "postgresql":
        return engine
    # no pre-ping: it would double the round trips of the hottest path; a dropped connection
    # fails one check-in (503, the device retries) and SQLAlchemy then invalidates the pool
    soft = create_engine(engine.url, pool_size=pool_size, max_overflow=2)

    @event.listens_for(soft, "connect")
    def _async_commit(dbapi_conn: Any, _: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("SET synchronous_commit TO OFF")
        cur.close()
        dbapi_conn.commit()

    return soft


@contextmanager
def single_statement(engine: Engine) -> Iterator[Connection]:
    """A connection for one self-contained statement: autocommit on PostgreSQL (one round
    trip: no BEGIN, no COMMIT), a short transaction on SQLite (whose BEGIN IMMEDIATE takes the
    write lock)."""
    if engine.dialect.name == "postgresql":
        with engine.execution_options(isolation_level="AUTOCOMMIT").connect() as conn:
            yield conn
    else:
        with engine.begin() as conn:
            yield conn


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One transaction: commit on success, roll back on any exception."""
    with factory() as session, session.begin():
        yield session
