"""An objective with a known part: ``J(theta) = k(theta) + g(theta)``, the GP on ``g`` only.

Compression's ``J = gamma Q + 1/R`` has a term that needs no model: the
ratio ``R`` of a point is counted exactly from its plan without running
anything (``CompressionObjective.predicted_ratio``). A GP fitted to all of
``J`` has to learn ``1/R`` too: a steep trend across the cube (ratios 0.1 to
1) with steps on the lattice of integer decisions, which a stationary kernel
models with a large output scale and long length scales. Its posterior is
then wide everywhere, also inside the narrow target band where the
certificate is decided (on the digits residual CNN, 100 evaluations left a
third of the band's lattice with ``z > Phi^-1(epsilon)``). Fitting the GP to
``J - k`` leaves it only the quality term.

The model stays a GP: ``k`` is deterministic, so the posterior of ``J`` is
the GP's shifted by ``k``; variances and covariances are the GP's. (Not in
the paper, which models all of ``J``; equivalent to a GP with the prior mean
``k``.)
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from pycompress.decisions.bo.acquisition import VAR_FLOOR, Posterior, pac_z
from pycompress.decisions.bo.gp import GaussianProcess

Known = Callable[[np.ndarray], np.ndarray]   # points (M, d) -> k (M,)


class KnownPlusGP(Posterior):
    """The posterior of ``k(theta) + g(theta)`` for a GP ``g`` fitted to the observations minus ``k``."""

    def __init__(self, gp: GaussianProcess, known: Known):
        self.gp = gp
        self.known = known
        self.hyper = gp.hyper

    def _known(self, points: np.ndarray) -> np.ndarray:
        return np.asarray(self.known(np.atleast_2d(points)), np.float64)

    def mean_var_cov(self, candidates: np.ndarray, incumbent: np.ndarray):
        c = np.atleast_2d(candidates)
        mu, var, cov, mu_hat, var_hat = self.gp.mean_var_cov(c, incumbent)
        return mu + self._known(c), var, cov, mu_hat + float(self._known(incumbent)[0]), var_hat

    def mean(self, candidates: np.ndarray) -> np.ndarray:
        c = np.atleast_2d(candidates)
        return self.gp.mean(c) + self._known(c)

    def prior_variance(self) -> float:
        return self.gp.hyper.outputscale * self.gp.y_std ** 2

    def pac_scores(self, candidates: np.ndarray, incumbent: np.ndarray, delta: float,
                   var_floor: float = VAR_FLOOR) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        # The fused kernel gives the GP's mean, variance and covariance with the incumbent; z is formed
        # here because the known part shifts each candidate's mean differently.
        mu, var, cov, mu_hat, var_hat = self.mean_var_cov(candidates, incumbent)
        return pac_z(mu, var, cov, mu_hat, var_hat, delta, var_floor * self.prior_variance()), mu, var, cov


def residuals(known: Known | None, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``y - k(x)`` (``y`` without a known part)."""
    return y if known is None or len(x) == 0 else y - np.asarray(known(np.atleast_2d(x)), np.float64)
