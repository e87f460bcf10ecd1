"""Stochastic quantization into the ring, and the way back: :func:`encode` on a device,
:func:`decode_mean` on the server (after the modular sum of secure aggregation).

Encoding one device's float delta (``d`` coordinates; sizes ``D``, ``m``, ``R``, ``k`` from
:mod:`protocol.codec.params`):

1. ``x = delta * w * min(1, C / ||delta||)``: L2 clipping to ``clip_norm`` C, and the
   example-count weight ``w = min(num_examples, weight_cap) / weight_cap`` in ``[0, 1]`` (so
   ``||x|| <= C`` still holds and the quantization range below covers weighted updates too).
2. Optional randomised Hadamard rotation (:mod:`protocol.codec.rotation`).
3. Keep the round's shared subset of ``m`` coordinates (:mod:`protocol.codec.randomness`).
4. Stochastic quantization to ``b`` bits: the common range is
   ``[-R, R]`` with ``R = range_factor * C / sqrt(D)``; a value ``v`` maps to
   ``t = (v + R) / Delta`` with ``Delta = 2R / (2**b - 1)``, and ``q = floor(t)`` or
   ``floor(t) + 1`` with probability ``t - floor(t)`` (unbiased). Values outside ``[-R, R]``
   are clamped (that is biased, and counted in :attr:`EncodedUpdate.saturated`). With
   rotation, coordinates are close to Gaussian with standard deviation at most ``C/sqrt(D)``,
   so ``range_factor = 4`` clamps roughly 6e-5 of them; without rotation pick ``range_factor``
   for the spikiest coordinate you expect (``sqrt(D)`` never clamps: then ``R = C``).
5. The quantized values and the integer weight (and the clip count) are ring elements of
   ``Z_(2**k)``, wide enough that the modular sum of ``max_clients`` of them *is* the integer
   sum (:func:`protocol.codec.params.ring_bits`).

This is the stochastic k-level quantization of Suresh, Yu, Kumar & McMahan 2017 ("Distributed
Mean Estimation with Limited Communication", ICML) and the probabilistic quantization of
Konecny et al. 2016 ("Federated Learning: Strategies for Improving Communication Efficiency",
arXiv:1610.05492), both after a random rotation; there each vector's range is its own and
travels with it, here the range is fixed by the round (from the clip norm) so that the server
can add the integers of every device without seeing any of them.

Decoding removes the offset ``n * R`` (n = number of summed inputs), scales, un-rotates and
divides by the summed weight: the weighted mean ``sum(w_i x_i) / sum(w_i)``, refused
(:class:`protocol.codec.params.NormBoundError`) when longer than a mean of clipped updates
can be (:func:`mean_norm_bound`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from protocol.codec.params import (
    CodecError,
    CodecParams,
    FloatVec,
    NormBoundError,
    RingVec,
    check_dim,
    encoded_length,
    kept_count,
    padded_dim,
    quant_range,
    ring_bits,
)
from protocol.codec.randomness import kept_indices
from protocol.codec.rotation import rotate_scaled, unrotate
from protocol.dp import NoiseStream, sample_discrete_gaussian
from protocol.keystream import keystream

__all__ = [
    "NOISE_NORM_TAIL",
    "Q_CHUNK",
    "DecodedMean",
    "EncodedUpdate",
    "check_update_norm",
    "decode_mean",
    "decode_sum",
    "encode",
    "fixed_point",
    "mean_norm_bound",
    "quantize_into",
    "ring_sum",
    "unclipped_count",
]


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


def _as_float_vector(delta: npt.ArrayLike, *, check_finite: bool = True) -> FloatVec:
    x = np.asarray(delta)
    if x.ndim != 1:
        raise CodecError(f"delta must be 1-D, got shape {x.shape}")
    x = x.astype(np.float32, copy=False)
    check_dim(x.shape[0])
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


Q_CHUNK = 1 << 16  # elements per quantization chunk: the three buffers stay in L2


def fixed_point(bits: int) -> tuple[type[np.floating[Any]], type[np.signedinteger[Any]], int]:
    """(float dtype, integer dtype, S) of the stochastic rounding of a ``bits``-bit quantizer:
    float32 and int32 with ``S = 31 - bits`` up to 16 bits (float32 resolves a fraction of a
    level there), float64 and int64 with ``S = 63 - bits`` beyond."""
    if bits <= 16:
        return np.float32, np.int32, 31 - bits
    return np.float64, np.int64, 63 - bits


def quantize_into(
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

    ``t`` is in units of ``2**-S`` levels (see :func:`fixed_point`), clamped to
    ``[0, levels * 2**S]`` and truncated to an integer ``a``; with ``u`` uniform on
    ``[0, 2**S)``, ``q = (a + u) >> S`` is ``floor(a / 2**S) + 1`` with probability equal to
    the fractional part of ``a / 2**S`` (exactly: no float rounding in the comparison). The
    truncation of ``t`` to ``a`` moves it by less than ``2**-S`` levels (2**-15 at 16 bits),
    below the float rounding of ``t`` itself. ``u`` is the top ``S`` bits of an AES-128-CTR
    keystream word (4 bytes per coordinate up to 16 bits, 8 beyond; the masks' fast
    keystream, :func:`protocol.keystream.keystream`) keyed with 32 bytes drawn from
    ``rng``: uniform, and four times faster than numpy's float generator.
    """
    work, itype, shift = fixed_point(bits)
    levels = (1 << bits) - 1
    top = float(levels << shift)
    eps = 1e-3 * (1 << shift)  # excursions below 1e-3 of a level are float rounding
    offset = work(levels * 2.0 ** (shift - 1))
    n = out.shape[0]
    c = min(n, Q_CHUNK)
    word = np.dtype(itype).itemsize
    tbuf = np.empty(c, dtype=work)
    gbuf = np.empty(c, dtype=src.dtype) if idx is not None and scale is not None else tbuf
    abuf = np.empty(c, dtype=itype)
    zeros = bytes(c * word)
    ksraw = bytearray(c * word + 16)  # update_into needs block_size - 1 spare bytes
    ks = np.frombuffer(ksraw, dtype=np.dtype(f"<u{word}"), count=c)
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
    # fixed point (units of 2**-S levels, see quantize_into), the 2**S folded in as well.
    work, _, shift = fixed_point(params.bits)
    gain = factor * levels / (2.0 * r) * 2.0**shift
    big_d = padded_dim(params, d)
    m = kept_count(params, d)
    idx = kept_indices(params, d) if m < big_d else None
    out = np.empty(encoded_length(params, d), dtype=np.uint32)
    if params.rotate:
        # every coordinate kept at 4 bytes: rotate straight into the output's memory, which
        # the quantizer then overwrites chunk by chunk (one vector allocated, not two)
        alias = idx is None and np.dtype(work).itemsize == out.itemsize
        rotated = rotate_scaled(x, params, gain, work, out[:big_d].view(work) if alias else None)
        saturated = quantize_into(rotated, idx, None, params.bits, rng, out[:m])
    else:
        saturated = quantize_into(x, idx, gain, params.bits, rng, out[:m])
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
