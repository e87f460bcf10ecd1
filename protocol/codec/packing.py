"""Bit packing of ``k``-bit ring elements: the body of a masked upload, and its checks.

:func:`pack_bits` stores ``m`` values of ``bits`` bits in ``ceil(m * bits / 8)`` bytes
(rounded up to whole groups of 8 elements; the layout is in its docstring), vectorised chunk by
chunk with SWAR merges so that no vector-sized temporary is made. :func:`check_packed`
validates a received body (size, zero padding bits) before anything reads it, and
:func:`unpack_bits_add` adds a body into the server's running sum in place.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import numpy.typing as npt

from protocol.codec.params import MAX_RING_BITS, CodecError, RingVec

__all__ = [
    "PACK_CHUNK",
    "UNPACK_CHUNK",
    "check_packed",
    "pack_bits",
    "pack_bits_into",
    "packed_size",
    "unpack_bits",
    "unpack_bits_add",
]


def packed_size(m: int, bits: int) -> int:
    """Bytes of :func:`pack_bits` output for ``m`` elements of ``bits`` bits."""
    if not 1 <= bits <= MAX_RING_BITS:
        raise CodecError(f"bits must be in [1, {MAX_RING_BITS}], got {bits}")
    whole, rest = divmod(bits, 8)
    return m * whole + ((m + 7) // 8) * rest


_LOW_DTYPES = {1: "<u1", 2: "<u2", 4: "<u4"}
PACK_CHUNK = 1 << 18  # elements per chunk (a multiple of 8): the scratch stays in L2
UNPACK_CHUNK = PACK_CHUNK
_U64 = np.dtype("<u8")
_ALL64 = (1 << 64) - 1
# SWAR steps over one uint64 per group of 8 fields: the half-lane width h (8, 16, 32 bits)
# and the mask of the low half of every 2h-bit lane.
_LANES = ((8, 0x00FF00FF00FF00FF), (16, 0x0000FFFF0000FFFF), (32, 0x00000000FFFFFFFF))


def _replicate(field: int, lane: int) -> int:
    return sum(field << (lane * i) for i in range(64 // lane))


@lru_cache(maxsize=8)
def _swar_consts(rest: int) -> tuple[tuple[np.uint64, np.uint64, np.uint64, np.uint64], ...]:
    """Per step: (shift, low-half mask, high-half mask, mask of the low field per lane)."""
    out = []
    for h, lo in _LANES:
        w = rest * h // 8  # field width before this step: rest, 2 rest, 4 rest
        field = _replicate((1 << w) - 1, 2 * h)
        out.append((np.uint64(h - w), np.uint64(lo), np.uint64(_ALL64 ^ lo), np.uint64(field)))
    return tuple(out)


@lru_cache(maxsize=8)
def _group_dtype(rest: int) -> np.dtype[Any]:
    """The first ``rest`` bytes of every 8-byte word, as one opaque field (a strided view)."""
    return np.dtype({"names": ["g"], "formats": [f"V{rest}"], "offsets": [0], "itemsize": 8})


def _squeeze(x: npt.NDArray[np.uint64], rest: int, tmp: npt.NDArray[np.uint64]) -> None:
    """In place: each word holds 8 byte-fields ``< 2**rest`` -> their ``8 rest``-bit
    little-endian concatenation ``sum_j f_j << (rest j)`` (three pairwise merges)."""
    for shift, lo, hi, _ in _swar_consts(rest):
        np.bitwise_and(x, hi, out=tmp)
        np.right_shift(tmp, shift, out=tmp)
        np.bitwise_and(x, lo, out=x)
        np.bitwise_or(x, tmp, out=x)


def _spread(x: npt.NDArray[np.uint64], rest: int, tmp: npt.NDArray[np.uint64]) -> None:
    """Inverse of :func:`_squeeze`: each ``8 rest``-bit word -> 8 byte-fields."""
    for shift, _, hi, field in reversed(_swar_consts(rest)):
        np.left_shift(x, shift, out=tmp)
        np.bitwise_and(tmp, hi, out=tmp)
        np.bitwise_and(x, field, out=x)
        np.bitwise_or(x, tmp, out=x)


def pack_bits(values: npt.NDArray[np.unsignedinteger[Any]], bits: int) -> bytes:
    """Dense little-endian packing of ``bits``-bit unsigned values (vectorised).

    Layout, with ``a = bits // 8`` and ``r = bits % 8``:

    * first ``m * a`` bytes: the low ``8a`` bits of each element, ``a`` bytes little-endian,
      element after element (for ``a = 3``: first the low 16 bits of every element, 2 bytes
      each, then bits 16..23 of every element, 1 byte each);
    * then ``ceil(m / 8) * r`` bytes: the high ``r`` bits of the elements in groups of 8 (the
      last group padded with zeros); group ``g`` is the ``8r``-bit little-endian integer
      ``sum_j hi[8g + j] << (r * j)``.

    The total is ``ceil(m * bits / 8)`` rounded up to whole groups. Values ``>= 2**bits`` are
    refused (never truncated).
    """
    v = np.asarray(values)
    if v.ndim != 1 or v.dtype.kind != "u":
        raise CodecError(f"pack_bits needs a 1-D unsigned array, got {v.dtype} {v.shape}")
    out = np.empty(packed_size(v.shape[0], bits), dtype=np.uint8)
    pack_bits_into(v, bits, out)
    return out.tobytes()


def pack_bits_into(
    values: npt.NDArray[np.unsignedinteger[Any]], bits: int, out: npt.NDArray[np.uint8]
) -> None:
    """:func:`pack_bits` writing into ``out`` (a uint8 array of ``packed_size`` bytes).

    Chunk by chunk (L2-sized scratch, no vector-sized temporary): the low bytes by casting
    stores, the high ``r`` bits of 8 elements gathered into one uint64 and squeezed together
    with three SWAR merges, then stored ``r`` bytes per group.
    """
    v = values
    if v.ndim != 1 or v.dtype.kind != "u":
        raise CodecError(f"pack_bits needs a 1-D unsigned array, got {v.dtype} {v.shape}")
    m = v.shape[0]
    size = packed_size(m, bits)
    if out.dtype != np.uint8 or out.shape != (size,):
        raise CodecError(f"output buffer must be {size} uint8, got {out.dtype} {out.shape}")
    if m == 0:
        return
    if int(v.max()) >> bits:
        raise CodecError(f"value {int(v.max())} does not fit in {bits} bits")
    whole, rest = divmod(bits, 8)
    base = m * whole
    if rest:
        groups = (min(m, PACK_CHUNK) + 7) // 8
        hib = np.empty(8 * groups, dtype=np.uint8)
        tmp = np.empty(groups, dtype=_U64)
        gdt = _group_dtype(rest)
        vdt = f"V{rest}"
    for s in range(0, m, PACK_CHUNK):
        e = min(m, s + PACK_CHUNK)
        vc = v[s:e]
        if whole in _LOW_DTYPES:
            np.copyto(out[s * whole : e * whole].view(_LOW_DTYPES[whole]), vc, casting="unsafe")
        elif whole == 3:
            np.copyto(out[2 * s : 2 * e].view("<u2"), vc, casting="unsafe")
            np.right_shift(vc, 16, out=out[2 * m + s : 2 * m + e], casting="unsafe")
        if rest:
            n = e - s
            g = (n + 7) // 8
            h = hib[: 8 * g]
            np.right_shift(vc, 8 * whole, out=h[:n], casting="unsafe")
            h[n:] = 0
            x = h.view(_U64)
            _squeeze(x, rest, tmp[:g])
            g0 = base + (s // 8) * rest
            out[g0 : g0 + g * rest].view(vdt)[:] = x.view(gdt)["g"]


def check_packed(data: bytes | memoryview, bits: int, m: int) -> npt.NDArray[np.uint8]:
    """The packed buffer as a uint8 array, after checking its size and padding bits (every
    check a packed body can fail: ``m`` ``bits``-bit values are otherwise any bit pattern)."""
    size = packed_size(m, bits)
    buf = memoryview(data).cast("B")
    if len(buf) != size:
        raise CodecError(f"packed data has {len(buf)} bytes, {m} x {bits}-bit needs {size}")
    src = np.frombuffer(buf, dtype=np.uint8)
    rest = bits % 8
    if rest and m % 8:
        last = int.from_bytes(src[size - rest :].tobytes(), "little")
        if last >> (rest * (m % 8)):
            raise CodecError("nonzero padding bits after the last element")
    return src


class _Unpacker:
    """Chunks of a validated :func:`pack_bits` buffer as words of the ring dtype."""

    def __init__(self, src: npt.NDArray[np.uint8], bits: int, m: int) -> None:
        self.src, self.bits, self.m = src, bits, m
        self.whole, self.rest = divmod(bits, 8)
        self.dtype = np.dtype("<u1" if bits <= 8 else "<u2" if bits <= 16 else "<u4")
        chunk = min(m, UNPACK_CHUNK)
        groups = (chunk + 7) // 8
        direct = self.rest == 0 and self.whole in _LOW_DTYPES
        self.val = np.empty(0 if direct else chunk, dtype=self.dtype)
        if self.rest:
            self.grp = np.empty(8 * groups, dtype=np.uint8)
            self.tmp = np.empty(groups, dtype=_U64)
            self.keep = np.uint64((1 << (8 * self.rest)) - 1)

    def chunk(self, s: int, e: int) -> npt.NDArray[Any]:
        """Elements ``s..e`` (``s`` a multiple of 8); the array is reused by the next call."""
        src, m, whole, rest = self.src, self.m, self.whole, self.rest
        n = e - s
        if rest == 0 and whole in _LOW_DTYPES:
            return src[s * whole : e * whole].view(_LOW_DTYPES[whole])
        val = self.val[:n]
        if rest:
            g = (n + 7) // 8
            g0 = m * whole + (s // 8) * rest
            grp = self.grp[: 8 * g]
            grp.view(_group_dtype(rest))["g"][:] = src[g0 : g0 + g * rest].view(f"V{rest}")
            x = grp.view(_U64)
            np.bitwise_and(x, self.keep, out=x)  # bytes rest..7 hold the previous chunk
            _spread(x, rest, self.tmp[:g])
            hi = grp[:n]
            if whole == 0:
                return hi
            np.copyto(val, hi)
        if whole == 1:
            val <<= 8
            val |= src[s:e]
        elif whole == 2:
            val <<= 16
            val |= src[2 * s : 2 * e].view("<u2")
        elif whole == 3:
            if rest:
                val <<= 8
                val |= src[2 * m + s : 2 * m + e]
            else:
                np.copyto(val, src[2 * m + s : 2 * m + e])
            val <<= 16
            val |= src[2 * s : 2 * e].view("<u2")
        return val


def unpack_bits(data: bytes | memoryview, bits: int, m: int) -> RingVec:
    """Inverse of :func:`pack_bits`: ``m`` uint32 values (padding bits must be zero)."""
    unpacker = _Unpacker(check_packed(data, bits, m), bits, m)
    out = np.empty(m, dtype=np.uint32)
    for start in range(0, m, UNPACK_CHUNK):
        stop = min(m, start + UNPACK_CHUNK)
        out[start:stop] = unpacker.chunk(start, stop)
    return out


def unpack_bits_add(data: bytes | memoryview, bits: int, acc: npt.NDArray[np.unsignedinteger[Any]]) -> None:
    """``acc += unpack_bits(data, bits, len(acc))`` modulo the width of ``acc``'s dtype,
    chunk by chunk: no vector-sized temporary (what a server adding uploads needs). The
    buffer is fully validated (size, padding bits) before ``acc`` is touched."""
    if acc.ndim != 1 or acc.dtype.kind != "u":
        raise CodecError("acc must be a 1-D unsigned array")
    m = acc.shape[0]
    unpacker = _Unpacker(check_packed(data, bits, m), bits, m)
    for start in range(0, m, UNPACK_CHUNK):
        stop = min(m, start + UNPACK_CHUNK)
        target = acc[start:stop]
        np.add(target, unpacker.chunk(start, stop), out=target, casting="unsafe")
