"""The model bundle: what a device needs to run and train one model version.

A bundle is a directory (also shipped as a tarball) holding ``manifest.json``, the tokenizer,
``predict.pte``, ``train.pte`` and ``weights.safetensors``. Every file is named with its
SHA-256 in the manifest; loaders refuse a bundle whose files do not match.

model_export writes bundles, the coordinator unpacks and serves them, devices download and load
them: the manifest schema and the reading, checking, extracting and packing of a bundle are
contract between the three, so they live here, below all of them (with the standard library
and numpy only: no torch, no ExecuTorch, no safetensors package).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from protocol.layout import FloatVec, Layout

__all__ = [
    "BUNDLE_FORMAT_VERSION",
    "MANIFEST_NAME",
    "Architecture",
    "Bundle",
    "BundleError",
    "FileEntry",
    "Manifest",
    "PredictSpec",
    "TrainSpec",
    "extract_bundle",
    "load_bundle",
    "pack_bundle",
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


class BundleError(Exception):
    """The bundle is missing, malformed, or a file does not match its recorded hash."""


@dataclass(frozen=True)
class Bundle:
    """A verified bundle directory."""

    root: Path
    manifest: Manifest

    def path(self, entry: FileEntry) -> Path:
        return self.root / entry.file

    def initial_weights(self) -> FloatVec:
        """The bundle's trainable weights as one flat vector in layout order."""
        tensors = _read_f32_tensors(self.path(self.manifest.weights))
        return self.manifest.train.layout.flatten(tensors)


_SAFETENSORS_MAX_HEADER = 100 << 20  # the safetensors library's own bound on the JSON header


def _read_f32_tensors(path: Path) -> dict[str, npt.NDArray[np.float32]]:
    """The float32 tensors of a safetensors file, read with numpy.

    The format (huggingface.co/docs/safetensors): an 8-byte little-endian header size ``N``,
    ``N`` bytes of JSON mapping each tensor name to its ``dtype``, ``shape`` and byte range
    ``data_offsets`` (relative to the end of the header; an optional ``__metadata__`` entry
    holds strings), then the little-endian, row-major data. model_export writes float32 only
    (``F32``); anything else is refused, as is a range that does not fit its shape.
    """
    with path.open("rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if not 2 <= size <= _SAFETENSORS_MAX_HEADER:
            raise BundleError(f"{path}: not a safetensors file (header size {size})")
        try:
            header = json.loads(f.read(size))
        except (ValueError, UnicodeDecodeError) as e:
            raise BundleError(f"{path}: unreadable safetensors header ({e})") from None
        data = f.read()
    if not isinstance(header, dict):
        raise BundleError(f"{path}: the safetensors header is not a JSON object")
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, (begin, end) = _tensor_info(path, name, info)
        count = math.prod(shape)
        if dtype != "F32" or not 0 <= begin <= end <= len(data) or end - begin != 4 * count:
            raise BundleError(f"{path}: tensor {name!r} is not {shape} float32 at {begin}..{end}")
        out[name] = np.frombuffer(data, dtype="<f4", count=count, offset=begin).reshape(shape)
    return out


def _tensor_info(path: Path, name: str, info: Any) -> tuple[str, tuple[int, ...], tuple[int, int]]:
    try:
        shape = tuple(int(n) for n in info["shape"])
        begin, end = (int(n) for n in info["data_offsets"])
        return str(info["dtype"]), shape, (begin, end)
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(f"{path}: malformed safetensors entry {name!r} ({e})") from None


def _verify(root: Path, entry: FileEntry) -> None:
    path = root / entry.file
    if not path.is_file():
        raise BundleError(f"{path}: missing (listed in the manifest)")
    if path.stat().st_size != entry.size:
        raise BundleError(f"{path}: size {path.stat().st_size} != manifest {entry.size}")
    if sha256_file(path) != entry.sha256:
        raise BundleError(f"{path}: sha256 does not match the manifest (corrupt or tampered)")


def load_bundle(root: Path, *, verify: bool = True) -> Bundle:
    """Parse ``root/manifest.json`` and check every file it lists."""
    mpath = root / MANIFEST_NAME
    if not mpath.is_file():
        raise BundleError(f"{root}: not a model bundle (no {MANIFEST_NAME})")
    try:
        manifest = Manifest.model_validate(json.loads(mpath.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{mpath}: not valid JSON ({e})") from None
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise BundleError(f"{mpath}: invalid manifest at {where}: {first['msg']}") from None
    if verify:
        for entry in manifest.files():
            _verify(root, entry)
    return Bundle(root, manifest)


def extract_bundle(tarball: Path, dest: Path) -> Bundle:
    """Unpack a bundle tarball (plain files only, no paths outside ``dest``) and verify it."""
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(tarball) as tar:
            seen: set[str] = set()
            for member in tar.getmembers():
                # flat regular files only: "name" or "./name", each once, never "..", links or dirs
                name = member.name.removeprefix("./")
                if not member.isfile() or name != Path(name).name or name in ("", ".", "..") or name in seen:
                    raise BundleError(f"{tarball}: unexpected entry {member.name!r}")
                seen.add(name)
                src = tar.extractfile(member)
                if src is None:
                    raise BundleError(f"{tarball}: cannot read {member.name!r}")
                with src, (dest / name).open("wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)  # in chunks, not whole files in memory
    except tarfile.TarError as e:
        raise BundleError(f"{tarball}: not a readable tarball ({e})") from None
    return load_bundle(dest)


def pack_bundle(bundle_dir: Path, dest: Path) -> Path:
    """Write the bundle's files, flat, into the tarball ``dest`` (atomically: a temporary file
    of its own, so that several coordinator workers packing the same bundle at once never
    write into one file and serve it half-written)."""
    fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f, tarfile.open(fileobj=f, mode="w") as tar:
            for entry in sorted(bundle_dir.iterdir()):
                if entry.is_file():
                    tar.add(entry, arcname=entry.name)
        tmp.replace(dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest
