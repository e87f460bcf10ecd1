"""Engine and sessions. SQLite runs in WAL mode with a busy timeout so that several workers
can share one file; PostgreSQL is used as is (transactions and row locks do the rest)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

from sqlalchemy import ClauseElement, Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.compiler import SQLCompiler

__all__ = [
    "AsyncStatement",
    "is_sqlite",
    "make_engine",
    "make_sessionmaker",
    "make_soft_engine",
    "session_scope",
    "single_statement",
]


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


# How long a statement may wait for a lock by default (``Settings.db_lock_timeout_seconds``).
LOCK_TIMEOUT_SECONDS = 10.0


def make_engine(
    url: str, *, lock_timeout: float = LOCK_TIMEOUT_SECONDS, connections: int | None = None, **kwargs: Any
) -> Engine:
    """An engine for ``url``; creates the SQLite file's directory if needed. On PostgreSQL a
    statement waits at most ``lock_timeout`` seconds for a lock (then LockNotAvailable), and
    the pool keeps ``connections`` open (the caller's threads that use it at once; default 10,
    with 20 more opened when needed and closed when returned).

    A coordinator worker passes its request threads and then some: with 24 request threads and
    a pool that kept 10, a round's bursts of device requests opened and closed connections all
    the time (a connection's start-up and teardown showed in the workers' profile, and each is a
    new PostgreSQL backend)."""
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
    kwargs.setdefault("pool_size", 10 if connections is None else connections)
    kwargs.setdefault("max_overflow", 20 if connections is None else 4)
    kwargs.setdefault("pool_pre_ping", True)
    if u.get_backend_name() == "postgresql":
        kwargs.setdefault("connect_args", {"options": lock_timeout_option(lock_timeout)})
    return create_engine(url, **kwargs)


def lock_timeout_option(seconds: float) -> str:
    """libpq ``options`` that bound every statement's wait for a lock (PostgreSQL)."""
    return f"-c lock_timeout={max(1, round(seconds * 1000))}"


def make_soft_engine(
    engine: Engine, pool_size: int = 8, lock_timeout: float = LOCK_TIMEOUT_SECONDS
) -> Engine:
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
    soft = create_engine(
        engine.url,
        pool_size=pool_size,
        max_overflow=2,
        connect_args={"options": lock_timeout_option(lock_timeout)},
    )

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


class AsyncStatement:
    """One SQL statement on a few asyncio connections of the running event loop (PostgreSQL,
    psycopg's async API; autocommit and ``synchronous_commit = off`` like
    :func:`make_soft_engine`).

    The check-in's one statement runs here rather than in a worker thread: the hop to a thread
    and back, SQLAlchemy's execution layer and the GIL hand-over between the threads cost about
    as much CPU as the statement itself. Connections open on first use (at most ``size``;
    psycopg prepares the statement on the server after a few executions) and belong to the
    event loop that opened them: a new loop (a test client's) starts afresh. A connection
    that fails is closed and replaced on the next call; the error propagates (``psycopg``'s
    OperationalError: the app answers 503).
    """

    def __init__(
        self,
        engine: Engine,
        statement: ClauseElement,
        size: int,
        lock_timeout: float = LOCK_TIMEOUT_SECONDS,
    ) -> None:
        if engine.dialect.name != "postgresql":
            raise ValueError("AsyncStatement needs PostgreSQL")
        compiled = cast("SQLCompiler", statement.compile(dialect=engine.dialect))
        self.sql = compiled.string
        # the statement's own constants (the named parameters come with each call)
        self._literals = {
            k: b.value for k, b in compiled.binds.items() if not b.required and f"%({k})s" in self.sql
        }
        self._conninfo = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        self.size = size
        self._options = lock_timeout_option(lock_timeout)
        self._idle: list[Any] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._slots: asyncio.Semaphore | None = None

    async def _connect(self) -> Any:
        import psycopg

        conn = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True, options=self._options)
        await conn.execute("SET synchronous_commit TO OFF")
        return conn

    async def fetchone(self, params: Mapping[str, Any]) -> tuple[Any, ...] | None:
        """Execute with ``params``; the first row of the result (or None)."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._loop, self._slots, self._idle = loop, asyncio.Semaphore(self.size), []
        assert self._slots is not None
        async with self._slots:
            conn = self._idle.pop() if self._idle else await self._connect()
            try:
                cur = await conn.execute(self.sql, {**self._literals, **params})
                row = await cur.fetchone()
            except BaseException:
                await conn.close()
                raise
            self._idle.append(conn)
            return cast("tuple[Any, ...] | None", row)

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.close()
