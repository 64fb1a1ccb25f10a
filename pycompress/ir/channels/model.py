"""The channel analysis' data model: the public group records, and the walk's internal layout and
union-find over channel elements."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from pycompress.ir.graph import constant_array


@dataclass
class ChannelProducer:
    """A layer whose output channels are the group's channels."""

    node: str                  # node label (name, or its first output's name when unnamed)
    op: str
    output: str                # tensor name: read responses here
    axis: int                  # channel axis of ``output`` (1 for Conv/Gemm, last for MatMul)
    channels: np.ndarray       # channels[i] = group channel of output channel i
    ir_node: ir.Node | None = field(default=None, repr=False, compare=False)


@dataclass
class ChannelSlice:
    """Positions of the group's channels along ``axis`` of one constant input of a node.

    ``positions[j]`` is an index along ``axis``; ``channels[j]`` the group
    channel it belongs to. A flattened consumer has several positions per
    channel (its ``H*W`` block); a Concat consumer has them at an offset.
    """

    role: str                  # producer weight / producer bias / consumer weight / batchnorm /
    #                            depthwise weight / depthwise bias / per-channel constant
    node: str
    input_index: int
    tensor: str
    axis: int
    positions: np.ndarray
    channels: np.ndarray
    ir_node: ir.Node | None = field(default=None, repr=False, compare=False)


@dataclass
class ChannelCarrier:
    """An activation tensor carrying the group's channels (its shape shrinks with them)."""

    tensor: str
    axis: int
    positions: np.ndarray
    channels: np.ndarray
    ir_value: ir.Value | None = field(default=None, repr=False, compare=False)


@dataclass
class ChannelCount:
    """A number in the graph that equals a carrier's width: depthwise ``group``, a Reshape/Resize entry."""

    kind: str                  # "group attribute" or "shape entry"
    node: str
    input_index: int           # -1 for the attribute
    entry: int                 # index into the shape constant (-1 for the attribute)
    positions: np.ndarray      # positions of the group's channels in the counted axis
    channels: np.ndarray
    ir_node: ir.Node | None = field(default=None, repr=False, compare=False)


@dataclass
class ChannelGroup:
    """Channels that are pruned together; a decision keeps ``k`` of ``width``."""

    id: str                                        # "group:<first producer>" (stable across runs)
    width: int
    producers: list[ChannelProducer] = field(default_factory=list)
    slices: list[ChannelSlice] = field(default_factory=list)
    carriers: list[ChannelCarrier] = field(default_factory=list)
    counts: list[ChannelCount] = field(default_factory=list)
    blocked_by: str | None = None                  # why it cannot be pruned (names the node)
    blocking_node: str | None = None

    @property
    def prunable(self) -> bool:
        return self.blocked_by is None and self.width > 1

    @property
    def producer_outputs(self) -> list[str]:
        return [p.output for p in self.producers]

    @property
    def consumers(self) -> list[str]:
        """Nodes whose *input* channels shrink (Conv / Gemm / MatMul reading the group)."""
        return unique(s.node for s in self.slices if s.role == "consumer weight")

    @property
    def nodes(self) -> list[str]:
        """Every node the pruning touches."""
        return unique([p.node for p in self.producers] + [s.node for s in self.slices]
                       + [c.node for c in self.counts])

    def params(self) -> int:
        """Parameters held by the group's channels (what pruning all of them would remove)."""
        total = 0
        for s in self.slices:
            value = s.ir_node.inputs[s.input_index] if s.ir_node is not None else None
            array = constant_array(value)
            if array is not None and array.ndim:
                total += len(s.positions) * (array.size // max(array.shape[s.axis], 1))
        return total

    def info(self) -> dict[str, Any]:
        """JSON-ready summary for ``plan --explain`` and Site.info."""
        members = []
        for s in self.slices:
            members.append({"node": s.node, "role": s.role, "tensor": s.tensor, "axis": s.axis,
                            "positions": describe_positions(s.positions, s.channels)})
        for c in self.counts:
            members.append({"node": c.node, "role": c.kind, "positions": describe_positions(c.positions, c.channels)})
        return {
            "width": self.width,
            "producers": [p.node for p in self.producers],
            "producer_outputs": self.producer_outputs,
            "consumers": self.consumers,
            "pass_through": unique(s.node for s in self.slices
                                    if s.role not in ("producer weight", "producer bias", "consumer weight")),
            "members": members,
            "params": self.params(),
            "blocked_by": self.blocked_by,
            "blocking_node": self.blocking_node,
        }


def unique(items) -> list:
    return list(dict.fromkeys(items))


def describe_positions(positions: np.ndarray, channels: np.ndarray) -> str:
    """'0:16', '16:32' (a Concat offset), or '784 (49 per channel)' for a flattened block."""
    n, distinct = len(positions), len(np.unique(channels))
    if n == 0:
        return "none"
    if n > distinct:
        return f"{n} ({n // max(distinct, 1)} per channel)"
    if positions[-1] - positions[0] == n - 1 and np.all(np.diff(positions) == 1):
        return f"{int(positions[0])}:{int(positions[-1]) + 1}"
    return f"{n} positions"



# --------------------------------------------------------------------------- the walk's bookkeeping

@dataclass
class Layout:
    """Where channels sit on one activation tensor: the element at each position along ``axis``."""

    axis: int
    rank: int | None
    elems: np.ndarray           # element id per position along axis; -1 = not prunable


class Elements:
    """Union-find over elements (one per producer output channel); ``space[e]`` is e's producer."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.space: list[int] = []

    def __len__(self) -> int:
        return len(self.parent)

    def new(self, n: int, producer: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        self.space.extend([producer] * n)
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, e: int) -> int:
        root = e
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[e] != root:
            self.parent[e], e = root, self.parent[e]
        return root

    def union(self, x: int, y: int) -> None:
        rx, ry = self.find(x), self.find(y)
        if rx != ry:
            self.parent[max(rx, ry)] = min(rx, ry)
