"""Layer-wise least squares from streamed statistics (ALGORITHMS.md 4).

A layer is refitted so that, fed with the *compressed* model's inputs X, it
reproduces the *teacher's* outputs Y of the same layer. Everything needed is
in the joint covariance of [X, Y], streamed through the covariance kernel
(float64, memory O((d_in + d_out)^2), independent of the number of samples):

    Sxx = scatter of X, Sxy = cross scatter, Syy = scatter of Y (all centred),
    ridge:          W = (Sxx + lam I)^-1 (Sxy + lam W0),  b = mean_y - mean_x W
                    (shrunk toward the layer's current weights W0, not toward
                    0: a large lam leaves the layer as it is, a small one
                    trusts the calibration data; W0 = 0 is the plain ridge)
    reduced rank K: W_K = W V_K V_K^T with V_K the top-K eigenvectors of
                    W^T Sxx W (the fitted outputs' scatter): the
                    rank-constrained optimum (reduced-rank regression), as
                    factors A = W V_K (d_in x K), B = V_K^T (K x d_out).
    error(W, b) = mean over samples of ||Y - X W - b||^2, exactly, from the
                  same statistics, so a refit is only kept when it lowers it.

A layer with no bias to write (a bare MatMul) is fitted through the origin
(``intercept=False``): the same formulas on the uncentred moments
(``S + n m m^T``), and ``b = 0``.

Statistics add up: ``pooled`` merges those of disjoint parts of the data
(e.g. one per photo) exactly, so a fit on all parts but one, judged on the
one left out, costs no second pass over the data.
"""

from __future__ import annotations

import numpy as np

from pycompress.kernels import CovarianceAccumulator


class LayerStatistics:
    """Streaming joint statistics of a layer's inputs X (n x d_in) and targets Y (n x d_out)."""

    def __init__(self, d_in: int, d_out: int):
        self.d_in, self.d_out = int(d_in), int(d_out)
        self._acc = CovarianceAccumulator(self.d_in + self.d_out)
        self._fixed: tuple[int, np.ndarray, np.ndarray] | None = None   # (count, mean, scatter) of a pool

    @classmethod
    def pooled(cls, parts: list[LayerStatistics]) -> LayerStatistics:
        """The statistics of the union of ``parts`` (disjoint samples), read-only."""
        out = cls(parts[0].d_in, parts[0].d_out)
        n, mean, scatter = 0, np.zeros(out.d_in + out.d_out), np.zeros((out.d_in + out.d_out,) * 2)
        for part in parts:
            k, m, s = part._moments()
            if k == 0:
                continue
            delta = m - mean
            # Chan et al.'s pairwise update of a scatter matrix.
            scatter = scatter + s + np.outer(delta, delta) * (n * k / (n + k))
            mean = mean + delta * (k / (n + k))
            n += k
        out._fixed = (n, mean, scatter)
        return out

    def _moments(self) -> tuple[int, np.ndarray, np.ndarray]:
        if self._fixed is not None:
            return self._fixed
        return self._acc.count, np.asarray(self._acc.mean, np.float64), np.asarray(self._acc.scatter, np.float64)

    def update(self, x: np.ndarray, y: np.ndarray) -> None:
        if self._fixed is not None:
            raise ValueError("pooled statistics are read-only")
        if x.shape[0] != y.shape[0] or x.shape[1] != self.d_in or y.shape[1] != self.d_out:
            raise ValueError(f"expected x (n, {self.d_in}) and y (n, {self.d_out}), got {x.shape}, {y.shape}")
        dtype = np.float32 if x.dtype == np.float32 and y.dtype == np.float32 else np.float64
        self._acc.update(np.concatenate([x, y], axis=1).astype(dtype, copy=False))

    @property
    def count(self) -> int:
        return self._moments()[0]

    def _parts(self, intercept: bool = True):
        count, mean, s = self._moments()
        if not intercept:   # uncentred moments: the fit through the origin
            s = s + count * np.outer(mean, mean)
            mean = np.zeros_like(mean)
        d = self.d_in
        return s[:d, :d], s[:d, d:], s[d:, d:], mean[:d], mean[d:]

    def ridge(self, lam: float = 1e-4, intercept: bool = True,
              prior: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(W d_in x d_out, b d_out), shrunk toward ``prior`` (d_in x d_out; None: 0); ``lam`` is
        relative to the input scatter's mean diagonal (the sample count times the mean input variance)."""
        sxx, sxy, _, mx, my = self._parts(intercept)
        reg = lam * max(float(np.trace(sxx)) / self.d_in, 1e-12)
        rhs = sxy if prior is None else sxy + reg * prior
        w = np.linalg.solve(sxx + reg * np.eye(self.d_in), rhs)
        return w, my - mx @ w

    def reduced_rank(self, rank: int, lam: float = 1e-4, intercept: bool = True,
                     prior: np.ndarray | None = None,
                     start: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(A d_in x K, B K x d_out, b d_out): the best rank-K map on the data (the ridge toward
        ``prior``, then its rank-K projection). ``start`` (d_out x K, e.g. ``B.T`` of a fit at a
        nearby strength): warm start for the top-K eigenvectors (``top_eigenvectors``)."""
        if not 1 <= rank <= min(self.d_in, self.d_out):
            raise ValueError(f"rank {rank} outside [1, {min(self.d_in, self.d_out)}]")
        sxx, _, _, mx, my = self._parts(intercept)
        w, _ = self.ridge(lam, intercept, prior)
        fitted = w.T @ sxx @ w
        v = top_eigenvectors((fitted + fitted.T) / 2, rank, start)
        a, b_factor = w @ v, v.T
        return a, b_factor, my - mx @ (a @ b_factor)

    def error(self, w: np.ndarray, b: np.ndarray) -> float:
        """Mean squared output error per sample of y ~ x W + b on the accumulated data."""
        sxx, sxy, syy, mx, my = self._parts()
        n = self.count
        centred = np.trace(syy) - 2 * np.sum(w * sxy) + np.sum(w * (sxx @ w))
        offset = my - mx @ w - b
        return float(max(centred, 0.0) / n + offset @ offset)


def top_eigenvectors(matrix: np.ndarray, rank: int, start: np.ndarray | None = None, *,
                     tol: float = 1e-7, max_iter: int = 30) -> np.ndarray:
    """The eigenvectors of the ``rank`` largest eigenvalues of symmetric PSD ``matrix``, largest first.

    Without ``start``: a full ``eigh``. With ``start`` (n x rank, e.g. the answer at a nearby ridge
    strength in a cross-validation sweep): block subspace iteration from it, with 8 extra columns,
    until every wanted Ritz pair's residual is below ``tol`` times the largest eigenvalue, then
    Rayleigh-Ritz; a full ``eigh`` where that does not converge in ``max_iter`` steps. The sweep
    otherwise spends ~90% of a recovery in full eigendecompositions of d_out x d_out matrices
    (FC3: 72 of 1000 x 1000 for three layers) of which it needs ``rank`` vectors.
    """
    n = matrix.shape[0]
    block = min(n, rank + 8)
    if start is None or start.shape != (n, rank) or block >= n:
        return _exact_top_eigenvectors(matrix, rank)
    extra = np.random.default_rng(rank).standard_normal((n, block - rank))
    q, _ = np.linalg.qr(np.concatenate([start, extra], axis=1))
    for _ in range(max_iter):
        z = matrix @ q
        vals, small = np.linalg.eigh(q.T @ z)
        order = np.argsort(vals)[::-1]
        vals, small = vals[order], small[:, order]
        ritz, image = q @ small, z @ small
        top = max(float(vals[0]), 1e-300)
        residual = np.linalg.norm(image[:, :rank] - ritz[:, :rank] * vals[:rank], axis=0)
        if np.all(residual <= tol * top):
            return ritz[:, :rank]
        q, _ = np.linalg.qr(image)
    return _exact_top_eigenvectors(matrix, rank)


def _exact_top_eigenvectors(matrix: np.ndarray, rank: int) -> np.ndarray:
    vals, vecs = np.linalg.eigh(matrix)
    return vecs[:, np.argsort(vals)[::-1][:rank]]

