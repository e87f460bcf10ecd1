"""The long polls of a round's status, watched together: one timer per worker, not one each.

A device waiting for its round's next stage holds a status request open for up to
``MAX_STATUS_WAIT`` seconds (``GET /v1/rounds/{id}/status?since=...&wait=...``). Each waiting
request used to wake every ``POLL_TICK`` on its own to look at the worker's round view: with a
round's hundred devices waiting at once, a worker woke a thousand coroutines a second to learn,
almost always, that nothing had moved. :class:`StatusWatch` keeps the waiting polls in one
table and runs one loop per worker while any waits: every ``POLL_TICK`` it takes the round
view (refreshed from the database once per ``view_ttl``, one refresh at a time, as before) and
wakes only the polls whose round left the stage they know, whose device left the round, or
whose round is not in the view (then only the database can tell). A woken poll reads the
database and answers, or waits again; after a read that showed no change it is not woken for
another ``DB_BACKOFF`` seconds. When each poll learns of a change is unchanged: within a tick
of the view showing it.
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio

from coordinator.profiling import CURRENT, RouteCpu, metered
from coordinator.services.rounds import RoundContext, Views, view_moved
from protocol.wire import Stage

__all__ = ["DB_BACKOFF", "POLL_TICK", "StatusWatch"]

POLL_TICK = 0.1  # seconds between looks at the worker's round view while polls wait
DB_BACKOFF = 1.0  # seconds a poll is not woken after a database read that showed no change


@dataclass(eq=False)
class _Waiter:
    round_id: int
    since: Stage
    device_id: str
    not_before: float  # time.monotonic() before which the view is not consulted for it
    woken: asyncio.Event = field(default_factory=asyncio.Event)


class StatusWatch:
    """The waiting status polls of one worker (one event loop) and the loop that wakes them."""

    def __init__(
        self,
        ctx: RoundContext,
        read: Callable[[], Views],
        *,
        cpu: RouteCpu | None = None,
        tick: float = POLL_TICK,
    ) -> None:
        self.ctx = ctx
        self.read = read  # a blocking refresh of the round view (run in a worker thread)
        self.cpu = cpu  # when CPU per route is metered: the loop reports as "(status watch)"
        self.tick = tick
        self._waiters: set[_Waiter] = set()
        self._loop_task: asyncio.Task[None] | None = None

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def wait(
        self, round_id: int, since: Stage, device_id: str, *, timeout: float, not_before: float = -math.inf
    ) -> bool:
        """Wait until the round view suggests that this poll's answer changed (True) or
        ``timeout`` seconds pass (False). ``not_before``: a ``time.monotonic()`` before which
        the view is not consulted for this poll (it just read the database)."""
        if timeout <= 0:
            return False
        waiter = _Waiter(round_id, since, device_id, not_before)
        self._waiters.add(waiter)
        self._ensure_loop()
        try:
            with anyio.move_on_after(timeout):
                await waiter.woken.wait()
        finally:
            self._waiters.discard(waiter)
        return waiter.woken.is_set()

    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            # a context of its own: the loop belongs to no request (it outlives the one that
            # started it), so its CPU is not added to that request's
            self._loop_task = asyncio.get_running_loop().create_task(
                self._run(), context=contextvars.Context()
            )

    async def _run(self) -> None:
        if self.cpu is None:
            await self._watch()
            return
        acc: list[float] = []
        CURRENT.set(acc)
        try:
            await metered(self._watch(acc), acc)
        finally:
            self.cpu.add("(status watch)", sum(acc), 0)

    async def _watch(self, acc: list[float] | None = None) -> None:
        while self._waiters:
            await anyio.sleep(self.tick)
            if acc is not None and self.cpu is not None and acc:
                self.cpu.add("(status watch)", sum(acc), 0)
                acc.clear()
            snap = self.ctx.views_if_fresh()
            if snap is None:
                snap = await self.ctx.refresh_views_from_loop(self.read)
                if snap is None:
                    continue  # a check-in's thread refreshes it: look again next tick
            now = time.monotonic()
            for w in list(self._waiters):
                if now >= w.not_before and view_moved(snap, w.round_id, w.since, w.device_id) is not False:
                    self._waiters.discard(w)
                    w.woken.set()
