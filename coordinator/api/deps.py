"""Request dependencies: one transaction per request, the authenticated device, the admin."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Path, Request
from sqlalchemy.orm import Session

from coordinator.config import Settings
from coordinator.db.models import Device
from coordinator.security import secret_matches
from coordinator.services.devices import AuthError, authenticate
from coordinator.services.rounds import RoundContext

__all__ = [
    "MAX_ID",
    "AdminDep",
    "ContextDep",
    "CurrentDevice",
    "RoundIdPath",
    "SessionDep",
    "SettingsDep",
    "TaskPath",
    "VersionPath",
    "read_body",
]


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def _context(request: Request) -> RoundContext:
    ctx: RoundContext = request.app.state.ctx
    return ctx


def _session(request: Request) -> Iterator[Session]:
    """A transaction spanning the route: committed when it returns normally, *before* the
    response is sent (``scope="function"``). With FastAPI's default ("request") the commit ran
    after the response had gone out: a client could be told 200 for a write that then failed
    to commit, and SQLite's write lock was held while a download streamed."""
    factory = request.app.state.sessions
    with factory() as session, session.begin():
        yield session


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

    Inside the request's transaction the counting UPDATE held the device's row lock until the
    request ended; a slow request (a share upload in a busy round) then made every other
    writer of that row wait: the selection marking its devices, the device's own check-ins.
    A refused request still rolls back its count. SQLite has no row locks (a write transaction
    locks the whole file for its few milliseconds), so there the request's own transaction
    authenticates: one write lock per request, not two."""
    if request.app.state.engine.dialect.name != "postgresql":
        return authenticate(
            session, token=_bearer(request), rate_limit_per_minute=settings.rate_limit_per_minute
        )
    with request.app.state.soft_sessions() as auth, auth.begin():
        device = authenticate(
            auth, token=_bearer(request), rate_limit_per_minute=settings.rate_limit_per_minute
        )
    return session.merge(device, load=False)


def _admin(request: Request, settings: SettingsDep) -> None:
    if not secret_matches(_bearer(request), settings.admin_token.get_secret_value()):
        raise AuthError("wrong admin token")


CurrentDevice = Annotated[Device, Depends(_device)]
AdminDep = Annotated[None, Depends(_admin)]


class BodyTooLarge(Exception):
    """413: refused before the whole body was read."""


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) as soon as it exceeds ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"body of {declared} bytes exceeds the limit of {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
