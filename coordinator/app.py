"""The FastAPI application: routes, error mapping, health, metrics and background workers.

Each worker process runs two daemon threads: the *ticker* (closes stages whose deadline
passed, opens rounds, aggregates rounds waiting for it) and the *publisher* (exports
``predict.pte`` for new versions). They coordinate with other processes only through the
database, so any number of workers and replicas can run side by side.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.to_thread
import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.types import ASGIApp, Receive, Scope, Send

from coordinator.api import admin, artifacts, devices
from coordinator.api.deps import BodyTooLarge
from coordinator.config import Settings
from coordinator.db.migrate import upgrade
from coordinator.db.models import Round, Task
from coordinator.db.session import AsyncStatement, make_engine, make_sessionmaker, make_soft_engine
from coordinator.observability import Metrics, configure_logging
from coordinator.schemas import TaskConfig
from coordinator.services.aggregate import aggregate, pending_aggregations, publish_pending
from coordinator.services.devices import AuthError, RateLimited, checkin_statement
from coordinator.services.privacy import privacy_status
from coordinator.services.rounds import (
    DONE,
    Forbidden,
    Gone,
    RoundContext,
    StageConflict,
    close_if_complete,
    open_rounds,
)
from coordinator.services.storage import ArtifactStore
from coordinator.services.tasks import Conflict, NotFound
from edge_client.bundle import BundleError
from protocol.codec import CodecError
from protocol.dp import DPError
from protocol.layout import LayoutError
from protocol.secagg.common import SecAggError
from protocol.wire import WireError

__all__ = ["create_app", "tick"]

log = logging.getLogger("coordinator.app")


def _error(status: int, reason: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": reason}, status_code=status, headers=headers)


def _install_errors(app: FastAPI) -> None:
    mapping: list[tuple[type[Exception], int]] = [
        (AuthError, 401),
        (Forbidden, 403),
        (NotFound, 404),
        (StageConflict, 409),
        (Conflict, 409),
        (Gone, 410),
        (BodyTooLarge, 413),
        (WireError, 422),
        (CodecError, 422),
        (LayoutError, 422),
        (SecAggError, 422),
        (BundleError, 422),
        (ValidationError, 422),
        (DPError, 422),
    ]
    for exc_type, code in mapping:

        def handler(request: Request, exc: Exception, code: int = code) -> JSONResponse:
            headers = {"WWW-Authenticate": "Bearer"} if code == 401 else None
            return _error(code, str(exc), headers)

        app.add_exception_handler(exc_type, handler)

    def rate_limited(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RateLimited)
        return _error(429, str(exc), {"Retry-After": str(int(exc.retry_after) + 1)})

    def conflict(request: Request, exc: Exception) -> JSONResponse:
        # two requests raced on a unique key (e.g. the same device checking in twice at once)
        return _error(409, "concurrent request on the same resource; retry")

    def busy(request: Request, exc: Exception) -> JSONResponse:
        log.warning("database busy: %s", exc)
        return _error(503, "database busy; retry", {"Retry-After": "1"})

    app.add_exception_handler(RateLimited, rate_limited)
    app.add_exception_handler(IntegrityError, conflict)
    app.add_exception_handler(OperationalError, busy)
    app.add_exception_handler(PoolTimeout, busy)  # every connection in use for pool_timeout
    app.add_exception_handler(psycopg.OperationalError, busy)  # the check-ins' asyncio connections


def tick(app: FastAPI) -> None:
    """One pass of the ticker: stage deadlines, new rounds, pending aggregations."""
    ctx: RoundContext = app.state.ctx
    factory = app.state.sessions
    with factory() as session, session.begin():
        open_rounds(session, ctx)
        ids = list(session.scalars(select(Round.id).where(Round.stage != DONE)))
    for round_id in ids:
        close_if_complete(factory, ctx, round_id, wait=True)
    with factory() as session:
        pending = pending_aggregations(session, ctx.now())
    for round_id in pending:
        aggregate(factory, ctx, round_id)
        ctx._views = None  # the round is over (committed): check-ins here see it at once


def _loop(app: FastAPI, name: str, every: float, fn: Any, stop: threading.Event) -> None:
    while not stop.wait(every):
        try:
            fn(app)
        except OperationalError as e:  # another worker holds the lock: try again next time
            log.info("%s: database busy (%s)", name, e.__class__.__name__)
        except Exception:
            log.exception("%s failed", name)


class _Timing:
    """Request latency per route (a plain ASGI middleware: Starlette's BaseHTTPMiddleware
    costs a task and a memory stream per request, about a third of a check-in)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        try:
            await self.app(scope, receive, send)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            self.metrics.request_seconds.labels(path).observe(time.perf_counter() - started)


def create_app(settings: Settings | None = None, *, background: bool = True) -> FastAPI:
    settings = settings or Settings()
    configure_logging(settings.log_json)
    engine = make_engine(settings.database_url, lock_timeout=settings.db_lock_timeout_seconds)
    upgrade(engine)
    sessions = make_sessionmaker(engine)
    soft_engine = make_soft_engine(
        engine, pool_size=settings.checkin_threads, lock_timeout=settings.db_lock_timeout_seconds
    )
    metrics = Metrics()
    store = ArtifactStore(settings.data_dir)
    ctx = RoundContext(settings=settings, store=store, metrics=metrics)
    stop = threading.Event()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.checkin_limiter = anyio.CapacityLimiter(settings.checkin_threads)
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.request_threads
        threads = []
        if background:
            threads.append(
                threading.Thread(
                    target=_loop,
                    args=(app, "ticker", settings.tick_seconds, tick, stop),
                    daemon=True,
                )
            )
            if settings.publish_predict:
                threads.append(
                    threading.Thread(
                        target=_loop,
                        args=(
                            app,
                            "publisher",
                            max(settings.tick_seconds, 1.0),
                            lambda a: publish_pending(a.state.sessions, a.state.ctx),
                            stop,
                        ),
                        daemon=True,
                    )
                )
        for t in threads:
            t.start()
        # Everything imported and built so far lives as long as the process: move it out of the
        # collector's reach. A full collection over it (~190k objects: FastAPI, pydantic,
        # SQLAlchemy, numpy) stalled the worker's event loop for 110-170 ms on a 2-core box,
        # every few seconds under load: most of the check-ins' p99.
        gc.collect()
        gc.freeze()
        yield
        stop.set()
        for t in threads:
            t.join(timeout=5)
        if app.state.checkin_statement is not None:
            await app.state.checkin_statement.close()
        engine.dispose()
        soft_engine.dispose()

    app = FastAPI(
        title="fedkeys coordinator",
        version="1",
        description="Schedules eligible devices and runs secure, compressed federated rounds.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessions = sessions
    app.state.soft_engine = soft_engine
    app.state.soft_sessions = make_sessionmaker(soft_engine)
    app.state.checkin_statement = (
        AsyncStatement(
            soft_engine, checkin_statement(), settings.checkin_threads, settings.db_lock_timeout_seconds
        )
        if soft_engine.dialect.name == "postgresql"
        else None
    )
    app.state.ctx = ctx
    _install_errors(app)
    app.include_router(devices.router)
    app.include_router(artifacts.router)
    app.include_router(admin.router)

    app.add_middleware(_Timing, metrics=metrics)

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"])
    def readyz() -> JSONResponse:
        """The database answers."""
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except OperationalError:
            return _error(503, "database unavailable")
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", tags=["ops"], response_class=PlainTextResponse)
    def prometheus() -> PlainTextResponse:
        # the privacy budget lives in the database: read at scrape time, so every worker agrees
        with sessions() as session:
            for task in session.scalars(select(Task)).all():
                cfg = TaskConfig.model_validate(task.config)
                st = privacy_status(session, task, cfg)
                if st is not None:
                    metrics.epsilon_spent.labels(task.name).set(st.epsilon_spent)
                    if st.target_epsilon is not None:
                        metrics.epsilon_target.labels(task.name).set(st.target_epsilon)
        return PlainTextResponse(generate_latest(metrics.registry).decode(), media_type=CONTENT_TYPE_LATEST)

    _ = RequestValidationError  # FastAPI answers 422 for request validation by itself
    return app
