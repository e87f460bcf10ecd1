from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from model_export.data import (
    CorpusError,
    load_chitchat,
    load_corpus,
    load_jsonl,
    load_text_dir,
    split_corpus,
    split_of,
)


@pytest.fixture(scope="module")
def chitchat():  # type: ignore[no-untyped-def]
    return load_chitchat()


def test_chitchat_is_the_real_corpus(chitchat) -> None:  # type: ignore[no-untyped-def]
    assert len(chitchat) == 1315
    # 258,145 messages in the corpus, 33 of them empty (dropped)
    assert sum(len(m) for m in chitchat.values()) == 258_112


def test_messages_are_chronological_per_user(chitchat) -> None:  # type: ignore[no-untyped-def]
    for msgs in chitchat.values():
        times = [m.timestamp for m in msgs]
        assert times == sorted(times)


def test_split_is_deterministic_and_about_10_80_10(chitchat) -> None:  # type: ignore[no-untyped-def]
    first = {u: split_of(u) for u in chitchat}
    again = {u: split_of(u) for u in sorted(chitchat, reverse=True)}
    assert first == again
    counts = Counter(first.values())
    n = len(chitchat)
    assert 0.07 < counts["public"] / n < 0.13
    assert 0.07 < counts["heldout"] / n < 0.13
    assert 0.74 < counts["federated"] / n < 0.86
    parts = split_corpus(chitchat)
    assert sum(len(p) for p in parts.values()) == n
    assert not set(parts["public"]) & set(parts["heldout"])


def test_split_depends_only_on_the_user_id() -> None:
    assert split_of("alice") == split_of("alice")
    assert {split_of(f"user-{i}") for i in range(200)} == {"public", "federated", "heldout"}


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_import(tmp_path: Path) -> None:
    p = _write(
        tmp_path / "c.jsonl",
        [
            json.dumps({"user": "a", "text": "second", "timestamp": "2024-01-02T00:00:00Z"}),
            json.dumps({"user": "a", "text": "first", "timestamp": 1704067200}),
            "",
            json.dumps({"user": "b", "text": "hi there", "timestamp": "2024-01-01T10:00:00"}),
        ],
    )
    corpus = load_corpus(p)
    assert [m.text for m in corpus["a"]] == ["first", "second"]
    assert corpus["b"][0].text == "hi there"


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"text": "x", "timestamp": 1}), "'user'"),
        (json.dumps({"user": "a", "text": 3, "timestamp": 1}), "'text'"),
        (json.dumps({"user": "a", "text": "x"}), "'timestamp' is missing"),
        (json.dumps({"user": "a", "text": "x", "timestamp": "yesterday"}), "not ISO 8601"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path: Path, line: str, needle: str) -> None:
    good = json.dumps({"user": "a", "text": "ok", "timestamp": 1})
    p = _write(tmp_path / "bad.jsonl", [good, line])
    with pytest.raises(CorpusError, match=rf"bad\.jsonl:2: .*{needle}"):
        load_jsonl(p)


def test_empty_inputs_are_refused(tmp_path: Path) -> None:
    empty = _write(tmp_path / "empty.jsonl", [""])
    with pytest.raises(CorpusError, match="no messages"):
        load_jsonl(empty)
    (tmp_path / "dir").mkdir()
    with pytest.raises(CorpusError, match="no text files"):
        load_text_dir(tmp_path / "dir")
    with pytest.raises(CorpusError, match="no such file"):
        load_corpus(tmp_path / "missing.jsonl")


def test_text_dir_import_and_bad_utf8(tmp_path: Path) -> None:
    d = tmp_path / "users"
    d.mkdir()
    _write(d / "alice.txt", ["hello", "", "how are you"])
    _write(d / "bob.txt", ["fine thanks"])
    corpus = load_text_dir(d)
    assert [m.text for m in corpus["alice"]] == ["hello", "how are you"]
    (d / "carol.txt").write_bytes(b"ok\nbad \xff byte\n")
    with pytest.raises(CorpusError, match=r"carol\.txt:2: not valid UTF-8"):
        load_text_dir(d)


def test_the_tiny_tokenizer_handles_every_script(tmp_path: Path) -> None:
    """A multilingual chat corpus (six scripts and emoji, thousands of CJK characters) trains
    the tiny profile's 512-piece tokenizer (SentencePiece refused it: "Vocabulary size is smaller
    than required_chars. 512 vs 1345"); every message, rare characters included, encodes without
    an unknown piece and decodes back (byte fallback)."""
    from edge_client.tokenizer import UNK_ID, Tokenizer
    from model_export.pipeline import prepare_texts
    from model_export.profiles import get_profile
    from model_export.tokenizer import char_budget, kept_characters, train_tokenizer
    from tests.corpora import SCRIPTS, multilingual_corpus

    split = prepare_texts(load_corpus(multilingual_corpus(tmp_path / "multi.jsonl")))
    vocab = get_profile("tiny").vocab_size
    assert len({c for t in split.public_train for c in t}) > vocab  # more characters than pieces
    kept = kept_characters(split.public_train, vocab)
    assert kept is not None and len(kept) == char_budget(vocab) - 1
    tok = Tokenizer(train_tokenizer(split.public_train, vocab))
    assert tok.vocab_size == vocab
    everyone = [m.text for msgs in split.heldout.values() for m in msgs] + split.public_train[:300]
    scripts = {next(s for s, (lo, hi) in SCRIPTS.items() if lo <= ord(t[0]) <= hi) for t in everyone}
    assert scripts == set(SCRIPTS)
    for text in everyone:
        ids = tok.encode(text)
        assert UNK_ID not in ids and tok.decode(ids) == text


def test_a_corpus_with_few_characters_trains_its_tokenizer_unchanged() -> None:
    from model_export.tokenizer import kept_characters

    texts = ["how are you", "see you tomorrow 😊", "ça va très bien"]
    assert kept_characters(texts, 512) is None  # every character fits: learned from as it is


def test_a_tokenizer_that_cannot_be_trained_is_a_corpus_error() -> None:
    from model_export.tokenizer import train_tokenizer

    with pytest.raises(CorpusError, match="no public-split text"):
        train_tokenizer(["", " "], 512)
    with pytest.raises(CorpusError, match="no room"):
        train_tokenizer(["hello"], 260)
