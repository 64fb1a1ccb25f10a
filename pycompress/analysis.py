"""PFA on a model with data: decision sites -> responses -> spectra -> recipe -> Plan.

This module wires the parts together (it is the only one that sees the
graph, onnxruntime and the decisions at once):

* ``find_sites(model)``: the decision sites and, for the footprint target,
  which nodes lose output channels and which lose input channels;
* ``pycompress.fidelity.responses``: one streaming pass over the data;
* ``pycompress.decisions.pfa``: spectra, PFA-En / PFA-KL / footprint recipes,
  filter selection, the Plan.

For the pipeline (``compress --method pfa``) and PAC-BO seeding (``--init
pfa``) the entry point is ``pfa_plan(model, calibration, ...)``; ``analyze``
gives the per-layer numbers that ``pycompress analyze`` reports, and
``plan_from_analysis`` turns one analysis into several plans without a
second pass over the data.

Sites, for now: every Conv (group 1) / Gemm / MatMul with a constant weight
whose output reaches only per-channel ops (BatchNormalization, activations,
pooling, Dropout, Identity, Flatten) and then input channels of other such
producers. Outputs that reach anything else (residual Add, Concat,
depthwise convs, graph outputs) belong to coupled channel groups, which
``pycompress.ir.channels`` (the channel-pruning issue) provides; until it
is merged, those layers are listed as skipped with the op that stopped the
walk. A group's responses (``PfaSite.responses``, several tensors) are
combined by ``pooled_covariance``.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from pycompress.data import Calibration
from pycompress.decisions.pfa import (
    DEFAULT_TAUS,
    CostModel,
    LayerSpectrum,
    Recipe,
    build_plan,
    pfa_recipe,
    pooled_covariance,
)
from pycompress.errors import PycompressError
from pycompress.fidelity.responses import collect_responses, response_tensor
from pycompress.ir import attr_int, constant_array, model_cost
from pycompress.plan import Plan

COST_MEASURES = ("params", "macs")


@dataclass
class PfaSite:
    """One decision site as PFA needs it (a layer, or a group of coupled layers).

    ``responses``: the producer output tensors whose responses are combined
    into the site's covariance (one per producer of the group).
    ``out_nodes``: nodes that lose output channels with the site (producers,
    per-channel ops such as BatchNormalization, depthwise convs).
    ``in_nodes``: node -> share of that node's input channels that belong
    to the site (1.0 for a direct consumer; a smaller share behind a Concat).
    """

    id: str
    width: int
    responses: list[str]
    out_nodes: list[str]
    in_nodes: dict[str, float]
    op: str = ""


@dataclass
class SkippedSite:
    id: str
    reason: str
    width: int | None = None


# Per-channel ops a producer's channels pass through unchanged in number.
_PASS_THROUGH = {"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu",
                 "Celu", "Gelu", "Softplus", "Mish", "Dropout", "Identity", "MaxPool", "AveragePool",
                 "GlobalAveragePool", "GlobalMaxPool", "LpPool"}
_PRODUCERS = ("Conv", "Gemm", "MatMul")


def _producer_width(node: ir.Node) -> tuple[int | None, str]:
    """Output channels of a prunable producer, or (None, why not)."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in _PRODUCERS:
        return None, ""
    weight = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if weight is None:
        return None, "weight is not a constant"
    if node.op_type == "Conv":
        if attr_int(node, "group", 1) != 1:
            return None, "grouped/depthwise conv: its channels follow its input's producer"
        return int(weight.shape[0]), ""
    if node.op_type == "Gemm":
        if weight.ndim != 2:
            return None, "Gemm weight is not 2-D"
        return int(weight.shape[0] if attr_int(node, "transB", 0) else weight.shape[1]), ""
    if weight.ndim != 2:
        return None, "MatMul weight is not 2-D"
    return int(weight.shape[1]), ""


def _consumer_ok(node: ir.Node, index: int, flattened: bool) -> bool:
    """Does ``node`` read the channels as input channels of a weight we can shrink?"""
    if index != 0 or node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type == "Conv":
        return not flattened and attr_int(node, "group", 1) == 1 and constant_array(node.inputs[1]) is not None
    if node.op_type == "Gemm":
        return attr_int(node, "transA", 0) == 0 and constant_array(node.inputs[1]) is not None
    if node.op_type == "MatMul":
        return constant_array(node.inputs[1]) is not None
    return False


def _direct_site(node: ir.Node, width: int) -> PfaSite | SkippedSite:
    out = node.outputs[0]
    site = PfaSite(node.name, width, [out.name], [node.name], {}, node.op_type)
    frontier = [(out, False)]
    while frontier:
        value, flattened = frontier.pop()
        if value.is_graph_output():
            return SkippedSite(node.name, f"its channels reach the graph output '{value.name}'", width)
        for use in value.uses():
            reader, index = use.node, use.idx
            op = reader.op_type
            if index == 0 and op in _PASS_THROUGH:
                frontier.append((reader.outputs[0], flattened))
            elif index == 0 and op == "BatchNormalization":
                site.out_nodes.append(reader.name)
                frontier.append((reader.outputs[0], flattened))
            elif index == 0 and op in ("Flatten", "Reshape") and _flattens_to_features(reader):
                frontier.append((reader.outputs[0], True))
            elif _consumer_ok(reader, index, flattened):
                site.in_nodes[reader.name] = 1.0
            else:
                return SkippedSite(node.name, f"its channels reach {op} '{reader.name}' (a coupled group or an "
                                              "op this walk does not follow; see pycompress.ir.channels)", width)
    return site


def _flattens_to_features(node: ir.Node) -> bool:
    # (N, C, H, W) -> (N, C*H*W): each channel becomes H*W consecutive features.
    src, dst = node.inputs[0].shape, node.outputs[0].shape
    if src is None or dst is None or len(dst) != 2 or len(src) < 2:
        return False
    return node.op_type == "Reshape" or attr_int(node, "axis", 1) == 1


def find_sites(model: ir.Model) -> tuple[list[PfaSite], list[SkippedSite]]:
    """PFA decision sites of ``model`` (see the module docstring) and the producers left out, with why."""
    sites: list[PfaSite] = []
    skipped: list[SkippedSite] = []
    for node in model.graph:
        width, why = _producer_width(node)
        if width is None:
            if why:
                skipped.append(SkippedSite(node.name, why))
            continue
        found = _direct_site(node, width)
        (sites if isinstance(found, PfaSite) else skipped).append(found)
    return sites, skipped


def site_cost_model(model: ir.Model, sites: Sequence[PfaSite], measure: str = "params") -> tuple[CostModel, float]:
    """``(cost(keep), full cost)``: the model's parameters or MACs when site ``s`` keeps ``keep[s]`` channels.

    Each node's cost is scaled by the fraction of its output channels kept
    (if it is in a site's ``out_nodes``) times the fraction of its input
    channels kept (``1 - sum share * removed / width`` over the sites it
    consumes). Biases and per-channel parameters scale with the outputs
    only. Exact for Conv / Gemm / MatMul / BatchNormalization; every other
    node keeps its cost.
    """
    if measure not in COST_MEASURES:
        raise PycompressError(f"cost measure {measure!r}: expected one of {', '.join(COST_MEASURES)}")
    nodes = {node.name: node for node in model.graph}
    index = {site.id: i for i, site in enumerate(sites)}
    out_site: dict[str, int] = {}
    in_sites: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for i, site in enumerate(sites):
        for name in site.out_nodes:
            out_site[name] = i
        for name, share in site.in_nodes.items():
            in_sites[name].append((i, share))
    fixed = 0.0
    # (amount, output site or -1, [(input site, share)])
    terms: list[tuple[float, int, list[tuple[int, float]]]] = []
    for layer in model_cost(model).layers:
        amount = float(layer.params if measure == "params" else layer.macs)
        name = layer.name
        if name not in out_site and name not in in_sites:
            fixed += amount
            continue
        o, ins = out_site.get(name, -1), in_sites.get(name, [])
        node = nodes.get(name)
        if measure == "params" and node is not None and node.op_type in ("Conv", "Gemm") and len(node.inputs) > 2:
            bias = constant_array(node.inputs[2])
            if bias is not None:
                terms.append((float(bias.size), o, []))
                amount -= float(bias.size)
        if node is not None and node.op_type not in _PRODUCERS:
            ins = []  # per-channel parameters (BatchNormalization) follow the outputs only
        terms.append((amount, o, ins))
    full = fixed + sum(t[0] for t in terms)

    def cost(keep: Mapping[str, int]) -> float:
        unknown = set(keep) - set(index)
        if unknown:
            raise KeyError(f"unknown site(s) {sorted(unknown)}")
        kept = np.array([keep.get(s.id, s.width) / s.width for s in sites] + [1.0])  # [-1]: no site
        total = fixed
        for amount, o, ins in terms:
            fi = 1.0 - sum(share * (1.0 - kept[i]) for i, share in ins)
            total += amount * kept[o] * fi
        return total

    return cost, full


@dataclass
class PfaAnalysis:
    """Spectra of every analysed site, the sites left out, and where the time went."""

    layers: list[LayerSpectrum]
    skipped: list[SkippedSite]
    sites: list[PfaSite]
    after: str
    samples: int
    inference_seconds: float
    analysis_seconds: float
    source: str = ""
    data_seconds: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)

    def summary(self, taus: Sequence[float] = DEFAULT_TAUS, *, min_keep: int = 1) -> dict[str, Any]:
        return {
            "source": self.source, "samples": self.samples, "response": self.after,
            "data_seconds": self.data_seconds, "inference_seconds": self.inference_seconds,
            "analysis_seconds": self.analysis_seconds,
            "layers": [layer.summary(taus, min_keep=min_keep) for layer in self.layers],
            "skipped": [{"site": s.id, "width": s.width, "reason": s.reason} for s in self.skipped],
            **self.meta,
        }


def analyze(model: ir.Model, calibration: Calibration, *, sites: Sequence[PfaSite] | None = None,
            after: str = "producer", batch_size: int = 32, progress: bool = True,
            threads: int | None = None) -> PfaAnalysis:
    """One pass over ``calibration``; the spectrum of every site with at least as many samples as filters."""
    if batch_size <= 0:
        raise PycompressError(f"--batch-size must be positive, got {batch_size}")
    skipped: list[SkippedSite] = []
    if sites is None:
        sites, skipped = find_sites(model)
    sites = list(sites)
    if not sites:
        reasons = "; ".join(f"{s.id}: {s.reason}" for s in skipped[:3])
        raise PycompressError(f"no prunable layer found for PFA{' (' + reasons + ')' if reasons else ''}")
    tensors = {site.id: [response_tensor(model, name, after) for name in site.responses] for site in sites}
    stats = collect_responses(model, [t for names in tensors.values() for t in names],
                              calibration.batches(batch_size), total=len(calibration), progress=progress,
                              threads=threads)
    layers: list[LayerSpectrum] = []
    analysis_seconds = stats.analysis_seconds
    for site in sites:
        start = time.perf_counter()
        members = [stats.accumulators[t] for t in tensors[site.id]]
        widths = {m.dim for m in members}
        if widths != {site.width}:
            raise PycompressError(f"site '{site.id}': response widths {sorted(widths)} differ from its width "
                                  f"{site.width}")
        samples = sum(m.count for m in members)
        if samples - len(members) + 1 < site.width:
            skipped.append(SkippedSite(site.id, f"{samples} samples for {site.width} filters: not analysed "
                                                "(PFA needs at least as many samples as filters)", site.width))
            continue
        cov, samples = pooled_covariance(members)
        layer = LayerSpectrum.from_covariance(site.id, cov, samples, op=site.op, responses=tensors[site.id])
        elapsed = time.perf_counter() - start
        analysis_seconds += elapsed
        layer.info["seconds"] = elapsed + sum(stats.accumulate_seconds[t] for t in tensors[site.id])
        layers.append(layer)
    return PfaAnalysis(layers, skipped, sites, after, stats.inputs, stats.inference_seconds, analysis_seconds,
                       calibration.source, stats.data_seconds)


def plan_from_analysis(model: ir.Model, analysis: PfaAnalysis, *, energy: float | None = None,
                       target_size: float | None = None, measure: str = "params",
                       min_keep: int = 1) -> tuple[Plan, Recipe]:
    """PFA-KL by default; PFA-En with ``energy``; ``target_size`` = fraction of the model's ``measure``."""
    if not analysis.layers:
        raise PycompressError("no layer could be analysed (see the skipped layers' reasons)")
    if min_keep < 1:
        raise PycompressError(f"--min-keep must be at least 1, got {min_keep}")
    cost = target = None
    if target_size is not None:
        if not 0.0 < target_size <= 1.0:
            raise PycompressError(f"--target-size must be in (0, 1] (a fraction of the model's {measure}), "
                                  f"got {target_size}")
        analysed = {layer.site for layer in analysis.layers}
        cost, full = site_cost_model(model, [s for s in analysis.sites if s.id in analysed], measure)
        target = target_size * full
    recipe = pfa_recipe(analysis.layers, energy=energy, target=target, cost=cost, min_keep=min_keep)
    meta = {"response": analysis.after, "samples": analysis.samples, "data": analysis.source,
            "measure": measure if target_size is not None else None, "target_size": target_size}
    plan = build_plan(analysis.layers, recipe, model=str(model.meta.get("pycompress.source_path", "")), meta=meta)
    return plan, recipe


def pfa_plan(model: ir.Model, calibration: Calibration, *, energy: float | None = None,
             target_size: float | None = None, measure: str = "params", min_keep: int = 1,
             after: str = "producer", batch_size: int = 32, progress: bool = True,
             threads: int | None = None) -> Plan:
    """A PFA Plan of ``prune`` decisions with explicit ``keep_indices`` for ``model``.

    One pass over ``calibration`` (``Calibration`` from ``pycompress.data``).
    Recipe: PFA-KL (default, parameter-free); PFA-En with ``energy`` (tau in
    [0, 1]); or ``target_size`` in (0, 1]: the largest common tau whose
    recipe keeps at most that fraction of the model's ``measure``
    (``"params"`` or ``"macs"``), counting what pruning removes from the
    consumers. Sites the recipe keeps whole get no decision. ``plan.meta``
    records the recipe, tau, cost and data. Apply with
    ``pycompress.rewrites.apply_plan``.
    """
    analysis = analyze(model, calibration, after=after, batch_size=batch_size, progress=progress, threads=threads)
    plan, _ = plan_from_analysis(model, analysis, energy=energy, target_size=target_size, measure=measure,
                                 min_keep=min_keep)
    return plan
