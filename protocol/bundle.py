"""The model bundle manifest: what a device needs to run and train one model version.

A bundle is a directory (also shipped as a tarball) holding ``manifest.json``, the tokenizer,
``predict.pte``, ``train.pte`` and ``weights.safetensors``. Every file is named with its
SHA-256 in the manifest; loaders refuse a bundle whose files do not match.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field

from protocol.layout import Layout

__all__ = [
    "BUNDLE_FORMAT_VERSION",
    "MANIFEST_NAME",
    "Architecture",
    "FileEntry",
    "Manifest",
    "PredictSpec",
    "TrainSpec",
    "sha256_file",
]

BUNDLE_FORMAT_VERSION: Final = 1
MANIFEST_NAME = "manifest.json"
_HEX64 = r"^[0-9a-f]{64}$"
_FILE = r"^[A-Za-z0-9._-]{1,128}$"  # plain file names only: no directories, no '..'


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FileEntry(_Frozen):
    file: str = Field(pattern=_FILE)
    sha256: str = Field(pattern=_HEX64)
    size: int = Field(ge=0)


class Architecture(_Frozen):
    """The transformer's shape (model_export.model.ModelConfig)."""

    vocab_size: int = Field(gt=0)
    max_seq_len: int = Field(gt=0)
    d_model: int = Field(gt=0)
    n_layers: int = Field(gt=0)
    n_heads: int = Field(gt=0)
    d_ff: int = Field(gt=0)
    tie_embeddings: bool
    lora_rank: int = Field(ge=0)
    lora_alpha: float
    parameters: int = Field(gt=0)  # total parameter count of the model


class TrainSpec(_Frozen):
    """The joint forward+backward program and the flat vector it trains."""

    program: FileEntry
    batch_size: int = Field(gt=0)
    seq_len: int = Field(gt=0)
    trainable: Literal["full", "lora"]
    layout: Layout


class PredictSpec(_Frozen):
    """The inference program: methods ``prefill``, ``step`` and ``score``."""

    program: FileEntry
    quantization: Literal["int8", "fp32"]
    beam_batch: int = Field(gt=0)  # rows of every ``step`` call
    max_seq_len: int = Field(gt=0)


class Manifest(_Frozen):
    format_version: Literal[1] = BUNDLE_FORMAT_VERSION
    model_version: int = Field(ge=0)
    profile: str = Field(max_length=64)
    architecture: Architecture
    tokenizer: FileEntry
    weights: FileEntry  # safetensors of the trainable layout's tensors (flat vector slices)
    base_weights: FileEntry | None = None  # frozen base for LoRA bundles (safetensors)
    train: TrainSpec
    predict: PredictSpec
    metrics: dict[str, float] = Field(default_factory=dict)  # evaluation at build time

    def files(self) -> list[FileEntry]:
        out = [self.tokenizer, self.weights, self.train.program, self.predict.program]
        return out + ([self.base_weights] if self.base_weights else [])


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
