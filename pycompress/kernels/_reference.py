"""Numpy reference implementations of the compiled kernels.

Same names and signatures as ``pycompress._kernels``; used when the compiled
module is missing and, always, as the oracle in the tests.
"""

from __future__ import annotations

import numpy as np


class CovarianceAccumulator:
    """Streaming mean / covariance of row blocks (ALGORITHMS.md 3.3).

    Each block is centred on its own mean and merged with Chan et al.'s
    update, in float64, so memory is O(dim^2) whatever the number of rows.
    """

    def __init__(self, dim: int):
        if dim <= 0:
            raise ValueError("covariance dimension must be positive")
        self.dim = int(dim)
        self.count = 0
        self._mean = np.zeros(self.dim)
        self._m2 = np.zeros((self.dim, self.dim))

    def update(self, block: np.ndarray) -> None:
        block = np.asarray(block)
        if block.ndim != 2 or block.shape[1] != self.dim:
            raise ValueError(f"block must have shape (rows, {self.dim}), got {block.shape}")
        if block.shape[0] == 0:
            return
        x = block.astype(np.float64)
        mu = x.mean(axis=0)
        centred = x - mu
        self._merge(x.shape[0], mu, centred.T @ centred)

    def merge(self, other: "CovarianceAccumulator") -> None:
        if other.dim != self.dim:
            raise ValueError("cannot merge accumulators of different dimension")
        self._merge(other.count, other._mean, other._m2)

    def _merge(self, n: int, mu: np.ndarray, m2: np.ndarray) -> None:
        if n == 0:
            return
        if self.count == 0:
            self.count, self._mean, self._m2 = n, mu.copy(), m2.copy()
            return
        total = self.count + n
        delta = mu - self._mean
        self._m2 = self._m2 + m2 + np.outer(delta, delta) * (self.count * n / total)
        self._mean = self._mean + delta * (n / total)
        self.count = total

    @property
    def mean(self) -> np.ndarray:
        return self._mean.copy()

    @property
    def scatter(self) -> np.ndarray:
        return self._m2.copy()

    @property
    def cov(self) -> np.ndarray:
        if self.count < 2:
            raise ValueError("covariance needs at least 2 rows")
        return self._m2 / (self.count - 1)

    def correlation(self, floor: float = 1e-8) -> np.ndarray:
        if self.count < 2:
            raise ValueError("correlation needs at least 2 rows")
        cov = self.cov
        sd = np.sqrt(np.clip(np.diag(cov), 0.0, None))
        return cov / np.maximum(np.outer(sd, sd), floor)


# Relative tolerance under which two L1 norms (or coefficients) tie; the same
# constant as csrc/kernels/pfa_select.hpp.
PFA_TIE_RTOL = 1e-9


def l1max_removal_order(corr: np.ndarray, n_remove: int) -> np.ndarray:
    """PFA "L1 max" filter selection (ALGORITHMS.md 3.3): removed filters, in order.

    ``corr`` is a (C, C) correlation matrix; signs and the diagonal are
    ignored. Each step removes the filter whose column L1 norm over the
    remaining filters is largest; ties (within ``PFA_TIE_RTOL``) go to the
    larger single coefficient, then to the lowest index. Removing filter ``r``
    only subtracts ``|corr[r, :]|`` from the running column norms: O(C^2) total.
    Returns ``n_remove`` int64 indices (0 <= n_remove <= C).
    """
    a = np.asarray(corr, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"corr must be a square 2-D array, got shape {a.shape}")
    c = a.shape[0]
    n_remove = int(n_remove)
    if not 0 <= n_remove <= c:
        raise ValueError(f"n_remove must be in [0, {c}], got {n_remove}")
    if not np.all(np.isfinite(a)):
        raise ValueError("correlation matrix has a non-finite entry")
    a = np.abs(a)
    np.fill_diagonal(a, 0.0)
    norms = a.sum(axis=0)
    alive = np.ones(c, dtype=bool)
    order = np.empty(n_remove, dtype=np.int64)

    def ties(values: np.ndarray, best: float) -> np.ndarray:
        return values >= best - PFA_TIE_RTOL * max(1.0, abs(best))

    for step in range(n_remove):
        live = np.flatnonzero(alive)
        live_norms = norms[live]
        candidates = live[ties(live_norms, float(live_norms.max()))]
        chosen = candidates[0]
        if len(candidates) > 1:
            # Peak coefficient of each candidate over the remaining filters
            # (the diagonal is already 0, and |corr| >= 0).
            peaks = (a[:, candidates] * alive[:, None]).max(axis=0)
            chosen = candidates[ties(peaks, float(peaks.max()))][0]
        order[step] = chosen
        alive[chosen] = False
        norms -= a[chosen]
    return order
def matern52(a: np.ndarray, b: np.ndarray, lengthscales: np.ndarray, outputscale: float) -> np.ndarray:
    """Matern 5/2 ARD covariance, (p, d) x (q, d) -> (p, q):
    ``s (1 + sqrt5 r + 5/3 r^2) exp(-sqrt5 r)`` with ``r = ||(a - b) / lengthscales||``."""
    a = np.asarray(a, np.float64) / lengthscales
    b = np.asarray(b, np.float64) / lengthscales
    r = np.sqrt(np.maximum(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1), 0.0))
    s = np.sqrt(5.0) * r
    return outputscale * (1.0 + s + s * s / 3.0) * np.exp(-s)


def gp_acquisition(candidates, train_x, lengthscales, outputscale: float, mean_constant: float, chol, beta,
                   incumbent, delta: float, var_floor: float = 1e-12, threads: int = 0):
    """PAC scores of M candidates against the incumbent ``t^`` (ALGORITHMS.md 3.2).

    Shapes: candidates (M, d), train_x Theta (n, d), lengthscales (d,),
    chol L (n, n) lower with ``L L^T = A = K(Theta, Theta) + Sigma_n``,
    beta = ``L^-1 (y - m)`` (n,), incumbent (d,). Latent posterior:
    ``V = L^-1 k(Theta, C)``, ``mu = m + V^T beta``, ``var = s - sum(V^2)``,
    ``cov = k(C, t^) - V^T L^-1 k(Theta, t^)``, and
    ``z = (mu - mu(t^) - delta) / sqrt(max(var + var(t^) - 2 cov, var_floor))``.
    Returns (z, mu, var, cov), each (M,). ``threads`` is ignored here.
    """
    from scipy.linalg import solve_triangular

    c = np.asarray(candidates, np.float64)
    x = np.asarray(train_x, np.float64)
    ls = np.asarray(lengthscales, np.float64)
    t = np.asarray(incumbent, np.float64)[None, :]
    chol = np.asarray(chol, np.float64)
    beta = np.asarray(beta, np.float64)
    v = solve_triangular(chol, matern52(x, c, ls, outputscale), lower=True)
    w = solve_triangular(chol, matern52(x, t, ls, outputscale), lower=True)[:, 0]
    mu = mean_constant + v.T @ beta
    var = outputscale - (v * v).sum(0)
    cov = matern52(c, t, ls, outputscale)[:, 0] - v.T @ w
    mu_hat = mean_constant + w @ beta
    var_hat = outputscale - w @ w
    z = (mu - mu_hat - delta) / np.sqrt(np.maximum(var + var_hat - 2.0 * cov, var_floor))
    return z, mu, var, cov
