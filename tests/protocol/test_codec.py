"""Codec: ring width and headroom, rotation, subset, quantization error bounds and
unbiasedness, weighting, bit packing."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from protocol import codec
from protocol.codec import CodecError, CodecParams, packing, quantize, randomness, rotation


def _params(**kw: object) -> CodecParams:
    base: dict[str, object] = {
        "clip_norm": 1.0,
        "max_clients": 10,
        "seed": 1,
        "keep_fraction": 1.0,
        "weight_cap": 1,
    }
    base.update(kw)
    return CodecParams(**base)


# ---------------------------------------------------------------------------------------
# ring width and headroom
# ---------------------------------------------------------------------------------------


@given(
    bits=st.integers(1, 24),
    n=st.integers(1, 1 << 20),
    cap=st.integers(1, 1 << 12),
)
def test_ring_bits_is_the_smallest_width_holding_the_sum(bits: int, n: int, cap: int) -> None:
    p = _params(bits=bits, max_clients=n, weight_cap=cap)
    worst = max(n * ((1 << bits) - 1), n * cap)
    if worst >= 1 << 32:
        with pytest.raises(CodecError, match="ring bits"):
            codec.ring_bits(p)
        return
    k = codec.ring_bits(p)
    assert worst < 1 << k  # holds the largest possible sum
    assert worst >= 1 << (k - 1)  # and one bit fewer would not
    assert k <= bits + math.ceil(math.log2(n)) + max(0, cap.bit_length() - bits)


def test_known_ring_widths() -> None:
    assert codec.ring_bits(_params(bits=8, max_clients=100)) == 15
    assert codec.ring_bits(_params(bits=16, max_clients=100)) == 23
    assert codec.ring_bits(_params(bits=16, max_clients=1)) == 16
    assert codec.ring_bits(_params(bits=8, max_clients=100, weight_cap=1000)) == 17


def test_headroom_refusal_and_invalid_parameters() -> None:
    with pytest.raises(CodecError, match="more than 32"):
        codec.ring_bits(_params(bits=24, max_clients=1 << 9))
    with pytest.raises(CodecError, match="more than 32"):
        codec.encode(np.zeros(4, np.float32), _params(bits=20, max_clients=5000), np.random.default_rng())
    for bad in (
        {"bits": 0},
        {"bits": 25},
        {"keep_fraction": 0.0},
        {"keep_fraction": 1.5},
        {"clip_norm": 0.0},
        {"clip_norm": float("inf")},
        {"max_clients": 0},
        {"seed": b"short"},
        {"seed": -1},
        {"range_factor": float("nan")},
        {"unknown": 1},
    ):
        with pytest.raises(ValidationError):
            _params(**bad)


def test_saturated_inputs_sum_without_wrapping() -> None:
    """Every client at the top of the range: the sum of max_clients inputs must not wrap."""
    n, d = 37, 64
    p = _params(rotate=False, bits=7, max_clients=n, range_factor=1.0, clip_norm=8.0)
    k = codec.ring_bits(p)
    r = codec.quant_range(p, d)
    big = np.full(d, 1.0, np.float32)  # norm 8 = C, each coordinate 1.0 = R
    rng = np.random.default_rng(0)
    total = codec.ring_sum([codec.encode(big, p, rng).values for _ in range(n)], k)
    assert int(total[:-1].max()) == n * 127
    np.testing.assert_allclose(codec.decode_sum(total, p, n, d), r, rtol=1e-6)


def test_params_json_roundtrip_keeps_the_seed() -> None:
    p = _params(seed=b"\xff" * 32, keep_fraction=0.3)
    q = CodecParams.model_validate_json(p.model_dump_json())
    assert q == p and q.seed == b"\xff" * 32
    assert _params(seed=5).seed == (5).to_bytes(32, "big")


# ---------------------------------------------------------------------------------------
# rotation and subset
# ---------------------------------------------------------------------------------------


def _sylvester(log2n: int) -> np.ndarray:
    h = np.array([[1.0]])
    for _ in range(log2n):
        h = np.kron(np.array([[1.0, 1.0], [1.0, -1.0]]), h)
    return h


@given(log2n=st.integers(0, 12), seed=st.integers(0, 2**32))
@settings(max_examples=40, deadline=None)
def test_fwht_matches_the_hadamard_matrix(log2n: int, seed: int) -> None:
    x = np.random.default_rng(seed).normal(size=1 << log2n)
    if log2n <= 9:
        ref = _sylvester(log2n) @ x / math.sqrt(x.size)
        np.testing.assert_allclose(codec.fwht(x), ref, atol=1e-9)
    np.testing.assert_allclose(codec.fwht(codec.fwht(x)), x, atol=1e-9)  # involution
    assert np.linalg.norm(codec.fwht(x)) == pytest.approx(np.linalg.norm(x), rel=1e-9)


@pytest.mark.parametrize("chunk_bytes", [64, 512, 1 << 12])
@pytest.mark.parametrize(("blocks", "log2b"), [(1, 9), (3, 5), (5, 8), (2, 0)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_chunked_block_transform_matches_the_reference(
    monkeypatch: pytest.MonkeyPatch, chunk_bytes: int, blocks: int, log2b: int, dtype: type
) -> None:
    """Tiny cache chunks force every split of the levels into in-chunk passes and passes
    over the whole vector (in place, a slab of columns at a time)."""
    monkeypatch.setattr(rotation, "FWHT_CHUNK_BYTES", chunk_bytes)
    b = 1 << log2b
    total = blocks * b
    rng = np.random.default_rng(blocks * 100 + log2b)
    x = rng.normal(size=total - 3 if total > 3 else total)
    signs = np.where(rng.random(total) < 0.5, -1.0, 1.0)
    padded = np.zeros(total)
    padded[: x.size] = x
    padded *= signs
    ref = np.empty(total)
    for j in range(blocks):
        ref[j::blocks] = _sylvester(log2b) @ padded[j::blocks] * 0.5
    out = rotation.wht(x.astype(dtype), total, blocks, dtype, scale=0.5, signs=signs.astype(dtype))
    assert out.dtype == dtype
    np.testing.assert_allclose(out, ref, atol=1e-4 if dtype is np.float32 else 1e-10)


def test_fwht_refuses_other_lengths() -> None:
    with pytest.raises(CodecError):
        codec.fwht(np.zeros(6))


@given(d=st.integers(1, 3000), seed=st.integers(0, 2**32))
@settings(max_examples=40, deadline=None)
def test_rotation_is_orthonormal_and_inverted(d: int, seed: int) -> None:
    p = _params(seed=seed)
    x = np.random.default_rng(seed).normal(size=d).astype(np.float32)
    y = codec.rotate(x, p)
    assert y.shape == (codec.padded_dim(p, d),)
    assert np.linalg.norm(y) == pytest.approx(np.linalg.norm(x), rel=1e-5)
    np.testing.assert_allclose(codec.unrotate(y, p, d), x, atol=1e-5)


def test_rotation_spreads_a_spike() -> None:
    p = _params(seed=3)
    x = np.zeros(1024, np.float32)
    x[17] = 1.0
    y = codec.rotate(x, p)
    np.testing.assert_allclose(np.abs(y), 1 / 32, rtol=1e-6)


def test_blocked_rotation_matches_the_reference() -> None:
    """Block j of B = 256 holds coordinates j, j + 4, ...; each gets H_256 / 16."""
    d, block = 1000, 256
    p = _params(seed=5, rotation_block=block)
    assert codec.rotation_block(p, d) == block and codec.padded_dim(p, d) == 1024
    x = np.random.default_rng(5).normal(size=d)
    padded = np.zeros(1024)
    padded[:d] = x
    padded *= codec.rotation_signs(p, d)
    ref = np.empty(1024)
    for j in range(4):
        ref[j::4] = _sylvester(8) @ padded[j::4] / 16
    y = codec.rotate(x.astype(np.float32), p)
    np.testing.assert_allclose(y, ref, atol=1e-5)
    np.testing.assert_allclose(codec.unrotate(y.astype(np.float64), p, d), x, atol=1e-5)


@given(d=st.integers(1, 1 << 24))
@settings(max_examples=200, deadline=None)
def test_automatic_rotation_block_pads_little(d: int) -> None:
    p = _params()
    block = codec.rotation_block(p, d)
    big_d = codec.padded_dim(p, d)
    assert block & (block - 1) == 0 and big_d % block == 0 and big_d >= d
    if d <= 1024 or (big_d - d <= d / 16 and big_d == 1 << (d - 1).bit_length()):
        assert block == big_d  # one block: the plain Hadamard rotation
    else:
        assert big_d - d <= max(d / 16, 1023)
        assert block >= 1024


def test_rotation_block_of_the_demo_model() -> None:
    """2,566,848 parameters: five blocks of 2**19 (+2%) instead of one of 2**22 (+63%)."""
    p = _params()
    assert codec.rotation_block(p, 2_566_848) == 1 << 19
    assert codec.padded_dim(p, 2_566_848) == 5 << 19
    assert codec.padded_dim(_params(rotation_block=1 << 30), 2_566_848) == 1 << 22
    assert codec.padded_dim(_params(rotate=False), 2_566_848) == 2_566_848


def test_rotation_block_must_be_a_power_of_two() -> None:
    with pytest.raises(ValidationError, match="power of two"):
        _params(rotation_block=3 << 10)


def test_blocked_rotation_spreads_one_layers_delta() -> None:
    """A delta living in one contiguous tensor (a tenth of the vector) still spreads over
    every block: no coordinate far beyond ||x|| / sqrt(D), and about as many clamped at
    range_factor 4 as for a Gaussian (P(|z| > 4) = 6.3e-5)."""
    d = 300_000
    p = _params(seed=9, bits=8, clip_norm=1.0)
    assert codec.padded_dim(p, d) // codec.rotation_block(p, d) > 1
    x = np.zeros(d, np.float32)
    x[40_000:70_000] = np.random.default_rng(9).normal(size=30_000)
    x /= np.linalg.norm(x)
    y = codec.rotate(x, p)
    sigma = 1 / math.sqrt(codec.padded_dim(p, d))
    assert np.abs(y).max() < 6 * sigma
    big_d = codec.padded_dim(p, d)
    assert codec.encode(x, p, np.random.default_rng(0)).saturated <= 2 * 6.3e-5 * big_d


@given(d=st.integers(1, 5000), frac=st.floats(0.01, 1.0), seed=st.integers(0, 2**32))
@settings(max_examples=40, deadline=None)
def test_kept_subset_is_shared_sorted_and_sized(d: int, frac: float, seed: int) -> None:
    p = _params(keep_fraction=frac, seed=seed, rotate=seed % 2 == 0)
    idx = codec.kept_indices(p, d)
    big_d = codec.padded_dim(p, d)
    assert idx.shape == (codec.kept_count(p, d),)
    assert idx.shape[0] == max(1, min(big_d, math.ceil(round(frac * big_d, 9))))
    assert np.all(np.diff(idx) > 0) and idx[0] >= 0 and idx[-1] < big_d
    # a second device with the same round parameters picks the same subset
    np.testing.assert_array_equal(
        codec.kept_indices(_params(keep_fraction=frac, seed=seed, rotate=seed % 2 == 0), d), idx
    )


def _reference_subset(seed: bytes, big_d: int, m: int) -> np.ndarray:
    """The selection rule written out: the m smallest keys of the whole "subset" stream."""
    key = hashlib.sha256(b"fedkeys/codec/v1/subset\x00" + seed).digest()[:16]  # AES-128
    raw = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(8 * big_d))
    keys = np.frombuffer(raw, "<u8").astype(np.uint64)
    low = np.uint64(max(1, (big_d - 1).bit_length()))
    keys = ((keys >> low) << low) | np.arange(big_d, dtype=np.uint64)
    return np.sort(np.argsort(keys, kind="stable")[:m])


@given(big_d=st.integers(1, 200_000), frac=st.floats(0.001, 1.0), seed=st.binary(min_size=32, max_size=32))
@settings(max_examples=30, deadline=None)
def test_streaming_subset_is_the_m_smallest_keys(big_d: int, frac: float, seed: bytes) -> None:
    """The chunked, low-memory selection (threshold pass, complement above one half) picks
    exactly the rule's subset, on both sides of one half and across chunks."""
    m = max(1, min(big_d, round(frac * big_d)))
    got = randomness.kept_subset.__wrapped__(seed, big_d, m)
    np.testing.assert_array_equal(got, _reference_subset(seed, big_d, m))


def test_subset_threshold_retry_keeps_the_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """Even when the first threshold lets too few keys through (forced here), the pass is
    repeated and the result is still the m smallest keys."""
    real = randomness.extreme_keys
    calls = []

    def tight(seed: bytes, big_d: int, count: int, largest: bool) -> np.ndarray:
        calls.append(count)
        return real(seed, big_d, count, largest)

    monkeypatch.setattr(randomness, "extreme_keys", tight)
    monkeypatch.setattr(randomness, "SUBSET_MARGIN", -30.0)  # the first threshold passes too few
    passes = []
    real_chunks = randomness.subset_key_chunks
    monkeypatch.setattr(
        randomness, "subset_key_chunks", lambda seed, big_d: passes.append(1) or real_chunks(seed, big_d)
    )
    seed = bytes(range(32))
    for m in (3000, 8000):  # the smallest keys, and the complement (the largest)
        passes.clear()
        got = randomness.kept_subset.__wrapped__(seed, 10_000, m)
        np.testing.assert_array_equal(got, _reference_subset(seed, 10_000, m))
        assert len(passes) > 1  # the pass was repeated
    assert calls


def test_kept_subset_is_uniform_over_seeds() -> None:
    d, frac, trials = 200, 0.25, 800
    counts = np.zeros(d)
    for s in range(trials):
        counts[codec.kept_indices(_params(keep_fraction=frac, seed=s, rotate=False), d)] += 1
    freq = counts / trials
    # each coordinate is kept with probability 1/4 (binomial sd ~0.0153)
    assert np.all(np.abs(freq - frac) < 5 * math.sqrt(frac * (1 - frac) / trials))
    assert not np.array_equal(
        codec.kept_indices(_params(keep_fraction=frac, seed=1, rotate=False), d),
        codec.kept_indices(_params(keep_fraction=frac, seed=2, rotate=False), d),
    )


# ---------------------------------------------------------------------------------------
# encode / decode
# ---------------------------------------------------------------------------------------


@given(
    d=st.integers(1, 400),
    bits=st.integers(2, 16),
    scale=st.floats(1e-3, 10.0),
    seed=st.integers(0, 2**32),
)
@settings(max_examples=60, deadline=None)
def test_plain_quantization_error_is_below_one_level(d: int, bits: int, scale: float, seed: int) -> None:
    """rotate=False, p=1, range covering the clipped vector: |error| <= Delta per coordinate."""
    p = _params(rotate=False, bits=bits, clip_norm=1.0, range_factor=math.sqrt(d), seed=seed)
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=d) * scale).astype(np.float32)
    enc = codec.encode(x, p, rng)
    norm = float(np.linalg.norm(x.astype(np.float64)))
    assert enc.norm == pytest.approx(norm, rel=1e-5)
    assert enc.clipped == (norm > 1.0)
    assert enc.saturated == 0
    clipped = x * min(1.0, 1.0 / norm)
    delta = 2 * codec.quant_range(p, d) / ((1 << bits) - 1)
    out = codec.decode_sum(enc.values, p, 1, d)
    assert np.all(np.abs(out - clipped) <= delta * (1 + 1e-4) + 1e-6)


@given(d=st.integers(2, 600), bits=st.integers(4, 12), seed=st.integers(0, 2**32))
@settings(max_examples=40, deadline=None)
def test_rotated_quantization_error_bound(d: int, bits: int, seed: int) -> None:
    """rotate=True, p=1, no saturation: ||error||_2 <= Delta * sqrt(D) (orthonormal)."""
    p = _params(bits=bits, seed=seed, range_factor=float(math.sqrt(codec.padded_dim(_params(), d))))
    rng = np.random.default_rng(seed)
    x = rng.normal(size=d).astype(np.float32)
    x *= 0.9 / np.linalg.norm(x)
    enc = codec.encode(x, p, rng)
    assert enc.saturated == 0
    big_d = codec.padded_dim(p, d)
    delta = 2 * codec.quant_range(p, d) / ((1 << bits) - 1)
    err = np.linalg.norm(codec.decode_sum(enc.values, p, 1, d) - x)
    assert err <= delta * math.sqrt(big_d) * 1.001 + 1e-6


def test_default_rotated_8bit_error_is_small() -> None:
    d = 4096
    p = _params(bits=8, seed=7)  # range_factor 4
    rng = np.random.default_rng(1)
    x = rng.normal(size=d).astype(np.float32)
    x *= 0.5 / np.linalg.norm(x)
    enc = codec.encode(x, p, rng)
    out = codec.decode_sum(enc.values, p, 1, d)
    assert enc.saturated <= 2
    assert np.linalg.norm(out - x) / np.linalg.norm(x) < 0.03


def test_stochastic_quantization_is_unbiased() -> None:
    """Values 0.3 levels above a grid point: round-to-nearest would be biased by 0.3 Delta."""
    d, trials = 64, 3000
    p = _params(rotate=False, bits=4, clip_norm=1.0, range_factor=math.sqrt(d))
    r = codec.quant_range(p, d)
    delta = 2 * r / 15
    x = (-r + delta * (np.arange(d) % 15 + 0.3)).astype(np.float32)
    x *= min(1.0, 0.999 / float(np.linalg.norm(x)))  # stay unclipped
    rng = np.random.default_rng(12345)
    acc = np.zeros(d)
    for _ in range(trials):
        acc += codec.decode_sum(codec.encode(x, p, rng).values, p, 1, d)
    mean = acc / trials
    sd = delta / 2 / math.sqrt(trials)  # per-coordinate sd bound of the mean
    assert np.all(np.abs(mean - x) < 5 * sd)
    assert 5 * sd < 0.3 * delta * 0.5  # the test could see a rounding bias


def test_subsampling_is_unbiased_over_round_seeds() -> None:
    d, trials, frac = 256, 600, 0.25
    rng = np.random.default_rng(0)
    x = rng.normal(size=d).astype(np.float32)
    x *= 0.8 / np.linalg.norm(x)
    acc = np.zeros(d)
    one_sq_err = []
    for s in range(trials):
        p = _params(keep_fraction=frac, bits=12, seed=s, range_factor=8.0)
        out = codec.decode_sum(codec.encode(x, p, rng).values, p, 1, d)
        acc += out
        one_sq_err.append(float(np.sum((out - x) ** 2)))
    # variance of one estimate: about (1/p - 1) ||x||^2 (plus tiny quantization noise)
    assert np.mean(one_sq_err) == pytest.approx((1 / frac - 1) * 0.64, rel=0.15)
    mean_err_sq = float(np.sum((acc / trials - x) ** 2))
    assert mean_err_sq < 3 * np.mean(one_sq_err) / trials  # shrinks like 1/trials: unbiased


@pytest.mark.parametrize("bits", [4, 12, 20])
def test_fixed_point_stochastic_rounding_hits_the_fraction(bits: int) -> None:
    """Each coordinate rounds up with probability equal to its fractional level, on the
    int32 (bits <= 16) and int64 (wider) paths, across quantization chunks."""
    n = quantize.Q_CHUNK + 5000
    frac = (np.arange(n) % 7) / 7.0  # exact fractions 0, 1/7, ..., 6/7
    base = (np.arange(n) % 3).astype(np.float64)  # levels 0, 1, 2
    _, _, shift = quantize.fixed_point(bits)
    scaled = (base + frac) * 2.0**shift - ((1 << bits) - 1) * 2.0 ** (shift - 1)  # minus the offset
    work = np.float32 if bits <= 16 else np.float64
    rng = np.random.default_rng(bits)
    ups = np.zeros(n)
    trials = 60
    for _ in range(trials):
        out = np.empty(n, dtype=np.uint32)
        sat = quantize.quantize_into(scaled.astype(work), None, None, bits, rng, out)
        assert sat == 0
        q = out.astype(np.int64) - base.astype(np.int64)
        assert np.all((q == 0) | (q == 1))
        ups += q
    for j in range(7):
        got = ups[np.arange(n) % 7 == j].sum() / (trials * np.count_nonzero(np.arange(n) % 7 == j))
        sd = math.sqrt(j / 7 * (1 - j / 7) / (trials * n / 7)) + 1e-9
        assert abs(got - j / 7) < 6 * sd, (j, got)


def test_encode_is_deterministic_in_the_dither_rng() -> None:
    p = _params(bits=8, seed=4)
    x = np.random.default_rng(0).normal(size=5000).astype(np.float32) * 0.01
    a = codec.encode(x, p, np.random.default_rng(11)).values
    b = codec.encode(x, p, np.random.default_rng(11)).values
    c = codec.encode(x, p, np.random.default_rng(12)).values
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_weighted_mean_and_weight_cap() -> None:
    d = 32
    p = _params(rotate=False, bits=16, clip_norm=10.0, weight_cap=4, range_factor=math.sqrt(d))
    k = codec.ring_bits(p)
    rng = np.random.default_rng(3)
    x1 = rng.normal(size=d).astype(np.float32)
    x2 = rng.normal(size=d).astype(np.float32)
    e1 = codec.encode(x1, p, rng, num_examples=1)  # weight 1/4
    e2 = codec.encode(x2, p, rng, num_examples=100)  # capped at 4/4
    assert (e1.weight, e2.weight) == (1, 4)
    out = codec.decode_sum(codec.ring_sum([e1.values, e2.values], k), p, 2, d)
    ref = (0.25 * x1 + 1.0 * x2) / 1.25
    delta = 2 * codec.quant_range(p, d) / 65535
    assert np.all(np.abs(out - ref) <= 2 * delta / 1.25 + 1e-6)


def test_decode_refuses_malformed_sums() -> None:
    p = _params(rotate=False)
    d = 10
    good = codec.encode(np.ones(d, np.float32) * 0.1, p, np.random.default_rng()).values
    with pytest.raises(CodecError, match="shape"):
        codec.decode_sum(good[:-1], p, 1, d)
    with pytest.raises(CodecError, match="summed weight is 0"):
        codec.decode_sum(np.concatenate([good[:-1], [0]]).astype(np.uint32), p, 1, d)
    with pytest.raises(CodecError, match="n_clients"):
        codec.decode_sum(good, p, 11, d)
    with pytest.raises(CodecError, match="exceeds"):
        codec.decode_sum(np.concatenate([good[:-1], [5]]).astype(np.uint32), p, 1, d)
    with pytest.raises(CodecError, match="lie in"):
        codec.decode_sum(np.full(d + 1, 1 << 20, np.uint32), p, 1, d)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_encode_refuses_non_finite(bad: float) -> None:
    x = np.zeros(8, np.float32)
    x[3] = bad
    with pytest.raises(CodecError, match="NaN or Inf"):
        codec.encode(x, _params(), np.random.default_rng())


def test_encode_handles_huge_norms_without_overflow() -> None:
    x = np.full(1000, 3e38, np.float32)
    enc = codec.encode(x, _params(rotate=False), np.random.default_rng())
    assert enc.clipped and math.isfinite(enc.norm)
    assert enc.norm == pytest.approx(3e38 * math.sqrt(1000), rel=1e-5)


# ---------------------------------------------------------------------------------------
# bit packing
# ---------------------------------------------------------------------------------------


@given(bits=st.integers(1, 32), m=st.integers(0, 100), seed=st.integers(0, 2**32))
@settings(max_examples=150, deadline=None)
def test_pack_unpack_roundtrip(bits: int, m: int, seed: int) -> None:
    v = np.random.default_rng(seed).integers(0, 1 << bits, m, dtype=np.uint64).astype(np.uint32)
    packed = codec.pack_bits(v, bits)
    whole, rest = divmod(bits, 8)
    assert len(packed) == codec.packed_size(m, bits) == m * whole + (m + 7) // 8 * rest
    assert len(packed) >= math.ceil(m * bits / 8)
    assert len(packed) < math.ceil(m * bits / 8) + 8
    np.testing.assert_array_equal(codec.unpack_bits(packed, bits, m), v)


def _reference_pack(v: np.ndarray, bits: int) -> bytes:
    """The documented layout written out element by element."""
    whole, rest = divmod(bits, 8)
    m = len(v)
    out = bytearray()
    vals = [int(a) for a in v]
    if whole == 3:
        out += b"".join((a & 0xFFFF).to_bytes(2, "little") for a in vals)
        out += bytes((a >> 16) & 0xFF for a in vals)
    else:
        out += b"".join((a & ((1 << (8 * whole)) - 1)).to_bytes(whole, "little") for a in vals)
    if rest:
        for g in range((m + 7) // 8):
            word = 0
            for j in range(8):
                if 8 * g + j < m:
                    word |= (vals[8 * g + j] >> (8 * whole)) << (rest * j)
            out += word.to_bytes(rest, "little")
    return bytes(out)


@given(
    bits=st.integers(1, 32),
    m=st.integers(0, 90),
    seed=st.integers(0, 2**32),
    chunk=st.sampled_from([8, 16, 64]),
)
@settings(max_examples=150, deadline=None)
def test_pack_matches_the_documented_layout_across_chunks(bits: int, m: int, seed: int, chunk: int) -> None:
    v = np.random.default_rng(seed).integers(0, 1 << bits, m, dtype=np.uint64).astype(np.uint32)
    old = packing.PACK_CHUNK, packing.UNPACK_CHUNK
    packing.PACK_CHUNK = packing.UNPACK_CHUNK = chunk  # many chunks even for short vectors
    try:
        packed = codec.pack_bits(v, bits)
        assert packed == _reference_pack(v, bits)
        np.testing.assert_array_equal(codec.unpack_bits(packed, bits, m), v)
        acc = np.arange(m, dtype=np.uint32)
        codec.unpack_bits_add(packed, bits, acc)
        np.testing.assert_array_equal(acc, np.arange(m, dtype=np.uint32) + v)
    finally:
        packing.PACK_CHUNK, packing.UNPACK_CHUNK = old


def test_pack_layout_known_answers() -> None:
    # 12 bits: low bytes 0xBC 0x23, then one group of 4-bit highs 0xA | 0x1 << 4 in 4 bytes
    v = np.array([0xABC, 0x123], np.uint32)
    assert codec.pack_bits(v, 12) == bytes([0xBC, 0x23, 0x1A, 0, 0, 0])
    assert codec.pack_bits(np.array([1, 0, 1, 1, 0, 0, 0, 1, 1], np.uint32), 1) == bytes([0b10001101, 0b1])
    assert codec.pack_bits(np.array([0x123456], np.uint32), 24) == bytes([0x56, 0x34, 0x12])
    assert codec.pack_bits(np.array([0xDEADBEEF], np.uint32), 32) == bytes.fromhex("efbeadde")


def test_pack_refuses_out_of_range_and_unpack_refuses_garbage() -> None:
    with pytest.raises(CodecError, match="does not fit"):
        codec.pack_bits(np.array([0, 8], np.uint32), 3)
    with pytest.raises(CodecError, match="bytes"):
        codec.unpack_bits(b"\x00" * 5, 12, 2)
    with pytest.raises(CodecError, match="padding"):
        codec.unpack_bits(bytes([0xBC, 0x23, 0x1A, 0, 0, 0x80]), 12, 2)
    with pytest.raises(CodecError):
        codec.pack_bits(np.array([1.0]), 8)


@given(bits=st.integers(1, 32), m=st.integers(1, 200), seed=st.integers(0, 2**32))
@settings(max_examples=80, deadline=None)
def test_unpack_add_equals_unpack_then_add(bits: int, m: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    v = rng.integers(0, 1 << bits, m, dtype=np.uint64).astype(np.uint32)
    dtype = np.uint16 if bits <= 16 else np.uint32
    acc = rng.integers(0, np.iinfo(dtype).max, m, dtype=np.uint64).astype(dtype)
    expected = (acc.astype(np.uint64) + v) % (1 << (8 * acc.itemsize))
    codec.unpack_bits_add(codec.pack_bits(v, bits), bits, acc)
    np.testing.assert_array_equal(acc, expected.astype(dtype))


def test_unpack_add_crosses_chunks_and_refuses_before_touching_the_sum() -> None:
    m = packing.UNPACK_CHUNK * 2 + 13
    v = np.random.default_rng(1).integers(0, 1 << 11, m, dtype=np.uint64).astype(np.uint32)
    packed = bytearray(codec.pack_bits(v, 11))
    acc = np.zeros(m, np.uint16)
    codec.unpack_bits_add(bytes(packed), 11, acc)
    np.testing.assert_array_equal(acc, v)
    packed[-1] |= 0x80  # a padding bit of the last group
    with pytest.raises(CodecError, match="padding"):
        codec.unpack_bits_add(bytes(packed), 11, acc)
    np.testing.assert_array_equal(acc, v)  # untouched


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 12),
    bits=st.integers(2, 12),
    rotate=st.booleans(),
    keep=st.sampled_from([1.0, 0.5, 1 / 16]),
    cap=st.integers(1, 16),
    seed=st.integers(0, 2**32 - 1),
)
def test_honest_means_never_exceed_the_norm_bound(
    n: int, bits: int, rotate: bool, keep: float, cap: int, seed: int
) -> None:
    """Issue 17.6: every sum of clipped encodings (any norms, any weights, spiky or flat
    deltas) decodes within :func:`codec.mean_norm_bound`, with room to spare."""
    d = 300
    params = _params(
        bits=bits, rotate=rotate, keep_fraction=keep, max_clients=n, weight_cap=cap, clip_norm=0.7
    )
    rng = np.random.default_rng(seed)
    vecs = []
    for i in range(n):
        delta = rng.normal(size=d) * rng.choice([1e-3, 1.0, 100.0])
        if i % 3 == 0:
            delta[rng.integers(d)] = 1e3  # one spike: clamped without rotation
        vecs.append(codec.encode(delta, params, rng, num_examples=int(rng.integers(1, 2 * cap))).values)
    got = codec.decode_mean(codec.ring_sum(vecs, codec.ring_bits(params)), params, n, d)
    assert got.kept_norm <= got.bound
    assert np.isfinite(got.mean).all()


@pytest.mark.parametrize(("kind", "n"), [("random words", 10), ("every value at +R", 3)])
def test_a_hostile_input_in_a_secure_sum_is_refused_not_applied(kind: str, n: int) -> None:
    """Under secure aggregation the server sees only the sum: one device that sends random
    ring words, or every value at its maximum (4 C in the kept coordinates, so it outweighs
    the honest mean when the round is small), instead of a clipped encoding is caught there."""
    d = 4096
    params = _params(bits=8, rotate=True, keep_fraction=1.0, max_clients=n, weight_cap=16, clip_norm=1.0)
    k = codec.ring_bits(params)
    rng = np.random.default_rng(3)
    honest = [
        codec.encode(rng.normal(size=d) * 0.01, params, rng, num_examples=16).values for _ in range(n - 1)
    ]
    ok = codec.decode_mean(codec.ring_sum([*honest, honest[0]], k), params, n, d)
    assert ok.kept_norm < 0.7 * ok.bound
    bad = honest[0].copy()
    if kind == "random words":
        bad[:-1] = rng.integers(0, 1 << k, len(bad) - 1, dtype=np.uint64).astype(np.uint32)
    else:
        bad[:-1] = (1 << params.bits) - 1
    with pytest.raises(codec.NormBoundError, match="exceeds"):
        codec.decode_sum(codec.ring_sum([*honest, bad], k), params, n, d)
