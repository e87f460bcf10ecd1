"""Artifact downloads for devices: bundles, weights of a version (or the compressed delta
from an earlier one), published ``predict.pte``. sha256 ETags, ``If-None-Match`` and ``Range``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import FileResponse
from sqlalchemy import select

from coordinator.api.deps import (
    ContextDep,
    CurrentDevice,
    SessionDep,
    TaskPath,
    VersionPath,
)
from coordinator.db.models import ModelVersion, Task
from coordinator.services.tasks import NotFound

__all__ = ["router"]

router = APIRouter(prefix="/v1", tags=["artifacts"])


def _file(request: Request, path: Path, sha256: str, media_type: str, ctx: ContextDep) -> Response:
    etag = f'"{sha256}"'
    if etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]:
        return Response(status_code=304, headers={"ETag": etag})
    ctx.metrics.bytes_out.labels(media_type).inc(path.stat().st_size)
    return FileResponse(
        path,
        media_type=media_type,
        headers={"ETag": etag, "Cache-Control": "private, max-age=31536000, immutable"},
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
    base: Annotated[int | None, Query(ge=0, description="a version the device holds: send the delta")] = None,
) -> Response:
    """Raw little-endian float32 weights; with ``base``, the XOR delta (zlib) from that version."""
    mv = _version(session, task, version)
    if base is None or base == version:
        return _file(
            request,
            ctx.store.path(mv.weights_file),
            mv.weights_sha256,
            "application/octet-stream",
            ctx,
        )
    old = _version(session, task, base)
    path = ctx.store.delta(task, version, base, mv.weights_file, old.weights_file)
    return _file(request, path, ctx.store.sha256_of(path), "application/x-fedkeys-xor-delta", ctx)


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
