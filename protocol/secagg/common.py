"""Errors and helpers shared by the secure-aggregation client and server."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

from protocol.codec import CodecParams, encoded_length, ring_bits
from protocol.secagg.graph import GraphError, default_threshold, resolve_degree
from protocol.wire import SecAggParams, Stage

__all__ = [
    "MIN_DEVICES",
    "MIN_THRESHOLD",
    "DuplicateInputError",
    "SecAggError",
    "StageError",
    "UnrecoverableError",
    "check_graph",
    "check_ring_vector",
    "minimum_degree",
    "resolve_graph",
    "secagg_params_for",
]


class SecAggError(ValueError):
    """The protocol cannot continue (invalid message, too few devices, inconsistent state)."""


class StageError(SecAggError):
    """A method was called in the wrong stage (protocol order violation)."""

    def __init__(self, expected: Stage | tuple[Stage, ...], actual: Stage, what: str) -> None:
        names = expected if isinstance(expected, tuple) else (expected,)
        super().__init__(
            f"{what} needs stage {' or '.join(s.value for s in names)}, but the round is in "
            f"stage {actual.value}"
        )
        self.expected = names
        self.actual = actual


class DuplicateInputError(SecAggError):
    """A device sent a second, different message for a stage it already completed."""


class UnrecoverableError(SecAggError):
    """Too many devices dropped: some secret cannot be reconstructed. ``devices`` maps each
    device whose secret is out of reach to how many shares of it are available."""

    def __init__(self, message: str, devices: dict[str, int]) -> None:
        super().__init__(message)
        self.devices = devices


def secagg_params_for(
    codec_params: CodecParams,
    d: int,
    *,
    round_id: int,
    graph_seed: bytes,
    degree: int | None = None,
    threshold: int | None = None,
    min_devices: int = 2,
    dropout: float = 0.0,
) -> SecAggParams:
    """The secure-aggregation parameters matching a codec configuration for a ``d``-long
    layout: vector length ``encoded_length`` and ring width ``ring_bits``."""
    return SecAggParams(
        round_id=round_id,
        vector_length=encoded_length(codec_params, d),
        ring_bits=ring_bits(codec_params),
        graph_seed=graph_seed,
        degree=degree,
        threshold=threshold,
        min_devices=min_devices,
        dropout=dropout,
    )


# Safety floors, enforced by the coordinator and independently by every device (a device never
# trusts the plan for them). With t = 1 a device's own share *is* its self-mask seed: a server
# that relays no shares would unmask its input alone. A threshold of at most half the
# neighbourhood lets two disjoint groups of neighbours each reconstruct a secret, so one
# could get the self-mask seed and the other the mask key of the same device (Bonawitz et al.
# 2017 need t > n/2 for that reason; Bell et al. 2020 per neighbourhood).
MIN_THRESHOLD = 2
MIN_DEVICES = 3
"""Fewest devices in a secure sum: with two, each learns the other's input from the sum."""


def minimum_degree(n: int) -> int:
    """Fewest neighbours a device may mask with among ``n``: ``ceil(log2 n)`` (half the default
    degree, Bell et al.'s O(log n) regime), or everyone else when ``n`` is smaller."""
    return min(n - 1, max(MIN_THRESHOLD, math.ceil(math.log2(max(n, 2)))))


def check_graph(n: int, degree: int, threshold: int) -> None:
    """Refuse (:class:`SecAggError`) a graph below the safety floors: at least
    :data:`MIN_DEVICES` devices, ``degree >= minimum_degree(n)``, ``threshold >= 2``,
    ``2 * threshold > degree`` (a strict majority of the neighbourhood) and
    ``threshold <= degree`` (a dropped device's key must stay recoverable from neighbours)."""
    if n < MIN_DEVICES:
        raise SecAggError(f"secure aggregation needs at least {MIN_DEVICES} devices, got {n}")
    if degree < minimum_degree(n):
        raise SecAggError(f"degree {degree} is below the minimum {minimum_degree(n)} for {n} devices")
    if threshold < MIN_THRESHOLD:
        raise SecAggError(f"threshold {threshold} is below the minimum {MIN_THRESHOLD}")
    if 2 * threshold <= degree:
        raise SecAggError(f"threshold {threshold} is not a strict majority of {degree} neighbours")
    if threshold > degree:
        raise SecAggError(f"threshold {threshold} exceeds the neighbourhood size {degree} for {n} devices")


def resolve_graph(params: SecAggParams, n: int) -> tuple[int, int]:
    """``(degree, threshold)`` for ``n`` devices under ``params`` (same on every side),
    checked against the safety floors (:func:`check_graph`)."""
    if n < params.min_devices:
        raise SecAggError(f"{n} devices advertised keys, the round needs {params.min_devices}")
    try:
        degree = resolve_degree(n, params.degree, params.dropout)
    except GraphError as e:
        raise SecAggError(str(e)) from e
    threshold = params.threshold if params.threshold is not None else default_threshold(degree)
    check_graph(n, degree, threshold)
    return degree, threshold


def check_ring_vector(values: npt.ArrayLike, params: SecAggParams) -> npt.NDArray[Any]:
    """``values`` as a 1-D unsigned array of ``vector_length`` elements ``< 2**ring_bits``."""
    v = np.asarray(values)
    if v.ndim != 1 or v.shape[0] != params.vector_length:
        raise SecAggError(f"vector has shape {v.shape}, expected ({params.vector_length},)")
    if v.dtype.kind not in "ui":
        raise SecAggError(f"vector must hold integers, got {v.dtype}")
    negative = v.dtype.kind == "i" and v.size and int(v.min()) < 0
    if negative or (v.size and int(v.max()) >= 1 << params.ring_bits):
        raise SecAggError(f"vector values must lie in [0, 2**{params.ring_bits})")
    return v
