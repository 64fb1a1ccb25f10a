"""See a Gemm / MatMul / Conv node as a linear map y = x W + b on rows.

Rows are samples for FC layers, and (sample, pixel) patches for convolutions
(im2col, features ordered (Ci, kh, kw) like the flattened weight), so one
least-squares refit serves every layer kind. Grouped convolutions are not
linear maps of their whole input: they are not supported here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from pycompress.errors import PycompressError
from pycompress.ir import (as_matrix, attr_float, attr_int, attr_ints, attr_str, constant_array, from_matrix,
                           matmul_weight_input)


def _weight_side(node: ir.Node) -> int:
    """Input index of a MatMul's constant 2-D weight: 1 (``X @ W``), 0 (``W' @ X``), -1 (none)."""
    index = matmul_weight_input(node)
    return -1 if index is None else index


def bias_add_after(node: ir.Node) -> ir.Node | None:
    """The ``Add`` of a constant bias that reads a MatMul's output and nothing else does
    (exporters write ``nn.Linear`` as MatMul + Add), or None."""
    if node.op_type != "MatMul" or _weight_side(node) < 0:
        return None
    out = node.outputs[0]
    uses = list(out.uses())
    if len(uses) != 1 or out.is_graph_output() or uses[0].node.op_type != "Add":
        return None
    add = uses[0].node
    if len(add.inputs) != 2:
        return None
    other = add.inputs[1 - uses[0].idx]
    bias = constant_array(other)
    w = constant_array(node.inputs[_weight_side(node)])
    d_out = w.shape[1] if _weight_side(node) == 1 else w.shape[0]
    if bias is None or bias.dtype.kind != "f" or bias.size != d_out:
        return None
    # It must broadcast along the feature axis only: (d_out,) / (1, .., d_out) on the right,
    # (d_out, 1) for W' @ X (features on axis -2).
    if _weight_side(node) == 1 and bias.shape[-1] != d_out:
        return None
    if _weight_side(node) == 0 and (bias.ndim < 2 or bias.shape[-2:] != (d_out, 1)):
        return None
    return add


@dataclass
class LinearView:
    """One linear layer ``y = x W + b``: a Gemm, a Conv, or a MatMul with a constant
    weight on either side, with the ``Add`` of its bias when one follows (``bias_add``)."""

    node: ir.Node
    bias_add: ir.Node | None = None

    @classmethod
    def of(cls, node: ir.Node) -> "LinearView":
        return cls(node, bias_add_after(node))

    @property
    def op(self) -> str:
        return self.node.op_type

    @property
    def left(self) -> bool:
        """``W' @ X``: the features are on axis -2 of the activations."""
        return self.op == "MatMul" and _weight_side(self.node) == 0

    @property
    def output(self) -> ir.Value:
        """The layer's output: after its bias."""
        return (self.bias_add or self.node).outputs[0]

    @property
    def activation(self) -> ir.Value:
        return self.node.inputs[1] if self.left else self.node.inputs[0]

    @property
    def has_bias(self) -> bool:
        if self.op == "MatMul":
            return self.bias_add is not None
        return len(self.node.inputs) > 2 and self.node.inputs[2] is not None

    @property
    def bias_slot(self) -> bool:
        """Whether a bias can be written (Gemm and Conv take one as an input; a bare MatMul cannot)."""
        return self.op != "MatMul" or self.bias_add is not None

    def _weight_index(self) -> int:
        return 0 if self.left else 1

    def weight_matrix(self) -> np.ndarray:
        """W as (d_in, d_out): the effective weight (Gemm's alpha applied, as ``set`` expects it back)."""
        index = self._weight_index()
        w = as_matrix(self.node, constant_array(self.node.inputs[index]), index)
        if self.op == "Gemm":
            alpha = attr_float(self.node, "alpha", 1.0)
            if alpha != 1.0:
                w = w * w.dtype.type(alpha)
        return w

    def _bias_index(self) -> int:
        add = self.bias_add
        return next(i for i, v in enumerate(add.inputs) if v is not self.node.outputs[0])

    def bias(self) -> np.ndarray:
        d_out = self.weight_matrix().shape[1]
        if self.op == "MatMul":
            if self.bias_add is None:
                return np.zeros(d_out)
            return constant_array(self.bias_add.inputs[self._bias_index()]).reshape(-1).astype(np.float64)
        if len(self.node.inputs) > 2 and self.node.inputs[2] is not None:
            b = constant_array(self.node.inputs[2])
            if b is not None:
                scale = attr_float(self.node, "beta", 1.0) if self.op == "Gemm" else 1.0
                return np.broadcast_to(b * scale, (d_out,)).astype(np.float64)
        return np.zeros(d_out)

    def set(self, w: np.ndarray, b: np.ndarray | None) -> None:
        """Write W (d_in, d_out) and b back, keeping the node's layout and dtype."""
        index = self._weight_index()
        old = constant_array(self.node.inputs[index])
        if self.op == "Gemm":
            alpha = attr_float(self.node, "alpha", 1.0)
            w = w / alpha
        new = from_matrix(self.node, w, old.shape, index)
        _replace_constant(self.node, index, new.astype(old.dtype))
        if b is None:
            return
        if self.op == "MatMul":
            if self.bias_add is not None:
                slot = self._bias_index()
                old_b = constant_array(self.bias_add.inputs[slot])
                _replace_constant(self.bias_add, slot, b.reshape(old_b.shape).astype(old_b.dtype))
            elif np.any(b != 0):
                raise PycompressError(f"node '{self.node.name}': a MatMul with no bias Add after it cannot take "
                                      "a bias (refit it through the origin)")
            return
        if self.op == "Gemm":
            b = b / attr_float(self.node, "beta", 1.0)
        if len(self.node.inputs) > 2 and self.node.inputs[2] is not None:
            _replace_constant(self.node, 2, b.astype(old.dtype))
        else:
            name = f"{self.node.name}/refit_bias"
            value = ir.Value(name=name, const_value=ir.tensor(b.astype(old.dtype), name=name))
            self.node.graph.register_initializer(value)
            self.node.resize_inputs(3)
            self.node.replace_input_with(2, value)


def _replace_constant(node: ir.Node, index: int, array: np.ndarray) -> None:
    """Give the node a fresh initializer (never mutate a tensor another node may share)."""
    old = node.inputs[index]
    graph = node.graph
    base = f"{old.name}/refit" if old is not None and old.name else f"{node.name}/refit_{index}"
    name, i = base, 0
    while name in graph.initializers:
        i += 1
        name = f"{base}_{i}"
    value = ir.Value(name=name, const_value=ir.tensor(np.ascontiguousarray(array), name=name))
    value.shape = ir.Shape(array.shape)
    value.dtype = ir.DataType.from_numpy(array.dtype)
    graph.register_initializer(value)
    node.replace_input_with(index, value)
    if old is not None and old.is_initializer() and not old.uses():
        del graph.initializers[old.name]


def check_refittable(node: ir.Node) -> str | None:
    """None if the node can be refitted as a linear map, else the reason."""
    if node.op_type not in ("Gemm", "MatMul", "Conv"):
        return f"{node.op_type} is not a linear layer"
    if node.op_type == "MatMul":
        return None if _weight_side(node) >= 0 else "neither operand is a constant 2-D float weight"
    if constant_array(node.inputs[1]) is None:
        return "its weight is not a constant (or is the first operand)"
    if node.op_type == "Gemm" and attr_int(node, "transA", 0):
        return "Gemm with transA=1"
    if node.op_type == "Conv":
        if attr_int(node, "group", 1) != 1:
            return "grouped/depthwise convolution"
        if attr_str(node, "auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            return "auto_pad SAME_* convolution"
        if len(constant_array(node.inputs[1]).shape) != 4:
            return "only 2-D convolutions"
    return None


def output_pixels(node: ir.Node, output_shape: tuple[int, ...], max_pixels: int | None,
                  rng: np.random.Generator) -> np.ndarray | None:
    """At most ``max_pixels`` sorted output pixel indices of a Conv (None: Gemm/MatMul, or all of them)."""
    if node.op_type in ("Gemm", "MatMul"):
        return None
    count = int(np.prod(output_shape[2:]))
    if max_pixels is None or count <= max_pixels:
        return np.arange(count)
    return np.sort(rng.choice(count, max_pixels, replace=False))


def rows(node: ir.Node, x: np.ndarray, *, max_pixels: int | None = None,
         rng: np.random.Generator | None = None, pixels: np.ndarray | None = None
         ) -> tuple[np.ndarray, np.ndarray | None]:
    """The node's input activations as rows of its linear map, and the output
    pixels they stand for (im2col for Conv: the given ``pixels``, or at most
    ``max_pixels`` drawn per sample)."""
    if node.op_type in ("Gemm", "MatMul"):
        return _feature_rows(node, x), None
    w = constant_array(node.inputs[1])
    co, ci, kh, kw = w.shape
    sh, sw = attr_ints(node, "strides", [1, 1])
    dh, dw = attr_ints(node, "dilations", [1, 1])
    pads = attr_ints(node, "pads", [0, 0, 0, 0])
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    n, _, hp, wp = xp.shape
    ho = (hp - (dh * (kh - 1) + 1)) // sh + 1
    wo = (wp - (dw * (kw - 1) + 1)) // sw + 1
    pix = pixels if pixels is not None else output_pixels(node, (n, co, ho, wo), max_pixels,
                                                          rng or np.random.default_rng(0))
    oy, ox = (pix // wo) * sh, (pix % wo) * sw
    ky = np.arange(kh) * dh
    kx = np.arange(kw) * dw
    # patches[n, p, c, i, j] = xp[n, c, oy[p] + ky[i], ox[p] + kx[j]]
    patches = xp[:, :, oy[:, None, None] + ky[None, :, None], ox[:, None, None] + kx[None, None, :]]
    return patches.transpose(0, 2, 1, 3, 4).reshape(n * len(pix), ci * kh * kw), pix


def target_rows(node: ir.Node, y: np.ndarray, pix: np.ndarray | None = None) -> np.ndarray:
    """The node's outputs as rows, matching ``rows`` (same pixels for Conv)."""
    if node.op_type in ("Gemm", "MatMul"):
        return _feature_rows(node, y)
    n, co = y.shape[:2]
    flat = y.reshape(n, co, -1)
    if pix is not None:
        flat = flat[:, :, pix]
    return flat.transpose(0, 2, 1).reshape(-1, co)


def feature_axis(node: ir.Node, ndim: int) -> int:
    """The axis of a linear node's activations (input or output) that holds the features."""
    if node.op_type == "MatMul":
        return ndim - 2 if _weight_side(node) == 0 else ndim - 1
    return 1


def _feature_rows(node: ir.Node, x: np.ndarray) -> np.ndarray:
    """``[..., d]`` (or ``[..., d, n]`` for ``W' @ X``) activations as rows ``(-1, d)``:
    every token of a ``B x T x D`` tensor is a row."""
    axis = feature_axis(node, x.ndim)
    if axis != x.ndim - 1:
        x = np.moveaxis(x, axis, -1)
    return x.reshape(-1, x.shape[-1])
