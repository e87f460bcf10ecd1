"""Check-in: the worker's view of the open rounds, eligibility, selection pools and pace
steering (the ``retry_after`` that spreads devices over the time until they are needed)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from coordinator.db.models import Candidate, Participant, Round, Task
from coordinator.schemas import TaskConfig
from coordinator.services.rounds.context import (
    RETRYABLE,
    RoundContext,
    RoundView,
    Views,
    pace_target,
    utc,
)
from coordinator.services.rounds.plans import open_rounds
from coordinator.services.rounds.stages import advance
from protocol.wire import Action, CheckinResponse, DeviceState, RoundKind, Stage

__all__ = [
    "Candidacy",
    "answer_from_view",
    "checkin",
    "current_views",
    "eligibility",
    "join_pool",
    "round_views",
    "view_moved",
]

log = logging.getLogger("coordinator.rounds")


@dataclass(frozen=True)
class Candidacy:
    """An eligible device's place in a selecting round's pool: the answer it gets if the
    selection has not ended when it is sent (come back in about a second), the round, and when
    its selection closes at the latest. The check-in route holds the answer until the selection
    ends (``coordinator.api.devices``)."""

    response: CheckinResponse
    round_id: int
    closes_at: datetime

    def seconds_left(self, now: datetime) -> float:
        return (self.closes_at - now).total_seconds()


def _action(kind: str) -> Action:
    """What a participant of a round of this kind is told to do."""
    return Action.EVALUATE if kind == RoundKind.EVALUATE else Action.TRAIN


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
        .where(Round.stage != Stage.DONE)
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
                stage_deadline=utc(rnd.stage_deadline),
                created_at=utc(rnd.created_at),
                selection_target=rnd.selection_target,
                cfg=ctx.task_config(task),
                candidate_rate=float((rnd.metrics or {}).get("candidate_rate", 0.0)),
                recent_durations=ctx.recent_durations(session, rnd),
            )
        )
    assigned: dict[str, tuple[int, str, str]] = {}
    if any(rnd.stage != Stage.SELECTING for rnd, _ in rows):
        for device_id, round_id, kind, task_name in session.execute(
            select(Participant.device_id, Round.id, Round.kind, Task.name)
            .join(Round, Round.id == Participant.round_id)
            .join(Task, Task.id == Round.task_id)
            .where(Round.stage != Stage.DONE, Participant.stage != Stage.DROPPED)
            .order_by(Round.id)
        ):
            assigned[device_id] = (round_id, kind, task_name)  # the newest round wins
    snap = Views(mono, views, assigned)
    ctx.keep_views(snap)
    return snap


def current_views(sessions: Callable[[], Session], ctx: RoundContext) -> Views:
    """The worker's round view, refreshed when older than ``view_ttl``: one thread refreshes,
    the others answer from the previous view meanwhile."""

    def read() -> Views:
        with sessions() as session, session.begin():
            return round_views(session, ctx)

    return ctx.views(read)


def view_moved(snap: Views, round_id: int, since: Stage, device_id: str) -> bool | None:
    """Whether the view shows round ``round_id`` past stage ``since`` or the device out of it;
    None when the round is not in the view (each task's view holds its first open round
    only): then only the database can tell."""
    for view in snap.rounds:
        if view.round_id == round_id:
            if view.stage != since:
                return True
            mine = snap.assigned.get(device_id)
            return since != Stage.SELECTING and (mine is None or mine[0] != round_id)
    return None


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
    return CheckinResponse(action=Action.RETRY, retry_after=round(value, 3), reason=reason)


PAST_TARGET_SPREAD = 0.25
"""Fraction of a selection window that returns are spread over once a round has run past the
time pace steering aimed at (``_pace``)."""


def _pace(ctx: RoundContext, view: RoundView, reason: str = "no round needs devices now") -> CheckinResponse:
    """retry_after for a device while the open round needs nobody.

    The next selection starts when this round ends: devices come back when the shortest of
    the recent rounds would have ended (or after the remaining deadlines when there is no
    history), and again, spread over a quarter of a selection window, while it has not come
    yet. Check-ins are spread uniformly over half the time the last selection's pool took to
    fill (at least).
    """
    now = ctx.now()
    cfg = view.cfg
    target = pace_target(view.created_at, view.recent_durations)
    if target is not None:
        # the earliest plausible end (the shortest recent round): a device back before the end
        # is paced again, closer to it; aiming at the median left every round that ended
        # early waiting seconds for its pool (rounds here vary 10-45 s). A round that ends
        # earlier still keeps its successor's selection open until they are back
        # (plans._selection_deadline).
        remaining = (target - now).total_seconds()
    else:
        # no round has ended yet: the open one ends by its deadlines at the latest, but stages
        # close early once their messages are in (an upload stage with a 300 s deadline closed
        # at its 100th upload after 60 s, and every device, told to come back after the
        # deadline, missed the next three selections); come back within two selection windows
        remaining = min(
            (view.stage_deadline - now).total_seconds() + cfg.deadlines.unmask,
            2 * cfg.deadlines.selection,
        )
    rate = view.candidate_rate
    pool = view.selection_target * cfg.selection_pool
    # Spread returns over half the time the pool took to fill at the last selection's arrival
    # rate, never wider than a selection window: a large fleet (high rate) is spread over at
    # least a second; a small one, whose returning devices are about one pool, sees its window
    # halve from round to round instead of staying at whatever spread it once had.
    window = min(max(0.5 * pool / rate, 1.0) if rate > 0 else 5.0, cfg.deadlines.selection)
    if remaining <= 0:
        # Past the target and the round still runs: until it ends, every idle device came
        # back every 1-2 s (2,500 check-ins a round at 400 devices, 33 ms of coordinator CPU
        # per selected device: bench/RESULTS.md). Spread them over a quarter of a selection
        # window instead: a few check-ins each, and the next pool still fills within seconds.
        window = max(window, PAST_TARGET_SPREAD * cfg.deadlines.selection)
    return _retry(ctx, max(remaining, ctx.settings.min_retry_seconds), reason, window)


def checkin(
    sessions: Callable[[], Session],
    ctx: RoundContext,
    *,
    device_id: str,
    last_round_number: int,
    state: DeviceState,
) -> CheckinResponse | Candidacy:
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
        return CheckinResponse(action=_action(kind), round_id=round_id, task=task_name)
    idle = ctx.settings.idle_retry_seconds
    if not snap.rounds:
        return _retry(ctx, idle * 0.5, "no active task", idle)
    for view in snap.rounds:
        cfg = view.cfg
        pol = cfg.eligibility
        if pol.device_classes is not None and state.device_class not in pol.device_classes:
            continue
        if view.stage != Stage.SELECTING:
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
) -> CheckinResponse | Candidacy:
    """An eligible device joins a selecting round's pool (one short transaction)."""
    with sessions() as session, session.begin():
        return _join_pool(session, ctx, view, device_id, state)


def _join_pool(
    session: Session, ctx: RoundContext, view: RoundView, device_id: str, state: DeviceState
) -> CheckinResponse | Candidacy:
    """An eligible device in a selecting round's pool; closes the selection when it is full."""
    now = ctx.now()
    cfg = view.cfg
    stage = session.scalar(select(Round.stage).where(Round.id == view.round_id))
    if stage != Stage.SELECTING:  # the view is older than the selection's end
        ctx.forget_views()
        part = session.get(Participant, (view.round_id, device_id))
        if part is not None and part.stage != Stage.DROPPED and stage != Stage.DONE:
            return CheckinResponse(
                action=_action(view.kind),
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
                action=_action(view.kind),
                round_id=view.round_id,
                task=view.task,
            )
        ctx.forget_views()
        return _retry(ctx, ctx.settings.min_retry_seconds, "pool full", cfg.deadlines.selection)
    wait = (view.stage_deadline - now).total_seconds()
    poll = ctx.settings.candidate_poll_seconds
    return Candidacy(
        _retry(ctx, min(max(wait, 0.2), poll), "candidate: selection closes soon", poll / 2),
        view.round_id,
        view.stage_deadline,
    )
