"""A device's round records and its history file (``fedkeys client status`` shows it)."""

from __future__ import annotations

import json
from pathlib import Path

from edge_client.records import RoundHistory, RoundRecord
from protocol.wire import TrainReport


def test_history_lines_keep_their_keys() -> None:
    """The keys each kind of round wrote before records were a class (devices keep their
    history across upgrades): a round it left, a training round it saw through, an evaluation."""
    left = RoundRecord(7, "train", completed=False, reason="no longer eligible", bytes_up=0, bytes_down=10)
    assert left.to_json() == {
        "round": 7,
        "kind": "train",
        "completed": False,
        "reason": "no longer eligible",
        "bytes_up": 0,
        "bytes_down": 10,
    }
    report = TrainReport(loss_before=5.0, loss_after=4.0, examples=40, steps=3, seconds=1.5)
    done = RoundRecord(
        8,
        "train",
        completed=True,
        reason="",
        outcome="committed",
        new_version=3,
        seconds={"train": 1.5},
        marks={"start": 1.0, "done": 2.0},
        training=report,
        bytes_up=100,
        bytes_down=200,
        peak_rss_mb=120.5,
    )
    assert done.to_json() == {
        "round": 8,
        "kind": "train",
        "completed": True,
        "reason": "",
        "outcome": "committed",
        "new_version": 3,
        "seconds": {"train": 1.5},
        "marks": {"start": 1.0, "done": 2.0},
        "training": report.model_dump(),
        "bytes_up": 100,
        "bytes_down": 200,
        "peak_rss_mb": 120.5,
    }
    assert RoundRecord(9, "evaluate", completed=True, words=42).to_json() == {
        "round": 9,
        "kind": "evaluate",
        "completed": True,
        "words": 42,
    }


def test_history_appends_and_reads_back_older_and_torn_lines(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    history = RoundHistory(path)
    assert history.recent() == []
    older = {"t": 1.0, "round": 1, "kind": "train", "completed": True, "outcome": "committed"}
    path.write_text(json.dumps(older) + "\n" + '{"t": 2.0, "round": 2, "ki\n')  # a write cut short
    for i in range(3, 15):
        history.append(RoundRecord(i, "evaluate", completed=True, words=i))
    got = history.recent(20)
    assert got[0] == older and [h["round"] for h in got[1:]] == list(range(3, 15))
    assert all(h["t"] > 1.0 for h in got[1:])
    assert [h["round"] for h in history.recent(10)] == list(range(5, 15))
    assert history.recent(0) == []
