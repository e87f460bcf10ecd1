"""Differential privacy primitives shared by devices and the coordinator (no I/O).

**Unit of privacy and adjacency.** The unit is one device (all its messages, McMahan, Ramage,
Talwar & Zhang 2018, "Learning Differentially Private Recurrent Language Models": user-level
DP). Each device's update is clipped to L2 norm ``C`` by the codec
(:func:`protocol.codec.encode`) and the round's sum gets Gaussian noise calibrated to the
sensitivity of that sum under an adjacency relation (:data:`Adjacency`; Ponomareva et al. 2023,
"How to DP-fy ML", section 2, on why an epsilon means nothing without its adjacency):

* ``replace-one`` (the default): neighbouring rounds have the same cohort and differ in the data
  of one device. The coordinator knows which devices were selected and which reported (it talks
  to them, and the sum's weight slot counts them), so the cohort's size and membership are not
  private, only its contents are. One device's quantized contribution ``c`` has
  ``||c|| <= Delta`` (below), so replacing it by ``c'`` moves the sum by
  ``||c - c'|| <= ||c|| + ||c'|| <= 2 Delta``: the sensitivity is ``2 Delta``. The bound is
  attained up to the rounding term (``c' = -c`` for a device clipped at ``C``).
* ``add-remove``: neighbouring rounds differ by the presence of one device; sensitivity
  ``Delta``. This is the relation of DP-FedAvg's analysis (McMahan et al. 2018, with Poisson
  sampling and a fixed denominator) and of most published federated epsilons. It is honest only
  towards an observer who cannot tell whether, or how many, devices took part, which excludes
  this coordinator; use it to compare with such numbers, or when the threat model is a consumer
  of the released models who does not see the cohort (then the released round metrics must not
  include the report count).

``Delta`` (:func:`level_sensitivity` with ``add-remove``) bounds how far one device's
contribution lies from the quantizer's zero point, in levels of the round's codec (the integer
domain in which secure aggregation adds vectors): a clipped update has norm at most ``C``; the
Hadamard rotation is orthonormal and keeping a data-independent subset of coordinates cannot
increase the norm, so the kept part scaled to levels has norm at most
``C * (2^b - 1) / (2R)``. Clamping to the quantization range is a projection onto a box that
contains the zero point, hence non-expansive, and stochastic rounding moves each of the ``m``
kept coordinates by less than one level, which adds at most ``sqrt(m)``:
``Delta = C (2^b - 1) / (2R) + sqrt(m)`` and, under replace-one,
``2 Delta = C (2^b - 1) / R + 2 sqrt(m)`` (each of the two devices rounds on its own).
(Kairouz, Liu & Steinke 2021 tighten the rounding term with conditional rounding; at our scales it adds
about 6%, so the plain worst case is used.) The weight slot carries no noise: with
``weight_cap = 1`` every device that trained on at least one example puts 1 there, the same in
both neighbours (a device without examples would put 0 and be told apart: DP tasks need
``eligibility.min_examples >= 1``).

Adaptive clipping (Andrew, Thakkar, McMahan & Ramaswamy 2021, "Differentially Private Learning
with Adaptive Clipping"): each device also reports whether its norm was within the clip (one
ring slot, 0 or 1, noised like the rest with standard deviation ``count_std`` in total); the
coordinator moves ``C`` geometrically towards the target quantile of the norms
(:func:`next_clip_norm`). Replacing a device changes that count by at most 1, adding or
removing one also by at most 1: its sensitivity is 1 under both relations. The two noisy
releases together are one Gaussian mechanism whose noise multiplier (noise over sensitivity)
:func:`combined_noise_multiplier` gives; :func:`update_noise_multiplier` splits a target
multiplier between them. Sampling (which rounds a device is in) and its amplification are the
accountant's: see :mod:`coordinator.dp_plan`.

**Modes.** The update's noise is ``z * sensitivity`` (``z``: the update's noise multiplier):

* **central**: the coordinator adds continuous Gaussian noise ``N(0, (z * sens)^2)`` to every
  kept coordinate of the unmasked integer sum, before decoding (:func:`gaussian_noise`).
* **distributed** (Kairouz, Liu & Steinke 2021, "The Distributed Discrete Gaussian Mechanism
  for Federated Learning with Secure Aggregation"): every device adds discrete Gaussian noise
  ``N_Z(0, sigma_i^2)`` to its quantized coordinates before masking
  (:func:`sample_discrete_gaussian`), so the securely aggregated sum of ``n`` devices carries
  ``N_Z``-sums of total variance ``n * sigma_i^2`` and the coordinator never sees a value with
  less noise. ``sigma_i = z * sens / sqrt(n_min)``, where ``n_min`` is the smallest number of
  surviving devices with which a round can commit: more survivors only add noise.

**Device noise source.** The noise must be unpredictable to the coordinator, which sees the
noisy sum: :class:`NoiseStream` draws its bits from the AES-128-CTR keystream
(:func:`protocol.keystream.keystream`, the masks' PRG) under a fresh key from
:func:`secrets.token_bytes`, a cryptographically secure generator; numpy's generators are not
(PCG64's state can be recovered from its outputs: Bouillaguet, Martinez & Sauvage 2020), and
the sampler refuses them. A fixed key makes the noise reproducible: tests only.

Wrap-around: the ring width is chosen (:func:`protocol.codec.ring_bits`) so that the centred
sum stays within ``NOISE_TAIL`` standard deviations of the summed noise; beyond that the
decoder would wrap. The probability, below ``1e-30`` per coordinate, is negligible next to
``delta`` and is not otherwise accounted.
"""

from __future__ import annotations

import math
import secrets
from typing import Final, Literal

import numpy as np
import numpy.typing as npt

from protocol.keystream import SEED_BYTES, keystream

__all__ = [
    "ADJACENCY_FACTOR",
    "NOISE_TAIL",
    "Adjacency",
    "DPError",
    "NoiseStream",
    "combined_noise_multiplier",
    "ddg_tau",
    "gaussian_noise",
    "level_sensitivity",
    "next_clip_norm",
    "sample_discrete_gaussian",
    "update_noise_multiplier",
]

NOISE_TAIL = 12.0
"""Standard deviations of summed noise the ring keeps room for (P(|N(0,1)| > 12) < 4e-33)."""

Adjacency = Literal["replace-one", "add-remove"]
"""Which rounds count as neighbours (see the module docstring)."""

ADJACENCY_FACTOR: Final[dict[str, float]] = {"replace-one": 2.0, "add-remove": 1.0}
"""Sensitivity of the update sum in units of one device's contribution bound ``Delta``."""

_TINY_SIGMA = 0.05
_MAX_SIGMA = 2.0**40  # magnitudes (< 45 t) stay exact in float64; rings hold < 2**32 anyway
_CHUNK = 1 << 16  # proposals per pass of the sampler: its buffers stay in L2


class DPError(ValueError):
    """Differential-privacy parameters that cannot be honoured."""


def level_sensitivity(
    clip_norm: float, bits: int, quant_range: float, kept: int, *, adjacency: Adjacency
) -> float:
    """L2 sensitivity of the sum of the kept coordinates, in quantization levels.

    ``Delta = clip_norm * (2^b - 1) / (2 * quant_range) + sqrt(kept)`` bounds one device's
    contribution (clipped, rotated, subsampled update plus stochastic rounding); the
    sensitivity is ``Delta`` under ``add-remove`` and ``2 Delta`` under ``replace-one`` (see
    the module docstring).
    """
    if clip_norm <= 0 or quant_range <= 0 or kept < 1 or bits < 1:
        raise DPError("sensitivity needs clip_norm > 0, quant_range > 0, kept >= 1, bits >= 1")
    if adjacency not in ADJACENCY_FACTOR:
        raise DPError(f"unknown adjacency {adjacency!r}")
    levels = (1 << bits) - 1
    return ADJACENCY_FACTOR[adjacency] * (clip_norm * levels / (2.0 * quant_range) + math.sqrt(kept))


class NoiseStream:
    """Uniform 64-bit words for DP noise from a cryptographically secure generator.

    The words are the AES-128-CTR keystream (:func:`protocol.keystream.keystream`) of a
    32-byte key (AES reads its first 16 bytes); without a key, one is drawn from
    :func:`secrets.token_bytes`. A secret random key makes the stream indistinguishable from
    uniform to anyone without it, the coordinator included. Pass a fixed ``key`` only in
    tests, to make the noise reproducible.
    """

    __slots__ = ("_ks",)

    def __init__(self, key: bytes | None = None) -> None:
        if key is None:
            key = secrets.token_bytes(SEED_BYTES)
        if not isinstance(key, bytes) or len(key) != SEED_BYTES:
            raise DPError(f"a noise key has {SEED_BYTES} bytes")
        self._ks = keystream(key)

    def words(self, n: int) -> npt.NDArray[np.uint64]:
        """The next ``n`` keystream words (little-endian uint64), uniform on ``[0, 2**64)``."""
        buf = bytearray(8 * n + 16)  # update_into needs block_size - 1 spare bytes
        self._ks.update_into(bytes(8 * n), buf)
        return np.frombuffer(buf, dtype="<u8", count=n)


def sample_discrete_gaussian(sigma: float, size: int, source: NoiseStream) -> npt.NDArray[np.int64]:
    """``size`` independent draws of the discrete Gaussian ``N_Z(0, sigma^2)`` from ``source``.

    Canonne, Kamath & Steinke 2020 ("The Discrete Gaussian for Differential Privacy",
    Algorithm 3), vectorised: with ``t = floor(sigma) + 1``, propose ``Y`` from the discrete
    Laplace distribution ``P(y) ~ exp(-|y|/t)`` and accept it with probability
    ``exp(-(|Y| - sigma^2/t)^2 / (2 sigma^2))``; rejected proposals are redrawn. Per proposal
    two keystream words: the first gives a sign (its low bit) and ``|Y|``, a geometric variable
    ``floor(-t ln U)`` with ``P(|Y| >= k) = exp(-k/t)`` (inversion of ``U``, uniform on (0, 1)
    from the other 63 bits); "-0" is rejected, which leaves exactly the discrete Laplace
    (Algorithm 2's construction). The acceptance ``exp(-gamma)`` is the product of
    ``Bernoulli(exp(-frac(gamma)))`` (a uniform ``V`` from the second word) and
    ``floor(gamma)`` Bernoulli(1/e) trials (:func:`_bernoulli_exp_whole`), so small
    probabilities keep their precision. About 1.35 proposals (2.7 words) per draw for ``sigma >= 10``.

    Exactness: the algorithm is exact; float64 arithmetic perturbs each probability by a
    relative ``~1e-15 |y|`` (the logarithm) plus ``2**-63 exp(|y|/t)`` (the resolution of
    ``U``): below 1e-9 for ``|y| <= 20 sigma`` at ``sigma <= 1e4``, while beyond ``20 sigma``
    lies mass below ``e**-200``. That moves epsilon by at most twice the relative error and
    delta negligibly. Exact rational arithmetic (the paper's samplers) would remove it at many
    times the cost.

    Below ``sigma = 0.05`` every draw is 0 up to probability 1e-86, and zeros are returned.
    """
    if not isinstance(source, NoiseStream):
        raise DPError(
            f"device noise needs a NoiseStream (a cryptographically secure generator), "
            f"got {type(source).__name__}"
        )
    if not math.isfinite(sigma) or sigma < 0:
        raise DPError(f"sigma must be finite and >= 0, got {sigma}")
    if sigma > _MAX_SIGMA:
        raise DPError(f"sigma must be at most 2**40, got {sigma:g}")
    if size < 0:
        raise DPError(f"size must be >= 0, got {size}")
    out = np.zeros(size, dtype=np.int64)
    if sigma < _TINY_SIGMA or size == 0:
        return out  # P(x != 0) < 2 exp(-1 / (2 sigma^2)) < 1e-86: and sigma^2 would underflow
    t = float(math.floor(sigma) + 1)
    centre = sigma * sigma / t
    inv = 1.0 / (2.0 * sigma * sigma)
    filled = 0
    while filled < size:
        n = min(_CHUNK, size - filled + 16)
        w = source.words(2 * n)
        first, second = w[:n], w[n:]
        negative = (first & np.uint64(1)).astype(bool)
        u = (first >> np.uint64(1)).astype(np.float64)
        u += 0.5
        u *= 2.0**-63  # uniform on (0, 1)
        mag = np.log(u)
        mag *= -t
        np.floor(mag, out=mag)  # geometric: P(mag >= k) = exp(-k / t)
        gamma = mag - centre
        gamma *= gamma
        gamma *= inv
        whole = np.floor(gamma)
        v = second.astype(np.float64)
        v += 0.5
        v *= 2.0**-64  # uniform on (0, 1]
        ok = v < np.exp(whole - gamma)  # Bernoulli(exp(-frac(gamma)))
        ok &= ~(negative & (mag == 0.0))
        _bernoulli_exp_whole(whole, ok, source)
        y = mag[ok].astype(np.int64)
        y[negative[ok]] *= -1
        take = min(y.size, size - filled)
        out[filled : filled + take] = y[:take]
        filled += take
    return out


_EXP_MINUS_ONE: Final = np.uint64(math.floor(math.exp(-1.0) * 2.0**64))
"""Bernoulli(1/e) is ``word < _EXP_MINUS_ONE`` for a uniform 64-bit word."""


def _bernoulli_exp_whole(
    whole: npt.NDArray[np.float64], ok: npt.NDArray[np.bool_], source: NoiseStream
) -> None:
    """``ok &= Bernoulli(exp(-whole))`` for the non-negative integers ``whole``, as ``whole``
    independent Bernoulli(1/e) trials (Canonne et al. 2020, Algorithm 1's reduction): every
    trial has probability 1/e (to a relative 1e-16: the float64 constant), so the product keeps
    that precision however small ``exp(-whole)`` is, where one uniform of 64 bits would resolve
    nothing below 2**-64. Survivors shrink by e per trial: a few short passes."""
    idx = np.flatnonzero(ok & (whole >= 1.0))
    done = 0.0
    while idx.size:
        passed = source.words(idx.size) < _EXP_MINUS_ONE
        ok[idx[~passed]] = False
        done += 1.0
        idx = idx[passed]
        idx = idx[whole[idx] > done]


def gaussian_noise(sigma: float, size: int, rng: np.random.Generator) -> npt.NDArray[np.float64]:
    """``size`` draws of ``N(0, sigma^2)`` (central mode: the coordinator's noise)."""
    if not math.isfinite(sigma) or sigma < 0:
        raise DPError(f"sigma must be finite and >= 0, got {sigma}")
    return rng.normal(0.0, sigma, size) if sigma > 0 else np.zeros(size)


def ddg_tau(sigma: float, n: int) -> float:
    """Kairouz et al. 2021, Theorem 1: the sum of ``n`` i.i.d. ``N_Z(0, sigma^2)`` is close to
    ``N_Z(0, n sigma^2)`` up to ``tau = 10 * sum_{k=1}^{n-1} exp(-2 pi^2 sigma^2 k/(k+1))``."""
    if n < 1 or sigma <= 0:
        raise DPError("ddg_tau needs n >= 1 and sigma > 0")
    return 10.0 * sum(math.exp(-2 * math.pi**2 * sigma**2 * k / (k + 1)) for k in range(1, n))


def combined_noise_multiplier(update_z: float, count_std: float | None) -> float:
    """Noise multiplier of the joint release (noisy update sum, noisy count of unclipped
    devices, sensitivity 1): Renyi divergences of Gaussians add, so
    ``z^-2 = update_z^-2 + count_std^-2``."""
    if update_z <= 0:
        raise DPError("noise multiplier must be > 0")
    if count_std is None:
        return update_z
    if count_std <= 0:
        raise DPError("count noise must be > 0")
    return 1.0 / math.sqrt(update_z**-2 + count_std**-2)


def update_noise_multiplier(z: float, count_std: float | None) -> float:
    """The update's multiplier that, with the count query, makes a joint multiplier ``z``
    (Andrew et al. 2021, section 3.1). Needs ``count_std > z``."""
    if z <= 0:
        raise DPError("noise multiplier must be > 0")
    if count_std is None:
        return z
    if count_std <= z:
        raise DPError(
            f"the clip-count noise ({count_std:g}) must exceed the noise multiplier ({z:g}); "
            "raise count_noise or lower the noise multiplier"
        )
    return 1.0 / math.sqrt(z**-2 - count_std**-2)


def next_clip_norm(clip_norm: float, unclipped_fraction: float, target_quantile: float, lr: float) -> float:
    """Geometric update ``C * exp(-lr * (b - gamma))`` with ``b`` the (noisy) fraction of
    devices whose norm was within ``C``; ``b`` is clamped to ``[0, 1]`` (noise can push it out)."""
    if clip_norm <= 0 or not 0 < target_quantile < 1 or lr < 0:
        raise DPError("next_clip_norm needs clip_norm > 0, 0 < target_quantile < 1, lr >= 0")
    b = min(1.0, max(0.0, unclipped_fraction))
    return clip_norm * math.exp(-lr * (b - target_quantile))
