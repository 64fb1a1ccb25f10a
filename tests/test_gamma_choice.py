"""Gamma for a target size from the measured trade-off (pipeline.gamma_from_observations), with noise."""

import numpy as np

from pycompress.pipeline import gamma_from_observations


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
