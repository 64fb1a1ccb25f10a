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

import itertools
import math
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import numpy as np
import onnx_ir as ir

from pycompress.decisions.bo import Dimension, GaussianProcess, SearchSpace
from pycompress.errors import PycompressError
from pycompress.fidelity import Estimate, FidelityEstimator
from pycompress.ir import model_cost, token_mask_input
from pycompress.plan import LayerDecision, Plan
from pycompress.pruned_factorizations import PrunedFactorizations
from pycompress.rewrites import ApplyContext, apply_plan, get_rewrite

# Quality from the fidelity loss: Q is maximized.
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
    def fit(cls, before: float, values: Sequence[int], after: Sequence[float]) -> "Linear":
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


GRANULARITIES = ("layer", "block", "stage")
# Index bits searched for ``share``: below 2 bits even large FC layers collapse.
SHARE_BITS = (2, 8)
# ``quant``: 8 = int8, 9 = the layer stays float (the "untouched" end of the coordinate).
QUANT_BITS = (8, 9)
# Time of an int8 MAC relative to a float one in onnxruntime's CPU kernels (VNNI):
# EfficientNet-Lite0 all int8 ran 2.6 ms against 8.6 ms fp32 (docs/quantization.md).
INT8_MAC_COST = 0.35


def build_search_space(model: ir.Model, actions: Sequence[str], granularity: str = "layer", *,
                       max_prune: float = 1.0, align: int = 1) -> tuple[SearchSpace, list[str]]:
    """One dimension per applicable site: a rank (``svd``, ``lowrank_conv``: ``[1, r_max]``),
    a channel count (``prune``: ``[1, width]``) or index bits (``share``:
    ``SHARE_BITS``, only on layers no factorization searches). A node already
    searched by an earlier action is not searched again. Actions are taken in
    their rewrite order (prune, factorizations, share). Returns the space and
    notes on the sites left out (with the reason).

    ``granularity`` "block" / "stage" makes the sites of one action inside one
    residual block / resolution stage (``pycompress.ir.blocks``) share one
    coordinate of the search (the same fraction of their ranges); "layer"
    searches every site on its own. ``max_prune``: the largest fraction of a
    channel group the search may remove (keeps ``>= ceil((1 - max_prune) C)``);
    ``align``: channel counts searched are multiples of it (or the full width).
    """
    if not 0 < max_prune <= 1:
        raise PycompressError(f"max_prune must be in (0, 1], got {max_prune}")
    if align < 1:
        raise PycompressError(f"align must be a positive integer, got {align}")
    if granularity not in GRANULARITIES:
        raise PycompressError(f"granularity {granularity!r}: choose one of {', '.join(GRANULARITIES)}")
    labels: dict[str, str] = {}
    if granularity != "layer":
        from pycompress.ir.blocks import block_labels, stage_labels

        labels = block_labels(model) if granularity == "block" else stage_labels(model)
    dims: list[Dimension] = []
    notes: list[str] = []
    taken: set[str] = set()
    factored: dict[str, str] = {}
    taken_by_share: set[str] = set()

    def group_of(site, action: str) -> str | None:
        return f"{labels[site.nodes[0]]}:{action}" if site.nodes and site.nodes[0] in labels else None

    # Sharing comes last: the layers left whole by the factorizations.
    actions = sorted(actions, key=lambda a: get_rewrite(a).order)
    for action in actions:
        rewrite = get_rewrite(action)
        if action == "quant":
            dims += _quant_dimensions(rewrite.sites(model), taken_by_share, group_of, notes)
            continue
        searched = rewrite.searchable_param()
        kind = searched.name if searched is not None else ""
        if kind not in ("rank", "keep", "bits"):
            # The dimensions below know how to bound these three (r_max, width, SHARE_BITS).
            raise PycompressError(f"action '{action}' has no searchable 'rank', 'keep' or 'bits' parameter")
        for site in rewrite.sites(model):
            if not site.ok:
                notes.append(f"{site.name} ({action}): {site.reason}")
                continue
            if kind == "rank" and site.name in taken:
                notes.append(f"{site.name} ({action}): already searched by another action")
                continue
            if kind == "bits":
                if site.name in factored:
                    notes.append(f"{site.name} ({action}): factored by {factored[site.name]}; not shared")
                    continue
                dims.append(Dimension(site.name, action, "bits", "keep", high=SHARE_BITS[1], low=SHARE_BITS[0],
                                      group=group_of(site, action)))
                taken_by_share.add(site.name)
                continue
            high = int(site.info.get("r_max" if kind == "rank" else "width", 0) or 0)
            if high < (1 if kind == "rank" else 2):
                notes.append(f"{site.name} ({action}): nothing to reduce")
                continue
            group = group_of(site, action)
            if kind == "rank":
                dims.append(Dimension(site.name, action, "rank", "rank", high=high, group=group))
            else:
                low = max(1, min(high, math.ceil(round((1.0 - max_prune) * high, 9))))
                if low >= high or -(-low // align) * align >= high:
                    notes.append(f"{site.name} ({action}): --max-prune {max_prune:g} / --align {align} "
                                 "leave nothing to remove")
                    continue
                dims.append(Dimension(site.name, action, "keep", "keep", high=high, low=low, untouched_from=high,
                                      group=group, align=align))
            taken.add(site.name)
            if kind == "rank":
                factored[site.name] = action
    if not dims:
        raise PycompressError(f"no site of the model can take {', '.join(actions)}"
                              + (f" ({notes[0]}{', ...' if len(notes) > 1 else ''})" if notes else ""))
    sizes = Counter(d.group for d in dims)
    dims = [replace(d, group=None) if sizes[d.group] == 1 else d for d in dims]   # a group of one is a layer
    dims = [replace(d, positions=rank_positions(model, d)) for d in dims]
    return SearchSpace(dims), notes


def rank_positions(model: ir.Model, dim: Dimension) -> tuple[float, ...] | None:
    """Coordinates of an SVD layer's ranks ``1..r_max``: 3/4 by ``log`` of the weight energy
    the rank discards (scaled to [0, 1]), 1/4 evenly spaced (so every rank keeps a
    step); None (even spacing) for other dimensions. Why: ``encoding`` module doc."""
    if dim.kind != "rank" or dim.action != "svd" or dim.group is not None or dim.high < 3:
        return None
    from pycompress.ir import node_by_name
    from pycompress.rewrites import factorization as fz
    from pycompress.rewrites.svd import matrix_layer

    layer = matrix_layer(node_by_name(model, dim.site))
    if isinstance(layer, str):
        return None
    # truncated_svd's decomposition is the one every evaluation reuses (cached): computed once here.
    values = fz.truncated_svd(layer.matrix, 1)[2]
    power = values.astype(np.float64) ** 2
    total = float(power.sum())
    if total <= 0:
        return None
    discarded = np.maximum(1.0 - np.cumsum(power)[: dim.high] / total, 1e-12)
    even = np.arange(dim.high) / (dim.high - 1)
    span = math.log(discarded[0] / discarded[-1])
    warped = np.log(discarded[0] / discarded) / span if span > 1e-9 else even
    positions = 0.75 * warped + 0.25 * even
    positions[0], positions[-1] = 0.0, 1.0
    return tuple(float(v) for v in positions)


def _quant_dimensions(sites, shared: set[str], group_of, notes: list[str]) -> list:
    """``quant``: one int8-or-float coordinate per layer (bits 8 = int8, 9 = left float), after the others.

    A factored layer's coordinate covers the layers it becomes (``Quantize.site``).
    """
    dims = []
    for site in sites:
        if not site.ok:
            notes.append(f"{site.name} (quant): {site.reason}")
        elif site.name in shared:
            notes.append(f"{site.name} (quant): weights shared (no constant left to quantize)")
        else:
            dims.append(Dimension(site.name, "quant", "bits", "keep", high=QUANT_BITS[1], low=QUANT_BITS[0],
                                  untouched_from=QUANT_BITS[1], group=group_of(site, "quant")))
    return dims


class CompressionObjective:
    """``objective(theta, index) -> (J, var J, extras)`` for the planners (see module docstring)."""

    def __init__(self, model: ir.Model, space: SearchSpace, estimator: FidelityEstimator, *,
                 gamma: float = 1.0, context: ApplyContext | None = None, objective: str = "size",
                 latency=None):
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
        # Layers both pruned and factored: exact cost, and one point per model (pruned_factorizations.py).
        self.joint = PrunedFactorizations(model, space, self.costs, cost, self.counted)
        space.canonical = self.joint.canonical
        self._cache: dict[tuple[int, tuple[float, ...]], Measurement] = {}

    # -- sizes ---------------------------------------------------------------
    def _apply(self, decisions: list[LayerDecision]) -> tuple[ir.Model, Plan]:
        model = self.model.clone()
        plan = apply_plan(model, Plan(decisions), self.context, check=False)
        return model, plan

    def _measure_costs(self, space: SearchSpace) -> dict[tuple[str, str], SiteCost]:
        """Each site's cost function, from the rewrite applied alone at two values."""
        before = self.node_costs
        costs = {}
        for dim in space.dimensions:
            if dim.action == "quant":
                costs[(dim.site, dim.action)] = self._quant_cost(dim)
                continue
            values = sorted({dim.high, max(dim.low if dim.kind == "keep" else 1, dim.high // 2)})
            afters = [self._node_costs(self._apply([LayerDecision(dim.site, dim.action, {dim.param: v})])[0])
                      for v in values]
            replaced = [n for n in before if n not in afters[0]]
            added = [sum(c for n, c in after.items() if n not in before) for after in afters]
            main = next((n for n in self._site_nodes[(dim.site, dim.action)] if n in before), None)
            if not replaced and main is not None and any(added):
                # Weight sharing keeps the layer and adds its codebook lookup:
                # the new nodes' cost belongs to the layer they feed.
                for after, extra in zip(afters, added):
                    after[main] = after.get(main, 0) + extra
                added = [0.0 for _ in afters]
            changed = sorted({n for after in afters for n in after if n in before and after[n] != before[n]})
            costs[(dim.site, dim.action)] = SiteCost(
                {n: Linear.fit(before[n], values, [after[n] for after in afters]) for n in changed},
                Linear.fit(sum(before[n] for n in replaced), values, added), replaced)
        return costs

    def _quant_cost(self, dim: Dimension) -> SiteCost:
        """int8 (bits 8) stores a byte per weight, MACs stay; float (9) is the layer as it is.

        Not measured by applying it: quantizing calibrates the whole graph, per site too slow.
        For "latency" (predicted from MACs before timing) an int8 MAC counts
        ``INT8_MAC_COST`` of a float one, else the gamma choice would see no gain.
        """
        scale = (0.25 if self.counted in ("bytes", "packed_bytes") else
                 INT8_MAC_COST if self.objective == "latency" else 1.0)
        nodes = [n for n in self._site_nodes[(dim.site, dim.action)] if n in self.node_costs]
        lo, hi = QUANT_BITS
        return SiteCost({n: Linear.fit(self.node_costs[n], [lo, hi], [scale * self.node_costs[n],
                                                                    self.node_costs[n]]) for n in nodes},
                        Linear(0.0, 0.0, 0.0), [])

    def _node_costs(self, model: ir.Model) -> dict[str, int]:
        return {name: getattr(layer, self.counted) for name, layer in model_cost(model).by_name().items()}

    def _untouched_from(self, dim: Dimension) -> int | None:
        if dim.action == "quant":
            return dim.untouched_from   # int8 changes latency even where the counted cost (MACs) stays
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
        above the pruned layer's r_max (``pruned_factorizations``).
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
        model, plan = self._apply(self.space.decisions(theta))
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


# -- gamma for a target size ---------------------------------------------------

@dataclass
class GammaChoice:
    gamma: float
    target: float
    predicted_ratio: float
    reachable: bool
    notes: list[str] = field(default_factory=list)


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

    def optimum_ratio(gamma: float) -> float:
        return float(ratios[int(np.argmax(gamma * mu_q + inv_r))])

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
        return GammaChoice(gamma, target, optimum_ratio(gamma), True, notes)
    best = int(np.argmin(np.abs(ratios_at - target)))
    gamma = math.exp(logs[best])
    notes.append(f"target {target:g} is not reached by the predicted optimum (ratios "
                 f"{ratios_at.min():.3g}..{ratios_at.max():.3g}); using the closest, {ratios_at[best]:.3g}")
    return GammaChoice(gamma, target, float(ratios_at[best]), False, notes)


def gamma_from_observations(quality: Sequence[float], ratio: Sequence[float], target: float,
                            quality_var: Sequence[float] | None = None) -> GammaChoice:
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
        return GammaChoice(1.0, target, float(ratios[first]), False, [
            f"no evaluated point has a better quality (beyond its noise) than the smallest, ratio "
            f"{ratios[first]:.3g}: the quality does not measurably grow with size here; gamma 1"])
    if target < ratios[first] or len(hull) == 1:
        gamma = hull[1][1] / 2 if len(hull) > 1 else 1.0
        note = (f"no evaluated point is at or below the target {target:g} on the trade-off yet "
                f"(smallest {ratios[first]:.3g})")
        return GammaChoice(gamma, target, float(ratios[first]), False, [note])
    gamma = 2 * hull[-1][1] if hull[-1][1] > 0 else 1.0
    return GammaChoice(gamma, target, float(ratios[last]), False,
                       [f"the best evaluated quality is at ratio {ratios[last]:.3g}, below the target {target:g}"])


def describe_point(space: SearchSpace, theta: Sequence[float]) -> str:
    """``site=value, ...`` (``full`` for an untouched site)."""
    return ", ".join(f"{dim.site}={'full' if v is None else v}"
                     for dim, v in zip(space.dimensions, space.values(theta)))


# -- data-aware pruning --------------------------------------------------------------

def teacher_channel_statistics(model: ir.Model, inputs: dict[str, np.ndarray], *, samples: int = 512,
                               batch_size: int = 64, seed: int = 0) -> dict:
    """FLAP statistics (``rewrites.prune_channels.channel_statistics``) of every prunable group,
    measured once on the original model: a search then prunes by fluctuation, with bias
    compensation, at no cost per evaluation (``ApplyContext.options["channel_statistics"]``)."""
    from pycompress.fidelity import collect_activations
    from pycompress.ir.channels import channel_groups
    from pycompress.ir.heads import attention_heads
    from pycompress.rewrites.prune_channels import channel_statistics

    groups = [g for g in channel_groups(model) if g.prunable] + attention_heads(model)
    if not groups:
        return {}
    n = len(next(iter(inputs.values())))
    idx = np.sort(np.random.default_rng(seed).choice(n, min(n, samples), replace=False))

    def batches():
        for start in range(0, len(idx), batch_size):
            yield {k: v[idx[start:start + batch_size]] for k, v in inputs.items()}

    return channel_statistics(groups, lambda names: collect_activations(model, names, batches()),
                              token_mask_input(model))


# -- recovery --------------------------------------------------------------------

def recovery_targets(teacher: ir.Model, student: ir.Model, plan: Plan) -> tuple[list, list[str]]:
    """The layers of ``student`` (``teacher`` compressed by ``plan``) that the
    closed-form recovery refits, front to back, and notes on what it skips.

    Each applied decision's result lists what to refit (``result["refit"]``:
    the tensor a rewritten layer produces, and its rank for a factored pair);
    the nodes are found from that tensor in the student, never from the names
    a rewrite gave them (they may be renamed since):

    - ``svd`` and the channel structure of ``lowrank_conv``: the factored pair
      producing the tensor, refitted at its rank (reduced-rank regression)
      against the teacher's tensor of the same name;
    - ``prune``: each consumer of the pruned channels that is a plain linear
      layer (Gemm, MatMul with a constant weight on either side, Conv with
      group 1), refitted on the kept channels.
    A MatMul followed by the Add of its bias is one layer (the bias is refitted
    too, the target is the teacher's tensor after it). Tai's vertical/horizontal
    pair is not a product of two matrices on the same rows and is not refitted.
    """
    from pycompress.recover import RefitTarget
    from pycompress.recover.linear_view import LinearView, check_refittable

    position = {id(node): i for i, node in enumerate(student.graph)}
    teacher_values = {v.name for node in teacher.graph for v in node.outputs if v is not None}
    producers = {v.name: node for node in student.graph for v in node.outputs if v is not None and v.name}
    notes: list[str] = []

    # Teacher channels still produced by a pruned producer, by its output tensor.
    kept_outputs: dict[str, list[int]] = {}
    specs: dict[str, int | None] = {}      # tensor -> rank (None: a single layer)
    for decision in plan.decisions:
        result = decision.result or {}
        if decision.action == "prune" and "kept_indices" in result:
            for output in result.get("producer_outputs", []):
                # attention heads: the kept columns of Q/K/V, not the head numbers
                kept_outputs[output] = result.get("kept_channels", result["kept_indices"])
        if decision.action == "lowrank_conv" and result.get("structure") == "tai":
            notes.append(f"{decision.site}: Tai's vertical/horizontal pair is not refitted")
        for spec in result.get("refit", []):
            rank = spec.get("rank")
            if rank is not None or spec["output"] not in specs:
                specs[spec["output"]] = rank     # a factored pair wins over a single-layer refit

    targets: list[tuple[int, RefitTarget]] = []
    for output, rank in specs.items():
        node = producers.get(output)
        if node is None:
            notes.append(f"{output}: no node of the compressed model produces it; not refitted")
            continue
        reason = check_refittable(node)
        if reason:
            if rank is None and node.op_type in ("Conv",):
                continue   # a depthwise consumer is pruned with its group: nothing to refit
            notes.append(f"{node.name or output}: {reason}; not refitted")
            continue
        view = LinearView.of(node)
        nodes = [node]
        if rank is not None:
            first = view.activation.producer()
            if first is None or check_refittable(first) or LinearView.of(first).output is not view.activation:
                notes.append(f"{output}: the factored pair producing it was not found; not refitted")
                continue
            nodes = [first, node]
        target = view.output.name
        if target not in teacher_values:
            notes.append(f"{output}: the teacher has no tensor '{target}'; not refitted")
            continue
        channels = kept_outputs.get(output)
        width, teacher_width = _feature_width(node, output, student), _feature_width(node, output, teacher)
        if channels is not None and width is not None and len(channels) != width:
            notes.append(f"{node.name or output}: its kept output channels do not map one to one; not refitted")
            continue
        if channels is None and width is not None and teacher_width is not None and width != teacher_width:
            notes.append(f"{node.name or output}: output width changed by a coupled group; not refitted")
            continue
        targets.append((position[id(nodes[0])], RefitTarget([n.name for n in nodes], target, rank=rank,
                                                            target_channels=channels)))
    ordered = [t for _, t in sorted(targets, key=lambda item: item[0])]
    return ordered, notes


def _feature_width(node: ir.Node, output: str, model: ir.Model) -> int | None:
    """Static width of ``model``'s tensor ``output`` on ``node``'s feature axis (None: unknown)."""
    from pycompress.recover.linear_view import feature_axis

    value = next((v for n in model.graph for v in n.outputs if v is not None and v.name == output), None)
    if value is None or value.shape is None:
        return None
    dim = value.shape[feature_axis(node, len(value.shape))]
    return dim if isinstance(dim, int) else None


def recover(teacher: ir.Model, student: ir.Model, plan: Plan, inputs: dict[str, np.ndarray], *,
            samples: int = 512, batch_size: int = 64, seed: int = 0, lam: float = 1e-3,
            progress=None) -> dict[str, Any]:
    """Closed-form layer-wise recovery of ``student`` in place; returns the report's ``recovery`` part."""
    from pycompress.recover import refit_layers

    targets, notes = recovery_targets(teacher, student, plan)
    n = len(next(iter(inputs.values())))
    idx = np.sort(np.random.default_rng(seed).choice(n, min(n, samples), replace=False))
    subset = {k: v[idx] for k, v in inputs.items()}
    # Where the data source knows each sample's source (the photo of a built-in crop), the
    # recovery validates on whole photos left out (recover/layerwise.py).
    groups = next((np.asarray(v.groups) for v in inputs.values() if getattr(v, "groups", None) is not None), None)
    sample_groups = None
    if groups is not None and len(np.unique(groups[idx])) > 1:
        sample_groups = [groups[idx][start:start + batch_size] for start in range(0, len(idx), batch_size)]

    def batches():
        for start in range(0, len(idx), batch_size):
            yield {k: v[start:start + batch_size] for k, v in subset.items()}

    t0 = time.perf_counter()
    report = refit_layers(teacher, student, targets, batches, lam=lam, seed=seed, progress=progress,
                          token_mask=token_mask_input(teacher), sample_groups=sample_groups)
    return {"samples": int(len(idx)), "seconds": time.perf_counter() - t0, "notes": notes, **report.to_dict()}
