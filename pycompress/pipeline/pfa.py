"""PFA on a model with data: decision sites -> responses -> spectra -> recipe -> Plan.

This module wires the parts together (it is the only one that sees the
graph, onnxruntime and the decisions at once):

* ``find_sites(model)``: the decision sites and, for the footprint target,
  which constants shrink with each site's channels;
* ``pycompress.fidelity.responses``: one streaming pass over the data;
* ``pycompress.decisions.pfa``: spectra, PFA-En / PFA-KL / footprint recipes,
  filter selection, the Plan.

For the pipeline (``compress --method pfa``) and PAC-BO seeding (``--init
pfa``) the entry point is ``pfa_plan(model, calibration, ...)``; ``analyze``
gives the per-layer numbers that ``pycompress analyze`` reports, and
``plan_from_analysis`` turns one analysis into several plans without a
second pass over the data.

Sites are the channel groups of ``pycompress.ir.channels`` (one decision
per group of coupled layers, id ``group:<first producer>``; ``keep_indices``
are group channels), and the Plan is applied by the ``prune`` rewrite. A
group's responses (one tensor per producer, e.g. the convs feeding a
residual Add) are put in group channel order and combined by
``pooled_covariance``. Blocked groups are listed as skipped with the
analysis's reason.
"""

from __future__ import annotations

import time
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
from pycompress.ir import constant_array, model_cost, node_label
from pycompress.ir.channels import ChannelGroup, channel_groups
from pycompress.plan import Plan

COST_MEASURES = ("params", "macs")


@dataclass
class AxisShrink:
    """``count`` positions along ``axis`` of constant input ``input_index`` of ``node`` hold the site's channels.

    A producer's weight on its output axis (``count = width``), its bias, the
    per-channel parameters of BatchNormalization or a depthwise conv, a
    consumer's weight on its input axis (``count = width``, or ``width * H*W``
    behind a Flatten). Removing a fraction ``r`` of the site's channels
    removes ``r * count`` positions there.
    """

    node: str
    input_index: int
    axis: int
    count: int


@dataclass
class PfaSite:
    """One decision site as PFA needs it (a layer, or a group of coupled layers).

    ``responses``: the producer output tensors whose responses are combined
    into the site's covariance (one per producer of a group), and
    ``channel_maps[m][i]``: the site channel of output channel ``i`` of
    response ``m`` (None: the identity). ``shrinks``: every constant the
    site's pruning shrinks, for the footprint cost.
    """

    id: str
    width: int
    responses: list[str]
    shrinks: list[AxisShrink]
    channel_maps: list[np.ndarray] | None = None
    op: str = ""


@dataclass
class SkippedSite:
    id: str
    reason: str
    width: int | None = None


def sites_from_groups(groups: Sequence[ChannelGroup]) -> tuple[list[PfaSite], list[SkippedSite]]:
    """PFA sites from ``pycompress.ir.channels`` groups.

    Each producer's output is a response; ``producer.channels`` maps its
    output channels to the group's channels (the order of ``keep_indices``).
    Every slice (producer weight/bias, BatchNormalization, depthwise filters,
    per-channel constants, consumer weights) shrinks with the group.
    """
    sites: list[PfaSite] = []
    skipped: list[SkippedSite] = []
    for group in groups:
        if not group.prunable:
            skipped.append(SkippedSite(group.id, group.blocked_by or f"width {group.width}: nothing to prune",
                                       group.width))
            continue
        maps = [np.asarray(p.channels, dtype=np.int64) for p in group.producers]
        if any(sorted(m.tolist()) != list(range(group.width)) for m in maps):
            skipped.append(SkippedSite(group.id, "a producer's channels do not map one-to-one onto the group's",
                                       group.width))
            continue
        shrinks = [AxisShrink(s.node, s.input_index, s.axis, len(s.positions)) for s in group.slices]
        ops = sorted({p.op for p in group.producers})
        sites.append(PfaSite(group.id, group.width, [p.output for p in group.producers], shrinks, maps,
                             "+".join(ops)))
    return sites, skipped


def find_sites(model: ir.Model) -> tuple[list[PfaSite], list[SkippedSite]]:
    """PFA decision sites of ``model`` (its channel groups) and the groups left out, with why."""
    return sites_from_groups(channel_groups(model))


def site_cost_model(model: ir.Model, sites: Sequence[PfaSite], measure: str = "params") -> tuple[CostModel, float]:
    """``(cost(keep), full cost)``: the model's parameters or MACs when site ``s`` keeps ``keep[s]`` channels.

    Every constant a site shrinks loses ``count * (1 - k / width)`` positions
    on its axis; a tensor shrunk on two axes (a conv that consumes one site
    and produces another) loses the product. Parameters: the shrunk sizes.
    MACs of a Conv / Gemm / MatMul scale with its weight's size (for
    depthwise convs: with the channels). Exact for those ops; every other
    node keeps its cost.
    """
    if measure not in COST_MEASURES:
        raise PycompressError(f"cost measure {measure!r}: expected one of {', '.join(COST_MEASURES)}")
    nodes = {node_label(node): node for node in model.graph}
    index = {site.id: i for i, site in enumerate(sites)}
    # id(constant) -> (its shape, {axis: [(site index, positions on that axis)]})
    tensors: dict[int, tuple[tuple[int, ...], dict[int, list[tuple[int, int]]]]] = {}
    weights: dict[int, bool] = {}
    for i, site in enumerate(sites):
        for shrink in site.shrinks:
            node = nodes.get(shrink.node)
            value = node.inputs[shrink.input_index] if node is not None and shrink.input_index < len(node.inputs) \
                else None
            array = constant_array(value)
            if array is None:
                raise PycompressError(f"site '{site.id}': input {shrink.input_index} of node '{shrink.node}' "
                                      "is not a constant")
            weights[id(value)] = array.ndim >= 1 and array.dtype != np.int64 and array.dtype.kind in "fiu"
            shape, axes = tensors.setdefault(id(value), (tuple(array.shape), {}))
            axes.setdefault(shrink.axis, []).append((i, shrink.count))

    def kept_shape(shape, axes, kept):
        return [dim - sum(count * (1.0 - kept[i]) for i, count in axes.get(a, ())) for a, dim in enumerate(shape)]

    cost_full = model_cost(model)
    if measure == "params":
        full = float(cost_full.params)
        # Only what model_cost counts as parameters (not int64 shapes or 0-d settings).
        parts = [(float(np.prod(shape)), shape, axes) for key, (shape, axes) in tensors.items() if weights[key]]

        def shrunk(kept):
            return sum(size - float(np.prod(kept_shape(shape, axes, kept))) for size, shape, axes in parts)
    else:
        full = float(cost_full.macs)
        parts = []
        for layer in cost_full.layers:
            node = nodes.get(layer.name)
            if not layer.macs or node is None or len(node.inputs) < 2 or node.inputs[1] is None:
                continue
            entry = tensors.get(id(node.inputs[1]))
            if entry is not None:
                parts.append((float(layer.macs), entry[0], entry[1]))

        def shrunk(kept):
            return sum(macs * (1.0 - float(np.prod(np.divide(kept_shape(shape, axes, kept), shape))))
                       for macs, shape, axes in parts)

    def cost(keep: Mapping[str, int]) -> float:
        unknown = set(keep) - set(index)
        if unknown:
            raise KeyError(f"unknown site(s) {sorted(unknown)}")
        kept = [keep.get(site.id, site.width) / site.width for site in sites]
        return full - shrunk(kept)

    return cost, full


@dataclass
class _Reordered:
    """An accumulator's count and scatter with its channels put in site order."""

    count: int
    scatter: np.ndarray


def _in_site_order(acc: Any, channels: np.ndarray) -> Any:
    # channels[i] = site channel of output channel i  ->  row/column j of the result is site channel j.
    if np.array_equal(channels, np.arange(len(channels))):
        return acc
    order = np.argsort(channels)
    return _Reordered(acc.count, np.asarray(acc.scatter)[np.ix_(order, order)])


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
        if site.channel_maps is not None:
            members = [_in_site_order(m, channels) for m, channels in zip(members, site.channel_maps)]
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
