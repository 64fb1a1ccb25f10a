"""4-bit embedding tables: token lookups that store half a byte per weight.

A text model's word-embedding table is a large share of its bytes (MiniLM:
30522 x 384, half the file after int8), and onnxruntime's quantizers leave it
float or make it int8 with one scale for the whole table. Here the table of
every embedding lookup (``Gather(table, ids)`` with ``ids`` coming from a graph
input) is stored as 4-bit codes, uniform and asymmetric per group of
``group`` columns of a row (``w ~ lo + q * step``, ``q`` in 0..15; ``step``
and ``lo`` float16 per group), and dequantized at run time for the gathered
rows only, with standard ONNX ops (opset 11+), so stock onnxruntime runs it::

    packed[V, D/2] uint8 --Gather(ids)--> [..., D/2]
        high nibble = column j, low nibble = column j + D/2 (BitShift right 4 /
        left 4 then right 4: BitwiseAnd needs opset 18)
    Concat(high, low) -> Cast(float) -> [Reshape to groups] -> * Gather(step, ids) + Gather(lo, ids)

Storing the two halves of a row in the two nibbles (instead of neighbouring
columns) makes the unpack a plain Concat: no interleaving Reshape. Per group,
the range is clipped by the factor in 0.6..1 that minimises the group's
squared error (min/max is one of the candidates, so never worse than it).

Measured on MiniLM (docs/transformers.md): groups of 64 columns cost 0.0011 of
held-out cosine in the fp32 model (per row: 0.0019; 16-level k-means per row:
0.0015 at more bytes), so 64 is the default.

Why an export option and not a rewrite of the plan/search: this is a storage
format of one tensor (like int8), with nothing to search or to refit, and it
must run before onnxruntime's quantizer so that the quantizer can be told to
leave its nodes alone (``nodes_to_exclude``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import onnx_ir as ir

from pycompress.ir import add_initializer, attr_int, constant_array, opset_version, remove_if_unused, unique_name
from pycompress.ir.graph import INDEX_PASS_OPS

BITS = 4
LEVELS = 2 ** BITS
# Tables with fewer rows (position, token-type embeddings) are small: kept as they are.
MIN_ROWS = 1024
DEFAULT_GROUP = 64
CLIP_FACTORS = np.linspace(0.6, 1.0, 9)


@dataclass
class PackedTable:
    """A table as 4-bit codes: ``packed`` [V, D/2] uint8 (column j high, j + D/2 low), ``step`` and
    ``lo`` [V, D / group] (float16, or float32 where float16 cannot hold them)."""

    packed: np.ndarray
    step: np.ndarray
    lo: np.ndarray
    group: int

    def dequantize(self, rows: np.ndarray | None = None) -> np.ndarray:
        """The float32 table (or ``rows`` of it) exactly as the ONNX graph computes it."""
        packed = self.packed if rows is None else self.packed[rows]
        step = (self.step if rows is None else self.step[rows]).astype(np.float32)
        lo = (self.lo if rows is None else self.lo[rows]).astype(np.float32)
        q = np.concatenate([packed >> 4, packed & 15], axis=-1).astype(np.float32)
        shape = q.shape
        q = q.reshape(*shape[:-1], -1, self.group)
        return (q * step[..., None] + lo[..., None]).reshape(shape)


def pack_table(table: np.ndarray, group: int = DEFAULT_GROUP) -> PackedTable:
    """4-bit codes of a [V, D] float table, per group of ``group`` columns (``group`` divides D; D even)."""
    table = np.asarray(table, dtype=np.float32)
    rows, dim = table.shape
    x = table.reshape(rows, dim // group, group)
    lo_all, hi_all = x.min(-1), x.max(-1)
    best_err = best_step = best_lo = None
    for factor in CLIP_FACTORS:
        step, lo = _storable((hi_all - lo_all) * factor / (LEVELS - 1), lo_all * factor)
        q = np.clip(np.round((x - lo[..., None]) / step[..., None]), 0, LEVELS - 1)
        err = ((q * step.astype(np.float32)[..., None] + lo.astype(np.float32)[..., None] - x) ** 2).sum(-1)
        if best_err is None:
            best_err, best_step, best_lo = err, step, lo
        else:
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_step, best_lo = np.where(better, step, best_step), np.where(better, lo, best_lo)
    step32, lo32 = best_step.astype(np.float32), best_lo.astype(np.float32)
    q = np.clip(np.round((x - lo32[..., None]) / step32[..., None]), 0, LEVELS - 1).astype(np.uint8)
    q = q.reshape(rows, dim)
    half = dim // 2
    packed = (q[:, :half] << 4) | q[:, half:]
    return PackedTable(packed.astype(np.uint8), best_step, best_lo, group)


def _storable(step: np.ndarray, lo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``step`` (> 0) and ``lo`` as float16 when that keeps them finite and steps non-zero, else float32."""
    step = np.where(step > 0, step, 1.0).astype(np.float32)  # a constant group: every code 0, w = lo
    lo = lo.astype(np.float32)
    half_step, half_lo = step.astype(np.float16), lo.astype(np.float16)
    if np.all(np.isfinite(half_step)) and np.all(half_step > 0) and np.all(np.isfinite(half_lo)):
        return half_step, half_lo
    return step, lo


@dataclass
class PackedLookup:
    node: str
    table: str
    rows: int
    dim: int
    group: int
    bytes_before: int
    bytes_after: int
    relative_error: float   # ||W~ - W|| / ||W|| over the table

    def to_dict(self) -> dict:
        return asdict(self)


def pack_embedding_lookups(model: ir.Model, group: int = DEFAULT_GROUP,
                           min_rows: int = MIN_ROWS) -> tuple[list[PackedLookup], list[str]]:
    """Rewrite every embedding lookup of ``model`` in place to a 4-bit table.

    A lookup is ``Gather(table, ids)`` (axis 0) with a constant 2-D float32
    table of at least ``min_rows`` rows and an even width, or the int8 table
    and per-tensor ``DequantizeLinear`` that onnxruntime's quantizers write,
    and ``ids`` from a graph input. ``group`` columns share a scale (0: the
    whole row; a width it does not divide also uses the whole row).
    Returns the rewritten lookups and the names of the nodes added (for a
    quantizer's ``nodes_to_exclude``).
    """
    if opset_version(model) < 11:  # BitShift
        return [], []
    done: list[PackedLookup] = []
    added: list[str] = []
    for node in list(model.graph):
        found = _lookup(node, min_rows)
        if found is None:
            continue
        table, output, removed = found
        rows, dim = table.shape
        size = group if group and dim % group == 0 else dim
        packed = pack_table(table, size)
        rel = float(np.linalg.norm(packed.dequantize() - table) / max(np.linalg.norm(table), 1e-30))
        table_value = node.inputs[0]
        nodes = _lookup_nodes(model, packed, node.inputs[1], table_value.name or "embedding")
        constants = {v: constant_array(v) for n in removed for v in n.inputs
                     if v is not None and constant_array(v) is not None}
        before = sum(int(array.nbytes) for array in constants.values() if array.ndim >= 1)
        after = packed.packed.nbytes + packed.step.nbytes + packed.lo.nbytes
        name = output.name
        model.graph.insert_before(node, nodes)
        output.replace_all_uses_with(nodes[-1].outputs[0], replace_graph_outputs=True)
        for n in reversed(removed):
            model.graph.remove(n, safe=True)
        for value in constants:
            remove_if_unused(model.graph, value)
        result = nodes[-1].outputs[0]
        result.name = name  # readers and graph outputs keep the tensor name
        result.dtype, result.shape = ir.DataType.FLOAT, output.shape
        done.append(PackedLookup(node.name, table_value.name, rows, dim, size, before, after, rel))
        added.extend(n.name for n in nodes)
    return done, added


def _lookup(node: ir.Node, min_rows: int) -> tuple[np.ndarray, ir.Value, list[ir.Node]] | None:
    """(float table, the value the lookup produces, nodes it replaces) for an embedding lookup, else None."""
    if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or attr_int(node, "axis", 0) != 0:
        return None
    table = constant_array(node.inputs[0])
    if table is None or table.ndim != 2 or table.shape[0] < min_rows or table.shape[1] % 2:
        return None
    if node.inputs[1] is None or constant_array(node.inputs[1]) is not None or not _from_graph_input(node.inputs[1]):
        return None
    if len(node.inputs[0].uses()) != 1 or node.inputs[0].is_graph_output():
        return None  # a table also read elsewhere (tied output projection): a packed copy would add bytes
    if table.dtype == np.float32:
        return table, node.outputs[0], [node]
    readers = [u.node for u in node.outputs[0].uses()]
    if table.dtype not in (np.int8, np.uint8) or len(readers) != 1 or node.outputs[0].is_graph_output():
        return None
    dq = readers[0]
    if dq.op_type != "DequantizeLinear" or dq.domain not in ("", "ai.onnx"):
        return None
    scale = constant_array(dq.inputs[1])
    has_zero = len(dq.inputs) > 2 and dq.inputs[2] is not None
    zero = constant_array(dq.inputs[2]) if has_zero else np.zeros((), table.dtype)
    if scale is None or zero is None or scale.size != 1 or zero.size != 1 or scale.dtype != np.float32:
        return None  # per-axis scales of a lookup are not what onnxruntime writes; left alone
    return (table.astype(np.float32) - np.float32(zero.item())) * scale.reshape(()), dq.outputs[0], [node, dq]


def _from_graph_input(value: ir.Value) -> bool:
    """Whether ``value`` is a graph input, or one passed through value-preserving ops (token ids)."""
    for _ in range(8):
        if value.is_graph_input():
            return True
        node = value.producer()
        if node is None or node.op_type not in INDEX_PASS_OPS or not node.inputs or node.inputs[0] is None:
            return False
        value = node.inputs[0]
    return False


def _lookup_nodes(model: ir.Model, table: PackedTable, ids: ir.Value, base: str) -> list[ir.Node]:
    """The nodes that gather ``ids`` from ``table`` and dequantize them; the last one's output is the result."""
    rows, half = table.packed.shape
    dim, groups = 2 * half, table.step.shape[1]
    nodes: list[ir.Node] = []

    def add(op: str, inputs: list[ir.Value], suffix: str, **attributes) -> ir.Value:
        node = ir.node(op, inputs, attributes=attributes, name=unique_name(model, f"{base}/{suffix}"))
        nodes.append(node)
        return node.outputs[0]

    def const(suffix: str, array: np.ndarray) -> ir.Value:
        return add_initializer(model, f"{base}_{suffix}", array)

    def shape_of_ids(suffix: str, tail: list[int]) -> ir.Value:
        """ids' shape + ``tail``: zeros (copy the dimension) when the rank of ids is known, else from Shape."""
        if ids.shape is not None:
            return const(suffix, np.array([0] * len(ids.shape) + tail, dtype=np.int64))
        return add("Concat", [add("Shape", [ids], f"{suffix}_ids"), const(suffix, np.array(tail, dtype=np.int64))],
                   suffix, axis=0)

    # Scales stored [V, G, 1] when there are groups, so the gathered [..., G, 1] broadcasts over a group.
    trailing = (groups, 1) if groups > 1 else (1,)
    gathered = add("Gather", [const("packed4", table.packed), ids], "gather_packed", axis=0)
    four = const("four", np.array(4, dtype=np.uint8))
    high = add("BitShift", [gathered, four], "high", direction="RIGHT")
    low = add("BitShift", [add("BitShift", [gathered, four], "low_shift", direction="LEFT"), four], "low",
              direction="RIGHT")
    codes = add("Cast", [add("Concat", [high, low], "codes", axis=-1)], "codes_float", to=ir.DataType.FLOAT)
    if groups > 1:
        codes = add("Reshape", [codes, shape_of_ids("group_shape", [groups, dim // groups])], "groups")
    parts = []
    for suffix, array in (("step", table.step), ("lo", table.lo)):
        value = add("Gather", [const(suffix, array.reshape(rows, *trailing)), ids], f"gather_{suffix}", axis=0)
        if array.dtype != np.float32:
            value = add("Cast", [value], f"{suffix}_float", to=ir.DataType.FLOAT)
        parts.append(value)
    result = add("Add", [add("Mul", [codes, parts[0]], "scale"), parts[1]], "dequantized")
    if groups > 1:
        add("Reshape", [result, shape_of_ids("row_shape", [dim])], "rows")
    return nodes


__all__ = ["DEFAULT_GROUP", "MIN_ROWS", "PackedLookup", "PackedTable", "pack_embedding_lookups", "pack_table"]
