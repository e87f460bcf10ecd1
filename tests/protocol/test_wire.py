"""Wire format: JSON messages and the binary update body; every malformed case refused
with its precise error."""

from __future__ import annotations

import math
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from protocol import codec, wire
from protocol.layout import Layout
from protocol.wire import (
    AdvertiseKeys,
    BadBodyError,
    BadHeaderError,
    BadMagicError,
    ChecksumError,
    LayoutMismatchError,
    LengthMismatchError,
    NonFiniteError,
    RoundMismatchError,
    ShareKeysRequest,
    TruncatedError,
    UnexpectedKindError,
    UnknownKindError,
    UnknownVersionError,
    UnmaskRequest,
    UnmaskResponse,
    UpdateHeader,
    UpdateKind,
    WireError,
)

LAYOUT = Layout.from_shapes({"emb": (10, 4), "out": (3,)})
HASH = LAYOUT.hash()
D = LAYOUT.size  # 43


def _ring(bits: int = 13, length: int = 20, seed: int = 0) -> tuple[bytes, np.ndarray]:
    v = np.random.default_rng(seed).integers(0, 1 << bits, length, dtype=np.uint64)
    v = v.astype(np.uint32)
    header = UpdateHeader(
        kind=UpdateKind.RING,
        bits=bits,
        round_id=9,
        layout_hash=HASH,
        keep_fraction=0.5,
        length=length,
        dim=D,
    )
    return wire.pack_update(header, v), v


def _unpack(data: bytes, **kw: object) -> tuple[UpdateHeader, np.ndarray]:
    args: dict[str, object] = {"expected_round": 9, "expected_layout_hash": HASH}
    args.update(kw)
    return wire.unpack_update(data, **args)  # type: ignore[arg-type]


def _reframe(data: bytes | bytearray) -> bytes:
    """Recompute the CRC after a deliberate edit (so only the edited field is wrong)."""
    buf = bytearray(data)
    crc = zlib.crc32(bytes(buf[wire.HEADER_SIZE :]), zlib.crc32(bytes(buf[:64])))
    buf[64:68] = struct.pack("<I", crc)
    return bytes(buf)


def _set(data: bytes, fmt: str, offset: int, value: object) -> bytes:
    buf = bytearray(data)
    struct.pack_into(fmt, buf, offset, value)
    return _reframe(buf)


@given(bits=st.integers(1, 32), length=st.integers(0, 200), seed=st.integers(0, 2**32))
@settings(max_examples=60, deadline=None)
def test_ring_roundtrip(bits: int, length: int, seed: int) -> None:
    data, v = _ring(bits, length, seed)
    assert len(data) == wire.HEADER_SIZE + codec.packed_size(length, bits)
    header, out = _unpack(data, expected_bits=bits, expected_length=length, expected_dim=D)
    np.testing.assert_array_equal(out, v)
    assert (header.kind, header.bits, header.round_id, header.length) == (
        UpdateKind.RING,
        bits,
        9,
        length,
    )
    assert header.keep_fraction == 0.5 and header.layout_hash == HASH


def test_header_layout_is_as_documented() -> None:
    data, _ = _ring(13, 20)
    magic, version, kind, bits, rnd, lh, keep, length, dim, crc = struct.unpack("<4sHBBQ32sdIII", data[:68])
    assert (magic, version, kind, bits, rnd) == (b"FKUP", 1, 1, 13, 9)
    assert (lh.hex(), keep, length, dim) == (HASH, 0.5, 20, D)
    assert crc == zlib.crc32(data[68:], zlib.crc32(data[:64]))


def test_dense_roundtrip() -> None:
    x = np.linspace(-1, 1, D, dtype=np.float32)
    hd = UpdateHeader(
        kind=UpdateKind.DENSE_F32,
        bits=32,
        round_id=9,
        layout_hash=HASH,
        keep_fraction=1.0,
        length=D,
        dim=D,
    )
    dense = wire.pack_dense_update(hd, x)
    _, xb = wire.unpack_dense_update(dense, expected_round=9, expected_layout_hash=HASH, expected_dim=D)
    np.testing.assert_array_equal(xb, x)
    with pytest.raises(UnexpectedKindError):
        _unpack(dense)


def test_every_malformed_ring_update_is_refused_precisely() -> None:
    data, _ = _ring(13, 20)
    cases: list[tuple[bytes, type[WireError], dict[str, object]]] = [
        (data[:10], TruncatedError, {}),
        (data[:-1], TruncatedError, {}),
        (data + b"\x00", LengthMismatchError, {}),
        (b"XXXX" + data[4:], BadMagicError, {}),
        (_set(data, "<H", 4, 2), UnknownVersionError, {}),
        (_set(data, "<B", 6, 9), UnknownKindError, {}),
        (_set(data, "<B", 6, 2), UnknownKindError, {}),  # reserved: the removed sparse kind
        (_set(_set(data, "<B", 6, 3), "<B", 7, 32), UnexpectedKindError, {}),
        (_set(data, "<B", 6, 3), BadHeaderError, {}),  # float kinds have bits = 32
        (data, RoundMismatchError, {"expected_round": 10}),
        (data, LayoutMismatchError, {"expected_layout_hash": "0" * 64}),
        (data, LengthMismatchError, {"expected_length": 21}),
        (data, LengthMismatchError, {"expected_dim": D + 1}),
        (data, BadHeaderError, {"expected_bits": 14}),
        (_set(data, "<B", 7, 0), BadHeaderError, {}),
        (_set(data, "<B", 7, 33), BadHeaderError, {}),
        (_set(data, "<d", 48, 0.0), BadHeaderError, {}),
        (_set(data, "<d", 48, math.nan), BadHeaderError, {}),
        (_set(data, "<d", 48, 1.5), BadHeaderError, {}),
        (_set(data, "<I", 56, 21), TruncatedError, {}),  # declares more than the body holds
        (_set(data, "<I", 60, 0), BadHeaderError, {}),
        (_set(data, "<Q", 8, 1 << 63), BadHeaderError, {}),
    ]
    flipped = bytearray(data)
    flipped[-3] ^= 0x10
    cases.append((bytes(flipped), ChecksumError, {}))
    bad_crc = bytearray(data)
    bad_crc[64] ^= 1
    cases.append((bytes(bad_crc), ChecksumError, {}))
    # a valid CRC over a body whose padding bits are set: 20 x 13 bits, 4 spare high fields
    padded = bytearray(data)
    padded[-1] |= 0x80
    cases.append((_reframe(padded), BadBodyError, {}))
    for blob, error, kw in cases:
        with pytest.raises(error):
            _unpack(blob, **kw)
        assert issubclass(error, WireError) and issubclass(error, ValueError)


@given(data=st.data())
@settings(max_examples=100, deadline=None)
def test_any_corruption_or_truncation_is_refused(data: st.DataObject) -> None:
    blob, _ = _ring(11, 30, data.draw(st.integers(0, 100)))
    mode = data.draw(st.sampled_from(["flip", "truncate"]))
    if mode == "flip":
        pos = data.draw(st.integers(0, len(blob) - 1))
        bit = data.draw(st.integers(0, 7))
        buf = bytearray(blob)
        buf[pos] ^= 1 << bit
        corrupt = bytes(buf)
    else:
        corrupt = blob[: data.draw(st.integers(0, len(blob) - 1))]
    with pytest.raises(WireError):
        _unpack(corrupt)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_floats_are_refused(bad: float) -> None:
    h = UpdateHeader(
        kind=UpdateKind.DENSE_F32,
        bits=32,
        round_id=9,
        layout_hash=HASH,
        keep_fraction=1.0,
        length=D,
        dim=D,
    )
    x = np.zeros(D, np.float32)
    with pytest.raises(NonFiniteError):
        wire.pack_dense_update(h, np.where(np.arange(D) == 3, bad, x))
    good = bytearray(wire.pack_dense_update(h, x))
    struct.pack_into("<f", good, wire.HEADER_SIZE + 12, bad)
    with pytest.raises(NonFiniteError):
        wire.unpack_dense_update(_reframe(good), expected_round=9, expected_layout_hash=HASH)


def test_pack_checks_header_against_values() -> None:
    data, v = _ring(13, 20)
    header, _ = _unpack(data)
    with pytest.raises(LengthMismatchError):
        wire.pack_update(header, v[:-1])
    with pytest.raises(BadBodyError):
        wire.pack_update(header, np.full(20, 1 << 13, np.uint32))
    with pytest.raises(ValidationError):
        header.model_copy(update={}).model_validate({**header.model_dump(), "layout_hash": "xyz"})


# ---------------------------------------------------------------------------------------
# JSON messages
# ---------------------------------------------------------------------------------------


def _adv(name: str, k: int = 1) -> AdvertiseKeys:
    return AdvertiseKeys(
        round_id=1,
        device=name,
        cipher_public_key=bytes([k]) * 32,
        mask_public_key=bytes([k + 1]) * 32,
    )


def test_messages_roundtrip_through_json_with_base64_bytes() -> None:
    adv = _adv("dev-1")
    js = adv.model_dump_json()
    assert "AQEBAQEB" in js  # base64 of 0x01 bytes
    assert AdvertiseKeys.model_validate_json(js) == adv
    roster = ShareKeysRequest(round_id=1, devices=(_adv("a", 1), _adv("b", 3)), degree=1, threshold=1)
    assert ShareKeysRequest.model_validate_json(roster.model_dump_json()) == roster
    resp = UnmaskResponse(
        round_id=1,
        sender="a",
        self_mask_shares=(wire.RevealedShare(owner="b", value=bytes(66)),),
        key_shares=(),
    )
    assert UnmaskResponse.model_validate_json(resp.model_dump_json()) == resp


def test_messages_refuse_invalid_fields() -> None:
    with pytest.raises(ValidationError, match="exactly 32 bytes"):
        AdvertiseKeys(round_id=1, device="a", cipher_public_key=b"x" * 31, mask_public_key=b"y" * 32)
    with pytest.raises(ValidationError):
        AdvertiseKeys.model_validate_json(
            '{"round_id":1,"device":"a","cipher_public_key":"!!","mask_public_key":"!!"}'
        )
    with pytest.raises(ValidationError):
        _adv("bad id with spaces")
    with pytest.raises(ValidationError):
        AdvertiseKeys.model_validate({**_adv("a").model_dump(), "extra": 1})
    with pytest.raises(ValidationError, match="sorted"):
        ShareKeysRequest(round_id=1, devices=(_adv("b"), _adv("a")), degree=1, threshold=1)
    with pytest.raises(ValidationError, match="both survived and dropped"):
        UnmaskRequest(round_id=1, survivors=("a", "b"), dropped=("b",))
    share = wire.RevealedShare(owner="b", value=bytes(66))
    with pytest.raises(ValidationError, match="both shares"):
        UnmaskResponse(round_id=1, sender="a", self_mask_shares=(share,), key_shares=(share,))
    with pytest.raises(ValidationError):
        wire.RevealedShare(owner="b", value=bytes(65))


def test_verify_update_checks_the_whole_body_where_it_arrives() -> None:
    """Issue 17.1: an upload whose padding bits are set (CRC recomputed) passed the upload check
    and failed only when the stage closed, which wedged the round. It is refused on arrival."""
    data, _ = _ring(13, 20)
    padded = bytearray(data)
    padded[-1] |= 0x80
    with pytest.raises(BadBodyError, match="padding"):
        wire.verify_update(_reframe(padded), expected_round=9, expected_layout_hash=HASH)
    header, body = wire.verify_update(data, expected_round=9, expected_layout_hash=HASH)
    acc = np.zeros(20, dtype=np.uint16)
    codec.unpack_bits_add(body, header.bits, acc)  # what passed cannot fail later
