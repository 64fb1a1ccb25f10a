"""Latency ratios with their noise, for ``--objective latency``.

The search needs ``R = latency(compressed) / latency(original)`` once per
candidate, from a short timing on this machine, and how uncertain that figure
is, so that the GP can weigh it like the fidelity noise. Each timing is a
trimmed mean (the slowest quarter of the runs dropped: they are the other
processes of a shared machine, not the model) with its standard error; the
ratio's variance follows by the delta method,

    var R ~= R^2 (se_c^2 / m_c^2 + se_0^2 / m_0^2).

The original is timed once with more runs, so its share of the noise is small.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import onnx_ir as ir

from pycompress.errors import PycompressError
from pycompress.fidelity.session import make_session


@dataclass(frozen=True)
class Timing:
    """Trimmed mean of the per-run seconds and its standard error."""

    mean: float
    std_error: float
    runs: int


def time_model(model: ir.Model, feeds: Mapping[str, np.ndarray], *, runs: int, warmup: int = 2,
               threads: int | None = None, trim: float = 0.25) -> Timing:
    """Time ``runs`` calls of ``model`` on ``feeds`` in a fresh onnxruntime session."""
    if runs < 3:
        raise PycompressError(f"latency timing needs at least 3 runs, got {runs}")
    session = make_session(model, threads=threads)
    for _ in range(warmup):
        session.run(None, dict(feeds))
    seconds = np.empty(runs)
    for i in range(runs):
        start = time.perf_counter()
        session.run(None, dict(feeds))
        seconds[i] = time.perf_counter() - start
    return trimmed_timing(seconds, trim)


def trimmed_timing(seconds: np.ndarray, trim: float = 0.25) -> Timing:
    """The trimmed mean of run times and its standard error (also for times measured on a device)."""
    seconds = np.asarray(seconds, np.float64)
    kept = np.sort(seconds)[: max(2, int(math.ceil(len(seconds) * (1.0 - trim))))]
    return Timing(float(kept.mean()), float(kept.std(ddof=1) / math.sqrt(len(kept))), len(seconds))


class LatencyProbe:
    """Latency of candidates relative to the original model, with its variance."""

    def __init__(self, original: ir.Model, feeds: Mapping[str, np.ndarray], *, runs: int = 10,
                 baseline_runs: int = 40, threads: int | None = None):
        if runs < 3:
            raise PycompressError(f"--latency-runs must be at least 3 (a timing needs a spread), got {runs}")
        self.feeds = {k: np.ascontiguousarray(v) for k, v in feeds.items()}
        self.runs = int(runs)
        self.threads = threads
        self.baseline = time_model(original, self.feeds, runs=baseline_runs, threads=threads)

    def ratio(self, model: ir.Model) -> tuple[float, float]:
        """``(R, var R)`` of ``model`` against the original."""
        return latency_ratio(time_model(model, self.feeds, runs=self.runs, threads=self.threads), self.baseline)


def latency_ratio(timing: Timing, base: Timing) -> tuple[float, float]:
    """``(R, var R)`` of a timing against the baseline's (delta method, module docstring)."""
    r = timing.mean / base.mean
    var = r * r * ((timing.std_error / timing.mean) ** 2 + (base.std_error / base.mean) ** 2)
    return r, var
