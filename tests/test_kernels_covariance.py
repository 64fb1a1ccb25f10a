import os

import numpy as np
import pytest

from kernel_testing import compiled

from pycompress import kernels
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
    # float32 rows: the shifted column sums run in float32 inside the SYRK.
    mean_tol = 1e-6 if dtype == np.float32 else 1e-9
    np.testing.assert_allclose(a.mean, x.astype(np.float64).mean(0), rtol=mean_tol)


def test_backend_equals_reference_and_pearson():
    rng = np.random.default_rng(4)
    base = rng.normal(size=(500, 3))
    x = np.column_stack([base, base[:, 0] * 2 + 1, np.full(500, 3.0)])  # duplicate-ish + constant unit
    native, ref = compiled().CovarianceAccumulator(5), reference.CovarianceAccumulator(5)
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
        _ = acc.cov  # fewer than 2 rows
    with pytest.raises(ValueError):
        acc.merge(kernels.CovarianceAccumulator(3))


@pytest.mark.parametrize("impl", [kernels, reference], ids=["backend", "reference"])
def test_any_rows_and_layouts(impl):
    # One row at a time, fewer rows than d, strided and Fortran-ordered
    # blocks, other dtypes, empty blocks: all the same statistics.
    rng = np.random.default_rng(5)
    wide = (50.0 + rng.normal(size=(40, 70))).astype(np.float32)
    x = wide[:, 3:53]                       # row stride 70 > d = 50
    wide[30:40] = wide[30:40].astype(np.float16)  # exact in float16, the dtype they arrive in
    ref = reference.CovarianceAccumulator(50)
    ref.update(np.ascontiguousarray(x, dtype=np.float64))
    acc = impl.CovarianceAccumulator(50)
    for row in x[:5]:
        acc.update(row[None, :])             # one row
    acc.update(x[5:5])                       # no rows: no-op
    acc.update(x[5:17])                      # 12 rows < d
    acc.update(np.asfortranarray(x[17:30]))  # column-major
    acc.update(x[30:40].astype(np.float16))
    assert acc.count == 40
    np.testing.assert_allclose(acc.mean, ref.mean, rtol=1e-6)
    np.testing.assert_allclose(acc.cov, ref.cov, rtol=1e-5, atol=1e-6)
    every_other = impl.CovarianceAccumulator(50)
    every_other.update(wide[::2, 3:53])      # negative-free 2-row stride
    r2 = reference.CovarianceAccumulator(50)
    r2.update(np.ascontiguousarray(wide[::2, 3:53], dtype=np.float64))
    np.testing.assert_allclose(every_other.cov, r2.cov, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("pack,fold", [(7, 21), (64, 64), (5, 1000)])
def test_small_panels_and_folds_match(monkeypatch, dtype, pack, fold):
    # Force tiny SYRK panels and float64 folds (and so several threads, each
    # with its own partial scatter) on data whose mean drifts between folds.
    monkeypatch.setenv("PYCOMPRESS_COV_PACK_ROWS", str(pack))
    monkeypatch.setenv("PYCOMPRESS_COV_FOLD_ROWS", str(fold))
    rng = np.random.default_rng(6)
    x = np.concatenate([rng.normal(loc=300.0 * i, scale=1.0 + i, size=(333, 9)) for i in range(4)])
    x = x.astype(dtype)
    acc = kernels.CovarianceAccumulator(9)
    acc.update(x[:1000])
    acc.update(x[1000:])
    ref = exact_cov(x)
    tol = 1e-6 if dtype == np.float32 else 1e-11
    assert np.abs(acc.cov - ref).max() / np.abs(ref).max() < tol
    np.testing.assert_allclose(acc.mean, x.astype(np.float64).mean(0), rtol=tol)


@pytest.mark.parametrize("impl", [kernels, reference], ids=["backend", "reference"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_blocks_are_rejected_and_leave_the_state(impl, bad):
    rng = np.random.default_rng(7)
    acc = impl.CovarianceAccumulator(6)
    acc.update(rng.normal(size=(100, 6)).astype(np.float32))
    before = acc.cov.copy()
    block = rng.normal(size=(50, 6)).astype(np.float32)
    block[17, 4] = bad
    with pytest.raises(ValueError, match="NaN or infinity"):
        acc.update(block)
    assert acc.count == 100
    np.testing.assert_array_equal(acc.cov, before)


@pytest.mark.parametrize("impl", [kernels, reference], ids=["backend", "reference"])
def test_non_finite_first_block_leaves_the_accumulator_usable(impl):
    x = np.random.default_rng(10).normal(size=(30, 4))
    bad = x.copy()
    bad[3, 2] = np.nan
    acc = impl.CovarianceAccumulator(4)
    with pytest.raises(ValueError, match="NaN or infinity"):
        acc.update(bad)
    acc.update(x)
    np.testing.assert_allclose(acc.cov, exact_cov(x), rtol=1e-12)


def test_non_finite_after_a_merged_fold_makes_the_accumulator_refuse(monkeypatch):
    # A bad value past the first fold of a call: rows before it were already
    # merged, so the accumulator refuses further use instead of lying.
    monkeypatch.setenv("PYCOMPRESS_COV_PACK_ROWS", "8")
    monkeypatch.setenv("PYCOMPRESS_COV_FOLD_ROWS", "16")
    x = np.random.default_rng(8).normal(size=(200, 3))
    x[150, 1] = np.nan
    acc = kernels.CovarianceAccumulator(3)
    with pytest.raises(ValueError, match="NaN or infinity"):
        acc.update(x)
    with pytest.raises(ValueError, match="unusable"):
        _ = acc.cov
    with pytest.raises(ValueError, match="unusable"):
        acc.update(x[:10])


def test_large_mean_float32_within_1e6_at_benchmark_scale():
    # The issue-19 accuracy target on the benchmark's data, several folds.
    rng = np.random.default_rng(9)
    x = (1000.0 + 0.01 * rng.standard_normal((40000, 128))).astype(np.float32)
    acc = kernels.CovarianceAccumulator(128)
    for s in range(0, len(x), 8192):
        acc.update(x[s:s + 8192])
    ref = exact_cov(x)
    assert np.abs(acc.cov - ref).max() / np.abs(ref).max() < 1e-6
