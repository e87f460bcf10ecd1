"""SecAgg+ neighbour graph (Bell et al. 2020): a randomly relabelled Harary graph.

Devices are placed on a ring in a pseudo-random order derived from the round's graph seed;
each device is the neighbour of the ``degree / 2`` devices on either side, which gives a
``degree``-regular graph. Bell et al. show that such a graph with ``degree = O(log n)`` keeps
the protocol's guarantees with high probability while every device does only ``O(log n)``
key agreements, shares and mask expansions. When ``degree >= n - 1`` the graph is complete
(the original Bonawitz et al. protocol).

The default degree is ``2 * ceil(log2 n)`` (even), the same neighbourhood size as Flower's
``num_shares = 2 log2 n + 1`` (which counts the device itself). The default threshold is a
strict majority of the neighbourhood, ``degree // 2 + 1``.

That degree suits rounds that lose few devices. A dropped device's masks can be removed only
while ``threshold`` of its neighbours survive, so a round that must lose a fraction ``dropout``
of its devices (over-selection cuts the slowest on purpose) needs a larger neighbourhood:
:func:`degree_for_dropout` sizes it, up to the complete graph.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

__all__ = [
    "GraphError",
    "default_degree",
    "default_threshold",
    "degree_for_dropout",
    "neighbour_graph",
    "neighbours_of",
    "resolve_degree",
    "unrecoverable_bound",
]


class GraphError(ValueError):
    """Invalid graph parameters."""


def default_degree(n: int) -> int:
    """``2 * ceil(log2 n)``, capped at ``n - 1`` (complete graph for small ``n``)."""
    if n < 2:
        raise GraphError(f"a neighbour graph needs at least 2 devices, got {n}")
    return min(n - 1, 2 * math.ceil(math.log2(n)))


# Per-round probability, at the design dropout, that some device keeps too few neighbours.
UNRECOVERABLE = 1e-3


def unrecoverable_bound(n: int, degree: int, dropout: float) -> float:
    """Union bound over ``n`` devices on the probability that some device keeps fewer than
    ``default_threshold(degree)`` of its ``degree`` neighbours when each device drops
    independently with probability ``dropout`` (the binomial tail summed term by term)."""
    if not 0.0 <= dropout < 1.0:
        raise GraphError(f"dropout must be in [0, 1), got {dropout}")
    t = default_threshold(degree)
    if dropout == 0.0:
        return 0.0  # every term has a factor dropout ** (degree - s) with s < t <= degree
    keep, lose = math.log1p(-dropout), math.log(dropout)
    # in logs: comb(degree, s) overflows a float beyond degree ~1,030 (large complete graphs)
    tail = sum(math.exp(_log_comb(degree, s) + s * keep + (degree - s) * lose) for s in range(t))
    return min(1.0, n * tail)


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def degree_for_dropout(n: int, dropout: float, failure: float = UNRECOVERABLE) -> int:
    """The smallest even degree, at least :func:`default_degree`, for which a round of ``n``
    devices that loses a fraction ``dropout`` of them stays recoverable except with
    probability ``failure`` (:func:`unrecoverable_bound`); ``n - 1`` (complete graph) if none
    is smaller. With the strict-majority threshold a complete graph tolerates any loss that
    leaves a majority, which is why moderate ``n`` at a high ``dropout`` ends there."""
    k = default_degree(n)
    while k < n - 1 and unrecoverable_bound(n, k, dropout) > failure:
        k += 2
    return min(k, n - 1)


def resolve_degree(n: int, degree: int | None, dropout: float = 0.0) -> int:
    """The degree actually used for ``n`` devices: ``degree`` rounded up to even, or (when
    ``None``) the default, sized for ``dropout`` if it is above 0; ``n - 1`` (complete graph)
    when that is not smaller."""
    if degree is None:
        return degree_for_dropout(n, dropout) if dropout > 0 else default_degree(n)
    if degree < 1:
        raise GraphError(f"degree must be >= 1, got {degree}")
    if n < 2:
        raise GraphError(f"a neighbour graph needs at least 2 devices, got {n}")
    even = degree + (degree % 2)
    return n - 1 if even >= n - 1 else even


def default_threshold(degree: int) -> int:
    """Strict majority of a neighbourhood: ``degree // 2 + 1`` (1 for a single neighbour)."""
    return degree // 2 + 1


def _order(devices: Sequence[str], seed: bytes) -> list[str]:
    key = hashlib.sha256(b"fedkeys/secagg/v1/graph\x00" + seed).digest()
    enc = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    stream = enc.update(bytes(16 * len(devices)))
    # a 128-bit sort key per device (in sorted-id order), ties broken by the id itself
    keyed = [(stream[16 * i : 16 * i + 16], d) for i, d in enumerate(sorted(devices))]
    return [d for _, d in sorted(keyed)]


def neighbour_graph(
    devices: Sequence[str], seed: bytes, degree: int | None = None
) -> dict[str, frozenset[str]]:
    """Neighbours of every device (symmetric, no self-loops), deterministic in
    ``(set(devices), seed, degree)``; the order of ``devices`` does not matter."""
    n = len(devices)
    if len(set(devices)) != n:
        raise GraphError("duplicate device ids")
    k = resolve_degree(n, degree)
    if k == n - 1:
        everyone = frozenset(devices)
        return {d: everyone - {d} for d in devices}
    ring = _order(devices, seed)
    half = k // 2
    out: dict[str, frozenset[str]] = {}
    for i, d in enumerate(ring):
        out[d] = frozenset(ring[(i + j) % n] for j in range(-half, half + 1) if j != 0)
    return out


def neighbours_of(
    device: str, devices: Sequence[str], seed: bytes, degree: int | None = None
) -> frozenset[str]:
    """``neighbour_graph(devices, seed, degree)[device]`` without building the whole graph."""
    n = len(devices)
    if len(set(devices)) != n:
        raise GraphError("duplicate device ids")
    if device not in devices:
        raise GraphError(f"{device!r} is not among the devices")
    k = resolve_degree(n, degree)
    if k == n - 1:
        return frozenset(devices) - {device}
    ring = _order(devices, seed)
    i = ring.index(device)
    half = k // 2
    return frozenset(ring[(i + j) % n] for j in range(-half, half + 1) if j != 0)
