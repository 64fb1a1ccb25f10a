"""The surrogate: a GP with known per-observation noise (ALGORITHMS.md 3.2).

Model, in float64 throughout: constant mean ``m``, covariance
``s * Matern52(r)`` with ``r = ||(a - b) / l||`` (one lengthscale per
dimension), and the *known* noise ``Sigma_n = diag(var_j)`` of each
observation (the U-statistic variance; gpytorch's FixedNoiseGaussianLikelihood,
no extra learned noise). ``y`` is standardized (``(y - mean) / std``) and the
variances are scaled by ``1 / std^2`` with it. Hyperparameters ``m, s, l`` by
maximum marginal likelihood (ML-II): closed-form likelihood and gradient in
numpy, L-BFGS-B, from the previous solution (warm start) and a few random
restarts; the best one wins. gpytorch defines the same model (``gpytorch_model``,
for tests and benchmarks) but is not on the search's path.

Prediction never goes through gpytorch: with ``A = K + Sigma_n = L L^T`` and
``beta = L^-1 (y - m)`` the latent posterior is (R&W 2.22-2.24)
``mu(t) = m + k(t)^T A^-1 (y - m)``, ``var(t) = s - k(t)^T A^-1 k(t)``,
``cov(a, b) = k(a, b) - k(a)^T A^-1 k(b)``, scored for many candidates at
once by the compiled kernel ``pycompress.kernels.gp_acquisition``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.linalg import cho_factor, solve_triangular

from pycompress.decisions.bo.acquisition import Posterior
from pycompress.decisions.bo.threads import single_threaded
from pycompress.kernels import gp_acquisition
from pycompress.kernels import matern52

# Search box for ML-II, in units of the unit cube / of standardized y. The
# lower lengthscale bound keeps the GP from explaining each point alone.
LENGTHSCALE_BOUNDS = (0.01, 20.0)
OUTPUTSCALE_BOUNDS = (0.01, 100.0)
# Noise variances (standardized units) are floored here, explicitly, so that the
# fitted and the predicting model agree. Not gpytorch's 1e-6: with exact
# observations (an estimate on the whole pool) and a wide spread of J (std(y)
# hundreds of times delta) a floor of 1e-6 std^2 is a noise of 0.1% of std(y),
# far above delta, and no certificate could ever be reached. Cholesky adds
# jitter only if it must (``_cholesky``).
NOISE_FLOOR = 1e-10
# Gamma(3, 6) prior on each lengthscale (mode 1/3 of the cube, BoTorch's classic default): the
# hyperparameters are the posterior mode (MAP), not the likelihood's maximum. With a few points in
# 9 dimensions whose values vary by about their noise, ML-II explained them with lengthscales at the
# upper bound in most dimensions ("nothing changes along them") and certified early answers 0.05-0.08
# below the best (bench_certificate, digits CNN, 2 of 17); the prior makes a dimension flat only
# where the data show it.
LENGTHSCALE_PRIOR = (3.0, 6.0)   # (shape, rate)
# Gamma(2, 0.15) on the output scale (standardized units; BoTorch's classic default): where the
# observations' noise is as large as their spread (a design at m = 50 whose quality varies by about
# its noise), the likelihood alone puts the output scale at its lower bound ("all of it is noise, the
# function is flat") and the posterior is sure of every unvisited point; a certified digits CNN run
# stopped 0.08 below the best that way.
OUTPUTSCALE_PRIOR = (2.0, 0.15)


@dataclass
class Hyperparameters:
    """GP hyperparameters in standardized units: constant mean, output scale, lengthscales (d,)."""

    constant: float
    outputscale: float
    lengthscales: list[float]

    def to_dict(self) -> dict[str, Any]:
        return {"constant": self.constant, "outputscale": self.outputscale, "lengthscales": list(self.lengthscales)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Hyperparameters":
        return cls(float(data["constant"]), float(data["outputscale"]), [float(v) for v in data["lengthscales"]])

    @classmethod
    def default(cls, d: int) -> "Hyperparameters":
        return cls(0.0, 1.0, [0.5] * d)


def standardization(y: np.ndarray) -> tuple[float, float]:
    """Mean and std of y (std 1 when y is constant, so nothing divides by 0)."""
    mean = float(np.mean(y))
    std = float(np.std(y))
    return mean, std if std > 1e-12 * max(1.0, abs(mean)) else 1.0


def _gpytorch_model(x: np.ndarray, y_s: np.ndarray, noise_s: np.ndarray, hyper: Hyperparameters | None = None):
    """A float64 gpytorch ExactGP (constant mean, ScaleKernel(Matern 5/2 ARD), fixed noise)."""
    import gpytorch
    import torch

    class _ExactGP(gpytorch.models.ExactGP):
        def __init__(self, train_x, train_y, likelihood, d):
            super().__init__(train_x, train_y, likelihood)
            self.mean_module = gpytorch.means.ConstantMean()
            self.covar_module = gpytorch.kernels.ScaleKernel(
                gpytorch.kernels.MaternKernel(
                    nu=2.5, ard_num_dims=d,
                    lengthscale_constraint=gpytorch.constraints.Interval(*LENGTHSCALE_BOUNDS)),
                outputscale_constraint=gpytorch.constraints.Interval(*OUTPUTSCALE_BOUNDS))

        def forward(self, t):
            return gpytorch.distributions.MultivariateNormal(self.mean_module(t), self.covar_module(t))

    tx = torch.as_tensor(x, dtype=torch.float64)
    ty = torch.as_tensor(y_s, dtype=torch.float64)
    likelihood = gpytorch.likelihoods.FixedNoiseGaussianLikelihood(
        noise=torch.as_tensor(noise_s, dtype=torch.float64), learn_additional_noise=False)
    model = _ExactGP(tx, ty, likelihood, x.shape[1]).double()
    likelihood.double()
    if hyper is not None:
        _set_hyperparameters(model, hyper)
    return model, likelihood


def _set_hyperparameters(model, hyper: Hyperparameters) -> None:
    import torch

    lo, hi = LENGTHSCALE_BOUNDS
    ls = np.clip(np.asarray(hyper.lengthscales, np.float64), lo * (1 + 1e-9), hi * (1 - 1e-9))
    os_ = float(np.clip(hyper.outputscale, OUTPUTSCALE_BOUNDS[0] * (1 + 1e-9), OUTPUTSCALE_BOUNDS[1] * (1 - 1e-9)))
    model.mean_module.constant = torch.tensor(float(hyper.constant), dtype=torch.float64)
    model.covar_module.outputscale = torch.tensor(os_, dtype=torch.float64)
    model.covar_module.base_kernel.lengthscale = torch.as_tensor(ls, dtype=torch.float64).reshape(1, -1)


def _negative_lml(vector: np.ndarray, x: np.ndarray, sq: np.ndarray, y_s: np.ndarray,
                  noise_s: np.ndarray) -> tuple[float, np.ndarray]:
    """Negative log marginal likelihood (per observation) and its gradient in
    ``(constant, log outputscale, log lengthscales)``, closed form (R&W 5.9).

    ``sq`` is (d, n, n): the squared coordinate differences, computed once per fit.
    """
    n = x.shape[0]
    constant, s = vector[0], math.exp(vector[1])
    inv_l2 = np.exp(-2.0 * vector[2:])
    r2 = np.tensordot(inv_l2, sq, axes=1)
    r = np.sqrt(np.maximum(r2, 0.0))
    e = np.exp(-math.sqrt(5.0) * r)
    k = s * (1.0 + math.sqrt(5.0) * r + (5.0 / 3.0) * r2) * e
    a = k + np.diag(noise_s)
    try:
        chol = np.linalg.cholesky(a)
    except np.linalg.LinAlgError:  # a non-PSD corner of the box: tell L-BFGS-B to step back
        return 1e10, np.zeros_like(vector)
    resid = y_s - constant
    alpha = solve_triangular(chol.T, solve_triangular(chol, resid, lower=True), lower=False)
    value = 0.5 * float(resid @ alpha) + float(np.log(np.diag(chol)).sum()) + 0.5 * n * math.log(2 * math.pi)
    inv_a = solve_triangular(chol.T, solve_triangular(chol, np.eye(n), lower=True), lower=False)
    w = np.outer(alpha, alpha) - inv_a
    grad = np.empty_like(vector)
    grad[0] = -float(alpha.sum())
    grad[1] = -0.5 * float((w * k).sum())
    # dk / dlog l_i = 5/3 s (1 + sqrt5 r) exp(-sqrt5 r) (a_i - b_i)^2 / l_i^2
    g = w * ((5.0 / 3.0) * s * (1.0 + math.sqrt(5.0) * r) * e)
    grad[2:] = -0.5 * inv_l2 * np.tensordot(sq, g, axes=([1, 2], [0, 1]))
    if not math.isfinite(value) or not np.all(np.isfinite(grad)):
        return 1e10, np.zeros_like(vector)
    return value / n, grad / n


def _negative_log_posterior(vector: np.ndarray, x: np.ndarray, sq: np.ndarray, y_s: np.ndarray,
                            noise_s: np.ndarray) -> tuple[float, np.ndarray]:
    """``_negative_lml`` plus the priors' ``-log p(l) - log p(s)`` (per observation, as gpytorch adds a
    prior: on the value itself, no Jacobian of the log parametrization)."""
    value, grad = _negative_lml(vector, x, sq, y_s, noise_s)
    if value >= 1e10:
        return value, grad
    n = x.shape[0]
    grad = grad.copy()
    for index, (shape, rate) in ((slice(2, None), LENGTHSCALE_PRIOR), (slice(1, 2), OUTPUTSCALE_PRIOR)):
        log_v = vector[index]
        value += float((-(shape - 1.0) * log_v + rate * np.exp(log_v)).sum()) / n
        grad[index] += (-(shape - 1.0) + rate * np.exp(log_v)) / n
    return value, grad


def fit_hyperparameters(x: np.ndarray, y_s: np.ndarray, noise_s: np.ndarray, *, init: Hyperparameters | None = None,
                        restarts: int = 2, rng: np.random.Generator | None = None,
                        max_iter: int = 200) -> tuple[Hyperparameters, float]:
    """ML-II: maximize the exact log marginal likelihood over (m, s, l), times the lengthscale
    and output scale priors (``LENGTHSCALE_PRIOR``, ``OUTPUTSCALE_PRIOR``: the posterior's mode, MAP).

    Starts from ``init`` (or defaults) and ``restarts`` random points (log-
    uniform lengthscales in [0.05, 2], output scales in [0.3, 3]) drawn from
    ``rng``; L-BFGS-B in ``(m, log s, log l)`` within the bounds, with the
    closed-form gradient. Returns the best hyperparameters and their
    log marginal likelihood per observation (what gpytorch's
    ``ExactMarginalLogLikelihood`` reports for the same model; the tests
    compare). Numpy, not gpytorch autograd: ~20x faster per fit at n = 100
    (tools/bench_search.py prints it), same optimum.
    """
    from scipy.optimize import minimize

    x = np.asarray(x, np.float64)
    y_s = np.asarray(y_s, np.float64).ravel()
    noise_s = np.maximum(np.asarray(noise_s, np.float64).ravel(), NOISE_FLOOR)
    d = x.shape[1]
    rng = rng or np.random.default_rng(0)
    starts = [init or Hyperparameters.default(d)]
    for _ in range(restarts):
        starts.append(Hyperparameters(0.0, float(np.exp(rng.uniform(np.log(0.3), np.log(3.0)))),
                                      list(np.exp(rng.uniform(np.log(0.05), np.log(2.0), size=d)))))
    sq = (x.T[:, :, None] - x.T[:, None, :]) ** 2
    # Strictly inside the box (as the previous gpytorch constraints were): the
    # bound itself is never returned.
    lo_l, hi_l = (math.log(b) for b in LENGTHSCALE_BOUNDS)
    lo_s, hi_s = (math.log(b) for b in OUTPUTSCALE_BOUNDS)
    eps = 1e-9
    bounds = [(None, None), (lo_s + eps, hi_s - eps)] + [(lo_l + eps, hi_l - eps)] * d

    def pack(h: Hyperparameters) -> np.ndarray:
        v = np.concatenate([[h.constant, math.log(h.outputscale)], np.log(np.asarray(h.lengthscales, np.float64))])
        return np.clip(v, [b[0] if b[0] is not None else -np.inf for b in bounds],
                       [b[1] if b[1] is not None else np.inf for b in bounds])

    best: tuple[float, np.ndarray] | None = None
    with single_threaded():
        for start in starts:
            result = minimize(_negative_log_posterior, pack(start), args=(x, sq, y_s, noise_s), jac=True,
                              method="L-BFGS-B", bounds=bounds,
                              options={"maxiter": max_iter, "ftol": 1e-10, "gtol": 1e-6})
            value, _ = _negative_log_posterior(result.x, x, sq, y_s, noise_s)
            if best is None or value < best[0]:
                best = (value, result.x)
    assert best is not None
    # Rounded (1e-4 in the constant and in log scale / lengthscales; far below what changes the
    # model): numpy's SIMD sums can differ in their last bits between processes and L-BFGS-B
    # amplifies them; rounding makes a resumed search fit the same GP in all but boundary cases.
    v = np.round(best[1], 4)
    value, _ = _negative_lml(v, x, sq, y_s, noise_s)
    return Hyperparameters(float(v[0]), float(math.exp(v[1])), [float(math.exp(t)) for t in v[2:]]), -value


def _cholesky_noise(k: np.ndarray, noise_s: np.ndarray) -> np.ndarray:
    """``noise_s``, raised (x100 per try, as jitter) until ``K + diag(noise)`` has a Cholesky factor."""
    jitter = 0.0
    for _ in range(8):
        noise = np.maximum(noise_s, jitter)
        try:
            np.linalg.cholesky(k + np.diag(noise))
            return noise
        except np.linalg.LinAlgError:
            jitter = max(jitter * 100.0, NOISE_FLOOR * 100.0)
    return noise


class GaussianProcess(Posterior):
    """A fitted GP over observations ``x`` (n, d), ``y`` (n,) with noise variances (n,).

    All public quantities are in the units of ``y``; internally standardized.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, noise_var: np.ndarray, hyper: Hyperparameters,
                 *, log_marginal_likelihood: float | None = None):
        self.x = np.ascontiguousarray(x, dtype=np.float64)
        self.y = np.asarray(y, np.float64).ravel()
        self.noise_var = np.asarray(noise_var, np.float64).ravel()
        if not (len(self.x) == len(self.y) == len(self.noise_var)):
            raise ValueError("x, y and noise_var must have the same number of observations")
        self.hyper = hyper
        self.log_marginal_likelihood = log_marginal_likelihood
        self.y_mean, self.y_std = standardization(self.y)
        self.y_s = (self.y - self.y_mean) / self.y_std
        self.noise_s = np.maximum(self.noise_var / self.y_std ** 2, NOISE_FLOOR)
        self.lengthscales = np.asarray(hyper.lengthscales, np.float64)
        k = matern52(self.x, self.x, self.lengthscales, hyper.outputscale)
        self.noise_s = _cholesky_noise(k, self.noise_s)
        a = k + np.diag(self.noise_s)
        self.chol = np.ascontiguousarray(np.tril(cho_factor(a, lower=True)[0]))
        self.beta = solve_triangular(self.chol, self.y_s - hyper.constant, lower=True)

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, noise_var: np.ndarray, *, init: Hyperparameters | None = None,
            restarts: int = 2, rng: np.random.Generator | None = None, max_iter: int = 200) -> "GaussianProcess":
        x = np.asarray(x, np.float64)
        y = np.asarray(y, np.float64).ravel()
        mean, std = standardization(y)
        noise_s = np.maximum(np.asarray(noise_var, np.float64) / std ** 2, NOISE_FLOOR)
        hyper, lml = fit_hyperparameters(x, (y - mean) / std, noise_s, init=init, restarts=restarts, rng=rng,
                                         max_iter=max_iter)
        return cls(x, y, noise_var, hyper, log_marginal_likelihood=lml)

    def outputscale_log_sd(self) -> float:
        """The posterior standard deviation of ``log outputscale`` (Laplace, the other hyperparameters
        held at their fitted values): ``1 / sqrt(-d^2 log p / d(log s)^2)`` at the fit, by a central
        difference of the closed-form gradient. ``inf`` where the curvature is not positive.

        How well the data pin the function's amplitude: wide from a few points whose spread is about
        their noise, narrow from many points that vary well above it (about like ``1/sqrt(n)``, the prior aside).
        """
        h = self.hyper
        vector = np.concatenate([[h.constant, math.log(h.outputscale)], np.log(self.lengthscales)])
        sq = (self.x.T[:, :, None] - self.x.T[:, None, :]) ** 2
        n, step = len(self.x), 1e-3

        def slope(shift: float) -> float:
            v = vector.copy()
            v[1] += shift
            value, grad = _negative_log_posterior(v, self.x, sq, self.y_s, self.noise_s)
            return math.nan if value >= 1e10 else float(grad[1]) * n

        with single_threaded():
            curvature = (slope(step) - slope(-step)) / (2 * step)
        return 1.0 / math.sqrt(curvature) if curvature > 0 else math.inf

    # -- posterior -------------------------------------------------------
    def pac_scores(self, candidates: np.ndarray, incumbent: np.ndarray, delta: float,
                   var_floor: float = 1e-12) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(z, mu, var, cov) of candidates (M, d) against the incumbent (d,), in units of y.

        ``var_floor`` guards the denominator, relative to the output scale.
        """
        c = np.ascontiguousarray(np.atleast_2d(candidates), dtype=np.float64)
        z, mu, var, cov = gp_acquisition(
            c, self.x, self.lengthscales, self.hyper.outputscale, self.hyper.constant, self.chol, self.beta,
            np.ascontiguousarray(incumbent, dtype=np.float64), delta / self.y_std,
            var_floor * self.hyper.outputscale)
        scale = self.y_std ** 2
        return z, self.y_mean + self.y_std * mu, var * scale, cov * scale

    def mean_var_cov(self, candidates: np.ndarray, incumbent: np.ndarray):
        _, mu, var, cov = self.pac_scores(candidates, incumbent, 0.0)
        _, mu_hat, var_hat, _ = self.pac_scores(np.atleast_2d(incumbent), incumbent, 0.0)
        return mu, var, cov, float(mu_hat[0]), float(var_hat[0])

    def mean(self, candidates: np.ndarray) -> np.ndarray:
        c = np.atleast_2d(candidates)
        return self.pac_scores(c, c[0], 0.0)[1]

    # -- for tests and benchmarks -----------------------------------------
    def gpytorch_model(self):
        """The same GP as an eval-mode gpytorch model (standardized units)."""
        model, likelihood = _gpytorch_model(self.x, self.y_s, self.noise_s, self.hyper)
        model.eval()
        likelihood.eval()
        return model
