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

Data-aware (FLAP, An et al. 2024; ALGORITHMS.md 1.7): with calibration
statistics of the consumers' inputs (``channel_statistics``, handed over in
``ctx.options["channel_statistics"]`` or streamed from ``ctx.activations``),
``keep: k`` keeps the ``k`` channels of largest *fluctuation*
``sum over consumers var(x_j) * ||W[j, :]||^2`` (what removing channel ``j``
changes in the consumers' outputs beyond a constant), and the removed
channels' mean contribution ``E[x_R] W[R, :]`` is added to the consumers'
biases (MatMul + bias Add, Gemm with C), so the outputs keep their mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from pycompress.errors import PycompressError
from pycompress.ir import (add_initializer, attr_float, bias_add, constant_array, node_macs,
                           remove_unused_initializers, token_mask_input)
from pycompress.ir.channels import ChannelGroup, channel_group, channel_groups
from pycompress.ir.channels.groups import cached_channel_groups, remember_channel_groups
from pycompress.ir.channels.reuse import groups_after_prune
from pycompress.ir.heads import AttentionHeads, attention_head_group, attention_heads, set_shape_entries
from pycompress.plan import LayerDecision
from pycompress.rewrites.base import (ApplyContext, ParamSpec, RefitSpec, Rewrite, SearchRange, SearchSettings, Site,
                                      param_specs)


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


def _kept_channels(group: ChannelGroup, params: dict[str, Any],
                   stats: dict[str, "FeatureStatistics"] | None = None) -> np.ndarray:
    if "keep_indices" in params:
        return np.array(sorted(int(i) for i in params["keep_indices"]), dtype=np.int64)
    if stats is not None:
        scores = fluctuation_scores(group, stats)
        if scores is not None:
            return np.sort(np.argsort(-scores, kind="stable")[:int(params["keep"])])
    return top_l1(group, int(params["keep"]))


# --------------------------------------------------------------------------- data-aware (FLAP)

@dataclass
class FeatureStatistics:
    """Per-feature mean and variance of a tensor over calibration rows (tokens, pixels, samples)."""

    mean: np.ndarray
    var: np.ndarray
    rows: int


def _consumer_slices(group: ChannelGroup) -> list:
    return [s for s in group.slices if s.role == "consumer weight" and s.ir_node.op_type in ("MatMul", "Gemm", "Conv")]


def _consumer_input(node: ir.Node) -> ir.Value:
    """The activation a consumer reads (a MatMul may hold its weight on the left)."""
    if node.op_type == "MatMul" and constant_array(node.inputs[0]) is not None:
        return node.inputs[1]
    return node.inputs[0]


def _feature_axis(node: ir.Node, ndim: int) -> int:
    if node.op_type == "MatMul":
        return ndim - 2 if constant_array(node.inputs[0]) is not None else ndim - 1
    return 1


def _readers(group) -> dict[str, ir.Node]:
    """Tensor -> the consumer reading it, for the fluctuation criterion of a channel group
    (its consumers' inputs) or of attention heads (the output projection's input)."""
    if isinstance(group, AttentionHeads):
        return {group.output.inputs[0].name: group.output}
    return {_consumer_input(s.ir_node).name: s.ir_node for s in _consumer_slices(group)}


def statistics_tensors(group) -> list[str]:
    """The tensors whose statistics the fluctuation criterion of ``group`` reads."""
    return list(_readers(group))


def channel_statistics(groups: list[ChannelGroup], activations,
                       token_mask: str | None = None) -> dict[str, FeatureStatistics]:
    """Stream the consumers' inputs of ``groups`` once (an ``ActivationSource``) into per-feature
    mean / variance (float64), keyed by tensor name. ``token_mask``: the graph input
    (``B x T``, 0 at padding) of a token model; padding tokens of ``B x T x D``
    inputs are left out."""
    readers: dict[str, ir.Node] = {}
    for group in groups:
        for name, node in _readers(group).items():
            readers.setdefault(name, node)
    if not readers:
        return {}
    sums: dict[str, list] = {}
    for batch in activations(list(readers) + ([token_mask] if token_mask else [])):
        mask = np.asarray(batch[token_mask]).reshape(-1) != 0 if token_mask else None
        for name, node in readers.items():
            x = np.asarray(batch[name], dtype=np.float64)
            tokens = (mask is not None and x.ndim == 3 and _feature_axis(node, 3) == 2
                      and x.shape[0] * x.shape[1] == mask.size)
            x = np.moveaxis(x, _feature_axis(node, x.ndim), -1).reshape(-1, x.shape[_feature_axis(node, x.ndim)])
            if tokens:
                x = x[mask]
            acc = sums.setdefault(name, [0, 0.0, 0.0])
            acc[0] += x.shape[0]
            acc[1] = acc[1] + x.sum(axis=0)
            acc[2] = acc[2] + (x * x).sum(axis=0)
    out = {}
    for name, (n, s1, s2) in sums.items():
        mean = s1 / max(n, 1)
        out[name] = FeatureStatistics(mean, np.maximum(s2 / max(n, 1) - mean * mean, 0.0), int(n))
    return out


def _input_rows(node: ir.Node, weight: np.ndarray, axis: int) -> np.ndarray:
    """Squared norm of each consumer weight slice along ``axis`` (the input features): ``||W[j, :]||^2``."""
    w = np.moveaxis(weight.astype(np.float64), axis, 0)
    return (w.reshape(w.shape[0], -1) ** 2).sum(axis=1)


def fluctuation_scores(group: ChannelGroup, stats: dict[str, FeatureStatistics]) -> np.ndarray | None:
    """FLAP's fluctuation per group channel, summed over the consumers; None without statistics
    for every consumer (then the caller falls back to L1).

    A Conv consumer's input feature is a channel (its variance over pixels); its
    weight slice spans the kernel. A flattened consumer (positions per channel)
    sums over the channel's positions.
    """
    slices = _consumer_slices(group)
    if not slices:
        return None
    scores = np.zeros(group.width, dtype=np.float64)
    for s in slices:
        st = stats.get(_consumer_input(s.ir_node).name)
        weight = constant_array(s.ir_node.inputs[s.input_index])
        if st is None or weight is None:
            return None
        norms = _input_rows(s.ir_node, weight, s.axis)
        if len(st.var) != weight.shape[s.axis]:
            return None
        np.add.at(scores, s.channels, st.var[s.positions] * norms[s.positions])
    return scores


def _compensate_biases(model: ir.Model, group: ChannelGroup, keep: np.ndarray,
                       stats: dict[str, FeatureStatistics]) -> list[str]:
    """Add ``E[x_R] W[R, :]`` of the removed channels to each consumer's bias (before the
    weights are pruned); returns the consumers compensated."""
    done = []
    for s in _consumer_slices(group):
        node = s.ir_node
        st = stats.get(_consumer_input(node).name)
        if st is None or node.op_type == "Conv":
            continue   # a conv's mean contribution depends on padding at the borders: left to recovery
        removed = s.positions[~np.isin(s.channels, keep)]
        if removed.size == 0:
            continue
        weight = constant_array(node.inputs[s.input_index]).astype(np.float64)
        w = np.moveaxis(weight, s.axis, 0)           # (in, out)
        shift = st.mean[removed] @ w[removed]
        bias_value, bias_index, owner = None, None, None
        if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
            owner, bias_index = node, 2
            shift = shift / attr_float(node, "beta", 1.0) * attr_float(node, "alpha", 1.0)
        elif node.op_type == "MatMul":
            uses = list(node.outputs[0].uses())
            if len(uses) == 1 and uses[0].node.op_type == "Add" and not node.outputs[0].is_graph_output():
                owner, bias_index = uses[0].node, 1 - uses[0].idx
        if owner is None:
            continue
        bias_value = constant_array(owner.inputs[bias_index])
        if bias_value is None or bias_value.size != shift.size:
            continue
        new = (bias_value.astype(np.float64) + shift.reshape(bias_value.shape)).astype(bias_value.dtype)
        base = owner.inputs[bias_index].name or "bias"
        owner.replace_input_with(bias_index, add_initializer(model, f"{base}_compensated", new))
        done.append(node.name)
    return done


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


def prune_group(model: ir.Model, group: ChannelGroup, keep: np.ndarray,
                stats: dict[str, FeatureStatistics] | None = None) -> dict[str, Any]:
    """Remove every group channel not in ``keep`` from all members, in place
    (with ``stats``: the consumers' biases compensated for the removed channels' means).

    Shapes of the carriers are updated here (so later rewrites see them);
    ``apply_plan`` re-runs shape inference and the checker afterwards.
    """
    keep = np.asarray(keep, dtype=np.int64)
    groups_before = cached_channel_groups(model)
    if groups_before is not None and not any(g is group for g in groups_before):
        groups_before = None                  # a group of another analysis: the cache cannot follow
    nodes = _unique_nodes([s.ir_node for s in group.slices] + [c.ir_node for c in group.counts])
    params_before, macs_before = _affected_cost(model, nodes)
    compensated = _compensate_biases(model, group, keep, stats) if stats else []

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
    if groups_before is not None and len(np.unique(keep)) > 1:
        # The next prune of this plan needs the groups of the pruned graph: updated, not walked again.
        # (One channel left: a per-channel constant may now broadcast; a walk decides.)
        remember_channel_groups(model, groups_after_prune(groups_before, group, keep))
    params_after, macs_after = _affected_cost(model, nodes)
    consumers = _unique_nodes([s.ir_node for s in group.slices if s.role == "consumer weight"])
    return {"width": group.width, "kept": int(len(keep)), "removed": int(group.width - len(keep)),
            "kept_indices": [int(i) for i in np.sort(np.asarray(keep))],
            # For recovery (by tensor, not node name): the consumers read only the kept channels
            # now and are refitted; the producers' outputs keep the teacher's channels kept_indices.
            "refit": [{"output": n.outputs[0].name} for n in consumers]
            + [{"output": p.output} for p in group.producers if p.ir_node is not None
               and p.ir_node.op_type in ("MatMul", "Gemm")],
            "producer_outputs": [p.output for p in group.producers],
            "bias_compensated": compensated,
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


# --------------------------------------------------------------------------- attention heads

def head_scores(group: AttentionHeads, stats: dict[str, FeatureStatistics] | None) -> np.ndarray:
    """Per head: FLAP's fluctuation of the output projection's input rows of the head
    (``sum var(x_j) ||W_O[j, :]||^2``) with statistics, else the L1 norm of the head's
    Q/K/V columns and O rows."""
    w_o = constant_array(group.output.inputs[1]).astype(np.float64)
    st = (stats or {}).get(group.output.inputs[0].name)
    if st is not None and len(st.var) == w_o.shape[0]:
        per_row = st.var * (w_o ** 2).sum(axis=1)
    else:
        per_row = np.abs(w_o).sum(axis=1)
        for node in group.projections:
            per_row = per_row + np.abs(constant_array(node.inputs[1]).astype(np.float64)).sum(axis=0)
    return per_row.reshape(group.heads, group.head_dim).sum(axis=1)


def _replace(model: ir.Model, node: ir.Node, index: int, array: np.ndarray) -> None:
    base = node.inputs[index].name or "weight"
    node.replace_input_with(index, add_initializer(model, _pruned_name(base), np.ascontiguousarray(array)))


def prune_heads(model: ir.Model, group: AttentionHeads, keep: np.ndarray,
                stats: dict[str, FeatureStatistics] | None = None) -> dict[str, Any]:
    """Keep the heads ``keep`` of an attention block, in place (ir.heads): Q/K/V columns and
    biases, O rows, the head counts in the Reshapes; with ``stats``, O's bias gets the removed
    heads' mean contribution ``E[x_R] W_O[R, :]``."""
    keep = np.sort(np.asarray(keep, dtype=np.int64))
    nodes = _unique_nodes(group.projections + [group.output])
    params_before, macs_before = _affected_cost(model, nodes)
    cols = group.columns(keep)
    removed = np.setdiff1d(np.arange(group.heads * group.head_dim), cols)
    compensated = []
    w_o = constant_array(group.output.inputs[1])
    st = (stats or {}).get(group.output.inputs[0].name)
    bias = bias_add(group.output)
    if st is not None and bias is not None and removed.size:
        add, slot = bias
        b = constant_array(add.inputs[slot])
        shift = st.mean[removed] @ w_o.astype(np.float64)[removed]
        _replace(model, add, slot, (b.astype(np.float64) + shift.reshape(b.shape)).astype(b.dtype))
        compensated.append(group.output.name)
    for node in group.projections:
        _replace(model, node, 1, constant_array(node.inputs[1])[:, cols])
        bias = bias_add(node)
        if bias is not None:
            add, slot = bias
            b = constant_array(add.inputs[slot])
            if b.shape[-1] == group.heads * group.head_dim:
                _replace(model, add, slot, b[..., cols])
    _replace(model, group.output, 1, w_o[cols, :])
    set_shape_entries(model, [(count, len(keep) * count.per_head) for count in group.counts], _pruned_name)
    for node in group.nodes_between:      # shapes are re-inferred by apply_plan
        for out in node.outputs:
            if out is not None and not out.is_graph_output():
                out.shape = None
    _remove_dead_constants(model)
    remove_unused_initializers(model)
    params_after, macs_after = _affected_cost(model, nodes)
    outputs = [n.outputs[0].name for n in group.projections]
    return {"width": group.heads, "kept": int(len(keep)), "removed": int(group.heads - len(keep)),
            "kept_indices": [int(i) for i in keep], "kept_channels": [int(c) for c in cols],
            "head_dim": group.head_dim, "refit": [{"output": group.output.outputs[0].name}]
            + [{"output": o} for o in outputs], "producer_outputs": outputs, "bias_compensated": compensated,
            "params_before": params_before, "params_after": params_after,
            "macs_before": macs_before, "macs_after": macs_after}


def _statistics_for(group, ctx: ApplyContext) -> dict[str, FeatureStatistics] | None:
    """The fluctuation statistics of ``group``'s consumers: precomputed ones
    (``ctx.options["channel_statistics"]``, e.g. on the teacher for a whole
    search), else streamed from ``ctx.activations`` when the context asks for
    data-aware rewrites; None: prune by L1."""
    given = ctx.options.get("channel_statistics")
    names = statistics_tensors(group)
    if not names:
        return None
    if given is not None:
        return given if all(n in given for n in names) else None
    if ctx.activations is not None and ctx.options.get("data_aware"):
        return channel_statistics([group], ctx.activations, ctx.options.get("token_mask"))
    return None


class PruneChannels(Rewrite):
    action = "prune"
    summary = "remove channels of a coupled channel group from all its layers (structured pruning)"
    params = param_specs(
        ParamSpec("keep", int, "number of the group's channels to keep; the ones with the largest weight L1 norm",
                  low=1, high="width", searchable=True),
        ParamSpec("keep_indices", list, "exactly which group channels to keep (0-based, e.g. from PFA)",
                  checked_by_rewrite=True),
    )
    order = 10      # pruning changes shapes: before factorizations, sharing and quantization
    changes = "shape"
    created_names = ("_pruned", "_compensated")

    def search_dimension(self, model: ir.Model, site: Site, settings: SearchSettings) -> SearchRange | str:
        """Channels kept, ``ceil((1 - max_prune) width) .. width`` in multiples of ``align`` (width: untouched)."""
        high = int(site.info.get("width", 0) or 0)
        if high < 2:
            return "nothing to reduce"
        max_prune, align = settings.max_prune, settings.align
        low = max(1, min(high, math.ceil(round((1.0 - max_prune) * high, 9))))
        if low >= high or -(-low // align) * align >= high:
            return f"--max-prune {max_prune:g} / --align {align} leave nothing to remove"
        return SearchRange("keep", "keep", high, low, untouched_from=high, align=align)

    def prepare(self, model: ir.Model, decisions: list[LayerDecision] | None, activations,
                log) -> dict[str, Any]:
        """FLAP: channels kept by fluctuation (with bias compensation), from one pass on the original,
        for a search or for decisions that give a count (``keep``), not explicit channels."""
        if decisions is not None and not any("keep" in d.params for d in decisions):
            return {}
        log(f"pruning criterion: fluctuation statistics of the {'prunable' if decisions is None else 'pruned'} "
            "groups' consumers (one pass)")
        groups = [g for g in channel_groups(model) if g.prunable] + attention_heads(model)
        return {"channel_statistics": channel_statistics(groups, activations, token_mask_input(model))
                if groups else {}}

    def search_seeds(self, model: ir.Model, options: dict[str, Any], target_macs: float | None) -> list:
        """Token models: the global FLAP allocation of heads and FFN widths (``rewrites/allocation.py``):
        a Sobol design in ~24 dimensions starts far too compressed for an encoder."""
        from pycompress.rewrites.allocation import search_seeds

        return search_seeds(model, options.get("channel_statistics"), target_macs)

    def refit_spec(self, site: str, result: dict[str, Any]) -> RefitSpec:
        """The consumers and linear producers (``result["refit"]``); the producers' outputs
        keep the teacher's channels ``kept_indices`` (attention heads: ``kept_channels``)."""
        spec = super().refit_spec(site, result)
        if "kept_indices" in result:
            kept = result.get("kept_channels", result["kept_indices"])
            spec.teacher_channels = {output: kept for output in result.get("producer_outputs", [])}
        return spec

    def sites(self, model: ir.Model) -> list[Site]:
        sites = []
        for heads in attention_heads(model):
            sites.append(Site(heads.id, self.action, heads.nodes, info=heads.info()))
        for group in channel_groups(model):
            reason = group.blocked_by or ("" if group.width > 1 else "has a single channel")
            sites.append(Site(group.id, self.action, group.nodes, ok=group.prunable, reason=reason,
                              info=group.info()))
        return sites

    def site(self, model: ir.Model, name: str) -> Site:
        if name.startswith("heads:"):
            heads = attention_head_group(model, name)
            return Site(heads.id, self.action, heads.nodes, info=heads.info())
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
            return   # checked by its spec (1 .. the group's width)
        indices = params["keep_indices"]
        if not isinstance(indices, list) or not indices:
            raise PycompressError(f"{where}: 'keep_indices' must be a non-empty list of channel indices")
        if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < width for i in indices):
            raise PycompressError(f"{where}: 'keep_indices' must be integers in [0, {width - 1}]")
        if len(set(indices)) != len(indices):
            raise PycompressError(f"{where}: 'keep_indices' has repeated channels")

    def apply(self, model: ir.Model, decision: LayerDecision, ctx: ApplyContext) -> dict[str, Any]:
        if decision.site.startswith("heads:"):
            heads = attention_head_group(model, decision.site)
            self.check_params(Site(heads.id, self.action, heads.nodes, info=heads.info()), decision.params)
            stats = _statistics_for(heads, ctx)
            if "keep_indices" in decision.params:
                keep = np.array(sorted(decision.params["keep_indices"]), dtype=np.int64)
            else:
                keep = np.sort(np.argsort(-head_scores(heads, stats), kind="stable")[:int(decision.params["keep"])])
            result = prune_heads(model, heads, keep, stats)
            result["criterion"] = "fluctuation" if stats else "l1"
            return result
        group = channel_group(model, decision.site)
        if not group.prunable:
            raise PycompressError(f"site '{group.id}': cannot prune: {group.blocked_by or 'a single channel'}")
        site = Site(group.id, self.action, group.nodes, info={"width": group.width})
        self.check_params(site, decision.params)
        stats = _statistics_for(group, ctx) if "keep" in decision.params else None
        result = prune_group(model, group, _kept_channels(group, decision.params, stats), stats)
        if "keep" in decision.params:
            result["criterion"] = "fluctuation" if stats else "l1"
        return result

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
        if align > 1 and not site.name.startswith("heads:"):    # heads are counted whole
            count = min(width, max(align, align * math.floor(count / align + 0.5)))
        if count == width:
            return None
        return LayerDecision(site.name, self.action, {"keep": count}, note=f"keep {count}/{width} by L1 norm")


REWRITE = PruneChannels()
