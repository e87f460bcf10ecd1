"""Next-word evaluation on heldout users: top-1/top-3 accuracy, keystroke savings, perplexity.

Every word that starts a message or follows a space is a prediction target; its context is the
message typed so far. A suggestion counts when it equals the word (after normalisation).

Keystroke savings rate (KSR): the user types a word letter by letter and taps it as soon as it
appears among the 3 suggestions (one keystroke), so a word of n letters costs min(j + 1, n)
keystrokes when it shows up after j letters; KSR = 1 - keystrokes / letters.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import astuple, dataclass

import numpy as np
import numpy.typing as npt

from edge_client.text import WORD_RE, targets
from edge_client.tokenizer import BOS_ID, EOS_ID, Tokenizer
from model_export.data import Corpus, normalize

__all__ = [
    "Counts",
    "EvalResult",
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


@dataclass
class Counts:
    """Raw sums behind every metric, so that evaluations split across processes add up."""

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

    def __add__(self, other: Counts) -> Counts:
        return Counts(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))


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


def count_suggestions(suggest: SuggestFn, texts: Sequence[str], ksr_texts: Sequence[str]) -> Counts:
    """Top-1/top-3 hits over ``texts`` and keystrokes over ``ksr_texts``, timing every call."""
    c = Counts()

    def timed(text: str) -> list[str]:
        t0 = time.perf_counter()
        out = suggest(text, 3)
        c.seconds += time.perf_counter() - t0
        c.calls += 1
        return out

    for text in texts:
        for context, word in targets(text):
            s = timed(context)
            c.top1 += bool(s) and s[0] == word
            c.top3 += word in s
            c.targets += 1
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
