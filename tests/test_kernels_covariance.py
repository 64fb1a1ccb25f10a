import os

import numpy as np
import pytest

import pycompress.kernels as kernels
from pycompress.kernels import reference


def test_native_backend_in_ci():
    # CI builds the extension: a silent fallback to numpy must fail the run.
    if os.environ.get("CI"):
        assert kernels.BACKEND == "native", kernels.IMPORT_ERROR


def exact_cov(x):
    return np.cov(x.astype(np.float64), rowvar=False)


@pytest.mark.parametrize("impl", [kernels, reference], ids=["backend", "reference"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_random_data_matches_numpy(impl, dtype):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3000, 37)).astype(dtype)
    acc = impl.CovarianceAccumulator(37)
    acc.update(x)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    assert acc.count == 3000
    np.testing.assert_allclose(acc.mean, x.astype(np.float64).mean(0), rtol=tol, atol=tol)
    np.testing.assert_allclose(acc.cov, exact_cov(x), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_large_mean_keeps_digits_where_naive_formula_fails(dtype):
    # Max-pooled ReLU responses: a large mean against a small spread.
    rng = np.random.default_rng(2)
    x = (1000.0 + 0.01 * rng.normal(size=(20000, 16))).astype(dtype)
    ref = exact_cov(x)
    acc = kernels.CovarianceAccumulator(16)
    for block in np.array_split(x, 7):
        acc.update(block)
    err = np.abs(acc.cov - ref).max() / np.abs(ref).max()
    # The raw-moment formula in the input precision loses everything here.
    xs = x.astype(dtype)
    naive = (xs.T @ xs - len(xs) * np.outer(xs.mean(0), xs.mean(0))) / (len(xs) - 1)
    naive_err = np.abs(naive - ref).max() / np.abs(ref).max()
    assert err < (1e-5 if dtype == np.float32 else 1e-10)
    assert naive_err > 100 * err


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_many_blocks_equal_one_block_and_merge(dtype):
    rng = np.random.default_rng(3)
    # Non-stationary blocks (shifting means) exercise the exact-centring fallback.
    x = np.concatenate([rng.normal(loc=i * 50.0, size=(997, 300)) for i in range(6)]).astype(dtype)
    one = kernels.CovarianceAccumulator(300)
    one.update(x)
    many = kernels.CovarianceAccumulator(300)
    for block in np.array_split(x, 41):
        many.update(block)
    a, b = kernels.CovarianceAccumulator(300), kernels.CovarianceAccumulator(300)
    a.update(x[:2500])
    b.update(x[2500:])
    a.merge(b)
    ref = exact_cov(x)
    scale = np.abs(ref).max()
    tol = 1e-5 if dtype == np.float32 else 1e-11
    for acc in (one, many, a):
        assert acc.count == len(x)
        assert np.abs(acc.cov - ref).max() / scale < tol
    np.testing.assert_allclose(a.mean, x.astype(np.float64).mean(0), rtol=1e-9)


def test_backend_equals_reference_and_pearson():
    rng = np.random.default_rng(4)
    base = rng.normal(size=(500, 3))
    x = np.column_stack([base, base[:, 0] * 2 + 1, np.full(500, 3.0)])  # duplicate-ish + constant unit
    native, ref = kernels.CovarianceAccumulator(5), reference.CovarianceAccumulator(5)
    for block in np.array_split(x, 3):
        native.update(block)
        ref.update(block)
    np.testing.assert_allclose(native.cov, ref.cov, rtol=1e-10, atol=1e-12)
    corr = native.correlation(1e-8)
    np.testing.assert_allclose(corr, ref.correlation(1e-8), rtol=1e-9, atol=1e-12)
    assert corr[0, 3] == pytest.approx(1.0)
    assert np.all(corr[4] == 0.0)  # constant unit: floored denominator, no NaN


def test_bad_blocks_are_rejected():
    acc = kernels.CovarianceAccumulator(4)
    with pytest.raises(ValueError):
        acc.update(np.zeros((3, 5)))
    with pytest.raises(ValueError):
        acc.cov  # fewer than 2 rows
    with pytest.raises(ValueError):
        acc.merge(kernels.CovarianceAccumulator(3))
