"""Errors and helpers shared by the secure-aggregation client and server."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from protocol.codec import CodecParams, encoded_length, ring_bits
from protocol.secagg.graph import GraphError, default_threshold, resolve_degree
from protocol.wire import SecAggParams, Stage

__all__ = [
    "DuplicateInputError",
    "SecAggError",
    "StageError",
    "UnrecoverableError",
    "check_ring_vector",
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


def resolve_graph(params: SecAggParams, n: int) -> tuple[int, int]:
    """``(degree, threshold)`` for ``n`` devices under ``params`` (same on every side)."""
    if n < params.min_devices:
        raise SecAggError(f"{n} devices advertised keys, the round needs {params.min_devices}")
    try:
        degree = resolve_degree(n, params.degree, params.dropout)
    except GraphError as e:
        raise SecAggError(str(e)) from e
    threshold = params.threshold if params.threshold is not None else default_threshold(degree)
    if threshold > degree:
        raise SecAggError(f"threshold {threshold} exceeds the neighbourhood size {degree} for {n} devices")
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
