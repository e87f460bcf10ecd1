"""Request dependencies: one transaction per request, the authenticated device, the admin."""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path as FilePath
from typing import Annotated, Any

import anyio.to_thread
from fastapi import Depends, Path, Request
from fastapi.routing import APIRoute
from sqlalchemy.orm import Session

from coordinator.config import Settings
from coordinator.db.models import Device
from coordinator.security import secret_matches
from coordinator.services.devices import AuthError, authenticate
from coordinator.services.rounds import RoundContext

__all__ = [
    "MAX_ID",
    "AdminDep",
    "BodyTooLarge",
    "ContextDep",
    "CurrentDevice",
    "RoundIdPath",
    "SessionDep",
    "SettingsDep",
    "TaskPath",
    "TransactionalRoute",
    "VersionPath",
    "WrongBodySize",
    "read_body",
    "spool_body",
]


# ``async``: FastAPI runs a plain ``def`` dependency in a worker thread, and these only read
# the app's state: a thread hop each (a queue handoff and two switches of the interpreter lock)
# cost more than the request's own work in most device routes.
async def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def _context(request: Request) -> RoundContext:
    ctx: RoundContext = request.app.state.ctx
    return ctx


def _session(request: Request) -> Iterator[Session]:
    """A transaction spanning the route, committed by the route's own thread when its function
    returns (:class:`TransactionalRoute`) and at the latest here, *before* the response is sent
    (``scope="function"``). With FastAPI's default ("request") the commit ran after the
    response had gone out: a client could be told 200 for a write that then failed to commit,
    and SQLite's write lock was held while a download streamed."""
    factory = request.app.state.sessions
    with factory() as session:
        try:
            yield session
        except BaseException:
            session.rollback()
            raise
        session.commit()


def _commit_in_thread(endpoint: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(endpoint)
    def run(**kwargs: Any) -> Any:
        sessions = [v for v in kwargs.values() if isinstance(v, Session)]
        try:
            result = endpoint(**kwargs)
        except BaseException:
            for session in sessions:
                session.rollback()
            raise
        for session in sessions:
            session.commit()
        return result

    return run


class TransactionalRoute(APIRoute):
    """A route whose plain-``def`` endpoint commits its request session in its own thread.

    FastAPI ends a function-scoped dependency (the session's transaction) only after the
    endpoint's response has been validated, and for a plain ``def`` endpoint it validates in
    another request thread. The transaction, and on SQLite the database's write lock taken at
    its BEGIN IMMEDIATE, was then held while the request waited for a free thread, and every
    thread could be waiting in BEGIN IMMEDIATE for that lock: the worker stalled until SQLite's
    busy timeout failed them all (a 1,065-device population stopped in its first round)."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        if not inspect.iscoroutinefunction(endpoint):
            endpoint = _commit_in_thread(endpoint)
        super().__init__(path, endpoint, **kwargs)


MAX_ID = (1 << 31) - 1  # ids and versions are 32-bit integer columns
RoundIdPath = Annotated[int, Path(ge=1, le=MAX_ID, description="round id")]
VersionPath = Annotated[int, Path(ge=0, le=MAX_ID, description="model version")]
TaskPath = Annotated[str, Path(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$", description="task name")]

SettingsDep = Annotated[Settings, Depends(_settings)]
ContextDep = Annotated[RoundContext, Depends(_context)]
SessionDep = Annotated[Session, Depends(_session, scope="function")]


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token or len(token) > 512:
        raise AuthError("missing bearer token")
    return token.strip()


def _device(request: Request, session: SessionDep, settings: SettingsDep) -> Device:
    """The device, authenticated (and counted against its rate limit) in a short transaction
    of its own, then attached to the request's session without a query.

    Inside the request's transaction the counting UPDATE held the device's row lock (PostgreSQL)
    or the whole file's write lock (SQLite) from this dependency's thread until the route's
    thread had run and the request ended. On PostgreSQL a slow request (a share upload in a busy
    round) made every other writer of that row wait; on SQLite the route then waited for a
    free request thread while every thread waited in BEGIN IMMEDIATE for the lock it held: the
    worker stalled until the busy timeout failed them all. A refused request still rolls back
    its count."""
    with request.app.state.soft_sessions() as auth, auth.begin():
        device = authenticate(
            auth, token=_bearer(request), rate_limit_per_minute=settings.rate_limit_per_minute
        )
    return session.merge(device, load=False)


async def _admin(request: Request, settings: SettingsDep) -> None:
    if not secret_matches(_bearer(request), settings.admin_token.get_secret_value()):
        raise AuthError("wrong admin token")


CurrentDevice = Annotated[Device, Depends(_device)]
AdminDep = Annotated[None, Depends(_admin)]


class BodyTooLarge(Exception):
    """413: refused before the whole body was read."""


class WrongBodySize(Exception):
    """422: the body is not the exact size the route expects (``read_body(exact=...)``)."""


_SPOOL_CHUNK = 1 << 20  # bytes gathered before each write of a spooled body


async def _checked_chunks(request: Request, limit: int, exact: int | None) -> AsyncIterator[bytes]:
    """The body's chunks as they arrive, refused as soon as they are not what is expected."""
    declared = request.headers.get("content-length")
    size_declared = int(declared) if declared is not None and declared.isdigit() else None
    if size_declared is not None and size_declared > limit:
        raise BodyTooLarge(f"body of {size_declared} bytes exceeds the limit of {limit}")
    if exact is not None:
        if exact > limit:
            raise BodyTooLarge(f"the expected body of {exact} bytes exceeds the limit of {limit}")
        if size_declared is None:
            raise WrongBodySize(f"declare Content-Length: {exact} (the size this route expects)")
        if size_declared > exact:
            raise BodyTooLarge(f"body of {size_declared} bytes; this route expects exactly {exact}")
        if size_declared != exact:
            raise WrongBodySize(f"body of {size_declared} bytes; this route expects exactly {exact}")
        limit = exact
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"body exceeds the limit of {limit} bytes")
        yield chunk
    if exact is not None and size != exact:
        raise WrongBodySize(f"body of {size} bytes; this route expects exactly {exact}")


async def read_body(request: Request, limit: int, *, exact: int | None = None) -> bytes:
    """The request body, refusing (413) as soon as it exceeds ``limit`` bytes.

    With ``exact`` (a route that knows the size it expects, e.g. the update of the device's
    round) the request must declare ``Content-Length: exact`` (422 otherwise, 413 if larger),
    checked before a byte is read, and the streamed body must have that size: a client that
    does not send what the route expects is refused before the route buffers anything.
    """
    return b"".join([chunk async for chunk in _checked_chunks(request, limit, exact)])


async def spool_body(request: Request, limit: int, dest: FilePath) -> int:
    """Write the request body to ``dest`` as it arrives (refused like :func:`read_body`) and
    return its size: a body of up to ``limit`` bytes (a bundle: gigabytes) never sits in
    memory whole. Writes run in a worker thread, a MiB at a time."""
    size = 0
    pending = bytearray()
    with dest.open("wb") as f:
        async for chunk in _checked_chunks(request, limit, None):
            pending += chunk
            size += len(chunk)
            if len(pending) >= _SPOOL_CHUNK:
                await anyio.to_thread.run_sync(f.write, bytes(pending))
                pending.clear()
        await anyio.to_thread.run_sync(f.write, bytes(pending))
    return size
