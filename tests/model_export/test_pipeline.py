from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedkeys.cli import main
from model_export.evaluate import keystroke_savings, next_word_accuracy, targets

pytestmark = pytest.mark.slow


def test_targets_are_words_after_spaces() -> None:
    assert targets("hi, how are-you") == [("", "hi"), ("hi, ", "how"), ("hi, how ", "are")]


def test_accuracy_and_ksr_of_an_oracle_and_a_dummy() -> None:
    texts = ["how are you doing today"]
    truth = {c: w for t in texts for c, w in targets(t)}

    def oracle(text: str, k: int) -> list[str]:
        # knows the word once its context (and any typed prefix) is given
        for c, w in truth.items():
            if text.startswith(c) and w.startswith(text[len(c) :]):
                return [w]
        return []

    assert next_word_accuracy(oracle, texts) == (1.0, 1.0, 5)
    # every word is tapped at once: one keystroke instead of its letters
    letters = sum(len(w) for w in truth.values())
    assert keystroke_savings(oracle, texts) == pytest.approx(1 - 5 / letters)
    assert next_word_accuracy(lambda t, k: ["zzz"], texts)[:2] == (0.0, 0.0)
    assert keystroke_savings(lambda t, k: [], texts) == 0.0


def test_cli_evaluates_a_bundle(tiny_bundle_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "evaluate", "--bundle", str(tiny_bundle_dir), "--messages", "30"]) == 0
    out = capsys.readouterr().out
    assert "student" in out and "top-1" in out


def test_cli_suggests(tiny_bundle_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["suggest", "--bundle", str(tiny_bundle_dir), "-k", "2", "how are yo"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all(line.split("\t")[0].startswith("yo") for line in lines)


def test_cli_refuses_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "build", "--profile", "huge", "--out", str(tmp_path / "b")]) == 2
    assert "unknown profile" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"user": "a", "text": "x", "timestamp": 1}\n{oops\n')
    assert (
        main(
            [
                "export",
                "build",
                "--profile",
                "tiny",
                "--out",
                str(tmp_path / "b"),
                "--corpus",
                str(bad),
            ]
        )
        == 2
    )
    assert "bad.jsonl:2" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["suggest"])
    assert e.value.code == 2


def test_build_from_a_generic_corpus(tmp_path: Path) -> None:
    """The pipeline runs on any corpus in the generic format (here: 60 synthetic users)."""
    from model_export.pipeline import build
    from model_export.profiles import get_profile

    lines = []
    phrases = [
        "how are you",
        "see you tomorrow",
        "i am fine thanks",
        "what are you doing",
        "good night",
    ]
    for u in range(60):
        for i in range(30):
            lines.append(json.dumps({"user": f"user{u}", "text": phrases[(u + i) % 5], "timestamp": i}))
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(lines))
    res = build(get_profile("tiny"), tmp_path / "bundle", tmp_path / "work", corpus, evaluate=True)
    names = [r.name for r in res.table]
    assert names == ["student", "teacher", "trigram"]
    trigram = res.table[2]
    assert trigram.top1 > 0.5  # five fixed phrases: the trigram nearly always knows the next word
    assert all(0 <= r.top1 <= r.top3 <= 1 for r in res.table)
    assert json.loads((tmp_path / "bundle" / "eval.json").read_text())[0]["name"] == "student"


@pytest.mark.parametrize(
    ("lines", "needle"),
    [
        ([], "no messages found"),  # an empty file
        (['{"user": "solo", "text": "hello there", "timestamp": 1}'], "no users in the public split"),
    ],
)
def test_a_corpus_the_build_cannot_handle_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], lines: list[str], needle: str
) -> None:
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(line + "\n" for line in lines))
    argv = ["export", "build", "--profile", "tiny", "--out", str(tmp_path / "b"), "--corpus", str(corpus)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and err[0].startswith("fedkeys: error:"), err
