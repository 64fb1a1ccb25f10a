"""Subsampled fidelity estimates: first-order U-statistics (ALGORITHMS.md 2).

Every evaluation draws a fresh subsample ``x_1..x_m`` (default m = 50) from
the calibration pool, independently of earlier evaluations, and returns the
mean of per-sample losses ``L^ = mean(l)`` with the variance of that mean
``var(L^) = s^2 / m`` (``s^2`` the sample variance, ddof 1). Both are what
the optimizer sees: the U-statistic is asymptotically Gaussian with that
variance. Losses:

- ``norm`` (knowledge distillation, no labels): ``l_j = ||f~(x_j) - f*(x_j)||_2^2``
  summed over the chosen outputs (the squared function norm, paper Eq. 5);
- ``error`` (labels): ``l_j = 1[argmax f~(x_j) != y_j]``; a 0/1 estimate at 0
  or 1 has sample variance 0, so its variance is floored at
  ``(p (1 - p) + 1/m) / m`` rather than telling the GP it is exact;
- ``cross_entropy`` (labels): ``l_j = -log softmax(f~(x_j))[y_j]``.

Teacher outputs are computed once per sample, when a subsample first needs
them, and cached; the compressed model runs in onnxruntime.

What is estimated is the loss on the calibration pool (N samples): the
subsample of evaluation ``i`` is the first ``m`` of a permutation of the pool
seeded by ``(seed, i)``, drawn without replacement, so the variance carries
the finite-population factor ``1 - m/N`` (an estimate on the whole pool is
exact). ``evaluate(..., target_se=t)`` grows ``m`` along that permutation until
the standard error is at most ``t`` or the pool is used up: the search asks
for this where a point may be the optimum (docs/pacbo.md, "Noise").
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import onnx_ir as ir

from pycompress.errors import PycompressError
from pycompress.fidelity.compare import cosine_similarities, is_embedding
from pycompress.fidelity.session import make_session

LOSSES = ("norm", "error", "cross_entropy")


@dataclass(frozen=True)
class Estimate:
    """A subsampled estimate: ``mean`` of the per-sample losses and ``variance`` of that mean."""

    mean: float
    variance: float
    samples: int
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def std_error(self) -> float:
        return math.sqrt(self.variance)


def mean_and_variance(losses: np.ndarray, *, binary: bool = False,
                      population: int | None = None) -> tuple[float, float]:
    """``(mean(l), s^2 / m)`` with ``s^2`` the ddof-1 sample variance.

    ``binary``: 0/1 losses get the floor ``(p (1 - p) + 1/m) / m`` (ALGORITHMS.md 3.2).
    ``population``: the ``m`` losses are drawn without replacement from a pool
    of this size, whose mean is the estimand: the variance is multiplied by
    ``1 - m / population`` (0 when the whole pool was used).
    """
    losses = np.asarray(losses, np.float64).ravel()
    m = losses.size
    if m < 2:
        raise PycompressError(f"a variance estimate needs at least 2 samples, got {m}")
    mean = float(losses.mean())
    variance = float(losses.var(ddof=1)) / m
    if binary:
        variance = max(variance, (mean * (1.0 - mean) + 1.0 / m) / m)
    if population is not None:
        variance *= max(0.0, 1.0 - m / population)
    return mean, variance


def function_norm_losses(student: Sequence[np.ndarray], teacher: Sequence[np.ndarray]) -> np.ndarray:
    """``||f~(x_j) - f*(x_j)||^2`` per sample, summed over outputs. Arrays (m, ...) -> (m,)."""
    total = None
    for s, t in zip(student, teacher):
        diff = np.asarray(s, np.float64).reshape(len(s), -1) - np.asarray(t, np.float64).reshape(len(t), -1)
        sq = np.einsum("ij,ij->i", diff, diff)
        total = sq if total is None else total + sq
    if total is None:
        raise PycompressError("no outputs to compare")
    return total


def top1_error_losses(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``1[argmax logits_j != y_j]``: logits (m, classes), labels (m,) -> (m,)."""
    return (np.argmax(_as_2d(logits), axis=1) != np.asarray(labels).ravel()).astype(np.float64)


def cross_entropy_losses(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``-log softmax(logits_j)[y_j]`` (stable log-sum-exp): (m, classes), (m,) -> (m,)."""
    z = _as_2d(logits).astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=1))
    return log_norm - z[np.arange(len(z)), np.asarray(labels).ravel().astype(np.int64)]


def _as_2d(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits)
    return logits.reshape(len(logits), -1)


class FidelityEstimator:
    """Fresh, seeded subsamples of a calibration pool -> ``Estimate`` of a compressed model.

    ``evaluate(model, index)`` draws the subsample of evaluation ``index``
    from ``(seed, index)`` alone, so a resumed search sees the same samples as
    an uninterrupted one, and different evaluations are independent.
    """

    def __init__(self, teacher: ir.Model, inputs: dict[str, np.ndarray], *, labels: np.ndarray | None = None,
                 loss: str = "norm", samples: int = 50, outputs: Sequence[str] | None = None, seed: int = 0,
                 threads: int | None = None, batch_size: int = 256):
        if loss not in LOSSES:
            raise PycompressError(f"unknown fidelity loss '{loss}'; known: {', '.join(LOSSES)}")
        if loss != "norm" and labels is None:
            raise PycompressError(f"fidelity loss '{loss}' needs labels (give --labels)")
        self.inputs = dict(inputs)
        self.pool = len(next(iter(self.inputs.values())))
        if samples < 2:
            raise PycompressError(f"--samples must be at least 2, got {samples}")
        if samples > self.pool:
            raise PycompressError(f"--samples {samples} is larger than the calibration pool ({self.pool} samples)")
        self.labels = None if labels is None else np.asarray(labels)
        self.loss = loss
        self.samples = int(samples)
        self.seed = int(seed)
        self.threads = threads
        self.batch_size = batch_size
        graph_outputs = [v.name for v in teacher.graph.outputs]
        if outputs:
            missing = [o for o in outputs if o not in graph_outputs]
            if missing:
                raise PycompressError(f"output(s) {missing} are not outputs of the model; outputs: {graph_outputs}")
            self.outputs = list(outputs)
        else:
            self.outputs = graph_outputs
        self._teacher = make_session(teacher, threads=threads)
        self._input_names = [i.name for i in self._teacher.get_inputs()]
        # Teacher outputs per sample, filled the first time a sample is drawn.
        self._cache: dict[str, np.ndarray] = {}
        self._cached = np.zeros(self.pool, dtype=bool)
        self._lock = threading.Lock()
        self._energy: float | None = None
        # Pool samples evaluate() never draws (``reserve``); what it estimates is the rest's mean.
        self._reserved = np.zeros(self.pool, dtype=bool)
        self.drawable = self.pool

    def reserve(self, idx: np.ndarray) -> None:
        """Keep pool samples ``idx`` out of every subsample ``evaluate`` draws from now on: a search
        that refits each candidate on them (``pipeline.recovery.SearchRecovery``) must not score the
        refit on the samples it was fitted to. ``evaluate_on`` still takes any sample."""
        self._reserved[np.asarray(idx, dtype=np.int64)] = True
        self.drawable = int(self.pool - self._reserved.sum())
        if self.drawable < self.samples:
            raise PycompressError(f"the calibration pool has {self.drawable} samples besides the "
                                  f"{self.pool - self.drawable} reserved for refitting candidates, fewer than "
                                  f"--samples {self.samples}")

    def order(self, index: int) -> np.ndarray:
        """The drawable pool in the order evaluation ``index`` draws it (a permutation seeded by (seed, index))."""
        order = np.random.default_rng([self.seed, int(index)]).permutation(self.pool)
        return order[~self._reserved[order]] if self.drawable < self.pool else order

    def subsample(self, index: int, samples: int | None = None) -> np.ndarray:
        """Pool indices of evaluation ``index``: the first ``samples`` (default m) of its order, sorted."""
        return np.sort(self.order(index)[: samples or self.samples])

    def teacher_outputs(self, idx: np.ndarray) -> list[np.ndarray]:
        """Teacher outputs on pool samples ``idx``; each sample is run through the teacher once."""
        with self._lock:   # evaluations may run in threads (several devices): fill the cache once
            self._fill_teacher_cache(idx)
        return [self._cache[name][idx] for name in self.outputs]

    def _fill_teacher_cache(self, idx: np.ndarray) -> None:
        missing = idx[~self._cached[idx]]
        if missing.size:
            for start in range(0, missing.size, self.batch_size):
                part = missing[start:start + self.batch_size]
                results = self._teacher.run(self.outputs, self._feeds(part))
                for name, value in zip(self.outputs, results):
                    if name not in self._cache:
                        self._cache[name] = np.empty((self.pool,) + value.shape[1:], value.dtype)
                    self._cache[name][part] = value
            self._cached[missing] = True

    def output_energy(self) -> float:
        """``mean_j ||f*(x_j)||^2`` over the pool (the compared outputs): the unit of a scale-free norm loss."""
        if self._energy is None:
            teacher = self.teacher_outputs(np.arange(self.pool))
            self._energy = float(np.mean(function_norm_losses(teacher, [np.zeros_like(t) for t in teacher])))
        return self._energy

    def evaluate(self, model: ir.Model, index: int,
                 target_se: float | Callable[[float], float] | None = None) -> Estimate:
        """The estimate of ``model``'s fidelity on the subsample of evaluation ``index``.

        ``target_se``: draw further samples of the same order (as many as the
        current variance says are needed, at most the pool) until the
        standard error of the loss is at most this (or this function of the
        current mean loss, for a target relative to the loss).
        """
        order = self.order(index)
        session = make_session(model, threads=self.threads)
        m = self.samples
        idx = np.sort(order[:m])
        losses, student = self._losses(session, idx)
        while target_se is not None and m < self.drawable:
            mean, var = self._mean_var(losses, self.drawable)
            t = float(target_se(mean) if callable(target_se) else target_se)
            if var <= t * t:
                break
            s2 = float(np.var(losses, ddof=1))
            # 1/m' = 1/N + t^2 / s^2 (the finite-population variance at m' is t^2); 10% margin.
            need = self.drawable if s2 <= 0 else math.ceil(1.1 / (1.0 / self.drawable + t * t / s2))
            grown = min(self.drawable, max(need, m + max(2, m // 4)))
            more = np.sort(order[m:grown])
            more_losses, more_student = self._losses(session, more)
            idx = np.concatenate([idx, more])
            losses = np.concatenate([losses, more_losses])
            student = [np.concatenate([a, b]) for a, b in zip(student, more_student)]
            m = grown
        return self._finish(losses, student, idx, self.drawable)

    def evaluate_on(self, model: ir.Model, idx: np.ndarray) -> Estimate:
        """The estimate on given pool samples (e.g. all of them, for a report)."""
        idx = np.asarray(idx, dtype=np.int64)
        losses, student = self._losses(make_session(model, threads=self.threads), idx)
        return self._finish(losses, student, idx, self.pool)

    def _losses(self, session, idx: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """Per-sample losses of the student session on pool samples ``idx``, and its outputs."""
        teacher = self.teacher_outputs(idx)
        parts: list[list[np.ndarray]] = [[] for _ in self.outputs]
        for start in range(0, idx.size, self.batch_size):
            chunk = idx[start:start + self.batch_size]
            for slot, value in zip(parts, session.run(self.outputs, self._feeds(chunk))):
                slot.append(value)
        student = [np.concatenate(p) for p in parts]
        labels = None if self.labels is None else self.labels[idx]
        if self.loss == "norm":
            losses = function_norm_losses(student, teacher)
        elif self.loss == "error":
            losses = top1_error_losses(student[0], labels)
        else:
            losses = cross_entropy_losses(student[0], labels)
        return losses, student

    def _mean_var(self, losses: np.ndarray, population: int) -> tuple[float, float]:
        return mean_and_variance(losses, binary=self.loss == "error", population=population)

    def _finish(self, losses: np.ndarray, student: list[np.ndarray], idx: np.ndarray, population: int) -> Estimate:
        mean, var = self._mean_var(losses, population)
        extras: dict[str, Any] = {}
        logits = _as_2d(student[0])
        teacher = self.teacher_outputs(idx)
        if is_embedding(teacher[0]):
            # An embedding: top-1 over its dimensions means nothing (fidelity.compare).
            extras["cosine"] = float(np.mean(cosine_similarities(teacher[0], student[0])))
        elif logits.shape[1] > 1:
            extras["agreement"] = float(np.mean(np.argmax(logits, 1) == np.argmax(_as_2d(teacher[0]), 1)))
            if self.labels is not None:
                extras["accuracy"] = float(np.mean(np.argmax(logits, 1) == self.labels[idx].ravel()))
        return Estimate(mean, var, int(idx.size), extras)

    def _feeds(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        return {name: self.inputs[name][idx] for name in self._input_names}
