"""The device's global weight vectors, by sha256: :class:`WeightsCache`.

A round's plan names the global weights by sha256; the cache returns them from memory or disk
when it holds them, else downloads them: as an XOR delta from the newest version it holds
(``protocol.delta``: a fraction of the bytes) or whole, streamed into a file or one buffer.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edge_client.errors import Aborted
from edge_client.memory import release_pages
from edge_client.transport import ApiError, ArraySink, CheckedSink, FileSink, Transport
from protocol.bundle import sha256_file
from protocol.delta import DeltaError, XorUndelta
from protocol.layout import FloatVec
from protocol.wire import ArtifactRef, RoundPlan

__all__ = ["WeightsCache"]

log = logging.getLogger(__name__)

_FILE_RE = re.compile(r"^v(\d+)-([0-9a-f]{64})\.f32$")


class WeightsCache:
    """Global weight vectors by sha256; downloads deltas from a held version when it can.

    Vectors are read-only. Without ``directory`` they are held in memory (simulated devices).
    With it, each vector is a file there (``v<version>-<sha256>.f32``, streamed to disk as it
    downloads) and :meth:`get` returns a read-only memory map of it: a device holds no private
    copy of the global weights, only the pages it is reading (see :func:`release_pages`), and
    the cache survives restarts. ``deltas=False`` always downloads whole vectors: more bytes,
    but no decoding temporaries (an XOR delta decodes into a new vector as it arrives).
    """

    def __init__(self, max_items: int = 2, directory: Path | None = None, *, deltas: bool = True) -> None:
        self.max_items = max_items
        self.directory = directory
        self.deltas = deltas  # ask for XOR deltas against a held older version
        self._by_sha: dict[str, tuple[int, FloatVec]] = {}
        self._files: dict[str, tuple[int, Path]] = {}
        if directory is not None and directory.is_dir():
            for f in directory.iterdir():
                m = _FILE_RE.match(f.name)
                if m:
                    self._files[m.group(2)] = (int(m.group(1)), f)
                elif f.name.endswith(".part"):
                    f.unlink(missing_ok=True)

    def _held(self) -> list[tuple[int, str]]:
        if self.directory is None:
            return [(v, sha) for sha, (v, _) in self._by_sha.items()]
        return [(v, sha) for sha, (v, _) in self._files.items()]

    def _load(self, sha: str) -> FloatVec | None:
        if self.directory is None:
            hit = self._by_sha.get(sha)
            return None if hit is None else hit[1]
        if sha not in self._files:
            return None
        version, path = self._files[sha]
        if sha not in self._by_sha:  # first use in this process: check the file once
            if sha256_file(path) != sha:
                log.warning("cached weights %s are corrupt; fetching them again", path.name)
                path.unlink(missing_ok=True)
                del self._files[sha]
                return None
            self._by_sha[sha] = (version, _map(path))
        return self._by_sha[sha][1]

    def file(self, sha: str) -> Path | None:
        """The file holding the vector ``sha`` (directory mode, once it is held), else None."""
        hit = self._files.get(sha) if self.directory is not None else None
        return None if hit is None else hit[1]

    def _digest(self, vec: FloatVec) -> str:
        return hashlib.sha256(vec.data).hexdigest()

    def _intern(self, sha: str, vec: FloatVec) -> FloatVec:
        """The vector to keep for ``sha`` in memory mode (a hook: simulated devices of one
        process share one copy of each version)."""
        return vec

    def _store(self, sha: str, version: int, vec: FloatVec) -> FloatVec:
        """Keep a vector that is not yet on disk (memory mode, or a delta-decoded vector)."""
        if self.directory is None:
            vec.setflags(write=False)
            self._by_sha[sha] = (version, self._intern(sha, vec))
        else:
            path = self.directory / f"v{version}-{sha}.f32"
            tmp = path.with_name(f".{path.name}.part")
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
                vec.astype("<f4", copy=False).tofile(f)
            tmp.replace(path)
            self._files[sha] = (version, path)
            self._by_sha[sha] = (version, _map(path))
        self._evict()
        return self._by_sha[sha][1]

    def _evict(self) -> None:
        while len(self._held()) > self.max_items:
            _, sha = min(self._held())
            self._by_sha.pop(sha, None)
            if self.directory is not None:
                self._files.pop(sha)[1].unlink(missing_ok=True)

    def get(
        self,
        transport: Transport,
        plan: RoundPlan,
        bundle_weights: Callable[[], tuple[int, FloatVec]] | None = None,
    ) -> FloatVec:
        """The plan's global weights. ``bundle_weights`` gives the (version, vector) the model
        bundle ships with: a device that holds no version yet starts from it, so its first
        round downloads a delta (or nothing, while the task is still at that version)."""
        sha = plan.weights.sha256
        hit = self._load(sha)
        if hit is not None:
            return hit
        if bundle_weights is not None and not self._held():
            version, vec = bundle_weights()
            vec = np.ascontiguousarray(vec, dtype="<f4")
            if vec.shape[0] * 4 == plan.weights.size and version <= plan.model_version:
                digest = self._digest(vec)
                stored = self._store(digest, version, vec)
                if digest == sha:
                    return stored
            del vec
        held = sorted(self._held(), key=lambda x: -x[0])
        if self.deltas and held and held[0][0] < plan.model_version:
            base_version, base_sha = held[0]
            base = self._load(base_sha)
            try:
                if base is None:
                    raise DeltaError("the held base vector is gone")
                decoder = XorUndelta(base)  # decodes as the delta arrives: never held whole
                transport.download_to(plan.weights.url, decoder, params={"base": base_version})
                candidate = decoder.finish()
                del decoder
                release_pages(base)
            except (DeltaError, ApiError) as e:
                log.info("delta download failed (%s); fetching the whole vector", e)
            else:
                if hashlib.sha256(candidate.astype("<f4", copy=False).data).hexdigest() == sha:
                    return self._store(sha, plan.model_version, candidate)
        if self.directory is None:
            buf = ArraySink(plan.weights.size)
            _fetch_vector(transport, plan.weights, buf)
            return self._store(sha, plan.model_version, buf.buffer.view("<f4").astype(np.float32, copy=False))
        path = self.directory / f"v{plan.model_version}-{sha}.f32"
        sink = FileSink(path, limit=plan.weights.size)  # streamed to disk: never whole in memory
        try:
            _fetch_vector(transport, plan.weights, sink)
            sink.commit()
        finally:
            sink.discard()
        self._files[sha] = (plan.model_version, path)
        self._by_sha[sha] = (plan.model_version, _map(path))
        self._evict()
        return self._by_sha[sha][1]


def _fetch_vector(transport: Transport, ref: ArtifactRef, sink: CheckedSink) -> None:
    """The whole vector ``ref`` into ``sink``; :class:`Aborted` if another artifact arrives."""
    try:
        transport.fetch(ref, sink)
    except ValueError as e:  # longer than announced, another sha256 (or an unsafe URL)
        raise Aborted(f"downloaded weights: {e}") from None
    if sink.size % 4:
        raise Aborted("downloaded weights are not float32 values (their size is not a multiple of 4)")


def _map(path: Path) -> FloatVec:
    """A read-only float32 view of a whole file (memory-mapped: pages load on access)."""
    with path.open("rb") as f:
        if path.stat().st_size == 0:
            return np.empty(0, dtype=np.float32)
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return np.frombuffer(mm, dtype="<f4").astype(np.float32, copy=False)
