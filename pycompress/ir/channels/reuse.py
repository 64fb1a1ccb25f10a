"""Groups kept valid without a new walk after a group is pruned.

A search applies a plan with a dozen pruned groups to a fresh clone of the
model for every candidate, and each prune replaced constants, so the walk ran
again before the next one: 12-15% of an evaluation on EfficientNet-Lite0's
stage search (py-spy). Pruning a group does not change which channels are
coupled, only where the remaining ones sit: positions after a removed one
move down, and the pruned group's own channels are renumbered in order. So
the groups are updated instead of recomputed (``tests/test_channels.py``
checks the result against a fresh walk after every prune, on real models):
a plan of 24 prunes on Lite0 applies in 0.09 s instead of 0.39 s
(``tools/bench_apply_prunes.py``). (Carrying
the groups to a clone of the model instead of one walk per clone was tried:
rebinding every record costs more than the walk.)
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

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

    def moved(record, mine: bool, cut: dict[tuple, np.ndarray], key: tuple) -> dict[str, np.ndarray]:
        """A record's positions and channels after the prune."""
        positions, channels = record.positions, record.channels
        if mine:
            mask, channels = renumber(channels)
            positions = positions[mask]
        return {"positions": _shift(positions, cut.get(key)), "channels": channels}

    out = []
    for group in groups:
        mine = group is pruned
        slices = [replace(s, **moved(s, mine, cut_slices, _slice_key(s)),
                          tensor=(s.ir_node.inputs[s.input_index].name or "") if s.ir_node is not None else s.tensor)
                  for s in group.slices]
        counts = [replace(c, **moved(c, mine, cut_counts, _count_key(c))) for c in group.counts]
        carriers = [replace(c, **moved(c, mine, cut_carriers, _carrier_key(c))) for c in group.carriers]
        producers = [replace(p, channels=renumber(p.channels)[1]) if mine else replace(p) for p in group.producers]
        out.append(replace(group, width=len(keep) if mine else group.width, producers=producers,
                           slices=slices, counts=counts, carriers=carriers))
    return out
