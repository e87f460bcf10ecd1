"""Next-word evaluation on heldout users: top-1/top-3 accuracy, keystroke savings, perplexity.

Every word that starts a message or follows a space is a prediction target; its context is the
message typed so far. A suggestion counts when it equals the word (after normalisation).

Keystroke savings rate (KSR): the user types a word letter by letter and taps it as soon as it
appears among the 3 suggestions (one keystroke), so a word of n letters costs min(j + 1, n)
keystrokes when it shows up after j letters; KSR = 1 - keystrokes / letters.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from edge_client.text import WORD_RE, targets
from edge_client.tokenizer import BOS_ID, EOS_ID, Tokenizer
from model_export.data import Corpus, normalize

__all__ = [
    "Counts",
    "EvalResult",
    "MessageHits",
    "chunks",
    "count_nll",
    "count_suggestions",
    "eval_messages",
    "fitting",
    "keystroke_savings",
    "next_word_accuracy",
    "ngram_perplexity",
    "piece_perplexity",
    "targets",
]

SuggestFn = Callable[[str, int], list[str]]


IntArray = npt.NDArray[np.int64]
T = TypeVar("T")


@dataclass(frozen=True)
class MessageHits:
    """Per-message next-word counts, entry i for message i of the evaluated texts (in order):
    two models scored on the same texts compare message by message (``model_export.stats``)."""

    words: IntArray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    top1: IntArray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    top3: IntArray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def __post_init__(self) -> None:
        if not self.words.shape == self.top1.shape == self.top3.shape or self.words.ndim != 1:
            raise ValueError("words, top1 and top3 need one entry per message each")

    def __len__(self) -> int:
        return int(self.words.size)

    def __add__(self, other: MessageHits) -> MessageHits:
        """The messages of ``self`` followed by those of ``other``."""
        return MessageHits(*(np.concatenate([getattr(self, f), getattr(other, f)]) for f in _HIT_FIELDS))

    @classmethod
    def from_lists(cls, words: Sequence[int], top1: Sequence[int], top3: Sequence[int]) -> MessageHits:
        return cls(*(np.asarray(x, dtype=np.int64).reshape(-1) for x in (words, top1, top3)))

    def as_arrays(self) -> dict[str, IntArray]:
        return {f: getattr(self, f) for f in _HIT_FIELDS}


_HIT_FIELDS = ("words", "top1", "top3")


@dataclass
class Counts:
    """Raw sums behind every metric, so that evaluations split across processes add up, and
    the per-message next-word counts (concatenated in the order the parts are added)."""

    targets: int = 0
    top1: int = 0
    top3: int = 0
    letters: int = 0
    keystrokes: int = 0
    nll: float = 0.0
    pieces: int = 0
    words: int = 0
    calls: int = 0
    seconds: float = 0.0
    per_message: MessageHits = field(default_factory=MessageHits)

    def __add__(self, other: Counts) -> Counts:
        return Counts(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})


def chunks(items: Sequence[T], parts: int) -> list[Sequence[T]]:
    """``items`` cut into ``parts`` contiguous slices of nearly equal length (in order, so
    per-message results of the parts concatenate back into the order of ``items``)."""
    parts = max(1, parts)
    bounds = [round(i * len(items) / parts) for i in range(parts + 1)]
    return [items[a:b] for a, b in itertools.pairwise(bounds)]


@dataclass
class EvalResult:
    """One model's row in the evaluation table."""

    name: str
    top1: float
    top3: float
    ksr: float
    ppl_word: float  # exp(mean NLL per word incl. end of message); comparable across models
    ppl_token: float  # per SentencePiece piece (neural models only; nan otherwise)
    words: int
    ms_per_suggestion: float

    @classmethod
    def from_counts(cls, name: str, c: Counts, *, per_piece: bool = True) -> EvalResult:
        return cls(
            name=name,
            top1=c.top1 / max(c.targets, 1),
            top3=c.top3 / max(c.targets, 1),
            ksr=1.0 - c.keystrokes / max(c.letters, 1),
            ppl_word=math.exp(c.nll / max(c.words, 1)),
            ppl_token=math.exp(c.nll / max(c.pieces, 1)) if per_piece else float("nan"),
            words=c.targets,
            ms_per_suggestion=1000 * c.seconds / max(c.calls, 1),
        )

    def as_dict(self) -> dict[str, float | str | int]:
        return dict(self.__dict__)


def eval_messages(corpus: Corpus, max_messages: int, seed: int = 0) -> list[str]:
    """A deterministic sample of normalised, non-empty messages of the given users."""
    texts = [t for msgs in corpus.values() for m in msgs if (t := normalize(m.text))]
    if len(texts) > max_messages:
        idx = np.random.default_rng(seed).choice(len(texts), max_messages, replace=False)
        texts = [texts[i] for i in sorted(idx)]
    return texts


def count_suggestions(
    suggest: SuggestFn,
    texts: Sequence[str],
    ksr_texts: Sequence[str],
    begin: Callable[[str], None] | None = None,
) -> Counts:
    """Top-1/top-3 hits over ``texts`` (in total and per message, in order) and keystrokes
    over ``ksr_texts``, timing every call. ``begin(text)`` is called before the targets of
    each message of ``texts`` (a model may prepare the message's common prefix once)."""
    c = Counts()
    per_words, per_top1, per_top3 = [], [], []

    def timed(text: str) -> list[str]:
        t0 = time.perf_counter()
        out = suggest(text, 3)
        c.seconds += time.perf_counter() - t0
        c.calls += 1
        return out

    for text in texts:
        if begin is not None:
            begin(text)
        words = top1 = top3 = 0
        for context, word in targets(text):
            s = timed(context)
            top1 += bool(s) and s[0] == word
            top3 += word in s
            words += 1
        per_words.append(words)
        per_top1.append(top1)
        per_top3.append(top3)
        c.targets += words
        c.top1 += top1
        c.top3 += top3
    c.per_message = MessageHits.from_lists(per_words, per_top1, per_top3)
    for text in ksr_texts:
        for context, word in targets(text):
            cost = len(word)
            for j in range(len(word) - 1):  # a tap after the last letter saves nothing
                if word in timed(context + word[:j]):
                    cost = j + 1
                    break
            c.letters += len(word)
            c.keystrokes += cost
    return c


def next_word_accuracy(suggest: SuggestFn, texts: Sequence[str]) -> tuple[float, float, int]:
    """(top-1, top-3, number of targets)."""
    c = count_suggestions(suggest, texts, [])
    return c.top1 / max(c.targets, 1), c.top3 / max(c.targets, 1), c.targets


def keystroke_savings(suggest: SuggestFn, texts: Sequence[str]) -> float:
    c = count_suggestions(suggest, [], texts)
    return 1.0 - c.keystrokes / max(c.letters, 1)


def fitting(tokenizer: Tokenizer, texts: Sequence[str], max_len: int) -> list[str]:
    """Messages whose ``<s> pieces </s>`` fit the model's window (for perplexity)."""
    return [t for t in texts if len(tokenizer.encode(t)) + 1 <= max_len]


def count_nll(
    score: Callable[[list[int]], npt.NDArray[np.float32]],
    tokenizer: Tokenizer,
    texts: Sequence[str],
) -> Counts:
    """NLL of ``<s> message </s>`` over whole messages, with piece and word counts.

    Per word = exp(total NLL / (words + 1 end-of-message)), the normalisation an n-gram uses;
    the neural model's NLL also covers punctuation, which the word model does not predict.
    """
    c = Counts()
    for text in texts:
        lp = score([BOS_ID, *tokenizer.encode(text), EOS_ID])
        c.nll -= float(np.sum(lp))
        c.pieces += len(lp)
        c.words += len(WORD_RE.findall(text)) + 1
    return c


def piece_perplexity(
    score: Callable[[list[int]], npt.NDArray[np.float32]],
    tokenizer: Tokenizer,
    texts: Sequence[str],
) -> tuple[float, float]:
    """(per-word, per-piece) perplexity of whole messages."""
    c = count_nll(score, tokenizer, texts)
    return math.exp(c.nll / max(c.words, 1)), math.exp(c.nll / max(c.pieces, 1))


def ngram_perplexity(logprob: Callable[[str], tuple[float, int]], texts: Sequence[str]) -> float:
    """Per-word perplexity of a word model over the same messages."""
    total, n = 0.0, 0
    for text in texts:
        lp, count = logprob(text)
        total -= lp
        n += count
    return math.exp(total / max(n, 1))
