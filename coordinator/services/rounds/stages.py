"""The stage machine: when a round's stage is due to close, under the round's lock.

:func:`advance` locks the round, judges whether its stage is due (past its deadline, its
selection pool full, every live participant done, or, in the key-agreement stages, a quorum
answered and then quiet) and runs the stage's close (:data:`~.closes.CLOSES`).
:func:`close_if_complete` is how devices and the ticker call it, :func:`fail_round` how the
admin ends a round. The flow of stages is in :mod:`coordinator.services.rounds`.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from coordinator.db.models import Candidate, Participant, Round, Task
from coordinator.round_plan import StoredPlan, plan_of, stored_plan
from coordinator.schemas import DeadlineSettings
from coordinator.services.rounds.closes import CLOSES, Closing, fail_round_now
from coordinator.services.rounds.context import (
    RETRYABLE,
    Gone,
    RoundContext,
    StageConflict,
    config_of,
    utc,
)
from protocol.secagg.common import SecAggError
from protocol.wire import Stage

__all__ = ["advance", "close_if_complete", "fail_after_error", "fail_round", "quiet_enough"]

log = logging.getLogger("coordinator.rounds")


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


def fail_round(session: Session, ctx: RoundContext, *, round_id: int, reason: str) -> Round:
    """The admin ends an open round (any stage, aggregation included: its commit re-checks the
    stage and gives up); the task opens its next round as usual. 409 if it is over already."""
    rnd = _lock(session, round_id)
    if rnd.stage == Stage.DONE:
        raise StageConflict(f"round {round_id} is over already ({rnd.outcome})")
    fail_round_now(session, ctx, rnd, f"failed by the admin: {reason}")
    ctx.forget_views()
    return rnd


def _participants(session: Session, round_id: int) -> list[Participant]:
    return list(
        session.scalars(
            select(Participant).where(Participant.round_id == round_id).order_by(Participant.index)
        )
    )


def _round_deadlines(session: Session, ctx: RoundContext, task_id: int) -> DeadlineSettings:
    task = session.get(Task, task_id)
    return ctx.task_config(task).deadlines if task is not None else DeadlineSettings()


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
    return (now - utc(newest)).total_seconds() >= d.quiet_seconds


def _complete(stage: str, plan: Callable[[], StoredPlan], live: Counter[str]) -> bool:
    """Whether every live participant (counted by stage) is done with the round's ``stage``
    (``plan``: the round's plan, read only for the stages that need it)."""
    n = sum(live.values())
    if stage == Stage.ADVERTISE_KEYS:
        return live[Stage.ADVERTISE_KEYS] == n
    if stage == Stage.SHARE_KEYS:
        return live[Stage.SHARE_KEYS] == n
    if stage in (Stage.MASKED_INPUT, Stage.UPLOAD):
        uploaded = live[Stage.MASKED_INPUT] + live[Stage.UPLOAD]
        return uploaded >= plan().clients_per_round or uploaded == n
    if stage == Stage.UNMASK:
        unmask = plan().unmask
        return unmask is not None and live[Stage.UNMASK] >= len(unmask.survivors)
    if stage == Stage.EVALUATING:
        return live[Stage.EVALUATED] == n
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
        ctx.forget_views()
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
        if rnd is None or rnd.stage == Stage.DONE:
            return False
        fail_round_now(
            session, ctx, rnd, f"internal error at stage {rnd.stage}: {type(error).__name__}: {error}"
        )
    return True


def _close_if_complete(
    factory: Callable[[], Session], ctx: RoundContext, round_id: int, *, wait: bool
) -> bool:
    with factory() as session, session.begin():
        # the columns that decide (every device message and every tick asks: the whole row
        # came with the plan's and the metrics' JSON, parsed each time)
        row = session.execute(
            select(Round.stage, Round.stage_deadline, Round.task_id).where(Round.id == round_id)
        ).one_or_none()
        if row is None or row.stage in (Stage.DONE, Stage.AGGREGATING):
            return False  # aggregation is claimed by a worker (coordinator.services.aggregate)
        stage = row.stage
        due = ctx.now() >= utc(row.stage_deadline)
        if not due and stage == Stage.SELECTING:
            # The check-in that fills the pool closes the selection, but joins that run at once
            # (PostgreSQL, read committed) each count the pool before the others commit, and
            # then none of them sees it full: the ticker looks too. A pool of at least the
            # target (``selection_pool`` >= 1) takes the locking path, which decides exactly.
            pool = select(func.count()).where(Candidate.round_id == round_id).scalar_subquery()
            full = session.scalar(select(pool >= Round.selection_target).where(Round.id == round_id))
            if not full:
                return False
            return advance(session, ctx, round_id, wait=wait)
        if not due:
            counts: Counter[str] = Counter()
            newest: dict[str, datetime | None] = {}
            for part_stage, n, at in session.execute(
                select(Participant.stage, func.count(), func.max(Participant.message_at))
                .where(Participant.round_id == round_id, Participant.stage != Stage.DROPPED)
                .group_by(Participant.stage)
            ):
                counts[part_stage] = n
                newest[part_stage] = at

            def plan() -> StoredPlan:
                raw = session.scalar(select(Round.plan).where(Round.id == round_id))
                return stored_plan(round_id, raw or {})

            due = _complete(stage, plan, counts) or (
                stage in (Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS)
                and quiet_enough(
                    stage,
                    counts[stage],
                    sum(counts.values()),
                    newest.get(stage),
                    _round_deadlines(session, ctx, row.task_id),
                    ctx.now(),
                )
            )
        return due and advance(session, ctx, round_id, wait=wait)


def advance(session: Session, ctx: RoundContext, round_id: int, *, wait: bool = True) -> bool:
    """Move a round on if its stage is complete or past its deadline. True if it moved.

    Returns with the round in Stage.AGGREGATING when the heavy work is due: the caller runs
    :func:`coordinator.services.aggregate.aggregate` outside the transaction.

    ``wait=False`` gives up at once if another transaction holds the round. A check-in holds its
    own device row when it gets here, and closing a selection locks the chosen devices' rows,
    so waiting there could deadlock against another check-in; whoever holds the round closes it.

    A :class:`SecAggError` of a close (the round's own secure-aggregation state does not add
    up) fails the round with it as the reason.
    """
    rnd = _lock(session, round_id) if wait else _try_lock(session, round_id)
    if rnd is None:
        return False
    stage = rnd.stage
    close = CLOSES.get(stage)
    if close is None:
        return False  # aggregating (a worker claims it: coordinator.services.aggregate) or done
    task = session.get(Task, rnd.task_id)
    assert task is not None
    live = (
        []
        if stage == Stage.SELECTING
        else [p for p in _participants(session, rnd.id) if p.stage != Stage.DROPPED]
    )
    closing = Closing(session, ctx, rnd, task, config_of(task), ctx.now(), live)
    try:
        if not _due(closing):
            return False
        close(closing)
    except SecAggError as e:
        fail_round_now(session, ctx, rnd, f"secure aggregation: {e}")
        return True
    return rnd.stage != stage


def _due(c: Closing) -> bool:
    """Whether the round's stage closes now: past its deadline; a selection whose pool is full;
    another stage that is complete or (key agreement) quiet enough."""
    rnd, live = c.rnd, c.live
    if c.now >= utc(rnd.stage_deadline):
        return True
    if rnd.stage == Stage.SELECTING:
        pool = (
            c.session.scalar(select(func.count()).select_from(Candidate).where(Candidate.round_id == rnd.id))
            or 0
        )
        return pool >= math.ceil(rnd.selection_target * c.cfg.selection_pool)
    return _complete(rnd.stage, lambda: plan_of(rnd), Counter(p.stage for p in live)) or quiet_enough(
        rnd.stage,
        sum(p.stage == rnd.stage for p in live),
        len(live),
        max((p.message_at for p in live if p.stage == rnd.stage and p.message_at), default=None),
        c.cfg.deadlines,
        c.now,
    )
