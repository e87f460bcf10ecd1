"""Rounds: check-in and selection, the secure-aggregation stages, deadlines, aggregation.

Every mutation of a round locks its row (``SELECT ... FOR UPDATE`` on PostgreSQL; SQLite
transactions take the database write lock at BEGIN), so several workers and replicas can serve
the same round: a stage closes once, a device is selected once (primary key of
``participants``), an upload is counted once (the participant's stage only moves forward).
All state a round needs is in its row (plan, secure-aggregation server state with the running
sum), so a restarted coordinator continues where the database says it was.

Flow of a training round with secure aggregation:

    selecting -> advertise_keys -> share_keys -> masked_input -> unmask -> aggregating -> done

without secure aggregation ``selecting -> upload -> aggregating -> done``, and an evaluation
round ``selecting -> evaluating -> done``. Devices that miss a stage's deadline are dropped;
too few left and the round fails with the model unchanged.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import random
import secrets
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import numpy.typing as npt
from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session

from coordinator.config import Settings
from coordinator.db.models import (
    Candidate,
    Device,
    EvalReport,
    ModelVersion,
    Participant,
    Round,
    RoundUpload,
    Task,
)
from coordinator.observability import Metrics, log_event
from coordinator.privacy import PrivacyPlan
from coordinator.schemas import DeadlineSettings, TaskConfig
from coordinator.selection import Candidate as SelectionCandidate
from coordinator.selection import SelectionPolicy
from coordinator.selection import select as select_devices
from coordinator.services.privacy import charge, current_clip, privacy_plan, refusal
from coordinator.services.storage import ArtifactStore
from protocol.codec import (
    CodecError,
    CodecParams,
    check_update_norm,
    encoded_length,
    packed_size,
    ring_bits,
)
from protocol.secagg.common import MIN_DEVICES, SecAggError, secagg_params_for
from protocol.secagg.server import SecAggServer
from protocol.wire import (
    API_PREFIX,
    HEADER_SIZE,
    AdvertiseKeys,
    ArtifactRef,
    CheckinResponse,
    DeviceState,
    EvalCounts,
    MaskedInputRequest,
    RoundPlan,
    RoundStatus,
    SecAggParams,
    ShareKeys,
    ShareKeysRequest,
    Stage,
    TrainingPlan,
    TrainReport,
    UnmaskRequest,
    UnmaskResponse,
    UpdateKind,
    WireError,
    peek_header,
    unpack_dense_update,
    unpack_sparse_update,
    unpack_update,
    verify_update,
)

__all__ = [
    "AGGREGATING",
    "DONE",
    "DROPPED",
    "EVALUATING",
    "RETRYABLE",
    "SELECTED",
    "SELECTING",
    "UPLOAD",
    "Forbidden",
    "Gone",
    "RoundContext",
    "StageConflict",
    "Views",
    "advance",
    "advertise",
    "answer_from_view",
    "check_upload",
    "checkin",
    "close_if_complete",
    "current_views",
    "evaluation",
    "fail_after_error",
    "fail_round",
    "fresh_views",
    "inbound_shares",
    "join_pool",
    "open_rounds",
    "plain_sum",
    "plan_for",
    "quiet_enough",
    "report",
    "roster",
    "share_keys",
    "status_of",
    "unmask",
    "unmask_request",
    "unmask_responses",
    "upload",
    "view_moved",
]

log = logging.getLogger("coordinator.rounds")

# round stages (the secure-aggregation ones are protocol.wire.Stage values)
SELECTING = "selecting"
UPLOAD = "upload"
EVALUATING = "evaluating"
AGGREGATING = "aggregating"
DONE = "done"
SELECTION_PATIENCE = 10  # selection windows a round waits for enough eligible devices
# participant stages besides the completed round stage names
SELECTED = "selected"
DROPPED = "dropped"
EVALUATED = "evaluated"


RETRYABLE = (OperationalError, PoolTimeout)
"""Errors of a busy or briefly unreachable database: the work is retried, the round kept."""


class StageConflict(Exception):
    """409: the request does not fit the round's current stage or this device's part in it."""


class Gone(Exception):
    """410: the round is over (or went on without this device)."""


class Forbidden(Exception):
    """403: the device was not selected for this round."""


@dataclass(frozen=True)
class RoundView:
    """What a check-in needs to know about a task's open round (cached for a moment)."""

    round_id: int
    task_id: int
    task: str
    number: int
    kind: str
    stage: str
    stage_deadline: datetime
    created_at: datetime
    selection_target: int
    cfg: TaskConfig
    candidate_rate: float
    recent_durations: tuple[float, ...]  # seconds of the task's last finished rounds


@dataclass
class RoundContext:
    settings: Settings
    store: ArtifactStore
    metrics: Metrics
    now: Callable[[], datetime] = lambda: datetime.now(UTC)
    jitter: random.Random = field(default_factory=random.Random)  # pace-steering spread
    view_ttl: float = 0.5  # seconds a worker reuses its view of the open rounds
    _views: Views | None = None
    _configs: dict[tuple[int, float], TaskConfig] = field(default_factory=dict)
    _durations: dict[int, tuple[float, ...]] = field(default_factory=dict)
    # parsed secure-aggregation state per (round, stage, stage start): see _snapshot
    _secagg: OrderedDict[tuple[int, str, float], SecAggServer] = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _refreshing: threading.Lock = field(default_factory=threading.Lock)
    _view_hop: bool = False  # a long poll of this worker's event loop is refreshing the view


def _utc(dt: datetime) -> datetime:
    """SQLite returns naive datetimes: they are UTC."""
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def _ts(dt: datetime) -> float:
    return _utc(dt).timestamp()


def _cfg(task: Task) -> TaskConfig:
    return TaskConfig.model_validate(task.config)


# ----------------------------------------------------------------------------------------
# Opening rounds and the round plan
# ----------------------------------------------------------------------------------------


def _codec_params(plan: dict[str, Any]) -> CodecParams | None:
    raw = plan.get("codec")
    return None if raw is None else CodecParams.model_validate(raw)


def _secagg_params(plan: dict[str, Any]) -> SecAggParams | None:
    raw = plan.get("secagg")
    return None if raw is None else SecAggParams.model_validate(raw)


def _version(session: Session, task: Task, version: int) -> ModelVersion:
    return session.scalars(
        select(ModelVersion).where(ModelVersion.task_id == task.id, ModelVersion.version == version)
    ).one()


def _open_round(session: Session, ctx: RoundContext, task: Task) -> Round | None:
    """Create the task's next round (the task row is locked by the caller)."""
    cfg = _cfg(task)
    if task.current_version is None:
        return None
    trained = (
        session.scalar(
            select(func.count()).select_from(Round).where(Round.task_id == task.id, Round.kind == "train")
        )
        or 0
    )
    number = task.next_round
    kind = "evaluate" if cfg.eval_every_rounds and number % (cfg.eval_every_rounds + 1) == 0 else "train"
    if kind == "train" and cfg.max_rounds is not None and trained >= cfg.max_rounds:
        task.status = "paused"
        log_event(log, "task finished its rounds", task=task.name)
        return None
    now = ctx.now()
    mv = _version(session, task, task.current_version)
    bundle = ctx.store.bundle(mv.bundle_dir)
    layout = bundle.manifest.train.layout
    target = cfg.selection_size if kind == "train" else cfg.eval_clients
    codec: CodecParams | None = None
    dp_plan: PrivacyPlan | None = None
    if kind == "train" and cfg.codec.compress:
        codec = CodecParams(
            clip_norm=current_clip(session, task, cfg),
            rotate=cfg.codec.rotate,
            keep_fraction=cfg.codec.keep_fraction,
            bits=cfg.codec.bits,
            max_clients=target,
            range_factor=cfg.codec.range_factor,
            weight_cap=cfg.codec.weight_cap,
            rotation_block=cfg.codec.rotation_block,
            count_slot=cfg.privacy.enabled and cfg.privacy.adaptive_clip,
            seed=secrets.token_bytes(32),
        )
        if cfg.privacy.enabled:
            try:
                dp_plan = privacy_plan(cfg, codec, layout.size)
            except ValueError as e:  # DPError too; create/update refuse such settings already
                task.status = "paused"
                task.status_reason = f"privacy settings cannot be honoured: {e}"
                log_event(log, "task paused", task=task.name, reason=task.status_reason)
                return None
            reason = refusal(session, task, cfg, next_z=dp_plan.z)
            if reason is not None:
                task.status = "paused"
                task.status_reason = reason
                log_event(log, "task paused", task=task.name, reason=reason)
                return None
            codec = codec.model_copy(
                update={"noise_std": dp_plan.device_std, "count_noise_std": dp_plan.device_count_std}
            )
            try:
                ring_bits(codec)
            except CodecError as e:
                task.status = "paused"
                task.status_reason = f"the round's noise does not fit the ring: {e}"
                log_event(log, "task paused", task=task.name, reason=task.status_reason)
                return None
    rnd = Round(
        task_id=task.id,
        number=number,
        kind=kind,
        stage=SELECTING,
        base_version=mv.version,
        plan={},
        created_at=now,
        stage_started_at=now,
        stage_deadline=now + timedelta(seconds=cfg.deadlines.selection),
        selection_target=target,
        metrics={} if dp_plan is None or codec is None else {"dp": _dp_metrics(dp_plan, codec)},
    )
    session.add(rnd)
    task.next_round = number + 1
    session.flush()  # the round id goes into the secure-aggregation parameters
    plan: dict[str, Any] = {
        "task": task.name,
        "kind": kind,
        "model_version": mv.version,
        "bundle_dir": mv.bundle_dir,
        "weights_file": mv.weights_file,
        "weights_sha256": mv.weights_sha256,
        "layout_hash": layout.hash(),
        "dim": layout.size,
        "clients_per_round": cfg.clients_per_round,
        "min_reports": cfg.min_reports if kind == "train" else 1,
        "training": cfg.training.model_dump(),
        "deadlines": cfg.deadlines.model_dump(),
        "codec": None,
        "secagg": None,
        # drawn here from the OS CSPRNG, not derived from the round id: nobody can predict (and
        # enrol identities to game) which of a selection's candidates it takes
        "selection_seed": secrets.token_hex(32),
    }
    if dp_plan is not None:
        plan["dp"] = dp_plan.to_json()
    if codec is not None:
        plan["codec"] = codec.model_dump(mode="json")
        if cfg.secagg.enabled:
            sec = secagg_params_for(
                codec,
                layout.size,
                round_id=rnd.id,
                graph_seed=secrets.token_bytes(32),
                degree=cfg.secagg.neighbours,
                threshold=cfg.secagg.threshold,
                min_devices=max(MIN_DEVICES, cfg.min_reports),
                dropout=cfg.secagg.design_dropout(cfg.over_selection),
            )
            plan["secagg"] = sec.model_dump(mode="json")
    rnd.plan = plan
    log_event(log, "round opened", task=task.name, round=rnd.id, stage=SELECTING, version=mv.version)
    return rnd


def _dp_metrics(dp: PrivacyPlan, codec: CodecParams) -> dict[str, Any]:
    return {
        "mode": dp.mode,
        "adjacency": dp.adjacency,
        "noise_multiplier": dp.z,
        "sampling_rate": dp.q,
        "clip_norm": codec.clip_norm,
        "noise_std_levels": dp.z_update * dp.sensitivity,
    }


def open_rounds(session: Session, ctx: RoundContext) -> list[Round]:
    """The open round of every active task, opening new ones where none is open."""
    out = []
    for task in session.scalars(select(Task).where(Task.status == "active").order_by(Task.id)).all():
        rnd = session.scalars(
            select(Round).where(Round.task_id == task.id, Round.stage != DONE).order_by(Round.id)
        ).first()
        if rnd is None:
            session.refresh(task, with_for_update=True)
            if task.status != "active":
                continue
            rnd = session.scalars(
                select(Round).where(Round.task_id == task.id, Round.stage != DONE)
            ).first() or _open_round(session, ctx, task)
        if rnd is not None:
            out.append(rnd)
    return out


@dataclass(frozen=True)
class Views:
    """A worker's snapshot of the open rounds and who takes part in them."""

    taken: float  # time.monotonic() of the snapshot
    rounds: list[RoundView]
    assigned: dict[str, tuple[int, str, str]]  # device -> (round id, kind, task) of its open round


def round_views(session: Session, ctx: RoundContext) -> Views:
    """The open rounds of active tasks and their live participants, read now.

    Check-ins are answered from this per-worker snapshot for ``view_ttl`` seconds: a
    participant gets its assignment, between rounds everyone else a ``retry_after``, ineligible
    devices a reason (soft state: every decision that changes a round reads and locks the
    database; an eligible device joining a selection pool re-reads the round's stage, which
    also hands its assignment to a device selected since the snapshot). A refresh is two or
    three queries; task configurations and round histories are parsed once per version.
    """
    mono = time.monotonic()
    rows = session.execute(
        select(Round, Task)
        .join(Task, Task.id == Round.task_id)
        .where(Round.stage != DONE)
        .order_by(Round.task_id, Round.id)
    ).all()
    first: dict[int, tuple[Round, Task]] = {}
    for rnd, task in rows:
        first.setdefault(task.id, (rnd, task))
    active = session.scalars(select(Task.id).where(Task.status == "active")).all()
    if any(t not in first for t in active):  # a task needs its next round: the locking path
        opened = {r.task_id: r for r in open_rounds(session, ctx)}
        for tid, rnd in opened.items():
            got = session.get(Task, tid)
            if tid not in first and got is not None:
                first[tid] = (rnd, got)
    views = []
    for tid in sorted(first):
        rnd, task = first[tid]
        if task.status != "active":
            continue
        views.append(
            RoundView(
                round_id=rnd.id,
                task_id=task.id,
                task=task.name,
                number=rnd.number,
                kind=rnd.kind,
                stage=rnd.stage,
                stage_deadline=_utc(rnd.stage_deadline),
                created_at=_utc(rnd.created_at),
                selection_target=rnd.selection_target,
                cfg=_cached_cfg(ctx, task),
                candidate_rate=float((rnd.metrics or {}).get("candidate_rate", 0.0)),
                recent_durations=_recent_durations(session, ctx, rnd),
            )
        )
    assigned: dict[str, tuple[int, str, str]] = {}
    if any(rnd.stage != SELECTING for rnd, _ in rows):
        for device_id, round_id, kind, task_name in session.execute(
            select(Participant.device_id, Round.id, Round.kind, Task.name)
            .join(Round, Round.id == Participant.round_id)
            .join(Task, Task.id == Round.task_id)
            .where(Round.stage != DONE, Participant.stage != DROPPED)
            .order_by(Round.id)
        ).tuples():
            assigned[device_id] = (round_id, kind, task_name)  # the newest round wins
    snap = Views(mono, views, assigned)
    ctx._views = snap
    return snap


def _cached_cfg(ctx: RoundContext, task: Task) -> TaskConfig:
    """The task's configuration, validated once per update of the task."""
    key = (task.id, _ts(task.updated_at))
    cfg = ctx._configs.get(key)
    if cfg is None:
        cfg = _cfg(task)
        if len(ctx._configs) > 64:
            ctx._configs.clear()
        ctx._configs[key] = cfg
    return cfg


def _recent_durations(session: Session, ctx: RoundContext, rnd: Round) -> tuple[float, ...]:
    """Seconds of the task's last five finished rounds (fixed while ``rnd`` is open)."""
    got = ctx._durations.get(rnd.id)
    if got is None:
        recent = session.execute(
            select(Round.created_at, Round.finished_at)
            .where(Round.task_id == rnd.task_id, Round.finished_at.is_not(None))
            .order_by(Round.id.desc())
            .limit(5)
        ).all()
        got = tuple((_utc(f) - _utc(c)).total_seconds() for c, f in recent if f is not None)
        if len(ctx._durations) > 64:
            ctx._durations.clear()
        ctx._durations[rnd.id] = got
    return got


def plan_for(session: Session, ctx: RoundContext, rnd: Round) -> RoundPlan:
    """The device-facing plan of a round. Artifact URLs are paths (``/v1/...``): a device joins
    them to the coordinator origin it was configured with, so neither a request's ``Host``
    header nor a TLS-terminating proxy can make it send its token anywhere else."""
    p = rnd.plan
    bundle = ctx.store.bundle(p["bundle_dir"])
    tar = ctx.store.bundle_tarball(p["bundle_dir"])
    task = p["task"]
    version = p["model_version"]
    mv = session.scalars(
        select(ModelVersion).join(Task).where(Task.name == task, ModelVersion.version == version)
    ).one()
    predict = None
    if mv.predict_file and mv.predict_sha256:
        predict = ArtifactRef(
            url=f"{API_PREFIX}/tasks/{task}/versions/{version}/predict.pte",
            sha256=mv.predict_sha256,
            size=ctx.store.path(mv.predict_file).stat().st_size,
        )
    training = TrainingPlan.model_validate(
        {
            k: p["training"][k]
            for k in ("optimizer", "lr", "momentum", "local_steps", "max_seconds", "max_examples")
        }
    )
    return RoundPlan(
        round_id=rnd.id,
        task=task,
        kind=rnd.kind,
        model_version=version,
        bundle=ArtifactRef(
            url=f"{API_PREFIX}/bundles/{p['bundle_dir']}.tar",
            sha256=ctx.store.sha256_of(tar),
            size=tar.stat().st_size,
        ),
        weights=ArtifactRef(
            url=f"{API_PREFIX}/tasks/{task}/versions/{version}/weights",
            sha256=p["weights_sha256"],
            size=4 * bundle.manifest.train.layout.size,
        ),
        predict=predict,
        layout_hash=p["layout_hash"],
        training=training if rnd.kind == "train" else None,
        codec=_codec_params(p),
        secagg=_secagg_params(p),
        stage_deadline=_ts(rnd.stage_deadline),
    )


# ----------------------------------------------------------------------------------------
# Check-in: eligibility, candidates, pace steering
# ----------------------------------------------------------------------------------------


def _version_tuple(v: str) -> tuple[int, ...]:
    core = v.split("+", maxsplit=1)[0].split("-", maxsplit=1)[0]
    return tuple(int(x) for x in core.split(".")[:3] if x.isdigit())


def eligibility(cfg: TaskConfig, state: DeviceState) -> str | None:
    """None when the device may take part now, else the reason it may not."""
    pol = cfg.eligibility
    if pol.require_charging and not state.charging:
        return "not charging"
    if pol.require_idle and not state.idle:
        return "not idle"
    if pol.require_unmetered and not state.unmetered:
        return "metered network"
    if state.battery_pct < pol.min_battery_pct:
        return "battery low"
    if state.free_storage_mb < pol.min_free_storage_mb:
        return "storage low"
    if state.examples < pol.min_examples:
        return "too few local examples"
    if _version_tuple(state.client_version) < _version_tuple(pol.min_client_version):
        return "client too old"
    if pol.device_classes is not None and state.device_class not in pol.device_classes:
        return "device class not in the task's population"
    return None


def _retry(ctx: RoundContext, seconds: float, reason: str, spread: float = 0.0) -> CheckinResponse:
    s = ctx.settings
    value = min(max(seconds + ctx.jitter.uniform(0, spread), s.min_retry_seconds * 0.5), s.max_retry_seconds)
    return CheckinResponse(action="retry", retry_after=round(value, 3), reason=reason)


def _pace(ctx: RoundContext, view: RoundView, reason: str = "no round needs devices now") -> CheckinResponse:
    """retry_after for a device while the open round needs nobody.

    The next selection starts when this round ends: devices come back when the shortest of
    the recent rounds would have ended (or after the remaining deadlines when there is no
    history), and again closer to the end if it has not come yet. Check-ins are spread
    uniformly over half the time the last selection's pool took to fill.
    """
    now = ctx.now()
    cfg = view.cfg
    elapsed = (now - view.created_at).total_seconds()
    if view.recent_durations:
        # the earliest plausible end (the shortest recent round): a device back before the end
        # is paced again, closer to it; aiming at the median left every round that ended
        # early waiting seconds for its pool (rounds here vary 10-45 s)
        remaining = min(view.recent_durations) - elapsed
    else:
        remaining = (view.stage_deadline - now).total_seconds() + cfg.deadlines.unmask
    rate = view.candidate_rate
    pool = view.selection_target * cfg.selection_pool
    # Spread returns over half the time the pool took to fill at the last selection's arrival
    # rate, never wider than a selection window: a large fleet (high rate) is spread over at
    # least a second; a small one, whose returning devices are about one pool, sees its window
    # halve from round to round instead of staying at whatever spread it once had.
    window = min(max(0.5 * pool / rate, 1.0) if rate > 0 else 5.0, cfg.deadlines.selection)
    return _retry(ctx, max(remaining, ctx.settings.min_retry_seconds), reason, window)


def fresh_views(ctx: RoundContext) -> Views | None:
    """The worker's round view if it is younger than ``view_ttl`` (else None)."""
    snap = ctx._views
    return snap if snap is not None and time.monotonic() - snap.taken < ctx.view_ttl else None


def current_views(sessions: Callable[[], Session], ctx: RoundContext) -> Views:
    """The worker's round view, refreshed when older than ``view_ttl``: one thread refreshes,
    the others answer from the previous view meanwhile."""
    snap = fresh_views(ctx)
    if snap is None:
        snap = ctx._views
        if ctx._refreshing.acquire(blocking=snap is None):
            try:
                now = fresh_views(ctx)  # refreshed while this thread waited for the lock?
                if now is not None:
                    snap = now
                else:
                    with sessions() as session, session.begin():
                        snap = round_views(session, ctx)
            finally:
                ctx._refreshing.release()
        assert snap is not None
    return snap


def view_moved(snap: Views, round_id: int, since: str, device_id: str) -> bool | None:
    """Whether the view shows round ``round_id`` past stage ``since`` or the device out of it;
    None when the round is not in the view (each task's view holds its first open round
    only): then only the database can tell."""
    for view in snap.rounds:
        if view.round_id == round_id:
            if view.stage != since:
                return True
            mine = snap.assigned.get(device_id)
            return since != SELECTING and (mine is None or mine[0] != round_id)
    return None


def checkin(
    sessions: Callable[[], Session],
    ctx: RoundContext,
    *,
    device_id: str,
    last_round_number: int,
    state: DeviceState,
) -> CheckinResponse:
    """One check-in: the device's own round if it is in one, a place in a selecting round's
    pool if it is eligible, otherwise a ``retry_after``. The device row was already updated
    (last check-in, versions) by :func:`coordinator.services.devices.checkin_statement`.

    Answered from the worker's round view where it can be (participants, pace steering,
    ineligible devices: no transaction at all); only joining a selection pool writes."""
    answer = answer_from_view(
        current_views(sessions, ctx),
        ctx,
        device_id=device_id,
        last_round_number=last_round_number,
        state=state,
    )
    if isinstance(answer, CheckinResponse):
        return answer
    return join_pool(sessions, ctx, answer, device_id, state)


def answer_from_view(
    snap: Views, ctx: RoundContext, *, device_id: str, last_round_number: int, state: DeviceState
) -> CheckinResponse | RoundView:
    """What a check-in gets from the worker's round view alone (no database): an answer, or the
    selecting round whose pool this eligible device joins (:func:`join_pool`)."""
    mine = snap.assigned.get(device_id)
    if mine is not None:
        round_id, kind, task_name = mine
        return CheckinResponse(
            action="evaluate" if kind == "evaluate" else "train", round_id=round_id, task=task_name
        )
    idle = ctx.settings.idle_retry_seconds
    if not snap.rounds:
        return _retry(ctx, idle * 0.5, "no active task", idle)
    for view in snap.rounds:
        cfg = view.cfg
        pol = cfg.eligibility
        if pol.device_classes is not None and state.device_class not in pol.device_classes:
            continue
        if view.stage != SELECTING:
            return _pace(ctx, view)
        if last_round_number == view.number:
            # The device row says it was selected for this very round: the view predates the
            # selection's end (another worker closed it, or a refresh raced the close). The pool
            # path re-reads the round and hands over the assignment; judging the device by this
            # view would send a selected device away for a cooldown it is not in.
            return view
        reason = eligibility(cfg, state)
        if reason is None and last_round_number >= view.number - cfg.cooldown_rounds:
            # back when this round ends (paced like the devices this round does not need),
            # not after the idle retry: a one-round cooldown must not bench a device for minutes
            return _pace(ctx, view, "cooling down after a recent round")
        if reason is not None:
            return _retry(ctx, idle * 0.5, reason, idle)
        return view
    return _retry(ctx, idle * 0.5, "not in any task's population", idle)


def join_pool(
    sessions: Callable[[], Session], ctx: RoundContext, view: RoundView, device_id: str, state: DeviceState
) -> CheckinResponse:
    """An eligible device joins a selecting round's pool (one short transaction)."""
    with sessions() as session, session.begin():
        return _join_pool(session, ctx, view, device_id, state)


def _join_pool(
    session: Session, ctx: RoundContext, view: RoundView, device_id: str, state: DeviceState
) -> CheckinResponse:
    """An eligible device in a selecting round's pool; closes the selection when it is full."""
    now = ctx.now()
    cfg = view.cfg
    stage = session.scalar(select(Round.stage).where(Round.id == view.round_id))
    if stage != SELECTING:  # the view is older than the selection's end
        ctx._views = None
        part = session.get(Participant, (view.round_id, device_id))
        if part is not None and part.stage != DROPPED and stage != DONE:
            return CheckinResponse(
                action="evaluate" if view.kind == "evaluate" else "train",
                round_id=view.round_id,
                task=view.task,
            )
        return _retry(ctx, ctx.settings.min_retry_seconds, "selection closed", cfg.deadlines.selection)
    if session.get(Candidate, (view.round_id, device_id)) is None:
        session.add(
            Candidate(round_id=view.round_id, device_id=device_id, checked_in_at=now, examples=state.examples)
        )
        session.flush()
    pool = (
        session.scalar(select(func.count()).select_from(Candidate).where(Candidate.round_id == view.round_id))
        or 0
    )
    if pool >= math.ceil(view.selection_target * cfg.selection_pool):
        try:
            with session.begin_nested():  # a failing close must not cost this device its check-in
                advance(session, ctx, view.round_id, wait=False)
        except RETRYABLE:
            raise
        except Exception:  # the ticker's close of the same selection fails the round with it
            log.exception("round %d: closing the selection failed", view.round_id)
        if session.get(Participant, (view.round_id, device_id)) is not None:
            return CheckinResponse(
                action="evaluate" if view.kind == "evaluate" else "train",
                round_id=view.round_id,
                task=view.task,
            )
        ctx._views = None
        return _retry(ctx, ctx.settings.min_retry_seconds, "pool full", cfg.deadlines.selection)
    wait = (view.stage_deadline - now).total_seconds()
    poll = ctx.settings.candidate_poll_seconds
    return _retry(ctx, min(max(wait, 0.2), poll), "candidate: selection closes soon", poll / 2)


# ----------------------------------------------------------------------------------------
# Stage transitions
# ----------------------------------------------------------------------------------------


def _lock(session: Session, round_id: int) -> Round:
    rnd = session.get(Round, round_id, with_for_update=True, populate_existing=True)
    if rnd is None:
        raise Gone(f"no round {round_id}")
    return rnd


def _try_lock(session: Session, round_id: int) -> Round | None:
    """The round, locked, or None if another transaction holds it (PostgreSQL ``SKIP LOCKED``;
    SQLite transactions are serialised already)."""
    return session.execute(
        select(Round)
        .where(Round.id == round_id)
        .with_for_update(skip_locked=True)
        .execution_options(populate_existing=True)
    ).scalar_one_or_none()


def _set_stage(ctx: RoundContext, rnd: Round, stage: str, seconds: float) -> None:
    now = ctx.now()
    took = (now - _utc(rnd.stage_started_at)).total_seconds()
    ctx.metrics.stage_seconds.labels(rnd.stage).observe(took)
    timings = dict(rnd.metrics.get("stage_seconds", {}))
    timings[rnd.stage] = round(took, 3)
    rnd.metrics = {**rnd.metrics, "stage_seconds": timings}
    rnd.stage = stage
    rnd.stage_started_at = now
    rnd.stage_deadline = now + timedelta(seconds=seconds)
    log_event(log, "stage", round=rnd.id, stage=stage)


def _fail(session: Session, ctx: RoundContext, rnd: Round, reason: str) -> None:
    rnd.stage = DONE
    rnd.outcome = "failed"
    rnd.failure_reason = reason[:500]
    rnd.finished_at = ctx.now()
    rnd.secagg_state = None
    session.execute(delete(RoundUpload).where(RoundUpload.round_id == rnd.id))
    session.execute(delete(Candidate).where(Candidate.round_id == rnd.id))
    session.execute(
        update(Participant)
        .where(Participant.round_id == rnd.id, Participant.stage == SELECTED)
        .values(stage=DROPPED)
    )
    ctx.metrics.rounds.labels(rnd.kind, "failed").inc()
    log_event(log, "round failed", round=rnd.id, stage=DONE, reason=reason)


def _participants(session: Session, round_id: int) -> list[Participant]:
    return list(
        session.scalars(
            select(Participant).where(Participant.round_id == round_id).order_by(Participant.index)
        )
    )


def _refuse(session: Session, rnd: Round, refused: dict[str, str]) -> None:
    """Drop devices whose stored message failed its check when the stage closed (device ->
    reason): they lose this round, the round goes on without them (recorded per stage)."""
    if not refused:
        return
    session.execute(
        update(Participant)
        .where(Participant.round_id == rnd.id, Participant.device_id.in_(list(refused)))
        .values(stage=DROPPED)
    )
    record = dict(rnd.metrics.get("refused", {}))
    record[rnd.stage] = {**record.get(rnd.stage, {}), **{d: r[:200] for d, r in refused.items()}}
    rnd.metrics = {**rnd.metrics, "refused": record}
    for device, reason in refused.items():
        log_event(
            log, "message refused at stage close", round=rnd.id, stage=rnd.stage, device=device, reason=reason
        )


def _drop_missing(session: Session, rnd: Round, keep: set[str]) -> None:
    """Every live participant of the round not in ``keep`` is dropped (counted per stage)."""
    stmt = update(Participant).where(Participant.round_id == rnd.id, Participant.stage != DROPPED)
    if keep:
        stmt = stmt.where(Participant.device_id.not_in(keep))
    n = session.execute(stmt.values(stage=DROPPED)).rowcount  # type: ignore[attr-defined]
    if n:
        dropped = dict(rnd.metrics.get("dropped", {}))
        dropped[rnd.stage] = dropped.get(rnd.stage, 0) + int(n)
        rnd.metrics = {**rnd.metrics, "dropped": dropped}


_QUANTILES = (("first", 0.0), ("p50", 0.5), ("last", 1.0))


def _close_selection(session: Session, ctx: RoundContext, rnd: Round, task: Task, now: datetime) -> None:
    cfg = _cfg(task)
    rows = session.execute(
        select(Candidate, Device)
        .join(Device, Device.id == Candidate.device_id)
        .where(Candidate.round_id == rnd.id, Device.revoked_at.is_(None))  # revoked since it joined
    ).all()
    need = rnd.plan["min_reports"]
    if len(rows) < need:
        if now >= _utc(rnd.stage_deadline):
            _fail(
                session,
                ctx,
                rnd,
                f"only {len(rows)} eligible devices checked in; the round needs {need}",
            )
        return
    seed = bytes.fromhex(rnd.plan.get("selection_seed") or secrets.token_hex(32))
    cands = [
        SelectionCandidate(
            device_id=dev.id,
            examples=cand.examples,
            device_class=dev.device_class,
            data_bucket=dev.data_bucket,
            last_selected=_ts(dev.last_selected_at) if dev.last_selected_at else 0.0,
            participations=dev.participations,
            last_round=dev.util_round,
            loss=dev.util_loss,
            seconds=dev.util_seconds,
        )
        for cand, dev in rows
    ]
    s = cfg.selection
    policy = SelectionPolicy(**s.model_dump()) if rnd.kind == "train" else SelectionPolicy()
    picked = select_devices(cands, rnd.selection_target, policy, seed=seed, round_number=rnd.number)
    by_id = {dev.id: (cand, dev) for cand, dev in rows}
    chosen = [by_id[i] for i in picked]
    for i, (_, dev) in enumerate(chosen, 1):
        session.add(Participant(round_id=rnd.id, device_id=dev.id, index=i, stage=SELECTED, selected_at=now))
    ids = [dev.id for _, dev in chosen]
    session.execute(
        update(Device)
        .where(Device.id.in_(ids))
        .values(
            last_selected_at=now,
            participations=Device.participations + 1,
            last_round_number=rnd.number,
        )
    )
    session.execute(delete(Candidate).where(Candidate.round_id == rnd.id))
    started = _utc(rnd.stage_started_at)
    arrived = sorted((_utc(cand.checked_in_at) - started).total_seconds() for cand, _ in rows)
    rnd.metrics = {
        **rnd.metrics,
        "candidates": len(rows),
        # arrivals per second once they began (the wait before the first is not the rate)
        "candidate_rate": len(rows) / max(arrived[-1] - arrived[0], 0.05),
        # when the pool's devices checked in, seconds after the selection opened
        "pool_arrivals": {q: round(arrived[int(f * (len(arrived) - 1))], 3) for q, f in _QUANTILES},
    }
    rnd.selected = len(chosen)
    ctx.metrics.selections.inc(len(chosen))
    d = cfg.deadlines
    sec = _secagg_params(rnd.plan)
    if rnd.kind == "evaluate":
        _set_stage(ctx, rnd, EVALUATING, d.upload)
    elif sec is not None:
        rnd.secagg_state = SecAggServer(sec).to_bytes()
        _set_stage(ctx, rnd, Stage.ADVERTISE_KEYS, d.advertise)
    else:
        _set_stage(ctx, rnd, UPLOAD, d.upload)


def _round_deadlines(session: Session, ctx: RoundContext, rnd: Round) -> DeadlineSettings:
    task = session.get(Task, rnd.task_id)
    return _cached_cfg(ctx, task).deadlines if task is not None else DeadlineSettings()


def quiet_enough(
    stage: str, answered: int, live: int, newest: datetime | None, d: DeadlineSettings, now: datetime
) -> bool:
    """The straggler rule of the key-agreement stages (see :class:`DeadlineSettings`): at least
    ``quorum`` of the ``live`` participants ``answered``, the newest answer ``quiet_seconds``
    old."""
    if stage not in (Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS) or d.quiet_seconds <= 0 or newest is None:
        return False
    if answered < max(1, math.ceil(d.quorum * live)):
        return False
    return (now - _utc(newest)).total_seconds() >= d.quiet_seconds


def _complete(rnd: Round, live: Counter[str]) -> bool:
    """Whether every live participant (counted by stage) is done with the round's stage."""
    n = sum(live.values())
    stage = rnd.stage
    if stage == Stage.ADVERTISE_KEYS:
        return live[Stage.ADVERTISE_KEYS] == n
    if stage == Stage.SHARE_KEYS:
        return live[Stage.SHARE_KEYS] == n
    if stage in (Stage.MASKED_INPUT, UPLOAD):
        uploaded = live[Stage.MASKED_INPUT] + live[UPLOAD]
        return uploaded >= rnd.plan["clients_per_round"] or uploaded == n
    if stage == Stage.UNMASK:
        return live[Stage.UNMASK] >= len(rnd.plan["unmask"]["survivors"])
    if stage == EVALUATING:
        return live[EVALUATED] == n
    return False


def close_if_complete(
    factory: Callable[[], Session], ctx: RoundContext, round_id: int, *, wait: bool = False
) -> bool:
    """Close the round's stage if it is complete or past its deadline; True if it moved.

    Devices call it after their message committed (``wait=False``: whoever holds the round's
    lock is closing the stage, or the ticker will), the ticker for every open round. A cheap
    read first, without locks: uploads hold the round in share mode, and taking it exclusively
    every tick would stall them for nothing.

    A stage close that raises anything but a busy database (which the next tick retries) fails
    the round with the error as its reason (:func:`fail_after_error`): a round is never left
    open to fail the same way at every tick, which would keep its task from opening another."""
    try:
        moved = _close_if_complete(factory, ctx, round_id, wait=wait)
    except RETRYABLE:
        raise
    except Exception as e:
        moved = fail_after_error(factory, ctx, round_id, e)
    if moved:  # committed: this worker's long polls hear of it at their next tick
        ctx._views = None
    return moved


def fail_after_error(
    factory: Callable[[], Session], ctx: RoundContext, round_id: int, error: Exception
) -> bool:
    """Fail an open round in a transaction of its own after ``error`` broke its stage close or
    aggregation (logged with its traceback: it is a bug or damaged state, not a device's
    message, which stage closes refuse one device at a time). True if the round was failed."""
    log.exception("round %d: failing it after an unexpected error", round_id, exc_info=error)
    with factory() as session, session.begin():
        rnd = session.get(Round, round_id, with_for_update=True, populate_existing=True)
        if rnd is None or rnd.stage == DONE:
            return False
        _fail(session, ctx, rnd, f"internal error at stage {rnd.stage}: {type(error).__name__}: {error}")
    return True


def _close_if_complete(
    factory: Callable[[], Session], ctx: RoundContext, round_id: int, *, wait: bool
) -> bool:
    with factory() as session, session.begin():
        rnd = session.get(Round, round_id)
        if rnd is None or rnd.stage in (DONE, AGGREGATING):
            return False  # aggregation is claimed by a worker (coordinator.services.aggregate)
        due = ctx.now() >= _utc(rnd.stage_deadline)
        if not due and rnd.stage == SELECTING:
            return False  # a check-in that fills the pool closes the selection
        if not due:
            counts: Counter[str] = Counter()
            newest: dict[str, datetime | None] = {}
            for stage, n, at in session.execute(
                select(Participant.stage, func.count(), func.max(Participant.message_at))
                .where(Participant.round_id == round_id, Participant.stage != DROPPED)
                .group_by(Participant.stage)
            ).tuples():
                counts[stage] = n
                newest[stage] = at
            due = _complete(rnd, counts) or (
                rnd.stage in (Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS)
                and quiet_enough(
                    rnd.stage,
                    counts[rnd.stage],
                    sum(counts.values()),
                    newest.get(rnd.stage),
                    _round_deadlines(session, ctx, rnd),
                    ctx.now(),
                )
            )
        return due and advance(session, ctx, round_id, wait=wait)


def advance(session: Session, ctx: RoundContext, round_id: int, *, wait: bool = True) -> bool:
    """Move a round on if its stage is complete or past its deadline. True if it moved.

    Returns with the round in AGGREGATING when the heavy work is due: the caller runs
    :func:`coordinator.services.aggregate.aggregate` outside the transaction.

    ``wait=False`` gives up at once if another transaction holds the round. A check-in holds its
    own device row when it gets here, and closing a selection locks the chosen devices' rows,
    so waiting there could deadlock against another check-in; whoever holds the round closes it.
    """
    if wait:
        rnd = _lock(session, round_id)
    else:
        maybe = _try_lock(session, round_id)
        if maybe is None:
            return False
        rnd = maybe
    task = session.get(Task, rnd.task_id)
    assert task is not None
    cfg = _cfg(task)
    now = ctx.now()
    late = now >= _utc(rnd.stage_deadline)
    stage = rnd.stage
    d = cfg.deadlines
    parts = _participants(session, rnd.id) if stage not in (SELECTING, DONE, AGGREGATING) else []
    live = [p for p in parts if p.stage != DROPPED]
    try:
        if stage == SELECTING:
            pool = (
                session.scalar(
                    select(func.count()).select_from(Candidate).where(Candidate.round_id == rnd.id)
                )
                or 0
            )
            if late or pool >= math.ceil(rnd.selection_target * cfg.selection_pool):
                _close_selection(session, ctx, rnd, task, now)
        elif not (
            late
            or _complete(rnd, Counter(p.stage for p in live))
            or quiet_enough(
                stage,
                sum(p.stage == stage for p in live),
                len(live),
                max((p.message_at for p in live if p.stage == stage and p.message_at), default=None),
                d,
                now,
            )
        ):
            return False
        elif stage == Stage.ADVERTISE_KEYS:
            server = SecAggServer.from_bytes(_need(rnd.secagg_state))
            refused: dict[str, str] = {}
            done = []
            for p in live:  # replay the stage's messages, kept in the participants' rows
                if p.stage != Stage.ADVERTISE_KEYS:
                    continue
                try:
                    server.add_advertisement(_advertisement(rnd, p))
                except (SecAggError, ValueError) as e:  # checked on arrival: only a changed rule
                    refused[p.device_id] = str(e)
                else:
                    done.append(p)
            _refuse(session, rnd, refused)
            if len(done) < max(MIN_DEVICES, rnd.plan["min_reports"]):
                _fail(session, ctx, rnd, f"only {len(done)} devices advertised keys")
                return True
            server.close_advertise()
            _drop_missing(session, rnd, {p.device_id for p in done})
            rnd.secagg_state = server.to_bytes()
            _set_stage(ctx, rnd, Stage.SHARE_KEYS, d.share)
        elif stage == Stage.SHARE_KEYS:
            server = SecAggServer.from_bytes(_need(rnd.secagg_state))
            refused = {}
            for device_id, blob in session.execute(  # replay the stage's messages in one query
                select(Participant.device_id, Participant.secagg_msg).where(
                    Participant.round_id == rnd.id, Participant.stage == Stage.SHARE_KEYS
                )
            ).tuples():
                try:
                    msg = ShareKeys.model_validate_json(_need(blob))
                    if msg.sender != device_id:
                        raise SecAggError(f"stored share-keys message names {msg.sender!r}")
                    server.add_share_keys(msg)
                except (SecAggError, ValueError) as e:
                    refused[device_id] = str(e)
            _refuse(session, rnd, refused)
            active = set(server.close_share_keys())
            _drop_missing(session, rnd, active)
            session.execute(update(Participant).where(Participant.round_id == rnd.id).values(secagg_msg=None))
            rnd.secagg_state = server.to_bytes()
            _set_stage(ctx, rnd, Stage.MASKED_INPUT, d.upload)
        elif stage in (Stage.MASKED_INPUT, UPLOAD):
            uploaded = {p.device_id for p in live if p.stage in (Stage.MASKED_INPUT, UPLOAD)}
            server = None
            if stage == Stage.MASKED_INPUT:
                # Uploads were checked whole when they arrived; one that fails now (a rule that
                # changed under a stored upload, a damaged row) costs its device the round and
                # nothing else: the sum is validated before anything is added into it.
                server = SecAggServer.from_bytes(_need(rnd.secagg_state))
                refused = {}
                # first whom each uploader masked without: those neighbours' inputs stay out
                for device_id, blob in session.execute(
                    select(Participant.device_id, Participant.secagg_msg).where(
                        Participant.round_id == rnd.id,
                        Participant.stage == Stage.MASKED_INPUT,
                        Participant.secagg_msg.is_not(None),
                    )
                ).tuples():
                    try:
                        server.record_omissions(device_id, _omissions(_need(blob)))
                    except (SecAggError, ValueError) as e:
                        refused[device_id] = str(e)
                for u in server.accused & uploaded:
                    refused[u] = "a neighbour could not use its share and masked without it"
                for device_id, _, body in _uploads(session, rnd.id):  # streamed into one sum
                    if device_id not in uploaded or device_id in refused:
                        continue
                    try:
                        server.add_masked_update(device_id, body, layout_hash=rnd.plan["layout_hash"])
                    except (WireError, SecAggError) as e:
                        refused[device_id] = str(e)
                missing = uploaded - set(server.survivors) - set(refused)
                refused.update(dict.fromkeys(missing, "stored upload is missing"))
                _refuse(session, rnd, refused)
                uploaded -= set(refused)
            if len(uploaded) < rnd.plan["min_reports"]:
                _fail(
                    session,
                    ctx,
                    rnd,
                    f"only {len(uploaded)} updates by the deadline; need {rnd.plan['min_reports']}",
                )
                return True
            _drop_missing(session, rnd, uploaded)
            rnd.reported = len(uploaded)
            rnd.bytes_in = sum(p.upload_bytes for p in live if p.device_id in uploaded)
            charge(rnd)  # from here on the coordinator can compute the (noisy) sum
            if server is None:
                _set_stage(ctx, rnd, AGGREGATING, 0)
            else:
                request = server.close_masked_input()
                rnd.plan = {**rnd.plan, "unmask": request.model_dump(mode="json")}
                rnd.secagg_state = server.to_bytes()
                session.execute(delete(RoundUpload).where(RoundUpload.round_id == rnd.id))
                session.execute(
                    update(Participant).where(Participant.round_id == rnd.id).values(secagg_msg=None)
                )
                _set_stage(ctx, rnd, Stage.UNMASK, d.unmask)
        elif stage == Stage.UNMASK:
            _set_stage(ctx, rnd, AGGREGATING, 0)
        elif stage == EVALUATING:
            _finish_evaluation(session, ctx, rnd, task)
        else:
            return False
    except SecAggError as e:
        _fail(session, ctx, rnd, f"secure aggregation: {e}")
        return True
    return rnd.stage != stage


def _omissions(blob: bytes) -> list[str]:
    """A stored list of omitted neighbours (JSON, written by :func:`upload`)."""
    got = json.loads(blob)
    if not isinstance(got, list) or not all(isinstance(u, str) for u in got):
        raise ValueError("stored omissions are not a list of device ids")
    return got


def _need(blob: bytes | None) -> bytes:
    if blob is None:
        raise SecAggError("round has no secure-aggregation state")
    return blob


def _finish_evaluation(session: Session, ctx: RoundContext, rnd: Round, task: Task) -> None:
    reports = session.scalars(select(EvalReport).where(EvalReport.round_id == rnd.id)).all()
    words = sum(r.words for r in reports)
    metrics: dict[str, Any] = {"devices": len(reports), "words": words}
    if words:
        tokens = sum(r.tokens for r in reports)
        metrics.update(
            top1=sum(r.top1 for r in reports) / words,
            top3=sum(r.top3 for r in reports) / words,
            loss=sum(r.loss_sum for r in reports) / max(tokens, 1),
        )
        mv = _version(session, task, rnd.base_version)
        mv.metrics = {**mv.metrics, **{f"federated_eval.{k}": v for k, v in metrics.items()}}
    _drop_missing(session, rnd, {r.device_id for r in reports})
    rnd.metrics = {**rnd.metrics, **metrics}
    rnd.stage = DONE
    rnd.outcome = "committed" if reports else "failed"
    if not reports:
        rnd.failure_reason = "no evaluation reports"
    rnd.reported = len(reports)
    rnd.finished_at = ctx.now()
    ctx.metrics.rounds.labels("evaluate", rnd.outcome).inc()


# ----------------------------------------------------------------------------------------
# Device actions within a round
# ----------------------------------------------------------------------------------------


def _my_part(session: Session, rnd: Round, device_id: str, *, lock: bool = False) -> Participant:
    """The device's participant row (locked with ``lock``: its stage moves forward once);
    403 if it was not selected, 410 if the round went on without it or is over."""
    stmt = select(Participant).where(Participant.round_id == rnd.id, Participant.device_id == device_id)
    if lock:
        stmt = stmt.with_for_update()
    part = session.execute(stmt.execution_options(populate_existing=True)).scalar_one_or_none()
    if part is None:
        raise Forbidden(f"device was not selected for round {rnd.id}")
    if part.stage == DROPPED:
        raise Gone(f"round {rnd.id} went on without this device")
    if rnd.stage == DONE:
        raise Gone(f"round {rnd.id} is over ({rnd.outcome})")
    return part


def _expect(rnd: Round, *stages: str) -> None:
    if rnd.stage not in stages:
        raise StageConflict(f"round {rnd.id} is in stage {rnd.stage!r}, not {' or '.join(stages)!r}")


def round_for_device(session: Session, round_id: int, device: Device) -> tuple[Round, Participant]:
    return _round_and_participant(session, round_id, device.id)


def _round_and_participant(session: Session, round_id: int, device_id: str) -> tuple[Round, Participant]:
    rnd = session.get(Round, round_id)
    if rnd is None:
        raise Gone(f"no round {round_id}")
    part = session.get(Participant, (rnd.id, device_id))
    if part is None:
        raise Forbidden(f"device was not selected for round {rnd.id}")
    return rnd, part


def status_of(session: Session, ctx: RoundContext, *, round_id: int, device_id: str) -> RoundStatus:
    rnd, part = _round_and_participant(session, round_id, device_id)
    remaining = max((_utc(rnd.stage_deadline) - ctx.now()).total_seconds(), 0.0)
    # stages close the moment their last message arrives: poll often enough that devices do
    # not spend the round waiting to hear of it (at most 1 s, sooner near a deadline)
    poll = 0.0 if rnd.stage == DONE else min(max(remaining / 8, 0.2), 1.0)
    return RoundStatus(
        round_id=rnd.id,
        stage=rnd.stage,
        stage_deadline=_ts(rnd.stage_deadline),
        participant_stage=part.stage,
        outcome=rnd.outcome,
        new_version=rnd.new_version,
        retry_after=round(poll, 3),
    )


def _lock_shared(session: Session, round_id: int) -> Round:
    """The round, locked against stage changes but not against other devices' messages
    (``FOR SHARE`` on PostgreSQL: any number of uploads at once, while closing a stage takes
    ``FOR UPDATE`` and waits for them; SQLite serialises transactions anyway)."""
    rnd = session.execute(
        select(Round)
        .where(Round.id == round_id)
        .with_for_update(read=True)
        .execution_options(populate_existing=True)
    ).scalar_one_or_none()
    if rnd is None:
        raise Gone(f"no round {round_id}")
    return rnd


def _snapshot(ctx: RoundContext, rnd: Round) -> SecAggServer:
    """The round's secure-aggregation state as of the start of its current stage, parsed once
    per worker and stage (it only changes when a stage closes). Read-only: messages are checked
    against it and stored in their participant's row."""
    key = (rnd.id, rnd.stage, _ts(rnd.stage_started_at))
    with ctx._lock:
        server = ctx._secagg.get(key)
        if server is not None:
            ctx._secagg.move_to_end(key)
            return server
    server = SecAggServer.from_bytes(_need(rnd.secagg_state))
    with ctx._lock:
        ctx._secagg[key] = server
        while len(ctx._secagg) > 8:
            ctx._secagg.popitem(last=False)
    return server


def advertise(
    session: Session, ctx: RoundContext, *, round_id: int, device: Device, msg: AdvertiseKeys
) -> bool:
    """Record the device's public keys. True when the stage may now be complete."""
    rnd = _lock_shared(session, round_id)
    part = _my_part(session, rnd, device.id, lock=True)
    if msg.device != device.id or msg.round_id != rnd.id:
        raise StageConflict("advertisement names another device or round")
    keys = {
        "c": base64.b64encode(msg.cipher_public_key).decode(),
        "s": base64.b64encode(msg.mask_public_key).decode(),
    }
    if part.stage != SELECTED:
        if part.keys != keys:
            raise StageConflict("this device already advertised different keys")
        return False  # a resend: already recorded
    _expect(rnd, Stage.ADVERTISE_KEYS)
    _snapshot(ctx, rnd).check_advertisement(msg)
    part.stage = Stage.ADVERTISE_KEYS
    part.keys = keys
    part.message_at = ctx.now()
    return True


def _advertisement(rnd: Round, part: Participant) -> AdvertiseKeys:
    keys = part.keys or {}
    return AdvertiseKeys(
        round_id=rnd.id,
        device=part.device_id,
        cipher_public_key=base64.b64decode(keys["c"]),
        mask_public_key=base64.b64decode(keys["s"]),
    )


def roster(session: Session, ctx: RoundContext, *, round_id: int, device: Device) -> ShareKeysRequest:
    rnd = session.get(Round, round_id)
    if rnd is None:
        raise Gone(f"no round {round_id}")
    part = _my_part(session, rnd, device.id)
    _expect(rnd, Stage.SHARE_KEYS, Stage.MASKED_INPUT, Stage.UNMASK)
    if part.stage == SELECTED:
        raise Gone("device did not advertise keys in time")
    r = _snapshot(ctx, rnd).roster
    if r is None:
        raise StageConflict("roster not fixed yet")
    return r


def share_keys(session: Session, ctx: RoundContext, *, round_id: int, device: Device, msg: ShareKeys) -> bool:
    """Record the device's encrypted shares. True when the stage may now be complete."""
    rnd = _lock_shared(session, round_id)
    part = _my_part(session, rnd, device.id, lock=True)
    if msg.sender != device.id or msg.round_id != rnd.id:
        raise StageConflict("share message names another device or round")
    if part.stage not in (SELECTED, Stage.ADVERTISE_KEYS):
        return False  # a resend: already recorded (or already past this stage)
    _expect(rnd, Stage.SHARE_KEYS)
    if part.stage != Stage.ADVERTISE_KEYS:
        raise Gone("device did not advertise keys in time")
    _snapshot(ctx, rnd).check_share_keys(msg)
    part.stage = Stage.SHARE_KEYS
    part.secagg_msg = msg.model_dump_json().encode()
    part.message_at = ctx.now()
    return True


def inbound_shares(
    session: Session, ctx: RoundContext, *, round_id: int, device: Device
) -> MaskedInputRequest:
    rnd = session.get(Round, round_id)
    if rnd is None:
        raise Gone(f"no round {round_id}")
    _my_part(session, rnd, device.id)
    _expect(rnd, Stage.MASKED_INPUT)
    return _snapshot(ctx, rnd).masked_input_request(device.id)


def _upload_slot(session: Session, round_id: int, device_id: str) -> Round | None:
    """The round, if this device may upload to it now (a live participant of its upload stage;
    the usual 403/409/410 otherwise); None when its update is in already (a repeat)."""
    rnd, part = _round_and_participant(session, round_id, device_id)
    if part.stage in (Stage.MASKED_INPUT, UPLOAD, Stage.UNMASK):
        return None
    if part.stage == DROPPED:
        raise Gone(f"round {rnd.id} went on without this device")
    if rnd.stage == DONE:
        raise Gone(f"round {rnd.id} is over ({rnd.outcome})")
    _expect(rnd, Stage.MASKED_INPUT, UPLOAD)
    if rnd.stage == Stage.MASKED_INPUT and part.stage != Stage.SHARE_KEYS:
        raise Gone("device did not complete key sharing in time")
    return rnd


def expected_upload(session: Session, *, round_id: int, device_id: str) -> int | None:
    """Bytes of the upload this device may send now, checked before its body is read: the
    device must be a live participant of the round's upload stage (else the usual 403/409/410),
    and the frame's size is fixed by the round's plan. None for a repeat (already in: the body
    need not be read at all)."""
    got = _upload_slot(session, round_id, device_id)
    if got is None:
        return None
    rnd, p = got, got.plan
    if rnd.stage == Stage.MASKED_INPUT:
        sec = _secagg_params(p)
        assert sec is not None
        return HEADER_SIZE + packed_size(sec.vector_length, sec.ring_bits)
    codec = _codec_params(p)
    if codec is None:
        return HEADER_SIZE + 4 * int(p["dim"])
    return HEADER_SIZE + packed_size(encoded_length(codec, int(p["dim"])), ring_bits(codec))


def fail_round(session: Session, ctx: RoundContext, *, round_id: int, reason: str) -> Round:
    """The admin ends an open round (any stage, aggregation included: its commit re-checks the
    stage and gives up); the task opens its next round as usual. 409 if it is over already."""
    rnd = _lock(session, round_id)
    if rnd.stage == DONE:
        raise StageConflict(f"round {round_id} is over already ({rnd.outcome})")
    _fail(session, ctx, rnd, f"failed by the admin: {reason}")
    ctx._views = None
    return rnd


def check_upload(
    session: Session, *, round_id: int, device_id: str, body: bytes, examples: int
) -> float | None:
    """Validate an upload against the round's plan before any lock is taken (header, sizes,
    CRC; float updates are decoded for NaN/Inf): the costly part. Returns the update's weight
    (capped example count; 0 with secure aggregation, whose weights travel inside the masked
    vector), or None when it is a repeat. Raises the usual 4xx errors otherwise; the write
    (:func:`upload`) re-checks the stage under the round's lock."""
    got = _upload_slot(session, round_id, device_id)
    if got is None:
        return None  # idempotent: this device's update is already in
    rnd, p = got, got.plan
    if rnd.stage == Stage.MASKED_INPUT:
        sec = _secagg_params(p)
        assert sec is not None
        verify_update(
            body,
            expected_round=rnd.id,
            expected_layout_hash=p["layout_hash"],
            expected_bits=sec.ring_bits,
            expected_length=sec.vector_length,
        )
        return 0.0
    weight = float(min(max(examples, 0), _cfg_cap(p)))
    if weight <= 0:
        raise StageConflict("an update must come with a positive example count")
    _decode_plain(rnd, body)
    return weight


def _decode_plain(rnd: Round, body: bytes) -> tuple[str, npt.NDArray[Any], npt.NDArray[Any] | None]:
    """An update of a round without secure aggregation: ("ring", values, None) for the
    compressed codec, ("float", values, indices or None) for float32 updates."""
    p = rnd.plan
    dim = p["dim"]
    expected_hash = p["layout_hash"]
    header = peek_header(body)
    codec = _codec_params(p)
    if header.kind == UpdateKind.DENSE_F32 and codec is None:
        _, vec = unpack_dense_update(
            body, expected_round=rnd.id, expected_layout_hash=expected_hash, expected_dim=dim
        )
        return "float", vec, None
    if header.kind == UpdateKind.SPARSE_F32 and codec is None:
        _, sparse = unpack_sparse_update(
            body, expected_round=rnd.id, expected_layout_hash=expected_hash, expected_dim=dim
        )
        return "float", sparse.values, sparse.indices
    if header.kind == UpdateKind.RING and codec is not None:
        _, values = unpack_update(
            body,
            expected_round=rnd.id,
            expected_layout_hash=expected_hash,
            expected_bits=ring_bits(codec),
            expected_length=encoded_length(codec, dim),
        )
        check_update_norm(values, codec, dim)  # the server sees this update: it is checked alone
        return "ring", values, None
    raise WireError(f"update kind {header.kind.name} does not match this round's codec")


def upload(
    session: Session,
    ctx: RoundContext,
    *,
    round_id: int,
    device_id: str,
    body: bytes,
    weight: float,
    omitted: Sequence[str] = (),
) -> bool:
    """Record a checked upload (appended: no shared row is rewritten). False for a repeat.
    ``omitted``: the neighbours a masked input was made without (unusable shares), checked
    against the relayed shares and kept in the participant's message slot until the stage
    closes (:func:`_close_masked_input`)."""
    rnd = _lock_shared(session, round_id)
    part = _my_part(session, rnd, device_id, lock=True)
    if part.stage in (Stage.MASKED_INPUT, UPLOAD, Stage.UNMASK):
        return False  # idempotent: this device's update is already in
    _expect(rnd, Stage.MASKED_INPUT, UPLOAD)
    secure = rnd.stage == Stage.MASKED_INPUT
    if secure and part.stage != Stage.SHARE_KEYS:
        raise Gone("device did not complete key sharing in time")
    if omitted and not secure:
        raise StageConflict("only a masked input names neighbours it masked without")
    if secure:
        omitted = _snapshot(ctx, rnd).check_omissions(device_id, omitted)
        part.secagg_msg = json.dumps(list(omitted)).encode() if omitted else None
    # The round takes K updates. Uploads in flight at once on PostgreSQL (share locks) can
    # overshoot by a few, never beyond the selected devices that the ring's headroom covers.
    have = session.scalar(
        select(func.count())
        .select_from(Participant)
        .where(Participant.round_id == rnd.id, Participant.stage.in_((Stage.MASKED_INPUT, UPLOAD)))
    )
    if (have or 0) >= rnd.plan["clients_per_round"]:
        raise Gone(f"round {rnd.id} already has the {rnd.plan['clients_per_round']} updates it needs")
    session.add(RoundUpload(round_id=rnd.id, device_id=device_id, weight=weight, body=body))
    part.stage = Stage.MASKED_INPUT if secure else UPLOAD
    part.upload_bytes = len(body)
    session.execute(
        update(Device)
        .where(Device.id == device_id)
        .values(util_seconds=(ctx.now() - _utc(part.selected_at)).total_seconds())  # oort's speed
    )
    return True


def _cfg_cap(plan: dict[str, Any]) -> int:
    codec = plan.get("codec")
    return int(codec["weight_cap"]) if codec else 1 << 30


def _uploads(session: Session, round_id: int) -> Iterator[tuple[str, float, bytes]]:
    """The round's stored uploads, one at a time (O(d) memory however many there are)."""
    ids = session.execute(
        select(RoundUpload.device_id, RoundUpload.weight)
        .where(RoundUpload.round_id == round_id)
        .order_by(RoundUpload.device_id)
    ).all()
    for device_id, weight in ids:
        body = session.scalar(
            select(RoundUpload.body).where(
                RoundUpload.round_id == round_id, RoundUpload.device_id == device_id
            )
        )
        if body is not None:
            yield device_id, weight, body


@dataclass(frozen=True)
class PlainSum:
    """The sum of a round's updates without secure aggregation."""

    total: npt.NDArray[Any] | None
    """uint32 ring words for the compressed codec (the ring width keeps the true sum below
    2**k), else the weighted float64 sum; None when no update arrived."""
    weight: float
    count: int
    clipped: int = 0
    """Float updates the coordinator clipped to the task's clip norm."""


def plain_sum(session: Session, rnd: Round, clip_norm: float) -> PlainSum:
    """The sum of a round's updates without secure aggregation. Float updates (no codec, so no
    clipping on the device) are clipped here to ``clip_norm``, the bound the codec applies on
    devices: no single device moves the weighted mean further than that."""
    total: npt.NDArray[Any] | None = None
    weight_sum, n, clipped = 0.0, 0, 0
    for _, weight, body in _uploads(session, rnd.id):
        kind, values, indices = _decode_plain(rnd, body)
        if kind == "ring":
            if total is None:
                total = np.zeros(len(values), dtype=np.uint32)
            np.add(total, values.astype(np.uint32, copy=False), out=total)
        else:
            if total is None:
                total = np.zeros(int(rnd.plan["dim"]), dtype=np.float64)
            v = values.astype(np.float64)
            norm = float(np.linalg.norm(v))
            if norm > clip_norm:
                v *= clip_norm / norm
                clipped += 1
            if indices is None:
                total += weight * v
            else:
                np.add.at(total, indices, weight * v)
        weight_sum += weight
        n += 1
    return PlainSum(total, weight_sum, n, clipped)


def unmask_request(session: Session, *, round_id: int, device: Device) -> UnmaskRequest:
    rnd = session.get(Round, round_id)
    if rnd is None:
        raise Gone(f"no round {round_id}")
    part = _my_part(session, rnd, device.id)
    _expect(rnd, Stage.UNMASK)
    if part.stage not in (Stage.MASKED_INPUT, Stage.UNMASK):
        raise Gone("device's masked input is not in the sum")
    return UnmaskRequest.model_validate(rnd.plan["unmask"])


def unmask(
    session: Session, ctx: RoundContext, *, round_id: int, device: Device, msg: UnmaskResponse
) -> bool:
    """Record the device's revealed shares. True when the stage may now be complete."""
    rnd = _lock_shared(session, round_id)
    part = _my_part(session, rnd, device.id, lock=True)
    if msg.sender != device.id or msg.round_id != rnd.id:
        raise StageConflict("unmask response names another device or round")
    if part.stage == Stage.UNMASK:
        return False
    _expect(rnd, Stage.UNMASK)
    _snapshot(ctx, rnd).check_unmask_response(msg)
    part.stage = Stage.UNMASK
    part.unmask = msg.model_dump_json().encode()
    return True


def unmask_responses(session: Session, round_id: int) -> list[UnmaskResponse]:
    """The survivors' recorded unmask responses (for aggregation)."""
    blobs = session.scalars(
        select(Participant.unmask).where(Participant.round_id == round_id, Participant.stage == Stage.UNMASK)
    ).all()
    return [UnmaskResponse.model_validate_json(b) for b in blobs if b is not None]


def report(session: Session, *, round_id: int, device: Device, msg: TrainReport) -> None:
    rnd, part = round_for_device(session, round_id, device)
    if rnd.kind != "train":
        raise StageConflict("training reports belong to training rounds")
    part.report = msg.model_dump()
    device.util_loss = msg.loss_before  # oort's statistical utility (with the example count)
    device.util_round = rnd.number


def evaluation(
    session: Session, ctx: RoundContext, *, round_id: int, device: Device, counts: EvalCounts
) -> bool:
    """Record the device's evaluation counts. True when the stage may now be complete."""
    rnd = _lock_shared(session, round_id)
    part = _my_part(session, rnd, device.id, lock=True)
    if rnd.kind != "evaluate":
        raise StageConflict("evaluation counts belong to evaluation rounds")
    if part.stage == EVALUATED:
        return False
    _expect(rnd, EVALUATING)
    session.add(
        EvalReport(
            round_id=rnd.id,
            device_id=device.id,
            version=rnd.base_version,
            words=counts.words,
            top1=counts.top1,
            top3=counts.top3,
            loss_sum=counts.loss_sum,
            tokens=counts.tokens,
        )
    )
    part.stage = EVALUATED
    return True
