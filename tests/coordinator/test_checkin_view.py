"""Check-ins answered from a worker's round view (pure: no database, no server)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from coordinator.config import Settings
from coordinator.observability import Metrics
from coordinator.schemas import TaskConfig
from coordinator.services.rounds import RoundContext, RoundView, Views, answer_from_view
from coordinator.services.storage import ArtifactStore
from protocol.wire import CheckinResponse, Stage
from tests.coordinator.scripted import ready_state


def _ctx(tmp_path: Path) -> RoundContext:
    return RoundContext(settings=Settings(), store=ArtifactStore(tmp_path), metrics=Metrics())


def _view(number: int, stage: str = Stage.SELECTING) -> RoundView:
    now = datetime.now(UTC)
    return RoundView(
        round_id=40 + number,
        task_id=1,
        task="t",
        number=number,
        kind="train",
        stage=stage,
        stage_deadline=now + timedelta(seconds=20),
        created_at=now,
        selection_target=13,
        cfg=TaskConfig(cooldown_rounds=1),
        candidate_rate=0.0,
        recent_durations=(),
    )


def test_a_device_of_a_recent_round_cools_down(tmp_path: Path) -> None:
    snap = Views(time.monotonic(), [_view(7)], {})
    answer = answer_from_view(snap, _ctx(tmp_path), device_id="d1", last_round_number=6, state=ready_state())
    assert isinstance(answer, CheckinResponse) and answer.action == "retry"
    assert answer.reason == "cooling down after a recent round"


def test_a_device_selected_after_the_snapshot_is_not_sent_away(tmp_path: Path) -> None:
    """The view still shows the selection open, but the device's row says it was selected for
    this round (another worker closed the selection): the check-in goes to the pool path, which
    reads the round and hands over the assignment, instead of a 30-90 s cooldown retry."""
    view = _view(7)
    snap = Views(time.monotonic(), [view], {})
    answer = answer_from_view(snap, _ctx(tmp_path), device_id="d1", last_round_number=7, state=ready_state())
    assert answer is view


def test_an_eligible_newcomer_joins_the_pool(tmp_path: Path) -> None:
    view = _view(7)
    snap = Views(time.monotonic(), [view], {})
    answer = answer_from_view(snap, _ctx(tmp_path), device_id="d1", last_round_number=-5, state=ready_state())
    assert answer is view


def test_before_any_round_ended_devices_come_back_within_two_selection_windows(tmp_path: Path) -> None:
    """With no finished round to go by, a device not needed now was told to come back when the
    open round's deadlines would all have passed: a 300 s upload deadline sent the whole fleet
    away for 5 minutes though the stage closed at its 100th upload after 60 s, and the next
    three selections found nobody. Now it comes back within two selection windows."""
    from dataclasses import replace

    from coordinator.schemas import DeadlineSettings

    cfg = TaskConfig(cooldown_rounds=1, deadlines=DeadlineSettings(selection=30.0, upload=300.0))
    view = replace(
        _view(7, Stage.MASKED_INPUT),
        cfg=cfg,
        stage_deadline=datetime.now(UTC) + timedelta(seconds=300),
    )
    snap = Views(time.monotonic(), [view], {})
    answer = answer_from_view(snap, _ctx(tmp_path), device_id="d1", last_round_number=-5, state=ready_state())
    assert isinstance(answer, CheckinResponse) and answer.action == "retry"
    assert answer.retry_after is not None and 30 <= answer.retry_after <= 60 + 30, answer
    # with a history, the shortest recent round sets it as before
    hist = replace(view, recent_durations=(20.0, 45.0))
    answer = answer_from_view(
        Views(time.monotonic(), [hist], {}),
        _ctx(tmp_path),
        device_id="d1",
        last_round_number=-5,
        state=ready_state(),
    )
    assert (
        isinstance(answer, CheckinResponse)
        and answer.retry_after is not None
        and answer.retry_after <= 20 + 30
    )


def test_past_the_target_returns_spread_over_a_quarter_window(tmp_path: Path) -> None:
    """A round that runs past the shortest recent round: idle devices came back every 1-2 s
    until it ended (2,500 check-ins a round at 400 devices). Now their returns spread over a
    quarter of a selection window (30 s here): 1 s + up to 7.5 s."""
    from dataclasses import replace

    view = replace(
        _view(7, Stage.MASKED_INPUT),
        created_at=datetime.now(UTC) - timedelta(seconds=60),
        recent_durations=(40.0, 50.0),
        candidate_rate=500.0,  # a fast-filling pool: its own spread would be 1 s
    )
    ctx = _ctx(tmp_path)
    waits = []
    for _ in range(200):
        answer = answer_from_view(
            Views(time.monotonic(), [view], {}),
            ctx,
            device_id="d1",
            last_round_number=-5,
            state=ready_state(),
        )
        assert isinstance(answer, CheckinResponse) and answer.retry_after is not None
        waits.append(answer.retry_after)
    assert 1.0 <= min(waits) < 2.0 and 7.0 < max(waits) <= 8.5, (min(waits), max(waits))
