"""Maximizing the acquisition over [0, 1]^d (ALGORITHMS.md 3.2).

Many candidates, scored in one batch each by the compiled kernel: a scrambled
Sobol set, perturbations of the incumbent and of the best visited points,
then perturbations of the best candidates of that first round; the best few
are refined with L-BFGS-B (gradients by batched forward differences, one
kernel call per gradient). With a ``snap`` (the lattice of integer
decisions) every scored point is first mapped to the point that would
actually be evaluated, so ``z_max`` is a maximum over what can be run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy.optimize import minimize
from scipy.stats import qmc

Acquisition = Callable[[np.ndarray], np.ndarray]  # X (M, d) -> z (M,)


@dataclass
class CandidateSettings:
    sobol: int = 2048            # Sobol points (rounded up to a power of 2)
    perturbations: int = 128     # per anchor (incumbent, best visited, best candidates)
    scales: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3)  # Gaussian step sizes in the unit cube
    anchors: int = 4             # best visited points perturbed besides the incumbent
    top: int = 8                 # best first-round candidates perturbed again
    refine: int = 3              # best candidates refined locally
    refine_iters: int = 25


def sobol_seed(rng: np.random.Generator) -> np.random.Generator:
    """A fresh generator for ``qmc.Sobol``, seeded by one draw of ``rng``.

    Not ``rng`` itself: scipy derives the scrambling from the generator's SeedSequence (spawning),
    which is not part of ``rng.bit_generator.state``, so a generator restored from a saved state (a
    resumed search) or reused would scramble differently from the original run.
    """
    return np.random.default_rng(int(rng.integers(2 ** 63)))


def perturb(points: np.ndarray, count: int, scales: tuple[float, ...], rng: np.random.Generator) -> np.ndarray:
    """``count`` Gaussian perturbations of each point, clipped to the cube.

    Half of them move a random subset of about 2 coordinates only, so that
    in higher dimensions some steps stay local to one or two decisions.
    """
    points = np.atleast_2d(points)
    k, d = points.shape
    base = np.repeat(points, count, axis=0)
    scale = rng.choice(np.asarray(scales), size=(k * count, 1))
    step = rng.normal(size=(k * count, d)) * scale
    sparse = rng.random(k * count) < 0.5
    mask = rng.random((k * count, d)) < min(1.0, 2.0 / d)
    step[sparse] *= mask[sparse]
    return np.clip(base + step, 0.0, 1.0)


def _unique_best(points: np.ndarray, values: np.ndarray, k: int) -> np.ndarray:
    order = np.argsort(-values, kind="stable")
    chosen: list[int] = []
    for i in order:
        if not any(np.array_equal(points[i], points[j]) for j in chosen):
            chosen.append(int(i))
        if len(chosen) == k:
            break
    return np.asarray(chosen, dtype=np.int64)


def maximize_acquisition(acquisition: Acquisition, d: int, rng: np.random.Generator, *, anchors: np.ndarray,
                         settings: CandidateSettings | None = None,
                         snap: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[np.ndarray, float]:
    """argmax of ``acquisition`` over the cube: (theta (d,), z_max).

    ``anchors`` (k, d): the incumbent first, then other points worth
    searching around (the best visited points).
    """
    s = settings or CandidateSettings()
    snap = snap or (lambda x: x)
    count = 1 << max(1, int(np.ceil(np.log2(max(2, s.sobol)))))
    sobol = qmc.Sobol(d, scramble=True, seed=sobol_seed(rng)).random(count)
    anchors = np.atleast_2d(anchors)
    first = snap(np.vstack([sobol, anchors, perturb(anchors, s.perturbations, s.scales, rng)]))
    z_first = acquisition(first)
    top = first[_unique_best(first, z_first, s.top)]
    second = snap(perturb(top, s.perturbations, s.scales, rng))
    points = np.vstack([first, second])
    values = np.concatenate([z_first, acquisition(second)])

    best = int(np.argmax(values))
    best_theta, best_z = points[best].copy(), float(values[best])
    for start in points[_unique_best(points, values, s.refine)]:
        theta = _refine(acquisition, start, s.refine_iters)
        snapped = snap(theta[None, :])
        z = float(acquisition(snapped)[0])
        if z > best_z:
            best_theta, best_z = snapped[0].copy(), z
    return best_theta, best_z


def _refine(acquisition: Acquisition, start: np.ndarray, iters: int) -> np.ndarray:
    """Local L-BFGS-B ascent of z from ``start`` on the continuous cube."""
    d = start.size
    h = 1e-6

    def negative_with_gradient(theta: np.ndarray) -> tuple[float, np.ndarray]:
        # One batch: theta and d forward steps (stepping inward at the upper bound).
        steps = np.where(theta + h <= 1.0, h, -h)
        batch = np.repeat(theta[None, :], d + 1, axis=0)
        batch[np.arange(1, d + 1), np.arange(d)] += steps
        # Rounded before differencing: last-bit differences of z (e.g. between processes) would
        # otherwise become different forward-difference gradients at h = 1e-6 and another ascent.
        z = np.round(acquisition(batch), 8)
        if not np.all(np.isfinite(z)):
            return 1e300, np.zeros(d)
        return -float(z[0]), -(z[1:] - z[0]) / steps

    result = minimize(negative_with_gradient, start, jac=True, method="L-BFGS-B", bounds=[(0.0, 1.0)] * d,
                      options={"maxiter": iters})
    return np.clip(result.x, 0.0, 1.0)
