"""Cryptographic building blocks of secure aggregation (all from ``cryptography``).

* Key agreement: X25519. Every device has two key pairs per round: ``c`` (share encryption)
  and ``s`` (pairwise masks).
* Key derivation: HKDF-SHA256 over the X25519 shared secret with
  ``info = "fedkeys/secagg/v1/" + purpose + round_id (8 bytes) + both device ids``
  (length-prefixed, in sorted order so both ends derive the same key).
* Share encryption: AES-256-GCM with a random 96-bit nonce; the associated data binds the
  round id, the sender and the recipient, so a ciphertext cannot be replayed into another
  round or re-addressed.
* PRG: the AES-128-CTR keystream of :mod:`protocol.keystream`, keyed with the first 16 bytes
  of a 32-byte seed (counter block starts at zero; every seed expands exactly one stream).
  AES-128 is the PRG of Bonawitz et al.'s design and matches the 128-bit security of X25519,
  which derives the pairwise seeds; the keystream is most of a device's masking work. Seeds
  stay 32 bytes (the HKDF output and the Shamir secrets keep one size); the PRG reads 128 bits
  of them. The keystream is read as little-endian ring words (uint8, uint16 or uint32: the
  narrowest holding ``k`` bits) with ``np.frombuffer``; words are uniform modulo ``2**w`` and
  hence modulo ``2**k`` because ``2**k`` divides ``2**w``. :func:`apply_masks` expands many
  seeds chunk by chunk (256 KiB) so the keystream is added while still in cache.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from protocol.keystream import SEED_BYTES, Keystream, keystream

__all__ = [
    "KEY_BYTES",
    "NONCE_BYTES",
    "PURPOSE_ENCRYPT",
    "PURPOSE_MASK",
    "SHARE_KEY",
    "SHARE_SELF_MASK",
    "DecryptionError",
    "KeyPair",
    "apply_masks",
    "check_public_key",
    "decrypt_share",
    "derive_pair_key",
    "encrypt_share",
    "generate_keypair",
    "mask_commitment",
    "masked_vector",
    "prg",
    "private_from_bytes",
    "public_from_private",
    "ring_dtype",
    "share_associated_data",
    "share_digest",
]

KEY_BYTES = SEED_BYTES  # X25519 keys, HKDF outputs and mask seeds keep one size
NONCE_BYTES = 12
PURPOSE_ENCRYPT = b"share-encryption"
PURPOSE_MASK = b"pairwise-mask"
SHARE_SELF_MASK = b"self-mask"  # the two secrets a device Shamir-shares (share_digest kinds)
SHARE_KEY = b"key"
_LABEL = b"fedkeys/secagg/v1/"
_CHUNK_BYTES = 1 << 18  # PRG chunk: stays in L2 while it is added

RingArray = npt.NDArray[np.unsignedinteger[Any]]


class DecryptionError(ValueError):
    """A share ciphertext failed authentication (tampered, misaddressed or wrong round)."""


class KeyPair:
    """An X25519 key pair with its raw 32-byte encodings."""

    __slots__ = ("private", "private_bytes", "public_bytes")

    def __init__(self, private: X25519PrivateKey) -> None:
        self.private = private
        self.private_bytes = private.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        self.public_bytes = public_from_private(private)


def generate_keypair() -> KeyPair:
    """A fresh X25519 key pair (randomness from the OS via ``cryptography``)."""
    return KeyPair(X25519PrivateKey.generate())


def private_from_bytes(raw: bytes) -> X25519PrivateKey:
    if len(raw) != KEY_BYTES:
        raise ValueError(f"X25519 private key must have {KEY_BYTES} bytes, got {len(raw)}")
    return X25519PrivateKey.from_private_bytes(raw)


def public_from_private(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _ids(a: str, b: str) -> bytes:
    lo, hi = sorted((a, b))
    out = b""
    for name in (lo, hi):
        raw = name.encode()
        out += struct.pack(">H", len(raw)) + raw
    return out


def derive_pair_key(
    private: X25519PrivateKey,
    peer_public: bytes,
    *,
    purpose: bytes,
    round_id: int,
    me: str,
    peer: str,
) -> bytes:
    """32-byte key shared by ``me`` and ``peer``: HKDF-SHA256 of their X25519 secret.

    Both ends derive the same key (device ids are put in sorted order). Raises ``ValueError``
    for a low-order peer key (all-zero shared secret).
    """
    if me == peer:
        raise ValueError("a device does not derive a key with itself")
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as e:
        raise ValueError(f"invalid X25519 public key of {peer!r} (low-order point)") from e
    info = _LABEL + purpose + b"/" + struct.pack(">Q", round_id) + _ids(me, peer)
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(shared)


_PROBE = X25519PrivateKey.from_private_bytes(hashlib.sha256(_LABEL + b"public-key-probe").digest())


def check_public_key(raw: bytes) -> None:
    """Refuse (``ValueError``) an X25519 public key that is not 32 bytes or is a low-order
    point. Curve25519 scalars are multiples of the cofactor 8, so a low-order point gives the
    all-zero shared secret with *every* private key: one exchange with a fixed probe key finds
    it (``cryptography``/OpenSSL refuse the all-zero result). With such a key a device's
    pairwise masks would be known to anyone (the HKDF input is a constant)."""
    if len(raw) != KEY_BYTES:
        raise ValueError(f"X25519 public key must have {KEY_BYTES} bytes, got {len(raw)}")
    try:
        _PROBE.exchange(X25519PublicKey.from_public_bytes(raw))
    except ValueError as e:
        raise ValueError("low-order X25519 public key") from e


def share_associated_data(round_id: int, sender: str, recipient: str) -> bytes:
    """AES-GCM associated data of a share ciphertext (direction matters: not sorted)."""
    s, r = sender.encode(), recipient.encode()
    return _LABEL + b"share/" + struct.pack(">QH", round_id, len(s)) + s + struct.pack(">H", len(r)) + r


def encrypt_share(
    key: bytes, nonce: bytes, plaintext: bytes, *, round_id: int, sender: str, recipient: str
) -> bytes:
    """AES-256-GCM ciphertext (with its 16-byte tag) of a share bundle."""
    if len(nonce) != NONCE_BYTES:
        raise ValueError(f"nonce must have {NONCE_BYTES} bytes")
    ad = share_associated_data(round_id, sender, recipient)
    return AESGCM(key).encrypt(nonce, plaintext, ad)


def decrypt_share(
    key: bytes, nonce: bytes, ciphertext: bytes, *, round_id: int, sender: str, recipient: str
) -> bytes:
    """Plaintext of :func:`encrypt_share`; :class:`DecryptionError` if it does not verify."""
    ad = share_associated_data(round_id, sender, recipient)
    try:
        return AESGCM(key).decrypt(nonce, ciphertext, ad)
    except (InvalidTag, ValueError) as e:
        raise DecryptionError(
            f"share from {sender!r} to {recipient!r} in round {round_id} failed authentication"
        ) from e


def mask_commitment(round_id: int, device: str, seed: bytes) -> bytes:
    """SHA-256 commitment to a self-mask seed, published so that a reconstruction can be
    verified (a 32-byte uniformly random seed makes it hiding)."""
    raw = device.encode()
    return hashlib.sha256(
        _LABEL + b"self-mask/" + struct.pack(">QH", round_id, len(raw)) + raw + seed
    ).digest()


def share_digest(round_id: int, owner: str, holder: str, x: int, kind: bytes, value: bytes) -> bytes:
    """SHA-256 commitment to one Shamir share value of ``owner``'s secret ``kind``
    (:data:`SHARE_SELF_MASK` or :data:`SHARE_KEY`) held by ``holder`` at point ``x``.

    The owner publishes these digests with its encrypted shares (and one for its own share), so
    that the server can check every share a device reveals in the unmask stage and leave out a
    device that reveals a wrong one, instead of reconstructing a wrong secret from it. A share
    is a uniformly random field element of the owner's fresh polynomial (at most ``t - 1`` of
    them are ever revealed per secret), so its digest hides it."""
    o, h = owner.encode(), holder.encode()
    head = _LABEL + b"share-digest/" + kind + b"/" + struct.pack(">QIH", round_id, x, len(o)) + o
    return hashlib.sha256(head + struct.pack(">H", len(h)) + h + value).digest()


def ring_dtype(bits: int) -> np.dtype[Any]:
    """Narrowest unsigned word holding ``bits`` bits (masks are generated at this width)."""
    if not 1 <= bits <= 32:
        raise ValueError(f"ring bits must be in [1, 32], got {bits}")
    return np.dtype("<u1" if bits <= 8 else "<u2" if bits <= 16 else "<u4")


def prg(seed: bytes, length: int, bits: int) -> RingArray:
    """``length`` pseudo-random ring words (uniform mod ``2**bits``, not yet reduced): the
    AES-128-CTR keystream of ``seed`` read as little-endian words."""
    dtype = ring_dtype(bits)
    size = length * dtype.itemsize
    buf = bytearray(size + 16)
    keystream(seed).update_into(bytes(size), buf)
    return np.frombuffer(buf, dtype=dtype, count=length).copy()


def _mask_chunks(
    add_seeds: Sequence[bytes], sub_seeds: Sequence[bytes], width: int, dtype: np.dtype[Any]
) -> tuple[list[tuple[Keystream, bool]], int, bytes, bytearray, RingArray]:
    """Encryptors (with their sign), chunk length, zero source, keystream buffer and its
    word view for :func:`apply_masks` and :func:`masked_vector`."""
    encs = [(keystream(s), True) for s in add_seeds] + [(keystream(s), False) for s in sub_seeds]
    chunk = max(1, _CHUNK_BYTES // width)
    buf = bytearray(chunk * width + 16)  # update_into needs block_size - 1 spare bytes
    words = np.frombuffer(buf, dtype=dtype.newbyteorder("<"), count=chunk)
    return encs, chunk, bytes(chunk * width), buf, words


def _add_streams(
    target: RingArray, encs: list[tuple[Keystream, bool]], zeros: bytes, buf: bytearray, words: RingArray
) -> None:
    """``target += sum(+-next keystream words)`` in place (wrapping at the word width)."""
    size = target.shape[0]
    src = zeros if size == words.shape[0] else memoryview(zeros)[: size * target.dtype.itemsize]
    ks = words[:size]
    for enc, positive in encs:
        enc.update_into(src, buf)
        if positive:
            np.add(target, ks, out=target)
        else:
            np.subtract(target, ks, out=target)


def apply_masks(acc: RingArray, add_seeds: Sequence[bytes], sub_seeds: Sequence[bytes] = ()) -> None:
    """In place: ``acc += sum(prg(a)) - sum(prg(s))`` modulo ``2**(8 * itemsize)``.

    ``acc`` is a 1-D array of the ring word dtype (see :func:`ring_dtype`). All streams are
    expanded chunk by chunk with AES-128-CTR into one reused buffer and added while hot in
    cache; exactly the same words as :func:`prg` produces for each seed.
    """
    if acc.ndim != 1 or acc.dtype.kind != "u":
        raise ValueError("acc must be a 1-D unsigned array")
    if not add_seeds and not sub_seeds:
        return
    encs, chunk, zeros, buf, words = _mask_chunks(add_seeds, sub_seeds, acc.dtype.itemsize, acc.dtype)
    for start in range(0, acc.shape[0], chunk):
        _add_streams(acc[start : start + chunk], encs, zeros, buf, words)


def masked_vector(
    values: npt.NDArray[np.integer[Any]],
    add_seeds: Sequence[bytes],
    sub_seeds: Sequence[bytes],
    bits: int,
    *,
    out: npt.NDArray[np.uint32] | None = None,
) -> npt.NDArray[np.uint32]:
    """``(values + sum(prg(a)) - sum(prg(s))) mod 2**bits`` as a uint32 array: a new one,
    or ``out`` (which may be ``values`` itself: masking in place).

    The same words as :func:`apply_masks` on a ring-dtype copy of ``values`` followed by the
    reduction, fused chunk by chunk: the masks are added at the ring word width (2 bytes for
    ``bits <= 16``) in a cache-sized buffer and each finished chunk is reduced and widened
    straight into the output (no vector-sized temporary besides the result). ``values`` must
    already lie in ``[0, 2**bits)``.
    """
    dtype = ring_dtype(bits)
    if values.ndim != 1 or values.dtype.kind not in "ui":
        raise ValueError("values must be a 1-D integer array")
    n = values.shape[0]
    if out is None:
        out = np.empty(n, dtype=np.uint32)
    elif out.shape != (n,) or out.dtype != np.uint32:
        raise ValueError(f"out must be {n} uint32 words")
    encs, chunk, zeros, buf, words = _mask_chunks(add_seeds, sub_seeds, dtype.itemsize, dtype)
    wide = dtype.itemsize == out.dtype.itemsize
    in_place = out is values
    acc = np.empty(0 if wide else min(n, chunk), dtype=dtype)
    reduce = bits < 8 * dtype.itemsize
    modulus = dtype.type((1 << bits) - 1)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        target = out[start:stop] if wide else acc[: stop - start]
        if not (wide and in_place):
            np.copyto(target, values[start:stop], casting="unsafe")
        _add_streams(target, encs, zeros, buf, words)
        if reduce:
            np.bitwise_and(target, modulus, out=target)
        if not wide:
            np.copyto(out[start:stop], target)
    return out
