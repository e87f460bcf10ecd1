"""Corpora written by tests in the generic JSONL format (``{"user", "text", "timestamp"}``):
a multilingual chat corpus (many scripts, emoji) and a small chat corpus whose users hold
skewed, realistic message counts (a few heavy writers, many light ones)."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from pathlib import Path

__all__ = ["SCRIPTS", "chat_corpus", "multilingual_corpus", "write_jsonl"]

SCRIPTS: dict[str, tuple[int, int]] = {
    "latin": (0x61, 0x7A),
    "cyrillic": (0x430, 0x44F),
    "greek": (0x3B1, 0x3C9),
    "arabic": (0x627, 0x64A),
    "devanagari": (0x915, 0x939),
    "cjk": (0x4E00, 0x4E00 + 2000),  # thousands of characters: more than a small vocabulary
}
EMOJI = (0x1F600, 0x1F64F)
_T0 = 1_700_000_000


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def multilingual_corpus(path: Path, users: int = 300, per_user: int = 12, seed: int = 0) -> Path:
    """``users`` people, each writing in one of :data:`SCRIPTS` (words of that script's
    characters, CJK words of one to three characters), a fifth of the messages with an emoji."""
    rng = random.Random(seed)
    names = list(SCRIPTS)
    rows: list[dict[str, object]] = []
    for u in range(users):
        script = names[u % len(names)]
        lo, hi = SCRIPTS[script]
        short = script == "cjk"
        vocab = [
            "".join(
                chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 3) if short else rng.randint(2, 7))
            )
            for _ in range(80)
        ]
        for i in range(per_user):
            words = [rng.choice(vocab) for _ in range(rng.randint(2, 8))]
            if rng.random() < 0.2:
                words.append(chr(rng.randint(*EMOJI)))
            rows.append({"user": f"{script}-{u}", "text": " ".join(words), "timestamp": _T0 + 60 * i})
    return write_jsonl(path, rows)


_WORDS = tuple(
    "i you we they it is are was be have do not what how when where why yes no ok good great "  # noqa: SIM905
    "fine thanks see tomorrow today tonight later home work school movie game dinner lunch love "
    "like want need going come call text me my your the a to of in on at for with and but so".split()
)


def chat_corpus(
    path: Path, users: int = 25, seed: int = 0, heavy: int = 400, counts: Sequence[int] | None = None
) -> Path:
    """``users`` people with log-normally spread message counts (the heaviest holds ``heavy``,
    the lightest one message), English-like short messages, hourly timestamps; or, given
    ``counts``, one person per count with exactly that many messages."""
    rng = random.Random(seed)
    rows: list[dict[str, object]] = []
    if counts is None:
        sizes = sorted((math.exp(rng.gauss(0, 1.2)) for _ in range(users)), reverse=True)
        counts = [max(1, round(heavy * size / sizes[0])) for size in sizes[:-1]] + [1]
    for u, n in enumerate(counts):
        for i in range(n):
            text = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(2, 9)))
            rows.append({"user": f"person-{u:03d}", "text": text, "timestamp": _T0 + 3600 * i})
    return write_jsonl(path, rows)
