"""Differential privacy primitives shared by devices and the coordinator (no I/O).

The unit of privacy is one device: each device's update is clipped to L2 norm ``C`` by the
codec (:func:`protocol.codec.encode`), and the aggregate gets Gaussian noise calibrated to that
bound. Two modes use the same sensitivity, measured in quantization levels of the round's codec
(the integer domain in which secure aggregation adds vectors):

* **central**: the coordinator adds continuous Gaussian noise ``N(0, (z * Delta)^2)`` to every
  kept coordinate of the unmasked integer sum, before decoding (:func:`gaussian_noise`).
* **distributed** (Kairouz, Liu & Steinke 2021, "The Distributed Discrete Gaussian Mechanism
  for Federated Learning with Secure Aggregation"): every device adds discrete Gaussian noise
  ``N_Z(0, sigma_i^2)`` to its quantized coordinates before masking
  (:func:`sample_discrete_gaussian`), so the securely aggregated sum of ``n`` devices carries
  ``N_Z``-sums of total variance ``n * sigma_i^2`` and the coordinator never sees a value with
  less noise. ``sigma_i = z * Delta / sqrt(n_min)``, where ``n_min`` is the smallest number of
  surviving devices with which a round can commit: more survivors only add noise.

``Delta`` (:func:`level_sensitivity`) bounds how far one device moves the integer sum in L2:
a clipped update has norm at most ``C``; the Hadamard rotation is orthonormal and keeping a
data-independent subset of coordinates cannot increase the norm, so the kept part scaled to
levels has norm at most ``C * (2^b - 1) / (2R)``. Clamping to the quantization range is a
projection onto a box that contains the zero point, hence non-expansive, and stochastic
rounding moves each of the ``m`` kept coordinates by less than one level, which adds at most
``sqrt(m)``. (Kairouz et al. tighten the rounding term with conditional rounding; at our
scales it adds about 6%, so the plain worst case is used.)

Wrap-around: the ring width is chosen (:func:`protocol.codec.ring_bits`) so that the centred
sum stays within ``NOISE_TAIL`` standard deviations of the summed noise; beyond that the
decoder would wrap. The probability, below ``1e-30`` per coordinate, is negligible next to
``delta`` and is not otherwise accounted.

Adaptive clipping (Andrew, Thakkar, McMahan & Ramaswamy 2021, "Differentially Private Learning
with Adaptive Clipping"): each device also reports whether its norm was within the clip
(one ring slot, noised like the rest with standard deviation ``count_std`` in total); the
coordinator moves ``C`` geometrically towards the target quantile of the norms
(:func:`next_clip_norm`). The two noisy releases together are one Gaussian mechanism whose
noise multiplier :func:`combined_noise_multiplier` gives; :func:`update_noise_multiplier`
splits a target multiplier between them.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

__all__ = [
    "NOISE_TAIL",
    "DPError",
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


_TINY_SIGMA = 0.05


class DPError(ValueError):
    """Differential-privacy parameters that cannot be honoured."""


def level_sensitivity(clip_norm: float, bits: int, quant_range: float, kept: int) -> float:
    """L2 sensitivity of one device's kept coordinates, in quantization levels.

    ``clip_norm * (2^b - 1) / (2 * quant_range)`` for the clipped, rotated, subsampled update
    plus ``sqrt(kept)`` for stochastic rounding (see the module docstring).
    """
    if clip_norm <= 0 or quant_range <= 0 or kept < 1 or bits < 1:
        raise DPError("sensitivity needs clip_norm > 0, quant_range > 0, kept >= 1, bits >= 1")
    levels = (1 << bits) - 1
    return clip_norm * levels / (2.0 * quant_range) + math.sqrt(kept)


def sample_discrete_gaussian(sigma: float, size: int, rng: np.random.Generator) -> npt.NDArray[np.int64]:
    """``size`` independent draws of the discrete Gaussian ``N_Z(0, sigma^2)``.

    Canonne, Kamath & Steinke 2020 (Algorithm 3), vectorised: propose discrete Laplace
    variables with scale ``t = floor(sigma) + 1`` (the difference of two geometric variables)
    and accept ``Y`` with probability ``exp(-(|Y| - sigma^2/t)^2 / (2 sigma^2))``; rejected
    slots are redrawn (a few passes: most proposals are accepted). Below ``sigma = 0.05``
    every draw is 0 up to probability 1e-86, and zeros are returned.
    """
    if not math.isfinite(sigma) or sigma < 0:
        raise DPError(f"sigma must be finite and >= 0, got {sigma}")
    out = np.zeros(size, dtype=np.int64)
    if sigma < _TINY_SIGMA or size == 0:
        return out  # P(x != 0) < 2 exp(-1 / (2 sigma^2)) < 1e-86: and sigma^2 would underflow
    t = math.floor(sigma) + 1
    p = -math.expm1(-1.0 / t)  # success probability of the geometric variables
    todo = np.arange(size)
    while todo.size:
        n = todo.size
        # numpy's geometric counts trials (>= 1); the difference is discrete Laplace(t)
        y = rng.geometric(p, n).astype(np.int64) - rng.geometric(p, n).astype(np.int64)
        accept_p = np.exp(-((np.abs(y) - sigma * sigma / t) ** 2) / (2.0 * sigma * sigma))
        ok = rng.random(n) < accept_p
        out[todo[ok]] = y[ok]
        todo = todo[~ok]
    return out


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
