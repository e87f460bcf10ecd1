"""The AES-128-CTR keystream shared by the masks, the codec's dither and the DP noise."""

from __future__ import annotations

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.keystream import Keystream


@given(
    seed=st.binary(min_size=32, max_size=32),
    length=st.integers(0, 3000),
    pieces=st.lists(st.integers(1, 700), min_size=1, max_size=8),
    gcm=st.booleans(),
)
@settings(max_examples=60, deadline=None)
def test_keystream_is_aes128_ctr_on_both_openssl_paths(
    seed: bytes, length: int, pieces: list[int], gcm: bool
) -> None:
    """The GCM code path (CTR blocks 0-1, then GCM's stream from counter 2) gives exactly
    the AES-128-CTR keystream (key: the seed's first 16 bytes), whatever the chunking."""
    ref = Cipher(algorithms.AES(seed[:16]), modes.CTR(bytes(16))).encryptor().update(bytes(length))
    ks = Keystream(seed, gcm=gcm)
    out, pos, i = bytearray(), 0, 0
    while pos < length:
        n = min(pieces[i % len(pieces)], length - pos)
        buf = bytearray(n + 16)
        ks.update_into(bytes(n), buf)
        out += buf[:n]
        pos, i = pos + n, i + 1
    assert bytes(out) == ref
