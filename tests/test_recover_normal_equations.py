import numpy as np
import pytest

from pycompress.recover import LayerStatistics


def data(n=4000, d_in=12, d_out=7, seed=0, noise=0.1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d_in)) * rng.uniform(0.5, 2, d_in) + 3.0
    w = rng.normal(size=(d_in, d_out))
    y = x @ w + 0.5 + noise * rng.normal(size=(n, d_out))
    return x, y


def test_ridge_matches_lstsq_and_error_is_exact():
    x, y = data()
    stats = LayerStatistics(12, 7)
    for xb, yb in zip(np.array_split(x, 5), np.array_split(y, 5)):
        stats.update(xb, yb)
    w, b = stats.ridge(lam=0.0)
    xa = np.column_stack([x, np.ones(len(x))])
    ref = np.linalg.lstsq(xa, y, rcond=None)[0]
    np.testing.assert_allclose(w, ref[:-1], atol=1e-8)
    np.testing.assert_allclose(b, ref[-1], atol=1e-8)
    for ww, bb in ((w, b), (w * 0.9, b + 0.1)):
        direct = np.mean(np.sum((y - x @ ww - bb) ** 2, axis=1))
        assert stats.error(ww, bb) == pytest.approx(direct, rel=1e-9)


def test_reduced_rank_is_optimal_and_beats_truncated_svd():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5000, 10)) * np.array([5, 4, 3, 1, 1, 1, .2, .2, .1, .1])  # anisotropic inputs
    w_true = rng.normal(size=(10, 8))
    y = x @ w_true
    stats = LayerStatistics(10, 8)
    stats.update(x, y)
    errors = []
    for k in range(1, 9):
        a, bf, bias = stats.reduced_rank(k, lam=0.0)
        assert a.shape == (10, k) and bf.shape == (k, 8)
        err = stats.error(a @ bf, bias)
        errors.append(err)
        # Weight-only truncated SVD of the true map at the same rank: never better on the data.
        u, s, vt = np.linalg.svd(w_true, full_matrices=False)
        w_svd = (u[:, :k] * s[:k]) @ vt[:k]
        assert err <= stats.error(w_svd, np.zeros(8)) + 1e-9
    assert all(e1 >= e2 - 1e-9 for e1, e2 in zip(errors, errors[1:]))
    assert errors[-1] < 1e-8


def test_shape_checks():
    stats = LayerStatistics(3, 2)
    with pytest.raises(ValueError):
        stats.update(np.zeros((4, 3)), np.zeros((5, 2)))
    stats.update(np.random.default_rng(0).normal(size=(10, 3)), np.zeros((10, 2)))
    with pytest.raises(ValueError):
        stats.reduced_rank(3)


def test_top_eigenvectors_warm_started_span_the_exact_top_subspace():
    """The cross-validation sweep's warm-started subspace iteration gives the exact top-K
    subspace (projector), from a start at a nearby matrix and from a poor start."""
    from pycompress.recover.normal_equations import top_eigenvectors

    rng = np.random.default_rng(3)
    n, k = 120, 10
    basis, _ = np.linalg.qr(rng.standard_normal((n, n)))
    spectrum = np.geomspace(1e3, 1e-3, n)
    matrix = (basis * spectrum) @ basis.T
    exact = top_eigenvectors(matrix, k)
    assert np.allclose(exact, basis[:, :k] * np.sign(np.sum(exact * basis[:, :k], axis=0)), atol=1e-8)
    nearby = (basis * (spectrum * (1 + 0.05 * rng.random(n)))) @ basis.T
    for start in (top_eigenvectors(nearby, k), rng.standard_normal((n, k))):
        warm = top_eigenvectors(matrix, k, start)
        assert np.allclose(warm @ warm.T, exact @ exact.T, atol=1e-6)
        # largest first, like the exact answer (the factor's column order)
        assert np.all(np.diff(np.einsum("ij,jk,ki->i", warm.T, matrix, warm)) < 0)


def test_top_eigenvectors_falls_back_to_the_full_decomposition_without_a_gap():
    """A flat spectrum (no gap after K: subspace iteration cannot converge) still gets the
    exact answer through the fallback."""
    from pycompress.recover.normal_equations import top_eigenvectors

    rng = np.random.default_rng(4)
    n, k = 60, 5
    basis, _ = np.linalg.qr(rng.standard_normal((n, n)))
    spectrum = np.concatenate([np.linspace(10, 9, k), np.linspace(8.99, 8.9, n - k)])
    matrix = (basis * spectrum) @ basis.T
    warm = top_eigenvectors(matrix, k, rng.standard_normal((n, k)), max_iter=3)
    exact = top_eigenvectors(matrix, k)
    assert np.allclose(warm @ warm.T, exact @ exact.T, atol=1e-8)
