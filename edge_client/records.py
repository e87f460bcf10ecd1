"""What a device keeps of each round it took part in: :class:`RoundRecord`, one per round, and
:class:`RoundHistory`, the ``history.jsonl`` file they are appended to.

The agent makes a record for every training or evaluation round it was assigned, completed or
left; it keeps them in its stats (the simulator reads them for bytes per device and step
times) and appends each to the history file that ``fedkeys client status`` shows. A line of the
file holds the record's fields by name, without the ones a round left unset (a round the device
left has no step times); lines written by older clients are read back as they are.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from protocol.wire import RoundKind, TrainReport

__all__ = ["RoundHistory", "RoundRecord"]


@dataclass
class RoundRecord:
    """One round as this device saw it."""

    round: int  # the round's id
    kind: RoundKind
    completed: bool  # the device did every stage it was asked to
    # why the device left ("" for a training round it saw through); None for a completed evaluation
    reason: str | None = None
    outcome: str | None = None  # the round's end as the device saw it: committed | failed
    new_version: int | None = None  # the model version the round committed
    seconds: dict[str, float] | None = None  # time per step (``RoundOutcome.stage_seconds``)
    marks: dict[str, float] | None = None  # wall-clock end of each step (``RoundOutcome.marks``)
    training: TrainReport | None = None  # local training's scalars (as measured, before rounding)
    words: int | None = None  # an evaluation: words scored
    bytes_up: int | None = None  # a training round's traffic (the evaluation's is not counted)
    bytes_down: int | None = None
    peak_rss_mb: float | None = None  # of the device's process so far (NaN without /proc)

    def to_json(self) -> dict[str, Any]:
        """The record as a history line's keys (the fields that are set)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = value.model_dump() if isinstance(value, TrainReport) else value
        return out


class RoundHistory:
    """The device's round history: one JSON line per round (``t``: when it was written, epoch
    seconds, then :meth:`RoundRecord.to_json`), appended, never rewritten."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, record: RoundRecord) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"t": time.time(), **record.to_json()}) + "\n")

    def recent(self, n: int = 10) -> list[dict[str, Any]]:
        """The last ``n`` lines as written (by this client version or an older one); a line
        that is not JSON (a write cut short) is skipped."""
        if not self.path.exists():
            return []
        out: list[dict[str, Any]] = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out[-n:] if n > 0 else []
