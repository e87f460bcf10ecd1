"""A shipped student (model_export.shipped): the build saves what it trained with its
provenance, a later build exports the same bundle from it without training, and a shipped
student that does not fit (tampered file, other corpus, other profile) is a one-line error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fedkeys.cli import main
from model_export.shipped import PROVENANCE, TOKENIZER, WEIGHTS, read_provenance
from protocol.bundle import load_bundle

pytestmark = pytest.mark.slow


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def shipped_once(tmp_path_factory: pytest.TempPathFactory, tiny_build: Path) -> Path:
    """The tiny build's student shipped to ``ship/`` beside its bundle ``trained/`` (its
    trained models are cached: this build only exports)."""
    root = tmp_path_factory.mktemp("shipped")
    work = root / "work"
    shutil.copytree(tiny_build / "work", work)
    argv = ["export", "build", "--profile", "tiny", "--no-eval", "--work", str(work)]
    assert main([*argv, "--out", str(root / "trained"), "--save-student", str(root / "ship")]) == 0
    return root


@pytest.fixture
def shipped(tmp_path: Path, shipped_once: Path) -> Path:
    """A copy of the shipped student, for a test to spoil."""
    shutil.copytree(shipped_once / "ship", tmp_path / "ship")
    return tmp_path / "ship"


def test_a_shipped_student_exports_the_same_bundle_without_training(
    tmp_path: Path, shipped_once: Path, shipped: Path
) -> None:
    prov = read_provenance(shipped)
    assert prov.profile == "tiny" and prov.command.startswith("fedkeys export build")
    assert len(prov.data_fingerprint) == 16 and len(prov.train_fingerprint) == 16
    assert prov.commit  # a hash, "+dirty" or "unknown" outside a checkout
    empty_work = tmp_path / "empty-work"  # nothing cached: a training stage would have to run
    out = tmp_path / "from-shipped"
    argv = ["export", "build", "--profile", "tiny", "--no-eval", "--work", str(empty_work)]
    assert main([*argv, "--out", str(out), "--student", str(shipped)]) == 0
    assert not list(empty_work.glob("*.pt")), "no model was trained"
    a, b = load_bundle(shipped_once / "trained"), load_bundle(out)
    np.testing.assert_array_equal(a.initial_weights(), b.initial_weights())
    assert a.path(a.manifest.tokenizer).read_bytes() == b.path(b.manifest.tokenizer).read_bytes()
    assert (
        a.manifest.predict.program.sha256 == b.manifest.predict.program.sha256
    )  # the export is deterministic


@pytest.mark.parametrize(
    ("spoil", "needle"),
    [
        (lambda d: _flip_last_byte(d / WEIGHTS), "is not the provenance"),
        (lambda d: (d / TOKENIZER).unlink(), "No such file"),
        (lambda d: (d / PROVENANCE).write_text("{}"), "not a provenance record"),
        (
            lambda d: (d / PROVENANCE).write_text(
                json.dumps(json.loads((d / PROVENANCE).read_text()) | {"data_fingerprint": "0" * 16})
            ),
            "trained on corpus split",
        ),
        (
            lambda d: (d / PROVENANCE).write_text(
                json.dumps(json.loads((d / PROVENANCE).read_text()) | {"profile": "demo"})
            ),
            "of profile 'demo'",
        ),
    ],
)
def test_a_shipped_student_that_does_not_fit_is_one_line_and_exit_2(
    tmp_path: Path, shipped: Path, capsys: pytest.CaptureFixture[str], spoil: object, needle: str
) -> None:
    spoil(shipped)  # type: ignore[operator]
    capsys.readouterr()
    argv = ["export", "build", "--profile", "tiny", "--no-eval", "--out", str(tmp_path / "x")]
    assert main([*argv, "--student", str(shipped)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and err[0].startswith("fedkeys: error:"), err


def test_the_repository_ships_the_demo_student_that_fits_todays_build() -> None:
    """``make demo`` exports from models/demo: its hashes, corpus split and shape must fit (a
    change of the split rules or of the demo profile's student makes this fail first)."""
    from model_export.data import load_corpus
    from model_export.pipeline import prepare_texts
    from model_export.profiles import get_profile
    from model_export.shipped import load_student

    demo = get_profile("demo")
    models = Path(__file__).resolve().parents[2] / "models" / "demo"
    lm, tokenizer, prov = load_student(
        models,
        profile="demo",
        student_cfg=demo.student,
        data_fingerprint=prepare_texts(load_corpus(None)).fingerprint(),
    )
    assert sum(p.numel() for p in lm.parameters()) > 2_000_000 and tokenizer
    assert prov.best_val_loss is not None and prov.best_val_loss < 5
