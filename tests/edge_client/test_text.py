from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from edge_client.text import normalize, split_context, words


def test_normalize() -> None:
    assert normalize("  Hello   WORLD\t!  ") == "hello world !"
    assert normalize("ﬁne") == "fine"  # NFKC ligature


def test_words_keep_inner_apostrophes() -> None:
    assert words("i'm ok, don't worry!! 42") == ["i'm", "ok", "don't", "worry", "42"]


def test_split_context() -> None:
    assert split_context("how are yo") == ("how are", "yo")
    assert split_context("how are ") == ("how are", "")
    assert split_context("") == ("", "")
    assert split_context("ok, ") == ("ok,", "")
    assert split_context("I'M") == ("", "i'm")


@given(st.text(max_size=40))
def test_split_context_recombines(text: str) -> None:
    done, partial = split_context(text)
    assert " " not in partial
    assert normalize(done) == done
    if partial:
        assert normalize(text).endswith(partial)
