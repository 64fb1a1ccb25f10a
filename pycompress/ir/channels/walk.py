"""The walk: one pass over the graph in topological order that gives each channel-carrying tensor a
layout, unites coupled elements and records every member (slices, counts) and every block.

What each op does to the layouts is not here: it is the op's rule in ``rules.RULES``. The walk
dispatches to it and blocks whatever the rule leaves unhandled, with a reason naming the node.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import onnx_ir as ir

from pycompress.ir.channels.model import Elements, Layout
from pycompress.ir.channels.nodes import MalformedNode, is_default_domain
from pycompress.ir.graph import node_label as label
from pycompress.ir.channels.shapes import ShapeEvaluator, dims_of
from pycompress.ir.graph import opset_version

# A rule maps a node's tracked input layouts (input index -> Layout) to its outputs' layouts and
# returns the input indices it handled; the walk blocks the others.
RuleFn = Callable[["Walk", ir.Node, dict[int, Layout]], set[int]]


class Walk:
    """One pass over the graph building layouts, unions and member records."""

    def __init__(self, model: ir.Model, rules: Mapping[str, RuleFn], producer_ops: frozenset[str]):
        self.model = model
        self.graph = model.graph
        self.opset = opset_version(model)
        self.rules = rules
        self.producer_ops = producer_ops             # rules that run even with no tracked input
        self.elements = Elements()
        self.producers: list[tuple[ir.Node, ir.Value, int, np.ndarray]] = []
        self.layouts: dict[int, Layout] = {}
        self.values: dict[int, ir.Value] = {}
        self.slices: list[tuple[str, ir.Node, int, int, np.ndarray]] = []    # role, node, input, axis, elems
        self.counts: list[tuple[str, ir.Node, int, int, np.ndarray]] = []    # kind, node, input, entry, elems
        self.blocks: list[tuple[int, str, str]] = []                         # element, reason, node label
        self.shapes = ShapeEvaluator()

    # ---- elements
    def unite(self, a: np.ndarray, b: np.ndarray, node: ir.Node) -> None:
        """Couple the elements of two layouts position by position (-1 blocks the other side)."""
        pairs = np.unique(np.stack([a, b], axis=1), axis=0)
        for x, y in pairs:
            x, y = int(x), int(y)
            if x == y:
                continue
            if x < 0 or y < 0:
                self.block(np.array([max(x, y)]), f"{node.op_type} '{label(node)}' combines the channels with "
                           "channels that cannot be pruned", node)
                continue
            self.elements.union(x, y)

    def block(self, elems: np.ndarray, reason: str, node: ir.Node | None) -> None:
        where = label(node) if node is not None else ""
        for e in np.unique(elems):
            if e >= 0:
                self.blocks.append((int(e), reason, where))

    # ---- layouts
    def layout(self, value: ir.Value | None) -> Layout | None:
        return None if value is None else self.layouts.get(id(value))

    def set_layout(self, value: ir.Value, layout: Layout) -> None:
        self.layouts[id(value)] = layout
        self.values[id(value)] = value

    def rank(self, value: ir.Value | None) -> int | None:
        dims = dims_of(value)
        return None if dims is None else len(dims)

    def shape_entries(self, value: ir.Value | None) -> list[int | str | None] | None:
        return self.shapes.shape_entries(value)

    # ---- the walk
    def run(self) -> None:
        for node in self.graph:
            tracked = {i: lay for i, v in enumerate(node.inputs) if (lay := self.layout(v)) is not None}
            self.visit(node, tracked)
        for key, value in self.values.items():
            lay = self.layouts[key]
            if value.is_graph_output():
                self.block(lay.elems, f"'{value.name}' is a graph output", value.producer())
            for use in value.uses():
                if use.node.graph is not self.graph:
                    self.block(lay.elems, f"{use.node.op_type} '{label(use.node)}' reads it inside a subgraph",
                               use.node)

    def visit(self, node: ir.Node, tracked: dict[int, Layout]) -> None:
        op = node.op_type
        handled: set[int] = set()
        if not is_default_domain(node):
            reason = f"{node.domain}.{op} '{label(node)}' is an unknown op"
        elif (rule := self.rules.get(op)) is None:
            reason = f"{op} '{label(node)}' is not known to keep channels aligned"
        else:
            reason = f"{op} '{label(node)}' does not take channels at input " + "{i}"
            try:
                handled = rule(self, node, tracked) if tracked or op in self.producer_ops else set()
            except MalformedNode as exc:
                # A node against the ONNX spec: block what it touches, never guess. Any other
                # exception is a bug in the rule and propagates.
                reason = f"{op} '{label(node)}' could not be analysed ({exc})"
        for i, lay in tracked.items():
            if i not in handled:
                self.block(lay.elems, reason.replace("{i}", str(i)), node)

    # ---- helpers for the rules
    def reject(self, node: ir.Node, tracked: dict[int, Layout], why: str) -> set[int]:
        """Block every tracked input of ``node`` with a reason; report them as handled."""
        for lay in tracked.values():
            self.block(lay.elems, f"{node.op_type} '{label(node)}' {why}", node)
        return set(tracked)

    def extra_outputs_used(self, node: ir.Node, first: int = 1) -> bool:
        return any(out is not None and (out.uses() or out.is_graph_output()) for out in node.outputs[first:])

    def add_producer(self, node: ir.Node, width: int, *, axis: int, rank: int | None,
                     weight: tuple[int, int], bias: tuple[int, int] | None) -> None:
        """``node``'s output 0 holds ``width`` new channels (its weight/bias: (input, axis))."""
        index = len(self.producers)
        elems = self.elements.new(width, index)
        out = node.outputs[0]
        self.producers.append((node, out, axis, elems))
        self.slices.append(("producer weight", node, weight[0], weight[1], elems))
        if bias is not None:
            self.slices.append(("producer bias", node, bias[0], bias[1], elems))
        self.set_layout(out, Layout(axis, rank, elems))

    def pass_on(self, node: ir.Node, lay: Layout, *, axis: int | None = None, rank: int | None = None,
                elems: np.ndarray | None = None, outputs: int = 1) -> None:
        """Give the first ``outputs`` outputs ``lay``, with the changes given."""
        new = Layout(lay.axis if axis is None else axis, rank if rank is not None else lay.rank,
                     lay.elems if elems is None else elems)
        for out in node.outputs[:outputs]:
            if out is not None:
                self.set_layout(out, new)
