"""Differential-privacy math: the discrete Gaussian sampler, the sensitivity bound, the noisy
codec (distributed and central) and the clip/multiplier algebra, against reference formulas."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.codec import (
    CodecError,
    CodecParams,
    decode_sum,
    encode,
    encoded_length,
    kept_count,
    quant_range,
    ring_bits,
    ring_sum,
    unclipped_count,
)
from protocol.dp import (
    DPError,
    NoiseStream,
    _bernoulli_exp_whole,
    combined_noise_multiplier,
    ddg_tau,
    level_sensitivity,
    next_clip_norm,
    sample_discrete_gaussian,
    update_noise_multiplier,
)

SEED = b"dp-test-seed-0123456789abcdef"


def key(label: str) -> bytes:
    """A fixed 32-byte noise key: the statistical tests are deterministic. Hashed: the PRG
    reads the first 16 bytes of a key, so labels sharing a 16-byte prefix must not collide."""
    return hashlib.sha256(label.encode()).digest()


def discrete_gaussian_pmf(sigma: float, support: np.ndarray) -> np.ndarray:
    """Reference: exp(-x^2 / 2 sigma^2) normalised over the integers (truncated far out)."""
    wide = np.arange(-int(40 * sigma) - 40, int(40 * sigma) + 41)
    norm = float(np.exp(-(wide.astype(np.float64) ** 2) / (2 * sigma**2)).sum())
    return np.exp(-(support.astype(np.float64) ** 2) / (2 * sigma**2)) / norm


@pytest.mark.parametrize("sigma", [0.5, 1.0, 3.0])
def test_discrete_gaussian_matches_its_pmf(sigma: float) -> None:
    n = 200_000
    x = sample_discrete_gaussian(sigma, n, NoiseStream(key(f"pmf-{sigma}")))
    support = np.arange(-int(4 * sigma) - 1, int(4 * sigma) + 2)
    observed = np.array([(x == k).sum() for k in support], dtype=np.float64)
    expected = discrete_gaussian_pmf(sigma, support) * n
    keep = expected > 20
    chi2 = float((((observed - expected) ** 2) / expected)[keep].sum())
    dof = int(keep.sum()) - 1
    # chi-square at p = 1e-4 is below dof + 6 sqrt(2 dof) + 20 for these sizes
    assert chi2 < dof + 6 * math.sqrt(2 * dof) + 20, (chi2, dof)


@pytest.mark.parametrize("sigma", [0.7, 2.5, 25.0, 700.0, 1e5])
def test_discrete_gaussian_has_the_configured_scale(sigma: float) -> None:
    n = 400_000
    x = sample_discrete_gaussian(sigma, n, NoiseStream(key(f"scale-{sigma}")))
    assert x.dtype == np.int64 and x.shape == (n,)
    support = np.arange(-int(40 * sigma) - 40, int(40 * sigma) + 41)
    var = float((discrete_gaussian_pmf(sigma, support) * support.astype(np.float64) ** 2).sum())
    # mean within 5 standard errors, variance within 5 standard errors (4th moment 3 var^2)
    assert abs(x.mean()) < 5 * math.sqrt(var / n)
    assert abs(x.var() / var - 1) < 5 * math.sqrt(2 / n)
    # symmetric: as many positive as negative draws (binomial, 5 standard errors)
    pos, neg = int((x > 0).sum()), int((x < 0).sum())
    assert abs(pos - neg) < 5 * math.sqrt(pos + neg)
    if sigma >= 25:  # Gaussian tails: 3-sigma exceedances near 0.27%
        assert abs((np.abs(x) > 3 * sigma).mean() - 0.0027) < 0.0006


@pytest.mark.parametrize("sigma", [10.0, 3600.0])
def test_discrete_gaussian_cdf_is_the_exact_one(sigma: float) -> None:
    """Kolmogorov-Smirnov distance to the exact N_Z(0, sigma^2) CDF: below the 1e-3 critical
    value 1.95 / sqrt(n) (conservative for a discrete law)."""
    n = 300_000
    x = np.sort(sample_discrete_gaussian(sigma, n, NoiseStream(key(f"ks-{sigma}"))))
    support = np.arange(-int(40 * sigma) - 40, int(40 * sigma) + 41)
    cdf = np.cumsum(discrete_gaussian_pmf(sigma, support))
    values, counts = np.unique(x, return_counts=True)
    empirical = np.cumsum(counts) / n
    exact = cdf[values - support[0]]
    below = np.concatenate([[0.0], empirical[:-1]]), np.concatenate([[0.0], exact[:-1]])
    ks = max(float(np.abs(empirical - exact).max()), float(np.abs(below[0] - below[1]).max()))
    assert ks < 1.95 / math.sqrt(n), ks


def test_noise_is_a_function_of_the_key_only() -> None:
    a = sample_discrete_gaussian(50.0, 1000, NoiseStream(key("same")))
    assert np.array_equal(a, sample_discrete_gaussian(50.0, 1000, NoiseStream(key("same"))))
    assert not np.array_equal(a, sample_discrete_gaussian(50.0, 1000, NoiseStream(key("other"))))
    # without a key every stream is fresh (secrets.token_bytes)
    assert not np.array_equal(
        sample_discrete_gaussian(50.0, 1000, NoiseStream()),
        sample_discrete_gaussian(50.0, 1000, NoiseStream()),
    )


def test_device_noise_refuses_a_non_cryptographic_generator() -> None:
    with pytest.raises(DPError, match="cryptographically secure"):
        sample_discrete_gaussian(5.0, 10, np.random.default_rng(0))  # type: ignore[arg-type]
    with pytest.raises(DPError, match="32 bytes"):
        NoiseStream(b"short")


@pytest.mark.parametrize("whole", [0, 1, 2, 5])
def test_bernoulli_exp_of_integers(whole: int) -> None:
    """The acceptance factor exp(-floor(gamma)) as Bernoulli(1/e) trials: rate e^-whole."""
    n = 400_000
    ok = np.ones(n, dtype=bool)
    _bernoulli_exp_whole(np.full(n, float(whole)), ok, NoiseStream(key(f"bern-{whole}")))
    p = math.exp(-whole)
    assert abs(ok.mean() - p) < 5 * math.sqrt(p * (1 - p) / n) + 1e-12


def test_discrete_gaussian_refuses_bad_sigma() -> None:
    source = NoiseStream(key("bad"))
    assert not sample_discrete_gaussian(0.0, 5, source).any()
    for bad in (-1.0, math.inf, math.nan, 2.0**41):
        with pytest.raises(DPError):
            sample_discrete_gaussian(bad, 5, source)


def test_level_sensitivity_is_the_reference_bound() -> None:
    # C * (2^b - 1) / 2R for the update plus sqrt(m) for the rounding; twice that when one
    # device's data is replaced
    delta = 2.0 * 31 / 0.02 + 10.0
    assert level_sensitivity(2.0, 5, 0.01, 100, adjacency="add-remove") == pytest.approx(delta)
    assert level_sensitivity(2.0, 5, 0.01, 100, adjacency="replace-one") == pytest.approx(2 * delta)
    with pytest.raises(DPError):
        level_sensitivity(0.0, 5, 0.01, 100, adjacency="replace-one")
    with pytest.raises(DPError, match="adjacency"):
        level_sensitivity(2.0, 5, 0.01, 100, adjacency="zero-out")  # type: ignore[arg-type]


@settings(max_examples=50, deadline=None)
@given(
    d=st.integers(10, 3000),
    bits=st.integers(2, 12),
    keep=st.sampled_from([1.0, 0.5, 0.1]),
    clip=st.floats(0.01, 10),
    scale=st.floats(0.001, 100),
    seed=st.integers(0, 2**32 - 1),
)
def test_one_device_moves_the_integer_sum_by_at_most_the_sensitivity(
    d: int, bits: int, keep: float, clip: float, scale: float, seed: int
) -> None:
    """The bound that DP noise is calibrated to, checked on encoded vectors: a device's
    quantized contribution stays within ``level_sensitivity`` of the zero point."""
    rng = np.random.default_rng(seed)
    p = CodecParams(clip_norm=clip, bits=bits, keep_fraction=keep, max_clients=4, seed=SEED, weight_cap=1)
    x = (rng.standard_t(2, d) * scale).astype(np.float32)  # heavy tails: clamping happens
    enc = encode(x, p, rng)
    m = kept_count(p, d)
    levels = (1 << bits) - 1
    centred = enc.values[:m].astype(np.float64) - levels / 2
    bound = level_sensitivity(clip, bits, quant_range(p, d), m, adjacency="add-remove")
    assert np.linalg.norm(centred) <= bound + 1e-6


@settings(max_examples=30, deadline=None)
@given(
    d=st.integers(64, 3000),
    bits=st.integers(4, 12),
    keep=st.sampled_from([1.0, 0.5, 0.1]),
    clip=st.floats(0.01, 10),
    seed=st.integers(0, 2**32 - 1),
)
def test_replacing_one_device_moves_the_sum_by_up_to_twice_its_bound(
    d: int, bits: int, keep: float, clip: float, seed: int
) -> None:
    """Replace-one: a device clipped at C replaced by its opposite moves the integer sum by
    about 2 C levels: beyond the add/remove sensitivity, within the replace-one one."""
    rng = np.random.default_rng(seed)
    p = CodecParams(
        clip_norm=clip,
        bits=bits,
        keep_fraction=keep,
        max_clients=4,
        seed=SEED,
        weight_cap=1,
        range_factor=8.0,
    )
    x = rng.normal(0, 1, d).astype(np.float32)
    x *= np.float32(10 * clip / np.linalg.norm(x))  # clipped to C
    a, b = encode(x, p, rng), encode(-x, p, rng)
    m = kept_count(p, d)
    moved = float(np.linalg.norm(a.values[:m].astype(np.float64) - b.values[:m].astype(np.float64)))
    r = quant_range(p, d)
    assert moved <= level_sensitivity(clip, bits, r, m, adjacency="replace-one") + 1e-6
    # every coordinate kept: the two clipped parts are C (2^b - 1) / 2R levels from the zero
    # point each and opposite, so they differ by twice that, less the rounding (the difference
    # of two roundings, about sqrt(m / 2)): beyond the add/remove bound whenever the clipped
    # part dominates the rounding
    if keep == 1.0 and clip * ((1 << bits) - 1) / (2 * r) > 4 * math.sqrt(m):
        assert moved > level_sensitivity(clip, bits, r, m, adjacency="add-remove")


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 20),
    d=st.integers(5, 400),
    bits=st.integers(1, 10),
    noise=st.floats(0.5, 5000),
    count_noise=st.floats(0.0, 50),
    seed=st.integers(0, 2**32 - 1),
)
def test_noisy_sum_is_the_exact_sum_plus_the_noise(
    n: int, d: int, bits: int, noise: float, count_noise: float, seed: int
) -> None:
    """Distributed DP: the ring (sized for the noise) carries sum + noise without wrapping,
    so the decoder recovers exactly the integer sum of the noise-free encodings plus the noise
    the devices drew."""
    base = CodecParams(
        clip_norm=1.0, bits=bits, keep_fraction=1.0, max_clients=n, seed=SEED, weight_cap=1, count_slot=True
    )
    noisy = base.model_copy(update={"noise_std": noise, "count_noise_std": count_noise})
    k = ring_bits(noisy)
    assert k >= ring_bits(base)
    m = kept_count(base, d)
    xs = [np.random.default_rng(seed + i).normal(0, 0.1, d).astype(np.float32) for i in range(n)]
    plain, noised, noise_sum = [], [], np.zeros(m + 2, dtype=np.int64)
    for i, x in enumerate(xs):
        a = encode(x, base, np.random.default_rng(seed + 100 + i))
        b = encode(x, noisy, np.random.default_rng(seed + 100 + i), noise_key=key(f"sum-{seed}-{i}"))
        plain.append(a.values)
        noised.append(b.values)
        assert b.values.max() < 1 << k
        diff = b.values.astype(np.int64) - a.values.astype(np.int64)
        diff = ((diff + (1 << (k - 1))) % (1 << k)) - (1 << (k - 1))  # the noise, centred
        noise_sum += diff
    assert not noise_sum[m]  # the weight slot carries no noise
    got = ring_sum(noised, k)
    want_ints = ring_sum(plain, ring_bits(base)).astype(np.int64) + noise_sum
    # decode by hand the way decode_sum does and compare integer sums
    levels = (1 << bits) - 1
    off = (n * levels) // 2
    c = (got[:m].astype(np.int64) - off) % (1 << k)
    c[c >= 1 << (k - 1)] -= 1 << k
    assert np.array_equal(c + off, want_ints[:m])
    assert unclipped_count(got, noisy, n, d) == want_ints[m + 1]
    # and decode_sum agrees with the noise-free decode plus the scaled noise
    mean = decode_sum(got, noisy, n, d)
    assert mean.shape == (d,) and np.isfinite(mean).all()


def test_noise_widens_the_ring_and_refuses_overflow() -> None:
    p = CodecParams(clip_norm=1.0, bits=5, max_clients=100, seed=SEED, keep_fraction=1.0, weight_cap=1)
    assert ring_bits(p) == 12
    # 12 tail sigmas of 100 devices' noise each side: 31*100 + 24 * 1000 * 10 fits 18 bits
    assert ring_bits(p.model_copy(update={"noise_std": 1000.0})) == (3100 + 240_000).bit_length()
    with pytest.raises(CodecError, match="ring bits"):
        ring_bits(p.model_copy(update={"noise_std": 1e8}))


def test_central_noise_has_the_configured_scale() -> None:
    d, n = 4096, 10
    p = CodecParams(clip_norm=1.0, bits=8, keep_fraction=0.25, max_clients=n, seed=SEED, weight_cap=1)
    rng = np.random.default_rng(3)
    xs = [rng.normal(0, 0.01, d).astype(np.float32) for _ in range(n)]
    total = ring_sum([encode(x, p, rng).values for x in xs], ring_bits(p))
    clean = decode_sum(total, p, n, d)
    sigma = 40.0  # levels
    noisy = decode_sum(total, p, n, d, central_noise_std=sigma, noise=NoiseStream(b"\x05" * 32))
    # one level is 2R/(2^b-1); scaled by D/m, divided by n weights, rotated orthonormally
    m = kept_count(p, d)
    per_coord = sigma * 2 * quant_range(p, d) / 255 * (d / m) / n * math.sqrt(m / d)
    resid = (noisy - clean).astype(np.float64)
    assert abs(resid.std() / per_coord - 1) < 0.05
    again = decode_sum(total, p, n, d, central_noise_std=sigma, noise=NoiseStream(b"\x05" * 32))
    np.testing.assert_array_equal(noisy, again)  # the key decides the noise
    fresh = decode_sum(total, p, n, d, central_noise_std=sigma)  # a secret key of its own
    assert not np.array_equal(noisy, fresh)


def test_encoded_length_counts_the_count_slot() -> None:
    p = CodecParams(clip_norm=1.0, max_clients=3, seed=SEED, keep_fraction=1.0, weight_cap=1)
    assert encoded_length(p.model_copy(update={"count_slot": True}), 100) == encoded_length(p, 100) + 1
    enc = encode(
        np.full(100, 10.0, np.float32), p.model_copy(update={"count_slot": True}), np.random.default_rng(0)
    )
    assert enc.clipped and enc.values[-1] == 0
    enc = encode(
        np.full(100, 0.01, np.float32), p.model_copy(update={"count_slot": True}), np.random.default_rng(0)
    )
    assert not enc.clipped and enc.values[-1] == 1


@given(z=st.floats(0.1, 50), extra=st.floats(1.01, 100))
def test_update_and_combined_multipliers_are_inverse(z: float, extra: float) -> None:
    count = z * extra
    assert combined_noise_multiplier(update_noise_multiplier(z, count), count) == pytest.approx(z, rel=1e-9)
    assert update_noise_multiplier(z, None) == z
    assert update_noise_multiplier(z, count) > z


def test_count_noise_must_exceed_the_multiplier() -> None:
    with pytest.raises(DPError, match="must exceed"):
        update_noise_multiplier(2.0, 1.5)


def test_next_clip_norm_follows_andrew_et_al() -> None:
    assert next_clip_norm(1.0, 0.5, 0.5, 0.2) == 1.0
    assert next_clip_norm(1.0, 1.0, 0.5, 0.2) == pytest.approx(math.exp(-0.1))  # all within: shrink
    assert next_clip_norm(1.0, 0.0, 0.5, 0.2) == pytest.approx(math.exp(0.1))  # all clipped: grow
    assert next_clip_norm(1.0, 7.0, 0.5, 0.2) == pytest.approx(math.exp(-0.1))  # noisy b clamped


def test_ddg_tau_reference() -> None:
    assert ddg_tau(1.0, 2) == pytest.approx(10 * math.exp(-(math.pi**2)))
    assert ddg_tau(50.0, 1000) == 0.0  # underflows: the sum is a discrete Gaussian for all purposes


@pytest.mark.parametrize("sigma", [5e-324, 1e-10, 0.049])
def test_tiny_sigma_returns_zeros_without_looping(sigma: float) -> None:
    assert not sample_discrete_gaussian(sigma, 1000, NoiseStream(key("tiny"))).any()
