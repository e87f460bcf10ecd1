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

__all__ = ["DeltaError", "xor_delta", "xor_undelta"]

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
    """The vector whose :func:`xor_delta` against ``base`` is ``delta``.

    Streams: the byte planes are decompressed ``chunk`` bytes at a time straight into the
    output's byte columns and XORed in place, so the only vector allocated is the result
    (a device decodes this at the start of a round, when memory is tightest)."""
    b = np.ascontiguousarray(base, dtype="<f4")
    n = b.shape[0]
    want = 4 * n
    if want > _MAX_EXPANSION:
        raise DeltaError(f"a base of {n} floats is too large")
    out = np.empty(n, dtype="<u4")
    cols = out.view(np.uint8).reshape(n, 4)  # cols[:, p] is byte plane p
    d = zlib.decompressobj()
    pending: bytes = delta
    written = 0
    try:
        while True:
            piece = d.decompress(pending, chunk)
            pending = d.unconsumed_tail
            if written + len(piece) > want:
                raise DeltaError(f"delta expands beyond the {want} bytes the base needs")
            src = np.frombuffer(piece, dtype=np.uint8)
            off = 0
            while off < len(src):
                plane, i = divmod(written, n)
                take = min(n - i, len(src) - off)
                cols[i : i + take, plane] = src[off : off + take]
                off += take
                written += take
            if d.eof or not (piece or pending):
                break
    except zlib.error as e:
        raise DeltaError(f"corrupt delta: {e}") from None
    if written != want or not d.eof or pending:
        raise DeltaError(f"delta expands to {written} bytes, the base needs {want}")
    np.bitwise_xor(out, b.view("<u4"), out=out)
    return out.view(np.float32)
