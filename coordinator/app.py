"""The FastAPI application: routes, error mapping, health, metrics and background workers.

Each worker process runs two daemon threads: the *ticker* (closes stages whose deadline
passed, opens rounds, aggregates rounds waiting for it) and the *publisher* (exports
``predict.pte`` for new versions). They coordinate with other processes only through the
database, so any number of workers and replicas can run side by side.
"""

from __future__ import annotations

import gc
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Sequence
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
from sqlalchemy import exists, select, text
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from coordinator.api import admin, artifacts, devices, enrollment
from coordinator.api.deps import BodyTooLarge, WrongBodySize
from coordinator.api.guard import BodyGuard, route_rules
from coordinator.api.longpoll import StatusWatch
from coordinator.config import Settings
from coordinator.db.migrate import upgrade
from coordinator.db.models import Round, Task
from coordinator.db.session import AsyncStatement, make_engine, make_sessionmaker, make_soft_engine
from coordinator.observability import Metrics, configure_logging
from coordinator.profiling import CURRENT, RouteCpu, install_thread_meter, metered
from coordinator.schemas import TaskConfig
from coordinator.services.aggregate import STALE_CLAIM, aggregate, pending_aggregations, publish_pending
from coordinator.services.devices import AuthError, RateLimited, checkin_statement
from coordinator.services.privacy_budget import privacy_status
from coordinator.services.rounds import (
    Forbidden,
    Gone,
    RoundContext,
    StageConflict,
    close_if_complete,
    current_views,
    open_rounds,
    utc,
)
from coordinator.services.storage import ArtifactStore
from coordinator.services.tasks import Conflict, NotFound
from protocol.bundle import BundleError
from protocol.codec import CodecError
from protocol.dp import DPError
from protocol.layout import LayoutError
from protocol.secagg.common import SecAggError
from protocol.version import __version__
from protocol.wire import Stage, WireError

__all__ = ["create_app", "tick"]

log = logging.getLogger("coordinator.app")

BACKGROUND_CONNECTIONS = 6
"""Database connections a worker keeps beyond its request threads': the ticker (deadlines,
closes, aggregation), the round view's refresh and the admin's reads."""


def _error(status: int, reason: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": reason}, status_code=status, headers=headers)


_MAX_ERRORS = 20  # validation errors listed in an answer
_MAX_TEXT = 200  # characters of an error's message (a location part: 64)


def public_errors(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """``loc``, ``msg`` and ``type`` of each validation error, shortened: never the input
    (FastAPI's default echoes it: it may be a megabyte, bytes that are not UTF-8, or a float
    JSON cannot render, NaN, which made every such answer a 500), nor ``ctx`` or ``url``."""
    return [
        {
            "loc": [p if isinstance(p, int) else str(p)[:64] for p in e.get("loc", ())],
            "msg": str(e.get("msg", ""))[:_MAX_TEXT],
            "type": str(e.get("type", ""))[:64],
        }
        for e in list(errors)[:_MAX_ERRORS]
    ]


def _install_errors(app: FastAPI) -> None:
    mapping: list[tuple[type[Exception], int]] = [
        (AuthError, 401),
        (Forbidden, 403),
        (NotFound, 404),
        (StageConflict, 409),
        (Conflict, 409),
        (Gone, 410),
        (BodyTooLarge, 413),
        (WrongBodySize, 422),
        (WireError, 422),
        (CodecError, 422),
        (LayoutError, 422),
        (SecAggError, 422),
        (BundleError, 422),
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

    def invalid_request(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return JSONResponse({"detail": public_errors(exc.errors())}, status_code=422)

    def invalid(request: Request, exc: Exception) -> JSONResponse:
        # a model validated inside a route (a stored config, a message read back)
        assert isinstance(exc, ValidationError)
        errors = public_errors(exc.errors(include_url=False, include_context=False, include_input=False))
        where = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or exc.title}: {e['msg']}" for e in errors)
        return _error(422, f"invalid {exc.title}: {where}")

    def disconnected(request: Request, exc: Exception) -> JSONResponse:
        return _error(400, "the client disconnected before its body ended")  # nobody reads it

    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(ValidationError, invalid)
    app.add_exception_handler(ClientDisconnect, disconnected)
    app.add_exception_handler(RateLimited, rate_limited)
    app.add_exception_handler(IntegrityError, conflict)
    app.add_exception_handler(OperationalError, busy)
    app.add_exception_handler(PoolTimeout, busy)  # every connection in use for pool_timeout
    app.add_exception_handler(psycopg.OperationalError, busy)  # the check-ins' asyncio connections


def _open_round_rows(session: Session) -> list[Any]:
    """(id, stage, deadline, aggregation claim) of every open round: the ticker's look."""
    return list(
        session.execute(
            select(Round.id, Round.stage, Round.stage_deadline, Round.claimed_at).where(
                Round.stage != Stage.DONE
            )
        )
    )


def tick(app: FastAPI) -> None:
    """One pass of the ticker: stage deadlines, new rounds, pending aggregations.

    Most ticks find nothing to do, and each worker ticks several times a second, so a tick
    first reads only what decides it: the open rounds' stages and deadlines, and whether an
    active task has no open round (only then does it take the locking path that opens one).
    A round being aggregated is the worker's that claimed it: the ticker leaves it alone. A
    selection before its deadline is closed by the check-in that fills its pool, or here when
    concurrent joins each counted the pool before the others committed (one count a tick)."""
    ctx: RoundContext = app.state.ctx
    factory = app.state.sessions
    with factory() as session, session.begin():
        if session.scalar(select(_ACTIVE_WITHOUT_ROUND)):
            open_rounds(session, ctx)
        rows = _open_round_rows(session)
    now = ctx.now()
    moved = False
    for round_id, stage, _, _ in rows:
        if stage == Stage.AGGREGATING:
            continue
        moved |= close_if_complete(factory, ctx, round_id, wait=True)
    if moved:  # a close may have made an aggregation due
        with factory() as session:
            pending = pending_aggregations(session, ctx.now())
    else:
        stale = now - STALE_CLAIM
        pending = [
            round_id
            for round_id, stage, _, claimed in rows
            if stage == Stage.AGGREGATING and (claimed is None or utc(claimed) < stale)
        ]
    for round_id in pending:
        aggregate(factory, ctx, round_id)
        ctx.forget_views()  # the round is over (committed): check-ins here see it at once


_ACTIVE_WITHOUT_ROUND = (
    exists()
    .where(Task.status == "active")
    .where(~exists().where(Round.task_id == Task.id, Round.stage != Stage.DONE))
)
"""An active task has no open round (the ticker opens one)."""


def _loop(app: FastAPI, name: str, every: float, fn: Any, stop: threading.Event) -> None:
    cpu: RouteCpu | None = app.state.route_cpu
    while not stop.wait(every):
        started = time.thread_time()
        try:
            fn(app)
        except OperationalError as e:  # another worker holds the lock: try again next time
            log.info("%s: database busy (%s)", name, e.__class__.__name__)
        except Exception:
            log.exception("%s failed", name)
        finally:
            if cpu is not None:
                cpu.add(f"({name})", time.thread_time() - started)


def _log_route_cpu(app: FastAPI) -> None:
    """Log this worker's CPU time per route (coordinator.profiling)."""
    log.info(app.state.route_cpu.report(), extra={"event": "route cpu"})


class _Timing:
    """Request latency per route (a plain ASGI middleware: Starlette's BaseHTTPMiddleware
    costs a task and a memory stream per request, about a third of a check-in)."""

    def __init__(self, app: ASGIApp, metrics: Metrics, cpu: RouteCpu | None = None) -> None:
        self.app = app
        self.metrics = metrics
        self.cpu = cpu  # CPU time per route too (coordinator.profiling), when it is on

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        acc: list[float] | None = None
        try:
            if self.cpu is None:
                await self.app(scope, receive, send)
            else:
                acc = []
                token = CURRENT.set(acc)
                try:
                    await metered(self.app(scope, receive, send), acc)
                finally:
                    CURRENT.reset(token)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            self.metrics.request_seconds.labels(path).observe(time.perf_counter() - started)
            if self.cpu is not None and acc is not None:
                self.cpu.add(f"{scope.get('method', '')} {path}", sum(acc))


class PrivacyGauges:
    """The per-task privacy gauges of ``/metrics``, read from the database at most once every
    ``every`` seconds per worker (``Settings.metrics_refresh_seconds``).

    ``/metrics`` stays open, as Prometheus scrapes it (no token to configure), but then anyone
    can call it as often as they like: reading the budget costs a query per task plus a run of
    the privacy accountant, so each scrape did that work for whoever asked. Now a scrape
    between refreshes costs no query; when the values are due, one scrape refreshes them and
    concurrent ones serve the values they find. A budget changes once per round, so values
    up to ``every`` seconds old (15 by default, a common scrape interval) lose nothing."""

    def __init__(self, sessions: sessionmaker[Session], metrics: Metrics, every: float) -> None:
        self.sessions = sessions
        self.metrics = metrics
        self.every = every
        self.refreshed = -math.inf  # time.monotonic() of the last refresh
        self._lock = threading.Lock()

    def refresh(self) -> None:
        if time.monotonic() - self.refreshed < self.every or not self._lock.acquire(blocking=False):
            return
        try:
            if time.monotonic() - self.refreshed < self.every:
                return  # another scrape refreshed them while this one was on its way
            with self.sessions() as session:
                for task in session.scalars(select(Task)).all():
                    cfg = TaskConfig.model_validate(task.config)
                    st = privacy_status(session, task, cfg)
                    if st is not None:
                        self.metrics.epsilon_spent.labels(task.name).set(st.epsilon_spent)
                        if st.target_epsilon is not None:
                            self.metrics.epsilon_target.labels(task.name).set(st.target_epsilon)
            self.refreshed = time.monotonic()
        finally:
            self._lock.release()


def create_app(settings: Settings | None = None, *, background: bool = True) -> FastAPI:
    settings = settings or Settings()
    configure_logging(settings.log_json)
    engine = make_engine(
        settings.database_url,
        lock_timeout=settings.db_lock_timeout_seconds,
        connections=settings.request_threads + BACKGROUND_CONNECTIONS,
    )
    upgrade(engine)
    sessions = make_sessionmaker(engine)
    soft_engine = make_soft_engine(
        engine, pool_size=settings.checkin_threads, lock_timeout=settings.db_lock_timeout_seconds
    )
    metrics = Metrics()
    route_cpu = RouteCpu() if settings.route_cpu_log_seconds > 0 else None
    if route_cpu is not None:
        install_thread_meter()
    store = ArtifactStore(settings.data_dir)
    ctx = RoundContext(settings=settings, store=store, metrics=metrics)
    stop = threading.Event()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.checkin_limiter = anyio.CapacityLimiter(settings.checkin_threads)
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.request_threads
        threads = []
        if route_cpu is not None:
            threads.append(
                threading.Thread(
                    target=_loop,
                    args=(app, "route cpu", settings.route_cpu_log_seconds, _log_route_cpu, stop),
                    daemon=True,
                )
            )
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
        version=__version__,
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
    app.state.route_cpu = route_cpu
    app.state.status_watch = StatusWatch(
        ctx, lambda: current_views(app.state.soft_sessions, ctx), cpu=route_cpu
    )
    _install_errors(app)
    app.include_router(devices.router)
    app.include_router(artifacts.router)
    app.include_router(admin.router)
    app.include_router(enrollment.router)  # enrolment codes, device revocation (admin)

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

    gauges = PrivacyGauges(sessions, metrics, settings.metrics_refresh_seconds)
    app.state.privacy_gauges = gauges

    @app.get("/metrics", tags=["ops"], response_class=PlainTextResponse)
    def prometheus() -> PlainTextResponse:
        """Prometheus metrics, without authentication; the privacy gauges are cached
        (:class:`PrivacyGauges`), so a scrape costs no query."""
        gauges.refresh()
        return PlainTextResponse(generate_latest(metrics.registry).decode(), media_type=CONTENT_TYPE_LATEST)

    # after every route: the guard derives each route's body rule from them
    rules = route_rules(
        app.routes,
        json_limit=settings.max_json_body_bytes,
        binary={
            ("PUT", "/v1/rounds/{round_id}/update"): settings.max_body_bytes,
            ("POST", "/v1/admin/tasks/{name}/bundle"): settings.max_bundle_bytes,
        },
    )
    app.add_middleware(BodyGuard, rules=rules)
    app.add_middleware(_Timing, metrics=metrics, cpu=route_cpu)  # outermost: times refused requests too
    return app
