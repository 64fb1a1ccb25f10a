"""The GP posterior and the fused acquisition kernel against closed forms."""

from __future__ import annotations

import numpy as np
import pytest

from kernel_testing import compiled

from pycompress import kernels
from pycompress.decisions.bo import GaussianProcess, Hyperparameters
from pycompress.decisions.bo.gp import NOISE_FLOOR, fit_hyperparameters
from pycompress.kernels import reference


def _random_posterior(rng, n, d):
    x = rng.random((n, d))
    ls = rng.uniform(0.2, 1.5, d)
    s, m = 1.3, 0.2
    a = reference.matern52(x, x, ls, s) + np.diag(rng.uniform(1e-5, 1e-2, n))
    chol = np.linalg.cholesky(a)
    y = rng.normal(size=n)
    beta = np.linalg.solve(chol, y - m)
    return x, ls, s, m, chol, beta


def test_matern52_reference_matches_the_formula():
    a, b = np.array([[0.1, 0.2]]), np.array([[0.4, 0.6]])
    ls = np.array([0.5, 2.0])
    r = np.sqrt((0.3 / 0.5) ** 2 + (0.4 / 2.0) ** 2)
    expected = 1.7 * (1 + np.sqrt(5) * r + 5 / 3 * r ** 2) * np.exp(-np.sqrt(5) * r)
    assert reference.matern52(a, b, ls, 1.7)[0, 0] == pytest.approx(expected, rel=1e-14)


# The compiled kernel's paths (csrc/kernels/gp_acquisition.cpp): "" the default
# (candidates in AVX-512 lanes where the CPU has it, else AVX2), "avx2" the
# AVX2 lanes on any AVX2 machine, "columns" the per-candidate path (also what
# runs with fewer candidates than observations). On a CPU without AVX2 all
# three run the portable path.
KERNEL_PATHS = ["", "avx2", "columns"]


@pytest.mark.parametrize("path", KERNEL_PATHS)
@pytest.mark.parametrize("n,d,m", [(1, 1, 3), (7, 3, 5), (40, 16, 1000), (300, 16, 200), (120, 4, 5000),
                                   (9, 2, 17)])
@pytest.mark.parametrize("threads", [0, 1])
def test_native_kernel_equals_reference(n, d, m, threads, path, monkeypatch):
    monkeypatch.setenv("PYCOMPRESS_GP_PATH", path)
    rng = np.random.default_rng(n * 1000 + d + m)
    x, ls, s, mean, chol, beta = _random_posterior(rng, n, d)
    cands = rng.random((m, d))
    cands[0] = x[0]  # a training point: var near the noise level
    inc = x[min(2, n - 1)]
    args = (cands, x, ls, s, mean, chol, beta, inc, 0.07)
    native = compiled().gp_acquisition(*args, threads=threads)
    ref = reference.gp_acquisition(*args)
    for got, want in zip(native, ref):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("path", KERNEL_PATHS)
def test_near_duplicates_and_far_candidates_equal_reference(path, monkeypatch):
    """Candidates at, next to (1e-12 .. 1e-6 in scaled units) and far from the observations.

    Next to an observation r^2 is ~1e-24 .. 1e-12 (distances expanded as
    ||c||^2 + ||x||^2 - 2 c.x would be rounding error there, negative without
    a clamp: NaN) and the posterior variance is near the noise level. Far
    away (r ~ 1e3) the exp underflows and the kernel must give k = 0.
    """
    monkeypatch.setenv("PYCOMPRESS_GP_PATH", path)
    rng = np.random.default_rng(11)
    n, d = 60, 16
    x, ls, s, mean, chol, beta = _random_posterior(rng, n, d)
    near = [x[i % 40] + eps * ls * rng.normal(size=d) for i, eps in enumerate(np.repeat([0.0, 1e-12, 1e-9, 1e-6], 20))]
    far = [x[0] + 1e3 * ls * rng.normal(size=d) for _ in range(5)]
    cands = np.array(near + far + list(rng.random((50, d))))
    # The incumbent is an observation but none of the near candidates' own:
    # next to the incumbent var + var(t^) - 2 cov cancels to ~1e-11 and z is
    # ill-conditioned in any implementation (the reference's own rounding).
    args = (cands, x, ls, s, mean, chol, beta, x[50], 0.07)
    native = kernels.gp_acquisition(*args)
    ref = reference.gp_acquisition(*args)
    for got, want in zip(native, ref):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-11)
    var = native[2]
    assert np.all(var[:20] < 1e-2 * s)                 # at observations: near the noise level
    np.testing.assert_allclose(var[80:85], s, rtol=1e-12)  # far away: the prior variance
    np.testing.assert_allclose(native[3][80:85], 0.0, atol=1e-12)


@pytest.mark.parametrize("path", KERNEL_PATHS)
def test_kernel_values_are_accurate_to_their_conditioning(path, monkeypatch):
    """k(c, t^) from 0 to r = 300 (exp down to 1e-290) against long double.

    With one observation of huge noise (L = 1e150) the posterior is the prior,
    so ``cov`` is the Matern value itself: this checks the vectorised exp and
    sqrt of every path. k's relative condition number in r^2 is ~a / 2
    (a = sqrt5 r), so the error allowed is a few ulps times (1 + a).
    """
    monkeypatch.setenv("PYCOMPRESS_GP_PATH", path)
    ls = np.array([0.5, 1.0, 2.0])
    r = np.concatenate([[0.0], np.geomspace(1e-10, 300, 2000)])
    cands = r[:, None] * ls / np.sqrt(3)
    x = np.zeros((1, 3))
    cov = kernels.gp_acquisition(cands, x, ls, 1.3, 0.0, np.array([[1e150]]), np.zeros(1), x[0], 0.0)[3]
    c = cands.astype(np.longdouble) / ls.astype(np.longdouble)
    a = np.sqrt(np.longdouble(5)) * np.sqrt((c * c).sum(1))
    exact = np.longdouble(1.3) * (1 + a + a * a / 3) * np.exp(-a)
    err = np.abs(cov - exact) / exact / (1 + a)
    assert float(err.max()) < 4 * np.finfo(np.float64).eps


def test_native_backend_is_in_use():
    assert kernels.BACKEND == "native", kernels.IMPORT_ERROR


def test_kernel_rejects_bad_shapes():
    rng = np.random.default_rng(0)
    x, ls, s, mean, chol, beta = _random_posterior(rng, 5, 2)
    with pytest.raises(ValueError, match="candidates"):
        kernels.gp_acquisition(rng.random((4, 3)), x, ls, s, mean, chol, beta, x[0], 0.0)
    with pytest.raises(ValueError, match="chol"):
        kernels.gp_acquisition(rng.random((4, 2)), x, ls, s, mean, chol[:4, :4], beta, x[0], 0.0)


def _closed_form(x, y, noise, hyper, points):
    """R&W 2.22-2.24 in standardized units, with a plain solve (no Cholesky), then y's units."""
    mean, std = y.mean(), y.std()
    ys = (y - mean) / std
    ns = np.maximum(noise / std ** 2, NOISE_FLOOR)
    ls, s, c = np.asarray(hyper.lengthscales), hyper.outputscale, hyper.constant
    a = reference.matern52(x, x, ls, s) + np.diag(ns)
    kx = reference.matern52(points, x, ls, s)
    mu = c + kx @ np.linalg.solve(a, ys - c)
    cov = reference.matern52(points, points, ls, s) - kx @ np.linalg.solve(a, kx.T)
    return mean + std * mu, cov * std ** 2


def test_gp_posterior_equals_closed_forms_and_gpytorch():
    import torch

    rng = np.random.default_rng(3)
    n, d = 25, 3
    x = rng.random((n, d))
    y = 5.0 + 3.0 * np.sin(4 * x[:, 0]) + x[:, 1] ** 2 + 0.05 * rng.normal(size=n)
    noise = rng.uniform(1e-4, 4e-3, n)
    hyper = Hyperparameters(constant=0.3, outputscale=1.7, lengthscales=[0.3, 0.8, 2.0])
    gp = GaussianProcess(x, y, noise, hyper)
    cands = rng.random((64, d))
    inc = x[4]
    z, mu, var, cov = gp.pac_scores(cands, inc, delta=0.1)

    mu_cf, cov_cf = _closed_form(x, y, noise, hyper, np.vstack([cands, inc]))
    np.testing.assert_allclose(mu, mu_cf[:-1], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(var, np.diag(cov_cf)[:-1], rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(cov, cov_cf[:-1, -1], rtol=1e-8, atol=1e-10)
    spread = np.diag(cov_cf)[:-1] + cov_cf[-1, -1] - 2 * cov_cf[:-1, -1]
    np.testing.assert_allclose(z, (mu_cf[:-1] - mu_cf[-1] - 0.1) / np.sqrt(spread), rtol=1e-7)

    # gpytorch's latent posterior from the same hyperparameters (standardized units).
    model = gp.gpytorch_model()
    with torch.no_grad():
        post = model(torch.as_tensor(np.vstack([cands[:5], inc]), dtype=torch.float64))
        g_mu = post.mean.numpy() * gp.y_std + gp.y_mean
        g_cov = post.covariance_matrix.numpy() * gp.y_std ** 2
    np.testing.assert_allclose(mu[:5], g_mu[:5], rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(var[:5], np.diag(g_cov)[:5], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(cov[:5], g_cov[:5, 5], rtol=1e-6, atol=1e-9)


def test_known_noise_is_used_per_observation():
    # Same point observed twice: a precise value and a noisy one. The posterior
    # follows the precise observation, and its variance is about the precise noise.
    x = np.array([[0.5], [0.5], [0.0], [1.0]])
    y = np.array([1.0, 3.0, 0.0, 0.0])
    noise = np.array([1e-4, 1.0, 1e-4, 1e-4])
    gp = GaussianProcess(x, y, noise, Hyperparameters(0.0, 1.0, [0.3]))
    _, mu, var, _ = gp.pac_scores(np.array([[0.5]]), np.array([0.0]), 0.0)
    assert mu[0] == pytest.approx(1.0 + 2.0 * 1e-4 / (1.0 + 1e-4), abs=2e-3)
    assert 0.5e-4 < var[0] < 1e-4


def test_ml2_improves_the_marginal_likelihood_and_matches_gpytorch():
    import gpytorch
    import torch

    rng = np.random.default_rng(5)
    x = rng.random((20, 2))
    y = np.sin(6 * x[:, 0]) + 0.2 * x[:, 1]
    ys = (y - y.mean()) / y.std()
    noise = np.full(20, 1e-3)
    start = Hyperparameters.default(2)
    hyper, lml = fit_hyperparameters(x, ys, noise, init=start, restarts=2, rng=np.random.default_rng(0))

    def gpytorch_lml(h):
        gp = GaussianProcess(x, ys * y.std() + y.mean(), noise * y.std() ** 2, h)
        model = gp.gpytorch_model()
        model.train()
        model.likelihood.train()
        mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
        with torch.no_grad():
            return float(mll(model(model.train_inputs[0]), model.train_targets))

    def numpy_lml(h):
        a = reference.matern52(x, x, np.array(h.lengthscales), h.outputscale) + np.diag(noise)
        r = ys - h.constant
        _, logdet = np.linalg.slogdet(a)
        return (-0.5 * r @ np.linalg.solve(a, r) - 0.5 * logdet - 10 * np.log(2 * np.pi)) / 20

    assert lml == pytest.approx(gpytorch_lml(hyper), rel=1e-8)
    assert lml == pytest.approx(numpy_lml(hyper), rel=1e-6)
    assert lml > numpy_lml(start) + 0.1
    # sin(6 x0) varies along x0 only: the fitted lengthscale of x1 is the longer one.
    assert hyper.lengthscales[0] < hyper.lengthscales[1]


def test_the_lengthscale_prior_keeps_unseen_variation_possible_and_its_gradient_is_exact(monkeypatch):
    """A few points whose values vary by about their noise in 6 dimensions: the likelihood alone
    says "flat along most of them" (lengthscales at the upper bound, a posterior that is sure far
    from every point); with the Gamma(3, 6) prior no lengthscale goes there."""
    from scipy.optimize import check_grad

    import pycompress.decisions.bo.gp as gp_module

    rng = np.random.default_rng(2)
    x = rng.random((15, 6))
    y = 0.3 * x[:, 0] + 0.05 * rng.normal(size=15)
    ys = (y - y.mean()) / y.std()
    noise = np.full(15, (0.05 / y.std()) ** 2)
    sq = (x.T[:, :, None] - x.T[:, None, :]) ** 2
    v = np.concatenate([[0.1, np.log(0.8)], np.log(rng.uniform(0.2, 2.0, 6))])
    assert check_grad(lambda t: gp_module._negative_log_posterior(t, x, sq, ys, noise)[0],
                      lambda t: gp_module._negative_log_posterior(t, x, sq, ys, noise)[1], v) < 1e-5

    with_prior, _ = fit_hyperparameters(x, ys, noise, restarts=2, rng=np.random.default_rng(0))
    monkeypatch.setattr(gp_module, "LENGTHSCALE_PRIOR", (1.0, 0.0))     # a flat prior: plain ML-II
    without, _ = fit_hyperparameters(x, ys, noise, restarts=2, rng=np.random.default_rng(0))
    assert sum(ls > 10 for ls in without.lengthscales) >= 3
    assert max(with_prior.lengthscales) < 3


def test_the_output_scales_posterior_width_matches_the_integrated_posterior_and_narrows_with_data():
    """``outputscale_log_sd`` (Laplace, at the fit) against the standard deviation of log s under the
    posterior itself, integrated on a grid (the other hyperparameters at their fitted values); and
    it narrows as more points pin the function's amplitude."""
    from pycompress.decisions.bo.gp import _negative_log_posterior

    rng = np.random.default_rng(3)

    def fitted(n):
        x = rng.random((n, 2))
        y = np.sin(5 * x[:, 0]) + 0.5 * np.cos(3 * x[:, 1]) + 0.05 * rng.normal(size=n)
        return GaussianProcess.fit(x, y, np.full(n, 0.05 ** 2), restarts=1, rng=np.random.default_rng(0))

    few, many = fitted(12), fitted(80)
    sd = many.outputscale_log_sd()
    h = many.hyper
    base = np.concatenate([[h.constant, np.log(h.outputscale)], np.log(h.lengthscales)])
    sq = (many.x.T[:, :, None] - many.x.T[:, None, :]) ** 2
    grid = base[1] + np.linspace(-6 * sd, 6 * sd, 401)
    log_p = np.array([-len(many.x) * _negative_log_posterior(np.r_[base[0], g, base[2:]], many.x, sq,
                                                               many.y_s, many.noise_s)[0] for g in grid])
    p = np.exp(log_p - log_p.max())
    mean = (grid * p).sum() / p.sum()
    integrated = np.sqrt(((grid - mean) ** 2 * p).sum() / p.sum())
    assert sd == pytest.approx(integrated, rel=0.15)
    assert few.outputscale_log_sd() > 1.3 * sd
