"""plan -> apply -> validate -> evaluate: the objective the planners call.

The only module that wires the ONNX layer, the rewrites, the fidelity
estimators and the decisions together. For a point ``theta`` of the search
space it decodes a Plan, applies it to a copy of the model, measures the
compressed model on a fresh subsample and returns (paper Eq. 2)

    J(theta) = gamma * Q(f~_theta) + 1 / R(theta),   var(J) = gamma^2 var(Q)

with ``Q = -L^`` (function norm, knowledge distillation), ``1 - error``
(accuracy) or ``-cross entropy`` and ``R`` the cost of the compressed layers
after / before (``--objective``): parameters ("size", the paper's choice),
packed bytes ("bytes": shared weights' indices at their bit width) or MACs
("macs"), all exact, counted on the rewritten graph; or ("latency") the
onnxruntime latency of the whole model on this machine relative to the
original, timed once per candidate. Timing is noisy: its variance enters
``var J`` through ``var(1/R) ~= var(R) / R^4`` and the GP weighs it like the
fidelity noise. Predictions of R without rewriting (gamma selection, the
untouched rule) use MACs for "latency".

Users rarely know gamma: ``select_gamma`` picks it for a target ratio by
bisection: a GP fitted to the quality Q on the initial design predicts, for
each gamma, the maximizer of ``gamma * mu_Q + 1/R`` over many candidates;
``R`` of that maximizer increases with gamma.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import onnx_ir as ir

from pycompress.decisions.bo import Dimension, SearchSpace
from pycompress.errors import PycompressError
from pycompress.fidelity import Estimate, FidelityEstimator
from pycompress.ir import model_cost
from pycompress.plan import LayerDecision, Plan
from pycompress.rewrites import ApplyContext, apply_plan, get_rewrite
from pycompress.rewrites.base import Site
from pycompress.rewrites.pruned_factorizations import PrunedFactorizations

QUALITY = {"norm": "-log relative function norm", "error": "accuracy",
           "cross_entropy": "-cross entropy / log(classes)"}
# Relative squared errors below this count as this (float32 rounding is ~1e-12): keeps log finite.
RELATIVE_FLOOR = 1e-8
# The function norm enters Q through its log (see quality_of); False: -L / scale.
LOG_QUALITY = True


def quality_of(estimate: Estimate, loss: str, scale: float = 1.0) -> tuple[float, float]:
    """(Q, var Q) from a loss estimate ``L`` (see ``quality_scale`` for ``scale``).

    ``norm``: ``Q = -log(L / scale)``, minus the log of the relative squared
    error; its variance by the delta method, ``var(L) / L^2``. The log makes
    gamma and delta mean the same on every model (a multiplicative change of
    the error is the same change of Q everywhere) and turns the error's cliffs
    (one layer cut too far multiplies it by 5-50) into steps a stationary GP
    can follow. ``error``: accuracy ``1 - L``. ``cross_entropy``: ``-L / scale``.
    """
    if loss == "norm" and LOG_QUALITY:
        floor = RELATIVE_FLOOR * scale
        return -math.log(estimate.mean / scale + RELATIVE_FLOOR), estimate.variance / (estimate.mean + floor) ** 2
    if loss == "norm":
        return -estimate.mean / scale, estimate.variance / scale ** 2
    if loss == "error":
        return 1.0 - estimate.mean, estimate.variance
    return -estimate.mean / scale, estimate.variance / scale ** 2


def quality_target(loss: str, scale: float, target_q: float):
    """The standard error of the loss ``L`` that gives ``se(Q) = target_q`` (a function of ``L`` for the log)."""
    if loss == "norm" and LOG_QUALITY:
        return lambda mean: target_q * (mean + RELATIVE_FLOOR * scale)
    return target_q * scale


def quality_scale(estimator: FidelityEstimator) -> float:
    """The unit of the loss that makes Q scale-free (one delta, one gamma mean the same on every model).

    ``norm``: the teacher's mean output energy ``E ||f*(x)||^2`` on the pool,
    so ``-Q`` is the relative squared error (0 = exact, 1 = as far as outputs
    of zero); ``cross_entropy``: ``log(classes)``, a uniform guess's loss;
    ``error``: 1 (accuracy is already a fraction).
    """
    if estimator.loss == "norm":
        energy = estimator.output_energy()
        if not energy > 0:
            raise PycompressError("the model's outputs are all zero on the calibration data: the function norm "
                                  "cannot be made relative (use --labels)")
        return energy
    if estimator.loss == "cross_entropy":
        classes = int(np.prod(estimator.teacher_outputs(np.arange(1))[0].shape[1:]))
        return math.log(max(classes, 2))
    return 1.0


OBJECTIVES = ("size", "bytes", "macs", "latency")
# What the site costs count for each objective (latency: MACs where nothing is timed).
COUNTED = {"size": "params", "bytes": "packed_bytes", "macs": "macs", "latency": "macs"}


@dataclass
class Linear:
    """``before`` and ``after(v) = intercept + slope * v`` of one cost."""

    before: float
    intercept: float
    slope: float

    def at(self, value: np.ndarray) -> np.ndarray:
        return self.intercept + self.slope * value

    @classmethod
    def fit(cls, before: float, values: Sequence[int], after: Sequence[float]) -> Linear:
        if len(values) == 1:
            return cls(before, 0.0, after[0] / values[0])
        slope = (after[1] - after[0]) / (values[1] - values[0])
        return cls(before, after[0] - slope * values[0], slope)


@dataclass
class SiteCost:
    """Cost (parameters, packed bytes or MACs) of one decision site as a function of its value.

    Per node that keeps its name (pruning changes a layer's width, not its
    name) a linear function, and one for the nodes the rewrite replaced
    (a factorization swaps a layer for a pair), with the original names of
    those: channel counts and ranks are linear in the parameter, so two
    applications of the rewrite measure the coefficients exactly.
    """

    nodes: dict[str, Linear]
    replaced: Linear
    replaced_nodes: list[str]

    @property
    def before(self) -> float:
        return sum(c.before for c in self.nodes.values()) + self.replaced.before

    def after(self, value: int | None) -> float:
        if value is None:
            return self.before
        return float(sum(c.at(value) for c in self.nodes.values()) + (self.replaced.at(value)
                                                                        if self.replaced_nodes else 0.0))

    def factors(self, values: np.ndarray, untouched: np.ndarray) -> dict[str, np.ndarray]:
        """Cost after / before of every node this site changes, at ``values`` (1 where untouched)."""
        out = {}
        parts = list(self.nodes.items())
        if self.replaced_nodes:
            parts += [(name, self.replaced) for name in self.replaced_nodes]
        for name, cost in parts:
            if cost.before > 0:
                out[name] = np.where(untouched, 1.0, np.maximum(cost.at(values), 0.0) / cost.before)
        return out


@dataclass
class Measurement:
    """One evaluation of a compressed model: quality and cost ratio R (with its variance, if timed)."""

    quality: float
    quality_var: float
    ratio: float
    estimate: Estimate
    plan: Plan
    seconds: float
    ratio_var: float = 0.0

    def objective(self, gamma: float) -> tuple[float, float]:
        return objective_value(gamma, self.quality, self.quality_var, self.ratio, self.ratio_var)


def objective_value(gamma: float, quality: float, quality_var: float, ratio: float,
                    ratio_var: float) -> tuple[float, float]:
    """``(J, var J)``: ``J = gamma Q + 1/R``; var(1/R) by the delta method (zero for counted, exact ratios)."""
    return gamma * quality + 1.0 / ratio, gamma * gamma * quality_var + ratio_var / ratio ** 4


def objective_from_extras(gamma: float, extras: dict[str, Any]) -> tuple[float, float]:
    """``(J, var J)`` of a saved evaluation (its extras) at another gamma."""
    return objective_value(gamma, float(extras["quality"]), float(extras["quality_var"]), float(extras["ratio"]),
                           float(extras["ratio_var"]))


class CompressionObjective:
    """``objective(theta, index) -> (J, var J, extras)`` for the planners (see module docstring)."""

    def __init__(self, model: ir.Model, space: SearchSpace, estimator: FidelityEstimator, *,
                 gamma: float = 1.0, context: ApplyContext | None = None, objective: str = "size",
                 latency=None, search_recovery=None):
        if objective not in OBJECTIVES:
            raise PycompressError(f"objective {objective!r}: choose one of {', '.join(OBJECTIVES)}")
        if objective == "latency" and latency is None:
            raise PycompressError("objective latency needs a latency probe (pycompress.fidelity.LatencyProbe)")
        self.model = model
        self.estimator = estimator
        self.gamma = float(gamma)
        self.context = context or ApplyContext()
        self.loss = estimator.loss
        self.quality_scale = quality_scale(estimator)
        self.objective = objective
        self.latency = latency
        # pipeline.recovery.SearchRecovery: refit each candidate before scoring it (None: score it as applied).
        self.search_recovery = search_recovery
        self.counted = COUNTED[objective]
        # The original's counted cost per node: the reference of every ratio and prediction.
        self.node_costs = cost = self._node_costs(model)
        self.cost_total = sum(cost.values())
        self._site_nodes = {}
        for dim in space.dimensions:
            site = get_rewrite(dim.action).site(model, dim.site)
            self._site_nodes[(dim.site, dim.action)] = site.nodes
        # Sites may share nodes (a layer between two pruned channel groups): count each node once.
        searched = {n for nodes in self._site_nodes.values() for n in nodes}
        self.cost_sites = sum(cost[n] for n in searched if n in cost)
        if self.cost_sites <= 0:
            raise PycompressError(f"the searched sites hold no {self.counted.replace('_', ' ')} to reduce")
        self.costs = self._measure_costs(space)
        # Values at or above which a layer would not shrink: leave it untouched.
        space = SearchSpace([replace(d, untouched_from=self._untouched_from(d)) for d in space.dimensions])
        self.space = space
        # Layers both pruned and factored: exact cost, and one point per model (rewrites/pruned_factorizations.py).
        self.joint = PrunedFactorizations(model, space, self.costs, cost, self.counted)
        space.canonical = self.joint.canonical
        self._cache: dict[tuple[int, tuple[float, ...]], Measurement] = {}

    # -- sizes ---------------------------------------------------------------
    def _apply(self, decisions: list[LayerDecision]) -> tuple[ir.Model, Plan]:
        model = self.model.clone()
        plan = apply_plan(model, Plan(decisions), self.context, check=False)
        return model, plan

    def _measure_costs(self, space: SearchSpace) -> dict[tuple[str, str], SiteCost]:
        """Each site's cost function: predicted where the rewrite says (``Rewrite.predicted_cost``),
        else measured by applying the rewrite alone at two values."""
        before = self.node_costs
        costs = {}
        for dim in space.dimensions:
            rewrite = get_rewrite(dim.action)
            site_nodes = self._site_nodes[(dim.site, dim.action)]
            predicted = rewrite.predicted_cost(self.objective)
            if predicted is not None:
                # The low end costs `predicted` of the layers as they are; the high end leaves them.
                nodes = [n for n in site_nodes if n in before]
                costs[(dim.site, dim.action)] = SiteCost(
                    {n: Linear.fit(before[n], [dim.low, dim.high], [predicted * before[n], before[n]])
                     for n in nodes}, Linear(0.0, 0.0, 0.0), [])
                continue
            values = sorted({dim.high, max(dim.low if dim.kind == "keep" else 1, dim.high // 2)})
            afters = [self._node_costs(self._apply([LayerDecision(dim.site, dim.action, {dim.param: v})])[0])
                      for v in values]
            replaced = [n for n in before if n not in afters[0]]
            added = [sum(c for n, c in after.items() if n not in before) for after in afters]
            owner = rewrite.cost_owner(Site(dim.site, dim.action, list(site_nodes)))
            if owner is not None and owner in before:
                # The new nodes' cost belongs to the layer the rewrite names (e.g. a codebook
                # lookup to the layer it feeds), not to nodes it replaced.
                for after, extra in zip(afters, added):
                    after[owner] = after.get(owner, 0) + extra
                added = [0.0 for _ in afters]
            changed = sorted({n for after in afters for n in after if n in before and after[n] != before[n]})
            costs[(dim.site, dim.action)] = SiteCost(
                {n: Linear.fit(before[n], values, [after[n] for after in afters]) for n in changed},
                Linear.fit(sum(before[n] for n in replaced), values, added), replaced)
        return costs

    def _node_costs(self, model: ir.Model) -> dict[str, int]:
        return {name: getattr(layer, self.counted) for name, layer in model_cost(model).by_name().items()}

    def _untouched_from(self, dim: Dimension) -> int | None:
        if get_rewrite(dim.action).predicted_cost(self.objective) is not None:
            # A predicted cost may not change (MACs of int8) where the rewrite still changes the
            # model (its latency): keep the rewrite's own untouched end.
            return dim.untouched_from
        cost = self.costs[(dim.site, dim.action)]
        for v in range(dim.low if dim.kind == "keep" else 1, dim.high + 1):
            if cost.after(v) >= cost.before:
                return v
        return None

    def predicted_ratio(self, thetas: np.ndarray) -> np.ndarray:
        """R for many points (M, d) from the site cost functions (no rewriting).

        A node's cost is multiplied by the factor of every site that changes it:
        exact for a layer between two pruned channel groups (its cost is
        proportional to both widths). A layer both pruned and factored gets
        its exact cost at the pruned widths, or stays whole where its rank is
        above the pruned layer's r_max (``rewrites/pruned_factorizations.py``).
        """
        decoded = self.joint.decode(thetas)
        base = self.node_costs
        factor: dict[str, np.ndarray] = {}
        for j, dim in enumerate(self.space.dimensions):
            values, untouched = decoded[j]
            values = values.astype(np.float64)
            for name, f in self.costs[(dim.site, dim.action)].factors(values, untouched).items():
                factor[name] = factor[name] * f if name in factor else f
        for name, (factored, f) in self.joint.exact_factors(decoded).items():
            factor[name] = np.where(factored, f, factor[name])
        change = np.zeros(len(thetas))
        for name, f in factor.items():
            change += base[name] * (f - 1.0)
        return (self.cost_sites + change) / self.cost_sites

    # -- evaluation ----------------------------------------------------------
    def compress(self, theta: Sequence[float]) -> tuple[ir.Model, Plan]:
        """The compressed model and applied plan at ``theta`` (checked by the ONNX checker)."""
        model = self.model.clone()
        plan = apply_plan(model, self.space.to_plan(theta), self.context)
        return model, plan

    def _counted(self, model: ir.Model) -> int:
        return getattr(model_cost(model), self.counted)

    def ratio_of(self, compressed: ir.Model) -> float:
        """Counted cost ratio of the compressed sites (parameters, or MACs for "macs" and "latency")."""
        return (self._counted(compressed) - (self.cost_total - self.cost_sites)) / self.cost_sites

    def measure(self, theta: Sequence[float], index: int, target_sd: float | None = None) -> Measurement:
        """Q and R at ``theta`` on the subsample of evaluation ``index`` (cached).

        ``target_sd``: the standard error wanted for ``J`` (``gamma * se(Q)``);
        the subsample grows along its order until it is reached or the pool is
        used up (``FidelityEstimator.evaluate``).
        """
        key = (int(index), tuple(float(v) for v in np.asarray(theta).ravel()), target_sd)
        if key in self._cache:
            return self._cache[key]
        t0 = time.perf_counter()
        model, plan = self._candidate(self.space.decisions(theta))
        target_se = None
        if target_sd is not None and self.gamma > 0:
            target_se = quality_target(self.loss, self.quality_scale, target_sd / self.gamma)
        estimate = self.estimator.evaluate(model, index, target_se=target_se)
        quality, quality_var = quality_of(estimate, self.loss, self.quality_scale)
        if self.objective == "latency":
            ratio, ratio_var = self.latency.ratio(model)
        else:
            ratio, ratio_var = self.ratio_of(model), 0.0
        if ratio <= 0:
            raise PycompressError(f"compressed sites have {ratio:.3g} of their {self.objective}; cannot form 1/R")
        m = Measurement(quality, quality_var, ratio, estimate, plan, time.perf_counter() - t0, ratio_var)
        self._cache[key] = m
        return m

    def _candidate(self, decisions: list[LayerDecision]) -> tuple[ir.Model, Plan]:
        """The model the search scores: the decisions applied, then (with a search recovery) refitted,
        with the decisions applied after recovery (``Rewrite.after_recovery``: quantization) last, as
        the compress pipeline does with the final model."""
        if self.search_recovery is None:
            return self._apply(decisions)
        late = [d for d in decisions if get_rewrite(d.action).after_recovery]
        model, plan = self._apply([d for d in decisions if not get_rewrite(d.action).after_recovery])
        self.search_recovery(model, plan)
        if late:
            plan = Plan(plan.decisions + apply_plan(model, Plan(late), self.context, check=False).decisions)
        return model, plan

    def __call__(self, theta: np.ndarray, index: int,
                 target_sd: float | None = None) -> tuple[float, float, dict[str, Any]]:
        m = self.measure(theta, index, target_sd)
        value, variance = m.objective(self.gamma)
        extras = {"ratio": m.ratio, "ratio_var": m.ratio_var, "ratio_std_error": math.sqrt(m.ratio_var),
                  "quality": m.quality, "quality_scale": self.quality_scale,
                  "quality_var": m.quality_var, "fidelity": m.estimate.mean,
                  "fidelity_std_error": m.estimate.std_error, "samples": m.estimate.samples,
                  **m.estimate.extras, "eval_seconds": m.seconds}
        return value, variance, extras
