"""A linear layer as a matrix: where a Gemm / MatMul / Conv keeps its weight and
how that weight reads as ``W`` (``in x out``, ``Y = X W + b``) whatever the op.

One place for the layout rules that ``svd`` (factoring), ``recover`` (least-squares
refits) and ``share`` (per-output-channel scales) all need:

- ``Gemm``: the weight is input 1, ``op(B)`` (``B^T`` when ``transB``) is ``in x out``;
  ``alpha`` / ``beta`` are the caller's to fold (they differ in what they fold);
- ``MatMul`` with a constant 2-D float operand: ``X @ W`` (weight input 1, read as
  is) is preferred over ``W' @ X`` (weight input 0, ``W = W'^T``);
- ``Conv``: ``(Co, Ci/g, k...)`` flattens to ``(Ci/g * k..., Co)`` (features in
  ``(Ci, kh, kw)`` order, as im2col reads them).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from pycompress.ir.graph import attr_int, constant_array


def matmul_weight_input(node: ir.Node) -> int | None:
    """Input index of a MatMul's constant 2-D float weight: 1 (``X @ W``), 0 (``W' @ X``), None (none)."""
    for index in (1, 0):
        w = constant_array(node.inputs[index]) if len(node.inputs) > index else None
        if w is not None and w.ndim == 2 and w.dtype.kind == "f":
            return index
    return None


def weight_input(node: ir.Node) -> int | None:
    """Input index of the layer's weight: 1 for Gemm and Conv, the constant side of a MatMul."""
    if node.op_type == "MatMul":
        return matmul_weight_input(node)
    return 1 if node.op_type in ("Gemm", "Conv") else None


def as_matrix(node: ir.Node, weight: np.ndarray, index: int = 1) -> np.ndarray:
    """``weight`` (input ``index`` of ``node``, in the node's layout) as ``W``, ``in x out`` (a view)."""
    if node.op_type == "Gemm":
        return weight.T if attr_int(node, "transB", 0) else weight
    if node.op_type == "MatMul":
        return weight.T if index == 0 else weight
    return weight.reshape(weight.shape[0], -1).T  # Conv: (Co, Ci, k...) -> (Ci*k..., Co)


def from_matrix(node: ir.Node, matrix: np.ndarray, shape: tuple[int, ...], index: int = 1) -> np.ndarray:
    """The inverse of ``as_matrix``: ``W`` (``in x out``) in the node's layout of input ``index`` (``shape``)."""
    if node.op_type in ("Gemm", "MatMul"):
        return as_matrix(node, matrix, index)  # a transpose (or nothing) is its own inverse
    return matrix.T.reshape(shape)


def output_channel_axis(node: ir.Node, index: int, ndim: int) -> int | None:
    """Axis of the weight (input ``index``, ``ndim``-D) along which the layer's output channels run
    (None for a 1-D MatMul operand)."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        return 0 if attr_int(node, "transB", 0) else 1
    if ndim < 2:
        return None
    return ndim - 1 if index == 1 else ndim - 2  # MatMul: columns of B, rows of A


def bias_add(node: ir.Node) -> tuple[ir.Node, int] | None:
    """The ``Add`` of a constant right after ``node`` (a MatMul's bias, as exporters write
    ``nn.Linear``) and the input slot of the constant; None when the output goes elsewhere too."""
    uses = list(node.outputs[0].uses())
    if len(uses) == 1 and uses[0].node.op_type == "Add" and not node.outputs[0].is_graph_output():
        add, slot = uses[0].node, 1 - uses[0].idx
        if constant_array(add.inputs[slot]) is not None:
            return add, slot
    return None
