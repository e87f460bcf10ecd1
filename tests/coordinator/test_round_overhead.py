"""Round overhead (issue 19): what a round's devices arriving all at once costs a worker. The
secure-aggregation state of a stage and a new version's weight delta are computed once per
worker however many requests want them at the same moment; waiting status polls share one
watch loop; the status and the ticker read only the columns they decide on."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import select, update

import coordinator.services.storage as storage
from coordinator.api.longpoll import StatusWatch
from coordinator.app import tick
from coordinator.db.models import Device, Round
from coordinator.services import rounds
from coordinator.services.devices import AuthError, RateLimited, authenticate_id
from coordinator.services.rounds import Forbidden, Gone, Views
from protocol.delta import xor_undelta
from protocol.secagg.server import SecAggServer
from protocol.wire import Stage
from tests.coordinator import test_stage_close
from tests.coordinator.test_delta_cache import _store
from tests.coordinator.test_stage_close import Coord, SecureRound

pytestmark = pytest.mark.slow  # builds the tiny bundle (shared, cached)

coord = test_stage_close.coord  # the fixture: services over SQLite, one task, five devices


def _at_once(n: int, fn: Callable[[int], Any]) -> list[Any]:
    """``fn(0..n-1)`` in ``n`` threads released together; their results (or exceptions)."""
    start = threading.Barrier(n)
    out: list[Any] = [None] * n

    def run(i: int) -> None:
        start.wait()
        try:
            out[i] = fn(i)
        except Exception as e:
            out[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return out


def _count_calls(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> list[int]:
    """Count the calls of ``owner.name`` (the real function still runs, a little slowed so that
    concurrent callers overlap)."""
    real = getattr(owner, name)
    calls: list[int] = []

    def counted(*a: Any, **k: Any) -> Any:
        calls.append(1)
        time.sleep(0.05)
        return real(*a, **k)

    monkeypatch.setattr(owner, name, counted)
    return calls


def test_a_stage_state_is_parsed_once_when_its_devices_arrive_together(
    coord: Coord, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = SecureRound(coord)
    r.select()
    r.advertise()
    r.share()
    assert r.close() == Stage.MASKED_INPUT
    with coord.tx() as s:  # the round as each request reads it (the state loaded, then detached)
        rnd = s.get(Round, r.round_id)
        assert rnd is not None and rnd.secagg_state is not None
        s.expunge(rnd)
    coord.ctx._secagg.clear()  # a worker that has not read this stage yet
    parses = _count_calls(monkeypatch, SecAggServer, "from_bytes")
    devices = sorted(r.clients)
    got = _at_once(len(devices), lambda i: coord.ctx.secagg_snapshot(rnd).masked_input_request(devices[i]))
    assert len(parses) == 1
    assert [g.recipient for g in got] == devices
    assert all(len(g.shares) == len(devices) - 1 for g in got)
    with coord.tx() as s:  # and through the route's service, from the worker's parsed state
        assert rounds.inbound_shares(s, coord.ctx, round_id=r.round_id, device_id="dev0") == got[0]
    assert len(parses) == 1


def test_a_new_versions_delta_is_computed_once_for_a_crowd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, vecs, files = _store(tmp_path, 2)
    computed = _count_calls(monkeypatch, storage, "xor_delta")
    opened = _at_once(
        8, lambda _: store.open_delta("kb", 1, 0, files[1], files[0], max_files=4, max_bytes=1 << 30)
    )
    assert len(computed) == 1
    assert len({d.sha256 for d in opened}) == 1
    for d in opened:
        with d.file:
            assert np.array_equal(xor_undelta(d.file.read(), vecs[0]), vecs[1])


def test_status_reads_the_round_and_the_devices_part(coord: Coord) -> None:
    r = SecureRound(coord)
    r.select()
    with coord.tx() as s:
        st = rounds.status_of(s, coord.ctx, round_id=r.round_id, device_id="dev3")
        assert (st.stage, st.participant_stage, st.outcome) == (Stage.ADVERTISE_KEYS, Stage.SELECTED, None)
        assert 0.2 <= st.retry_after <= 1.0
        with pytest.raises(Forbidden):
            rounds.status_of(s, coord.ctx, round_id=r.round_id, device_id="stranger")
        with pytest.raises(Gone):
            rounds.status_of(s, coord.ctx, round_id=r.round_id + 1000, device_id="dev3")


def test_authenticating_by_id_counts_and_refuses_like_authenticate(coord: Coord) -> None:
    if time.time() % 60 > 50:  # the counter is per minute: not across a minute's end
        time.sleep(60.5 - time.time() % 60)
    for _ in range(3):
        with coord.tx() as s:
            assert authenticate_id(s, token="token-2", rate_limit_per_minute=3) == "dev2"
    with pytest.raises(AuthError), coord.tx() as s:
        authenticate_id(s, token="no such token", rate_limit_per_minute=3)
    with pytest.raises(RateLimited), coord.tx() as s:
        authenticate_id(s, token="token-2", rate_limit_per_minute=3)  # the 4th this minute
    with coord.tx() as s:
        dev = s.get(Device, "dev2")
        assert dev is not None and dev.rate_count == 3  # the refused one rolled back with its transaction


def _stages(coord: Coord) -> list[tuple[str, str | None]]:
    with coord.tx() as s:
        return [(r.stage, r.outcome) for r in s.scalars(select(Round).order_by(Round.id))]


def test_the_ticker_opens_rounds_and_closes_a_selection_at_its_deadline(coord: Coord) -> None:
    app = coord.app  # a real app, without its background threads: the test ticks it
    tick(app)
    assert _stages(coord) == [(Stage.SELECTING, None)]
    tick(app)  # before its deadline a selection whose pool is short stays open
    assert _stages(coord) == [(Stage.SELECTING, None)]
    with coord.tx() as s:
        s.execute(update(Round).values(stage_deadline=coord.ctx.now()))
    tick(app)  # past its deadline with an empty pool: failed
    assert _stages(coord) == [(Stage.DONE, "failed")]
    tick(app)  # the task's next round
    assert _stages(coord) == [(Stage.DONE, "failed"), (Stage.SELECTING, None)]


def test_waiting_polls_share_one_watch_and_wake_when_the_view_moves(coord: Coord) -> None:
    r = SecureRound(coord)
    r.select()
    ctx = coord.ctx
    ctx.forget_views()
    base = rounds.current_views(coord.sessions, ctx)
    stage = [Stage.ADVERTISE_KEYS]
    reads: list[int] = []

    def read() -> Views:  # the database as the watch sees it: the stage moves when told to
        reads.append(1)
        snap = Views(time.monotonic(), [replace(v, stage=stage[0]) for v in base.rounds], base.assigned)
        ctx.keep_views(snap)
        return snap

    ctx.view_ttl = 0.1
    watch = StatusWatch(ctx, read, tick=0.02)
    rid, since = r.round_id, Stage.ADVERTISE_KEYS

    async def scenario() -> tuple[list[bool], float, bool, bool]:
        waits = [asyncio.create_task(watch.wait(rid, since, f"dev{i}", timeout=10)) for i in range(5)]
        # a poll that just read the database is not woken before its time
        held = asyncio.create_task(
            watch.wait(rid, since, "dev0", timeout=10, not_before=time.monotonic() + 60)
        )
        timed_out = await watch.wait(rid, since, "dev1", timeout=0.3)  # nothing moves: False after 0.3 s
        assert watch.waiting == 6 and not any(w.done() for w in waits)
        stage[0] = Stage.SHARE_KEYS
        t0 = time.monotonic()
        woken = await asyncio.gather(*waits)
        took = time.monotonic() - t0
        await asyncio.sleep(0.2)
        still_held = not held.done()
        held.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await held
        return woken, took, still_held, timed_out

    woken, took, still_held, timed_out = asyncio.run(scenario())
    assert woken == [True] * 5 and took < 3.0  # a tick (0.02 s) and a refresh after the change
    assert still_held and timed_out is False
    assert watch.waiting == 0
    # one refresh per view_ttl for all the polls, not one per poll and tick
    assert 1 <= len(reads) <= 40  # about 0.6 s of waiting at one refresh per 0.1 s
