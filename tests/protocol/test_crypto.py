"""Key derivation, share encryption and the mask PRG."""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.secagg import crypto
from protocol.secagg.crypto import DecryptionError


def _pair() -> tuple[crypto.KeyPair, crypto.KeyPair]:
    return crypto.generate_keypair(), crypto.generate_keypair()


def test_pair_keys_agree_and_bind_round_ids_and_purpose() -> None:
    a, b = _pair()
    kw = {"purpose": crypto.PURPOSE_MASK, "round_id": 3}
    k_ab = crypto.derive_pair_key(a.private, b.public_bytes, me="a", peer="b", **kw)  # type: ignore[arg-type]
    k_ba = crypto.derive_pair_key(b.private, a.public_bytes, me="b", peer="a", **kw)  # type: ignore[arg-type]
    assert k_ab == k_ba and len(k_ab) == 32
    variants = {
        crypto.derive_pair_key(
            a.private, b.public_bytes, purpose=crypto.PURPOSE_MASK, round_id=4, me="a", peer="b"
        ),
        crypto.derive_pair_key(
            a.private, b.public_bytes, purpose=crypto.PURPOSE_ENCRYPT, round_id=3, me="a", peer="b"
        ),
        crypto.derive_pair_key(
            a.private, b.public_bytes, purpose=crypto.PURPOSE_MASK, round_id=3, me="a", peer="c"
        ),
        crypto.derive_pair_key(
            a.private, b.public_bytes, purpose=crypto.PURPOSE_MASK, round_id=3, me="ab", peer="b"
        ),
    }
    assert k_ab not in variants and len(variants) == 4
    with pytest.raises(ValueError, match="with itself"):
        crypto.derive_pair_key(a.private, b.public_bytes, purpose=b"x", round_id=1, me="a", peer="a")
    with pytest.raises(ValueError, match="low-order"):  # all-zero shared secret
        crypto.derive_pair_key(a.private, bytes(32), purpose=b"x", round_id=1, me="a", peer="b")


def test_share_encryption_rejects_tampering_and_misbinding() -> None:
    key = bytes(range(32))
    nonce = bytes(12)
    ct = crypto.encrypt_share(key, nonce, b"secret share", round_id=5, sender="u", recipient="v")
    assert crypto.decrypt_share(key, nonce, ct, round_id=5, sender="u", recipient="v") == b"secret share"
    for i in range(len(ct)):
        bad = bytearray(ct)
        bad[i] ^= 0x01
        with pytest.raises(DecryptionError):
            crypto.decrypt_share(key, nonce, bytes(bad), round_id=5, sender="u", recipient="v")
    for kw in (
        {"round_id": 6, "sender": "u", "recipient": "v"},
        {"round_id": 5, "sender": "v", "recipient": "u"},
        {"round_id": 5, "sender": "u", "recipient": "w"},
    ):
        with pytest.raises(DecryptionError):
            crypto.decrypt_share(key, nonce, ct, **kw)  # type: ignore[arg-type]
    with pytest.raises(DecryptionError):
        crypto.decrypt_share(key, b"\x01" * 12, ct, round_id=5, sender="u", recipient="v")
    with pytest.raises(DecryptionError):
        crypto.decrypt_share(bytes(32), nonce, ct, round_id=5, sender="u", recipient="v")


def test_prg_is_aes128_ctr_keystream() -> None:
    seed = bytes(range(32))
    words = crypto.prg(seed, 8, 32)
    # reference: counter blocks 0 and 1 encrypted with AES-128 (ECB) under the seed's first half
    ecb = Cipher(algorithms.AES(seed[:16]), modes.ECB()).encryptor()
    blocks = ecb.update(bytes(16) + (1).to_bytes(16, "big")) + ecb.finalize()
    np.testing.assert_array_equal(words, np.frombuffer(blocks, "<u4"))
    assert crypto.prg(seed, 8, 32).tolist() == words.tolist()  # deterministic
    assert crypto.prg(bytes(32), 8, 32).tolist() != words.tolist()
    assert crypto.prg(bytes(16) + seed[16:], 8, 32).tolist() == crypto.prg(bytes(32), 8, 32).tolist()
    assert crypto.prg(seed, 16, 16).dtype == np.dtype("<u2")
    assert crypto.prg(seed, 16, 5).dtype == np.dtype("<u1")
    with pytest.raises(ValueError, match="32 bytes"):
        crypto.prg(b"short", 4, 32)


@pytest.mark.parametrize("bits", [8, 16, 32])
def test_apply_masks_equals_sum_of_streams_across_chunks(bits: int) -> None:
    dtype = crypto.ring_dtype(bits)
    n = (1 << 18) // dtype.itemsize + 12_345  # crosses a chunk boundary
    seeds = [bytes([i]) * 32 for i in range(5)]
    base = np.arange(n, dtype=dtype)
    acc = base.copy()
    crypto.apply_masks(acc, seeds[:3], seeds[3:])
    ref = base.astype(np.uint64)
    for s in seeds[:3]:
        ref += crypto.prg(s, n, bits)
    for s in seeds[3:]:
        ref -= crypto.prg(s, n, bits).astype(np.uint64)
    wrap = np.uint64((1 << (8 * dtype.itemsize)) - 1)
    np.testing.assert_array_equal(acc, (ref & wrap).astype(dtype))
    crypto.apply_masks(acc, seeds[3:], seeds[:3])  # the inverse operation
    np.testing.assert_array_equal(acc, base)


def test_prg_output_bits_are_balanced() -> None:
    w = crypto.prg(b"\x42" * 32, 50_000, 32)
    bits = np.unpackbits(w.view(np.uint8), bitorder="little").reshape(-1, 32).mean(0)
    assert np.all(np.abs(bits - 0.5) < 4 * 0.5 / np.sqrt(50_000))


@given(seed=st.binary(min_size=32, max_size=32), rnd=st.integers(0, 2**62))
@settings(max_examples=20, deadline=None)
def test_commitment_binds_round_device_and_seed(seed: bytes, rnd: int) -> None:
    c = crypto.mask_commitment(rnd, "u", seed)
    assert c == crypto.mask_commitment(rnd, "u", seed)
    assert c != crypto.mask_commitment(rnd + 1, "u", seed)
    assert c != crypto.mask_commitment(rnd, "v", seed)
    assert c != crypto.mask_commitment(rnd, "u", bytes(b ^ 1 for b in seed))


@pytest.mark.parametrize("bits", [5, 8, 12, 16, 23, 32])
def test_masked_vector_equals_masks_then_reduction(bits: int) -> None:
    dtype = crypto.ring_dtype(bits)
    n = (1 << 18) // dtype.itemsize + 4321  # crosses a chunk boundary
    seeds = [bytes([i + 7]) * 32 for i in range(5)]
    x = np.random.default_rng(bits).integers(0, 1 << bits, n, dtype=np.uint64).astype(np.uint32)
    acc = x.astype(dtype)
    crypto.apply_masks(acc, seeds[:2], seeds[2:])
    ref = acc.astype(np.uint32) & np.uint32((1 << bits) - 1)
    out = crypto.masked_vector(x, seeds[:2], seeds[2:], bits)
    assert out.dtype == np.uint32
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_array_equal(x[:10], np.asarray(x[:10]))  # input untouched
    back = crypto.masked_vector(out, seeds[2:], seeds[:2], bits)  # the inverse masks
    np.testing.assert_array_equal(back, x)


def test_masked_vector_in_place_equals_a_new_vector() -> None:
    seeds = [bytes([i + 1]) * 32 for i in range(3)]
    for bits in (12, 23, 32):
        x = np.random.default_rng(bits).integers(0, 1 << bits, 70_001, dtype=np.uint64).astype(np.uint32)
        ref = crypto.masked_vector(x, seeds[:1], seeds[1:], bits)
        y = x.copy()
        assert crypto.masked_vector(y, seeds[:1], seeds[1:], bits, out=y) is y
        np.testing.assert_array_equal(y, ref)
