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
import secrets
from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated, Any

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from pydantic import BaseModel, ConfigDict, Field, field_validator

from protocol._encoding import B64Bytes
from protocol.dp import NOISE_TAIL, sample_discrete_gaussian

__all__ = [
    "MAX_RING_BITS",
    "CodecError",
    "CodecParams",
    "EncodedUpdate",
    "SparseUpdate",
    "check_rotation_block",
    "decode_sum",
    "encode",
    "encoded_length",
    "fwht",
    "kept_count",
    "kept_indices",
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


def _stream(seed: bytes, label: bytes, nbytes: int) -> bytes:
    """``nbytes`` of AES-256-CTR keystream under ``SHA-256(label || seed)``.

    Not secret material: it picks the rotation signs and the kept subset. AES-CTR (rather than
    numpy's generators) keeps the choice identical across numpy versions and platforms.
    """
    key = hashlib.sha256(b"fedkeys/codec/v1/" + label + b"\x00" + seed).digest()
    enc = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    return enc.update(bytes(nbytes))


def _readonly(a: npt.NDArray[Any]) -> npt.NDArray[Any]:
    a.setflags(write=False)
    return a


@lru_cache(maxsize=8)
def _signs_cached(seed: bytes, big_d: int) -> FloatVec:
    bits = np.unpackbits(np.frombuffer(_stream(seed, b"signs", (big_d + 7) // 8), np.uint8))
    signs = 1.0 - 2.0 * bits[:big_d].astype(np.float32)
    return _readonly(signs.astype(np.float32))


def rotation_signs(params: CodecParams, d: int) -> FloatVec:
    """The round's Rademacher vector (length D, values +-1), read-only."""
    return _signs_cached(params.seed, padded_dim(params, d))


@lru_cache(maxsize=8)
def _subset_cached(seed: bytes, big_d: int, m: int) -> npt.NDArray[np.intp]:
    if m >= big_d:
        return _readonly(np.arange(big_d, dtype=np.intp))
    keys = np.frombuffer(_stream(seed, b"subset", 8 * big_d), dtype="<u8").astype(np.uint64)
    # Replace the low bits by the index: all keys distinct, so "the m smallest" is unique and
    # does not depend on the selection algorithm.
    low = max(1, (big_d - 1).bit_length())
    keys = ((keys >> np.uint64(low)) << np.uint64(low)) | np.arange(big_d, dtype=np.uint64)
    idx = np.argpartition(keys, m - 1)[:m]
    idx.sort()
    return _readonly(idx.astype(np.intp))


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


_FWHT_BLOCK = 4  # 16x16 Hadamard blocks: one batched GEMM per 4 butterfly levels


def _fwht_raw(a: npt.NDArray[Any], blocks: int = 1) -> npt.NDArray[Any]:
    """Unnormalised ``H_B`` applied to each of the ``blocks`` interleaved blocks of a
    contiguous float array (``B = len(a) / blocks``, a power of two; ``blocks = 1`` is the
    plain ``H_D a``); ``a`` is overwritten (used as scratch) and the result is returned (it
    may be ``a`` itself or a new array).

    ``H_B`` is the Kronecker product of small Hadamard blocks ``H_f`` (``f = 16``), so the
    transform is one batched matrix product per block of 4 index bits: viewing the vector as
    ``(D / (f * s), f, s)`` for stride ``s`` = 1, 16, 256, ..., multiply every ``(f, s)``
    slice by ``H_f``. No transposes, ``log16(B)`` passes over memory, BLAS does the flops.
    Starting at stride ``blocks`` instead of 1 transforms the slot index ``i // blocks`` and
    leaves the block index ``i % blocks`` alone: that is the interleaved block transform.
    """
    levels = (a.shape[0] // blocks).bit_length() - 1
    b = np.empty_like(a)
    stride = blocks
    while levels > 0:
        c = min(_FWHT_BLOCK, levels)
        levels -= c
        f = 1 << c
        h = _hadamard(c, a.dtype.name)
        if stride == 1:
            np.matmul(a.reshape(-1, f), h, out=b.reshape(-1, f))  # H is symmetric
        else:
            np.matmul(h, a.reshape(-1, f, stride), out=b.reshape(-1, f, stride))
        a, b = b, a
        stride *= f
    return a


def fwht(x: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """Orthonormal Walsh-Hadamard transform ``H x / sqrt(D)`` (its own inverse), O(D log D).

    Returns a new array (float32 stays float32, anything else becomes float64).
    """
    x = np.asarray(x)
    big_d = x.shape[0]
    if x.ndim != 1 or big_d & (big_d - 1) or big_d == 0:
        raise CodecError(f"fwht needs a 1-D power-of-two length, got shape {x.shape}")
    dtype = x.dtype if x.dtype in (np.float32, np.float64) else np.dtype(np.float64)
    y = _fwht_raw(x.astype(dtype, copy=True))
    y *= dtype.type(1.0 / math.sqrt(big_d))
    return y


def _rotate_scaled(
    x: FloatVec, params: CodecParams, scale: float, dtype: type[np.floating[Any]] = np.float32
) -> npt.NDArray[Any]:
    """``scale * rotate(x)`` with the scale folded into the sign flip (one pass saved)."""
    d = x.shape[0]
    block = rotation_block(params, d)
    big_d = padded_dim(params, d)
    padded = np.empty(big_d, dtype=dtype)
    np.multiply(x, dtype(scale / math.sqrt(block)), out=padded[:d], dtype=dtype)
    padded[d:] = 0.0
    padded *= rotation_signs(params, d)
    return _fwht_raw(padded, big_d // block)


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
    z = _fwht_raw(y.astype(dtype, copy=True), big_d // block)
    z *= dtype.type(1.0 / math.sqrt(block))
    z *= rotation_signs(params, d).astype(z.dtype)
    return z[:d]


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


def encode(
    delta: npt.ArrayLike,
    params: CodecParams,
    rng: np.random.Generator,
    *,
    num_examples: int = 1,
    noise_rng: np.random.Generator | None = None,
) -> EncodedUpdate:
    """Encode one device's float delta into ``encoded_length(params, d)`` ring elements.

    ``rng`` supplies the stochastic-rounding dither only (local, not secret). ``num_examples``
    sets the weight ``min(num_examples, weight_cap) / weight_cap`` (0 contributes nothing).
    With ``params.noise_std > 0`` (distributed DP) the quantized coordinates get discrete
    Gaussian noise from ``noise_rng`` (default: a generator seeded with 128 bits from the OS;
    the noise must stay secret from the server) and are reduced modulo ``2**ring_bits``.
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
    # folded into one multiply, the offset added after the (linear) rotation.
    # float32 resolves a fraction of a level up to 16 bits; wider quantizers need float64
    work: type[np.floating[Any]] = np.float32 if params.bits <= 16 else np.float64
    gain = factor * levels / (2.0 * r)
    t = _rotate_scaled(x, params, gain, work) if params.rotate else np.multiply(x, work(gain), dtype=work)
    idx = kept_indices(params, d)
    if idx.shape[0] < t.shape[0]:
        t = t[idx]
    t += work(levels / 2.0)
    saturated = 0
    if t.size and (float(t.min()) < 0.0 or float(t.max()) > levels):
        # count real clamping only, not float rounding at the range's edge (1e-3 of a level)
        saturated = int(np.count_nonzero((t < -1e-3) | (t > levels + 1e-3)))
        np.clip(t, 0, levels, out=t)
    floor = np.floor(t)
    t -= floor  # fractional part, exact in floating point
    # unbiased stochastic rounding: up with probability equal to the fractional part
    up = rng.random(t.shape[0], dtype=work) < t
    m = t.shape[0]
    out = np.empty(encoded_length(params, d), dtype=np.uint32)
    np.add(floor, up, out=out[:m], casting="unsafe")
    out[m] = weight  # every slot is < 2**b or <= weight_cap, hence < 2**ring_bits
    if params.count_slot:
        out[m + 1] = 0 if clipped else 1
    if params.noise_std > 0 or params.count_noise_std > 0:
        _add_noise(out, params, m, noise_rng)
    return EncodedUpdate(values=out, norm=norm, clipped=clipped, saturated=saturated, weight=weight)


def _add_noise(out: RingVec, params: CodecParams, m: int, noise_rng: np.random.Generator | None) -> None:
    """Distributed DP: discrete Gaussian noise on the value (and count) slots, mod 2**k."""
    if noise_rng is None:
        noise_rng = np.random.default_rng(secrets.randbits(128))
    mask = np.int64((1 << ring_bits(params)) - 1)
    if params.noise_std > 0:
        noisy = out[:m].astype(np.int64) + sample_discrete_gaussian(params.noise_std, m, noise_rng)
        out[:m] = noisy & mask  # two's complement: & is the non-negative residue mod 2**k
    if params.count_slot and params.count_noise_std > 0:
        c = int(out[m + 1]) + int(sample_discrete_gaussian(params.count_noise_std, 1, noise_rng)[0])
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


def decode_sum(
    sum_values: npt.ArrayLike,
    params: CodecParams,
    n_clients: int,
    d: int,
    *,
    central_noise_std: float = 0.0,
    rng: np.random.Generator | None = None,
) -> FloatVec:
    """Weighted mean float delta from the modular sum of ``n_clients`` encoded updates.

    Undoes the quantization offset (``n_clients * R``), the subsampling (scale ``D / m``) and
    the rotation, then divides by the summed weight. ``n_clients`` is the number of inputs in
    the sum (the surviving devices), at most ``max_clients``. Sums of noisy inputs
    (``params.noise_std > 0``) are read centred (see :func:`ring_bits`). ``central_noise_std``
    adds ``N(0, sigma^2)`` (in quantization levels, drawn from ``rng``) to every kept
    coordinate of the integer sum first: central DP, applied where one device's influence
    is bounded by :func:`protocol.dp.level_sensitivity`.
    """
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
    big_d = padded_dim(params, d)
    ints = _centred(s[:m], (n_clients * levels) // 2, k) if params.noise_std > 0 else s[:m]
    vals = ints.astype(np.float64)
    if central_noise_std > 0:
        if rng is None:
            raise CodecError("central noise needs an rng")
        vals += rng.normal(0.0, central_noise_std, m)
    vals = vals * (2.0 * r / levels) - n_clients * r
    if m < big_d:
        full = np.zeros(big_d, dtype=np.float64)
        full[kept_indices(params, d)] = vals * (big_d / m)
    else:
        full = vals
    out = unrotate(full, params, d) if params.rotate else full
    mean = out / (total_weight / params.weight_cap)
    return mean.astype(np.float32)


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
    """:func:`pack_bits` writing into ``out`` (a uint8 array of ``packed_size`` bytes)."""
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
    low = out[: m * whole]
    if whole in _LOW_DTYPES:
        np.copyto(low.view(_LOW_DTYPES[whole]), v, casting="unsafe")  # keeps the low bytes
    elif whole == 3:
        np.copyto(low[: 2 * m].view("<u2"), v, casting="unsafe")
        np.copyto(low[2 * m :], v >> 16, casting="unsafe")
    if rest:
        groups = (m + 7) // 8
        hi = np.zeros(groups * 8, dtype=np.uint32)
        np.right_shift(v, 8 * whole, out=hi[:m], casting="unsafe")
        # two half-groups of 4 fields (4r <= 28 bits) in uint32, then one uint64 per group
        h = hi.reshape(groups, 2, 4)
        half = h[:, :, 0].copy()
        for j in range(1, 4):
            half |= h[:, :, j] << np.uint32(rest * j)
        h64 = half.astype(np.uint64)
        word = h64[:, 0] | (h64[:, 1] << np.uint64(4 * rest))
        high = out[m * whole :].reshape(groups, rest)
        high[:] = word.astype("<u8", copy=False).view(np.uint8).reshape(groups, 8)[:, :rest]


_UNPACK_CHUNK = 1 << 16  # elements per chunk (a multiple of 8): temporaries stay in cache


def _check_packed(data: bytes | memoryview, bits: int, m: int) -> memoryview:
    size = packed_size(m, bits)
    buf = memoryview(data).cast("B")
    if len(buf) != size:
        raise CodecError(f"packed data has {len(buf)} bytes, {m} x {bits}-bit needs {size}")
    return buf


def _unpack_range(buf: memoryview, bits: int, m: int, start: int, stop: int) -> RingVec:
    """Elements ``start..stop`` (``start`` a multiple of 8) of a :func:`pack_bits` buffer."""
    whole, rest = divmod(bits, 8)
    n = stop - start
    if whole in _LOW_DTYPES:
        dt = np.dtype(_LOW_DTYPES[whole])
        out = np.frombuffer(buf[start * whole : stop * whole], dtype=dt).astype(np.uint32)
    elif whole == 3:
        out = np.frombuffer(buf[2 * m + start : 2 * m + stop], np.uint8).astype(np.uint32)
        out <<= np.uint32(16)
        out |= np.frombuffer(buf[2 * start : 2 * stop], "<u2")
    else:
        out = np.zeros(n, dtype=np.uint32)
    if rest:
        g0, g1 = start // 8, (stop + 7) // 8
        groups = g1 - g0
        base = m * whole
        raw = np.zeros((groups, 8), dtype=np.uint8)
        raw[:, :rest] = np.frombuffer(buf[base + g0 * rest : base + g1 * rest], np.uint8).reshape(
            groups, rest
        )
        word = raw.view("<u8").reshape(groups).astype(np.uint64, copy=False)
        field = np.uint32((1 << rest) - 1)
        halves = np.empty((groups, 2), dtype=np.uint32)
        halves[:, 0] = word & np.uint64((1 << (4 * rest)) - 1)
        halves[:, 1] = word >> np.uint64(4 * rest)
        hi = np.empty((groups, 2, 4), dtype=np.uint32)
        for j in range(4):
            np.bitwise_and(halves >> np.uint32(rest * j), field, out=hi[:, :, j])
        flat = hi.reshape(-1)
        if np.any(flat[n:]):
            raise CodecError("nonzero padding bits after the last element")
        top = flat[:n]
        if whole:
            top <<= np.uint32(8 * whole)
        out |= top
    return out


def unpack_bits(data: bytes | memoryview, bits: int, m: int) -> RingVec:
    """Inverse of :func:`pack_bits`: ``m`` uint32 values (padding bits must be zero)."""
    buf = _check_packed(data, bits, m)
    out = np.empty(m, dtype=np.uint32)
    for start in range(0, m, _UNPACK_CHUNK):
        stop = min(m, start + _UNPACK_CHUNK)
        out[start:stop] = _unpack_range(buf, bits, m, start, stop)
    return out


def unpack_bits_add(data: bytes | memoryview, bits: int, acc: npt.NDArray[np.unsignedinteger[Any]]) -> None:
    """``acc += unpack_bits(data, bits, len(acc))`` modulo the width of ``acc``'s dtype,
    chunk by chunk: no vector-sized temporary (what a server adding uploads needs). The
    buffer is fully validated (size, padding bits) before ``acc`` is touched."""
    if acc.ndim != 1 or acc.dtype.kind != "u":
        raise CodecError("acc must be a 1-D unsigned array")
    m = acc.shape[0]
    buf = _check_packed(data, bits, m)
    if m % 8:
        _unpack_range(buf, bits, m, m - m % 8, m)  # raises on nonzero padding bits
    for start in range(0, m, _UNPACK_CHUNK):
        stop = min(m, start + _UNPACK_CHUNK)
        target = acc[start:stop]
        np.add(target, _unpack_range(buf, bits, m, start, stop), out=target, casting="unsafe")
