from __future__ import annotations

import itertools
import math

import pytest

from model_export.ngram import BOS, EOS, TrigramLM

TEXTS = [
    "how are you",
    "how are you doing",
    "how is it going",
    "are you ok",
    "you are great",
    "i am fine thanks",
    "i am good",
    "how about you",
]


@pytest.fixture
def lm() -> TrigramLM:
    return TrigramLM().fit(TEXTS)


def test_distribution_sums_to_one(lm: TrigramLM) -> None:
    vocab = list(lm.uni_cont)
    for u, v in [(BOS, BOS), (BOS, "how"), ("how", "are"), ("never", "seen"), ("i", "am")]:
        total = sum(lm.prob(w, u, v) for w in vocab)
        unseen = lm.prob("zzz-unseen", u, v)
        # the unseen mass is spread uniformly over one extra "word"
        assert math.isclose(total + unseen, 1.0, rel_tol=1e-9), (u, v, total)


def test_kneser_ney_reference_value(lm: TrigramLM) -> None:
    # P(you | how are): c(how are you)=2, c(how are .)=2, one continuation type
    d = lm.d
    p2 = lm._p2("you", "are")
    assert math.isclose(lm.prob("you", "how", "are"), (2 - d) / 2 + d * 1 / 2 * p2)


def test_suggest_is_exact_top_k(lm: TrigramLM) -> None:
    vocab = [w for w in lm.uni_cont if w != EOS]
    for context, partial in itertools.product(["how are ", "i ", "", "you "], ["", "a", "g"]):
        text = context + partial
        got = lm.suggest(text, 3)
        u, v = lm._context(context.strip())
        brute = sorted((w for w in vocab if w.startswith(partial)), key=lambda w: (-lm.prob(w, u, v), w))
        assert got == brute[:3], text


def test_message_logprob_counts_end_of_message(lm: TrigramLM) -> None:
    lp, n = lm.message_logprob("how are you")
    assert n == 4
    assert lp < 0
