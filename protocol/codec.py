"""Update codec: clip, rotate, sparsify, quantize into a ring, bit-pack; and the way back.

Two paths share this module.

**Secure-aggregation path** (:func:`encode` / :func:`decode_sum`). Every device of a round
uses the same :class:`CodecParams` (from the round plan), so the server can add the encoded
vectors modulo ``2**k`` and decode only the sum:

1. ``x = delta * w * min(1, C / ||delta||)``: L2 clipping to ``clip_norm`` C, and the
   example-count weight ``w = min(num_examples, weight_cap) / weight_cap`` in ``[0, 1]`` (so
   ``||x|| <= C`` still holds and the quantization range below covers weighted updates too).
2. Optional randomised Hadamard rotation: pad to ``D`` (a multiple of the block size ``B``,
   a power of two, see :func:`rotation_block`), flip signs with a seeded Rademacher vector and
   apply the orthonormal Walsh-Hadamard transform of size ``B`` to each of the ``D / B``
   interleaved blocks (block ``j`` holds coordinates ``j, j + D/B, j + 2D/B, ...``), in
   O(D log B). It spreads the energy so that every coordinate is about ``||x|| / sqrt(D)``.
   Blocks keep the padding small: one power-of-two block would pad a 2.57M-parameter model to
   4.19M coordinates (+63% upload), five interleaved blocks of 2**19 pad it to 2.62M (+2%);
   interleaving spreads every parameter tensor over all blocks, so their energies stay even.
3. Keep a round-shared random subset of ``m = ceil(p * D)`` coordinates (``p`` =
   ``keep_fraction``), chosen from the round seed: identical on every device, so the masked
   sums stay aligned. The decoder scales by ``D / m`` (= 1/p up to rounding), which makes the
   estimate unbiased over the choice of the subset.
4. Stochastic quantization to ``b`` bits: the common range is
   ``[-R, R]`` with ``R = range_factor * C / sqrt(D)``; a value ``v`` maps to
   ``t = (v + R) / Delta`` with ``Delta = 2R / (2**b - 1)``, and ``q = floor(t)`` or
   ``floor(t) + 1`` with probability ``t - floor(t)`` (unbiased). Values outside ``[-R, R]``
   are clamped (that is biased, and counted in :attr:`EncodedUpdate.saturated`). With
   rotation, coordinates are close to Gaussian with standard deviation at most ``C/sqrt(D)``,
   so ``range_factor = 4`` clamps roughly 6e-5 of them; without rotation pick ``range_factor``
   for the spikiest coordinate you expect (``sqrt(D)`` never clamps: then ``R = C``).
5. The ring ``Z_(2**k)``: every quantized value is in ``[0, 2**b - 1]``; one extra slot holds the
   integer weight ``min(num_examples, weight_cap)``. ``k`` (:func:`ring_bits`) is the smallest
   width that holds the sum of ``max_clients`` such vectors without wrapping, so the modular
   sum *is* the integer sum. The decoder removes the offset ``n * R`` (n = number of summed
   inputs), scales, un-rotates and divides by the summed weight: the weighted mean
   ``sum(w_i x_i) / sum(w_i)``.

**Plain path** (no secure aggregation): :func:`topk_encode` keeps the ``k`` largest-magnitude
coordinates of ``delta + residual`` and returns the new residual (error feedback) to the
caller; :func:`topk_decode` and :func:`sparse_weighted_mean` undo it on the server.

:func:`pack_bits` / :func:`unpack_bits` store ``k``-bit ring elements densely (see
:func:`pack_bits` for the byte layout).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated, Any

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from pydantic import BaseModel, ConfigDict, Field, field_validator

from protocol._encoding import B64Bytes
from protocol.dp import NOISE_TAIL, NoiseStream, sample_discrete_gaussian

__all__ = [
    "MAX_RING_BITS",
    "NOISE_NORM_TAIL",
    "CodecError",
    "CodecParams",
    "DecodedMean",
    "EncodedUpdate",
    "NormBoundError",
    "SparseUpdate",
    "check_packed",
    "check_rotation_block",
    "check_update_norm",
    "decode_mean",
    "decode_sum",
    "encode",
    "encoded_length",
    "fwht",
    "kept_count",
    "kept_indices",
    "mean_norm_bound",
    "pack_bits",
    "pack_bits_into",
    "packed_size",
    "padded_dim",
    "quant_range",
    "ring_bits",
    "ring_sum",
    "rotate",
    "rotation_block",
    "rotation_signs",
    "sparse_weighted_mean",
    "topk_decode",
    "topk_encode",
    "unclipped_count",
    "unpack_bits",
    "unpack_bits_add",
    "unrotate",
]

FloatVec = npt.NDArray[np.float32]
RingVec = npt.NDArray[np.uint32]
IndexVec = npt.NDArray[np.uint32]

MAX_RING_BITS = 32
"""Ring elements travel and are summed as uint32: ``k`` may not exceed 32."""

_MAX_DIM = 1 << 31  # largest vector the codec handles (indices fit uint32)


class CodecError(ValueError):
    """Invalid codec parameters or an input the codec refuses (NaN/Inf, wrong length...)."""


def _seed_bytes(value: Any) -> bytes:
    if isinstance(value, bool):
        raise ValueError("seed must be bytes or a non-negative integer")
    if isinstance(value, int):
        if not 0 <= value < 1 << 256:
            raise ValueError("integer seed must be in [0, 2**256)")
        return value.to_bytes(32, "big")
    return value  # type: ignore[no-any-return]


def check_rotation_block(value: int | None) -> int | None:
    """Validator shared with the coordinator's task settings: None or a power of two."""
    if value is not None and value & (value - 1):
        raise ValueError(f"rotation_block must be a power of two, got {value}")
    return value


class CodecParams(BaseModel):
    """Round-wide codec settings: every device and the server use the same ones."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    clip_norm: float = Field(gt=0, allow_inf_nan=False)
    """C: L2 bound of one (weighted) update."""
    rotate: bool = True
    """Randomised Hadamard rotation before subsampling and quantization."""
    keep_fraction: float = Field(default=1.0, gt=0, le=1)
    """p: fraction of (padded) coordinates kept; the subset is shared by the round."""
    bits: int = Field(default=8, ge=1, le=24)
    """b: quantization bits per kept coordinate (2**b levels)."""
    max_clients: int = Field(ge=1, le=1 << 24)
    """n: largest number of inputs summed in one round (ring headroom)."""
    range_factor: float = Field(default=4.0, gt=0, allow_inf_nan=False)
    """alpha: quantization range is ``[-R, R]``, ``R = alpha * C / sqrt(D)``."""
    weight_cap: int = Field(default=1, ge=1, le=1 << 24)
    """Example count at which a device's weight saturates; 1 = every device weighs the same."""
    rotation_block: int | None = Field(default=None, ge=1 << 8, le=1 << 30)
    """Largest Hadamard block (a power of two); None picks it from d (:func:`rotation_block`)."""
    noise_std: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    """Distributed DP: standard deviation (in quantization levels) of the discrete Gaussian
    each device adds to every kept coordinate before masking; 0 = no noise (see protocol.dp)."""
    count_slot: bool = False
    """Adaptive clipping: one more slot, 1 when the device's norm was within ``clip_norm``."""
    count_noise_std: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    """Distributed DP: per-device discrete Gaussian noise on the count slot."""
    seed: Annotated[B64Bytes, Field(min_length=16, max_length=64)]
    """Round seed (16..64 bytes, or an int < 2**256 stored as 32 big-endian bytes)."""

    @field_validator("seed", mode="before")
    @classmethod
    def _seed(cls, value: Any) -> Any:
        return _seed_bytes(value)

    @field_validator("rotation_block")
    @classmethod
    def _block_pow2(cls, value: int | None) -> int | None:
        return check_rotation_block(value)

    @field_validator("seed")
    @classmethod
    def _seed_len(cls, value: bytes) -> bytes:
        if not 16 <= len(value) <= 64:
            raise ValueError(f"seed must have 16..64 bytes, got {len(value)}")
        return value


@dataclass(frozen=True)
class EncodedUpdate:
    """One device's encoded update: ring elements plus diagnostics (never sent)."""

    values: RingVec
    """``m`` quantized coordinates then the integer weight; each ``< 2**ring_bits``."""
    norm: float
    """L2 norm of the delta before clipping."""
    clipped: bool
    """Whether clipping changed the delta."""
    saturated: int
    """Kept coordinates clamped to the quantization range (a biased error; excursions below
    a thousandth of a level, i.e. float rounding at the edge, are not counted)."""
    weight: int
    """``min(num_examples, weight_cap)``, also stored in the last ring slot."""


@dataclass(frozen=True)
class SparseUpdate:
    """Top-k sparsified float update of a ``dim``-long vector (plain path)."""

    indices: IndexVec
    """Strictly increasing coordinates, each ``< dim``."""
    values: FloatVec
    dim: int


# ----------------------------------------------------------------------------------------
# Derived sizes and the ring width
# ----------------------------------------------------------------------------------------


def _check_dim(d: int) -> None:
    if not 1 <= d <= _MAX_DIM:
        raise CodecError(f"vector length must be in [1, 2**31], got {d}")


_AUTO_MIN_BLOCK = 1 << 10
_AUTO_MAX_PADDING = 1 / 16


def rotation_block(params: CodecParams, d: int) -> int:
    """B: the Hadamard block size for a length-``d`` vector (``d`` itself without rotation).

    ``params.rotation_block`` caps it; by default it is the largest power of two, at most
    ``2**ceil(log2 d)`` and at least 1024, whose padding (``ceil(d / B) * B - d``) stays
    within 1/16 of ``d``: one block when ``d`` is close to a power of two, a few otherwise.
    """
    _check_dim(d)
    if not params.rotate:
        return d
    block = 1 << (d - 1).bit_length()
    if params.rotation_block is not None:
        return min(block, params.rotation_block)
    while block > _AUTO_MIN_BLOCK and -(-d // block) * block - d > d * _AUTO_MAX_PADDING:
        block >>= 1
    return block


def padded_dim(params: CodecParams, d: int) -> int:
    """D: ``d`` rounded up to a multiple of the rotation block when rotating, else ``d``."""
    block = rotation_block(params, d)
    return -(-d // block) * block


def kept_count(params: CodecParams, d: int) -> int:
    """m: number of kept coordinates, ``ceil(p * D)`` (at least 1)."""
    big_d = padded_dim(params, d)
    # round() absorbs float noise such as 0.1 * 1000 = 100.00000000000001
    return max(1, min(big_d, math.ceil(round(params.keep_fraction * big_d, 9))))


def encoded_length(params: CodecParams, d: int) -> int:
    """Ring elements per encoded update: the kept coordinates, the weight slot and, with
    adaptive clipping, the count slot."""
    return kept_count(params, d) + 1 + int(params.count_slot)


def quant_range(params: CodecParams, d: int) -> float:
    """R: the common per-coordinate quantization range ``[-R, R]``."""
    return params.range_factor * params.clip_norm / math.sqrt(padded_dim(params, d))


def ring_bits(params: CodecParams) -> int:
    """k: the smallest ring width holding the sum of ``max_clients`` encoded vectors.

    A value slot holds at most ``2**b - 1`` and the weight slot at most ``weight_cap``, so the
    sums are at most ``n * (2**b - 1)`` and ``n * weight_cap``; ``k`` is the bit length of the
    larger (about ``b + ceil(log2 n)``). Raises :class:`CodecError` beyond 32 bits.
    """
    n = params.max_clients
    levels = (1 << params.bits) - 1
    need = max(
        _span_bits(n * levels, params.noise_std, n),
        (n * params.weight_cap).bit_length(),
        _span_bits(n, params.count_noise_std, n) if params.count_slot else 1,
        1,
    )
    if need > MAX_RING_BITS:
        raise CodecError(
            f"the sum of {n} inputs at {params.bits} bits (weight cap {params.weight_cap}, "
            f"noise {params.noise_std:g}) needs {need} ring bits, more than {MAX_RING_BITS}: "
            "lower bits, max_clients, weight_cap or the noise"
        )
    return need


def _span_bits(span: int, noise_std: float, n: int) -> int:
    """Bits for sums in ``[0, span]``; with noise, for the centred sum ``+- span/2`` plus
    ``NOISE_TAIL`` standard deviations of ``n`` devices' summed noise (decoded centred)."""
    if noise_std == 0:
        return span.bit_length()
    return math.ceil(span + 2 * NOISE_TAIL * noise_std * math.sqrt(n)).bit_length()


# ----------------------------------------------------------------------------------------
# Round-shared randomness (deterministic from the round seed, stable across numpy versions)
# ----------------------------------------------------------------------------------------


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


def _subset_key_chunks(seed: bytes, big_d: int) -> Any:
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


_SUBSET_MARGIN = 8.0  # standard deviations of candidates beyond the expected count


def _extreme_keys(seed: bytes, big_d: int, count: int, largest: bool) -> npt.NDArray[np.uint64]:
    """The ``count`` smallest (or largest) keys of :func:`_subset_key_chunks`, unordered.

    One streaming pass keeps only the keys beyond a threshold set so that about ``count``
    plus eight standard deviations (and 64) of them pass: the keys' high bits are uniform,
    so fewer than ``count`` passing has probability below 1e-15; if it happens anyway the
    pass is repeated with a wider margin. Memory: about 8 bytes per kept key (not 32 bytes
    per coordinate as sorting all keys would take).
    """
    want = max(1, count + int(_SUBSET_MARGIN * math.sqrt(count)) + 64)
    while True:
        cut = None if want >= big_d else (want << 64) // big_d  # P(key < cut) ~ want / D
        if cut is not None and largest:
            cut = (1 << 64) - cut
        cand = np.empty(min(big_d, want + want // 8), dtype=np.uint64)
        n = 0
        for _, chunk in _subset_key_chunks(seed, big_d):
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
def _subset_cached(seed: bytes, big_d: int, m: int) -> npt.NDArray[np.intp]:
    """Indices of the ``m`` smallest keys (see :func:`_subset_key_chunks`), sorted. Above
    half of the coordinates it finds the ``D - m`` largest (the complement) instead, so the
    candidates never take more than 4 bytes per coordinate."""
    if m >= big_d:
        return _readonly(np.arange(big_d, dtype=np.intp))
    lowmask = np.uint64((1 << max(1, (big_d - 1).bit_length())) - 1)
    if 2 * m <= big_d:
        keys = _extreme_keys(seed, big_d, m, largest=False)
        keys &= lowmask
        keys.sort()
        return _readonly(keys.view(np.int64).astype(np.intp, copy=False))
    dropped = _extreme_keys(seed, big_d, big_d - m, largest=True)
    dropped &= lowmask
    keep = np.ones(big_d, dtype=bool)
    keep[dropped.view(np.int64)] = False
    return _readonly(np.flatnonzero(keep).astype(np.intp, copy=False))


def kept_indices(params: CodecParams, d: int) -> npt.NDArray[np.intp]:
    """Sorted indices (into the length-D vector) of the round's kept coordinates."""
    return _subset_cached(params.seed, padded_dim(params, d), kept_count(params, d))


# ----------------------------------------------------------------------------------------
# Walsh-Hadamard transform
# ----------------------------------------------------------------------------------------


@lru_cache(maxsize=16)
def _hadamard(log2n: int, dtype: str) -> npt.NDArray[Any]:
    h = np.ones((1, 1), dtype=dtype)
    for _ in range(log2n):
        h = np.block([[h, h], [h, -h]])
    return _readonly(h)


_FWHT_CHUNK_BYTES = 1 << 18  # the levels that fit in such a contiguous chunk run in cache
_FWHT_WIDE_STRIDE = 256  # from this stride on, 4x4 blocks beat 16x16 ones (fewer flops)


def _pass_plan(levels: int, stride: int, wide: int) -> list[int]:
    """Levels per pass (``log2 f``) for ``levels`` butterfly levels starting at ``stride``:
    16x16 Hadamard blocks while the stride is short (a batched GEMM of short rows is
    overhead-bound: four levels per pass amortise it), 4x4 blocks from stride ``wide`` on
    (long rows: the pass is bandwidth-bound and H_4 does 4 instead of 16 multiply-adds per
    element). Measured per level and 64K-element chunk here: 8 us for 16x16 at stride 1,
    5 us for 4x4 at stride >= 256 (13 us for 16x16 at stride 4096)."""
    out = []
    while levels > 0:
        c = min(levels, 4 if stride < wide else 2)
        out.append(c)
        levels -= c
        stride <<= c
    return out


def _hadamard_pass(h: npt.NDArray[Any], src: npt.NDArray[Any], dst: npt.NDArray[Any], stride: int) -> None:
    """``dst = H_f`` applied along the axis of stride ``stride`` (``f = len(h)``)."""
    f = h.shape[0]
    if stride == 1:
        np.matmul(src.reshape(-1, f), h, out=dst.reshape(-1, f))  # H is symmetric
    else:
        np.matmul(h, src.reshape(-1, f, stride), out=dst.reshape(-1, f, stride))


def _wht(
    src: npt.NDArray[Any],
    total: int,
    blocks: int,
    dtype: type[np.floating[Any]],
    *,
    scale: float = 1.0,
    signs: npt.NDArray[Any] | None = None,
    out: npt.NDArray[Any] | None = None,
) -> npt.NDArray[Any]:
    """``scale * H_B`` applied to each of the ``blocks`` interleaved blocks of
    ``pad(src) * signs`` (zero-padded to ``total = blocks * B``, ``B`` a power of two): a
    new ``dtype`` array, or ``out`` (``total`` contiguous ``dtype`` elements, not ``src``);
    ``src`` is only read.

    ``H_B`` is the Kronecker product of small Hadamard blocks ``H_f`` (``f`` = 16 or 4, see
    :func:`_pass_plan`), so the transform is one batched matrix product per block of index
    bits: viewing the vector as ``(D / (f * s), f, s)`` for stride ``s`` (1, 16, 256, 1024,
    ...), multiply every ``(f, s)`` slice by ``H_f``. No transposes, BLAS does the flops.
    Starting at stride ``blocks`` instead of 1 transforms the slot index ``i // blocks`` and
    leaves the block index ``i % blocks`` alone: that is the interleaved block transform.
    The levels whose groups fit in a contiguous chunk of ``_FWHT_CHUNK_BYTES`` run chunk
    by chunk in two small buffers (in L2, with the sign flip applied while loading); only
    the remaining top levels pass over the whole vector, in place, a slab of columns at a
    time. The scale is folded into the first Hadamard block.
    """
    levels = (total // blocks).bit_length() - 1
    local = levels
    while local > 0 and (blocks << local) * np.dtype(dtype).itemsize > _FWHT_CHUNK_BYTES:
        local -= 1
    chunk = blocks << local
    in_chunk = _pass_plan(local, blocks, _FWHT_WIDE_STRIDE)
    passes = in_chunk + _pass_plan(levels - local, chunk, 0)
    hs = [_hadamard(c, np.dtype(dtype).name) for c in passes]
    if hs:
        hs[0] = hs[0] * dtype(scale)
    n = src.shape[0]
    if out is None:
        out = np.empty(total, dtype=dtype)
    elif out.shape != (total,) or out.dtype != dtype or not out.flags.c_contiguous:
        raise CodecError(f"transform output must be {total} contiguous {np.dtype(dtype)}")
    buf = (np.empty(chunk, dtype=dtype), np.empty(chunk, dtype=dtype))
    n_local = len(in_chunk)
    for s in range(0, total, chunk):
        e = s + chunk
        k = max(0, min(n, e) - s)
        cur = buf[0] if n_local else out[s:e]
        if signs is None:
            np.copyto(cur[:k], src[s : s + k])
        else:
            np.multiply(src[s : s + k], signs[s : s + k], out=cur[:k])
        cur[k:] = 0.0
        if not hs:
            cur *= dtype(scale)
        stride = blocks
        for i in range(n_local):
            dst = out[s:e] if i == n_local - 1 else buf[1] if cur is buf[0] else buf[0]
            _hadamard_pass(hs[i], cur, dst, stride)
            cur = dst
            stride *= hs[i].shape[0]
    for h in hs[n_local:]:
        # in place, a slab of columns at a time through the small buffer
        f = h.shape[0]
        view = out.reshape(-1, f, stride)
        width = max(1, chunk // (view.shape[0] * f))
        slab = buf[0] if view.shape[0] * f * width <= chunk else np.empty(view.shape[0] * f * width, dtype)
        for j in range(0, stride, width):
            cols = view[:, :, j : j + width]
            tmp = slab[: cols.size].reshape(cols.shape)
            np.matmul(h, cols, out=tmp)
            cols[...] = tmp
        stride *= f
    return out


def fwht(x: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """Orthonormal Walsh-Hadamard transform ``H x / sqrt(D)`` (its own inverse), O(D log D).

    Returns a new array (float32 stays float32, anything else becomes float64).
    """
    x = np.asarray(x)
    big_d = x.shape[0]
    if x.ndim != 1 or big_d & (big_d - 1) or big_d == 0:
        raise CodecError(f"fwht needs a 1-D power-of-two length, got shape {x.shape}")
    dtype = x.dtype if x.dtype in (np.float32, np.float64) else np.dtype(np.float64)
    return _wht(x, big_d, 1, dtype.type, scale=1.0 / math.sqrt(big_d))


def _rotate_scaled(
    x: FloatVec,
    params: CodecParams,
    scale: float,
    dtype: type[np.floating[Any]] = np.float32,
    out: npt.NDArray[Any] | None = None,
) -> npt.NDArray[Any]:
    """``scale * rotate(x)``: the sign flip while loading chunks, the scale in the first
    Hadamard block (no pass of its own, no padded copy of ``x``); into ``out`` if given."""
    d = x.shape[0]
    block = rotation_block(params, d)
    big_d = padded_dim(params, d)
    signs = rotation_signs(params, d)
    return _wht(x, big_d, big_d // block, dtype, scale=scale / math.sqrt(block), signs=signs, out=out)


def rotate(x: FloatVec, params: CodecParams) -> FloatVec:
    """Randomised Hadamard rotation of a length-d vector: ``H (s * pad(x))``, where ``H`` is
    the orthonormal Walsh-Hadamard transform of each interleaved block (see the module doc)."""
    return _rotate_scaled(np.asarray(x, dtype=np.float32), params, 1.0)


def unrotate(y: npt.NDArray[Any], params: CodecParams, d: int) -> npt.NDArray[Any]:
    """Inverse of :func:`rotate`: ``(s * H y)[:d]`` (keeps ``y``'s float dtype)."""
    y = np.asarray(y)
    block = rotation_block(params, d)
    big_d = padded_dim(params, d)
    if y.ndim != 1 or y.shape[0] != big_d:
        raise CodecError(f"rotated vector has shape {y.shape}, expected ({big_d},)")
    dtype = y.dtype if y.dtype in (np.float32, np.float64) else np.dtype(np.float64)
    z = _wht(y, big_d, big_d // block, dtype.type, scale=1.0 / math.sqrt(block))[:d]
    z *= rotation_signs(params, d)[:d]
    return z


# ----------------------------------------------------------------------------------------
# Encode and decode (secure-aggregation path)
# ----------------------------------------------------------------------------------------


def _as_float_vector(delta: npt.ArrayLike, *, check_finite: bool = True) -> FloatVec:
    x = np.asarray(delta)
    if x.ndim != 1:
        raise CodecError(f"delta must be 1-D, got shape {x.shape}")
    x = x.astype(np.float32, copy=False)
    _check_dim(x.shape[0])
    if check_finite and not np.isfinite(x).all():
        raise CodecError("delta contains NaN or Inf")
    return x


def _l2_norm(x: FloatVec) -> float:
    """L2 norm; refuses NaN/Inf. A finite ``x . x`` proves every element finite (NaN and Inf
    propagate into the sum of squares), so the explicit scan runs only on overflow."""
    with np.errstate(over="ignore", invalid="ignore"):
        sq = float(np.dot(x, x))
    if math.isfinite(sq):
        return math.sqrt(sq)
    if not np.isfinite(x).all():
        raise CodecError("delta contains NaN or Inf")
    amax = float(np.abs(x).max())  # overflow in float32: rescale first
    scaled = x / np.float32(amax)
    return amax * math.sqrt(float(np.dot(scaled, scaled)))


_Q_CHUNK = 1 << 16  # elements per quantization chunk: the three buffers stay in L2


def _fixed_point(bits: int) -> tuple[type[np.floating[Any]], type[np.signedinteger[Any]], int]:
    """(float dtype, integer dtype, S) of the stochastic rounding of a ``bits``-bit quantizer:
    float32 and int32 with ``S = 31 - bits`` up to 16 bits (float32 resolves a fraction of a
    level there), float64 and int64 with ``S = 63 - bits`` beyond."""
    if bits <= 16:
        return np.float32, np.int32, 31 - bits
    return np.float64, np.int64, 63 - bits


def _quantize_into(
    src: npt.NDArray[Any],
    idx: npt.NDArray[np.intp] | None,
    scale: float | None,
    bits: int,
    rng: np.random.Generator,
    out: RingVec,
) -> int:
    """Unbiased stochastic rounding, chunk by chunk, of ``t = src[idx] * scale + levels/2``
    (``src`` already scaled when ``scale`` is None, and then overwritten) into ``out``;
    returns the number of clamped coordinates. Without ``idx``, ``src`` may share ``out``'s
    memory (each chunk is read before its words are written).

    ``t`` is in units of ``2**-S`` levels (see :func:`_fixed_point`), clamped to
    ``[0, levels * 2**S]`` and truncated to an integer ``a``; with ``u`` uniform on
    ``[0, 2**S)``, ``q = (a + u) >> S`` is ``floor(a / 2**S) + 1`` with probability equal to
    the fractional part of ``a / 2**S`` (exactly: no float rounding in the comparison). The
    truncation of ``t`` to ``a`` moves it by less than ``2**-S`` levels (2**-15 at 16 bits),
    below the float rounding of ``t`` itself. ``u`` is the top ``S`` bits of an AES-128-CTR
    keystream word (4 bytes per coordinate up to 16 bits, 8 beyond; the masks' fast
    keystream, :func:`protocol.secagg.crypto.keystream`) keyed with 32 bytes drawn from
    ``rng``: uniform, and four times faster than numpy's float generator.
    """
    work, itype, shift = _fixed_point(bits)
    levels = (1 << bits) - 1
    top = float(levels << shift)
    eps = 1e-3 * (1 << shift)  # excursions below 1e-3 of a level are float rounding
    offset = work(levels * 2.0 ** (shift - 1))
    n = out.shape[0]
    c = min(n, _Q_CHUNK)
    word = np.dtype(itype).itemsize
    tbuf = np.empty(c, dtype=work)
    gbuf = np.empty(c, dtype=src.dtype) if idx is not None and scale is not None else tbuf
    abuf = np.empty(c, dtype=itype)
    zeros = bytes(c * word)
    ksraw = bytearray(c * word + 16)  # update_into needs block_size - 1 spare bytes
    ks = np.frombuffer(ksraw, dtype=np.dtype(f"<u{word}"), count=c)
    from protocol.secagg.crypto import keystream  # here: protocol.secagg imports this module

    dither = keystream(rng.bytes(32))
    out_int = out.view(np.int32)
    saturated = 0
    for s in range(0, n, c):
        e = min(n, s + c)
        k = e - s
        if idx is None:
            part = src[s:e]
        else:
            part = gbuf[:k]
            np.take(src, idx[s:e], out=part, mode="clip")  # indices are valid: no checks
        if scale is None:
            t = part
        else:
            t = tbuf[:k]
            np.multiply(part, scale, out=t)
        np.add(t, offset, out=t)
        if float(t.min()) < 0.0 or float(t.max()) > top:
            saturated += int(np.count_nonzero((t < -eps) | (t > top + eps)))
            np.clip(t, 0.0, top, out=t)
        a = abuf[:k]
        np.copyto(a, t, casting="unsafe")  # t >= 0: truncation
        dither.update_into(zeros if k == c else zeros[: k * word], ksraw)
        u = ks[:k]
        np.right_shift(u, bits + 1, out=u)  # uniform on [0, 2**S)
        np.add(a, u.view(itype), out=a)
        if itype is np.int32:
            np.right_shift(a, shift, out=out_int[s:e])
        else:
            np.right_shift(a, shift, out=out[s:e], casting="unsafe")
    return saturated


def encode(
    delta: npt.ArrayLike,
    params: CodecParams,
    rng: np.random.Generator,
    *,
    num_examples: int = 1,
    noise_key: bytes | None = None,
) -> EncodedUpdate:
    """Encode one device's float delta into ``encoded_length(params, d)`` ring elements.

    ``rng`` supplies the stochastic-rounding dither only (local, not secret). ``num_examples``
    sets the weight ``min(num_examples, weight_cap) / weight_cap`` (0 contributes nothing).
    With ``params.noise_std > 0`` (distributed DP) the quantized coordinates get discrete
    Gaussian noise and are reduced modulo ``2**ring_bits``. The noise must stay secret from the
    server: it comes from a :class:`protocol.dp.NoiseStream` (AES-CTR keystream) under a fresh
    key from :mod:`secrets`; ``noise_key`` (32 bytes) fixes that key, for reproducible tests
    only.
    """
    ring_bits(params)  # refuses a parameter set whose sums could overflow, before any work
    x = _as_float_vector(delta, check_finite=False)  # _l2_norm refuses NaN/Inf
    if num_examples < 0:
        raise CodecError(f"num_examples must be >= 0, got {num_examples}")
    d = x.shape[0]
    weight = min(num_examples, params.weight_cap)
    norm = _l2_norm(x)
    clipped = norm > params.clip_norm
    factor = (weight / params.weight_cap) * (params.clip_norm / norm if clipped else 1.0)

    levels = (1 << params.bits) - 1
    r = quant_range(params, d)
    # t = (y + R) * levels / (2R) with y = factor * x (rotated, subsampled): the scalings are
    # folded into one multiply, the offset added after the (linear) rotation. t is carried in
    # fixed point (units of 2**-S levels, see _quantize_into), the 2**S folded in as well.
    work, _, shift = _fixed_point(params.bits)
    gain = factor * levels / (2.0 * r) * 2.0**shift
    big_d = padded_dim(params, d)
    m = kept_count(params, d)
    idx = kept_indices(params, d) if m < big_d else None
    out = np.empty(encoded_length(params, d), dtype=np.uint32)
    if params.rotate:
        # every coordinate kept at 4 bytes: rotate straight into the output's memory, which
        # the quantizer then overwrites chunk by chunk (one vector allocated, not two)
        alias = idx is None and np.dtype(work).itemsize == out.itemsize
        rotated = _rotate_scaled(x, params, gain, work, out[:big_d].view(work) if alias else None)
        saturated = _quantize_into(rotated, idx, None, params.bits, rng, out[:m])
    else:
        saturated = _quantize_into(x, idx, gain, params.bits, rng, out[:m])
    out[m] = weight  # every slot is < 2**b or <= weight_cap, hence < 2**ring_bits
    if params.count_slot:
        out[m + 1] = 0 if clipped else 1
    if params.noise_std > 0 or params.count_noise_std > 0:
        _add_noise(out, params, m, noise_key)
    return EncodedUpdate(values=out, norm=norm, clipped=clipped, saturated=saturated, weight=weight)


def _add_noise(out: RingVec, params: CodecParams, m: int, noise_key: bytes | None) -> None:
    """Distributed DP: discrete Gaussian noise on the value (and count) slots, mod 2**k, drawn
    from a cryptographically secure stream (a fresh random key unless a test fixes one)."""
    source = NoiseStream(noise_key)
    mask = np.int64((1 << ring_bits(params)) - 1)
    if params.noise_std > 0:
        noisy = out[:m].astype(np.int64) + sample_discrete_gaussian(params.noise_std, m, source)
        out[:m] = noisy & mask  # two's complement: & is the non-negative residue mod 2**k
    if params.count_slot and params.count_noise_std > 0:
        c = int(out[m + 1]) + int(sample_discrete_gaussian(params.count_noise_std, 1, source)[0])
        out[m + 1] = c & int(mask)


def ring_sum(vectors: list[RingVec], bits: int) -> RingVec:
    """Sum of ring vectors modulo ``2**bits`` (reference helper for tests and plain runs)."""
    if not vectors:
        raise CodecError("ring_sum needs at least one vector")
    acc = np.zeros_like(vectors[0], dtype=np.uint32)
    for v in vectors:
        np.add(acc, v.astype(np.uint32, copy=False), out=acc)
    if bits < 32:
        acc &= np.uint32((1 << bits) - 1)
    return acc


def _centred(values: npt.NDArray[Any], offset: int, k: int) -> npt.NDArray[np.int64]:
    """Integer sums from their residues mod 2**k, assuming they lie within
    ``offset +- 2**(k-1)`` (noisy sums: the ring width guarantees it, see :func:`ring_bits`)."""
    c = (values.astype(np.int64) - offset) & ((1 << k) - 1)
    c[c >= 1 << (k - 1)] -= 1 << k
    return c + offset


def unclipped_count(sum_values: npt.ArrayLike, params: CodecParams, n_clients: int, d: int) -> int:
    """Adaptive clipping: the (distributed-noisy) number of summed devices whose norm was
    within the clip, from the count slot of the sum of ``n_clients`` encoded updates."""
    if not params.count_slot:
        raise CodecError("these codec parameters have no count slot")
    s = np.asarray(sum_values)
    m = kept_count(params, d)
    if s.ndim != 1 or s.shape[0] != m + 2:
        raise CodecError(f"sum has shape {s.shape}, expected ({m + 2},)")
    slot = s[m + 1 : m + 2]
    if params.count_noise_std > 0:
        return int(_centred(slot, n_clients // 2, ring_bits(params))[0])
    return int(slot[0])


NOISE_NORM_TAIL = 8.0
"""Standard deviations of slack on a Gaussian noise vector's norm: ``||N|| <= sigma (sqrt(m) + t)``
fails with probability at most ``exp(-t^2 / 2)`` (Gaussian concentration of the norm, a
1-Lipschitz function), about 1e-14 at ``t = 8``."""


class NormBoundError(CodecError):
    """A decoded mean is longer than a mean of clipped updates can be: some input was not a
    clipped encoding (a hostile or broken device under secure aggregation)."""


def mean_norm_bound(
    params: CodecParams, n_clients: int, d: int, total_weight: int, *, noise_std: float = 0.0
) -> float:
    """Largest L2 norm of the kept-coordinate weighted mean of ``n_clients`` honest encodings.

    In the kept (rotated, subsampled) coordinates, before the ``D / m`` rescaling, the mean
    ``sum(P x_i) / (W / cap)`` has norm at most ``C``: each ``x_i`` has norm at most
    ``C w_i / cap`` (step 1 of the module doc), the rotation is orthonormal and keeping a fixed
    subset ``P`` cannot lengthen a vector, clamping to ``[-R, R]`` only shortens it. Stochastic
    rounding moves each of the ``m`` kept values of each input by less than one level
    ``Delta = 2R / (2^b - 1)``: at most ``n Delta sqrt(m)`` in all (worst case, no probability).
    Noise of ``noise_std`` levels per kept coordinate of the sum (central plus distributed) adds
    ``Delta noise_std (sqrt(m) + NOISE_NORM_TAIL)`` except with probability about 1e-14. Both
    error terms are divided by ``W / cap`` like the mean. The model moves by ``D / m`` times this
    norm (un-rotation is orthonormal): the most one honest device's own update could move it."""
    m = kept_count(params, d)
    delta = 2.0 * quant_range(params, d) / ((1 << params.bits) - 1)
    scale = total_weight / params.weight_cap
    errors = n_clients * delta * math.sqrt(m) + delta * noise_std * (math.sqrt(m) + NOISE_NORM_TAIL)
    return params.clip_norm + errors / scale


@dataclass(frozen=True)
class DecodedMean:
    mean: FloatVec
    """The weighted mean float delta (model coordinates)."""
    kept_norm: float
    """L2 norm of the mean in the kept coordinates (what :func:`mean_norm_bound` bounds)."""
    bound: float


def _checked_kept_mean(
    sum_values: npt.ArrayLike,
    params: CodecParams,
    n_clients: int,
    d: int,
    central_noise_std: float,
    noise: NoiseStream | None,
) -> tuple[npt.NDArray[np.float64], int]:
    """The summed kept coordinates in value units (offset removed, central noise added) and
    the summed weight ``W``; refuses a sum that cannot come from ``n_clients`` valid encodings."""
    k = ring_bits(params)
    s = np.asarray(sum_values)
    m = kept_count(params, d)
    want = encoded_length(params, d)
    if s.ndim != 1 or s.shape[0] != want:
        raise CodecError(f"sum has shape {s.shape}, expected ({want},)")
    if s.dtype.kind not in "ui":
        raise CodecError(f"sum must be integers, got {s.dtype}")
    if s.size and (int(s.min()) < 0 or int(s.max()) >= 1 << k):
        raise CodecError(f"sum values must lie in [0, 2**{k})")
    if not 1 <= n_clients <= params.max_clients:
        raise CodecError(f"n_clients must be in [1, {params.max_clients}], got {n_clients}")
    total_weight = int(s[m])
    if total_weight == 0:
        raise CodecError("summed weight is 0: no device reported any example")
    if total_weight > n_clients * params.weight_cap:
        raise CodecError(
            f"summed weight {total_weight} exceeds {n_clients} x weight_cap: not a sum of "
            f"{n_clients} valid updates"
        )
    levels = (1 << params.bits) - 1
    r = quant_range(params, d)
    ints = _centred(s[:m], (n_clients * levels) // 2, k) if params.noise_std > 0 else s[:m]
    if central_noise_std > 0:  # discrete Gaussian on the integer sum, from a CSPRNG
        ints = ints.astype(np.int64) + sample_discrete_gaussian(central_noise_std, m, noise or NoiseStream())
    vals = ints.astype(np.float64) * (2.0 * r / levels) - n_clients * r
    return vals, total_weight


def check_update_norm(values: npt.ArrayLike, params: CodecParams, d: int) -> float:
    """One encoded update (no secure aggregation, so the server sees it): its weighted norm
    in the kept coordinates, refused (:class:`NormBoundError`) beyond :func:`mean_norm_bound`
    for one input. Cheap: no un-rotation."""
    vals, scale = _checked_kept_mean(values, params, 1, d, 0.0, None)
    norm = float(np.linalg.norm(vals)) / scale
    bound = mean_norm_bound(params, 1, d, round(scale * params.weight_cap), noise_std=params.noise_std)
    if not norm <= bound:
        raise NormBoundError(
            f"update norm {norm:.4g} exceeds {bound:.4g} (clip {params.clip_norm:g}): refused"
        )
    return norm


def decode_sum(
    sum_values: npt.ArrayLike,
    params: CodecParams,
    n_clients: int,
    d: int,
    *,
    central_noise_std: float = 0.0,
    noise: NoiseStream | None = None,
) -> FloatVec:
    """Weighted mean float delta from the modular sum of ``n_clients`` encoded updates
    (:func:`decode_mean`'s ``mean``; :class:`NormBoundError` beyond the bound)."""
    return decode_mean(
        sum_values, params, n_clients, d, central_noise_std=central_noise_std, noise=noise
    ).mean


def decode_mean(
    sum_values: npt.ArrayLike,
    params: CodecParams,
    n_clients: int,
    d: int,
    *,
    central_noise_std: float = 0.0,
    noise: NoiseStream | None = None,
) -> DecodedMean:
    """Weighted mean float delta from the modular sum of ``n_clients`` encoded updates.

    Undoes the quantization offset (``n_clients * R``), the subsampling (scale ``D / m``) and
    the rotation, then divides by the summed weight. ``n_clients`` is the number of inputs in
    the sum (the surviving devices), at most ``max_clients``. Sums of noisy inputs
    (``params.noise_std > 0``) are read centred (see :func:`ring_bits`). ``central_noise_std``
    adds discrete Gaussian noise ``N_Z(0, sigma^2)`` (in quantization levels, drawn from
    ``noise``: a fresh secret keystream by default, a keyed one in tests) to every kept
    coordinate of the integer sum first: central DP, applied where one device's influence is
    bounded by :func:`protocol.dp.level_sensitivity`. Discrete noise on integers has none of the
    floating-point leaks of continuous noise (Mironov 2012) and the same privacy bound
    (Canonne, Kamath & Steinke 2020, Theorem 4).

    The mean's norm in the kept coordinates is checked against :func:`mean_norm_bound`
    (:class:`NormBoundError` beyond it): under secure aggregation the server never sees an
    input, and this is where one that was not a clipped encoding shows.
    """
    vals, weight = _checked_kept_mean(sum_values, params, n_clients, d, central_noise_std, noise)
    scale = weight / params.weight_cap
    kept_norm = float(np.linalg.norm(vals)) / scale
    total_std = math.sqrt(central_noise_std**2 + n_clients * params.noise_std**2)
    bound = mean_norm_bound(params, n_clients, d, weight, noise_std=total_std)
    if not kept_norm <= bound:
        raise NormBoundError(
            f"aggregate norm {kept_norm:.4g} exceeds {bound:.4g}, the most a mean of {n_clients} "
            f"clipped updates can have (clip {params.clip_norm:g}): refused"
        )
    m = kept_count(params, d)
    big_d = padded_dim(params, d)
    if m < big_d:
        full = np.zeros(big_d, dtype=np.float64)
        full[kept_indices(params, d)] = vals * (big_d / m)
    else:
        full = vals
    out = unrotate(full, params, d) if params.rotate else full
    mean = out / scale
    return DecodedMean(mean.astype(np.float32), kept_norm, bound)


# ----------------------------------------------------------------------------------------
# Top-k sparsification with error feedback (plain path)
# ----------------------------------------------------------------------------------------


def topk_encode(
    delta: npt.ArrayLike,
    residual: npt.ArrayLike | None,
    k: int,
    *,
    clip_norm: float | None = None,
) -> tuple[SparseUpdate, FloatVec]:
    """Keep the ``k`` largest-magnitude coordinates of ``delta + residual``.

    Returns the sparse update and the new residual (what was not sent) for the caller to keep
    and pass back next round: ``sent + new_residual == delta + residual`` exactly (error
    feedback, Stich et al. 2018). With ``clip_norm``, ``delta`` is L2-clipped first.
    """
    x = _as_float_vector(delta)
    d = x.shape[0]
    if not 1 <= k <= d:
        raise CodecError(f"k must be in [1, {d}], got {k}")
    if clip_norm is not None:
        if not (clip_norm > 0 and math.isfinite(clip_norm)):
            raise CodecError(f"clip_norm must be a positive finite number, got {clip_norm}")
        norm = _l2_norm(x)
        if norm > clip_norm:
            x = x * np.float32(clip_norm / norm)
    acc = x.copy()
    if residual is not None:
        res = _as_float_vector(residual)
        if res.shape != x.shape:
            raise CodecError(f"residual has shape {res.shape}, delta {x.shape}")
        acc += res
    if k == d:
        idx = np.arange(d, dtype=np.intp)
    else:
        idx = np.argpartition(np.abs(acc), d - k)[d - k :]
        idx.sort()
    values = acc[idx].copy()
    acc[idx] = 0.0
    update = SparseUpdate(indices=idx.astype(np.uint32), values=values, dim=d)
    return update, acc


def topk_decode(update: SparseUpdate) -> FloatVec:
    """Dense float32 vector of a sparse update."""
    _check_sparse(update)
    out = np.zeros(update.dim, dtype=np.float32)
    out[update.indices.astype(np.intp)] = update.values
    return out


def _check_sparse(update: SparseUpdate) -> None:
    _check_dim(update.dim)
    idx, vals = update.indices, update.values
    if idx.ndim != 1 or vals.ndim != 1 or idx.shape != vals.shape:
        raise CodecError("sparse update: indices and values must be 1-D of equal length")
    if idx.size and (int(idx[-1]) >= update.dim or np.any(np.diff(idx.astype(np.int64)) <= 0)):
        raise CodecError("sparse update: indices must be strictly increasing and < dim")
    if not np.isfinite(vals).all():
        raise CodecError("sparse update contains NaN or Inf")


def sparse_weighted_mean(updates: list[SparseUpdate], weights: list[float]) -> FloatVec:
    """``sum(w_i * dense(u_i)) / sum(w_i)`` without densifying each update."""
    if not updates or len(updates) != len(weights):
        raise CodecError("need one weight per update and at least one update")
    dims = {u.dim for u in updates}
    if len(dims) != 1:
        raise CodecError(f"updates have different dims: {sorted(dims)}")
    total = float(sum(weights))
    if not (total > 0 and math.isfinite(total)) or any(w < 0 for w in weights):
        raise CodecError("weights must be non-negative with a positive finite sum")
    acc = np.zeros(dims.pop(), dtype=np.float64)
    for u, w in zip(updates, weights, strict=True):
        _check_sparse(u)
        acc[u.indices.astype(np.intp)] += w * u.values.astype(np.float64)
    return (acc / total).astype(np.float32)


# ----------------------------------------------------------------------------------------
# Bit packing of k-bit ring elements
# ----------------------------------------------------------------------------------------


def packed_size(m: int, bits: int) -> int:
    """Bytes of :func:`pack_bits` output for ``m`` elements of ``bits`` bits."""
    if not 1 <= bits <= MAX_RING_BITS:
        raise CodecError(f"bits must be in [1, {MAX_RING_BITS}], got {bits}")
    whole, rest = divmod(bits, 8)
    return m * whole + ((m + 7) // 8) * rest


_LOW_DTYPES = {1: "<u1", 2: "<u2", 4: "<u4"}
_PACK_CHUNK = 1 << 18  # elements per chunk (a multiple of 8): the scratch stays in L2
_UNPACK_CHUNK = _PACK_CHUNK
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
        groups = (min(m, _PACK_CHUNK) + 7) // 8
        hib = np.empty(8 * groups, dtype=np.uint8)
        tmp = np.empty(groups, dtype=_U64)
        gdt = _group_dtype(rest)
        vdt = f"V{rest}"
    for s in range(0, m, _PACK_CHUNK):
        e = min(m, s + _PACK_CHUNK)
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
        chunk = min(m, _UNPACK_CHUNK)
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
    for start in range(0, m, _UNPACK_CHUNK):
        stop = min(m, start + _UNPACK_CHUNK)
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
    for start in range(0, m, _UNPACK_CHUNK):
        stop = min(m, start + _UNPACK_CHUNK)
        target = acc[start:stop]
        np.add(target, unpacker.chunk(start, stop), out=target, casting="unsafe")
