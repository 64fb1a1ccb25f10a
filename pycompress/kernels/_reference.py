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
