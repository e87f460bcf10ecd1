"""t-of-n Shamir secret sharing of 32-byte secrets over the prime field GF(2**521 - 1).

The field is the Mersenne prime ``P = 2**521 - 1`` (a well-known prime, also the modulus of
NIST P-521). Any 32-byte secret is an integer below ``2**256 < P``, so it embeds without
reduction. A share is ``(x, f(x))`` for a random polynomial ``f`` of degree ``t - 1`` with
``f(0) = secret``; ``x`` is the recipient's 1-based index in the round's roster. Any ``t``
shares determine ``f`` (Lagrange interpolation at 0); ``t - 1`` shares are consistent with
every secret, so they reveal nothing about it.

Share values travel as ``SHARE_BYTES`` = 66 big-endian bytes.
"""

from __future__ import annotations

import functools
import operator
import secrets
from collections.abc import Callable, Sequence

__all__ = [
    "PRIME",
    "SECRET_BYTES",
    "SHARE_BYTES",
    "ShamirError",
    "reconstruct",
    "share_from_bytes",
    "share_to_bytes",
    "split",
]

PRIME = (1 << 521) - 1
SECRET_BYTES = 32
SHARE_BYTES = (PRIME.bit_length() + 7) // 8  # 66

Share = tuple[int, int]
RandomBytes = Callable[[int], bytes]


class ShamirError(ValueError):
    """Invalid sharing parameters or an inconsistent set of shares."""


def _random_field_element(random_bytes: RandomBytes) -> int:
    # 80 random bytes reduced mod P: statistical distance from uniform < 2**-118.
    return int.from_bytes(random_bytes(80), "big") % PRIME


def split(
    secret: bytes,
    xs: Sequence[int],
    threshold: int,
    *,
    random_bytes: RandomBytes = secrets.token_bytes,
) -> list[Share]:
    """Shares ``(x, f(x))`` of ``secret`` for every ``x`` in ``xs`` (distinct, in [1, P)).

    ``threshold`` t: any t shares reconstruct, t - 1 reveal nothing.
    """
    if len(secret) != SECRET_BYTES:
        raise ShamirError(f"secret must have {SECRET_BYTES} bytes, got {len(secret)}")
    if not 1 <= threshold <= len(xs):
        raise ShamirError(f"threshold must be in [1, {len(xs)}], got {threshold}")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ShamirError("share points must be distinct and in [1, P)")
    coeffs = [int.from_bytes(secret, "big")]
    coeffs += [_random_field_element(random_bytes) for _ in range(threshold - 1)]
    shares = []
    for x in xs:
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        shares.append((x, y))
    return shares


class _Basis:
    """Lagrange interpolation through fixed, distinct points ``xs`` (barycentric form).

    The weights ``w_i = 1 / prod_{j != i} (x_i - x_j)`` take one modular inversion for all
    of them (Montgomery's batch trick). The Lagrange coefficients ``l_i(point)`` of an
    evaluation point are O(t) multiplications with prefix and suffix products of
    ``(point - x_j)`` (not O(t**2) with t inversions), kept per point: an evaluation is then
    one dot product, and the same points recur for every secret of a round (the survivors'
    indices), so a coordinator that reconstructs a hundred secrets with a hundred shares each
    computes them once (:func:`_basis` keeps recent bases)."""

    __slots__ = ("_coefficients", "weights", "xs")

    def __init__(self, xs: Sequence[int]) -> None:
        self.xs = list(xs)
        dens = []
        for i, xi in enumerate(self.xs):
            d = 1
            for j, xj in enumerate(self.xs):
                if i != j:
                    d = d * (xi - xj) % PRIME
            dens.append(d)
        self.weights = _batch_inverse(dens)
        self._coefficients: dict[int, list[int] | int] = {}

    def coefficients(self, point: int) -> list[int] | int:
        """``[l_i(point)]``, or the index ``i`` when ``point`` is ``x_i`` itself."""
        got = self._coefficients.get(point)
        if got is None:
            xs, n = self.xs, len(self.xs)
            diffs = [(point - x) % PRIME for x in xs]
            if 0 in diffs:
                got = diffs.index(0)
            else:
                suffix = [1] * (n + 1)
                for i in range(n - 1, -1, -1):
                    suffix[i] = suffix[i + 1] * diffs[i] % PRIME
                coeffs, prefix = [], 1
                for i in range(n):
                    coeffs.append(self.weights[i] * (prefix * suffix[i + 1] % PRIME) % PRIME)
                    prefix = prefix * diffs[i] % PRIME
                got = coeffs
            if len(self._coefficients) < _MAX_POINTS:
                self._coefficients[point] = got
        return got

    def at(self, ys: Sequence[int], point: int) -> int:
        """f(point) for the polynomial of degree < len(xs) with f(x_i) = ys[i]."""
        c = self.coefficients(point)
        if isinstance(c, int):
            return ys[c] % PRIME
        total: int = sum(map(operator.mul, ys, c))
        return total % PRIME


_MAX_POINTS = 4096  # evaluation points a basis keeps coefficients for


@functools.lru_cache(maxsize=32)
def _basis(xs: tuple[int, ...]) -> _Basis:
    """The basis through ``xs``, shared by the reconstructions that use the same points."""
    return _Basis(xs)


def _batch_inverse(values: Sequence[int]) -> list[int]:
    """Modular inverses of non-zero field elements with a single ``pow(., -1, P)``."""
    prefix = [1]
    for v in values:
        prefix.append(prefix[-1] * v % PRIME)
    inv = pow(prefix[-1], -1, PRIME)
    out = [0] * len(values)
    for i in range(len(values) - 1, -1, -1):
        out[i] = inv * prefix[i] % PRIME
        inv = inv * values[i] % PRIME
    return out


def _interpolate_at(shares: Sequence[Share], at: int) -> int:
    """f(at) for the unique polynomial of degree < len(shares) through ``shares``."""
    return _Basis([x for x, _ in shares]).at([y for _, y in shares], at)


def reconstruct(shares: Sequence[Share], threshold: int) -> bytes:
    """The 32-byte secret from at least ``threshold`` shares.

    Uses the first ``threshold`` shares and checks that every extra share lies on the same
    polynomial, so an inconsistent set raises :class:`ShamirError` instead of returning a
    wrong secret. (With exactly ``threshold`` shares no check is possible: callers verify the
    result against a public commitment.)
    """
    if threshold < 1:
        raise ShamirError(f"threshold must be >= 1, got {threshold}")
    if len(shares) < threshold:
        raise ShamirError(f"need {threshold} shares, got {len(shares)}")
    xs = [x for x, _ in shares]
    if len(set(xs)) != len(xs):
        raise ShamirError("duplicate share points")
    if any(not (0 < x < PRIME and 0 <= y < PRIME) for x, y in shares):
        raise ShamirError("share out of the field")
    basis = _basis(tuple(xs[:threshold]))
    base_ys = [y for _, y in shares[:threshold]]
    for x, y in shares[threshold:]:
        if basis.at(base_ys, x) != y:
            raise ShamirError(f"share at x={x} is inconsistent with the others")
    value = basis.at(base_ys, 0)
    if value >= 1 << (8 * SECRET_BYTES):
        raise ShamirError("reconstructed value is not a 32-byte secret (wrong or too few shares)")
    return value.to_bytes(SECRET_BYTES, "big")


def share_to_bytes(y: int) -> bytes:
    """A share value as ``SHARE_BYTES`` big-endian bytes."""
    if not 0 <= y < PRIME:
        raise ShamirError("share value out of the field")
    return y.to_bytes(SHARE_BYTES, "big")


def share_from_bytes(data: bytes) -> int:
    """Inverse of :func:`share_to_bytes` (refuses wrong lengths and values >= P)."""
    if len(data) != SHARE_BYTES:
        raise ShamirError(f"share must have {SHARE_BYTES} bytes, got {len(data)}")
    y = int.from_bytes(data, "big")
    if y >= PRIME:
        raise ShamirError("share value out of the field")
    return y
