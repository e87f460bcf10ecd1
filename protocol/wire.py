"""Wire format between devices and the coordinator, version 1 (served under ``/v1``).

Sections:

1. Versioning and errors.
2. Secure aggregation: stage names, round parameters and one typed model per stage message.
3. Binary update format: the body of an update upload (masked ring elements, or plain
   float updates when secure aggregation is off), with a fixed header and a CRC32.
4. HTTP API models (check-in, round plan, ...): added by the coordinator; keep them below.

JSON messages are pydantic models (``extra="forbid"``, frozen); bytes fields are base64 in
JSON. Every length is bounded so that oversize input is refused at parse time.
"""

from __future__ import annotations

import math
import struct
import zlib
from enum import IntEnum, StrEnum
from typing import Annotated, Any

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, model_validator

from protocol._encoding import B64Bytes, Bytes12, Bytes32, DeviceId, RoundId
from protocol.codec import (
    MAX_RING_BITS,
    CodecError,
    CodecParams,
    SparseUpdate,
    check_packed,
    pack_bits_into,
    packed_size,
    unpack_bits,
)

__all__ = [
    "API_PREFIX",
    "HEADER_SIZE",
    "MAGIC",
    "MAX_DEVICES",
    "MAX_INT32",
    "MAX_UPDATE_LENGTH",
    "WIRE_VERSION",
    "AdvertiseKeys",
    "ArtifactRef",
    "BadBodyError",
    "BadHeaderError",
    "BadMagicError",
    "CheckinRequest",
    "CheckinResponse",
    "ChecksumError",
    "DeviceState",
    "EncryptedShare",
    "EnrollRequest",
    "EnrollResponse",
    "EvalCounts",
    "LayoutMismatchError",
    "LengthMismatchError",
    "MaskedInputRequest",
    "NonFiniteError",
    "RevealedShare",
    "RoundMismatchError",
    "RoundPlan",
    "RoundStatus",
    "SecAggParams",
    "ShareKeys",
    "ShareKeysRequest",
    "SharePlaintext",
    "Stage",
    "TrainReport",
    "TrainingPlan",
    "TruncatedError",
    "UnexpectedKindError",
    "UnknownKindError",
    "UnknownVersionError",
    "UnmaskRequest",
    "UnmaskResponse",
    "UpdateHeader",
    "UpdateKind",
    "WireError",
    "pack_dense_update",
    "pack_sparse_update",
    "pack_update",
    "pack_update_into",
    "peek_header",
    "unpack_dense_update",
    "unpack_sparse_update",
    "unpack_update",
    "update_size",
    "verify_update",
]

# ========================================================================================
# 1. Versioning and errors
# ========================================================================================

WIRE_VERSION = 1
API_PREFIX = f"/v{WIRE_VERSION}"
MAX_DEVICES = 10_000  # largest roster a message may carry
MAX_INT32 = (1 << 31) - 1
"""Largest count a message may carry: the coordinator stores counts in 32-bit columns (a larger
one was a 500 on PostgreSQL, which checks the range)."""


class WireError(ValueError):
    """A message or update body that does not parse or does not match what was expected."""


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
    """The body decodes to invalid content (nonzero padding, unsorted sparse indices...)."""


class NonFiniteError(WireError):
    """A float body contains NaN or Inf."""


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# ========================================================================================
# 2. Secure aggregation messages (protocol.secagg implements the stages)
# ========================================================================================


class Stage(StrEnum):
    """Stages of one secure-aggregation round, in order."""

    ADVERTISE_KEYS = "advertise_keys"
    SHARE_KEYS = "share_keys"
    MASKED_INPUT = "masked_input"
    UNMASK = "unmask"
    DONE = "done"


class SecAggParams(_Message):
    """Per-round secure-aggregation settings, known to the server and every device (they are
    part of the round plan). ``degree``/``threshold`` ``None`` mean the defaults for the
    number of devices that advertised keys (see :mod:`protocol.secagg.graph`)."""

    round_id: RoundId
    vector_length: int = Field(ge=1, le=1 << 31)
    """Ring elements per input (``codec.encoded_length``)."""
    ring_bits: int = Field(ge=1, le=MAX_RING_BITS)
    """k: inputs and sums live in Z_(2**k) (``codec.ring_bits``)."""
    graph_seed: Bytes32
    """Seed of the neighbour graph (fresh per round)."""
    degree: int | None = Field(default=None, ge=1)
    threshold: int | None = Field(default=None, ge=1)
    min_devices: int = Field(default=2, ge=2)
    """Fewest devices that may start the protocol (fewer: the round fails)."""
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Fraction of the devices the default degree is sized to lose (``graph.degree_for_dropout``;
    0: the plain ``O(log n)`` default)."""


class AdvertiseKeys(_Message):
    """Stage 1, device -> server: the device's two X25519 public keys for this round."""

    round_id: RoundId
    device: DeviceId
    cipher_public_key: Bytes32
    """``c_u``: key agreement for encrypting shares."""
    mask_public_key: Bytes32
    """``s_u``: key agreement for pairwise masks."""


class ShareKeysRequest(_Message):
    """Stage 2, server -> every device: the roster of devices that advertised keys, sorted
    by id, with the graph parameters resolved for that roster size."""

    round_id: RoundId
    devices: tuple[AdvertiseKeys, ...] = Field(min_length=2, max_length=MAX_DEVICES)
    degree: int = Field(ge=1)
    threshold: int = Field(ge=1)

    @model_validator(mode="after")
    def _sorted_unique(self) -> ShareKeysRequest:
        ids = [a.device for a in self.devices]
        if ids != sorted(set(ids)):
            raise ValueError("roster must be sorted by device id without duplicates")
        if any(a.round_id != self.round_id for a in self.devices):
            raise ValueError("roster entry from another round")
        if self.threshold > self.degree:
            raise ValueError("threshold exceeds the degree")
        return self


class SharePlaintext(_Message):
    """What one device tells one neighbour inside an AES-GCM ciphertext: its Shamir shares
    (at the recipient's point ``x``) of its self-mask seed ``b_u`` and of its mask private
    key ``s_u``."""

    round_id: RoundId
    sender: DeviceId
    recipient: DeviceId
    x: int = Field(ge=1, le=MAX_DEVICES)
    self_mask_share: Annotated[B64Bytes, Field(min_length=66, max_length=66)]
    key_share: Annotated[B64Bytes, Field(min_length=66, max_length=66)]


class EncryptedShare(_Message):
    """A :class:`SharePlaintext` encrypted for its recipient (AES-256-GCM; the associated
    data binds round, sender and recipient). The server relays it without reading it.

    The two digests (``protocol.secagg.crypto.share_digest``) commit the sender to the share
    values inside: the recipient checks them when it decrypts, and the server checks every
    value the recipient reveals in the unmask stage against them."""

    sender: DeviceId
    recipient: DeviceId
    nonce: Bytes12
    ciphertext: Annotated[B64Bytes, Field(min_length=16, max_length=1024)]
    self_mask_digest: Bytes32
    key_digest: Bytes32


class ShareKeys(_Message):
    """Stage 2, device -> server: one encrypted share bundle per neighbour, and a commitment
    to the self-mask seed (lets the server verify its reconstruction)."""

    round_id: RoundId
    sender: DeviceId
    self_mask_commitment: Bytes32
    own_share_digest: Bytes32
    """Digest of the self-mask share the sender keeps for itself (it reveals it if it survives)."""
    shares: tuple[EncryptedShare, ...] = Field(max_length=MAX_DEVICES)

    @model_validator(mode="after")
    def _from_sender(self) -> ShareKeys:
        if any(s.sender != self.sender for s in self.shares):
            raise ValueError("every share must come from the message's sender")
        recipients = [s.recipient for s in self.shares]
        if len(set(recipients)) != len(recipients):
            raise ValueError("two shares for the same recipient")
        return self


class MaskedInputRequest(_Message):
    """Stage 3, server -> device: the shares addressed to it by neighbours that completed
    stage 2. The device masks with exactly these senders."""

    round_id: RoundId
    recipient: DeviceId
    shares: tuple[EncryptedShare, ...] = Field(max_length=MAX_DEVICES)

    @model_validator(mode="after")
    def _to_recipient(self) -> MaskedInputRequest:
        if any(s.recipient != self.recipient for s in self.shares):
            raise ValueError("every share must be addressed to the message's recipient")
        senders = [s.sender for s in self.shares]
        if len(set(senders)) != len(senders):
            raise ValueError("two shares from the same sender")
        return self


# Stage 3, device -> server, is a binary update body (section 3) of kind RING.


class UnmaskRequest(_Message):
    """Stage 4, server -> surviving devices: who sent a masked input (``survivors``) and who
    shared keys but did not (``dropped``)."""

    round_id: RoundId
    survivors: tuple[DeviceId, ...] = Field(min_length=1, max_length=MAX_DEVICES)
    dropped: tuple[DeviceId, ...] = Field(max_length=MAX_DEVICES)

    @model_validator(mode="after")
    def _disjoint(self) -> UnmaskRequest:
        s, d = set(self.survivors), set(self.dropped)
        if len(s) != len(self.survivors) or len(d) != len(self.dropped):
            raise ValueError("duplicate device ids")
        if s & d:
            raise ValueError(f"devices both survived and dropped: {sorted(s & d)[:5]}")
        return self


class RevealedShare(_Message):
    """One Shamir share value of ``owner``'s secret, held by the responding device (its
    point ``x`` is the responder's roster index)."""

    owner: DeviceId
    value: Annotated[B64Bytes, Field(min_length=66, max_length=66)]


class UnmaskResponse(_Message):
    """Stage 4, device -> server: self-mask shares of surviving neighbours and key shares of
    dropped neighbours; never both kinds for the same owner."""

    round_id: RoundId
    sender: DeviceId
    self_mask_shares: tuple[RevealedShare, ...] = Field(max_length=MAX_DEVICES)
    key_shares: tuple[RevealedShare, ...] = Field(max_length=MAX_DEVICES)

    @model_validator(mode="after")
    def _never_both(self) -> UnmaskResponse:
        a = [s.owner for s in self.self_mask_shares]
        b = [s.owner for s in self.key_shares]
        if len(set(a)) != len(a) or len(set(b)) != len(b):
            raise ValueError("duplicate owners")
        if set(a) & set(b):
            raise ValueError("both shares revealed for the same device")
        return self


# ========================================================================================
# 3. Binary update format
# ========================================================================================
#
# All integers little-endian. Header (68 bytes):
#
#   offset size field
#        0    4 magic          b"FKUP"
#        4    2 version        uint16, = 1
#        6    1 kind           uint8: 1 = RING, 2 = SPARSE_F32, 3 = DENSE_F32
#        7    1 bits           uint8: ring width k (1..32) for RING; 32 for float kinds
#        8    8 round_id       uint64
#       16   32 layout_hash    raw SHA-256 of the parameter layout (Layout.hash())
#       48    8 keep_fraction  float64 in (0, 1]: codec p (RING), nnz/dim (SPARSE), 1 (DENSE)
#       56    4 length         uint32: elements in the body
#       60    4 dim            uint32: model dimension d (the layout size)
#       64    4 crc32          zlib CRC32 of bytes 0..63 followed by the body
#
# Body:
#   RING        codec.pack_bits(values, bits): length k-bit ring elements, densely packed
#   SPARSE_F32  length uint32 indices (strictly increasing, < dim), then length float32 values
#   DENSE_F32   length (= dim) float32 values

MAGIC = b"FKUP"
_HEADER = struct.Struct("<4sHBBQ32sdIII")
HEADER_SIZE = _HEADER.size  # 68
MAX_UPDATE_LENGTH = (1 << 31) - 1


class UpdateKind(IntEnum):
    RING = 1
    SPARSE_F32 = 2
    DENSE_F32 = 3


class UpdateHeader(_Message):
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
    if kind is UpdateKind.SPARSE_F32:
        return 8 * length
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


def pack_sparse_update(header: UpdateHeader, update: SparseUpdate) -> bytes:
    """Header + indices + float32 values (kind SPARSE_F32, plain path)."""
    _check_pack_header(header, UpdateKind.SPARSE_F32, int(update.indices.shape[0]))
    if header.dim != update.dim:
        raise LengthMismatchError(f"header dim {header.dim}, update dim {update.dim}")
    _check_sparse_body(update.indices, update.values, update.dim)
    body = update.indices.astype("<u4").tobytes() + update.values.astype("<f4").tobytes()
    return _frame(header, body)


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
    if kind is UpdateKind.SPARSE_F32 and header.length > header.dim:
        raise LengthMismatchError("sparse update: more elements than dimensions")
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


def _check_sparse_body(indices: npt.NDArray[Any], values: npt.NDArray[Any], dim: int) -> None:
    if indices.shape != values.shape or indices.ndim != 1:
        raise BadBodyError("sparse update: indices and values must be 1-D of equal length")
    if indices.size:
        idx = indices.astype(np.int64)
        if int(idx[0]) < 0 or int(idx[-1]) >= dim or np.any(np.diff(idx) <= 0):
            raise BadBodyError("sparse update: indices must be strictly increasing and < dim")
    if not np.isfinite(values).all():
        raise NonFiniteError("sparse update contains NaN or Inf")


def unpack_sparse_update(
    data: bytes | memoryview,
    *,
    expected_round: int,
    expected_layout_hash: str,
    expected_dim: int | None = None,
    max_length: int | None = None,
) -> tuple[UpdateHeader, SparseUpdate]:
    """Parse a SPARSE_F32 update (plain top-k path)."""
    header, body = _parse(
        data,
        UpdateKind.SPARSE_F32,
        expected_round=expected_round,
        expected_layout_hash=expected_layout_hash,
        expected_bits=None,
        expected_length=None,
        expected_dim=expected_dim,
    )
    if max_length is not None and header.length > max_length:
        raise LengthMismatchError(f"sparse update has {header.length} elements, max {max_length}")
    n = header.length
    indices = np.frombuffer(body[: 4 * n], dtype="<u4").astype(np.uint32)
    values = np.frombuffer(body[4 * n :], dtype="<f4").astype(np.float32)
    _check_sparse_body(indices, values, header.dim)
    return header, SparseUpdate(indices=indices, values=values, dim=header.dim)


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


# ========================================================================================
# 4. HTTP API models (coordinator <-> device): added by the coordinator below this line.
# ========================================================================================


class DeviceState(_Message):
    """What a device reports at check-in (never any text)."""

    charging: bool
    idle: bool
    unmetered: bool
    battery_pct: float = Field(ge=0, le=100, allow_inf_nan=False)
    free_storage_mb: float = Field(ge=0, allow_inf_nan=False)
    client_version: str = Field(pattern=r"^\d+\.\d+\.\d+([.+-][0-9A-Za-z.-]+)?$", max_length=32)
    model_version: int | None = Field(default=None, ge=0)
    examples: int = Field(default=0, ge=0, le=MAX_INT32)
    """Messages in the device's local store (a count, no content)."""
    device_class: str = Field(default="unknown", pattern=r"^[a-z0-9_-]{1,32}$")


class EnrollRequest(_Message):
    enrollment_secret: str = Field(min_length=1, max_length=256)
    platform: str = Field(min_length=1, max_length=64)
    client_version: str = Field(pattern=r"^\d+\.\d+\.\d+([.+-][0-9A-Za-z.-]+)?$", max_length=32)
    device_class: str = Field(default="unknown", pattern=r"^[a-z0-9_-]{1,32}$")


class EnrollResponse(_Message):
    device_id: str
    token: str
    """256-bit bearer token; the coordinator keeps only its hash."""


class CheckinRequest(_Message):
    state: DeviceState


class CheckinResponse(_Message):
    """Either come back later (pace steering) or take part in a round."""

    action: str = Field(pattern=r"^(retry|train|evaluate)$")
    retry_after: float | None = Field(default=None, ge=0)
    round_id: int | None = None
    task: str | None = None
    reason: str | None = Field(default=None, max_length=200)


class ArtifactRef(_Message):
    """A file to download: where, how big, and its sha256 (also its ETag)."""

    url: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class TrainingPlan(_Message):
    optimizer: str = Field(pattern=r"^(sgd|adam)$")
    lr: float = Field(gt=0)
    momentum: float = Field(ge=0, lt=1)
    local_steps: int = Field(ge=1)
    max_seconds: float = Field(gt=0)
    max_examples: int = Field(ge=1)


class RoundPlan(_Message):
    """Everything a selected device needs for one round."""

    round_id: int
    task: str
    kind: str = Field(pattern=r"^(train|evaluate)$")
    model_version: int
    bundle: ArtifactRef
    """The bundle tarball (tokenizer, programs, layout) the weights belong to."""
    weights: ArtifactRef
    """The round's global weights: raw little-endian float32 in layout order."""
    predict: ArtifactRef | None = None
    """``predict.pte`` of ``model_version`` (evaluation rounds and suggestions)."""
    layout_hash: str
    training: TrainingPlan | None = None
    codec: CodecParams | None = None
    """``None``: plain float32 updates (no compression, no secure aggregation)."""
    secagg: SecAggParams | None = None
    stage_deadline: float
    """Unix time at which the current stage closes."""


class RoundStatus(_Message):
    round_id: int
    stage: str
    stage_deadline: float
    participant_stage: str | None = None
    """The last stage this device completed; ``dropped`` when the round went on without it."""
    outcome: str | None = None
    new_version: int | None = None
    retry_after: float = Field(ge=0)


_MAX_TOKEN_LOSS = 10_000.0  # nats per token: far past any model that is scored at all


class TrainReport(_Message):
    """Scalar metrics of local training (never text)."""

    loss_before: float = Field(ge=0, le=_MAX_TOKEN_LOSS, allow_inf_nan=False)
    loss_after: float = Field(ge=0, le=_MAX_TOKEN_LOSS, allow_inf_nan=False)
    examples: int = Field(ge=0, le=MAX_INT32)
    steps: int = Field(ge=0, le=MAX_INT32)
    seconds: float = Field(ge=0, le=1e7, allow_inf_nan=False)
    aborted: bool = False


_MAX_EVAL_COUNT = 10_000_000  # words or tokens one device scores (int4 columns hold 2**31 - 1)


class EvalCounts(_Message):
    """Federated evaluation: counts over the device's recent messages, nothing else.

    Bounded as a device could plausibly send them (it scores its ``eval_holdout`` newest
    messages, 20 by default: a few thousand words) and well inside the 32-bit integer columns
    that store them (past 2**31 - 1 PostgreSQL refused the insert: a 500). The loss is summed
    over the tokens, so it is bounded per token: the round's sum over every device stays
    finite."""

    words: int = Field(ge=0, le=_MAX_EVAL_COUNT)
    top1: int = Field(ge=0, le=_MAX_EVAL_COUNT)
    top3: int = Field(ge=0, le=_MAX_EVAL_COUNT)
    loss_sum: float = Field(ge=0, le=_MAX_EVAL_COUNT * _MAX_TOKEN_LOSS, allow_inf_nan=False)
    tokens: int = Field(ge=0, le=_MAX_EVAL_COUNT)

    @model_validator(mode="after")
    def _bounded(self) -> EvalCounts:
        if not self.top1 <= self.top3 <= self.words:
            raise ValueError("need top1 <= top3 <= words")
        if self.loss_sum > self.tokens * _MAX_TOKEN_LOSS:
            raise ValueError(f"need loss_sum <= {_MAX_TOKEN_LOSS:g} * tokens")
        return self
