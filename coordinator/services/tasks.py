"""Training tasks: creation, configuration, start/pause, bundles, versions and rollback."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from coordinator.db.models import Device, ModelVersion, Participant, Round, Task
from coordinator.schemas import (
    RoundPublic,
    SelectionBucket,
    SelectionStats,
    TaskConfig,
    TaskPublic,
    VersionPublic,
)
from coordinator.services.privacy_budget import check as check_privacy
from coordinator.services.privacy_budget import privacy_status, refusal
from coordinator.services.storage import ArtifactStore
from protocol.wire import RoundKind

__all__ = [
    "Conflict",
    "NotFound",
    "create_task",
    "get_task",
    "list_rounds",
    "list_versions",
    "rollback",
    "selection_stats",
    "set_status",
    "task_public",
    "update_task",
    "upload_bundle",
]


class NotFound(Exception):
    """404: no such task, round or version."""


class Conflict(Exception):
    """409: the request contradicts the current state."""


def _now() -> datetime:
    return datetime.now(UTC)


def get_task(session: Session, name: str, *, lock: bool = False) -> Task:
    stmt = select(Task).where(Task.name == name)
    if lock:
        stmt = stmt.with_for_update()
    task = session.scalars(stmt).one_or_none()
    if task is None:
        raise NotFound(f"no task named {name!r}")
    return task


def task_public(session: Session, task: Task) -> TaskPublic:
    started = session.scalar(select(func.count()).select_from(Round).where(Round.task_id == task.id)) or 0
    cfg = TaskConfig.model_validate(task.config)
    return TaskPublic(
        name=task.name,
        status=task.status,
        status_reason=task.status_reason,
        current_version=task.current_version,
        rounds_started=started,
        config=cfg,
        created_at=task.created_at,
        privacy=privacy_status(session, task, cfg),
    )


def create_task(session: Session, *, name: str, config: TaskConfig) -> Task:
    if session.scalars(select(Task).where(Task.name == name)).one_or_none() is not None:
        raise Conflict(f"task {name!r} exists already")
    check_privacy(config)
    now = _now()
    task = Task(
        name=name,
        status="paused",
        config=config.model_dump(mode="json"),
        created_at=now,
        updated_at=now,
    )
    session.add(task)
    session.flush()
    return task


def update_task(session: Session, *, name: str, config: TaskConfig) -> Task:
    task = get_task(session, name, lock=True)
    check_privacy(config)
    task.config = config.model_dump(mode="json")
    task.updated_at = _now()
    return task


def set_status(session: Session, *, name: str, status: str) -> Task:
    task = get_task(session, name, lock=True)
    if status == "active" and task.current_version is None:
        raise Conflict(f"task {name!r} has no model yet: upload a bundle first")
    if status == "active":
        reason = refusal(session, task, TaskConfig.model_validate(task.config))
        if reason is not None:
            raise Conflict(f"task {name!r} cannot start: {reason}")
    task.status_reason = None
    task.status = status
    task.updated_at = _now()
    return task


def upload_bundle(session: Session, store: ArtifactStore, *, name: str, tarball: Path) -> ModelVersion:
    """A new model version from a bundle's own weights (the initial model, or a re-base)."""
    task = get_task(session, name, lock=True)
    bundle = store.add_bundle(tarball)
    latest = session.scalar(select(func.max(ModelVersion.version)).where(ModelVersion.task_id == task.id))
    version = 0 if latest is None else latest + 1
    weights_file, sha = store.save_weights(task.name, version, bundle.initial_weights())
    mv = ModelVersion(
        task_id=task.id,
        version=version,
        created_at=_now(),
        source="initial",
        round_id=None,
        parent_version=task.current_version,
        weights_file=weights_file,
        weights_sha256=sha,
        bundle_dir=bundle.root.name,
        predict_file=str(bundle.path(bundle.manifest.predict.program).relative_to(store.root)),
        predict_sha256=bundle.manifest.predict.program.sha256,
        metrics={k: v for k, v in bundle.manifest.metrics.items() if k.startswith("student.")},
    )
    session.add(mv)
    task.current_version = version
    task.updated_at = _now()
    session.flush()
    return mv


def rollback(session: Session, *, name: str, version: int) -> ModelVersion:
    """Make an earlier version current again, as a new version (history is never rewritten)."""
    task = get_task(session, name, lock=True)
    target = session.scalars(
        select(ModelVersion).where(ModelVersion.task_id == task.id, ModelVersion.version == version)
    ).one_or_none()
    if target is None:
        raise NotFound(f"task {name!r} has no version {version}")
    latest = session.scalar(select(func.max(ModelVersion.version)).where(ModelVersion.task_id == task.id))
    mv = ModelVersion(
        task_id=task.id,
        version=(latest or 0) + 1,
        created_at=_now(),
        source="rollback",
        round_id=None,
        parent_version=target.version,
        weights_file=target.weights_file,
        weights_sha256=target.weights_sha256,
        bundle_dir=target.bundle_dir,
        predict_file=target.predict_file,
        predict_sha256=target.predict_sha256,
        metrics=dict(target.metrics),
    )
    session.add(mv)
    task.current_version = mv.version
    task.updated_at = _now()
    session.flush()
    return mv


def round_public(r: Round) -> RoundPublic:
    return RoundPublic(
        id=r.id,
        number=r.number,
        kind=r.kind,
        stage=r.stage,
        outcome=r.outcome,
        failure_reason=r.failure_reason,
        base_version=r.base_version,
        new_version=r.new_version,
        selection_target=r.selection_target,
        selected=r.selected,
        reported=r.reported,
        bytes_in=r.bytes_in,
        bytes_out=r.bytes_out,
        created_at=r.created_at,
        finished_at=r.finished_at,
        metrics=r.metrics,
    )


def list_rounds(session: Session, *, name: str, limit: int = 100) -> list[RoundPublic]:
    task = get_task(session, name)
    rounds = session.scalars(
        select(Round).where(Round.task_id == task.id).order_by(Round.number.desc()).limit(limit)
    ).all()
    return [round_public(r) for r in rounds]


def task_round(session: Session, *, name: str, round_id: int) -> Round:
    """Round ``round_id`` of task ``name`` (404 if the task has no such round)."""
    task = get_task(session, name)
    rnd = session.get(Round, round_id)
    if rnd is None or rnd.task_id != task.id:
        raise NotFound(f"task {name!r} has no round {round_id}")
    return rnd


def list_versions(session: Session, *, name: str) -> list[VersionPublic]:
    task = get_task(session, name)
    rows = session.execute(
        select(ModelVersion, Round.number)
        .outerjoin(Round, Round.id == ModelVersion.round_id)
        .where(ModelVersion.task_id == task.id)
        .order_by(ModelVersion.version)
    ).all()
    return [
        VersionPublic(
            version=mv.version,
            source=mv.source,
            round_number=number,
            parent_version=mv.parent_version,
            created_at=mv.created_at,
            weights_sha256=mv.weights_sha256,
            predict_published=mv.predict_file is not None,
            metrics=mv.metrics,
        )
        for mv, number in rows
    ]


def selection_stats(session: Session, *, name: str) -> SelectionStats:
    """Selections of the task per data bucket and per device class (the fairness view)."""
    task = get_task(session, name)
    cfg = TaskConfig.model_validate(task.config)
    rounds = session.scalar(
        select(func.count()).select_from(Round).where(Round.task_id == task.id, Round.kind == RoundKind.TRAIN)
    )
    buckets = []
    for stratum, col in (("data_bucket", Device.data_bucket), ("device_class", Device.device_class)):
        enrolled = dict(session.execute(select(col, func.count()).group_by(col)).all())
        picked = session.execute(
            select(col, func.count(func.distinct(Participant.device_id)), func.count())
            .select_from(Participant)
            .join(Round, Round.id == Participant.round_id)
            .join(Device, Device.id == Participant.device_id)
            .where(Round.task_id == task.id, Round.kind == RoundKind.TRAIN)
            .group_by(col)
        ).all()
        got = {k: (int(a), int(b)) for k, a, b in picked}
        for value in sorted(enrolled, key=str):
            devs, sel = got.get(value, (0, 0))
            buckets.append(
                SelectionBucket(
                    stratum=stratum,
                    value=f"<2^{value}" if stratum == "data_bucket" else str(value),
                    devices=int(enrolled[value]),
                    devices_selected=devs,
                    selections=sel,
                )
            )
    return SelectionStats(strategy=cfg.selection.strategy, rounds=int(rounds or 0), buckets=buckets)
