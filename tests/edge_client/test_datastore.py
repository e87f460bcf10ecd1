from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest

from edge_client.datastore import DataStore, ImportError_


def test_add_normalises_and_keeps_order(tmp_path: Path) -> None:
    s = DataStore(tmp_path / "m.db")
    assert s.add(["Hello  THERE", "   ", ("how are you", time.time() - 10)]) == 2
    assert [m.text for m in s.training_sample(10, 0, random.Random(0))] == ["how are you", "hello there"]
    assert (tmp_path / "m.db").stat().st_mode & 0o777 == 0o600


def test_retention_window_drops_old_messages(tmp_path: Path) -> None:
    now = [1_000_000_000.0]
    s = DataStore(tmp_path / "m.db", retention_days=30, now=lambda: now[0])
    s.add([("old", now[0] - 31 * 86400), ("recent", now[0] - 86400)])
    assert s.count() == 1
    now[0] += 2 * 86400
    assert s.count() == 0 or [m.text for m in s.training_sample(5, 0, random.Random(0))] == ["recent"]


def test_holdout_and_evaluation_texts(tmp_path: Path) -> None:
    s = DataStore(tmp_path / "m.db")
    base = time.time() - 1000
    s.add([(f"message {i}", base + i) for i in range(10)])
    train = s.training_sample(100, 3, random.Random(0))
    assert [m.text for m in train] == [f"message {i}" for i in range(7)]
    s.mark_trained(m.id for m in train)
    assert [m.text for m in s.evaluation_texts(5)] == ["message 7", "message 8", "message 9"]
    assert s.counts() == {"messages": 10, "trained_on": 7, "never_trained": 3}


def test_training_samples_the_whole_store_but_the_holdout(tmp_path: Path) -> None:
    """A round draws its messages uniformly from all but the newest ``holdout`` (it used to take
    the newest ``limit`` only): old messages are drawn as often as recent ones."""
    s = DataStore(tmp_path / "m.db")
    base = time.time() - 10_000
    s.add([(f"message {i}", base + i) for i in range(1200)])  # more than one IN (...) query
    rng = random.Random(7)
    drawn = [s.training_sample(100, 50, rng) for _ in range(60)]
    assert all(len(d) == 100 and len({m.id for m in d}) == 100 for d in drawn)
    assert all([m.ts for m in d] == sorted(m.ts for m in d) for d in drawn)  # oldest first
    numbers = [int(m.text.split()[1]) for d in drawn for m in d]
    assert max(numbers) < 1150  # the newest 50 stay out (federated evaluation scores them)
    old, new = sum(n < 575 for n in numbers), sum(n >= 575 for n in numbers)
    assert abs(old - new) < 0.1 * len(numbers)  # the older half as often as the newer half
    again = s.training_sample(100, 50, random.Random(7))
    assert [m.id for m in again] == [m.id for m in drawn[0]]  # a function of the rng
    assert len(s.training_sample(5000, 50, rng)) == 1150  # fewer than asked: all of them


def test_import_jsonl_and_text(tmp_path: Path) -> None:
    s = DataStore(tmp_path / "m.db")
    j = tmp_path / "a.jsonl"
    j.write_text(
        json.dumps({"text": "hi", "timestamp": "2099-01-01T00:00:00Z"})
        + "\n\n"
        + json.dumps({"text": "yo"})
        + "\n"
    )
    assert s.import_file(j) == 2
    t = tmp_path / "b.txt"
    t.write_text("one\n\ntwo\n")
    assert s.import_file(t) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"nope": 1}\n')
    with pytest.raises(ImportError_, match=r"bad\.jsonl:2"):
        s.import_file(bad)
    with pytest.raises(ImportError_, match="cannot read"):
        s.import_file(tmp_path / "missing.txt")
