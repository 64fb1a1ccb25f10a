"""Coupled channel groups: which channels must be pruned together (ALGORITHMS.md 1.4).

Removing output channel ``c`` of a Conv / Gemm / MatMul (a *producer*) must
remove input channel ``c`` of every layer that reads it (a *consumer*), the
matching per-channel parameters of everything in between (BatchNormalization,
depthwise Conv filters, per-channel constants), and the same channel of every
other producer whose output is added to it (residuals couple producers). Such
a set of channels is a *group*; a pruning decision keeps ``k`` of its
``width`` channels.

How it is computed. Every output channel of every producer is an *element*.
Each activation tensor that carries channels on one axis gets a *layout*: for
each position along that axis, the element there (``-1``: a channel no
producer owns, e.g. from a graph input; it is never pruned). Walking the
graph in topological order, each op maps its inputs' layouts to its
outputs': pass-through ops copy the layout, Concat concatenates layouts (so
channel offsets come for free), Flatten / Reshape into features repeat each
element over its ``H*W`` block, and elementwise ops between two carriers
unite their elements position by position (union-find). A group is a set of
producers connected through united elements; its channels are the
union-find classes, numbered in the order of the group's producers' channels.

Anything on the channel axis that the walk does not know to keep channels
aligned (Transpose moving it, Softmax over it, Gather / Slice / Split on it,
graph outputs, unknown ops, ...) blocks the elements it carries: the group is
reported with the node that blocked it and why. Nothing is guessed.

Reading it (e.g. for PFA, which measures responses per channel)::

    for group in channel_groups(model):
        if not group.prunable:
            print(group.id, group.blocked_by)
            continue
        group.width                    # number of channels a decision chooses from
        group.producer_outputs         # tensor names holding the group's channels
        p = group.producers[0]         # p.output (tensor name), p.axis (channel axis),
        p.channels                     # p.channels[i] = group channel of p's output channel i

``keep_indices`` in a plan are group channel numbers (``0 .. width-1``). For a
group with one producer, or several aligned ones (residual Add), group
channel ``i`` is output channel ``i`` of each producer.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import onnx_ir as ir

from pycompress.errors import PycompressError
from pycompress.ir.graph import attr_int, attr_ints, constant_array, opset_version

# Ops that map every channel to itself, elementwise, on input 0 (other inputs
# must be untracked scalars/settings, e.g. Clip bounds).
_UNARY = frozenset({
    "Relu", "LeakyRelu", "Elu", "Selu", "Celu", "Gelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh",
    "Softplus", "Softsign", "Mish", "Swish", "Clip", "Erf", "Exp", "Log", "Abs", "Neg", "Sqrt", "Reciprocal",
    "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "ThresholdedRelu", "Not", "IsNaN", "IsInf", "Identity",
    "Cast", "Dropout",
})
# Elementwise ops with broadcasting between all inputs: channel carriers among
# them are coupled; per-channel constants are pruned with them.
_ELEMENTWISE = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where", "PRelu",
    "Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "And", "Or", "Xor", "Mod",
})
_POOLS = frozenset({"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"})
_REDUCES = frozenset({"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
                      "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"})


# --------------------------------------------------------------------------- data model

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
        return _unique(s.node for s in self.slices if s.role == "consumer weight")

    @property
    def nodes(self) -> list[str]:
        """Every node the pruning touches."""
        return _unique([p.node for p in self.producers] + [s.node for s in self.slices]
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
                            "positions": _describe_positions(s.positions, s.channels)})
        for c in self.counts:
            members.append({"node": c.node, "role": c.kind, "positions": _describe_positions(c.positions, c.channels)})
        return {
            "width": self.width,
            "producers": [p.node for p in self.producers],
            "producer_outputs": self.producer_outputs,
            "consumers": self.consumers,
            "pass_through": _unique(s.node for s in self.slices
                                    if s.role not in ("producer weight", "producer bias", "consumer weight")),
            "members": members,
            "params": self.params(),
            "blocked_by": self.blocked_by,
            "blocking_node": self.blocking_node,
        }


def _unique(items) -> list:
    return list(dict.fromkeys(items))


def _describe_positions(positions: np.ndarray, channels: np.ndarray) -> str:
    """'0:16', '16:32' (a Concat offset), or '784 (49 per channel)' for a flattened block."""
    n, distinct = len(positions), len(np.unique(channels))
    if n == 0:
        return "none"
    if n > distinct:
        return f"{n} ({n // max(distinct, 1)} per channel)"
    if positions[-1] - positions[0] == n - 1 and np.all(np.diff(positions) == 1):
        return f"{int(positions[0])}:{int(positions[-1]) + 1}"
    return f"{n} positions"


# --------------------------------------------------------------------------- analysis

@dataclass
class _Layout:
    axis: int
    rank: int | None
    elems: np.ndarray           # element id per position along axis; -1 = not prunable


def _label(node: ir.Node) -> str:
    return node.name or (node.outputs[0].name if node.outputs and node.outputs[0].name else node.op_type)


def _is_default_domain(node: ir.Node) -> bool:
    return node.domain in ("", "ai.onnx")


def _dims(value: ir.Value | None) -> list[int | str | None] | None:
    """Static ints, symbolic names (str) or None per dimension; None if rank unknown."""
    if value is None:
        return None
    const = constant_array(value)
    if const is not None:
        return list(const.shape)
    if value.shape is None:
        return None
    out: list[int | str | None] = []
    for d in value.shape:
        if isinstance(d, int):
            out.append(d)
        else:
            out.append(d.value if isinstance(getattr(d, "value", None), str) else None)
    return out


def _resolve_reshape(dims: list, entries: list, allow_zero: int) -> list | None:
    """Reshape's output dims from its input dims and shape entries (ints or symbol names).

    0 copies the input dim (unless ``allowzero``); one -1 is solved exactly
    from the element count, symbolically when it stands for one symbolic input
    dim (e.g. the batch). None when that cannot be decided.
    """
    if any(d is None for d in dims):
        return None
    out = [dims[i] if e == 0 and not allow_zero and i < len(dims) else e for i, e in enumerate(entries)]
    if any(e is None for e in out):
        return None
    holes = [i for i, e in enumerate(out) if e == -1]
    if not holes:
        return out
    if len(holes) > 1:
        return None
    others = [e for i, e in enumerate(out) if i != holes[0]]
    in_static = math.prod(d for d in dims if isinstance(d, int))
    out_static = math.prod(e for e in others if isinstance(e, int))
    in_syms = Counter(d for d in dims if isinstance(d, str))
    out_syms = Counter(e for e in others if isinstance(e, str))
    rest = in_syms - out_syms
    if out_syms - in_syms or out_static == 0 or in_static % out_static:
        return None
    ratio = in_static // out_static
    if not rest:
        out[holes[0]] = ratio
    elif sum(rest.values()) == 1 and ratio == 1:
        out[holes[0]] = next(iter(rest))
    else:
        return None
    return out


def _const_ints(value: ir.Value | None) -> list[int] | None:
    array = constant_array(value)
    return None if array is None else [int(v) for v in np.asarray(array).reshape(-1)]


class _Walk:
    """One pass over the graph building layouts, unions and member records."""

    def __init__(self, model: ir.Model):
        self.model = model
        self.graph = model.graph
        self.opset = opset_version(model)
        self.parent: list[int] = []
        self.space: list[int] = []                  # producer index of each element
        self.producers: list[tuple[ir.Node, ir.Value, int, np.ndarray]] = []
        self.layouts: dict[int, _Layout] = {}
        self.values: dict[int, ir.Value] = {}
        self.slices: list[tuple[str, ir.Node, int, int, np.ndarray]] = []    # role, node, input, axis, elems
        self.counts: list[tuple[str, ir.Node, int, int, np.ndarray]] = []    # kind, node, input, entry, elems
        self.blocks: list[tuple[int, str, str]] = []                         # element, reason, node label
        self._shape_cache: dict[int, list | None] = {}

    # ---- union-find over elements
    def new_elements(self, n: int, producer: int) -> np.ndarray:
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

    def unite(self, a: np.ndarray, b: np.ndarray, node: ir.Node) -> None:
        pairs = np.unique(np.stack([a, b], axis=1), axis=0)
        for x, y in pairs:
            x, y = int(x), int(y)
            if x == y:
                continue
            if x < 0 or y < 0:
                self.block(np.array([max(x, y)]), f"{node.op_type} '{_label(node)}' combines the channels with "
                           "channels that cannot be pruned", node)
                continue
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[max(rx, ry)] = min(rx, ry)

    def block(self, elems: np.ndarray, reason: str, node: ir.Node | None) -> None:
        label = _label(node) if node is not None else ""
        for e in np.unique(elems):
            if e >= 0:
                self.blocks.append((int(e), reason, label))

    # ---- layouts
    def layout(self, value: ir.Value | None) -> _Layout | None:
        return None if value is None else self.layouts.get(id(value))

    def set_layout(self, value: ir.Value, layout: _Layout) -> None:
        self.layouts[id(value)] = layout
        self.values[id(value)] = value

    def rank(self, value: ir.Value | None) -> int | None:
        dims = _dims(value)
        return None if dims is None else len(dims)

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
                    self.block(lay.elems, f"{use.node.op_type} '{_label(use.node)}' reads it inside a subgraph",
                               use.node)

    def visit(self, node: ir.Node, tracked: dict[int, _Layout]) -> None:
        op = node.op_type
        handled: set[int] = set()
        if not _is_default_domain(node):
            reason = f"{node.domain}.{op} '{_label(node)}' is an unknown op"
        else:
            rule = _RULES.get(op)
            if rule is None and op in _UNARY:
                rule = _Walk.op_unary
            elif rule is None and op in _ELEMENTWISE:
                rule = _Walk.op_elementwise
            elif rule is None and op in _POOLS:
                rule = _Walk.op_pool
            elif rule is None and op in _REDUCES:
                rule = _Walk.op_reduce
            if rule is None:
                reason = f"{op} '{_label(node)}' is not known to keep channels aligned"
            else:
                reason = f"{op} '{_label(node)}' does not take channels at input " + "{i}"
                try:
                    handled = rule(self, node, tracked) if tracked or op in _PRODUCER_OPS else set()
                except Exception as exc:  # a malformed node: block what it touches, never guess
                    first = (str(exc).strip().splitlines() or [""])[0]
                    reason = f"{op} '{_label(node)}' could not be analysed ({type(exc).__name__}: {first})"
        for i, lay in tracked.items():
            if i not in handled:
                self.block(lay.elems, reason.replace("{i}", str(i)), node)

    def reject(self, node: ir.Node, tracked: dict[int, _Layout], why: str) -> set[int]:
        """Block every tracked input of ``node`` with a reason; report them as handled."""
        for lay in tracked.values():
            self.block(lay.elems, f"{node.op_type} '{_label(node)}' {why}", node)
        return set(tracked)

    def extra_outputs_used(self, node: ir.Node, first: int = 1) -> bool:
        return any(out is not None and (out.uses() or out.is_graph_output()) for out in node.outputs[first:])

    # ---- producers / consumers
    def op_conv(self, node: ir.Node, tracked: dict[int, _Layout]) -> set[int]:
        weight = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
        bias_value = node.inputs[2] if len(node.inputs) > 2 else None
        bias = constant_array(bias_value)
        groups = attr_int(node, "group", 1)
        handled: set[int] = set()
        x = tracked.get(0)
        if weight is None or weight.ndim < 3 or (bias_value is not None and bias is None):
            return set() if x is None else self.reject(node, {0: x}, "has weights that are not constant")
        depthwise = groups > 1 and weight.shape[1] == 1 and weight.shape[0] == groups
        if groups > 1 and not depthwise:
            return set() if x is None else self.reject(node, {0: x}, f"is a grouped conv (group={groups})")
        if depthwise:
            if x is None:
                return handled
            if x.axis != 1 or len(x.elems) != groups:
                return self.reject(node, {0: x}, "reads channels on an axis other than 1")
            # Depthwise: channel c in -> channel c out; its filters and bias go with it.
            self.slices.append(("depthwise weight", node, 1, 0, x.elems))
            if bias_value is not None:
                self.slices.append(("depthwise bias", node, 2, 0, x.elems))
            self.counts.append(("group attribute", node, -1, -1, x.elems))
            self.set_layout(node.outputs[0], _Layout(1, x.rank, x.elems))
            return {0}
        if x is not None:
            if x.axis != 1 or len(x.elems) != weight.shape[1]:
                self.reject(node, {0: x}, "reads channels on an axis other than 1")
            else:
                self.slices.append(("consumer weight", node, 1, 1, x.elems))
            handled.add(0)
        rank = self.rank(node.outputs[0]) or self.rank(node.inputs[0])
        self.add_producer(node, weight.shape[0], axis=1, rank=rank, weight=(1, 0),
                          bias=None if bias_value is None else (2, 0))
        return handled

    def op_gemm(self, node: ir.Node, tracked: dict[int, _Layout]) -> set[int]:
        b = constant_array(node.inputs[1])
        trans_a, trans_b = attr_int(node, "transA", 0), attr_int(node, "transB", 0)
        handled: set[int] = set()
        a = tracked.get(0)
        if b is None or b.ndim != 2:
            return set() if a is None else self.reject(node, {0: a}, "has a weight that is not constant")
        if a is not None:
            in_axis = 1 if trans_b else 0
            if trans_a or a.axis != 1 or a.rank != 2 or len(a.elems) != b.shape[in_axis]:
                self.reject(node, {0: a}, "reads channels on an axis it does not contract as features")
            else:
                self.slices.append(("consumer weight", node, 1, in_axis, a.elems))
            handled.add(0)
        width = b.shape[0] if trans_b else b.shape[1]
        bias = None
        c_value = node.inputs[2] if len(node.inputs) > 2 else None
        if c_value is not None:
            c = constant_array(c_value)
            if c is None:
                return handled          # a computed bias: not a producer we can prune
            if c.ndim >= 1 and c.shape[-1] == width:
                bias = (2, c.ndim - 1)
            elif c.ndim >= 1 and c.shape[-1] != 1:
                return handled
        self.add_producer(node, width, axis=1, rank=2, weight=(1, 0 if trans_b else 1), bias=bias)
        return handled

    def op_matmul(self, node: ir.Node, tracked: dict[int, _Layout]) -> set[int]:
        b = constant_array(node.inputs[1])
        a = tracked.get(0)
        handled: set[int] = set()
        if b is None or b.ndim != 2:
            return set() if a is None else self.reject(node, {0: a}, "has no constant 2-D weight")
        if a is not None:
            if a.rank is None or a.axis != a.rank - 1 or len(a.elems) != b.shape[0]:
                self.reject(node, {0: a}, "reads channels on an axis it does not contract")
            else:
                self.slices.append(("consumer weight", node, 1, 0, a.elems))
            handled.add(0)
        rank = self.rank(node.inputs[0])
        if rank is not None:
            self.add_producer(node, b.shape[1], axis=max(rank - 1, 0), rank=rank, weight=(1, 1), bias=None)
        return handled

    def add_producer(self, node: ir.Node, width: int, *, axis: int, rank: int | None,
                     weight: tuple[int, int], bias: tuple[int, int] | None) -> None:
        index = len(self.producers)
        elems = self.new_elements(width, index)
        out = node.outputs[0]
        self.producers.append((node, out, axis, elems))
        self.slices.append(("producer weight", node, weight[0], weight[1], elems))
        if bias is not None:
            self.slices.append(("producer bias", node, bias[0], bias[1], elems))
        self.set_layout(out, _Layout(axis, rank, elems))

    # ---- pass-through
    def pass_on(self, node: ir.Node, lay: _Layout, *, axis: int | None = None, rank: int | None = None,
                elems: np.ndarray | None = None, outputs: int = 1) -> None:
        new = _Layout(lay.axis if axis is None else axis, rank if rank is not None else lay.rank,
                      lay.elems if elems is None else elems)
        for out in node.outputs[:outputs]:
            if out is not None:
                self.set_layout(out, new)

    def op_unary(self, node: ir.Node, tracked: dict[int, _Layout]) -> set[int]:
        if 0 not in tracked:
            return set()
        if self.extra_outputs_used(node):
            return self.reject(node, tracked, "has a second output in use")
        self.pass_on(node, tracked[0])
        return {0}

    def op_elementwise(self, node: ir.Node, tracked: dict[int, _Layout]) -> set[int]:
        """Broadcasting elementwise op: carriers are coupled position by position."""
        if any(lay.rank is None for lay in tracked.values()):
            return self.reject(node, tracked, "has an input of unknown rank")
        from_right = {lay.rank - lay.axis for lay in tracked.values()}
        if len(from_right) != 1:
            return self.reject(node, tracked, "aligns channels of its inputs on different axes")
        ro = from_right.pop()
        width = max(len(lay.elems) for lay in tracked.values())
        full = [lay for lay in tracked.values() if len(lay.elems) == width]
        if any(len(lay.elems) not in (1, width) for lay in tracked.values()):
            return self.reject(node, tracked, "combines carriers of different widths")
        main = full[0]
        params = []
        for i, value in enumerate(node.inputs):
            if value is None or i in tracked:
                continue
            dims = _dims(value)
            if dims is None:
                return self.reject(node, tracked, f"reads input {i} of unknown shape")
            if len(dims) < ro or dims[len(dims) - ro] == 1:
                continue            # broadcast along the channel axis: no channels there
            if constant_array(value) is not None and dims[len(dims) - ro] == width:
                params.append((i, len(dims) - ro))
                continue
            return self.reject(node, tracked, f"combines the channels with input {i}, whose channels "
                                              "cannot be pruned")
        for lay in full[1:]:
            self.unite(main.elems, lay.elems, node)
        for i, axis in params:
            self.slices.append(("per-channel constant", node, i, axis, main.elems))
        ranks = [lay.rank for lay in tracked.values()] + [len(d) for v in node.inputs
                                                           if v is not None and (d := _dims(v)) is not None]
        out_rank = self.rank(node.outputs[0]) or max(ranks)
        self.pass_on(node, main, axis=out_rank - ro, rank=out_rank)
        return set(tracked)

    def op_norm(self, node: ir.Node, tracked: dict[int, _Layout]) -> set[int]:
        """BatchNormalization / InstanceNormalization: per-channel statistics and affine."""
        x = tracked.get(0)
        if x is None or set(tracked) != {0}:
            return self.reject(node, tracked, "reads channels as a parameter")
        if x.axis != 1:
            return self.reject(node, tracked, "normalizes axis 1, not the channel axis")
        if self.extra_outputs_used(node):
            return self.reject(node, tracked, "has training-mode outputs in use")
        params = range(1, 5) if node.op_type == "BatchNormalization" else range(1, 3)
        for i in params:
            array = constant_array(node.inputs[i]) if i < len(node.inputs) else None
            if array is None or array.shape != (len(x.elems),):
                return self.reject(node, tracked, f"has a non-constant or non-per-channel input {i}")
        for i in params:
            self.slices.append(("batchnorm" if node.op_type == "BatchNormalization" else "instancenorm",
                                node, i, 0, x.elems))
        self.pass_on(node, x)
        return {0}

    def op_pool(self, node: ir.Node, tracked: dict[int, _Layout]) -> set[int]:
        x = tracked.get(0)
        if x is None:
            return set()
        if x.axis != 1:
            return self.reject(node, tracked, "pools a tensor whose channels are not on axis 1")
        if self.extra_outputs_used(node):
            return self.reject(node, tracked, "has its indices output in use")
        self.pass_on(node, x)
        return {0}

    def op_layernorm(self, node: ir.Node, tracked: dict[int, _Layout]) -> set[int]:
        x = tracked.get(0)
        if x is None or set(tracked) != {0} or x.rank is None:
            return self.reject(node, tracked, "normalizes a tensor of unknown rank")
        axis = attr_int(node, "axis", -1) % x.rank
        if x.axis >= axis:
            return self.reject(node, tracked, "normalizes over the channel axis")
        if self.extra_outputs_used(node):
            return self.reject(node, tracked, "has mean/variance outputs in use")
        self.pass_on(node, x)
        return {0}

    def op_lpnorm(self, node: ir.Node, tracked: dict[int, _Layout]) -> set[int]:
        x = tracked.get(0)
        if x.rank is None or attr_int(node, "axis", -1) % x.rank == x.axis:
            return self.reject(node, tracked, "normalizes over the channel axis")
        self.pass_on(node, x)
        return {0}

    def op_softmax(self, node: ir.Node, tracked: dict[int, _Layout]) -> set[int]:
        x = tracked[0]
        if x.rank is None:
            return self.reject(node, tracked, "normalizes a tensor of unknown rank")
        if self.opset < 13:
            # Before opset 13 Softmax flattens axes [axis:] into one: any channel axis there is mixed.
            axis = attr_int(node, "axis", 1) % x.rank
            if x.axis >= axis:
                return self.reject(node, tracked, "normalizes over the channel axis")
        elif attr_int(node, "axis", -1) % x.rank == x.axis:
            return self.reject(node, tracked, "normalizes over the channel axis")
        self.pass_on(node, x)
        return {0}

    def op_concat(self, node: ir.Node, tracked: dict[int, _Layout]) -> set[int]:
        ranks = {lay.rank for lay in tracked.values()}
        if None in ranks or len(ranks) != 1:
            return self.reject(node, tracked, "concatenates tensors of unknown rank")
        rank = ranks.pop()
        axis = attr_int(node, "axis", 0) % rank
        axes = {lay.axis for lay in tracked.values()}
        if len(axes) != 1:
            return self.reject(node, tracked, "concatenates tensors with channels on different axes")
        channel_axis = axes.pop()
        if axis == channel_axis:
            parts = []
            for i, value in enumerate(node.inputs):
                if i in tracked:
                    parts.append(tracked[i].elems)
                    continue
                dims = _dims(value)
                if dims is None or not isinstance(dims[axis], int):
                    return self.reject(node, tracked, f"concatenates input {i} of unknown width")
                parts.append(np.full(dims[axis], -1, dtype=np.int64))    # channels nobody prunes
            self.pass_on(node, tracked[min(tracked)], elems=np.concatenate(parts))
            return set(tracked)
        # Concatenating along another axis aligns the channels of all inputs.
        if len(tracked) != len([v for v in node.inputs if v is not None]):
            return self.reject(node, tracked, "concatenates the channels with channels that cannot be pruned")
        widths = {len(lay.elems) for lay in tracked.values()}
        if len(widths) != 1:
            return self.reject(node, tracked, "concatenates carriers of different widths")
        layouts = list(tracked.values())
        for lay in layouts[1:]:
            self.unite(layouts[0].elems, lay.elems, node)
        self.pass_on(node, layouts[0])
        return set(tracked)

    def op_split(self, node: ir.Node, tracked: dict[int, _Layout]) -> set[int]:
        x = tracked.get(0)
        if x is None or set(tracked) != {0} or x.rank is None:
            return self.reject(node, tracked, "splits a tensor of unknown rank")
        if attr_int(node, "axis", 0) % x.rank == x.axis:
            return self.reject(node, tracked, "splits the channel axis")
        self.pass_on(node, x, outputs=len(node.outputs))
        return {0}

    def op_slice(self, node: ir.Node, tracked: dict[int, _Layout]) -> set[int]:
        x = tracked.get(0)
        if x is None or set(tracked) != {0} or x.rank is None:
            return self.reject(node, tracked, "slices a tensor of unknown rank")
        if self.opset < 10:
            starts, ends = attr_ints(node, "starts", None), attr_ints(node, "ends", None)
            axes, steps = attr_ints(node, "axes", None), None
        else:
            get = lambda i: _const_ints(node.inputs[i]) if len(node.inputs) > i and node.inputs[i] is not None else None
            starts, ends, axes, steps = get(1), get(2), get(3), get(4)
            if len(node.inputs) > 3 and node.inputs[3] is not None and axes is None:
                return self.reject(node, tracked, "slices computed axes")
        if starts is None or ends is None:
            return self.reject(node, tracked, "slices with computed bounds")
        axes = list(range(len(starts))) if axes is None else [a % x.rank for a in axes]
        steps = steps or [1] * len(starts)
        if x.axis in axes:
            j = axes.index(x.axis)
            width = len(x.elems)
            start = starts[j] + width if starts[j] < 0 else starts[j]
            if not (start == 0 and steps[j] == 1 and ends[j] >= width):
                return self.reject(node, tracked, "slices the channel axis")
        self.pass_on(node, x)
        return {0}

    def op_gather(self, node: ir.Node, tracked: dict[int, _Layout]) -> set[int]:
        x = tracked.get(0)
        if x is None or set(tracked) != {0} or x.rank is None:
            return self.reject(node, tracked, "gathers with channels as indices")
        axis = attr_int(node, "axis", 0) % x.rank
        if axis == x.axis:
            return self.reject(node, tracked, "gathers on the channel axis")
        q = self.rank(node.inputs[1])
        if q is None:
            return self.reject(node, tracked, "gathers with indices of unknown rank")
        new_axis = x.axis if axis > x.axis else x.axis - 1 + q
        self.pass_on(node, x, axis=new_axis, rank=x.rank - 1 + q)
        return {0}

    def op_transpose(self, node: ir.Node, tracked: dict[int, _Layout]) -> set[int]:
        x = tracked[0]
        if x.rank is None:
            return self.reject(node, tracked, "transposes a tensor of unknown rank")
        perm = attr_ints(node, "perm", None) or list(range(x.rank))[::-1]
        if perm.index(x.axis) != x.axis:
            return self.reject(node, tracked, f"moves the channel axis (perm={perm})")
        self.pass_on(node, x)
        return {0}

    def _axes(self, node: ir.Node, since_opset: int) -> tuple[list[int] | None, bool]:
        """(axes, known): from the attribute before ``since_opset``, else from constant input 1."""
        if self.opset < since_opset:
            return attr_ints(node, "axes", None), True
        if len(node.inputs) < 2 or node.inputs[1] is None:
            return None, True
        axes = _const_ints(node.inputs[1])
        return axes, axes is not None

    def op_reduce(self, node: ir.Node, tracked: dict[int, _Layout]) -> set[int]:
        x = tracked.get(0)
        if x is None or set(tracked) != {0} or x.rank is None:
            return self.reject(node, tracked, "reduces a tensor of unknown rank")
        since = 13 if node.op_type == "ReduceSum" else 18
        axes, known = self._axes(node, since)
        if not known:
            return self.reject(node, tracked, "reduces over computed axes")
        if not axes:
            if attr_int(node, "noop_with_empty_axes", 0):
                self.pass_on(node, x)
                return {0}
            return self.reject(node, tracked, "reduces over all axes, the channel axis included")
        axes = sorted(a % x.rank for a in axes)
        if x.axis in axes:
            return self.reject(node, tracked, "reduces over the channel axis")
        if attr_int(node, "keepdims", 1):
            self.pass_on(node, x)
        else:
            self.pass_on(node, x, axis=x.axis - sum(a < x.axis for a in axes), rank=x.rank - len(axes))
        return {0}

    def op_squeeze(self, node: ir.Node, tracked: dict[int, _Layout]) -> set[int]:
        x = tracked.get(0)
        if x is None or set(tracked) != {0} or x.rank is None:
            return self.reject(node, tracked, "squeezes a tensor of unknown rank")
        axes, known = self._axes(node, 13)
        dims = _dims(node.inputs[0])
        if not known or (axes is None and (dims is None or None in dims or any(isinstance(d, str) for d in dims))):
            return self.reject(node, tracked, "squeezes axes that are not known")
        axes = [i for i, d in enumerate(dims) if d == 1] if axes is None else [a % x.rank for a in axes]
        if x.axis in axes:
            return self.reject(node, tracked, "squeezes the channel axis")
        self.pass_on(node, x, axis=x.axis - sum(a < x.axis for a in axes), rank=x.rank - len(axes))
        return {0}

    def op_unsqueeze(self, node: ir.Node, tracked: dict[int, _Layout]) -> set[int]:
        x = tracked.get(0)
        if x is None or set(tracked) != {0} or x.rank is None:
            return self.reject(node, tracked, "unsqueezes a tensor of unknown rank")
        axes, known = self._axes(node, 13)
        if not known or not axes:
            return self.reject(node, tracked, "unsqueezes axes that are not known")
        out_rank = x.rank + len(axes)
        inserted = {a % out_rank for a in axes}
        kept = [p for p in range(out_rank) if p not in inserted]
        self.pass_on(node, x, axis=kept[x.axis], rank=out_rank)
        return {0}

    def op_pad(self, node: ir.Node, tracked: dict[int, _Layout]) -> set[int]:
        x = tracked.get(0)
        if x is None or set(tracked) != {0} or x.rank is None:
            return self.reject(node, tracked, "pads with channels as a setting")
        if self.opset < 11:
            pads, axes = attr_ints(node, "pads", None), None
        else:
            pads = _const_ints(node.inputs[1]) if len(node.inputs) > 1 else None
            axes = None
            if len(node.inputs) > 3 and node.inputs[3] is not None:
                axes = _const_ints(node.inputs[3])
                if axes is None:
                    return self.reject(node, tracked, "pads computed axes")
        if pads is None:
            return self.reject(node, tracked, "pads by computed amounts")
        axes = list(range(x.rank)) if axes is None else [a % x.rank for a in axes]
        if x.axis in axes:
            j = axes.index(x.axis)
            if pads[j] != 0 or pads[j + len(axes)] != 0:
                return self.reject(node, tracked, "pads the channel axis")
        self.pass_on(node, x)
        return {0}

    def op_resize(self, node: ir.Node, tracked: dict[int, _Layout]) -> set[int]:
        x = tracked.get(0)
        if x is None or set(tracked) != {0} or x.rank is None:
            return self.reject(node, tracked, "resizes with channels as a setting")
        axes = attr_ints(node, "axes", None)
        axes = list(range(x.rank)) if axes is None else [a % x.rank for a in axes]
        old = node.op_type == "Upsample" or self.opset < 11      # (X, scales) before opset 11
        scales_index, sizes_index = (1, None) if old else (2, 3)
        scales = constant_array(node.inputs[scales_index]) if len(node.inputs) > scales_index else None
        sizes_value = node.inputs[sizes_index] if sizes_index is not None and len(node.inputs) > sizes_index else None
        if scales is not None and scales.size:
            if x.axis in axes and float(scales.reshape(-1)[axes.index(x.axis)]) != 1.0:
                return self.reject(node, tracked, "scales the channel axis")
        elif sizes_value is not None:
            sizes = _const_ints(sizes_value)
            if sizes is None:
                return self.reject(node, tracked, "resizes to computed sizes")
            if x.axis in axes:
                j = axes.index(x.axis)
                if sizes[j] != len(x.elems):
                    return self.reject(node, tracked, "resizes the channel axis")
                self.counts.append(("shape entry", node, sizes_index, j, x.elems))
        else:
            return self.reject(node, tracked, "resizes by computed scales")
        self.pass_on(node, x)
        return {0}

    def op_flatten(self, node: ir.Node, tracked: dict[int, _Layout]) -> set[int]:
        x = tracked[0]
        dims = _dims(node.inputs[0])
        if dims is None:
            return self.reject(node, tracked, "flattens a tensor of unknown rank")
        axis = attr_int(node, "axis", 1)
        axis = axis + len(dims) if axis < 0 else axis
        if axis > x.axis:
            return self.reject(node, tracked, "flattens the channel axis into the batch axis")
        outer, inner = dims[axis:x.axis], dims[x.axis + 1:]
        if not all(isinstance(d, int) for d in outer + inner):
            return self.reject(node, tracked, "flattens dimensions of unknown size")
        # Channel c of the input owns positions [c*P, (c+1)*P) of each outer block (P = H*W).
        elems = np.tile(np.repeat(x.elems, math.prod(inner)), math.prod(outer))
        self.pass_on(node, x, axis=1, rank=2, elems=elems)
        return {0}

    def op_reshape(self, node: ir.Node, tracked: dict[int, _Layout]) -> set[int]:
        x = tracked.get(0)
        if x is None or set(tracked) != {0}:
            return self.reject(node, tracked, "reshapes to a shape computed from the channels")
        dims = _dims(node.inputs[0])
        entries = self.shape_entries(node.inputs[1])
        resolved = None if dims is None or entries is None else _resolve_reshape(
            dims, entries, attr_int(node, "allowzero", 0))
        if resolved is None:
            return self.reject(node, tracked, "reshapes to a shape that is not known")
        k, width = x.axis, len(x.elems)
        if len(resolved) < k + 1 or resolved[:k] != dims[:k]:
            return self.reject(node, tracked, "reshapes the dimensions before the channel axis")
        tail = dims[k + 1:]
        if resolved[k] == width:
            # Channels stay on axis k: only the dimensions after it are rearranged.
            elems = x.elems
        elif len(resolved) == k + 1 and all(isinstance(d, int) for d in tail) and resolved[k] == width * math.prod(tail):
            # Flatten into features: channel c owns positions [c*P, (c+1)*P), P = prod(tail).
            elems = np.repeat(x.elems, math.prod(tail))
        else:
            return self.reject(node, tracked, "reshapes the channel axis")
        if entries[k] not in (0, -1):
            # The width is spelled out (e.g. view(-1, C*H*W)): it is rewritten with the channels.
            if constant_array(node.inputs[1]) is None:
                return self.reject(node, tracked, "has the channel count in a computed shape")
            self.counts.append(("shape entry", node, 1, k, elems))
        self.pass_on(node, x, rank=len(resolved), elems=elems)
        return {0}

    def op_shape(self, node: ir.Node, tracked: dict[int, _Layout]) -> set[int]:
        """Shape of a carrier: fine as long as nobody reads its channel entry."""
        x = tracked[0]
        if x.rank is None:
            return self.reject(node, tracked, "reads the shape of a tensor of unknown rank")
        start, end = attr_int(node, "start", 0), attr_int(node, "end", x.rank)
        start = max(start + x.rank if start < 0 else start, 0)
        end = min(end + x.rank if end < 0 else end, x.rank)
        entry, length = x.axis - start, end - start
        if not 0 <= entry < length:
            return {0}          # the channel count is not in this Shape's output
        for reader in {id(u.node): u.node for u in node.outputs[0].uses()}.values():
            if reader.op_type == "Gather" and attr_int(reader, "axis", 0) == 0:
                indices = _const_ints(reader.inputs[1])
                if indices is not None and entry not in indices and entry - length not in indices:
                    continue
            return self.reject(node, tracked, f"has its channel count read by {reader.op_type} '{_label(reader)}'")
        if node.outputs[0].is_graph_output():
            return self.reject(node, tracked, "has its channel count as a graph output")
        return {0}

    def shape_entries(self, value: ir.Value | None) -> list[int | str | None] | None:
        """Evaluate a 1-D shape tensor into entries: ints, symbolic dim names, or None (unknown)."""
        if value is None:
            return None
        key = id(value)
        if key in self._shape_cache:
            return self._shape_cache[key]
        self._shape_cache[key] = None            # guards cycles
        result = self._eval_shape(value)
        self._shape_cache[key] = result
        return result

    def _eval_shape(self, value: ir.Value) -> list | None:
        const = constant_array(value)
        if const is not None:
            return [int(v) for v in np.asarray(const).reshape(-1)]
        node = value.producer()
        if node is None or not _is_default_domain(node):
            return None
        op = node.op_type
        if op == "Shape":
            dims = _dims(node.inputs[0])
            if dims is None:
                return None
            n = len(dims)
            start, end = attr_int(node, "start", 0), attr_int(node, "end", n)
            return dims[slice(start, end)]
        inner = self.shape_entries(node.inputs[0])
        if inner is None:
            return None
        if op in ("Cast", "Identity", "Squeeze", "Unsqueeze"):
            return inner if op != "Unsqueeze" or len(inner) == 1 else None
        if op == "Gather" and attr_int(node, "axis", 0) == 0:
            idx = _const_ints(node.inputs[1])
            if idx is None or not all(-len(inner) <= i < len(inner) for i in idx):
                return None
            return [inner[i] for i in idx]
        if op == "Concat":
            out: list = []
            for v in node.inputs:
                part = self.shape_entries(v)
                if part is None:
                    return None
                out.extend(part)
            return out
        return None


_PRODUCER_OPS = frozenset({"Conv", "Gemm", "MatMul"})

_RULES: dict[str, Callable[[_Walk, ir.Node, dict[int, _Layout]], set[int]]] = {
    "Conv": _Walk.op_conv,
    "Gemm": _Walk.op_gemm,
    "MatMul": _Walk.op_matmul,
    "BatchNormalization": _Walk.op_norm,
    "InstanceNormalization": _Walk.op_norm,
    "LayerNormalization": _Walk.op_layernorm,
    "LpNormalization": _Walk.op_lpnorm,
    "Softmax": _Walk.op_softmax,
    "LogSoftmax": _Walk.op_softmax,
    "Hardmax": _Walk.op_softmax,
    "Concat": _Walk.op_concat,
    "Split": _Walk.op_split,
    "Slice": _Walk.op_slice,
    "Gather": _Walk.op_gather,
    "Transpose": _Walk.op_transpose,
    "Squeeze": _Walk.op_squeeze,
    "Unsqueeze": _Walk.op_unsqueeze,
    "Pad": _Walk.op_pad,
    "Resize": _Walk.op_resize,
    "Upsample": _Walk.op_resize,
    "Flatten": _Walk.op_flatten,
    "Reshape": _Walk.op_reshape,
    "Shape": _Walk.op_shape,
}


# --------------------------------------------------------------------------- grouping

def _build_groups(walk: _Walk) -> list[ChannelGroup]:
    n = len(walk.parent)
    if n == 0:
        return []
    roots = np.array([walk.find(e) for e in range(n)], dtype=np.int64)
    # Producers that share an element class form one group.
    space_parent = list(range(len(walk.producers)))

    def find_space(s: int) -> int:
        while space_parent[s] != s:
            space_parent[s] = space_parent[space_parent[s]]
            s = space_parent[s]
        return s

    space = np.asarray(walk.space, dtype=np.int64)
    for e in range(n):
        a, b = find_space(int(space[e])), find_space(int(space[roots[e]]))
        if a != b:
            space_parent[max(a, b)] = min(a, b)
    group_of_producer = [find_space(p) for p in range(len(walk.producers))]
    group_ids = _unique(group_of_producer)               # graph order of first producers
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
        label = _label(walk.producers[key][0])
        gid, i = f"group:{label}", 1
        while gid in taken:
            i += 1
            gid = f"group:{label}#{i}"
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
        groups[g].producers.append(ChannelProducer(_label(node), node.op_type, out.name or "", axis,
                                                   channel_of_root[roots[elems]], ir_node=node))
    for role, node, index, axis, elems in walk.slices:
        value = node.inputs[index]
        for g, positions, channels in split(elems):
            groups[g].slices.append(ChannelSlice(role, _label(node), index, value.name if value is not None else "",
                                                 axis, positions, channels, ir_node=node))
    for kind, node, index, entry, elems in walk.counts:
        for g, positions, channels in split(elems):
            groups[g].counts.append(ChannelCount(kind, _label(node), index, entry, positions, channels, ir_node=node))
    for key, value in walk.values.items():
        lay = walk.layouts[key]
        for g, positions, channels in split(lay.elems):
            groups[g].carriers.append(ChannelCarrier(value.name or "", lay.axis, positions, channels, ir_value=value))
    first_block: dict[int, tuple[str, str]] = {}
    for e, reason, label in walk.blocks:
        g = int(group_of_root[roots[e]])
        first_block.setdefault(g, (reason, label))
    for g, (reason, label) in first_block.items():
        groups[g].blocked_by, groups[g].blocking_node = reason, label
    return groups


def _fingerprint(model: ir.Model) -> tuple:
    """Changes whenever a node, one of its inputs, or a graph output is replaced."""
    parts = [id(model.graph)]
    for node in model.graph:
        parts.append(id(node))
        parts.extend(id(v) for v in node.inputs)
    parts.extend(id(v) for v in model.graph.outputs)
    return tuple(parts)


def channel_groups(model: ir.Model, *, cache: bool = True) -> list[ChannelGroup]:
    """Every channel group of the model, prunable or blocked, in graph order of first producers.

    Shapes must be inferred (``load_model`` does it, and folds constants so
    exporter padding chains are gone). The result is cached on the model
    until a node or one of its inputs is replaced.
    """
    key = _fingerprint(model) if cache else None
    cached = model.meta.get("pycompress.channel_groups") if cache else None
    if cached is not None and cached[0] == key:
        return cached[1]
    walk = _Walk(model)
    walk.run()
    groups = _build_groups(walk)
    if cache:
        model.meta["pycompress.channel_groups"] = (key, groups)
    return groups


def shape_entries(model: ir.Model, value: ir.Value | None) -> list[int | str | None] | None:
    """A 1-D shape tensor's entries: ints, symbolic dim names, or None (a constant, or computed by
    Shape/Gather/Concat/Unsqueeze...); None when it cannot be evaluated."""
    return _Walk(model).shape_entries(value)


def channel_group(model: ir.Model, group_id: str) -> ChannelGroup:
    """The group with this id (raises PycompressError naming the site if there is none)."""
    for group in channel_groups(model):
        if group.id == group_id:
            return group
    raise PycompressError(f"site '{group_id}': no such channel group in the model")


__all__ = ["ChannelCarrier", "ChannelCount", "ChannelGroup", "ChannelProducer", "ChannelSlice",
           "channel_group", "channel_groups", "shape_entries"]
