"""Artifact downloads for devices: bundles, weights of a version (or the compressed delta
from one of the few versions before it), published ``predict.pte``. sha256 ETags,
``If-None-Match`` and ``Range`` (not for deltas).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, BinaryIO

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import FileResponse, StreamingResponse
from sqlalchemy import select
from starlette.background import BackgroundTask

from coordinator.api.deps import (
    MAX_ID,
    ContextDep,
    CurrentDevice,
    SessionDep,
    TaskPath,
    TransactionalRoute,
    VersionPath,
)
from coordinator.db.models import ModelVersion, Task
from coordinator.services.rounds import Gone
from coordinator.services.storage import OpenDelta
from coordinator.services.tasks import NotFound

__all__ = ["router"]

router = APIRouter(prefix="/v1", tags=["artifacts"], route_class=TransactionalRoute)


_IMMUTABLE = "private, max-age=31536000, immutable"


def _not_modified(request: Request, etag: str) -> bool:
    return etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]


def _file(request: Request, path: Path, sha256: str, media_type: str, ctx: ContextDep) -> Response:
    etag = f'"{sha256}"'
    if _not_modified(request, etag):
        return Response(status_code=304, headers={"ETag": etag})
    ctx.metrics.bytes_out.labels(media_type).inc(path.stat().st_size)
    return FileResponse(path, media_type=media_type, headers={"ETag": etag, "Cache-Control": _IMMUTABLE})


def _chunks(f: BinaryIO) -> Iterator[bytes]:
    with f:
        while chunk := f.read(1 << 16):
            yield chunk


def _delta(request: Request, delta: OpenDelta, ctx: ContextDep) -> Response:
    """A cached delta, streamed from the descriptor :meth:`ArtifactStore.open_delta` opened
    (the cache may evict its file meanwhile). No ``Range``: a device decodes a delta as it
    arrives, and a retry starts over."""
    media_type = "application/x-fedkeys-xor-delta"
    etag = f'"{delta.sha256}"'
    if _not_modified(request, etag):
        delta.file.close()
        return Response(status_code=304, headers={"ETag": etag})
    ctx.metrics.bytes_out.labels(media_type).inc(delta.size)
    return StreamingResponse(
        _chunks(delta.file),
        media_type=media_type,
        headers={"ETag": etag, "Cache-Control": _IMMUTABLE, "Content-Length": str(delta.size)},
        background=BackgroundTask(delta.file.close),  # also when the client left before the body
    )


def _version(session: SessionDep, task: TaskPath, version: int) -> ModelVersion:
    mv = session.scalars(
        select(ModelVersion)
        .join(Task, Task.id == ModelVersion.task_id)
        .where(Task.name == task, ModelVersion.version == version)
    ).one_or_none()
    if mv is None:
        raise NotFound(f"task {task!r} has no version {version}")
    return mv


@router.get("/bundles/{bundle}.tar", response_class=FileResponse)
def bundle_tarball(bundle: str, request: Request, _device: CurrentDevice, ctx: ContextDep) -> Response:
    if len(bundle) != 64 or any(c not in "0123456789abcdef" for c in bundle):
        raise NotFound("no such bundle")
    if not (ctx.store.root / "bundles" / bundle).is_dir():
        raise NotFound("no such bundle")
    tar = ctx.store.bundle_tarball(bundle)
    return _file(request, tar, ctx.store.sha256_of(tar), "application/x-tar", ctx)


@router.get("/tasks/{task}/versions/{version}/weights", response_class=FileResponse)
def weights(
    task: TaskPath,
    version: VersionPath,
    request: Request,
    _device: CurrentDevice,
    session: SessionDep,
    ctx: ContextDep,
    base: Annotated[
        int | None,
        Query(
            ge=0,
            le=MAX_ID,
            description="a version the device holds, one of the last few before this one: send the delta",
        ),
    ] = None,
) -> Response:
    """Raw little-endian float32 weights; with ``base``, the XOR delta (zlib) from that version.

    Deltas are served only from the ``delta_max_base_age`` versions of the task just before
    ``version``: an older (or unknown, or newer) base answers 410 and the device downloads the
    whole vector. That bounds the pairs any device can make the coordinator compute; the
    computed deltas are cached on disk within ``delta_cache_max_files``/``_bytes``."""
    mv = _version(session, task, version)
    if base is None or base == version:
        return _file(
            request,
            ctx.store.path(mv.weights_file),
            mv.weights_sha256,
            "application/octet-stream",
            ctx,
        )
    settings = ctx.settings
    recent = session.scalars(
        select(ModelVersion)
        .where(ModelVersion.task_id == mv.task_id, ModelVersion.version < version)
        .order_by(ModelVersion.version.desc())
        .limit(settings.delta_max_base_age)
    ).all()
    old = next((v for v in recent if v.version == base), None)
    if old is None:
        raise Gone(
            f"no delta from version {base}: deltas are served only from the last "
            f"{settings.delta_max_base_age} versions before {version}; download the whole vector"
        )
    delta = ctx.store.open_delta(
        task,
        version,
        base,
        mv.weights_file,
        old.weights_file,
        max_files=settings.delta_cache_max_files,
        max_bytes=settings.delta_cache_max_bytes,
    )
    return _delta(request, delta, ctx)


@router.get("/tasks/{task}/versions/{version}/predict.pte", response_class=FileResponse)
def predict(
    task: TaskPath,
    version: VersionPath,
    request: Request,
    _device: CurrentDevice,
    session: SessionDep,
    ctx: ContextDep,
) -> Response:
    mv = _version(session, task, version)
    if mv.predict_file is None or mv.predict_sha256 is None:
        raise NotFound(f"predict.pte of version {version} is not published yet")
    return _file(request, ctx.store.path(mv.predict_file), mv.predict_sha256, "application/octet-stream", ctx)


@router.get("/tasks/{task}/current")
def current(task: TaskPath, _device: CurrentDevice, session: SessionDep) -> dict[str, int | str | None]:
    """The task's current version and the newest one with a published ``predict.pte``."""
    t = session.scalars(select(Task).where(Task.name == task)).one_or_none()
    if t is None:
        raise NotFound(f"no task named {task!r}")
    published = session.scalar(
        select(ModelVersion.version)
        .where(ModelVersion.task_id == t.id, ModelVersion.predict_file.is_not(None))
        .order_by(ModelVersion.version.desc())
        .limit(1)
    )
    return {"task": t.name, "current_version": t.current_version, "published_version": published}
