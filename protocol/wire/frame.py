"""Binary update format, version 1: the body of an update upload (masked ring elements, or
plain float updates when secure aggregation is off), with a fixed header and a CRC32.

All integers little-endian. Header (68 bytes)::

  offset size field
       0    4 magic          b"FKUP"
       4    2 version        uint16, = 1
       6    1 kind           uint8: 1 = RING, 3 = DENSE_F32 (2 reserved: see UpdateKind)
       7    1 bits           uint8: ring width k (1..32) for RING; 32 for DENSE_F32
       8    8 round_id       uint64
      16   32 layout_hash    raw SHA-256 of the parameter layout (Layout.hash())
      48    8 keep_fraction  float64 in (0, 1]: codec p (RING), 1 (DENSE)
      56    4 length         uint32: elements in the body
      60    4 dim            uint32: model dimension d (the layout size)
      64    4 crc32          zlib CRC32 of bytes 0..63 followed by the body

Body::

  RING        codec.pack_bits(values, bits): length k-bit ring elements, densely packed
  DENSE_F32   length (= dim) float32 values

Every malformed update is refused with its own :class:`~protocol.wire.messages.WireError`
subclass (below) before its body is used.
"""

from __future__ import annotations

import math
import struct
import zlib
from enum import IntEnum
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import Field

from protocol._encoding import RoundId
from protocol.codec import MAX_RING_BITS, CodecError, check_packed, pack_bits_into, packed_size, unpack_bits
from protocol.wire.messages import WIRE_VERSION, Message, WireError

__all__ = [
    "HEADER_SIZE",
    "MAGIC",
    "MAX_UPDATE_LENGTH",
    "BadBodyError",
    "BadHeaderError",
    "BadMagicError",
    "ChecksumError",
    "LayoutMismatchError",
    "LengthMismatchError",
    "NonFiniteError",
    "RoundMismatchError",
    "TruncatedError",
    "UnexpectedKindError",
    "UnknownKindError",
    "UnknownVersionError",
    "UpdateHeader",
    "UpdateKind",
    "pack_dense_update",
    "pack_update",
    "pack_update_into",
    "peek_header",
    "unpack_dense_update",
    "unpack_update",
    "update_size",
    "verify_update",
]


class TruncatedError(WireError):
    """Fewer bytes than the header (or the header's declared body) needs."""


class BadMagicError(WireError):
    """Not a fedkeys update (wrong magic bytes)."""


class UnknownVersionError(WireError):
    """A format version this code does not speak."""


class UnknownKindError(WireError):
    """An update kind this code does not know."""


class UnexpectedKindError(WireError):
    """A valid update of another kind than the caller expects (e.g. float where ring)."""


class BadHeaderError(WireError):
    """A header field outside its domain (bits, keep fraction, length limits)."""


class RoundMismatchError(WireError):
    """The update belongs to another round."""


class LayoutMismatchError(WireError):
    """The update was made for another parameter layout (layout hash differs)."""


class LengthMismatchError(WireError):
    """Element count or dimension differs from the expected one, or trailing bytes."""


class ChecksumError(WireError):
    """CRC32 mismatch: the bytes were altered in transit or storage."""


class BadBodyError(WireError):
    """The body decodes to invalid content (nonzero padding bits, a value out of range...)."""


class NonFiniteError(WireError):
    """A float body contains NaN or Inf."""


MAGIC = b"FKUP"
_HEADER = struct.Struct("<4sHBBQ32sdIII")
HEADER_SIZE = _HEADER.size  # 68
MAX_UPDATE_LENGTH = (1 << 31) - 1


class UpdateKind(IntEnum):
    """What the body holds. Value 2 is reserved: it was ``SPARSE_F32`` (top-k float updates),
    removed unused; a header of kind 2 is refused as unknown, and no new kind takes the value
    within format version 1."""

    RING = 1
    DENSE_F32 = 3


class UpdateHeader(Message):
    """The header of a binary update (also the stage-3 masked-input header)."""

    version: int = WIRE_VERSION
    kind: UpdateKind
    bits: int = Field(ge=1, le=32)
    round_id: RoundId
    layout_hash: str = Field(pattern=r"^[0-9a-f]{64}$")
    keep_fraction: float = Field(gt=0, le=1, allow_inf_nan=False)
    length: int = Field(ge=0, le=MAX_UPDATE_LENGTH)
    dim: int = Field(ge=1, le=MAX_UPDATE_LENGTH)
    crc32: int | None = None
    """Filled in by the unpack functions; ignored (recomputed) when packing."""


def _body_size(kind: UpdateKind, bits: int, length: int) -> int:
    if kind is UpdateKind.RING:
        return packed_size(length, bits)
    return 4 * length


def _head(header: UpdateHeader) -> bytes:
    return _HEADER.pack(
        MAGIC,
        header.version,
        int(header.kind),
        header.bits,
        header.round_id,
        bytes.fromhex(header.layout_hash),
        header.keep_fraction,
        header.length,
        header.dim,
        0,
    )[: HEADER_SIZE - 4]


def _frame(header: UpdateHeader, body: bytes) -> bytes:
    head = _head(header)
    crc = zlib.crc32(body, zlib.crc32(head))
    return b"".join((head, struct.pack("<I", crc), body))


def _check_pack_header(header: UpdateHeader, kind: UpdateKind, length: int) -> None:
    if header.version != WIRE_VERSION:
        raise UnknownVersionError(f"can only write version {WIRE_VERSION}")
    if header.kind is not kind:
        raise UnexpectedKindError(f"header kind {header.kind.name}, body is {kind.name}")
    if header.length != length:
        raise LengthMismatchError(f"header length {header.length}, body has {length} elements")
    if kind is not UpdateKind.RING and header.bits != 32:
        raise BadHeaderError("float updates have bits = 32")


def update_size(header: UpdateHeader) -> int:
    """Bytes of the framed update (header + body) that ``header`` describes."""
    return HEADER_SIZE + _body_size(header.kind, header.bits, header.length)


def pack_update_into(
    header: UpdateHeader, values: npt.NDArray[np.unsignedinteger[Any]], out: bytearray | memoryview
) -> int:
    """:func:`pack_update` written into ``out`` (at least :func:`update_size` bytes, e.g. a
    transport buffer): the values are bit-packed in place, then the CRC is computed over the
    packed bytes. Returns the number of bytes written."""
    v = np.asarray(values)
    _check_pack_header(header, UpdateKind.RING, int(v.shape[0]) if v.ndim == 1 else -1)
    total = update_size(header)
    buf = memoryview(out).cast("B")
    if len(buf) < total:
        raise BadBodyError(f"output buffer has {len(buf)} bytes, the update needs {total}")
    body = np.frombuffer(buf, dtype=np.uint8, count=total - HEADER_SIZE, offset=HEADER_SIZE)
    try:
        pack_bits_into(v, header.bits, body)
    except CodecError as e:
        raise BadBodyError(str(e)) from e
    head = _head(header)
    buf[: HEADER_SIZE - 4] = head
    crc = zlib.crc32(buf[HEADER_SIZE:total], zlib.crc32(head))
    struct.pack_into("<I", buf, HEADER_SIZE - 4, crc)
    return total


def pack_update(header: UpdateHeader, values: npt.NDArray[np.unsignedinteger[Any]]) -> bytes:
    """Header + bit-packed ring elements (kind RING; each value ``< 2**header.bits``)."""
    buf = bytearray(update_size(header))  # packed in place, then one copy into bytes
    pack_update_into(header, values, buf)
    return bytes(buf)


def pack_dense_update(header: UpdateHeader, values: npt.ArrayLike) -> bytes:
    """Header + float32 values (kind DENSE_F32, plain path)."""
    v = np.asarray(values, dtype=np.float32)
    _check_pack_header(header, UpdateKind.DENSE_F32, int(v.shape[0]) if v.ndim == 1 else -1)
    if header.dim != header.length:
        raise LengthMismatchError("dense update: length must equal dim")
    if not np.isfinite(v).all():
        raise NonFiniteError("dense update contains NaN or Inf")
    return _frame(header, v.astype("<f4").tobytes())


def peek_header(data: bytes | memoryview) -> UpdateHeader:
    """Parse and validate the header alone (no body checks, no checksum)."""
    buf = memoryview(data).cast("B")
    if len(buf) < HEADER_SIZE:
        raise TruncatedError(f"update has {len(buf)} bytes, the header alone needs {HEADER_SIZE}")
    magic, version, kind, bits, round_id, layout, keep, length, dim, crc = _HEADER.unpack(buf[:HEADER_SIZE])
    if magic != MAGIC:
        raise BadMagicError(f"bad magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != WIRE_VERSION:
        raise UnknownVersionError(f"update format version {version}, this code speaks {WIRE_VERSION}")
    try:
        kind_enum = UpdateKind(kind)
    except ValueError as e:
        raise UnknownKindError(f"unknown update kind {kind}") from e
    if not 1 <= bits <= MAX_RING_BITS or (kind_enum is not UpdateKind.RING and bits != 32):
        raise BadHeaderError(f"bits {bits} invalid for kind {kind_enum.name}")
    if not (math.isfinite(keep) and 0 < keep <= 1):
        raise BadHeaderError(f"keep_fraction {keep} not in (0, 1]")
    if round_id >= 1 << 63:
        raise BadHeaderError("round id out of range")
    if length > MAX_UPDATE_LENGTH or dim == 0 or dim > MAX_UPDATE_LENGTH:
        raise BadHeaderError(f"length {length} / dim {dim} out of range")
    return UpdateHeader(
        version=version,
        kind=kind_enum,
        bits=bits,
        round_id=round_id,
        layout_hash=bytes(layout).hex(),
        keep_fraction=keep,
        length=length,
        dim=dim,
        crc32=crc,
    )


def _parse(
    data: bytes | memoryview,
    kind: UpdateKind,
    *,
    expected_round: int,
    expected_layout_hash: str,
    expected_bits: int | None,
    expected_length: int | None,
    expected_dim: int | None,
) -> tuple[UpdateHeader, memoryview]:
    buf = memoryview(data).cast("B")
    header = peek_header(buf)
    if header.kind is not kind:
        raise UnexpectedKindError(f"update kind {header.kind.name}, expected {kind.name}")
    if header.round_id != expected_round:
        raise RoundMismatchError(f"update is for round {header.round_id}, not {expected_round}")
    if header.layout_hash != expected_layout_hash.lower():
        raise LayoutMismatchError(
            f"update layout {header.layout_hash[:12]}..., expected {expected_layout_hash[:12]}..."
        )
    if expected_bits is not None and header.bits != expected_bits:
        raise BadHeaderError(f"update has {header.bits}-bit elements, expected {expected_bits}")
    if expected_length is not None and header.length != expected_length:
        raise LengthMismatchError(f"update has {header.length} elements, expected {expected_length}")
    if expected_dim is not None and header.dim != expected_dim:
        raise LengthMismatchError(f"update dimension {header.dim}, expected {expected_dim}")
    if kind is UpdateKind.DENSE_F32 and header.length != header.dim:
        raise LengthMismatchError("dense update: length must equal dim")
    need = _body_size(kind, header.bits, header.length)
    body = buf[HEADER_SIZE:]
    if len(body) < need:
        raise TruncatedError(f"body has {len(body)} bytes, header declares {need}")
    if len(body) > need:
        raise LengthMismatchError(f"{len(body) - need} trailing bytes after the body")
    crc = zlib.crc32(body, zlib.crc32(buf[: HEADER_SIZE - 4]))
    if crc != header.crc32:
        raise ChecksumError(f"CRC32 {crc:08x} != header {header.crc32 or 0:08x}")
    if kind is UpdateKind.RING:  # the whole body, here where it arrives: nothing is left to fail later
        try:
            check_packed(body, header.bits, header.length)
        except CodecError as e:
            raise BadBodyError(str(e)) from e
    return header, body


def verify_update(
    data: bytes | memoryview,
    *,
    expected_round: int,
    expected_layout_hash: str,
    expected_bits: int | None = None,
    expected_length: int | None = None,
    expected_dim: int | None = None,
) -> tuple[UpdateHeader, memoryview]:
    """Check a RING update completely without decoding it (header, sizes, CRC, padding bits):
    the header and the packed body (for ``codec.unpack_bits_add``, which adds it into a sum in
    place). A body that passes cannot fail later when it is added."""
    return _parse(
        data,
        UpdateKind.RING,
        expected_round=expected_round,
        expected_layout_hash=expected_layout_hash,
        expected_bits=expected_bits,
        expected_length=expected_length,
        expected_dim=expected_dim,
    )


def unpack_update(
    data: bytes | memoryview,
    *,
    expected_round: int,
    expected_layout_hash: str,
    expected_bits: int | None = None,
    expected_length: int | None = None,
    expected_dim: int | None = None,
) -> tuple[UpdateHeader, npt.NDArray[np.uint32]]:
    """Parse a RING update: the header and ``length`` uint32 values ``< 2**bits``.

    Raises a :class:`WireError` subclass for every malformed case (see the module doc).
    """
    header, body = _parse(
        data,
        UpdateKind.RING,
        expected_round=expected_round,
        expected_layout_hash=expected_layout_hash,
        expected_bits=expected_bits,
        expected_length=expected_length,
        expected_dim=expected_dim,
    )
    try:
        values = unpack_bits(body, header.bits, header.length)
    except CodecError as e:
        raise BadBodyError(str(e)) from e
    return header, values


def unpack_dense_update(
    data: bytes | memoryview,
    *,
    expected_round: int,
    expected_layout_hash: str,
    expected_dim: int | None = None,
) -> tuple[UpdateHeader, npt.NDArray[np.float32]]:
    """Parse a DENSE_F32 update (plain path); refuses NaN/Inf."""
    header, body = _parse(
        data,
        UpdateKind.DENSE_F32,
        expected_round=expected_round,
        expected_layout_hash=expected_layout_hash,
        expected_bits=None,
        expected_length=None,
        expected_dim=expected_dim,
    )
    values = np.frombuffer(body, dtype="<f4").astype(np.float32)
    if not np.isfinite(values).all():
        raise NonFiniteError("dense update contains NaN or Inf")
    return header, values
