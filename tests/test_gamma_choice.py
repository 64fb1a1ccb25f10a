"""``select_gamma`` on a known trade-off: the predicted optimum's ratio lands near the
target, and an unexplored region (where the GP knows nothing) never holds it.

Two coordinates, ratio ``R = 0.05 + 0.95 (t1 + t2) / 2`` and quality
``Q = -0.05 / R^2`` (so the optimum of ``gamma Q + 1/R`` is at ``R = 0.1 gamma``),
measured only on the diagonal ``t1 = t2``. Off the diagonal the same ratios exist
but nothing is known. A confidence bound taken on the wrong side (mean + 2 sd
instead of mean - 2 sd) makes that unknown region look better than the measured
points of the same ratio, and the predicted optimum moves there.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from pycompress.decisions.bo import Dimension, SearchSpace
from pycompress.pipeline import gamma_from_observations, select_gamma


class KnownTradeOff:
    """What select_gamma reads from an objective: the space and predicted ratios."""

    def __init__(self):
        self.space = SearchSpace([Dimension(f"layer{i}", "test", "keep", "keep", high=100, low=1) for i in (1, 2)])

    def predicted_ratio(self, thetas: np.ndarray) -> np.ndarray:
        return 0.05 + 0.95 * np.asarray(thetas, np.float64).mean(axis=1)


def _measured():
    objective = KnownTradeOff()
    diagonal = np.linspace(0.0, 1.0, 21)
    points = objective.space.snap(np.column_stack([diagonal, diagonal]))
    quality = -0.05 / objective.predicted_ratio(points) ** 2
    measurements = [SimpleNamespace(quality=float(q), quality_var=1e-6) for q in quality]
    return objective, points, measurements


@pytest.mark.parametrize("target", [0.3, 0.5, 0.75])
def test_select_gamma_puts_the_predicted_optimum_near_the_target_where_it_was_measured(target):
    objective, points, measurements = _measured()
    choice = select_gamma(objective, points, measurements, target, rng=np.random.default_rng(0))
    assert choice.reachable and choice.gamma > 0
    assert choice.predicted_ratio == pytest.approx(target, abs=0.05)    # measured ratios are 0.0475 apart
    # Never in the unexplored region: the optimum is (next to) a measured point.
    distance = np.min(np.linalg.norm(points - choice.point, axis=1))
    assert distance <= 0.1, (choice.point, distance)


def test_a_flat_noisy_trade_off_gives_gamma_1_and_says_why():
    """The digits CNN's design: quality about flat in the ratio, noise sd 0.045 (m = 50). Without the
    noise the hull's steps are noise and gamma lands anywhere in 30-900."""
    rng = np.random.default_rng(0)
    ratio = np.linspace(0.1, 0.6, 19)
    quality = 0.3 + 0.045 * rng.normal(size=19)
    var = np.full(19, 0.045 ** 2)
    blind = gamma_from_observations(quality, ratio, 0.3)
    aware = gamma_from_observations(quality, ratio, 0.3, var)
    assert blind.gamma > 10
    assert aware.gamma == 1.0 and not aware.reachable
    assert "does not measurably grow with size" in aware.notes[0]


def test_a_clear_trade_off_is_unchanged_by_its_noise():
    """The digits MLP's kind: the relative error falls by orders of magnitude with the ratio."""
    rng = np.random.default_rng(1)
    ratio = np.sort(rng.uniform(0.05, 0.9, 11))
    quality = 4.0 * np.log(ratio / 0.05) + 0.02 * rng.normal(size=11)
    var = np.full(11, 0.02 ** 2)
    for target in (0.1, 0.2, 0.3):
        blind = gamma_from_observations(quality, ratio, target)
        aware = gamma_from_observations(quality, ratio, target, var)
        assert aware.reachable and aware.gamma == blind.gamma


def test_a_trade_off_that_stops_growing_well_below_the_target_gives_gamma_1():
    """EfficientNet-Lite0 before recovery: the design's best quality is at ratio 0.36 and nothing larger
    measurably beats it. Twice the last tie gave gammas of 0.55-17 across seeds; no slope exists at the
    target, so gamma 1, said plainly. Within the band of the target the old rule stays."""
    ratio = np.array([0.1, 0.2, 0.36, 0.5, 0.62, 0.75, 0.78])
    quality = np.array([-0.9, -0.6, -0.3, -0.45, -0.5, -0.4, -0.35])
    var = np.full(7, 0.02 ** 2)
    old = gamma_from_observations(quality, ratio, 0.75, var)
    assert old.gamma > 1 and not old.reachable
    flat = gamma_from_observations(quality, ratio, 0.75, var, band=0.04)
    assert flat.gamma == 1.0 and not flat.reachable and flat.predicted_ratio == pytest.approx(0.36)
    assert "does not measurably grow with size up to the target" in flat.notes[0]
    # The best quality just below the target (inside the band): the slope there still counts.
    near = gamma_from_observations(quality, ratio, 0.39, var, band=0.04)
    assert near.gamma == old.gamma
