"""CPU time per route, opt-in (``FEDKEYS_ROUTE_CPU_LOG_SECONDS``): where a worker's CPU goes.

Latency per route (``fedkeys_request_seconds``) does not say what a route costs: a long poll
waits 10 s for nothing, a share upload queues behind a thousand check-ins. What a request
costs here is the CPU time of its own work, measured with the thread's CPU clock
(:func:`time.thread_time`):

- on the event loop, each step of the request's coroutine between two awaits
  (:class:`metered`: body parsing, validation, the check-ins' statement, the answer's JSON);
- in worker threads, every function the request runs there (sync routes and dependencies,
  database work, the stage closes a message triggers after its response): AnyIO's
  ``to_thread.run_sync``, which Starlette and FastAPI use for all of it, is wrapped once per
  process (:func:`install_thread_meter`) to time the function in its thread.

Not in any request: TLS and HTTP parsing in uvicorn's protocol callbacks, garbage collections
that happen to run outside a request, and the background threads, which report under their
own names (``(ticker)``, ``(publisher)``). Each worker logs its cumulative table every so often
(one JSON line with the process's CPU time too, so that the unattributed rest shows);
``bench/sim_overhead.py`` takes the differences between rounds.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Awaitable, Callable, Generator
from contextvars import ContextVar
from typing import Any, TypeVar

import anyio.to_thread

__all__ = ["CURRENT", "RouteCpu", "install_thread_meter", "metered"]

T = TypeVar("T")

CURRENT: ContextVar[list[float] | None] = ContextVar("fedkeys_route_cpu", default=None)
"""The CPU seconds of the request being served, one item per measured piece (appending is
atomic, so worker threads of one request never lose each other's time)."""


class metered(Awaitable[T]):  # noqa: N801 (used like a function: ``await metered(coro, acc)``)
    """Await ``inner`` and append the thread CPU time of each of its steps to ``acc``."""

    def __init__(self, inner: Awaitable[T], acc: list[float]) -> None:
        self.inner = inner
        self.acc = acc

    def __await__(self) -> Generator[Any, Any, T]:
        coro, acc = self.inner.__await__(), self.acc
        sent: Any = None
        thrown: BaseException | None = None
        while True:
            t = time.thread_time()
            try:
                if thrown is None:
                    yielded = coro.send(sent)
                elif isinstance(thrown, GeneratorExit):
                    coro.close()
                    raise thrown
                else:
                    yielded = coro.throw(thrown)
            except StopIteration as e:
                acc.append(time.thread_time() - t)
                return e.value  # type: ignore[no-any-return]
            except BaseException:
                acc.append(time.thread_time() - t)
                raise
            acc.append(time.thread_time() - t)
            try:
                sent, thrown = (yield yielded), None
            except BaseException as e:  # cancellation and friends go to the coroutine
                sent, thrown = None, e


_install_lock = threading.Lock()


def install_thread_meter() -> None:
    """Time every ``anyio.to_thread.run_sync`` call made for a metered request (once per
    process; calls outside a request cost one context-variable read)."""
    with _install_lock:
        original = anyio.to_thread.run_sync
        if getattr(original, "fedkeys_metered", False):
            return

        async def run_sync(func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
            acc = CURRENT.get()
            if acc is None:
                return await original(func, *args, **kwargs)

            def timed(*a: Any) -> T:
                t = time.thread_time()
                try:
                    return func(*a)
                finally:
                    acc.append(time.thread_time() - t)

            return await original(timed, *args, **kwargs)

        run_sync.fedkeys_metered = True  # type: ignore[attr-defined]
        anyio.to_thread.run_sync = run_sync  # type: ignore[assignment]


class RouteCpu:
    """A worker's cumulative request count and CPU seconds per route."""

    def __init__(self) -> None:
        self._table: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def add(self, route: str, seconds: float, count: int = 1) -> None:
        with self._lock:
            row = self._table.setdefault(route, [0, 0.0])
            row[0] += count
            row[1] += seconds

    def snapshot(self) -> dict[str, tuple[int, float]]:
        with self._lock:
            return {k: (int(v[0]), v[1]) for k, v in self._table.items()}

    def report(self) -> str:
        """One JSON object: this worker's pid, its process CPU seconds and, per route,
        ``[requests, CPU seconds]`` since it started."""
        return json.dumps(
            {
                "pid": os.getpid(),
                "process_cpu": round(time.process_time(), 4),
                "routes": {k: [n, round(s, 4)] for k, (n, s) in sorted(self.snapshot().items())},
            }
        )
