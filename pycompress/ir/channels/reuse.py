"""Groups kept valid without a new walk: after a group is pruned, and on a clone of the model.

A search applies a plan with a dozen pruned groups to a fresh clone of the
model for every candidate, and each prune replaced constants, so the walk ran
again before the next one: 12-15% of an evaluation on EfficientNet-Lite0's
stage search (py-spy). Pruning a group does not change which channels are
coupled, only where the remaining ones sit: positions after a removed one
move down, and the pruned group's own channels are renumbered in order. So
the groups are updated instead of recomputed (``tests/test_channel_groups``
checks the result against a fresh walk after every prune, on real models).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx_ir as ir

from pycompress.ir.channels.model import ChannelGroup


def _shift(positions: np.ndarray, removed: np.ndarray | None) -> np.ndarray:
    """Positions along an axis after the (sorted) ``removed`` positions are deleted from it."""
    if removed is None or removed.size == 0:
        return positions
    return positions - np.searchsorted(removed, positions)


def _removed_positions(records, key_of, keep: np.ndarray) -> dict[tuple, np.ndarray]:
    """Per key (an axis of a node input, a count, a tensor): the positions the pruned group lost there."""
    removed: dict[tuple, list[np.ndarray]] = {}
    for r in records:
        removed.setdefault(key_of(r), []).append(r.positions[~np.isin(r.channels, keep)])
    return {k: np.unique(np.concatenate(v)) for k, v in removed.items()}


def _slice_key(s) -> tuple:
    return (id(s.ir_node), s.input_index, s.axis)


def _count_key(c) -> tuple:
    return (id(c.ir_node), c.input_index, c.entry)


def _carrier_key(c) -> tuple:
    return (id(c.ir_value), c.axis)


def groups_after_prune(groups: list[ChannelGroup], pruned: ChannelGroup, keep: np.ndarray) -> list[ChannelGroup]:
    """``groups`` (of the model before ``pruned`` lost every channel not in ``keep``) as they are after.

    New records throughout (the ones given may be another model's cache). Tensor names of constant
    inputs are re-read from the nodes (pruning renames the pruned copies).
    """
    keep = np.unique(np.asarray(keep, dtype=np.int64))
    cut_slices = _removed_positions(pruned.slices, _slice_key, keep)
    cut_counts = _removed_positions(pruned.counts, _count_key, keep)
    cut_carriers = _removed_positions(pruned.carriers, _carrier_key, keep)

    def renumber(channels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The pruned group's kept channels, renumbered 0 .. len(keep)-1 in order."""
        mask = np.isin(channels, keep)
        return mask, np.searchsorted(keep, channels[mask])

    out = []
    for group in groups:
        mine = group is pruned
        slices, counts, carriers, producers = [], [], [], []
        for s in group.slices:
            positions, channels = s.positions, s.channels
            if mine:
                mask, channels = renumber(channels)
                positions = positions[mask]
            tensor = (s.ir_node.inputs[s.input_index].name or "") if s.ir_node is not None else s.tensor
            slices.append(replace(s, positions=_shift(positions, cut_slices.get(_slice_key(s))),
                                  channels=channels, tensor=tensor))
        for c in group.counts:
            positions, channels = c.positions, c.channels
            if mine:
                mask, channels = renumber(channels)
                positions = positions[mask]
            counts.append(replace(c, positions=_shift(positions, cut_counts.get(_count_key(c))), channels=channels))
        for c in group.carriers:
            positions, channels = c.positions, c.channels
            if mine:
                mask, channels = renumber(channels)
                positions = positions[mask]
            carriers.append(replace(c, positions=_shift(positions, cut_carriers.get(_carrier_key(c))),
                                    channels=channels))
        for p in group.producers:
            producers.append(replace(p, channels=renumber(p.channels)[1]) if mine else replace(p))
        out.append(replace(group, width=len(keep) if mine else group.width, producers=producers,
                           slices=slices, counts=counts, carriers=carriers))
    return out


def groups_on_clone(groups: list[ChannelGroup], source: ir.Model, clone: ir.Model) -> list[ChannelGroup] | None:
    """``source``'s groups bound to the nodes and values of ``clone`` (``ir.Model.clone`` keeps the
    order of nodes and of their outputs); None when the two graphs do not line up."""
    nodes_a, nodes_b = list(source.graph), list(clone.graph)
    if len(nodes_a) != len(nodes_b) or len(source.graph.inputs) != len(clone.graph.inputs):
        return None
    node_of: dict[int, ir.Node] = {}
    value_of: dict[int, ir.Value] = {}
    for a, b in zip(source.graph.inputs, clone.graph.inputs):
        value_of[id(a)] = b
    for a, b in zip(nodes_a, nodes_b):
        if a.op_type != b.op_type or len(a.outputs) != len(b.outputs):
            return None
        node_of[id(a)] = b
        for va, vb in zip(a.outputs, b.outputs):
            value_of[id(va)] = vb

    def node(n: ir.Node | None) -> ir.Node | None:
        return None if n is None else node_of[id(n)]

    try:
        return [replace(g, producers=[replace(p, ir_node=node(p.ir_node)) for p in g.producers],
                        slices=[replace(s, ir_node=node(s.ir_node)) for s in g.slices],
                        counts=[replace(c, ir_node=node(c.ir_node)) for c in g.counts],
                        carriers=[replace(c, ir_value=value_of[id(c.ir_value)]) for c in g.carriers])
                for g in groups]
    except KeyError:          # a record outside the top-level graph: let a walk decide
        return None
