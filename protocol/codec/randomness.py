"""Round-shared randomness: the rotation signs and the kept subset of a round.

Both are deterministic functions of the round seed (:attr:`CodecParams.seed`), identical on
every device and the server, so the masked sums of secure aggregation stay aligned: the
devices rotate with the same Rademacher vector and keep the same coordinates. The subset is
the subsampling of Konecny et al. 2016 ("Federated Learning: Strategies for Improving
Communication Efficiency", arXiv:1610.05492, sketched updates), there a fresh random mask per
device; here one per round, chosen from the round seed: ``m = ceil(p * D)`` coordinates
(``p`` = ``keep_fraction``). The decoder scales by ``D / m`` (= 1/p up to rounding), which
makes the estimate unbiased over the choice of the subset.

The bits come from AES-128-CTR keyed from the seed (:func:`_stream_cipher`), stable across
numpy versions and platforms, read chunk by chunk (no vector-sized temporary beyond the
results, which are cached read-only).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from functools import lru_cache
from typing import Any

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from protocol.codec.params import CodecParams, FloatVec, kept_count, padded_dim

__all__ = [
    "SUBSET_MARGIN",
    "extreme_keys",
    "kept_indices",
    "kept_subset",
    "rotation_signs",
    "subset_key_chunks",
]


def _stream_cipher(seed: bytes, label: bytes) -> Any:
    """AES-128-CTR under the first 16 bytes of ``SHA-256("fedkeys/codec/v1/" || label || 0 ||
    seed)``, counter block 0: its keystream (read chunk by chunk) is the round-shared
    randomness.

    Not secret material: it picks the rotation signs and the kept subset. AES-CTR (rather than
    numpy's generators) keeps the choice identical across numpy versions and platforms.
    """
    key = hashlib.sha256(b"fedkeys/codec/v1/" + label + b"\x00" + seed).digest()[:16]
    return Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()


_STREAM_CHUNK = 1 << 16  # coordinates per chunk of round-shared randomness


def _readonly(a: npt.NDArray[Any]) -> npt.NDArray[Any]:
    a.setflags(write=False)
    return a


@lru_cache(maxsize=2)
def _signs_cached(seed: bytes, big_d: int) -> FloatVec:
    """Sign ``i`` is ``-1`` where bit ``i`` (little-endian within each byte) of the "signs"
    stream is set; built chunk by chunk (no temporary beyond the result)."""
    enc = _stream_cipher(seed, b"signs")
    signs = np.empty(big_d, dtype=np.float32)
    for start in range(0, big_d, _STREAM_CHUNK):  # a multiple of 8: whole bytes per chunk
        stop = min(big_d, start + _STREAM_CHUNK)
        raw = np.frombuffer(enc.update(bytes((stop - start + 7) // 8)), np.uint8)
        bits = np.unpackbits(raw, count=stop - start)
        np.multiply(bits, np.float32(-2.0), out=signs[start:stop])
        signs[start:stop] += np.float32(1.0)
    return _readonly(signs)


def rotation_signs(params: CodecParams, d: int) -> FloatVec:
    """The round's Rademacher vector (length D, values +-1), read-only."""
    return _signs_cached(params.seed, padded_dim(params, d))


def subset_key_chunks(seed: bytes, big_d: int) -> Iterator[tuple[int, npt.NDArray[np.uint64]]]:
    """``(start, keys)`` chunk by chunk: key ``i`` is the ``i``-th little-endian uint64 of the
    "subset" stream with its low ``ceil(log2 D)`` bits replaced by ``i``. All keys are
    distinct, so "the m smallest keys" is unique and does not depend on the selection
    algorithm; the index is recovered from a key's low bits."""
    enc = _stream_cipher(seed, b"subset")
    low = np.uint64(max(1, (big_d - 1).bit_length()))
    for start in range(0, big_d, _STREAM_CHUNK):
        stop = min(big_d, start + _STREAM_CHUNK)
        keys = np.frombuffer(enc.update(bytes(8 * (stop - start))), dtype="<u8").astype(np.uint64)
        keys >>= low
        keys <<= low
        keys |= np.arange(start, stop, dtype=np.uint64)
        yield start, keys


SUBSET_MARGIN = 8.0  # standard deviations of candidates beyond the expected count


def extreme_keys(seed: bytes, big_d: int, count: int, largest: bool) -> npt.NDArray[np.uint64]:
    """The ``count`` smallest (or largest) keys of :func:`subset_key_chunks`, unordered.

    One streaming pass keeps only the keys beyond a threshold set so that about ``count``
    plus eight standard deviations (and 64) of them pass: the keys' high bits are uniform,
    so fewer than ``count`` passing has probability below 1e-15; if it happens anyway the
    pass is repeated with a wider margin. Memory: about 8 bytes per kept key (not 32 bytes
    per coordinate as sorting all keys would take).
    """
    want = max(1, count + int(SUBSET_MARGIN * math.sqrt(count)) + 64)
    while True:
        cut = None if want >= big_d else (want << 64) // big_d  # P(key < cut) ~ want / D
        if cut is not None and largest:
            cut = (1 << 64) - cut
        cand = np.empty(min(big_d, want + want // 8), dtype=np.uint64)
        n = 0
        for _, chunk in subset_key_chunks(seed, big_d):
            keys = chunk
            if cut is not None:
                keys = chunk[chunk >= np.uint64(cut)] if largest else chunk[chunk < np.uint64(cut)]
            if n + keys.shape[0] > cand.shape[0]:
                cand = np.concatenate((cand[:n], np.empty(max(keys.shape[0], n // 4), np.uint64)))
            cand[n : n + keys.shape[0]] = keys
            n += keys.shape[0]
        if n >= count:
            break
        want = 2 * want + 64  # astronomically rare: more keys needed beyond the threshold
    cand = cand[:n]
    if n > count:
        if largest:
            cand.partition(n - count)
            return cand[n - count :]
        cand.partition(count - 1)
    return cand[:count]


@lru_cache(maxsize=2)
def kept_subset(seed: bytes, big_d: int, m: int) -> npt.NDArray[np.intp]:
    """Indices of the ``m`` smallest keys (see :func:`subset_key_chunks`), sorted. Above
    half of the coordinates it finds the ``D - m`` largest (the complement) instead, so the
    candidates never take more than 4 bytes per coordinate."""
    if m >= big_d:
        return _readonly(np.arange(big_d, dtype=np.intp))
    lowmask = np.uint64((1 << max(1, (big_d - 1).bit_length())) - 1)
    if 2 * m <= big_d:
        keys = extreme_keys(seed, big_d, m, largest=False)
        keys &= lowmask
        keys.sort()
        return _readonly(keys.view(np.int64).astype(np.intp, copy=False))
    dropped = extreme_keys(seed, big_d, big_d - m, largest=True)
    dropped &= lowmask
    keep = np.ones(big_d, dtype=bool)
    keep[dropped.view(np.int64)] = False
    return _readonly(np.flatnonzero(keep).astype(np.intp, copy=False))


def kept_indices(params: CodecParams, d: int) -> npt.NDArray[np.intp]:
    """Sorted indices (into the length-D vector) of the round's kept coordinates."""
    return kept_subset(params.seed, padded_dim(params, d), kept_count(params, d))
