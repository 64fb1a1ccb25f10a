"""From the walk's records to ``ChannelGroup``s, and the entry points (cached per model)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from pycompress.ir.channels.model import (
    ChannelCarrier,
    ChannelCount,
    ChannelGroup,
    ChannelProducer,
    ChannelSlice,
    unique,
)
from pycompress.ir.graph import node_label as label
from pycompress.ir.graph import site_by_id
from pycompress.ir.channels.rules import PRODUCER_OPS, RULES
from pycompress.ir.channels.walk import Walk


def build_groups(walk: Walk) -> list[ChannelGroup]:
    n = len(walk.elements)
    if n == 0:
        return []
    roots = np.array([walk.elements.find(e) for e in range(n)], dtype=np.int64)
    # Producers that share an element class form one group.
    space_parent = list(range(len(walk.producers)))

    def find_space(s: int) -> int:
        while space_parent[s] != s:
            space_parent[s] = space_parent[space_parent[s]]
            s = space_parent[s]
        return s

    space = np.asarray(walk.elements.space, dtype=np.int64)
    for e in range(n):
        a, b = find_space(int(space[e])), find_space(int(space[roots[e]]))
        if a != b:
            space_parent[max(a, b)] = min(a, b)
    group_of_producer = [find_space(p) for p in range(len(walk.producers))]
    group_ids = unique(group_of_producer)               # graph order of first producers
    index_of = {g: i for i, g in enumerate(group_ids)}

    # Number each group's channels in the order of its producers' output channels.
    channel_of_root = np.full(n, -1, dtype=np.int64)
    group_of_root = np.full(n, -1, dtype=np.int64)
    widths = [0] * len(group_ids)
    for p, (_, _, _, elems) in enumerate(walk.producers):
        g = index_of[group_of_producer[p]]
        for r in roots[elems]:
            if channel_of_root[r] < 0:
                channel_of_root[r] = widths[g]
                group_of_root[r] = g
                widths[g] += 1

    groups: list[ChannelGroup] = []
    taken: set[str] = set()
    for g, key in enumerate(group_ids):
        name = label(walk.producers[key][0])
        gid, i = f"group:{name}", 1
        while gid in taken:
            i += 1
            gid = f"group:{name}#{i}"
        taken.add(gid)
        groups.append(ChannelGroup(gid, widths[g]))

    def split(elems: np.ndarray):
        """Yield (group index, positions, channels) for the group channels in a layout."""
        valid = np.nonzero(elems >= 0)[0]
        if valid.size == 0:
            return
        r = roots[elems[valid]]
        owner = group_of_root[r]
        for g in np.unique(owner):
            mask = owner == g
            yield int(g), valid[mask], channel_of_root[r[mask]]

    for p, (node, out, axis, elems) in enumerate(walk.producers):
        g = index_of[group_of_producer[p]]
        groups[g].producers.append(ChannelProducer(label(node), node.op_type, out.name or "", axis,
                                                   channel_of_root[roots[elems]], ir_node=node))
    for role, node, index, axis, elems in walk.slices:
        value = node.inputs[index]
        for g, positions, channels in split(elems):
            groups[g].slices.append(ChannelSlice(role, label(node), index, value.name if value is not None else "",
                                                 axis, positions, channels, ir_node=node))
    for kind, node, index, entry, elems in walk.counts:
        for g, positions, channels in split(elems):
            groups[g].counts.append(ChannelCount(kind, label(node), index, entry, positions, channels, ir_node=node))
    for key, value in walk.values.items():
        lay = walk.layouts[key]
        for g, positions, channels in split(lay.elems):
            groups[g].carriers.append(ChannelCarrier(value.name or "", lay.axis, positions, channels, ir_value=value))
    first_block: dict[int, tuple[str, str]] = {}
    for e, reason, where in walk.blocks:
        g = int(group_of_root[roots[e]])
        first_block.setdefault(g, (reason, where))
    for g, (reason, where) in first_block.items():
        groups[g].blocked_by, groups[g].blocking_node = reason, where
    return groups


def _fingerprint(model: ir.Model) -> tuple:
    """Changes whenever a node, one of its inputs, or a graph output is replaced."""
    parts = [id(model.graph)]
    for node in model.graph:
        parts.append(id(node))
        parts.extend(id(v) for v in node.inputs)
    parts.extend(id(v) for v in model.graph.outputs)
    return tuple(parts)


_CACHE = "pycompress.channel_groups"


def cached_channel_groups(model: ir.Model) -> list[ChannelGroup] | None:
    """The groups cached on ``model`` if no node or node input was replaced since, else None."""
    cached = model.meta.get(_CACHE)
    return cached[1] if cached is not None and cached[0] == _fingerprint(model) else None


def remember_channel_groups(model: ir.Model, groups: list[ChannelGroup]) -> None:
    """Cache ``groups`` as the model's groups as it is now."""
    model.meta[_CACHE] = (_fingerprint(model), groups)


def channel_groups(model: ir.Model, *, cache: bool = True) -> list[ChannelGroup]:
    """Every channel group of the model, prunable or blocked, in graph order of first producers.

    Shapes must be inferred (``load_model`` does it, and folds constants so
    exporter padding chains are gone). The result is cached on the model
    until a node or one of its inputs is replaced (pruning keeps it up to
    date itself: ``reuse.groups_after_prune``).
    """
    if cache:
        cached = cached_channel_groups(model)
        if cached is not None:
            return cached
    walk = Walk(model, RULES, PRODUCER_OPS)
    walk.run()
    groups = build_groups(walk)
    if cache:
        remember_channel_groups(model, groups)
    return groups


def channel_group(model: ir.Model, group_id: str) -> ChannelGroup:
    """The group with this id (raises PycompressError naming the site if there is none)."""
    return site_by_id(channel_groups(model), group_id, "channel group")
