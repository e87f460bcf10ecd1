"""Shared pydantic field types: raw bytes that travel as base64 in JSON, and identifiers.

Bytes fields hold raw ``bytes`` in Python and base64 (standard alphabet, padded) strings in
JSON, independently of the pydantic version's ``ser_json_bytes`` defaults. Lengths are
checked on validation, so a wrong-size key or nonce is refused at the edge.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any

from pydantic import Field, PlainSerializer, PlainValidator, WithJsonSchema

__all__ = [
    "DEVICE_ID_PATTERN",
    "MAX_BLOB",
    "B64Bytes",
    "Bytes12",
    "Bytes32",
    "DeviceId",
    "RoundId",
]

DEVICE_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,64}$"
MAX_BLOB = 1 << 16  # largest base64 field in a JSON message (shares, ciphertexts): 64 KiB

DeviceId = Annotated[str, Field(pattern=DEVICE_ID_PATTERN)]
RoundId = Annotated[int, Field(ge=0, lt=1 << 63)]


def _bytes_validator(min_len: int, max_len: int) -> PlainValidator:
    def check(value: Any) -> bytes:
        if isinstance(value, bytes | bytearray | memoryview):
            raw = bytes(value)
        elif isinstance(value, str):
            try:
                raw = base64.b64decode(value.encode("ascii"), validate=True)
            except (binascii.Error, UnicodeEncodeError) as e:
                raise ValueError(f"invalid base64: {e}") from e
        else:
            raise ValueError(f"expected bytes or a base64 string, got {type(value).__name__}")
        if not min_len <= len(raw) <= max_len:
            if min_len == max_len:
                raise ValueError(f"expected exactly {min_len} bytes, got {len(raw)}")
            raise ValueError(f"expected {min_len}..{max_len} bytes, got {len(raw)}")
        return raw

    return PlainValidator(check)


def _to_b64(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


_SER = PlainSerializer(_to_b64, return_type=str, when_used="json")
_SCHEMA = WithJsonSchema({"type": "string", "contentEncoding": "base64"})

B64Bytes = Annotated[bytes, _bytes_validator(0, MAX_BLOB), _SER, _SCHEMA]
Bytes32 = Annotated[bytes, _bytes_validator(32, 32), _SER, _SCHEMA]
Bytes12 = Annotated[bytes, _bytes_validator(12, 12), _SER, _SCHEMA]
