"""An ONNX graph executed by torch, its floating-point initializers trainable.

Gradient fine-tuning (ALGORITHMS.md 4) works on the *compressed ONNX graph
itself*: the rewrites only add nodes and initializers, so training the
initializer values and writing them back keeps the structure exactly (the
factored pairs, the pruned shapes, the shared weight's
``Gather(codebook, Cast(uint8 indices))``; training the codebook is Deep
Compression's centroid fine-tuning). No PyTorch source and no re-export.

``TorchGraph(model, trainable)`` computes in float32 on the CPU:

- floating-point initializers become ``nn.Parameter`` (float32); those in
  ``trainable`` (default: all, except BatchNormalization's running mean and
  variance, which are statistics) require gradients;
- integer initializers (shape tensors, shared-weight indices) are fixed int64
  tensors: ``write_back`` never touches them;
- each node is compiled once into a torch function; an op outside
  ``SUPPORTED_OPS`` (or an unsupported attribute value) raises a one-line
  ``PycompressError`` naming the node when the graph is built.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F
from torch import nn

from pycompress.errors import PycompressError
from pycompress.ir import attr_float, attr_int, attr_ints, attr_str, opset_version
from pycompress.ir import node_display_name as node_label

Fn = Callable[..., torch.Tensor]


def _unsupported(node: ir.Node, what: str = "") -> PycompressError:
    op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
    return PycompressError(f"node '{node_label(node)}': op '{op}'{what} is not supported by fine-tuning")


def _ints(t: torch.Tensor | None) -> list[int] | None:
    return None if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _torch_pad(pads: Sequence[int], nd: int) -> list[int]:
    """ONNX pads [b_1..b_n, e_1..e_n] (first axis first) -> F.pad's (b_n, e_n, b_{n-1}, e_{n-1}, ...)."""
    out: list[int] = []
    for axis in reversed(range(nd)):
        out += [int(pads[axis]), int(pads[axis + nd])]
    return out


def _spatial(node: ir.Node, nd: int) -> tuple[list[int], list[int], list[int]]:
    """(strides, dilations, pads) with ONNX defaults for ``nd`` spatial axes."""
    auto_pad = attr_str(node, "auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", "VALID"):
        raise _unsupported(node, f" with auto_pad={auto_pad}")
    strides = attr_ints(node, "strides", None) or [1] * nd
    dilations = attr_ints(node, "dilations", None) or [1] * nd
    pads = attr_ints(node, "pads", None) or [0] * (2 * nd)
    if auto_pad == "VALID":
        pads = [0] * (2 * nd)
    return strides, dilations, pads


# --- builders: (node, opset) -> torch function of the node's inputs (None for absent optional inputs) ---

def _conv(node, opset):
    group = attr_int(node, "group", 1)
    _spatial(node, 0)           # an unsupported auto_pad fails when the graph is built, not mid-training
    kernel = attr_ints(node, "kernel_shape", None)

    def fn(x, w, b=None):
        nd = w.dim() - 2
        if nd not in (1, 2, 3):
            raise _unsupported(node, f" with {nd} spatial axes")
        if kernel is not None and list(kernel) != list(w.shape[2:]):
            raise _unsupported(node, " with kernel_shape different from the weight's")
        strides, dilations, pads = _spatial(node, nd)
        padding: list[int] | int = pads[:nd]
        if pads[:nd] != pads[nd:]:
            x, padding = F.pad(x, _torch_pad(pads, nd)), 0
        conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
        return conv(x, w, b, strides, padding, dilations, group)
    return fn


def _gemm(node, opset):
    alpha, beta = attr_float(node, "alpha", 1.0), attr_float(node, "beta", 1.0)
    trans_a, trans_b = attr_int(node, "transA", 0), attr_int(node, "transB", 0)

    def fn(a, b, c=None):
        y = (a.t() if trans_a else a) @ (b.t() if trans_b else b)
        if alpha != 1.0:
            y = alpha * y
        if c is not None:
            y = y + (beta * c if beta != 1.0 else c)
        return y
    return fn


def _div(a, b):
    if a.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")    # ONNX integer division truncates


def _clip(node, opset):
    if opset < 11:
        lo, hi = attr_float(node, "min", -math.inf), attr_float(node, "max", math.inf)
        return lambda x: torch.clamp(x, lo, hi)

    def fn(x, lo=None, hi=None):
        if lo is None and hi is None:
            return x
        return torch.clamp(x, None if lo is None else float(lo), None if hi is None else float(hi))
    return fn


def _hard_sigmoid(node, opset):
    alpha, beta = attr_float(node, "alpha", 0.2), attr_float(node, "beta", 0.5)
    return lambda x: torch.clamp(alpha * x + beta, 0.0, 1.0)


def _softmax(node, opset):
    axis = attr_int(node, "axis", 1 if opset < 13 else -1)

    def fn(x):
        a = axis % x.dim()
        if opset >= 13:
            return torch.softmax(x, dim=a)
        # opset < 13: the input is coerced to 2-D [prod(shape[:a]), prod(shape[a:])]
        flat = x.reshape(math.prod(x.shape[:a]), -1)
        return torch.softmax(flat, dim=1).reshape(x.shape)
    return fn


def _batch_norm(node, opset):
    if attr_int(node, "training_mode", 0) or len(node.outputs) > 1:
        raise _unsupported(node, " in training mode")
    eps = attr_float(node, "epsilon", 1e-5)
    return lambda x, scale, bias, mean, var: F.batch_norm(x, mean, var, scale, bias, False, 0.0, eps)


def _global_average_pool(node, opset):
    return lambda x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


def _pool(node, opset):
    kernel = attr_ints(node, "kernel_shape", None)
    if kernel is None:
        raise _unsupported(node, " without kernel_shape")
    nd = len(kernel)
    if nd not in (1, 2, 3):
        raise _unsupported(node, f" with {nd} spatial axes")
    strides, dilations, pads = _spatial(node, nd)
    ceil_mode = bool(attr_int(node, "ceil_mode", 0))
    is_max = node.op_type == "MaxPool"
    if not is_max and dilations != [1] * nd:
        raise _unsupported(node, " with dilations")
    include_pad = bool(attr_int(node, "count_include_pad", 0))
    symmetric = pads[:nd] == pads[nd:] and all(2 * p <= k for p, k in zip(pads[:nd], kernel))
    if not symmetric and not is_max and not include_pad and any(pads):
        raise _unsupported(node, " with asymmetric pads and count_include_pad=0")

    def fn(x):
        padding: list[int] | int = pads[:nd]
        if not symmetric:
            # explicit padding: -inf never wins a max; zeros are counted by count_include_pad=1
            x = F.pad(x, _torch_pad(pads, nd), value=-math.inf if is_max else 0.0)
            padding = 0
        if is_max:
            pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[nd - 1]
            return pool(x, kernel, strides, padding, dilations, ceil_mode)
        pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[nd - 1]
        return pool(x, kernel, strides, padding, ceil_mode, include_pad)
    return fn


def _flatten(node, opset):
    axis = attr_int(node, "axis", 1)

    def fn(x):
        a = axis % x.dim() if axis < 0 else axis
        return x.reshape(math.prod(x.shape[:a]), -1)
    return fn


def _reshape(node, opset):
    allowzero = attr_int(node, "allowzero", 0)

    def fn(x, shape):
        dims = _ints(shape)
        if not allowzero:
            dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
        return x.reshape(dims)
    return fn


def _transpose(node, opset):
    perm = attr_ints(node, "perm", None)
    return lambda x: x.permute(perm if perm is not None else list(reversed(range(x.dim()))))


def _concat(node, opset):
    axis = attr_int(node, "axis", 0)
    return lambda *xs: torch.cat([x for x in xs if x is not None], dim=axis)


def _wrapped(indices: torch.Tensor, size: int) -> torch.Tensor:
    """ONNX indices (negative ones count from the end) as torch's non-negative int64."""
    idx = indices.long()
    return torch.where(idx < 0, idx + size, idx)


def _gather(node, opset):
    axis = attr_int(node, "axis", 0)

    def fn(data, indices):
        a = axis % data.dim()
        idx = _wrapped(indices, data.shape[a])
        out = torch.index_select(data, a, idx.reshape(-1))    # differentiable in data: codebooks train
        return out.reshape(tuple(data.shape[:a]) + tuple(idx.shape) + tuple(data.shape[a + 1:]))
    return fn


def _axes_from(node, opset, since: int):
    """Axes of Squeeze / Unsqueeze / Reduce*: an attribute before opset ``since``, an input from then on."""
    attr = attr_ints(node, "axes", None) if opset < since else None
    return lambda given: attr if opset < since else _ints(given)


def _squeeze(node, opset):
    axes_of = _axes_from(node, opset, 13)

    def fn(x, axes=None):
        axes = axes_of(axes)
        drop = {a % x.dim() for a in axes} if axes else {i for i, s in enumerate(x.shape) if s == 1}
        return x.reshape([s for i, s in enumerate(x.shape) if i not in drop])
    return fn


def _unsqueeze(node, opset):
    axes_of = _axes_from(node, opset, 13)

    def fn(x, axes=None):
        axes = axes_of(axes)
        rank = x.dim() + len(axes)
        shape = list(x.shape)
        for a in sorted(a % rank for a in axes):
            shape.insert(a, 1)
        return x.reshape(shape)
    return fn


def _pad(node, opset):
    mode = attr_str(node, "mode", "constant")
    if mode != "constant":
        raise _unsupported(node, f" with mode={mode}")

    def fn(x, pads=None, value=None, axes=None):
        if opset < 11:
            pads_list, fill = attr_ints(node, "pads", None) or [], attr_float(node, "value", 0.0)
        else:
            pads_list, fill = _ints(pads), 0.0 if value is None else float(value.reshape(-1)[0])
        nd = x.dim()
        if axes is not None:     # opset 18: pads only for the listed axes
            chosen = [a % nd for a in _ints(axes)]
            full = [0] * (2 * nd)
            for i, a in enumerate(chosen):
                full[a], full[a + nd] = pads_list[i], pads_list[i + len(chosen)]
            pads_list = full
        return F.pad(x, _torch_pad(pads_list, nd), value=fill)
    return fn


def _l2(x, dim, keepdim):
    return torch.sqrt(torch.sum(x * x, dim=dim, keepdim=keepdim))


_REDUCTIONS = {"ReduceMean": torch.mean, "ReduceSum": torch.sum, "ReduceL2": _l2}


def _reduce(node, opset):
    keepdims = bool(attr_int(node, "keepdims", 1))
    noop_empty = bool(attr_int(node, "noop_with_empty_axes", 0))
    since = 13 if node.op_type == "ReduceSum" else 18      # ReduceSum took axes as an input from 13, the rest 18
    axes_of = _axes_from(node, opset, since)
    reduce = _REDUCTIONS[node.op_type]

    def fn(x, axes=None):
        axes = axes_of(axes)
        if not axes:
            if noop_empty:
                return x
            axes = list(range(x.dim()))
        return reduce(x, dim=tuple(a % x.dim() for a in axes), keepdim=keepdims)
    return fn


_INTEGER_TYPES = {ir.DataType.INT8, ir.DataType.INT16, ir.DataType.INT32, ir.DataType.INT64,
                  ir.DataType.UINT8, ir.DataType.UINT16, ir.DataType.UINT32, ir.DataType.UINT64}


def _cast(node, opset):
    to = ir.DataType(attr_int(node, "to", 0))
    if to == ir.DataType.FLOAT:
        return lambda x: x.float()
    if to in _INTEGER_TYPES:
        # integers are held as int64 (indices and shapes); float -> int truncates like ONNX
        return lambda x: x.long() if not x.is_floating_point() else torch.trunc(x).long()
    if to == ir.DataType.BOOL:
        return lambda x: x.bool()
    # computing in float32 would not reproduce onnxruntime's rounding to this type
    raise _unsupported(node, f" to {to.name}")


def _shape(node, opset):
    start = attr_int(node, "start", 0)
    end = node.attributes.get("end")

    def fn(x):
        dims = list(x.shape)
        stop = len(dims) if end is None else int(end.value)
        return torch.tensor(dims[start:stop], dtype=torch.int64)
    return fn


def _constant(node, opset):
    if "value" in node.attributes:
        array = node.attributes["value"].as_tensor().numpy()
    elif "value_float" in node.attributes or "value_floats" in node.attributes:
        key = "value_float" if "value_float" in node.attributes else "value_floats"
        array = np.asarray(node.attributes[key].value, dtype=np.float32)
    elif "value_int" in node.attributes or "value_ints" in node.attributes:
        key = "value_int" if "value_int" in node.attributes else "value_ints"
        array = np.asarray(node.attributes[key].value, dtype=np.int64)
    else:
        raise _unsupported(node, " with a sparse or string value")
    tensor = _fixed_tensor(array)
    return lambda: tensor


def _layer_norm(node, opset):
    axis, epsilon = attr_int(node, "axis", -1), attr_float(node, "epsilon", 1e-5)
    if attr_int(node, "stash_type", 1) != 1:
        raise _unsupported(node, " with stash_type other than float")

    def fn(x, scale, bias=None):
        a = axis % x.dim()
        return F.layer_norm(x, tuple(x.shape[a:]), scale, bias, epsilon)
    return fn


def _where(condition, x, y):
    return torch.where(condition.bool(), x, y)


def _expand(x, shape):
    return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(_ints(shape))))


def _constant_of_shape(node, opset):
    value = node.attributes.get("value")
    fill = _fixed_tensor(value.as_tensor().numpy()).reshape(-1) if value is not None else torch.zeros(1)
    return lambda shape: fill.expand(_ints(shape)).clone()


def _range(start, limit, delta):
    return torch.arange(start.item(), limit.item(), delta.item(),
                        dtype=start.dtype if not start.is_floating_point() else torch.float32)


def _slice(node, opset):
    if opset < 10:
        attr = (attr_ints(node, "starts", None), attr_ints(node, "ends", None), attr_ints(node, "axes", None), None)

    def fn(x, starts=None, ends=None, axes=None, steps=None):
        if opset < 10:
            starts_l, ends_l, axes_l, steps_l = attr
        else:
            starts_l, ends_l, axes_l, steps_l = _ints(starts), _ints(ends), _ints(axes), _ints(steps)
        axes_l = list(range(len(starts_l))) if axes_l is None else [a % x.dim() for a in axes_l]
        steps_l = [1] * len(starts_l) if steps_l is None else steps_l
        index: list[slice] = [slice(None)] * x.dim()
        flips = []
        for a, b, e, step in zip(axes_l, starts_l, ends_l, steps_l):
            n = x.shape[a]
            if step > 0:
                b, e = (max(0, min(n, v + n if v < 0 else v)) for v in (b, e))
                index[a] = slice(b, e, step)
            else:     # torch has no negative steps: slice the mirrored range, then flip
                b = max(-1, min(n - 1, b + n if b < 0 else b))
                e = max(-1, min(n - 1, e + n if e < 0 else e))
                index[a] = slice(e + 1, b + 1)
                flips.append((a, -step))
        y = x[tuple(index)]
        for a, step in flips:
            y = torch.flip(y, (a,))
            if step != 1:
                y = y.index_select(a, torch.arange(0, y.shape[a], step))
        return y
    return fn


def _gather_elements(node, opset):
    axis = attr_int(node, "axis", 0)

    def fn(data, indices):
        a = axis % data.dim()
        return torch.gather(data, a, _wrapped(indices, data.shape[a]))
    return fn


def _identity(node, opset):
    return lambda x, *rest: x        # Dropout at inference


def _simple(function: Fn):
    return lambda node, opset: function


BUILDERS: dict[str, Callable[[ir.Node, int], Fn]] = {
    "Conv": _conv, "Gemm": _gemm, "MatMul": _simple(torch.matmul),
    "Add": _simple(torch.add), "Sub": _simple(torch.sub), "Mul": _simple(torch.mul), "Div": _simple(_div),
    "Relu": _simple(torch.relu), "Sigmoid": _simple(torch.sigmoid), "Tanh": _simple(torch.tanh),
    "HardSigmoid": _hard_sigmoid, "HardSwish": _simple(F.hardswish), "Clip": _clip, "Softmax": _softmax,
    "BatchNormalization": _batch_norm, "GlobalAveragePool": _global_average_pool,
    "AveragePool": _pool, "MaxPool": _pool, "Flatten": _flatten, "Reshape": _reshape,
    "Transpose": _transpose, "Concat": _concat, "Gather": _gather, "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze, "Pad": _pad, "ReduceMean": _reduce, "ReduceSum": _reduce,
    "Identity": _identity, "Dropout": _identity, "Cast": _cast, "Shape": _shape, "Constant": _constant,
    # transformer encoders as torch.onnx.export writes them (docs/transformers.md)
    "LayerNormalization": _layer_norm, "Erf": _simple(torch.erf), "ReduceL2": _reduce,
    "Equal": _simple(torch.eq), "GreaterOrEqual": _simple(torch.ge), "And": _simple(torch.logical_and),
    "Where": _simple(_where), "Expand": _simple(_expand), "ConstantOfShape": _constant_of_shape,
    "Range": _simple(_range), "Slice": _slice, "GatherElements": _gather_elements,
    "Sqrt": _simple(torch.sqrt), "Pow": _simple(torch.pow), "Neg": _simple(torch.neg), "Not": _simple(torch.logical_not),
}
SUPPORTED_OPS = tuple(sorted(BUILDERS))


def _fixed_tensor(array: np.ndarray) -> torch.Tensor:
    """A constant as torch holds it: float -> float32, integers -> int64, bool stays."""
    array = np.asarray(array)
    if array.dtype == np.bool_:
        return torch.from_numpy(array.copy())
    if np.issubdtype(array.dtype, np.floating):
        return torch.from_numpy(np.array(array, dtype=np.float32))
    return torch.from_numpy(np.array(array, dtype=np.int64))


def batch_norm_statistics(model: ir.Model) -> set[str]:
    """Initializers used as BatchNormalization running mean / variance (statistics, never trained)."""
    names = set()
    for node in model.graph.all_nodes():
        if node.op_type == "BatchNormalization":
            names.update(v.name for v in node.inputs[3:5] if v is not None)
    return names


class TorchGraph(nn.Module):
    """``model`` (an onnx_ir graph) as a torch module: ``forward({input name: tensor}) -> [outputs]``.

    ``trainable``: names of floating-point initializers that get gradients;
    ``None``: all of them except BatchNormalization statistics.
    ``extra_outputs``: intermediate values returned after the graph's outputs
    (e.g. hidden states to distil).
    """

    def __init__(self, model: ir.Model, trainable: Iterable[str] | None = None, extra_outputs: Sequence[str] = ()):
        super().__init__()
        graph = model.graph
        if any(n.op_type in ("If", "Loop", "Scan") for n in graph):
            node = next(n for n in graph if n.op_type in ("If", "Loop", "Scan"))
            raise _unsupported(node)
        opset = opset_version(model)
        initializers = graph.initializers
        floats = [name for name, v in initializers.items()
                  if v.const_value is not None and v.const_value.dtype.is_floating_point()]
        if trainable is None:
            stats = batch_norm_statistics(model)
            trainable = {name for name in floats if name not in stats}
        trainable = set(trainable)
        unknown = sorted(trainable - set(floats))
        if unknown:
            raise PycompressError(f"trainable initializer '{unknown[0]}' is not a floating-point initializer "
                                  "of the model")
        self.parameter_names: list[str] = floats
        self.trainable_names: list[str] = [n for n in floats if n in trainable]
        self.params = nn.ParameterList(
            [nn.Parameter(_fixed_tensor(initializers[n].const_value.numpy()), requires_grad=n in trainable)
             for n in floats])
        float_set = set(floats)
        self._fixed: dict[str, torch.Tensor] = {
            name: _fixed_tensor(v.const_value.numpy()) for name, v in initializers.items()
            if v.const_value is not None and name not in float_set}
        self.input_names = [v.name for v in graph.inputs if v.name not in initializers]
        self.model = model
        self.output_names = [v.name for v in graph.outputs]
        produced = {v.name for node in graph for v in node.outputs}
        for name in extra_outputs:
            if name not in produced:
                raise PycompressError(f"tensor '{name}' is not produced by any node of the model")
            if name not in self.output_names:
                self.output_names.append(name)

        self._steps: list[tuple[str, Fn, list[str | None], list[str]]] = []
        for node in graph:
            if node.domain not in ("", "ai.onnx") or node.op_type not in BUILDERS:
                raise _unsupported(node)
            extra = [v for v in node.outputs[1:] if v is not None and (v.uses() or v.is_graph_output())]
            if extra:
                raise _unsupported(node, f" with its output '{extra[0].name}' used")
            fn = BUILDERS[node.op_type](node, opset)
            inputs = [None if v is None or not v.name else v.name for v in node.inputs]
            self._steps.append((node_label(node), fn, inputs, [v.name for v in node.outputs][:1]))
        # drop intermediates after their last use (memory of large batches without autograd)
        last_use: dict[str, int] = {}
        for i, (_, _, inputs, _) in enumerate(self._steps):
            for name in inputs:
                if name is not None:
                    last_use[name] = i
        keep = set(self.output_names)
        self._free_after = [[n for n in dict.fromkeys(i for i in inputs if i is not None)
                             if last_use.get(n) == k and n not in keep]
                            for k, (_, _, inputs, _) in enumerate(self._steps)]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.params if p.requires_grad]

    def forward(self, feeds: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        env: dict[str, torch.Tensor] = dict(self._fixed)
        env.update(zip(self.parameter_names, self.params))
        for name in self.input_names:
            if name not in feeds:
                raise PycompressError(f"input '{name}' of the model is missing from the feeds")
            env[name] = feeds[name]
        for (label, fn, inputs, outputs), free in zip(self._steps, self._free_after):
            args = [None if n is None else env[n] for n in inputs]
            while args and args[-1] is None:
                args.pop()
            env[outputs[0]] = fn(*args)
            for name in free:
                env.pop(name, None)
        return [env[name] for name in self.output_names]

    @torch.no_grad()
    def run(self, inputs: Mapping[str, np.ndarray], *, batch_size: int = 256) -> list[np.ndarray]:
        """All outputs as numpy, batched (no gradients)."""
        n = len(next(iter(inputs.values())))
        parts: list[list[np.ndarray]] = []
        for start in range(0, n, batch_size):
            feeds = {k: torch.from_numpy(np.asarray(inputs[k][start:start + batch_size]))
                     for k in self.input_names}
            parts.append([y.numpy() for y in self(feeds)])
        return [np.concatenate([p[i] for p in parts]) for i in range(len(self.output_names))]

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Current float32 values of the trainable initializers."""
        return {n: p.detach().numpy().copy() for n, p in zip(self.parameter_names, self.params) if p.requires_grad}

    @torch.no_grad()
    def load_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        for name, param in zip(self.parameter_names, self.params):
            if name in arrays:
                param.copy_(torch.from_numpy(arrays[name]))

    def write_back(self, model: ir.Model) -> list[str]:
        """Put the trained values into ``model``'s initializers (same names, dtypes, shapes); returns the names.

        Only trainable (floating-point) initializers are written: integer ones,
        e.g. shared-weight indices, are left exactly as they are.
        """
        written = []
        for name, param in zip(self.parameter_names, self.params):
            if not param.requires_grad:
                continue
            value = model.graph.initializers.get(name)
            if value is None or value.const_value is None:
                raise PycompressError(f"initializer '{name}' is missing from the model to write back to")
            old = value.const_value
            array = param.detach().numpy()
            if tuple(old.shape) != array.shape:
                raise PycompressError(f"initializer '{name}': shape {tuple(old.shape)} in the model, "
                                      f"{array.shape} trained; not the same graph")
            value.const_value = ir.Tensor(array.astype(old.dtype.numpy()), name=name)
            written.append(name)
        return written

    def to_model(self) -> ir.Model:
        """A copy of the model this graph was built from, holding the trained values."""
        copy = self.model.clone()
        self.write_back(copy)
        return copy
