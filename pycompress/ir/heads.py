"""Attention heads as coupled groups (ALGORITHMS.md 1.7): what pruning one head touches.

A multi-head attention block as exporters write it (torch ``nn.Linear`` +
``view``/``transpose``, Hugging Face BERT)::

    q = Reshape(Q(x), [B, T, H, d]) -> Transpose(0, 2, 1, 3)          (K, V alike;
    s = MatMul(q, Transpose(k)) [* or / scale] [+ mask] -> Softmax      K may be
    c = MatMul(s, v) -> Transpose(0, 2, 1, 3) -> Reshape([B, T, H*d])   transposed
    y = O(c)                                                            to (0,2,3,1))

Head ``h`` is the output columns ``h*d .. (h+1)*d`` of Q, K and V (weights and
biases) and the same input rows of O: one coupled group of ``d``-wide blocks.
Pruning heads also rewrites the head count ``H`` in the three split Reshapes
and the width ``H*d`` in the merge Reshape (a constant shape, or a constant
input of the ``Concat`` that builds the shape from ``Shape`` of the input).
``Q``/``K``/``V``/``O`` are MatMuls with a constant ``[D, D']`` weight on the
right, each with an optional bias ``Add``. Anything else is not recognised (the
channel analysis then reports the Reshape that blocks the projections).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import onnx_ir as ir

from pycompress.ir.channels import shape_entries
from pycompress.ir.graph import add_initializer, attr_ints, constant_array, site_by_id

_SCORE_OPS = frozenset({"Mul", "Div", "Add", "Sub", "Where", "Cast", "Softmax", "Dropout", "Identity"})


@dataclass
class ShapeEntry:
    """Where a number of a Reshape's shape lives: ``node.inputs[index]`` holds it at ``entry``."""

    node: ir.Node          # the Reshape (constant shape) or the Concat building the shape
    index: int
    entry: int             # position inside that constant (0 for a 1-element Concat input)
    per_head: int          # the number equals heads * per_head


@dataclass
class AttentionHeads:
    id: str                                  # "heads:<O node name>"
    heads: int
    head_dim: int
    projections: list[ir.Node]               # Q, K, V MatMuls (weight [D, H*d] on the right)
    output: ir.Node                          # O MatMul (weight [H*d, D'] on the right)
    counts: list[ShapeEntry] = field(default_factory=list)
    nodes_between: list[ir.Node] = field(default_factory=list)   # whose output shapes change
    # The head width d of the Q and K split Reshapes (the query/key rank rewrite changes it;
    # V keeps d); None where it is not a constant of its own.
    qk_dims: list[ShapeEntry | None] = field(default_factory=list)
    splits: list[ir.Node] = field(default_factory=list)   # the Q, K, V split Reshapes
    scores: ir.Node | None = None                          # the q k^T MatMul

    @property
    def width(self) -> int:
        return self.heads

    @property
    def nodes(self) -> list[str]:
        return [n.name for n in self.projections + [self.output]]

    def columns(self, heads: np.ndarray) -> np.ndarray:
        """The projection columns / output rows of the given heads, ascending."""
        heads = np.sort(np.asarray(heads, dtype=np.int64))
        return (heads[:, None] * self.head_dim + np.arange(self.head_dim)[None, :]).reshape(-1)

    def info(self) -> dict:
        return {"width": self.heads, "heads": self.heads, "head_dim": self.head_dim, "kind": "attention heads",
                "producers": [n.name for n in self.projections], "consumers": [self.output.name],
                "producer_outputs": [n.outputs[0].name for n in self.projections]}


def set_shape_entries(model: ir.Model, values: Iterable[tuple[ShapeEntry, int]], rename: Callable[[str], str]) -> None:
    """Write each number into its entry's constant. Entries of one constant input share one new copy
    (named ``rename(old name)``); the Reshape / Concat reads it, other readers keep the original."""
    copies: dict[tuple[int, int], tuple[ShapeEntry, np.ndarray]] = {}
    for entry, value in values:
        key = (id(entry.node), entry.index)
        if key not in copies:
            copies[key] = (entry, np.array(constant_array(entry.node.inputs[entry.index]), copy=True))
        copies[key][1].reshape(-1)[entry.entry] = value
    for entry, array in copies.values():
        old = entry.node.inputs[entry.index].name or "shape"
        entry.node.replace_input_with(entry.index, add_initializer(model, rename(old), np.ascontiguousarray(array)))


def _producer(value: ir.Value | None) -> ir.Node | None:
    return None if value is None else value.producer()


def _weight(node: ir.Node | None) -> np.ndarray | None:
    if node is None or node.op_type != "MatMul":
        return None
    w = constant_array(node.inputs[1])
    return w if w is not None and w.ndim == 2 and w.dtype.kind == "f" and constant_array(node.inputs[0]) is None \
        else None


def _linear_before(value: ir.Value) -> tuple[ir.Node, ir.Node | None] | None:
    """(MatMul, bias Add or None) producing ``value``."""
    node = _producer(value)
    if node is not None and node.op_type == "Add":
        for i, v in enumerate(node.inputs):
            other = node.inputs[1 - i]
            if _weight(_producer(v)) is not None and constant_array(other) is not None:
                return _producer(v), node
        return None
    return (node, None) if _weight(node) is not None else None


def _shape_entry(reshape: ir.Node, entry: int, per_head: int) -> ShapeEntry | None:
    """The constant holding entry ``entry`` of a Reshape's shape (directly or through a Concat)."""
    shape_value = reshape.inputs[1]
    if constant_array(shape_value) is not None:
        return ShapeEntry(reshape, 1, entry, per_head)
    concat = _producer(shape_value)
    if concat is None or concat.op_type != "Concat":
        return None
    position = 0
    for i, part in enumerate(concat.inputs):
        array = constant_array(part)
        length = int(array.size) if array is not None else 1   # computed parts are 1-element (Unsqueeze'd dims)
        if position <= entry < position + length:
            return ShapeEntry(concat, i, entry - position, per_head) if array is not None else None
        position += length
    return None


def _split(value: ir.Value, transposes: tuple[tuple[int, ...], ...]):
    """Walk back from a head tensor: Transpose(s) with the given perms, then Reshape [.., H, d]."""
    node = _producer(value)
    seen = []
    for perm in transposes:
        if node is None or node.op_type != "Transpose" or tuple(attr_ints(node, "perm", [])) != perm:
            return None
        seen.append(node)
        node = _producer(node.inputs[0])
    if node is None or node.op_type != "Reshape":
        return None
    return node, seen


def _through_scale(value: ir.Value) -> ir.Value:
    """Skip a Mul / Div of a head tensor by a constant scale (scaled q or k)."""
    node = _producer(value)
    while node is not None and node.op_type in ("Mul", "Div") and constant_array(node.inputs[1]) is not None \
            and np.asarray(constant_array(node.inputs[1])).size == 1:
        value = node.inputs[0]
        node = _producer(value)
    return value


def attention_heads(model: ir.Model) -> list[AttentionHeads]:
    """Every recognised multi-head attention block of the model (see the module docstring)."""
    found = []
    for o_node in model.graph:
        w_o = _weight(o_node)
        if w_o is None:
            continue
        merge = _producer(o_node.inputs[0])
        if merge is None or merge.op_type != "Reshape":
            continue
        back = _producer(merge.inputs[0])
        if back is None or back.op_type != "Transpose" or tuple(attr_ints(back, "perm", [])) != (0, 2, 1, 3):
            continue
        context = _producer(back.inputs[0])
        if context is None or context.op_type != "MatMul" or constant_array(context.inputs[1]) is not None:
            continue
        v_split = _split(context.inputs[1], ((0, 2, 1, 3),))
        scores = _producer(context.inputs[0])
        between = [o_node, merge, back, context]
        while scores is not None and scores.op_type in _SCORE_OPS:
            between.append(scores)
            scores = next((_producer(v) for v in scores.inputs if v is not None and constant_array(v) is None
                           and _producer(v) is not None and _producer(v).op_type in _SCORE_OPS | {"MatMul"}
                           and not (_producer(v).op_type == "MatMul" and _weight(_producer(v)) is not None)), None)
        if scores is None or scores.op_type != "MatMul" or v_split is None:
            continue
        between.append(scores)
        q_split = _split(_through_scale(scores.inputs[0]), ((0, 2, 1, 3),))
        k_value = _through_scale(scores.inputs[1])
        k_split = _split(k_value, ((0, 2, 3, 1),)) or _split(k_value, ((0, 1, 3, 2), (0, 2, 1, 3)))
        if q_split is None or k_split is None:
            continue
        splits = [q_split, k_split, v_split]
        linears = [_linear_before(r.inputs[0]) for r, _ in splits]
        if any(lin is None for lin in linears):
            continue
        width = _weight(linears[0][0]).shape[1]
        if any(_weight(lin[0]).shape[1] != width for lin in linears) or w_o.shape[0] != width:
            continue
        dims = [shape_entries(model, r.inputs[1]) for r, _ in splits]
        if any(d is None or len(d) != 4 or not isinstance(d[3], int) or d[3] <= 0 for d in dims):
            continue
        head_dim = dims[0][3]
        heads = width // head_dim
        # The head count is spelled out (rewritten with the heads) or left to -1.
        if any(d[3] != head_dim or d[2] not in (heads, -1) for d in dims) or heads < 1 or heads * head_dim != width:
            continue
        counts = [_shape_entry(r, 2, 1) for (r, _), d in zip(splits, dims) if d[2] == heads]
        merge_dims = shape_entries(model, merge.inputs[1])
        if merge_dims is None or len(merge_dims) != 3 or merge_dims[2] not in (width, -1):
            continue
        if merge_dims[2] == width:
            counts.append(_shape_entry(merge, 2, head_dim))
        if any(c is None for c in counts):
            continue
        for r, transposes in splits:
            between += [r, *transposes]
        for lin in linears:
            between += [n for n in lin if n is not None]
        qk_dims = [_shape_entry(r, 3, 0) for r, _ in splits[:2]]
        found.append(AttentionHeads(f"heads:{o_node.name}", heads, head_dim, [lin[0] for lin in linears], o_node,
                                    counts, between, qk_dims, [r for r, _ in splits],
                                    scores))
    return found


def attention_head_group(model: ir.Model, group_id: str) -> AttentionHeads:
    return site_by_id(attention_heads(model), group_id, "attention block")
