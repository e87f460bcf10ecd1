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
