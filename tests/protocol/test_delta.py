"""XOR deltas between weight versions: bit-exact round trips and refusals of bad input."""

from __future__ import annotations

import itertools
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.delta import DeltaError, XorUndelta, xor_delta, xor_undelta


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 5000),
    seed=st.integers(0, 2**32 - 1),
    scale=st.sampled_from([0.0, 1e-6, 1e-2, 1.0]),
    chunk=st.sampled_from([1, 7, 1000, 1 << 20]),
)
def test_round_trip_is_bit_exact(n: int, seed: int, scale: float, chunk: int) -> None:
    rng = np.random.default_rng(seed)
    base = rng.normal(0, 1, n).astype(np.float32)
    new = (base + scale * rng.normal(0, 1, n)).astype(np.float32)
    new[rng.integers(0, n)] = np.float32(np.inf)  # any bit pattern survives
    got = xor_undelta(xor_delta(new, base), base, chunk=chunk)
    assert got.dtype == np.float32 and got.shape == (n,)
    assert np.array_equal(got.view(np.uint32), new.view(np.uint32))


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 20_000),
    seed=st.integers(0, 2**32 - 1),
    cuts=st.lists(st.integers(0, 1 << 17), max_size=12),
    chunk=st.sampled_from([5, 4096, 1 << 20]),
)
def test_streamed_decoding_matches_whole_decoding(n: int, seed: int, cuts: list[int], chunk: int) -> None:
    """Fed in arbitrary pieces (as a download arrives), after a reset that threw away a partial
    first attempt, the streaming decoder gives the same bits."""
    rng = np.random.default_rng(seed)
    base = rng.normal(0, 1, n).astype(np.float32)
    new = (base + 1e-3 * rng.normal(0, 1, n)).astype(np.float32)
    delta = xor_delta(new, base)
    dec = XorUndelta(base, chunk=chunk)
    dec.write(delta[: len(delta) // 3])  # a broken first attempt
    dec.reset()
    bounds = sorted({min(c, len(delta)) for c in cuts} | {0, len(delta)})
    for a, b in itertools.pairwise(bounds):
        dec.write(delta[a:b])
    got = dec.finish()
    assert np.array_equal(got.view(np.uint32), new.view(np.uint32))


def test_streamed_decoding_refuses_trailing_and_early_ends() -> None:
    base = np.arange(1000, dtype=np.float32)
    good = xor_delta(base + 1, base)
    with pytest.raises(DeltaError, match="after the end"):
        xor_undelta(good + b"x", base)
    dec = XorUndelta(base)
    dec.write(good)
    with pytest.raises(DeltaError, match="after the end"):
        dec.write(b"more")
    dec = XorUndelta(base)
    dec.write(good[:-3])
    with pytest.raises(DeltaError, match="ends early"):
        dec.finish()


def test_small_moves_compress() -> None:
    rng = np.random.default_rng(0)
    base = rng.normal(0, 0.05, 100_000).astype(np.float32)
    new = base.copy()
    idx = rng.choice(base.size, 6_250, replace=False)  # a round that moved 1/16 of the weights
    new[idx] += 1e-4
    assert len(xor_delta(new, base)) < 0.25 * new.nbytes


def test_refuses_corrupt_short_long_and_mismatched_deltas() -> None:
    base = np.arange(1000, dtype=np.float32)
    good = xor_delta(base + 1, base)
    with pytest.raises(DeltaError):
        xor_undelta(good[: len(good) // 2], base)  # truncated stream
    with pytest.raises(DeltaError):
        xor_undelta(b"not zlib at all", base)
    with pytest.raises(DeltaError):
        xor_undelta(good, base[:999])  # expands beyond the base
    with pytest.raises(DeltaError):
        xor_undelta(good, np.arange(1001, dtype=np.float32))  # too short for the base
    with pytest.raises(DeltaError):
        xor_undelta(zlib.compress(bytes(4000)) + b"trailing", np.zeros(999, np.float32))
    with pytest.raises(DeltaError):
        xor_delta(base, base[:10])
