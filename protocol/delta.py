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


def xor_undelta(delta: bytes, base: FloatVec) -> FloatVec:
    b = np.ascontiguousarray(base, dtype="<f4")
    want = 4 * b.shape[0]
    try:
        d = zlib.decompressobj()
        raw = d.decompress(delta, min(want + 1, _MAX_EXPANSION))
    except zlib.error as e:
        raise DeltaError(f"corrupt delta: {e}") from None
    if len(raw) != want or d.unconsumed_tail or not d.eof:
        raise DeltaError(f"delta expands to {len(raw)} bytes, the base needs {want}")
    planes = np.frombuffer(raw, dtype=np.uint8).reshape(4, -1)
    x = planes.T.copy().view(np.uint32).reshape(-1)
    return np.bitwise_xor(x, b.view(np.uint32)).view(np.float32).astype(np.float32)
