"""Loading a model bundle on a device: manifest parsing and SHA-256 checks of every file."""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from protocol.bundle import MANIFEST_NAME, FileEntry, Manifest, sha256_file
from protocol.layout import FloatVec

__all__ = ["Bundle", "BundleError", "extract_bundle", "load_bundle", "pack_bundle"]


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
        from safetensors.numpy import load_file

        tensors = load_file(str(self.path(self.manifest.weights)))
        return self.manifest.train.layout.flatten(tensors)


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
