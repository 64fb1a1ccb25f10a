"""The PAC acquisition and the stopping certificate (ALGORITHMS.md 3.2, paper Eqs. 6-12).

With ``t^`` the incumbent (the visited point with the highest posterior
mean) and ``delta`` the tolerated gap, for a candidate ``t``

    z(t) = (mu(t) - mu(t^) - delta) / sqrt(var(t) + var(t^) - 2 cov(t, t^))

on the latent posterior. The next point is ``argmax z``; the search stops
with a certificate when ``1 - Phi(z_max) >= 1 - epsilon``, i.e.
``z_max <= Phi^-1(epsilon)``: then, under the GP,
``P(J(t*) - J(t^) < delta) >= 1 - epsilon``. (One transcription of the
paper's Eq. 11 flips the numerator; this form agrees with Eqs. 7 and 12.)

As in BoTorch, the acquisition is a small object with ``forward(X)`` over a
model that only has to provide a posterior (``Posterior``), so it can be
tested with a mock posterior and no fitted GP.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
from scipy.stats import norm

# Floor of var(t) + var(t^) - 2 cov(t, t^), relative to the prior variance:
# at t = t^ it is 0 (z = -inf for delta > 0) and round-off can make it negative.
VAR_FLOOR = 1e-12


def pac_z(mu: np.ndarray, var: np.ndarray, cov: np.ndarray, mu_hat: float, var_hat: float, delta: float,
          var_floor: float) -> np.ndarray:
    """``z = (mu - mu_hat - delta) / sqrt(max(var + var_hat - 2 cov, var_floor))``, elementwise (M,)."""
    spread = np.maximum(np.asarray(var) + var_hat - 2.0 * np.asarray(cov), var_floor)
    return (np.asarray(mu) - mu_hat - delta) / np.sqrt(spread)


def certificate_probability(z_max: float) -> float:
    """``1 - Phi(z_max)``: the posterior probability that the incumbent is delta-optimal
    (as bounded at the acquisition maximizer, paper Eq. 12)."""
    return float(norm.sf(z_max))


def is_certified(z_max: float, epsilon: float) -> bool:
    """``1 - Phi(z_max) >= 1 - epsilon``, tested as ``z_max <= Phi^-1(epsilon)`` (no 1 - tiny rounding)."""
    return bool(z_max <= norm.ppf(epsilon))


def resolve_delta(delta: float, relative: bool, mu_hat: float) -> float:
    """The absolute gap: ``delta``, or ``delta * |mu(t^)|`` when relative."""
    return float(delta) * abs(float(mu_hat)) if relative else float(delta)


class Posterior(ABC):
    """What the acquisition needs from a model, in the units of the objective."""

    @abstractmethod
    def mean_var_cov(self, candidates: np.ndarray, incumbent: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, float]:
        """Latent ``mu(C)``, ``var(C)``, ``cov(C, t^)`` (each (M,)) and ``mu(t^)``, ``var(t^)``."""

    def mean(self, candidates: np.ndarray) -> np.ndarray:
        c = np.atleast_2d(candidates)
        return self.mean_var_cov(c, c[0])[0]

    def prior_variance(self) -> float:
        return 1.0

    def pac_scores(self, candidates: np.ndarray, incumbent: np.ndarray, delta: float,
                   var_floor: float = VAR_FLOOR) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(z, mu, var, cov) for candidates (M, d). Models with a fused kernel override this."""
        mu, var, cov, mu_hat, var_hat = self.mean_var_cov(np.atleast_2d(candidates), incumbent)
        return pac_z(mu, var, cov, mu_hat, var_hat, delta, var_floor * self.prior_variance()), mu, var, cov


class PACAcquisition:
    """``z(t)`` of the PAC criterion against a fixed incumbent.

    ``forward(X)``: X (M, d) -> z (M,). ``delta`` is absolute here (use
    ``resolve_delta`` for a relative one).
    """

    def __init__(self, model: Posterior, incumbent: np.ndarray, delta: float, var_floor: float = VAR_FLOOR):
        self.model = model
        self.incumbent = np.asarray(incumbent, np.float64).ravel()
        self.delta = float(delta)
        self.var_floor = var_floor
        self.evaluations = 0  # candidates scored (for progress and tests)

    def forward(self, X: np.ndarray) -> np.ndarray:
        X = np.atleast_2d(np.asarray(X, np.float64))
        self.evaluations += len(X)
        return self.model.pac_scores(X, self.incumbent, self.delta, self.var_floor)[0]

    __call__ = forward


def select_incumbent(model: Posterior, visited: np.ndarray) -> tuple[int, float]:
    """Index and posterior mean of the visited point with the highest posterior mean."""
    mu = model.mean(np.atleast_2d(visited))
    best = int(np.argmax(mu))
    return best, float(mu[best])
