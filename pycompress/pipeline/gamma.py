"""Gamma for a target size: from a GP of the quality (``select_gamma``) or from the measured trade-off
(``gamma_from_observations``, what ``compress --target-size`` uses)."""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from pycompress.decisions.bo import GaussianProcess
from pycompress.errors import PycompressError
from pycompress.pipeline.objective import CompressionObjective, Measurement


@dataclass
class GammaChoice:
    gamma: float
    target: float
    predicted_ratio: float
    reachable: bool
    notes: list[str] = field(default_factory=list)
    point: np.ndarray | None = None     # select_gamma: the predicted optimum at this gamma


def select_gamma(objective: CompressionObjective, points: np.ndarray, measurements: Sequence[Measurement],
                 target: float, *, rng: np.random.Generator, candidates: int = 4096,
                 iterations: int = 60) -> GammaChoice:
    """Bisection on log gamma so that the predicted optimum of ``gamma Q_lcb + 1/R`` has ratio ``target``.

    ``Q_lcb = mu_Q - 2 sd_Q`` from a GP fitted to the measured qualities (with
    their variances) at ``points``; candidates are snapped Sobol points plus
    the measured points.
    """
    from scipy.stats import qmc

    if not 0 < target <= 1:
        raise PycompressError(f"target size must be in (0, 1], got {target}")
    space = objective.space
    q = np.array([m.quality for m in measurements])
    q_var = np.array([m.quality_var for m in measurements])
    gp = GaussianProcess.fit(np.asarray(points), q, q_var, restarts=2, rng=rng)
    from pycompress.decisions.bo.optimize import sobol_seed

    sobol = qmc.Sobol(space.d, scramble=True, seed=sobol_seed(rng)).random(candidates)
    cands = np.unique(np.vstack([space.snap(sobol), np.asarray(points)]), axis=0)
    # A lower confidence bound, not the mean: with a handful of points the GP
    # reverts to its constant far from the data, which can look better than
    # anything measured and would put the predicted optimum where nothing is known.
    _, mean_q, var_q, _ = gp.pac_scores(cands, np.asarray(points)[0], 0.0)
    mu_q = mean_q - 2.0 * np.sqrt(np.maximum(var_q, 0.0))
    inv_r = 1.0 / objective.predicted_ratio(cands)
    ratios = 1.0 / inv_r

    def optimum(gamma: float) -> int:
        return int(np.argmax(gamma * mu_q + inv_r))

    def optimum_ratio(gamma: float) -> float:
        return float(ratios[optimum(gamma)])

    # Scan log gamma around the scale at which a unit of Q is worth the spread
    # of 1/R, then bisect the first crossing of the target. The predicted
    # optimum ratio grows with gamma, but not strictly (it plateaus where Q no
    # longer depends on a layer): without a crossing, take the smallest gamma
    # whose ratio is closest to the target, never the end of the scan.
    spread_q = max(float(np.ptp(mu_q)), 1e-12)
    scale = max(float(np.ptp(inv_r)), 1e-12) / spread_q
    logs = np.linspace(math.log(scale) - 12.0, math.log(scale) + 12.0, 241)
    ratios_at = np.array([optimum_ratio(math.exp(g)) for g in logs])
    notes = []
    above = np.nonzero(ratios_at >= target)[0]
    if above.size and above[0] > 0:
        lo, hi = logs[above[0] - 1], logs[above[0]]
        for _ in range(iterations):
            mid = 0.5 * (lo + hi)
            if optimum_ratio(math.exp(mid)) < target:
                lo = mid
            else:
                hi = mid
        gamma = math.exp(hi)
        return GammaChoice(gamma, target, optimum_ratio(gamma), True, notes, cands[optimum(gamma)])
    best = int(np.argmin(np.abs(ratios_at - target)))
    gamma = math.exp(logs[best])
    notes.append(f"target {target:g} is not reached by the predicted optimum (ratios "
                 f"{ratios_at.min():.3g}..{ratios_at.max():.3g}); using the closest, {ratios_at[best]:.3g}")
    return GammaChoice(gamma, target, float(ratios_at[best]), False, notes, cands[optimum(gamma)])


def gamma_from_observations(quality: Sequence[float], ratio: Sequence[float], target: float,
                            quality_var: Sequence[float] | None = None, band: float | None = None) -> GammaChoice:
    """Gamma at which the best *evaluated* point of ``gamma Q + 1/R`` crosses ratio ``target``.

    The maximizers of ``gamma q_i + 1/r_i`` over the evaluations, as gamma
    grows, walk along the upper hull of the points ``(q_i, 1/r_i)`` towards
    larger ratios and better quality. With ``a`` the hull point at or below the
    target and ``b`` the next one above it, gamma is where they tie,
    ``(1/r_a - 1/r_b) / (q_b - q_a)``: the slope of the measured trade-off at
    the target, so the search at that gamma looks for the best point between
    them. No GP: measured points only (a GP fitted to a handful of noisy
    points extrapolates the quality badly and the gamma then misses the
    target by a wide margin). When every hull point lies on one side of the
    target, the nearest one's gamma range is used and the choice is marked
    unreachable for now (the search's later rounds see more points).

    With ``band`` (the search's target band): when the best quality was measured at a ratio more than
    ``band`` below the target, the quality does not measurably grow with size between there and the
    target, so there is no slope at the target to measure: gamma 1, as when no step is significant.
    (Twice the last tie, the rule before, turned that flat stretch into gammas of 0.55-17 across seeds
    of one model, EfficientNet-Lite0's pre-recovery stage search; docs/pacbo.md.)
    """
    if not 0 < target <= 1:
        raise PycompressError(f"target size must be in (0, 1], got {target}")
    q = np.asarray(quality, np.float64)
    inv_r = 1.0 / np.asarray(ratio, np.float64)
    # Walk the hull from gamma = 0 (the smallest ratio, best 1/R) upwards.
    current = int(np.lexsort((-q, -inv_r))[0])
    hull = [(current, 0.0)]
    # With quality_var, a step along the hull needs a gain significant at 5% over the n points
    # (Bonferroni): noisy estimates of a flat trade-off give ties of any size (gamma 30-900 on the
    # digits CNN, whose design's quality varies by about its noise).
    sd = np.sqrt(np.asarray(quality_var, np.float64)) if quality_var is not None else np.zeros_like(q)
    z = statistics.NormalDist().inv_cdf(1.0 - 0.05 / len(q))
    while True:
        better = q > q[current] + np.maximum(z * np.hypot(sd, sd[current]), 1e-12)
        if not better.any():
            break
        # The next maximizer is the one whose tie with the current comes at the smallest gamma.
        ties = np.full(q.shape, np.inf)
        ties[better] = (inv_r[current] - inv_r[better]) / (q[better] - q[current])
        ties = np.maximum(ties, hull[-1][1])
        nxt = int(np.lexsort((-q, ties))[0])
        hull.append((nxt, float(ties[nxt])))
        current = nxt
    ratios = 1.0 / inv_r
    for (a, _), (b, tie) in itertools.pairwise(hull):
        if ratios[a] <= target < ratios[b]:
            return GammaChoice(max(tie, 1e-12), target, float(ratios[b] if target - ratios[a] > ratios[b] - target
                                                               else ratios[a]), True)
    first, last = hull[0][0], hull[-1][0]
    if len(hull) == 1 and target >= ratios[first]:
        note = (f"no evaluated point has a better quality (beyond its noise) than the smallest, ratio "
                f"{ratios[first]:.3g}: the quality does not measurably grow with size here; gamma 1")
        return GammaChoice(1.0, target, float(ratios[first]), False, [note])
    if target < ratios[first] or len(hull) == 1:
        gamma = hull[1][1] / 2 if len(hull) > 1 else 1.0
        note = (f"no evaluated point is at or below the target {target:g} on the trade-off yet "
                f"(smallest {ratios[first]:.3g})")
        return GammaChoice(gamma, target, float(ratios[first]), False, [note])
    if band is not None and ratios[last] < target - band:
        note = (f"the best evaluated quality is at ratio {ratios[last]:.3g}, below the target {target:g}: the "
                "quality does not measurably grow with size up to the target; gamma 1")
        return GammaChoice(1.0, target, float(ratios[last]), False, [note])
    gamma = 2 * hull[-1][1] if hull[-1][1] > 0 else 1.0
    return GammaChoice(gamma, target, float(ratios[last]), False,
                       [f"the best evaluated quality is at ratio {ratios[last]:.3g}, below the target {target:g}"])
