"""The bootstrap intervals of model_export.stats: properties (hypothesis) and coverage on
simulated data with a known difference."""

from __future__ import annotations

import time
from collections.abc import Callable

import hypothesis.strategies as st
import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import assume, given, settings

from model_export.stats import Interval, paired_bootstrap, paired_ratio, rate_ci

IntArray = npt.NDArray[np.int64]


@st.composite
def paired_data(draw: st.DrawFn, min_n: int = 10, max_n: int = 300) -> tuple[IntArray, IntArray, IntArray]:
    """Words per message (1-30) and two models' hits on them, drawn per message."""
    n = draw(st.integers(min_n, max_n))
    seed = draw(st.integers(0, 2**32 - 1))
    rate_a = draw(st.floats(0.02, 0.98))
    rate_b = draw(st.floats(0.02, 0.98))
    rng = np.random.default_rng(seed)
    words = rng.integers(1, 31, size=n)
    return rng.binomial(words, rate_a), rng.binomial(words, rate_b), words


@settings(max_examples=60)
@given(paired_data(), st.integers(0, 1000))
def test_the_interval_contains_the_point_estimate(
    data: tuple[IntArray, IntArray, IntArray], seed: int
) -> None:
    a, b, w = data
    d = paired_bootstrap(a, b, w, resamples=400, seed=seed)
    assert d.estimate == pytest.approx(a.sum() / w.sum() - b.sum() / w.sum())
    assert d.low <= d.estimate <= d.high
    r = rate_ci(a, w, resamples=400, seed=seed)
    assert r.estimate == pytest.approx(a.sum() / w.sum())
    assert r.low <= r.estimate <= r.high
    q = paired_ratio(a, b, w, resamples=400, seed=seed)
    assume(b.sum() > 0)
    assert q.low <= q.estimate <= q.high


@settings(max_examples=40)
@given(paired_data(min_n=100, max_n=300))
def test_swapping_the_models_mirrors_the_interval(data: tuple[IntArray, IntArray, IntArray]) -> None:
    """The same draws score both orders: a - b is exactly -(b - a), bounds swapped."""
    a, b, w = data
    ab = paired_bootstrap(a, b, w, resamples=500, seed=3)
    ba = paired_bootstrap(b, a, w, resamples=500, seed=3)
    assert ab.estimate == pytest.approx(-ba.estimate)
    assert ab.low == pytest.approx(-ba.high) and ab.high == pytest.approx(-ba.low)


@settings(max_examples=30)
@given(paired_data(min_n=150, max_n=300))
def test_symmetric_data_gives_an_interval_symmetric_about_zero(
    data: tuple[IntArray, IntArray, IntArray],
) -> None:
    """Every message appears twice with the roles of the models swapped: the differences are
    symmetric about 0, and so is the interval (up to resampling noise)."""
    a, b, w = data
    assume(np.any(a != b))
    hits_a, hits_b, words = np.concatenate([a, b]), np.concatenate([b, a]), np.concatenate([w, w])
    d = paired_bootstrap(hits_a, hits_b, words, resamples=2000, seed=1)
    assert d.estimate == 0
    assert abs(d.low + d.high) <= 0.15 * (d.high - d.low)


@settings(max_examples=30)
@given(paired_data(min_n=100, max_n=250))
def test_the_interval_shrinks_as_one_over_sqrt_n(data: tuple[IntArray, IntArray, IntArray]) -> None:
    """Four copies of the messages (the same per-message spread, 4x the messages): half the width."""
    a, b, w = data
    base = paired_bootstrap(a, b, w, resamples=2000, seed=5)
    four = paired_bootstrap(np.tile(a, 4), np.tile(b, 4), np.tile(w, 4), resamples=2000, seed=5)
    assume(base.high - base.low > 0)
    ratio = (four.high - four.low) / (base.high - base.low)
    assert 0.4 <= ratio <= 0.6, ratio
    one = rate_ci(a, w, resamples=2000, seed=5)
    assume(one.high - one.low > 0)
    four_one = rate_ci(np.tile(a, 4), np.tile(w, 4), resamples=2000, seed=5)
    ratio = (four_one.high - four_one.low) / (one.high - one.low)
    assert 0.4 <= ratio <= 0.6, ratio


def _simulated(rng: np.random.Generator, n: int, lift: float) -> tuple[IntArray, IntArray, IntArray]:
    """Messages of 1 + Poisson(9) words; each message has its own base accuracy (Beta(2, 8),
    so words of a message are correlated) and model a sees each word right with probability
    ``lift`` more than model b, on the same uniform draw (paired): the true difference is ``lift``."""
    words = 1 + rng.poisson(9, size=n)
    base = rng.beta(2, 8, size=n) * (1 - lift)
    hits_a, hits_b = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    for i in range(n):
        u = rng.random(words[i])
        hits_b[i] = int(np.sum(u < base[i]))
        hits_a[i] = int(np.sum(u < base[i] + lift))
    return hits_a, hits_b, words


def test_paired_intervals_cover_the_true_difference_about_95_percent_of_the_time() -> None:
    rng = np.random.default_rng(19)
    lift, covered, trials = 0.01, 0, 200
    for t in range(trials):
        a, b, w = _simulated(rng, 300, lift)
        d = paired_bootstrap(a, b, w, resamples=1000, seed=t)
        covered += d.low <= lift <= d.high
    assert 0.9 <= covered / trials <= 0.99, covered


def test_rate_intervals_cover_the_true_rate() -> None:
    rng = np.random.default_rng(7)
    covered, trials = 0, 200
    for t in range(trials):
        words = 1 + rng.poisson(9, size=300)
        hits = rng.binomial(words, 0.2)
        r = rate_ci(hits, words, resamples=1000, seed=t)
        covered += r.low <= 0.2 <= r.high
    assert 0.9 <= covered / trials <= 0.99, covered


def test_two_thousand_resamples_of_ten_thousand_messages_take_well_under_a_second() -> None:
    rng = np.random.default_rng(0)
    a, b, w = _simulated(rng, 10_000, 0.01)
    best = min(_timed(lambda: paired_bootstrap(a, b, w, resamples=2000, seed=0)) for _ in range(3))
    assert best < 1.0, best


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def test_the_same_seed_draws_the_same_interval_and_bad_input_is_refused() -> None:
    a, b, w = np.array([1, 2, 0]), np.array([0, 2, 1]), np.array([2, 3, 1])
    assert paired_bootstrap(a, b, w, seed=4) == paired_bootstrap(a, b, w, seed=4)
    assert isinstance(paired_bootstrap(a, b, w), Interval)
    diff, low, high = paired_bootstrap(a, b, w)  # unpacks as (difference, low, high)
    assert low <= diff <= high
    with pytest.raises(ValueError, match="one entry per message"):
        paired_bootstrap(a, b[:2], w)
    with pytest.raises(ValueError, match=r"\[0, words\]"):
        rate_ci(np.array([3, 0, 0]), w)
    with pytest.raises(ValueError, match="positive total"):
        rate_ci(np.zeros(3), np.zeros(3))
    with pytest.raises(ValueError, match="non-empty"):
        rate_ci([], [])
