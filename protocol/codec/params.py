"""Codec parameters, errors and the sizes they imply: one round's settings, shared by every
device and the server.

Sizes of a length-``d`` model vector under :class:`CodecParams`:

* ``B`` (:func:`rotation_block`): the Hadamard block size, a power of two. Blocks keep the
  padding small: one power-of-two block would pad a 2.57M-parameter model to 4.19M coordinates
  (+63% upload), five interleaved blocks of 2**19 pad it to 2.62M (+2%).
* ``D`` (:func:`padded_dim`): ``d`` rounded up to a multiple of ``B`` when rotating.
* ``m`` (:func:`kept_count`): the kept coordinates, ``ceil(p * D)``.
* ``R`` (:func:`quant_range`): the common quantization range ``[-R, R]``,
  ``R = range_factor * C / sqrt(D)`` (see :mod:`protocol.codec.quantize`).
* The ring ``Z_(2**k)`` (:func:`ring_bits`): every quantized value is in ``[0, 2**b - 1]``;
  one extra slot holds the integer weight ``min(num_examples, weight_cap)`` (and, with adaptive
  clipping, one more the clip count: :func:`encoded_length`). ``k`` is the smallest width that
  holds the sum of ``max_clients`` such vectors without wrapping, so the modular sum *is* the
  integer sum.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, field_validator

from protocol._encoding import B64Bytes
from protocol.dp import NOISE_TAIL

__all__ = [
    "MAX_RING_BITS",
    "CodecError",
    "CodecParams",
    "CodecSettings",
    "FloatVec",
    "NormBoundError",
    "RingVec",
    "check_dim",
    "check_rotation_block",
    "encoded_length",
    "kept_count",
    "padded_dim",
    "quant_range",
    "ring_bits",
    "rotation_block",
]

FloatVec = npt.NDArray[np.float32]
RingVec = npt.NDArray[np.uint32]

MAX_RING_BITS = 32
"""Ring elements travel and are summed as uint32: ``k`` may not exceed 32."""

_MAX_DIM = 1 << 31  # largest vector the codec handles (indices fit uint32)


class CodecError(ValueError):
    """Invalid codec parameters or an input the codec refuses (NaN/Inf, wrong length...)."""


class NormBoundError(CodecError):
    """A decoded mean is longer than a mean of clipped updates can be: some input was not a
    clipped encoding (a hostile or broken device under secure aggregation)."""


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


class CodecSettings(BaseModel):
    """The codec's knobs, as a task chooses them (declared once: the coordinator's task
    configuration, the simulator and the benchmarks take these); a round adds its size, seed
    and noise (:class:`CodecParams`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    clip_norm: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    """C: L2 bound of one (weighted) update."""
    rotate: bool = True
    """Randomised Hadamard rotation before subsampling and quantization."""
    keep_fraction: float = Field(default=1 / 16, gt=0, le=1)
    """p: fraction of (padded) coordinates kept; the subset is shared by the round."""
    bits: int = Field(default=8, ge=1, le=24)
    """b: quantization bits per kept coordinate (2**b levels)."""
    range_factor: float = Field(default=4.0, gt=0, allow_inf_nan=False)
    """alpha: quantization range is ``[-R, R]``, ``R = alpha * C / sqrt(D)``."""
    weight_cap: int = Field(default=16, ge=1, le=1 << 24)
    """Example count at which a device's weight saturates; 1 = every device weighs the same.
    Small caps keep the weight slot from widening the ring (bits of the sum =
    max(b + log2 n, log2(n * cap))) and give every well-filled device the same say."""
    rotation_block: int | None = Field(default=None, ge=1 << 8, le=1 << 30)
    """Largest Hadamard block (a power of two); None picks it from d (:func:`rotation_block`)."""

    @field_validator("rotation_block")
    @classmethod
    def _block_pow2(cls, value: int | None) -> int | None:
        return check_rotation_block(value)


class CodecParams(CodecSettings):
    """Round-wide codec parameters: every device and the server use the same ones."""

    max_clients: int = Field(ge=1, le=1 << 24)
    """n: largest number of inputs summed in one round (ring headroom)."""
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

    @field_validator("seed")
    @classmethod
    def _seed_len(cls, value: bytes) -> bytes:
        if not 16 <= len(value) <= 64:
            raise ValueError(f"seed must have 16..64 bytes, got {len(value)}")
        return value


# ----------------------------------------------------------------------------------------
# Derived sizes and the ring width
# ----------------------------------------------------------------------------------------


def check_dim(d: int) -> None:
    """Refuse (:class:`CodecError`) a vector length the codec does not handle."""
    if not 1 <= d <= _MAX_DIM:
        raise CodecError(f"vector length must be in [1, 2**31], got {d}")


_AUTO_MIN_BLOCK = 1 << 10
_AUTO_MAX_PADDING = 1 / 16


def rotation_block(params: CodecParams, d: int) -> int:
    """B: the Hadamard block size for a length-``d`` vector (``d`` itself without rotation).

    ``params.rotation_block`` caps it; by default it is the largest power of two, at most
    ``2**ceil(log2 d)`` and at least 1024, whose padding (``ceil(d / B) * B - d``) stays
    within 1/16 of ``d``: one block when ``d`` is close to a power of two, a few otherwise
    (see the module doc for what that saves).
    """
    check_dim(d)
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
