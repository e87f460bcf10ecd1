"""The round context: a worker's clock, stores and caches that every round service takes, the
names of round and participant stages, and the errors device messages map to HTTP statuses.

The caches are soft state of one worker (process): the round view that check-ins are answered
from, task configurations, round histories and parsed secure-aggregation states. Every decision
that changes a round reads and locks the database (see :mod:`coordinator.services.rounds`).
"""

from __future__ import annotations

import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import anyio.to_thread
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session

from coordinator.config import Settings
from coordinator.db.models import Round, Task
from coordinator.observability import Metrics
from coordinator.schemas import TaskConfig
from coordinator.services.storage import ArtifactStore
from protocol.secagg.common import SecAggError
from protocol.secagg.server import SecAggServer

__all__ = [
    "RETRYABLE",
    "Forbidden",
    "Gone",
    "RoundContext",
    "RoundView",
    "StageConflict",
    "Views",
    "config_of",
    "need_state",
    "pace_target",
    "recent_durations_before",
    "timestamp",
    "utc",
]

# round stages (the secure-aggregation ones are protocol.wire.Stage values)
# participant stages besides the completed round stage names


RETRYABLE = (OperationalError, PoolTimeout)
"""Errors of a busy or briefly unreachable database: the work is retried, the round kept."""


def pace_target(created_at: datetime, recent_durations: tuple[float, ...]) -> datetime | None:
    """When pace steering sends the devices a round does not need back: when the shortest of
    the task's recent rounds would have ended (None without a history). Devices come back over
    a spread of at most one selection window after it (``checkin._pace``)."""
    if not recent_durations:
        return None
    return utc(created_at) + timedelta(seconds=min(recent_durations))


def recent_durations_before(session: Session, task_id: int, round_id: int) -> tuple[float, ...]:
    """Seconds of the task's last five finished rounds before round ``round_id``."""
    recent = session.execute(
        select(Round.created_at, Round.finished_at)
        .where(Round.task_id == task_id, Round.id < round_id, Round.finished_at.is_not(None))
        .order_by(Round.id.desc())
        .limit(5)
    ).all()
    return tuple((utc(f) - utc(c)).total_seconds() for c, f in recent if f is not None)


class StageConflict(Exception):
    """409: the request does not fit the round's current stage or this device's part in it."""


class Gone(Exception):
    """410: the round is over (or went on without this device)."""


class Forbidden(Exception):
    """403: the device was not selected for this round."""


def utc(dt: datetime) -> datetime:
    """SQLite returns naive datetimes: they are UTC."""
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def timestamp(dt: datetime) -> float:
    """Seconds since the epoch of a database datetime (naive ones are UTC)."""
    return utc(dt).timestamp()


def config_of(task: Task) -> TaskConfig:
    """The task's stored configuration, validated."""
    return TaskConfig.model_validate(task.config)


def need_state(blob: bytes | None) -> bytes:
    """A stored secure-aggregation state or message that must be there."""
    if blob is None:
        raise SecAggError("round has no secure-aggregation state")
    return blob


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


@dataclass(frozen=True)
class Views:
    """A worker's snapshot of the open rounds and who takes part in them."""

    taken: float  # time.monotonic() of the snapshot
    rounds: list[RoundView]
    assigned: dict[str, tuple[int, str, str]]  # device -> (round id, kind, task) of its open round


@dataclass
class RoundContext:
    """What the round services of one worker share: settings, artifact store, metrics, clock,
    and the worker's caches (read and written through the methods below)."""

    settings: Settings
    store: ArtifactStore
    metrics: Metrics
    now: Callable[[], datetime] = lambda: datetime.now(UTC)
    jitter: random.Random = field(default_factory=random.Random)  # pace-steering spread
    view_ttl: float = 0.5  # seconds a worker reuses its view of the open rounds
    _views: Views | None = None
    _configs: dict[tuple[int, float], TaskConfig] = field(default_factory=dict)
    _durations: dict[int, tuple[float, ...]] = field(default_factory=dict)
    # parsed secure-aggregation state per (round, stage, stage start): see secagg_snapshot
    _secagg: OrderedDict[tuple[int, str, float], SecAggServer] = field(default_factory=OrderedDict)
    _secagg_parsing: dict[tuple[int, str, float], threading.Lock] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _refreshing: threading.Lock = field(default_factory=threading.Lock)
    _view_hop: bool = False  # a long poll of this worker's event loop is refreshing the view

    # -- the round view ------------------------------------------------------------------

    def keep_views(self, snap: Views) -> None:
        """Make ``snap`` the worker's round view."""
        self._views = snap

    def forget_views(self) -> None:
        """Drop the round view (a round moved in this worker): the next check-in reads anew."""
        self._views = None

    def views_if_fresh(self) -> Views | None:
        """The worker's round view if it is younger than ``view_ttl`` (else None)."""
        snap = self._views
        return snap if snap is not None and time.monotonic() - snap.taken < self.view_ttl else None

    def views(self, read: Callable[[], Views]) -> Views:
        """The worker's round view, refreshed with ``read`` when older than ``view_ttl``: one
        thread refreshes, the others answer from the previous view meanwhile."""
        snap = self.views_if_fresh()
        if snap is None:
            snap = self._views
            if self._refreshing.acquire(blocking=snap is None):
                try:
                    now = self.views_if_fresh()  # refreshed while this thread waited for the lock?
                    snap = now if now is not None else read()
                finally:
                    self._refreshing.release()
            assert snap is not None
        return snap

    async def refresh_views_from_loop(self, read: Callable[[], Views]) -> Views | None:
        """Run ``read`` (a blocking refresh, e.g. :func:`~coordinator.services.rounds.current_views`)
        in a worker thread for a request waiting on the event loop, unless another refresh runs:
        then None at once. One waiting poll per worker refreshes (the loop is one thread)."""
        if self._view_hop or self._refreshing.locked():
            return None
        self._view_hop = True
        try:
            return await anyio.to_thread.run_sync(read)
        finally:
            self._view_hop = False

    # -- parsed once per worker ------------------------------------------------------------

    def task_config(self, task: Task) -> TaskConfig:
        """The task's configuration, validated once per update of the task."""
        key = (task.id, timestamp(task.updated_at))
        cfg = self._configs.get(key)
        if cfg is None:
            cfg = config_of(task)
            if len(self._configs) > 64:
                self._configs.clear()
            self._configs[key] = cfg
        return cfg

    def recent_durations(self, session: Session, rnd: Round) -> tuple[float, ...]:
        """Seconds of the task's last five rounds finished before ``rnd`` (cached per round)."""
        got = self._durations.get(rnd.id)
        if got is None:
            got = recent_durations_before(session, rnd.task_id, rnd.id)
            if len(self._durations) > 64:
                self._durations.clear()
            self._durations[rnd.id] = got
        return got

    def secagg_snapshot(self, rnd: Round) -> SecAggServer:
        """The round's secure-aggregation state as of the start of its current stage, parsed
        once per worker and stage (it only changes when a stage closes). Read-only: messages are
        checked against it and stored in their participant's row."""
        key = (rnd.id, rnd.stage, timestamp(rnd.stage_started_at))
        with self._lock:
            server = self._secagg.get(key)
            if server is not None:
                self._secagg.move_to_end(key)
                return server
            parsing = self._secagg_parsing.setdefault(key, threading.Lock())
        # One thread reads and parses; the others wait for it. When a stage opens, a round's
        # devices all arrive at once: each thread parsed the same state (megabytes once the
        # shares are relayed) side by side, which cost a worker seconds per stage.
        try:
            with parsing:
                with self._lock:
                    server = self._secagg.get(key)
                if server is None:
                    server = SecAggServer.from_bytes(need_state(rnd.secagg_state))
                    with self._lock:
                        self._secagg[key] = server
                        while len(self._secagg) > 8:
                            self._secagg.popitem(last=False)
        finally:
            with self._lock:
                if self._secagg_parsing.get(key) is parsing:
                    del self._secagg_parsing[key]
        return server
