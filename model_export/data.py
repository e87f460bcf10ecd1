"""Corpora of per-user typed messages: the chitchat corpus, generic imports, and the split.

One user = one device. The split is a pure function of the user id (a salted SHA-256), so
every part of the system (exporter, simulator, evaluation) agrees on who is where without
sharing any state.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from edge_client.text import normalize

__all__ = [
    "SPLITS",
    "Corpus",
    "CorpusError",
    "Message",
    "Split",
    "load_chitchat",
    "load_corpus",
    "load_jsonl",
    "load_text_dir",
    "normalize",
    "split_corpus",
    "split_of",
]

Split = Literal["public", "federated", "heldout"]
SPLITS: tuple[Split, ...] = ("public", "federated", "heldout")
_SALT = "fedkeys-split-v1"


@dataclass(frozen=True, slots=True)
class Message:
    """One message typed by one user."""

    user: str
    text: str
    timestamp: datetime


# user id -> that user's messages, oldest first
Corpus = dict[str, list[Message]]


class CorpusError(ValueError):
    """A corpus file is empty or malformed; the message names the file and line."""


def split_of(user: str, public_pct: int = 10, heldout_pct: int = 10) -> Split:
    """Deterministic split of a user id: ~10% public, ~80% federated, ~10% heldout."""
    bucket = int.from_bytes(hashlib.sha256(f"{_SALT}:{user}".encode()).digest()[:8], "big") % 100
    if bucket < public_pct:
        return "public"
    if bucket >= 100 - heldout_pct:
        return "heldout"
    return "federated"


def split_corpus(corpus: Corpus) -> dict[Split, Corpus]:
    """Partition users into the three splits (each user's messages stay together, in order)."""
    out: dict[Split, Corpus] = {s: {} for s in SPLITS}
    for user, messages in corpus.items():
        out[split_of(user)][user] = messages
    return out


def _parse_time(value: object, where: str) -> datetime:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return datetime.fromtimestamp(float(value), tz=UTC)
    if isinstance(value, str):
        try:
            ts = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise CorpusError(f"{where}: timestamp {value!r} is not ISO 8601 or epoch seconds") from None
        return ts if ts.tzinfo else ts.replace(tzinfo=UTC)
    raise CorpusError(f"{where}: timestamp must be an ISO 8601 string or epoch seconds")


def _finish(messages: Iterable[Message], source: str) -> Corpus:
    corpus: Corpus = {}
    for m in messages:
        corpus.setdefault(m.user, []).append(m)
    if not corpus:
        raise CorpusError(f"{source}: no messages found")
    for msgs in corpus.values():
        msgs.sort(key=lambda m: m.timestamp)  # stable: ties keep file order
    return corpus


def load_chitchat() -> Corpus:
    """The chitchat-dataset corpus (258,145 messages by 1,315 participants), read offline."""
    import chitchat_dataset

    path = Path(chitchat_dataset.__file__).with_name("dataset.json")
    with path.open(encoding="utf-8") as f:
        raw = json.load(f)

    def messages() -> Iterator[Message]:
        for conv in raw.values():
            for turn in conv["messages"]:
                for u in turn:
                    text = u["text"].strip()
                    if text:
                        ts = datetime.fromisoformat(u["timestamp"].replace("Z", "+00:00"))
                        yield Message(u["sender"], text, ts)

    return _finish(messages(), str(path))


def load_jsonl(path: Path) -> Corpus:
    """JSON lines ``{"user": str, "text": str, "timestamp": ISO-8601 | epoch seconds}``."""

    def messages() -> Iterator[Message]:
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                where = f"{path}:{lineno}"
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CorpusError(f"{where}: not valid JSON ({e.msg})") from None
                if not isinstance(obj, dict):
                    raise CorpusError(f"{where}: expected a JSON object")
                user, text = obj.get("user"), obj.get("text")
                if not isinstance(user, str) or not user:
                    raise CorpusError(f"{where}: 'user' must be a non-empty string")
                if not isinstance(text, str):
                    raise CorpusError(f"{where}: 'text' must be a string")
                if "timestamp" not in obj:
                    raise CorpusError(f"{where}: 'timestamp' is missing")
                if text.strip():
                    yield Message(user, text.strip(), _parse_time(obj["timestamp"], where))

    return _finish(messages(), str(path))


def load_text_dir(path: Path) -> Corpus:
    """A folder with one UTF-8 text file per user (file stem = user id, one message per line).

    Plain text has no timestamps: line order is the chronological order.
    """
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise CorpusError(f"{path}: no text files found")

    def messages() -> Iterator[Message]:
        for file in files:
            try:
                lines = file.read_text(encoding="utf-8").splitlines()
            except UnicodeDecodeError as e:
                bad_line = file.read_bytes()[: e.start].count(b"\n") + 1
                raise CorpusError(f"{file}:{bad_line}: not valid UTF-8") from None
            for lineno, line in enumerate(lines, 1):
                if line.strip():
                    yield Message(file.stem, line.strip(), datetime.fromtimestamp(lineno, tz=UTC))

    return _finish(messages(), str(path))


def load_corpus(source: str | Path | None) -> Corpus:
    """``None`` or ``"chitchat"``: the bundled corpus; a ``.jsonl`` file; or a folder of texts."""
    if source is None or str(source) == "chitchat":
        return load_chitchat()
    path = Path(source)
    if not path.exists():
        raise CorpusError(f"{path}: no such file or directory")
    if path.is_dir():
        return load_text_dir(path)
    return load_jsonl(path)
