"""Admin API (/v1/admin, admin bearer token): tasks, rounds, versions, rollback, bundles."""

from __future__ import annotations

import tempfile
from pathlib import Path

from fastapi import APIRouter, Request, status
from pydantic import BaseModel, Field
from sqlalchemy import func, select
from starlette.concurrency import run_in_threadpool

from coordinator.api.deps import (
    AdminDep,
    ContextDep,
    RoundIdPath,
    SessionDep,
    TaskPath,
    TransactionalRoute,
    spool_body,
)
from coordinator.db.models import Device, Task
from coordinator.schemas import (
    RoundPublic,
    SelectionStats,
    TaskCreate,
    TaskPublic,
    TaskUpdate,
    VersionPublic,
)
from coordinator.services import rounds as round_service
from coordinator.services import tasks

__all__ = ["router"]

router = APIRouter(prefix="/v1/admin", tags=["admin"], route_class=TransactionalRoute)


class Rollback(BaseModel):
    version: int = Field(ge=0, le=(1 << 31) - 1)


class RoundFailure(BaseModel):
    reason: str = Field(min_length=1, max_length=300, description="recorded as the round's failure reason")


class FleetSummary(BaseModel):
    devices: int
    by_class: dict[str, int]
    by_data_bucket: dict[str, int]
    selected_at_least_once: int


@router.post("/tasks", status_code=status.HTTP_201_CREATED)
def create_task(body: TaskCreate, _: AdminDep, session: SessionDep) -> TaskPublic:
    task = tasks.create_task(session, name=body.name, config=body.config)
    return tasks.task_public(session, task)


@router.get("/tasks")
def list_tasks(_: AdminDep, session: SessionDep) -> list[TaskPublic]:
    return [tasks.task_public(session, t) for t in session.scalars(select(Task).order_by(Task.id))]


@router.get("/tasks/{name}")
def get_task(name: TaskPath, _: AdminDep, session: SessionDep) -> TaskPublic:
    return tasks.task_public(session, tasks.get_task(session, name))


@router.put("/tasks/{name}")
def update_task(name: TaskPath, body: TaskUpdate, _: AdminDep, session: SessionDep) -> TaskPublic:
    return tasks.task_public(session, tasks.update_task(session, name=name, config=body.config))


@router.post("/tasks/{name}/start")
def start(name: TaskPath, _: AdminDep, session: SessionDep) -> TaskPublic:
    return tasks.task_public(session, tasks.set_status(session, name=name, status="active"))


@router.post("/tasks/{name}/pause")
def pause(name: TaskPath, _: AdminDep, session: SessionDep) -> TaskPublic:
    return tasks.task_public(session, tasks.set_status(session, name=name, status="paused"))


@router.get("/tasks/{name}/rounds")
def rounds(name: TaskPath, _: AdminDep, session: SessionDep) -> list[RoundPublic]:
    return tasks.list_rounds(session, name=name)


@router.post("/tasks/{name}/rounds/{round_id}/fail")
def fail_round(
    name: TaskPath,
    round_id: RoundIdPath,
    body: RoundFailure,
    _: AdminDep,
    session: SessionDep,
    ctx: ContextDep,
) -> RoundPublic:
    """End an open round now (a stuck one, or one the operator does not want to commit): the
    model stays unchanged and the task opens its next round. 409 if the round is over."""
    tasks.task_round(session, name=name, round_id=round_id)
    rnd = round_service.fail_round(session, ctx, round_id=round_id, reason=body.reason)
    return tasks.round_public(rnd)


@router.get("/tasks/{name}/versions")
def versions(name: TaskPath, _: AdminDep, session: SessionDep) -> list[VersionPublic]:
    return tasks.list_versions(session, name=name)


@router.post("/tasks/{name}/rollback")
def rollback(name: TaskPath, body: Rollback, _: AdminDep, session: SessionDep) -> VersionPublic:
    tasks.rollback(session, name=name, version=body.version)
    return tasks.list_versions(session, name=name)[-1]


@router.post(
    "/tasks/{name}/bundle",
    status_code=status.HTTP_201_CREATED,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        }
    },
)
async def upload_bundle(name: TaskPath, request: Request, _: AdminDep, ctx: ContextDep) -> VersionPublic:
    """A bundle tarball (``fedkeys export build`` writes one): its weights become a new version."""
    app = request.app
    with tempfile.TemporaryDirectory() as tmp:
        tar = Path(tmp) / "bundle.tar"
        await spool_body(request, ctx.settings.max_bundle_bytes, tar)  # never whole in memory

        def work() -> VersionPublic:
            with app.state.sessions() as session, session.begin():
                tasks.upload_bundle(session, ctx.store, name=name, tarball=tar)
                return tasks.list_versions(session, name=name)[-1]

        return await run_in_threadpool(work)


@router.get("/tasks/{name}/selection")
def selection(name: TaskPath, _: AdminDep, session: SessionDep) -> SelectionStats:
    """How often the task selected devices of each data bucket and device class."""
    return tasks.selection_stats(session, name=name)


@router.get("/devices/summary")
def devices_summary(_: AdminDep, session: SessionDep) -> FleetSummary:
    by_class = dict(
        session.execute(select(Device.device_class, func.count()).group_by(Device.device_class)).all()
    )
    by_bucket = dict(
        session.execute(select(Device.data_bucket, func.count()).group_by(Device.data_bucket)).all()
    )
    total = session.scalar(select(func.count()).select_from(Device)) or 0
    selected = session.scalar(select(func.count()).select_from(Device).where(Device.participations > 0)) or 0
    return FleetSummary(
        devices=total,
        by_class={str(k): int(v) for k, v in by_class.items()},
        by_data_bucket={f"<2^{k}": int(v) for k, v in sorted(by_bucket.items())},
        selected_at_least_once=selected,
    )
