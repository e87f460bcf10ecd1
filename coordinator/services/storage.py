"""Artifact storage on disk: bundles, the flat weight vector of every model version, published
``predict.pte`` programs, and compressed deltas between versions (a bounded cache).

Files are written to a temporary name and renamed, so a crash never leaves a half file under a
name the database points to. Weights are raw little-endian float32 (the layout's order).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import numpy.typing as npt

from coordinator.files import atomic_write, write_open
from protocol.bundle import Bundle, extract_bundle, load_bundle, pack_bundle, sha256_file
from protocol.delta import xor_delta

__all__ = ["ArtifactStore", "OpenDelta"]

FloatVec = npt.NDArray[np.float32]


_STALE_TEMP_SECONDS = 3600.0  # a temporary delta file this old belongs to no running write


@dataclass(frozen=True)
class OpenDelta:
    """A cached delta open for reading (see :meth:`ArtifactStore.open_delta`)."""

    file: BinaryIO
    size: int
    sha256: str


def _sha256_open(f: BinaryIO) -> str:
    """sha256 of an open file's whole content, read with ``pread`` (the offset is untouched)."""
    h = hashlib.sha256()
    offset = 0
    while chunk := os.pread(f.fileno(), 1 << 20, offset):
        h.update(chunk)
        offset += len(chunk)
    return h.hexdigest()


class ArtifactStore:
    """``root/bundles/<sha>/``, ``root/weights/<task>/v<N>.f32``, ``.../v<N>.predict.pte``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._bundles: dict[str, Bundle] = {}
        self._hashes: dict[tuple[str, int], str] = {}
        self._computing: dict[Path, threading.Lock] = {}  # deltas being computed (open_delta)
        self._lock = threading.Lock()
        (root / "bundles").mkdir(parents=True, exist_ok=True)
        (root / "weights").mkdir(parents=True, exist_ok=True)

    def add_bundle(self, tarball: Path) -> Bundle:
        """Unpack and verify a bundle tarball; stored under the sha256 of its manifest."""
        with tempfile.TemporaryDirectory(dir=self.root / "bundles") as tmp:
            bundle = extract_bundle(tarball, Path(tmp) / "b")
            sha = hashlib.sha256((bundle.root / "manifest.json").read_bytes()).hexdigest()
            dest = self.root / "bundles" / sha
            if not dest.exists():
                shutil.move(str(bundle.root), dest)
        return load_bundle(dest)

    def bundle(self, bundle_dir: str) -> Bundle:
        cached = self._bundles.get(bundle_dir)
        if cached is None:
            cached = self._bundles[bundle_dir] = load_bundle(self.root / "bundles" / bundle_dir, verify=False)
        return cached

    def bundle_tarball(self, bundle_dir: str) -> Path:
        """The bundle as one tarball (what devices download), written once."""
        path = self.root / "bundles" / f"{bundle_dir}.tar"
        if not path.exists():
            pack_bundle(self.root / "bundles" / bundle_dir, path)
        return path

    def sha256_of(self, path: Path) -> str:
        """sha256 of an immutable artifact (cached by path and size)."""
        key = (str(path), path.stat().st_size)
        digest = self._hashes.get(key)
        if digest is None:
            digest = self._hashes[key] = sha256_file(path)
        return digest

    def optimizer_state_path(self, task: str, version: int) -> Path:
        return self.root / "weights" / task / f"v{version}.opt.npz"

    def save_optimizer_state(self, task: str, version: int, state: dict[str, FloatVec]) -> None:
        if not state:
            return
        buf = io.BytesIO()
        np.savez(buf, **state)  # type: ignore[arg-type]
        atomic_write(self.optimizer_state_path(task, version), buf.getvalue())

    def load_optimizer_state(self, task: str, version: int) -> dict[str, FloatVec]:
        path = self.optimizer_state_path(task, version)
        if not path.exists():
            return {}
        with np.load(path) as data:
            return {k: data[k].astype(np.float32) for k in data.files}

    def weights_path(self, task: str, version: int) -> Path:
        return self.root / "weights" / task / f"v{version}.f32"

    def predict_path(self, task: str, version: int) -> Path:
        return self.root / "weights" / task / f"v{version}.predict.pte"

    def save_weights(self, task: str, version: int, vec: FloatVec) -> tuple[str, str]:
        """Write a version's vector; returns (relative file name, sha256)."""
        data = np.ascontiguousarray(vec, dtype="<f4").tobytes()
        path = self.weights_path(task, version)
        atomic_write(path, data)
        return str(path.relative_to(self.root)), hashlib.sha256(data).hexdigest()

    def load_weights(self, relative: str) -> FloatVec:
        return np.fromfile(self.root / relative, dtype="<f4").astype(np.float32, copy=False)

    def save_predict(self, task: str, version: int, program: bytes) -> tuple[str, str]:
        path = self.predict_path(task, version)
        atomic_write(path, program)
        return str(path.relative_to(self.root)), hashlib.sha256(program).hexdigest()

    def delta_path(self, task: str, version: int, base: int) -> Path:
        return self.root / "weights" / task / f"v{version}-from-v{base}.xdelta"

    def open_delta(
        self,
        task: str,
        version: int,
        base: int,
        new_file: str,
        base_file: str,
        *,
        max_files: int,
        max_bytes: int,
    ) -> OpenDelta:
        """The compressed delta from ``base`` to ``version``, open for reading: computed on
        first use, then cached on disk, with at most ``max_files`` deltas and ``max_bytes``
        bytes of them kept (the least recently served go first).

        The answer is served from the returned descriptor, opened before any other request
        could evict the file (a new delta is opened under its temporary name, then renamed into
        place), so eviction by this or any other worker only removes names: a response that is
        streaming never loses its file. The caller closes the file."""
        path = self.delta_path(task, version, base)
        f: BinaryIO
        try:
            f = path.open("rb")
        except FileNotFoundError:
            # The round's devices ask for the new version's delta all at once: one thread of
            # this worker computes it (about half a second for the demo model), the others
            # wait and read the file it wrote, instead of each computing the same delta.
            with self._lock:
                computing = self._computing.setdefault(path, threading.Lock())
            try:
                with computing:
                    try:
                        f = path.open("rb")
                    except FileNotFoundError:
                        data = xor_delta(self.load_weights(new_file), self.load_weights(base_file))
                        f = write_open(path, data)
                        size = len(data)
                        self._hashes[(str(path), size)] = hashlib.sha256(data).hexdigest()
                        del data
                        self.evict_deltas(max_files=max_files, max_bytes=max_bytes)
            finally:
                with self._lock:
                    if self._computing.get(path) is computing:
                        del self._computing[path]
        with contextlib.suppress(FileNotFoundError):  # evicted meanwhile: served all the same
            os.utime(path)  # recently served: evicted last
        size = os.fstat(f.fileno()).st_size
        digest = self._hashes.get((str(path), size))
        if digest is None:
            digest = self._hashes[(str(path), size)] = _sha256_open(f)
        return OpenDelta(f, size, digest)

    def evict_deltas(self, *, max_files: int, max_bytes: int) -> int:
        """Remove the least recently served deltas (by mtime) until at most ``max_files`` of
        them and ``max_bytes`` bytes remain, and temporary files a crash left behind; returns
        how many deltas went. Workers evicting at once may remove a file twice (harmless)."""
        found: list[tuple[int, int, Path]] = []
        now = time.time()
        for p in (self.root / "weights").glob("*/*xdelta*"):
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            if p.name.endswith(".xdelta"):
                found.append((st.st_mtime_ns, st.st_size, p))
            elif p.name.startswith(".") and now - st.st_mtime > _STALE_TEMP_SECONDS:
                p.unlink(missing_ok=True)  # a write that never finished
        found.sort()  # oldest first
        count, total, removed = len(found), sum(size for _, size, _ in found), 0
        for _, size, p in found:
            if count <= max_files and total <= max_bytes:
                break
            p.unlink(missing_ok=True)
            self._hashes.pop((str(p), size), None)
            count, total, removed = count - 1, total - size, removed + 1
        return removed

    def path(self, relative: str) -> Path:
        return self.root / relative
