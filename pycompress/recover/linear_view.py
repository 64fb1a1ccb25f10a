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
from pycompress.ir import attr_float, attr_int, attr_ints, attr_str, constant_array


@dataclass
class LinearView:
    node: ir.Node

    @property
    def op(self) -> str:
        return self.node.op_type

    def _weight_value(self) -> ir.Value:
        return self.node.inputs[1]

    def weight_matrix(self) -> np.ndarray:
        """W as (d_in, d_out)."""
        w = constant_array(self._weight_value())
        if self.op == "Gemm":
            return w.T if attr_int(self.node, "transB", 0) else w
        if self.op == "MatMul":
            return w
        return w.reshape(w.shape[0], -1).T  # Conv: (Co, Ci, kh, kw) -> (Ci*kh*kw, Co)

    def bias(self) -> np.ndarray:
        d_out = self.weight_matrix().shape[1]
        if self.op in ("Gemm", "Conv") and len(self.node.inputs) > 2 and self.node.inputs[2] is not None:
            b = constant_array(self.node.inputs[2])
            if b is not None:
                scale = attr_float(self.node, "beta", 1.0) if self.op == "Gemm" else 1.0
                return np.broadcast_to(b * scale, (d_out,)).astype(np.float64)
        return np.zeros(d_out)

    def set(self, w: np.ndarray, b: np.ndarray | None) -> None:
        """Write W (d_in, d_out) and b back, keeping the node's layout and dtype."""
        old = constant_array(self._weight_value())
        if self.op == "Gemm":
            alpha = attr_float(self.node, "alpha", 1.0)
            w = w / alpha
            new = w.T if attr_int(self.node, "transB", 0) else w
        elif self.op == "MatMul":
            new = w
        else:
            new = w.T.reshape(old.shape)
        _replace_constant(self.node, 1, new.astype(old.dtype))
        if b is None:
            return
        if self.op == "MatMul":
            if np.any(b != 0):
                raise PycompressError(f"node '{self.node.name}': a MatMul has no bias to refit")
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
        return x.reshape(-1, x.shape[-1]), None
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
        return y.reshape(-1, y.shape[-1])
    n, co = y.shape[:2]
    flat = y.reshape(n, co, -1)
    if pix is not None:
        flat = flat[:, :, pix]
    return flat.transpose(0, 2, 1).reshape(-1, co)
