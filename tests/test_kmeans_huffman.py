"""1-D k-means and canonical Huffman kernels: native == numpy reference, and the properties each promises."""

import numpy as np
import pytest

from kernel_testing import compiled

import pycompress.kernels as kernels
from pycompress.kernels import reference

IMPLS = pytest.mark.parametrize("impl", [kernels, reference], ids=["backend", "reference"])


def heavy_tailed(n, seed=0, outliers=()):
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.standard_t(3, size=n - len(outliers)), outliers]).astype(np.float32)


# ----------------------------------------------------------------- k-means


@pytest.mark.parametrize("n, clusters, outliers", [
    (1, 4, ()), (7, 16, ()), (3, 256, ()), (1000, 2, ()), (5000, 17, ()),
    (20000, 256, ()), (30000, 64, (40.0, -60.0, 100.0)),
])
def test_kmeans_native_matches_reference_bit_for_bit(n, clusters, outliers):
    x = heavy_tailed(n, seed=n, outliers=outliers).reshape(-1, 1) if n > 1 else np.array([0.5], np.float32)
    native = compiled().kmeans1d(x, clusters)
    ref = reference.kmeans1d(x, clusters)
    np.testing.assert_array_equal(native[0], ref[0])
    np.testing.assert_array_equal(native[1], ref[1])
    assert native[2:] == ref[2:]
    assert native[1].shape == x.shape and native[1].dtype == np.uint8 and native[0].dtype == np.float32


@IMPLS
def test_kmeans_result_is_a_lloyd_fixed_point(impl):
    x = heavy_tailed(20000, seed=3, outliers=(25.0, -30.0))
    codebook, idx, iterations, converged = impl.kmeans1d(x, 32)
    assert converged and iterations < 10000
    assert np.all(np.diff(codebook) >= 0)
    # Every value sits in its nearest cluster ...
    nearest = np.abs(x[:, None].astype(np.float64) - codebook[None, :]).argmin(axis=1)
    np.testing.assert_allclose(codebook[nearest], codebook[idx], atol=1e-6)
    # ... and every centroid is the mean of its members.
    for k in range(32):
        members = x[idx == k].astype(np.float64)
        assert members.size > 0, "linear init left a cluster empty: re-seeding should have filled it"
        assert codebook[k] == pytest.approx(members.mean(), rel=1e-5, abs=1e-6)


@IMPLS
def test_kmeans_linear_initialization_is_kept_when_already_optimal(impl):
    # Four equally spaced values: c_k = lo + (hi - lo) k / 3 is already the optimum.
    x = np.tile(np.array([-3.0, -1.0, 1.0, 3.0], np.float32), 50)
    codebook, idx, iterations, converged = impl.kmeans1d(x, 4)
    np.testing.assert_array_equal(codebook, [-3.0, -1.0, 1.0, 3.0])
    np.testing.assert_array_equal(codebook[idx], x)
    assert converged and iterations == 1


@IMPLS
def test_kmeans_reseeding_beats_plain_lloyd_on_long_tails(impl):
    # Linear init over [-60, 100] leaves most of 64 clusters in the empty tails.
    x = heavy_tailed(50000, seed=5, outliers=(-60.0, 100.0))
    codebook, idx, _, _ = impl.kmeans1d(x, 64)
    assert np.unique(idx).size == 64
    # Plain Lloyd from the same init (no re-seeding) ends with 29 clusters in
    # use and a mean squared error of 0.059; re-seeded: 0.0072.
    assert np.mean((codebook[idx] - x) ** 2) < 0.02


@IMPLS
def test_kmeans_fewer_distinct_values_than_clusters(impl):
    x = np.repeat(np.array([1.0, 2.0, 5.0], np.float32), 10)
    codebook, idx, _, converged = impl.kmeans1d(x, 8)
    assert converged
    np.testing.assert_array_equal(codebook[idx], x)
    constant = np.full(10, 0.25, np.float32)
    codebook, idx, _, _ = impl.kmeans1d(constant, 4)
    np.testing.assert_array_equal(codebook[idx], constant)


@IMPLS
@pytest.mark.parametrize("values, clusters, message", [
    (np.zeros(0, np.float32), 4, "at least one"),
    (np.ones(4, np.float32), 0, "clusters"),
    (np.ones(4, np.float32), 257, "clusters"),
    (np.array([1.0, np.nan], np.float32), 4, "finite"),
    (np.array([1.0, np.inf], np.float32), 4, "finite"),
])
def test_kmeans_rejects_bad_input(impl, values, clusters, message):
    with pytest.raises(ValueError, match=message):
        impl.kmeans1d(values, clusters)


# ----------------------------------------------------------------- Huffman


def encode(impl, symbols):
    lengths = impl.huffman_code_lengths(np.bincount(symbols, minlength=256))
    return np.asarray(lengths), impl.huffman_encode(symbols, lengths)


def entropy(symbols):
    p = np.bincount(symbols, minlength=256) / symbols.size
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def streams():
    rng = np.random.default_rng(0)
    return {
        "uniform": rng.integers(0, 256, 20000).astype(np.uint8),
        "skewed": np.minimum(rng.geometric(0.2, 20000) - 1, 255).astype(np.uint8),
        "gaussian": np.clip(np.round(rng.normal(128, 12, 20000)), 0, 255).astype(np.uint8),
        "one symbol": np.full(777, 42, np.uint8),
        "two symbols": rng.choice(np.array([3, 200], np.uint8), 1001, p=[0.99, 0.01]),
        "single": np.array([9], np.uint8),
        "empty": np.zeros(0, np.uint8),
    }


@pytest.mark.parametrize("name", list(streams()))
def test_huffman_round_trip_and_native_matches_reference(name):
    symbols = streams()[name]
    lengths_ref, payload_ref = encode(reference, symbols)
    np.testing.assert_array_equal(reference.huffman_decode(payload_ref, lengths_ref, symbols.size), symbols)
    native = compiled()       # the rest compares the compiled kernels with the reference
    lengths_native, payload_native = encode(native, symbols)
    np.testing.assert_array_equal(lengths_native, lengths_ref)
    assert payload_native == payload_ref
    for impl in (native, reference):
        decoded = impl.huffman_decode(payload_native, lengths_native, symbols.size)
        assert decoded.dtype == np.uint8
        np.testing.assert_array_equal(decoded, symbols)
    assert len(payload_native) == (int((lengths_native[symbols].astype(np.int64)).sum()) + 7) // 8


def test_huffman_canonical_code_by_hand():
    # counts a:5 b:2 c:1 d:1 -> lengths 1, 2, 3, 3 -> codes 0, 10, 110, 111 (MSB first).
    counts = np.zeros(256, np.int64)
    counts[:4] = [5, 2, 1, 1]
    for impl in (kernels, reference):
        lengths = np.asarray(impl.huffman_code_lengths(counts))
        np.testing.assert_array_equal(lengths[:4], [1, 2, 3, 3])
        assert not lengths[4:].any()
        # 0 10 110 111 -> 01011011 1(0000000)
        assert impl.huffman_encode(np.array([0, 1, 2, 3], np.uint8), lengths) == bytes([0x5B, 0x80])


def test_huffman_bits_per_symbol_within_one_percent_of_entropy_plus_table():
    # Large skewed streams: index streams of weight sharing look like this
    # (a peaked, long-tailed histogram over 2^b symbols).
    rng = np.random.default_rng(1)
    for symbols in (np.clip(np.round(rng.laplace(128, 10, 1_000_000)), 0, 255).astype(np.uint8),
                    np.clip(np.round(rng.normal(32, 6, 1_000_000)), 0, 63).astype(np.uint8)):
        _, payload = encode(kernels, symbols)
        bits = len(payload) * 8 / symbols.size
        table = 256 * 8 / symbols.size  # the code lengths stored with the stream
        assert entropy(symbols) <= bits <= 1.01 * entropy(symbols) + table


@pytest.mark.parametrize("impl", [kernels, reference], ids=["backend", "reference"])
def test_huffman_decode_refuses_truncated_and_invalid_input(impl):
    symbols = streams()["gaussian"]
    lengths, payload = encode(impl, symbols)
    for cut in (0, 1, len(payload) // 2, len(payload) - 1):
        with pytest.raises(ValueError, match="truncated"):
            impl.huffman_decode(payload[:cut], lengths, symbols.size)
    bad = lengths.copy()
    bad[:8] = 1  # eight 1-bit codes: not a prefix code
    with pytest.raises(ValueError, match="over-subscribe"):
        impl.huffman_decode(payload, bad, symbols.size)
    with pytest.raises(ValueError):
        impl.huffman_decode(payload, np.full(256, 60, np.uint8), 10)  # longer than the 57-bit limit
    # An incomplete code (one symbol, code '0'): a '1' bit is no codeword.
    single = np.zeros(256, np.uint8)
    single[7] = 1
    with pytest.raises(ValueError, match="invalid codeword"):
        impl.huffman_decode(b"\xff", single, 3)
    # A forged huge count is refused before anything is allocated.
    with pytest.raises(ValueError, match="truncated"):
        impl.huffman_decode(payload, lengths, 10**15)


def test_huffman_encode_refuses_symbols_without_code():
    lengths = np.zeros(256, np.uint8)
    lengths[0] = 1
    for impl in (kernels, reference):
        with pytest.raises(ValueError, match="no code"):
            impl.huffman_encode(np.array([0, 1], np.uint8), lengths)
