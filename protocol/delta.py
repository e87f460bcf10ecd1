"""Lossless compressed difference between two versions of the flat weight vector.

A device holding version u downloads ``xor_delta(w_v, w_u)`` instead of w_v. Federated updates
move weights slightly, so sign, exponent and high mantissa bits mostly agree: the XOR of the
raw float32 bits is mostly zero bytes, and splitting it into byte planes (all lowest bytes,
then the next, ...) lets zlib find the runs. The result is bit-exact (no drift over versions).
"""

from __future__ import annotations

import zlib

import numpy as np
import numpy.typing as npt

__all__ = ["DeltaError", "XorUndelta", "xor_delta", "xor_undelta"]

FloatVec = npt.NDArray[np.float32]
_MAX_EXPANSION = 1 << 31  # refuse decompression bombs beyond 2 GiB


class DeltaError(ValueError):
    """The delta is corrupt or does not belong to the base vector."""


def xor_delta(new: FloatVec, base: FloatVec) -> bytes:
    a = np.ascontiguousarray(new, dtype="<f4")
    b = np.ascontiguousarray(base, dtype="<f4")
    if a.shape != b.shape or a.ndim != 1:
        raise DeltaError(f"vectors of shapes {a.shape} and {b.shape} have no delta")
    x = np.bitwise_xor(a.view(np.uint32), b.view(np.uint32))
    planes = x.view(np.uint8).reshape(-1, 4).T.copy()  # [4, d] byte planes
    return zlib.compress(planes.tobytes(), 6)


def xor_undelta(delta: bytes, base: FloatVec, *, chunk: int = 1 << 20) -> FloatVec:
    """The vector whose :func:`xor_delta` against ``base`` is ``delta`` (see :class:`XorUndelta`,
    which decodes a delta as it arrives)."""
    dec = XorUndelta(base, chunk=chunk)
    view = memoryview(delta)
    for i in range(0, len(view), _FEED):  # bounded pieces: no copies of the unread rest
        dec.write(view[i : i + _FEED])
    return dec.finish()


_FEED = 1 << 16  # compressed bytes handed to zlib at a time


class XorUndelta:
    """Streaming :func:`xor_undelta`: ``write`` the delta's bytes as they arrive (it is a
    download sink, see ``edge_client.transport.Sink``), then ``finish``.

    The byte planes are decompressed ``chunk`` bytes at a time straight into the output's byte
    columns and XORed with ``base`` at the end, so the only vector allocated is the result and
    the compressed delta is never held whole (a device decodes this at the start of a round,
    when memory is tightest). Anything malformed raises :class:`DeltaError`: a corrupt or
    truncated stream, bytes after its end, more or fewer bytes than ``base`` needs.
    """

    def __init__(self, base: FloatVec, *, chunk: int = 1 << 20) -> None:
        self._base = np.ascontiguousarray(base, dtype="<f4")
        n = self._base.shape[0]
        self._want = 4 * n
        if self._want > _MAX_EXPANSION:
            raise DeltaError(f"a base of {n} floats is too large")
        self._chunk = chunk
        self._out = np.empty(n, dtype="<u4")
        self._cols = self._out.view(np.uint8).reshape(n, 4)  # cols[:, p] is byte plane p
        self.reset()

    def reset(self) -> None:
        """Start over (a download that is retried from its first byte)."""
        self._d = zlib.decompressobj()
        self._written = 0

    def _place(self, piece: bytes) -> None:
        n = self._out.shape[0]
        if self._written + len(piece) > self._want:
            raise DeltaError(f"delta expands beyond the {self._want} bytes the base needs")
        src = np.frombuffer(piece, dtype=np.uint8)
        off = 0
        while off < len(src):
            plane, i = divmod(self._written, n)
            take = min(n - i, len(src) - off)
            self._cols[i : i + take, plane] = src[off : off + take]
            off += take
            self._written += take

    def write(self, data: bytes | memoryview) -> None:
        if self._d.eof:
            if len(data):
                raise DeltaError("bytes after the end of the delta")
            return
        try:
            pending: bytes | memoryview = data
            while True:  # until the input is used up and no full piece of output is pending
                piece = self._d.decompress(pending, self._chunk)
                self._place(piece)
                pending = self._d.unconsumed_tail
                if self._d.eof:
                    if len(pending) or self._d.unused_data:
                        raise DeltaError("bytes after the end of the delta")
                    break
                if not len(pending) and len(piece) < self._chunk:
                    break
        except zlib.error as e:
            raise DeltaError(f"corrupt delta: {e}") from None

    def finish(self) -> FloatVec:
        """The decoded vector (after the whole delta was written)."""
        if not self._d.eof:
            raise DeltaError(f"delta ends early: {self._written} of the {self._want} bytes the base needs")
        if self._written != self._want:
            raise DeltaError(f"delta expands to {self._written} bytes, the base needs {self._want}")
        out = self._out
        np.bitwise_xor(out, self._base.view("<u4"), out=out)
        return out.view(np.float32)
