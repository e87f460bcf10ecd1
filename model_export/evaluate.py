"""Next-word evaluation on heldout users: top-1/top-3 accuracy, keystroke savings, perplexity.

Every word that starts a message or follows a space is a prediction target; its context is the
message typed so far. A suggestion counts when it equals the word (after normalisation).

Keystroke savings rate (KSR): the user types a word letter by letter and taps it as soon as it
appears among the 3 suggestions (one keystroke), so a word of n letters costs min(j + 1, n)
keystrokes when it shows up after j letters; KSR = 1 - keystrokes / letters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from edge_client.text import WORD_RE
from edge_client.tokenizer import BOS_ID, EOS_ID, Tokenizer
from model_export.data import Corpus, normalize

__all__ = [
    "EvalResult",
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

    def as_dict(self) -> dict[str, float | str | int]:
        return dict(self.__dict__)


def eval_messages(corpus: Corpus, max_messages: int, seed: int = 0) -> list[str]:
    """A deterministic sample of normalised, non-empty messages of the given users."""
    texts = [t for msgs in corpus.values() for m in msgs if (t := normalize(m.text))]
    if len(texts) > max_messages:
        idx = np.random.default_rng(seed).choice(len(texts), max_messages, replace=False)
        texts = [texts[i] for i in sorted(idx)]
    return texts


def targets(text: str) -> list[tuple[str, str]]:
    """(context, word) for every word at the start of the message or after a space."""
    return [
        (text[: m.start()], m.group())
        for m in WORD_RE.finditer(text)
        if m.start() == 0 or text[m.start() - 1] == " "
    ]


def next_word_accuracy(suggest: SuggestFn, texts: Sequence[str]) -> tuple[float, float, int]:
    """(top-1, top-3, number of targets)."""
    hit1 = hit3 = n = 0
    for text in texts:
        for context, word in targets(text):
            s = suggest(context, 3)
            hit1 += bool(s) and s[0] == word
            hit3 += word in s
            n += 1
    return hit1 / max(n, 1), hit3 / max(n, 1), n


def keystroke_savings(suggest: SuggestFn, texts: Sequence[str]) -> float:
    letters = keystrokes = 0
    for text in texts:
        for context, word in targets(text):
            cost = len(word)
            for j in range(len(word) - 1):  # a tap after the last letter saves nothing
                if word in suggest(context + word[:j], 3):
                    cost = j + 1
                    break
            letters += len(word)
            keystrokes += cost
    return 1.0 - keystrokes / max(letters, 1)


def fitting(tokenizer: Tokenizer, texts: Sequence[str], max_len: int) -> list[str]:
    """Messages whose ``<s> pieces </s>`` fit the model's window (for perplexity)."""
    return [t for t in texts if len(tokenizer.encode(t)) + 1 <= max_len]


def piece_perplexity(
    score: Callable[[list[int]], np.ndarray], tokenizer: Tokenizer, texts: Sequence[str]
) -> tuple[float, float]:
    """(per-word, per-piece) perplexity of ``<s> message </s>`` over whole messages.

    Per word = exp(total NLL / (words + 1 end-of-message)), the normalisation an n-gram uses;
    the neural model's NLL also covers punctuation, which the word model does not predict.
    """
    nll = 0.0
    pieces = n_words = 0
    for text in texts:
        lp = score([BOS_ID, *tokenizer.encode(text), EOS_ID])
        nll -= float(np.sum(lp))
        pieces += len(lp)
        n_words += len(WORD_RE.findall(text)) + 1
    return math.exp(nll / max(n_words, 1)), math.exp(nll / max(pieces, 1))


def ngram_perplexity(logprob: Callable[[str], tuple[float, int]], texts: Sequence[str]) -> float:
    """Per-word perplexity of a word model over the same messages."""
    total, n = 0.0, 0
    for text in texts:
        lp, count = logprob(text)
        total -= lp
        n += count
    return math.exp(total / max(n, 1))
