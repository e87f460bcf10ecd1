"""Text normalisation and word boundaries shared by training, evaluation and devices."""

from __future__ import annotations

import re
import unicodedata

__all__ = ["WORD_RE", "is_word_char", "normalize", "split_context", "targets", "words"]

# A word: letters/digits, optionally joined by apostrophes ("don't", "i'm").
WORD_RE = re.compile(r"[^\W_]+(?:'[^\W_]+)*")


def normalize(text: str) -> str:
    """The form every model sees: NFKC, lower case, single spaces, trimmed.

    Keyboards apply capitalisation separately (shift state, sentence starts), so the language
    model works on lower-cased text, like the n-gram baseline it is compared with.
    """
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def words(text: str) -> list[str]:
    """The words of an already normalised text, in order."""
    return WORD_RE.findall(text)


def is_word_char(ch: str) -> bool:
    return ch == "'" or (ch.isalnum() and ch != "_")


def split_context(text: str) -> tuple[str, str]:
    """Split what the user typed into (completed text, partial word being typed).

    ``"how are yo"`` -> ``("how are", "yo")``; ``"how are "`` -> ``("how are", "")``.
    A partial word is only the trailing run of word characters; ``"ok, "`` has none.
    """
    raw = " ".join(unicodedata.normalize("NFKC", text).lower().split(" "))
    if not raw or raw[-1].isspace():
        return normalize(raw), ""
    i = len(raw)
    while i > 0 and is_word_char(raw[i - 1]):
        i -= 1
    if i > 0 and not raw[i - 1].isspace():
        # "hello,wor": the fragment is glued to punctuation; treat it as a partial word anyway
        pass
    return normalize(raw[:i]), raw[i:]


def targets(text: str) -> list[tuple[str, str]]:
    """(context, word) for every word at the start of a normalised message or after a space:
    the positions where a keyboard offers next-word suggestions."""
    return [
        (text[: m.start()], m.group())
        for m in WORD_RE.finditer(text)
        if m.start() == 0 or text[m.start() - 1] == " "
    ]
