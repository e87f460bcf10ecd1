"""Shamir t-of-n sharing over GF(2**521 - 1)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.secagg import shamir
from protocol.secagg.shamir import PRIME, ShamirError


def _is_probable_prime(n: int, rounds: int = 24) -> bool:
    """Miller-Rabin with fixed bases (reference check of the documented prime)."""
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    rng = random.Random(0)
    for _ in range(rounds):
        a = rng.randrange(2, n - 2)
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def test_field_is_the_mersenne_prime_and_holds_32_byte_secrets() -> None:
    assert PRIME == 2**521 - 1
    assert _is_probable_prime(PRIME)
    assert not _is_probable_prime(PRIME + 2)  # the check itself can say no
    assert PRIME > 1 << 256
    assert shamir.SHARE_BYTES == 66


@given(
    secret=st.binary(min_size=32, max_size=32),
    n=st.integers(1, 25),
    data=st.data(),
)
@settings(max_examples=80, deadline=None)
def test_any_t_shares_reconstruct_and_t_minus_1_do_not(secret: bytes, n: int, data: st.DataObject) -> None:
    t = data.draw(st.integers(1, n))
    xs = data.draw(st.lists(st.integers(1, 10_000), min_size=n, max_size=n, unique=True))
    shares = shamir.split(secret, xs, t)
    subset = data.draw(st.permutations(shares)).copy()[: data.draw(st.integers(t, n))]
    assert shamir.reconstruct(subset, t) == secret
    if t > 1:
        few = subset[: t - 1]
        # t - 1 points determine a lower-degree polynomial: its value at 0 is not the secret
        assert shamir._interpolate_at(few, 0) != int.from_bytes(secret, "big")
        with pytest.raises(ShamirError):
            shamir.reconstruct(few, t)


@given(secret=st.binary(min_size=32, max_size=32), other=st.binary(min_size=32, max_size=32))
@settings(max_examples=30, deadline=None)
def test_t_minus_1_shares_are_consistent_with_every_secret(secret: bytes, other: bytes) -> None:
    """Information-theoretic hiding: t - 1 shares plus ANY claimed secret fit a polynomial of
    degree t - 1, so the shares cannot rule any secret out."""
    t = 4
    shares = shamir.split(secret, [1, 2, 3, 4, 5], t)[: t - 1]
    forged = [(0, int.from_bytes(other, "big")), *shares]
    # the polynomial through the forged point and the t - 1 shares reproduces every share
    for x, y in shares:
        assert shamir._interpolate_at(forged, x) == y
    assert shamir._interpolate_at(forged, 0) == int.from_bytes(other, "big")


def test_inconsistent_extra_share_is_detected() -> None:
    shares = shamir.split(bytes(range(32)), [1, 2, 3, 4, 5], 3)
    x, y = shares[4]
    bad = [*shares[:4], (x, (y + 1) % PRIME)]
    with pytest.raises(ShamirError, match="inconsistent"):
        shamir.reconstruct(bad, 3)
    assert shamir.reconstruct(shares, 3) == bytes(range(32))


def test_secrets_through_the_same_points_share_a_basis_and_stay_checked() -> None:
    """A round's secrets are shared among the same holders: the interpolation basis and its
    coefficients are computed once for all of them, and every extra share is still checked,
    whichever secret it belongs to."""
    rng = random.Random(5)
    xs = list(range(1, 12))
    for i in range(20):
        secret = rng.randbytes(32)
        shares = shamir.split(secret, xs, 6, random_bytes=rng.randbytes)
        assert shamir.reconstruct(shares, 6) == secret
        if i % 5 == 4:
            j = 6 + i % 5  # an extra share (beyond the first t), its value off by one
            bad = [*shares[:j], (shares[j][0], (shares[j][1] + 1) % PRIME), *shares[j + 1 :]]
            with pytest.raises(ShamirError, match=f"x={xs[j]} is inconsistent"):
                shamir.reconstruct(bad, 6)
    assert shamir._basis.cache_info().hits >= 19


def test_invalid_arguments() -> None:
    with pytest.raises(ShamirError):
        shamir.split(b"short", [1, 2], 1)
    with pytest.raises(ShamirError):
        shamir.split(bytes(32), [1, 2], 3)
    with pytest.raises(ShamirError):
        shamir.split(bytes(32), [1, 1], 2)
    with pytest.raises(ShamirError):
        shamir.split(bytes(32), [0, 1], 2)
    with pytest.raises(ShamirError, match="duplicate"):
        shamir.reconstruct([(1, 5), (1, 5)], 2)
    with pytest.raises(ShamirError):
        shamir.share_from_bytes(bytes(65))
    with pytest.raises(ShamirError):
        shamir.share_from_bytes(b"\xff" * 66)
    assert shamir.share_from_bytes(shamir.share_to_bytes(PRIME - 1)) == PRIME - 1


def test_shares_depend_on_randomness_not_only_on_the_secret() -> None:
    a = shamir.split(bytes(32), [1, 2, 3], 2)
    b = shamir.split(bytes(32), [1, 2, 3], 2)
    assert a != b
