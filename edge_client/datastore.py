"""The device's own typed text, in a local SQLite file that never leaves the device.

Messages older than the retention window (default 30 days) are deleted on every write. The
store remembers which messages were used for training, so federated evaluation scores the
model only on recent messages it has not trained on.
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from edge_client.text import normalize

__all__ = ["DataStore", "ImportError_", "StoredMessage"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    text TEXT NOT NULL,
    ts REAL NOT NULL,
    trained INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS ix_messages_ts ON messages (ts);
"""
_SQL_VARIABLES = 500  # ids per "IN (...)" query (SQLite allows 999 variables in older builds)


class ImportError_(ValueError):  # noqa: N801 - "ImportError" is a builtin
    """A file to import is malformed; the message names the file and line."""


@dataclass(frozen=True)
class StoredMessage:
    id: int
    text: str
    ts: float
    trained: bool


class DataStore:
    def __init__(
        self, path: Path, retention_days: float = 30.0, now: Callable[[], float] = time.time
    ) -> None:
        self.path = path
        self.retention_seconds = retention_days * 86400
        self._now = now
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # created owner-only before SQLite opens it (its journal files take the same mode): a
        # chmod afterwards left the messages readable under the umask's mode until it ran
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        with self._db() as db:
            db.executescript(_SCHEMA)

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.path, timeout=30)
        try:
            with conn:
                yield conn
        finally:
            conn.close()

    def _purge(self, db: sqlite3.Connection) -> None:
        db.execute("DELETE FROM messages WHERE ts < ?", (self._now() - self.retention_seconds,))

    def add(self, texts: Iterable[str | tuple[str, float]]) -> int:
        """Store messages (text, or (text, unix time)); returns how many were stored."""
        rows = []
        now = self._now()
        for item in texts:
            text, ts = (item, now) if isinstance(item, str) else item
            clean = normalize(text)
            if clean:
                rows.append((clean, float(ts)))
        with self._db() as db:
            db.executemany("INSERT INTO messages (text, ts) VALUES (?, ?)", rows)
            self._purge(db)
        return len(rows)

    def import_file(self, path: Path) -> int:
        """JSON lines (``{"text": ..., "timestamp": unix or ISO}``, other keys ignored) or plain
        text (one message per line, timestamped now)."""
        try:
            raw = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ImportError_(f"{path}: cannot read ({e})") from None
        lines = raw.splitlines()
        if path.suffix in (".jsonl", ".json"):
            items: list[tuple[str, float]] = []
            for n, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ImportError_(f"{path}:{n}: not valid JSON ({e.msg})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise ImportError_(f"{path}:{n}: expected an object with a 'text' string")
                items.append((obj["text"], _timestamp(obj.get("timestamp"), f"{path}:{n}", self._now())))
            return self.add(items)
        return self.add(line for line in lines if line.strip())

    def count(self) -> int:
        with self._db() as db:
            self._purge(db)
            return int(db.execute("SELECT count(*) FROM messages").fetchone()[0])

    def counts(self) -> dict[str, int]:
        with self._db() as db:
            total, trained = db.execute("SELECT count(*), coalesce(sum(trained), 0) FROM messages").fetchone()
        return {
            "messages": int(total),
            "trained_on": int(trained),
            "never_trained": int(total) - int(trained),
        }

    def training_sample(self, limit: int, holdout: int, rng: random.Random) -> list[StoredMessage]:
        """Up to ``limit`` messages drawn uniformly at random (without replacement) from all but
        the newest ``holdout`` (kept for evaluation), oldest first: a round's local work follows
        all of the device's data, not only its newest messages."""
        with self._db() as db:
            self._purge(db)
            ids = [
                int(r[0])
                for r in db.execute(
                    "SELECT id FROM messages ORDER BY ts DESC, id DESC LIMIT -1 OFFSET ?", (max(holdout, 0),)
                )
            ]
            chosen = ids if len(ids) <= limit else rng.sample(ids, limit)
            rows: list[tuple[int, str, float, int]] = []
            for start in range(0, len(chosen), _SQL_VARIABLES):
                part = chosen[start : start + _SQL_VARIABLES]
                rows += db.execute(
                    f"SELECT id, text, ts, trained FROM messages WHERE id IN ({','.join('?' * len(part))})",
                    part,
                ).fetchall()
        rows.sort(key=lambda r: (r[2], r[0]))
        return [StoredMessage(r[0], r[1], r[2], bool(r[3])) for r in rows]

    def mark_trained(self, ids: Iterable[int]) -> None:
        with self._db() as db:
            db.executemany("UPDATE messages SET trained = 1 WHERE id = ?", [(i,) for i in ids])

    def evaluation_texts(self, limit: int) -> list[StoredMessage]:
        """The most recent messages never used for training (newest last)."""
        with self._db() as db:
            rows = db.execute(
                "SELECT id, text, ts, trained FROM messages WHERE trained = 0"
                " ORDER BY ts DESC, id DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [StoredMessage(r[0], r[1], r[2], bool(r[3])) for r in reversed(rows)]


def _timestamp(value: object, where: str, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        from datetime import UTC, datetime

        try:
            ts = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise ImportError_(f"{where}: timestamp {value!r} is not ISO 8601 or unix seconds") from None
        return (ts if ts.tzinfo else ts.replace(tzinfo=UTC)).timestamp()
    raise ImportError_(f"{where}: timestamp must be a number or an ISO 8601 string")
