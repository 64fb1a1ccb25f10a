"""Structured channel pruning of coupled channel groups (ALGORITHMS.md 1.4).

A site is a channel group from ``pycompress.ir.channels`` (id
``group:<first producer>``). A decision keeps some of the group's channels and
removes the others from every member at once: producer weights (axis 0 of a
Conv weight, the output axis of a Gemm/MatMul weight) and biases,
BatchNormalization statistics, depthwise filters and their ``group``
attribute, per-channel constants, consumer input channels (a Concat consumer
at its offset, a flattened consumer its whole ``H*W`` block per channel),
Reshape/Resize entries that spell the width, and the shapes of every tensor
that carries the channels.

Parameters: ``{"keep": k}`` keeps the ``k`` channels with the largest weight
L1 norm, summed over the group's producers (data-free default), or
``{"keep_indices": [...]}`` keeps exactly those group channels (e.g. from
PFA's correlation selection).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx_ir as ir

from pycompress.errors import PycompressError
from pycompress.ir import add_initializer, constant_array, node_macs, remove_unused_initializers
from pycompress.ir.channels import ChannelGroup, channel_group, channel_groups
from pycompress.plan import LayerDecision
from pycompress.rewrites.base import ApplyContext, Rewrite, Site


def l1_scores(group: ChannelGroup) -> np.ndarray:
    """Score of each group channel: sum over producers of the L1 norm of its output filter.

    ``score[j] = sum_p sum |W_p[c]|`` over producer output channels ``c`` that
    belong to group channel ``j`` (a Conv filter ``W[c, :, :, :]``, a Gemm
    row/column). Shape ``(width,)``.
    """
    scores = np.zeros(group.width, dtype=np.float64)
    for s in group.slices:
        if s.role != "producer weight":
            continue
        weight = constant_array(s.ir_node.inputs[s.input_index])
        per_position = np.abs(np.moveaxis(weight.astype(np.float64), s.axis, 0)).reshape(weight.shape[s.axis], -1)
        np.add.at(scores, s.channels, per_position[s.positions].sum(axis=1))
    return scores


def top_l1(group: ChannelGroup, keep: int) -> np.ndarray:
    """The ``keep`` channels of largest L1 score, ascending (ties: the lower index wins)."""
    order = np.argsort(-l1_scores(group), kind="stable")
    return np.sort(order[:keep])


def _kept_channels(group: ChannelGroup, params: dict[str, Any]) -> np.ndarray:
    if "keep_indices" in params:
        return np.array(sorted(int(i) for i in params["keep_indices"]), dtype=np.int64)
    return top_l1(group, int(params["keep"]))


def _delete(array: np.ndarray, axis: int, removed: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.delete(array, removed, axis=axis))


def _affected_cost(model: ir.Model, nodes: list[ir.Node]) -> tuple[int, int]:
    """(parameters, MACs) of the given nodes, each constant counted once."""
    seen: set[int] = set()
    params = macs = 0
    for node in nodes:
        macs += node_macs(node)
        for value in node.inputs:
            array = constant_array(value)
            if array is None or id(value) in seen or array.ndim == 0 or array.dtype == np.int64:
                continue
            seen.add(id(value))
            params += int(array.size)
    return params, macs


def prune_group(model: ir.Model, group: ChannelGroup, keep: np.ndarray) -> dict[str, Any]:
    """Remove every group channel not in ``keep`` from all members, in place.

    Shapes of the carriers are updated here (so later rewrites see them);
    ``apply_plan`` re-runs shape inference and the checker afterwards.
    """
    keep = np.asarray(keep, dtype=np.int64)
    nodes = _unique_nodes([s.ir_node for s in group.slices] + [c.ir_node for c in group.counts])
    params_before, macs_before = _affected_cost(model, nodes)

    # Constant inputs: positions to delete per (node, input); several slices of
    # one input (a Concat consumer reading two groups is one slice per group,
    # but one group can reach an input twice) are merged.
    edits: dict[tuple[int, int], tuple[ir.Node, int, int, np.ndarray]] = {}
    for s in group.slices:
        removed = s.positions[~np.isin(s.channels, keep)]
        key = (id(s.ir_node), s.input_index)
        if key in edits:
            node, index, axis, before = edits[key]
            if axis != s.axis:
                raise PycompressError(f"site '{group.id}': input {index} of node '{s.node}' is pruned on two axes")
            removed = np.union1d(before, removed)
        edits[key] = (s.ir_node, s.input_index, s.axis, np.unique(removed))
    _rewrite_constants(model, list(edits.values()))

    for c in group.counts:
        removed = int(np.count_nonzero(~np.isin(c.channels, keep)))
        if not removed:
            continue
        node = c.ir_node
        if c.kind == "group attribute":
            groups = node.attributes["group"].value
            node.attributes["group"] = ir.AttrInt64("group", int(groups) - removed)
        else:
            entries = np.array(constant_array(node.inputs[c.input_index]), copy=True)
            entries[c.entry] -= removed
            base = node.inputs[c.input_index].name or "shape"
            node.replace_input_with(c.input_index, add_initializer(model, _pruned_name(base), entries))

    for carrier in group.carriers:
        removed = int(np.count_nonzero(~np.isin(carrier.channels, keep)))
        value = carrier.ir_value
        if removed and value.shape is not None:
            dims = list(value.shape)
            if isinstance(dims[carrier.axis], int):
                dims[carrier.axis] -= removed
                value.shape = ir.Shape(dims)
    _remove_dead_constants(model)
    remove_unused_initializers(model)
    params_after, macs_after = _affected_cost(model, nodes)
    consumers = _unique_nodes([s.ir_node for s in group.slices if s.role == "consumer weight"])
    return {"width": group.width, "kept": int(len(keep)), "removed": int(group.width - len(keep)),
            "kept_indices": [int(i) for i in np.sort(np.asarray(keep))],
            # For recovery (by tensor, not node name): the consumers read only the kept channels
            # now and are refitted; the producers' outputs keep the teacher's channels kept_indices.
            "refit": [{"output": n.outputs[0].name} for n in consumers],
            "producer_outputs": [p.output for p in group.producers],
            "params_before": params_before, "params_after": params_after,
            "macs_before": macs_before, "macs_after": macs_after}


def _unique_nodes(nodes: list[ir.Node]) -> list[ir.Node]:
    return list({id(n): n for n in nodes if n is not None}.values())


def _pruned_name(base: str) -> str:
    return base if base.endswith("_pruned") else f"{base}_pruned"


def _rewrite_constants(model: ir.Model, edits: list[tuple[ir.Node, int, int, np.ndarray]]) -> None:
    """Replace each edited input by its pruned copy.

    A constant read only by edited inputs that all delete the same positions
    gets one shared pruned copy (shared weights stay shared); otherwise each
    edited reader gets its own copy and other readers keep the original.
    """
    by_value: dict[int, list[tuple[ir.Node, int, int, np.ndarray]]] = {}
    values: dict[int, ir.Value] = {}
    for node, index, axis, removed in edits:
        if removed.size == 0:
            continue
        value = node.inputs[index]
        by_value.setdefault(id(value), []).append((node, index, axis, removed))
        values[id(value)] = value
    for key, readers in by_value.items():
        value = values[key]
        array = constant_array(value)
        uses = {(id(u.node), u.idx) for u in value.uses()}
        edited = {(id(node), index) for node, index, _, _ in readers}
        first = readers[0]
        shared = uses == edited and all(r[2] == first[2] and np.array_equal(r[3], first[3]) for r in readers)
        if shared:
            new = add_initializer(model, _pruned_name(value.name or "weight"), _delete(array, first[2], first[3]))
            for node, index, _, _ in readers:
                node.replace_input_with(index, new)
            continue
        for node, index, axis, removed in readers:
            new = add_initializer(model, _pruned_name(value.name or "weight"), _delete(array, axis, removed))
            node.replace_input_with(index, new)


def _remove_dead_constants(model: ir.Model) -> None:
    dead = [n for n in model.graph if n.op_type == "Constant"
            and all(not o.uses() and not o.is_graph_output() for o in n.outputs)]
    if dead:
        model.graph.remove(dead, safe=True)


class PruneChannels(Rewrite):
    action = "prune"
    summary = "remove channels of a coupled channel group from all its layers (structured pruning)"
    params = {
        "keep": "number of the group's channels to keep; the ones with the largest weight L1 norm",
        "keep_indices": "exactly which group channels to keep (0-based, e.g. from PFA)",
    }
    order = 10      # pruning changes shapes: before factorizations, sharing and quantization

    def sites(self, model: ir.Model) -> list[Site]:
        sites = []
        for group in channel_groups(model):
            reason = group.blocked_by or ("" if group.width > 1 else "has a single channel")
            sites.append(Site(group.id, self.action, group.nodes, ok=group.prunable, reason=reason,
                              info=group.info()))
        return sites

    def site(self, model: ir.Model, name: str) -> Site:
        group = channel_group(model, name)
        reason = group.blocked_by or ("" if group.width > 1 else "has a single channel")
        return Site(group.id, self.action, group.nodes, ok=group.prunable, reason=reason, info=group.info())

    def check_params(self, site: Site, params: dict[str, Any]) -> None:
        super().check_params(site, params)
        width = int(site.info["width"])
        where = f"site '{site.name}'"
        if ("keep" in params) == ("keep_indices" in params):
            raise PycompressError(f"{where}: give exactly one of 'keep' or 'keep_indices'")
        if "keep" in params:
            keep = params["keep"]
            if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= width:
                raise PycompressError(f"{where}: 'keep' must be an integer in [1, {width}], got {keep!r}")
            return
        indices = params["keep_indices"]
        if not isinstance(indices, list) or not indices:
            raise PycompressError(f"{where}: 'keep_indices' must be a non-empty list of channel indices")
        if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < width for i in indices):
            raise PycompressError(f"{where}: 'keep_indices' must be integers in [0, {width - 1}]")
        if len(set(indices)) != len(indices):
            raise PycompressError(f"{where}: 'keep_indices' has repeated channels")

    def apply(self, model: ir.Model, decision: LayerDecision, ctx: ApplyContext) -> dict[str, Any]:
        group = channel_group(model, decision.site)
        if not group.prunable:
            raise PycompressError(f"site '{group.id}': cannot prune: {group.blocked_by or 'a single channel'}")
        site = Site(group.id, self.action, group.nodes, info={"width": group.width})
        self.check_params(site, decision.params)
        return prune_group(model, group, _kept_channels(group, decision.params))

    def starting_decision(self, model: ir.Model, site: Site, keep: float = 0.75, align: int = 1,
                          **_: Any) -> LayerDecision | None:
        """Keep the fraction ``keep`` of a prunable group's channels (by L1), at least one.

        ``align > 1`` rounds the count to a multiple of ``align`` (at least
        ``align``, at most the width): onnxruntime's NCHWc convolutions pad
        channels to blocks of 16 (AVX-512) or 8 (AVX2), so unaligned widths
        give back less speed than their MACs promise (docs/pruning.md).
        """
        if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
            raise PycompressError(f"--keep {keep}: must be a fraction in (0, 1]")
        if isinstance(align, bool) or not isinstance(align, int) or align < 1:
            raise PycompressError(f"--align {align}: must be a positive integer")
        if not site.ok:
            return None
        width = int(site.info["width"])
        count = max(1, min(width, math.floor(keep * width + 0.5)))        # rounding half up
        if align > 1:
            count = min(width, max(align, align * math.floor(count / align + 0.5)))
        if count == width:
            return None
        return LayerDecision(site.name, self.action, {"keep": count}, note=f"keep {count}/{width} by L1 norm")


REWRITE = PruneChannels()
