"""Per-layer parameters, bytes and multiply-accumulates (MACs).

MACs are per inference of the graph as shaped: a symbolic dimension (usually
the batch) counts as 1, so a model exported with a dynamic batch reports the
cost of one sample. A token model (symbolic sequence length) is counted per
sequence of ``sequence_length`` tokens by ``model_cost(model,
sequence_length=L)``: the inputs' symbolic dimensions besides the batch are
fixed to ``L`` on a copy, shapes re-inferred (so attention's ``T x T``
products count too), and every node of the original is costed from the copy.
Quantized matrix products (MatMulInteger, QLinearMatMul, ConvInteger,
QLinearConv, and onnxruntime's DynamicQuantizeMatMul, MatMulIntegerToFloat,
QGemm, MatMulNBits) count their MACs like the float op they replace.

Parameters are the elements of constant tensors a node reads, except int64
tensors (shapes, axes, indices of Reshape/Slice) and 0-d scalars (Clip
bounds, Pad values written as Constant nodes): those are op settings, not
weights. A constant read by several nodes is counted once, at its first
reader in graph order. A 4-bit table (two codes per byte, unpacked by
BitShift after its Gather: ``pycompress.export.embedding``) counts two
parameters per byte.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx_ir as ir

from pycompress.ir.graph import attr_int, constant_array, is_codebook_lookup, shape_of

# Ops whose cost is their matrix product; everything else is counted for its
# parameters only (elementwise work is small next to Conv/Gemm/MatMul).
COMPUTE_OPS = ("Conv", "Gemm", "MatMul", "ConvTranspose")
# Tokens per sequence when a token model's MACs are counted per sequence (info, bench, synthetic inputs).
SEQUENCE_LENGTH = 64
# Quantized forms: op -> (the float op whose MACs they have, index of A, index of B / the weight).
QUANTIZED_OPS = {
    "MatMulInteger": ("MatMul", 0, 1), "QLinearMatMul": ("MatMul", 0, 3),
    "ConvInteger": ("Conv", 0, 1), "QLinearConv": ("Conv", 0, 3),
    "DynamicQuantizeMatMul": ("MatMul", 0, 1), "MatMulIntegerToFloat": ("MatMul", 0, 1),
    "QGemm": ("Gemm", 0, 3), "MatMulNBits": ("MatMul", 0, None),
}


@dataclass
class LayerCost:
    name: str
    op: str
    weight_shape: list[int] | None
    params: int
    bytes: int
    macs: int
    # Bytes once deployed packed: shared-weight indices at their codebook's
    # bit width (``ceil(log2 K)`` bits each, as the .pcz container stores them
    # before Huffman), every other weight as stored.
    packed_bytes: float = 0.0


@dataclass
class ModelCost:
    layers: list[LayerCost] = field(default_factory=list)

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def bytes(self) -> int:
        return sum(layer.bytes for layer in self.layers)

    @property
    def macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    @property
    def packed_bytes(self) -> float:
        return sum(layer.packed_bytes for layer in self.layers)

    def by_name(self) -> dict[str, LayerCost]:
        return {layer.name: layer for layer in self.layers}

    def to_dict(self) -> dict:
        return {
            "layers": [asdict(layer) for layer in self.layers],
            "total": {"params": self.params, "bytes": self.bytes, "macs": self.macs,
                      "packed_bytes": self.packed_bytes},
        }


def _dims(shape: tuple[int | None, ...] | None) -> list[int] | None:
    return None if shape is None else [1 if d is None else d for d in shape]


def _is_weight(array: np.ndarray) -> bool:
    return array.ndim >= 1 and array.dtype != np.int64 and array.dtype.kind in "fiu"


def node_macs(node: ir.Node) -> int:
    """Multiply-accumulates of one node, from its inferred shapes (0 if unknown)."""
    op = node.op_type
    a_index, b_index = 0, 1
    if op in QUANTIZED_OPS and node.domain in ("", "ai.onnx", "com.microsoft"):
        op, a_index, b_index = QUANTIZED_OPS[op]
        if b_index is None:   # MatMulNBits: B is packed; K and N are attributes
            out = _dims(shape_of(node.outputs[0]))
            return 0 if out is None else math.prod(out) * attr_int(node, "K", 0)
    elif op not in COMPUTE_OPS or node.domain not in ("", "ai.onnx"):
        return 0
    out = _dims(shape_of(node.outputs[0]))
    if out is None:
        return 0
    if op in ("Conv", "ConvTranspose"):
        w = _dims(shape_of(node.inputs[b_index]))
        if w is None:
            arr = constant_array(node.inputs[b_index])
            w = None if arr is None else list(arr.shape)
        if w is None:
            return 0
        if op == "Conv":
            # Each output element: (Ci / groups) * prod(kernel) MACs; w[1] = Ci / groups.
            return math.prod(out) * w[1] * math.prod(w[2:])
        x = _dims(shape_of(node.inputs[0]))
        if x is None:
            return 0
        # ConvTranspose: each input element scatters into (Co / groups) * prod(kernel); w[1] = Co / groups.
        return math.prod(x) * w[1] * math.prod(w[2:])
    # The reduction length K comes from A's shape, or from B's when A's is
    # symbolic there (e.g. Flatten/Reshape with -1 before a classifier).
    a, b = shape_of(node.inputs[a_index]), shape_of(node.inputs[b_index])
    if op == "Gemm":
        k = None if a is None else a[0 if attr_int(node, "transA", 0) else 1]
        if k is None and b is not None:
            k = b[1 if attr_int(node, "transB", 0) else 0]
    else:  # MatMul with numpy broadcasting: out[..., M, N], reduction over K.
        k = None if a is None else a[-1]
        if k is None and b is not None and len(b) >= 2:
            k = b[-2]
    if a is None and k is None:
        return 0
    return math.prod(out) * (1 if k is None else k)


def model_cost(model: ir.Model, sequence_length: int | None = None) -> ModelCost:
    """Parameters, bytes and MACs per layer (every node with weights or MACs);
    ``sequence_length``: MACs per sequence of that many tokens (see module docstring)."""
    shaped = _shaped_nodes(model, sequence_length) if sequence_length else None
    counted: set[int] = set()
    cost = ModelCost()
    for node in model.graph:  # top-level graph; subgraphs are rare in vision/FC models
        if node.op_type == "Constant":
            continue
        params = nbytes = 0
        packed = 0.0
        index_bits = _index_bits(node)
        weight_shape = None
        for value in node.inputs:
            if value is None or id(value) in counted:
                continue
            array = constant_array(value)
            if array is None or not _is_weight(array):
                continue
            counted.add(id(value))
            params += int(array.size) * _codes_per_element(node, value, array)
            nbytes += int(array.nbytes)
            packed += array.size * index_bits / 8 if index_bits and array.dtype == np.uint8 else array.nbytes
            if weight_shape is None or array.size > math.prod(weight_shape):
                weight_shape = list(array.shape)
        macs = node_macs(node if shaped is None else shaped.get(id(node), node))
        if params or macs:
            cost.layers.append(LayerCost(node.name, node.op_type, weight_shape, params, nbytes, macs, packed))
    return cost


def _codes_per_element(node: ir.Node, value: ir.Value, array: np.ndarray) -> int:
    """2 for the uint8 data of a Gather whose rows are split into nibbles by BitShift (a 4-bit table), else 1."""
    if array.dtype != np.uint8 or node.op_type != "Gather" or node.inputs[0] is not value:
        return 1
    return 2 if any(use.node.op_type == "BitShift" for use in node.outputs[0].uses()) else 1


def has_sequence_axis(model: ir.Model) -> bool:
    """Whether an input has a symbolic dimension besides the batch (a token model's sequence)."""
    for value in model.graph.inputs:
        dims = list(value.shape or [])
        if any(not isinstance(d, int) for d in dims[1:]):
            return True
    return False


def _shaped_nodes(model: ir.Model, sequence_length: int) -> dict[int, ir.Node]:
    """Original node id -> the same node in a copy whose inputs have batch 1 and
    ``sequence_length`` for every other symbolic dimension, shapes re-inferred."""
    from pycompress.ir.io import infer_model_shapes

    copy = model.clone()
    for value in copy.graph.inputs:
        if value.shape is not None:
            dims = list(value.shape)
            value.shape = ir.Shape([d if isinstance(d, int) else (1 if i == 0 else sequence_length)
                                    for i, d in enumerate(dims)])
    for node in copy.graph:
        for out in node.outputs:
            if out is not None and not out.is_graph_output():
                out.shape = None
    try:
        infer_model_shapes(copy, where="model with a fixed sequence length")
    except Exception:  # noqa: BLE001 - fall back to the symbolic count
        return {}
    return {id(a): b for a, b in zip(model.graph, copy.graph)}


def _index_bits(node: ir.Node) -> int | None:
    """Bits per index of a shared weight's ``Cast(uint8 indices)`` (from its codebook's length), else None."""
    if node.op_type != "Cast" or not is_codebook_lookup(node):
        return None
    for use in node.outputs[0].uses():
        if use.node.op_type == "Gather":
            codebook = constant_array(use.node.inputs[0])
            if codebook is not None:
                return max(1, math.ceil(math.log2(max(codebook.size, 2))))
    return None
