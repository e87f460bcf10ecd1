"""A trained student shipped with the repository, so that a bundle exports without training.

Training the demo's teacher and student takes 10 to 45 minutes on the 2-core machines this
project runs on (bench/RESULTS.md), most of ``make demo``'s time. ``fedkeys export build
--save-student DIR`` writes what the build trained into ``DIR``: the student's state dict, the
tokenizer, and ``provenance.json`` (the command, the commit, the corpus split's fingerprint, the
training fingerprint, the model configuration and the sha256 of both files). ``fedkeys export
build --student DIR`` then skips the tokenizer, teacher and student stages: it checks every
hash, that the corpus split is the one the student was trained on and that the profile's
student shape is the shipped one, and exports the bundle from the shipped weights (the
exported programs are the same as a full build's, as the export is deterministic given the
weights). Nothing is fetched from anywhere: the files are in the repository.
"""

from __future__ import annotations

import hashlib
import subprocess
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

from edge_client.tokenizer import Tokenizer
from model_export.data import CorpusError
from model_export.model import ModelConfig, TransformerLM

__all__ = ["PROVENANCE", "Provenance", "ShippedError", "load_student", "read_provenance", "save_student"]

PROVENANCE = "provenance.json"
WEIGHTS = "student.pt"
TOKENIZER = "tokenizer.model"


class ShippedError(CorpusError):
    """The shipped student does not fit this build (a one-line message, exit code 2)."""


class Provenance(BaseModel):
    """How a shipped student was made: enough to make it again and to check it is what it says."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    profile: str
    command: str
    commit: str  # ``git rev-parse HEAD`` of the build, "+dirty" when the tree had changes
    created: str  # UTC, ISO 8601
    data_fingerprint: str  # pipeline.SplitTexts.fingerprint of the corpus split
    train_fingerprint: str  # pipeline.train_model's cache key (configs, data, teacher)
    student: dict[str, Any]  # the ModelConfig, as asdict
    weights_sha256: str
    tokenizer_sha256: str
    best_val_loss: float | None = None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _commit(repo: Path) -> str:
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def save_student(
    dest: Path,
    student: TransformerLM,
    tokenizer_model: bytes,
    *,
    profile: str,
    command: str,
    data_fingerprint: str,
    train_fingerprint: str,
    best_val_loss: float | None = None,
) -> Provenance:
    """Write the student, its tokenizer and their provenance into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().clone() for k, v in student.state_dict().items()}, dest / WEIGHTS)
    (dest / TOKENIZER).write_bytes(tokenizer_model)
    prov = Provenance(
        profile=profile,
        command=command,
        commit=_commit(Path(__file__).resolve().parents[1]),
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        data_fingerprint=data_fingerprint,
        train_fingerprint=train_fingerprint,
        student=asdict(student.cfg),
        weights_sha256=_sha256(dest / WEIGHTS),
        tokenizer_sha256=_sha256(dest / TOKENIZER),
        best_val_loss=best_val_loss,
    )
    (dest / PROVENANCE).write_text(prov.model_dump_json(indent=2) + "\n")
    return prov


def read_provenance(src: Path) -> Provenance:
    try:
        return Provenance.model_validate_json((src / PROVENANCE).read_text())
    except OSError as e:
        raise ShippedError(f"{src}: no shipped student here ({e.strerror})") from None
    except ValueError as e:
        raise ShippedError(
            f"{src / PROVENANCE}: not a provenance record ({str(e).splitlines()[0]})"
        ) from None


def load_student(
    src: Path, *, profile: str, student_cfg: ModelConfig, data_fingerprint: str
) -> tuple[TransformerLM, bytes, Provenance]:
    """The shipped student and tokenizer of ``src``, after checking that they are the files the
    provenance names and that they fit this build (profile, corpus split, and ``student_cfg``:
    the profile's student with the shipped tokenizer's vocabulary size)."""
    prov = read_provenance(src)
    for name, want in ((WEIGHTS, prov.weights_sha256), (TOKENIZER, prov.tokenizer_sha256)):
        try:
            got = _sha256(src / name)
        except OSError as e:
            raise ShippedError(f"{src / name}: {e.strerror}") from None
        if got != want:
            raise ShippedError(f"{src / name}: sha256 {got[:12]} is not the provenance's {want[:12]}")
    if prov.profile != profile:
        raise ShippedError(f"{src}: the shipped student is of profile {prov.profile!r}, not {profile!r}")
    if prov.data_fingerprint != data_fingerprint:
        raise ShippedError(
            f"{src}: the shipped student was trained on corpus split {prov.data_fingerprint}, "
            f"this corpus is {data_fingerprint}: build without --student"
        )
    tokenizer_model = (src / TOKENIZER).read_bytes()
    cfg = ModelConfig(**prov.student)
    # a small corpus's tokenizer may stop short of the profile's vocabulary; the build then
    # shrinks the student's to match (pipeline.build)
    student_cfg = replace(student_cfg, vocab_size=Tokenizer(tokenizer_model).vocab_size)
    if cfg != student_cfg:
        raise ShippedError(f"{src}: the shipped student's shape {cfg} is not the profile's {student_cfg}")
    lm = TransformerLM(cfg)
    lm.load_state_dict(torch.load(src / WEIGHTS, weights_only=True))
    return lm.eval(), tokenizer_model, prov
