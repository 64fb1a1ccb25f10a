"""The op rules of the channel walk: ONE table, ``RULES``, from op type to a small function.

A rule gets the walk, the node and its tracked inputs (input index -> ``Layout``), records what
the op does to the channels (output layouts via ``walk.pass_on``, coupled elements via
``walk.unite``, members via ``walk.slices`` / ``walk.counts``, new channels via
``walk.add_producer``) and returns the inputs it handled; ``walk.reject`` blocks them with a
reason. An op with no rule blocks every channel it reads. Adding an op is one function here and
one line in ``RULES`` (like Torch-Pruning's per-op prune_out/prune_in pair, but as a layout map).

A rule raises ``MalformedNode`` for a node that breaks the ONNX spec; any other exception is a
bug and propagates.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from pycompress.ir.channels.model import Layout
from pycompress.ir.channels.nodes import (
    MalformedNode,
    int_attr,
    ints_attr,
    required_input,
)
from pycompress.ir.channels.shapes import const_ints, dims_of, resolve_reshape
from pycompress.ir.channels.walk import RuleFn, Walk
from pycompress.ir.graph import constant_array
from pycompress.ir.graph import node_label as label


def _only_input(node: ir.Node, tracked: dict[int, Layout]) -> Layout:
    """The layout of input 0 of a one-input op (MalformedNode when channels arrive elsewhere)."""
    if set(tracked) != {0}:
        raise MalformedNode(f"has {len(node.inputs)} inputs")
    return tracked[0]


# --------------------------------------------------------------------------- producers / consumers

def on_conv(walk: Walk, node: ir.Node, tracked: dict[int, Layout]) -> set[int]:
    weight = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    bias_value = node.inputs[2] if len(node.inputs) > 2 else None
    bias = constant_array(bias_value)
    groups = int_attr(node, "group", 1)
    handled: set[int] = set()
    x = tracked.get(0)
    if weight is None or weight.ndim < 3 or (bias_value is not None and bias is None):
        return set() if x is None else walk.reject(node, {0: x}, "has weights that are not constant")
    depthwise = groups > 1 and weight.shape[1] == 1 and weight.shape[0] == groups
    if groups > 1 and not depthwise:
        return set() if x is None else walk.reject(node, {0: x}, f"is a grouped conv (group={groups})")
    if depthwise:
        if x is None:
            return handled
        if x.axis != 1 or len(x.elems) != groups:
            return walk.reject(node, {0: x}, "reads channels on an axis other than 1")
        # Depthwise: channel c in -> channel c out; its filters and bias go with it.
        walk.slices.append(("depthwise weight", node, 1, 0, x.elems))
        if bias_value is not None:
            walk.slices.append(("depthwise bias", node, 2, 0, x.elems))
        walk.counts.append(("group attribute", node, -1, -1, x.elems))
        walk.set_layout(node.outputs[0], Layout(1, x.rank, x.elems))
        return {0}
    if x is not None:
        if x.axis != 1 or len(x.elems) != weight.shape[1]:
            walk.reject(node, {0: x}, "reads channels on an axis other than 1")
        else:
            walk.slices.append(("consumer weight", node, 1, 1, x.elems))
        handled.add(0)
    rank = walk.rank(node.outputs[0]) or walk.rank(node.inputs[0])
    walk.add_producer(node, weight.shape[0], axis=1, rank=rank, weight=(1, 0),
                      bias=None if bias_value is None else (2, 0))
    return handled

def on_gemm(walk: Walk, node: ir.Node, tracked: dict[int, Layout]) -> set[int]:
    b = constant_array(required_input(node, 1))
    trans_a, trans_b = int_attr(node, "transA", 0), int_attr(node, "transB", 0)
    handled: set[int] = set()
    a = tracked.get(0)
    if b is None or b.ndim != 2:
        return set() if a is None else walk.reject(node, {0: a}, "has a weight that is not constant")
    if a is not None:
        in_axis = 1 if trans_b else 0
        if trans_a or a.axis != 1 or a.rank != 2 or len(a.elems) != b.shape[in_axis]:
            walk.reject(node, {0: a}, "reads channels on an axis it does not contract as features")
        else:
            walk.slices.append(("consumer weight", node, 1, in_axis, a.elems))
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
    walk.add_producer(node, width, axis=1, rank=2, weight=(1, 0 if trans_b else 1), bias=bias)
    return handled

def on_matmul(walk: Walk, node: ir.Node, tracked: dict[int, Layout]) -> set[int]:
    b = constant_array(required_input(node, 1))
    a = tracked.get(0)
    handled: set[int] = set()
    if b is None or b.ndim != 2:
        return set() if a is None else walk.reject(node, {0: a}, "has no constant 2-D weight")
    if a is not None:
        if a.rank is None or a.axis != a.rank - 1 or len(a.elems) != b.shape[0]:
            walk.reject(node, {0: a}, "reads channels on an axis it does not contract")
        else:
            walk.slices.append(("consumer weight", node, 1, 0, a.elems))
        handled.add(0)
    rank = walk.rank(node.inputs[0])
    if rank == 0:
        raise MalformedNode("multiplies a 0-d tensor")
    if rank is not None:
        walk.add_producer(node, b.shape[1], axis=max(rank - 1, 0), rank=rank, weight=(1, 1), bias=None)
    return handled

# --------------------------------------------------------------------------- pass-through

def on_unary(walk: Walk, node: ir.Node, tracked: dict[int, Layout]) -> set[int]:
    if 0 not in tracked:
        return set()
    if walk.extra_outputs_used(node):
        return walk.reject(node, tracked, "has a second output in use")
    walk.pass_on(node, tracked[0])
    return {0}

def on_elementwise(walk: Walk, node: ir.Node, tracked: dict[int, Layout]) -> set[int]:
    """Broadcasting elementwise op: carriers are coupled position by position."""
    if any(lay.rank is None for lay in tracked.values()):
        return walk.reject(node, tracked, "has an input of unknown rank")
    from_right = {lay.rank - lay.axis for lay in tracked.values()}
    if len(from_right) != 1:
        return walk.reject(node, tracked, "aligns channels of its inputs on different axes")
    ro = from_right.pop()
    width = max(len(lay.elems) for lay in tracked.values())
    full = [lay for lay in tracked.values() if len(lay.elems) == width]
    if any(len(lay.elems) not in (1, width) for lay in tracked.values()):
        return walk.reject(node, tracked, "combines carriers of different widths")
    main = full[0]
    params = []
    for i, value in enumerate(node.inputs):
        if value is None or i in tracked:
            continue
        dims = dims_of(value)
        if dims is None:
            return walk.reject(node, tracked, f"reads input {i} of unknown shape")
        if len(dims) < ro or dims[len(dims) - ro] == 1:
            continue            # broadcast along the channel axis: no channels there
        if constant_array(value) is not None and dims[len(dims) - ro] == width:
            params.append((i, len(dims) - ro))
            continue
        return walk.reject(node, tracked, f"combines the channels with input {i}, whose channels "
                                          "cannot be pruned")
    for lay in full[1:]:
        walk.unite(main.elems, lay.elems, node)
    for i, axis in params:
        walk.slices.append(("per-channel constant", node, i, axis, main.elems))
    ranks = [lay.rank for lay in tracked.values()] + [len(d) for v in node.inputs
                                                       if v is not None and (d := dims_of(v)) is not None]
    out_rank = walk.rank(node.outputs[0]) or max(ranks)
    walk.pass_on(node, main, axis=out_rank - ro, rank=out_rank)
    return set(tracked)

def on_norm(walk: Walk, node: ir.Node, tracked: dict[int, Layout]) -> set[int]:
    """BatchNormalization / InstanceNormalization: per-channel statistics and affine."""
    x = tracked.get(0)
    if x is None or set(tracked) != {0}:
        return walk.reject(node, tracked, "reads channels as a parameter")
    if x.axis != 1:
        return walk.reject(node, tracked, "normalizes axis 1, not the channel axis")
    if walk.extra_outputs_used(node):
        return walk.reject(node, tracked, "has training-mode outputs in use")
    params = range(1, 5) if node.op_type == "BatchNormalization" else range(1, 3)
    for i in params:
        array = constant_array(node.inputs[i]) if i < len(node.inputs) else None
        if array is None or array.shape != (len(x.elems),):
            return walk.reject(node, tracked, f"has a non-constant or non-per-channel input {i}")
    for i in params:
        walk.slices.append(("batchnorm" if node.op_type == "BatchNormalization" else "instancenorm",
                            node, i, 0, x.elems))
    walk.pass_on(node, x)
    return {0}

def on_pool(walk: Walk, node: ir.Node, tracked: dict[int, Layout]) -> set[int]:
    x = tracked.get(0)
    if x is None:
        return set()
    if x.axis != 1:
        return walk.reject(node, tracked, "pools a tensor whose channels are not on axis 1")
    if walk.extra_outputs_used(node):
        return walk.reject(node, tracked, "has its indices output in use")
    walk.pass_on(node, x)
    return {0}

def on_layernorm(walk: Walk, node: ir.Node, tracked: dict[int, Layout]) -> set[int]:
    x = tracked.get(0)
    if x is None or set(tracked) != {0} or x.rank is None:
        return walk.reject(node, tracked, "normalizes a tensor of unknown rank")
    axis = int_attr(node, "axis", -1) % x.rank
    if x.axis >= axis:
        return walk.reject(node, tracked, "normalizes over the channel axis")
    if walk.extra_outputs_used(node):
        return walk.reject(node, tracked, "has mean/variance outputs in use")
    walk.pass_on(node, x)
    return {0}

def on_lpnorm(walk: Walk, node: ir.Node, tracked: dict[int, Layout]) -> set[int]:
    x = _only_input(node, tracked)
    if x.rank is None or int_attr(node, "axis", -1) % x.rank == x.axis:
        return walk.reject(node, tracked, "normalizes over the channel axis")
    walk.pass_on(node, x)
    return {0}

def on_softmax(walk: Walk, node: ir.Node, tracked: dict[int, Layout]) -> set[int]:
    x = _only_input(node, tracked)
    if x.rank is None:
        return walk.reject(node, tracked, "normalizes a tensor of unknown rank")
    if walk.opset < 13:
        # Before opset 13 Softmax flattens axes [axis:] into one: any channel axis there is mixed.
        axis = int_attr(node, "axis", 1) % x.rank
        if x.axis >= axis:
            return walk.reject(node, tracked, "normalizes over the channel axis")
    elif int_attr(node, "axis", -1) % x.rank == x.axis:
        return walk.reject(node, tracked, "normalizes over the channel axis")
    walk.pass_on(node, x)
    return {0}

def on_concat(walk: Walk, node: ir.Node, tracked: dict[int, Layout]) -> set[int]:
    ranks = {lay.rank for lay in tracked.values()}
    if None in ranks or len(ranks) != 1:
        return walk.reject(node, tracked, "concatenates tensors of unknown rank")
    rank = ranks.pop()
    axis = int_attr(node, "axis", 0) % rank
    axes = {lay.axis for lay in tracked.values()}
    if len(axes) != 1:
        return walk.reject(node, tracked, "concatenates tensors with channels on different axes")
    channel_axis = axes.pop()
    if axis == channel_axis:
        parts = []
        for i, value in enumerate(node.inputs):
            if i in tracked:
                parts.append(tracked[i].elems)
                continue
            dims = dims_of(value)
            if dims is not None and axis >= len(dims):
                raise MalformedNode(f"concatenates input {i} of rank {len(dims)} on axis {axis}")
            if dims is None or not isinstance(dims[axis], int):
                return walk.reject(node, tracked, f"concatenates input {i} of unknown width")
            parts.append(np.full(dims[axis], -1, dtype=np.int64))    # channels nobody prunes
        walk.pass_on(node, tracked[min(tracked)], elems=np.concatenate(parts))
        return set(tracked)
    # Concatenating along another axis aligns the channels of all inputs.
    if len(tracked) != len([v for v in node.inputs if v is not None]):
        return walk.reject(node, tracked, "concatenates the channels with channels that cannot be pruned")
    widths = {len(lay.elems) for lay in tracked.values()}
    if len(widths) != 1:
        return walk.reject(node, tracked, "concatenates carriers of different widths")
    layouts = list(tracked.values())
    for lay in layouts[1:]:
        walk.unite(layouts[0].elems, lay.elems, node)
    walk.pass_on(node, layouts[0])
    return set(tracked)

def on_split(walk: Walk, node: ir.Node, tracked: dict[int, Layout]) -> set[int]:
    x = tracked.get(0)
    if x is None or set(tracked) != {0} or x.rank is None:
        return walk.reject(node, tracked, "splits a tensor of unknown rank")
    if int_attr(node, "axis", 0) % x.rank == x.axis:
        return walk.reject(node, tracked, "splits the channel axis")
    walk.pass_on(node, x, outputs=len(node.outputs))
    return {0}

def on_slice(walk: Walk, node: ir.Node, tracked: dict[int, Layout]) -> set[int]:
    x = tracked.get(0)
    if x is None or set(tracked) != {0} or x.rank is None:
        return walk.reject(node, tracked, "slices a tensor of unknown rank")
    if walk.opset < 10:
        starts, ends = ints_attr(node, "starts", None), ints_attr(node, "ends", None)
        axes, steps = ints_attr(node, "axes", None), None
    else:
        get = lambda i: const_ints(node.inputs[i]) if len(node.inputs) > i and node.inputs[i] is not None else None
        starts, ends, axes, steps = get(1), get(2), get(3), get(4)
        if len(node.inputs) > 3 and node.inputs[3] is not None and axes is None:
            return walk.reject(node, tracked, "slices computed axes")
    if starts is None or ends is None:
        return walk.reject(node, tracked, "slices with computed bounds")
    axes = list(range(len(starts))) if axes is None else [a % x.rank for a in axes]
    steps = steps or [1] * len(starts)
    if x.axis in axes:
        j = axes.index(x.axis)
        if j >= min(len(starts), len(ends), len(steps)):
            raise MalformedNode("has starts/ends/axes/steps of different lengths")
        width = len(x.elems)
        start = starts[j] + width if starts[j] < 0 else starts[j]
        if not (start == 0 and steps[j] == 1 and ends[j] >= width):
            return walk.reject(node, tracked, "slices the channel axis")
    walk.pass_on(node, x)
    return {0}

def on_gather(walk: Walk, node: ir.Node, tracked: dict[int, Layout]) -> set[int]:
    x = tracked.get(0)
    if x is None or set(tracked) != {0} or x.rank is None:
        return walk.reject(node, tracked, "gathers with channels as indices")
    axis = int_attr(node, "axis", 0) % x.rank
    if axis == x.axis:
        return walk.reject(node, tracked, "gathers on the channel axis")
    q = walk.rank(required_input(node, 1))
    if q is None:
        return walk.reject(node, tracked, "gathers with indices of unknown rank")
    new_axis = x.axis if axis > x.axis else x.axis - 1 + q
    walk.pass_on(node, x, axis=new_axis, rank=x.rank - 1 + q)
    return {0}

def on_transpose(walk: Walk, node: ir.Node, tracked: dict[int, Layout]) -> set[int]:
    x = _only_input(node, tracked)
    if x.rank is None:
        return walk.reject(node, tracked, "transposes a tensor of unknown rank")
    perm = ints_attr(node, "perm", None) or list(range(x.rank))[::-1]
    if x.axis not in perm:
        raise MalformedNode(f"has perm={perm}, which lacks axis {x.axis}")
    if perm.index(x.axis) != x.axis:
        return walk.reject(node, tracked, f"moves the channel axis (perm={perm})")
    walk.pass_on(node, x)
    return {0}

def _axes(walk: Walk, node: ir.Node, since_opset: int) -> tuple[list[int] | None, bool]:
    """(axes, known): from the attribute before ``since_opset``, else from constant input 1."""
    if walk.opset < since_opset:
        return ints_attr(node, "axes", None), True
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return None, True
    axes = const_ints(node.inputs[1])
    return axes, axes is not None

def on_reduce(walk: Walk, node: ir.Node, tracked: dict[int, Layout]) -> set[int]:
    x = tracked.get(0)
    if x is None or set(tracked) != {0} or x.rank is None:
        return walk.reject(node, tracked, "reduces a tensor of unknown rank")
    since = 13 if node.op_type == "ReduceSum" else 18
    axes, known = _axes(walk, node, since)
    if not known:
        return walk.reject(node, tracked, "reduces over computed axes")
    if not axes:
        if int_attr(node, "noop_with_empty_axes", 0):
            walk.pass_on(node, x)
            return {0}
        return walk.reject(node, tracked, "reduces over all axes, the channel axis included")
    axes = sorted(a % x.rank for a in axes)
    if x.axis in axes:
        return walk.reject(node, tracked, "reduces over the channel axis")
    if int_attr(node, "keepdims", 1):
        walk.pass_on(node, x)
    else:
        walk.pass_on(node, x, axis=x.axis - sum(a < x.axis for a in axes), rank=x.rank - len(axes))
    return {0}

def on_squeeze(walk: Walk, node: ir.Node, tracked: dict[int, Layout]) -> set[int]:
    x = tracked.get(0)
    if x is None or set(tracked) != {0} or x.rank is None:
        return walk.reject(node, tracked, "squeezes a tensor of unknown rank")
    axes, known = _axes(walk, node, 13)
    dims = dims_of(node.inputs[0])
    if not known or (axes is None and (dims is None or None in dims or any(isinstance(d, str) for d in dims))):
        return walk.reject(node, tracked, "squeezes axes that are not known")
    axes = [i for i, d in enumerate(dims) if d == 1] if axes is None else [a % x.rank for a in axes]
    if x.axis in axes:
        return walk.reject(node, tracked, "squeezes the channel axis")
    walk.pass_on(node, x, axis=x.axis - sum(a < x.axis for a in axes), rank=x.rank - len(axes))
    return {0}

def on_unsqueeze(walk: Walk, node: ir.Node, tracked: dict[int, Layout]) -> set[int]:
    x = tracked.get(0)
    if x is None or set(tracked) != {0} or x.rank is None:
        return walk.reject(node, tracked, "unsqueezes a tensor of unknown rank")
    axes, known = _axes(walk, node, 13)
    if not known or not axes:
        return walk.reject(node, tracked, "unsqueezes axes that are not known")
    out_rank = x.rank + len(axes)
    inserted = {a % out_rank for a in axes}
    kept = [p for p in range(out_rank) if p not in inserted]
    walk.pass_on(node, x, axis=kept[x.axis], rank=out_rank)
    return {0}

def on_pad(walk: Walk, node: ir.Node, tracked: dict[int, Layout]) -> set[int]:
    x = tracked.get(0)
    if x is None or set(tracked) != {0} or x.rank is None:
        return walk.reject(node, tracked, "pads with channels as a setting")
    if walk.opset < 11:
        pads, axes = ints_attr(node, "pads", None), None
    else:
        pads = const_ints(node.inputs[1]) if len(node.inputs) > 1 else None
        axes = None
        if len(node.inputs) > 3 and node.inputs[3] is not None:
            axes = const_ints(node.inputs[3])
            if axes is None:
                return walk.reject(node, tracked, "pads computed axes")
    if pads is None:
        return walk.reject(node, tracked, "pads by computed amounts")
    axes = list(range(x.rank)) if axes is None else [a % x.rank for a in axes]
    if x.axis in axes:
        j = axes.index(x.axis)
        if len(pads) != 2 * len(axes):
            raise MalformedNode(f"has {len(pads)} pads for {len(axes)} axes")
        if pads[j] != 0 or pads[j + len(axes)] != 0:
            return walk.reject(node, tracked, "pads the channel axis")
    walk.pass_on(node, x)
    return {0}

def on_resize(walk: Walk, node: ir.Node, tracked: dict[int, Layout]) -> set[int]:
    x = tracked.get(0)
    if x is None or set(tracked) != {0} or x.rank is None:
        return walk.reject(node, tracked, "resizes with channels as a setting")
    axes = ints_attr(node, "axes", None)
    axes = list(range(x.rank)) if axes is None else [a % x.rank for a in axes]
    old = node.op_type == "Upsample" or walk.opset < 11      # (X, scales) before opset 11
    scales_index, sizes_index = (1, None) if old else (2, 3)
    scales = constant_array(node.inputs[scales_index]) if len(node.inputs) > scales_index else None
    sizes_value = node.inputs[sizes_index] if sizes_index is not None and len(node.inputs) > sizes_index else None
    if scales is not None and scales.size:
        if x.axis in axes and axes.index(x.axis) >= scales.size:
            raise MalformedNode(f"has {scales.size} scales for {len(axes)} axes")
        if x.axis in axes and float(scales.reshape(-1)[axes.index(x.axis)]) != 1.0:
            return walk.reject(node, tracked, "scales the channel axis")
    elif sizes_value is not None:
        sizes = const_ints(sizes_value)
        if sizes is None:
            return walk.reject(node, tracked, "resizes to computed sizes")
        if x.axis in axes:
            j = axes.index(x.axis)
            if j >= len(sizes):
                raise MalformedNode(f"has {len(sizes)} sizes for {len(axes)} axes")
            if sizes[j] != len(x.elems):
                return walk.reject(node, tracked, "resizes the channel axis")
            walk.counts.append(("shape entry", node, sizes_index, j, x.elems))
    else:
        return walk.reject(node, tracked, "resizes by computed scales")
    walk.pass_on(node, x)
    return {0}

def on_flatten(walk: Walk, node: ir.Node, tracked: dict[int, Layout]) -> set[int]:
    x = _only_input(node, tracked)
    dims = dims_of(node.inputs[0])
    if dims is None:
        return walk.reject(node, tracked, "flattens a tensor of unknown rank")
    axis = int_attr(node, "axis", 1)
    axis = axis + len(dims) if axis < 0 else axis
    if axis > x.axis:
        return walk.reject(node, tracked, "flattens the channel axis into the batch axis")
    outer, inner = dims[axis:x.axis], dims[x.axis + 1:]
    if not all(isinstance(d, int) for d in outer + inner):
        return walk.reject(node, tracked, "flattens dimensions of unknown size")
    # Channel c of the input owns positions [c*P, (c+1)*P) of each outer block (P = H*W).
    elems = np.tile(np.repeat(x.elems, math.prod(inner)), math.prod(outer))
    walk.pass_on(node, x, axis=1, rank=2, elems=elems)
    return {0}

def on_reshape(walk: Walk, node: ir.Node, tracked: dict[int, Layout]) -> set[int]:
    x = tracked.get(0)
    if x is None or set(tracked) != {0}:
        return walk.reject(node, tracked, "reshapes to a shape computed from the channels")
    dims = dims_of(node.inputs[0])
    entries = walk.shape_entries(required_input(node, 1))
    resolved = None if dims is None or entries is None else resolve_reshape(
        dims, entries, int_attr(node, "allowzero", 0))
    if resolved is None:
        return walk.reject(node, tracked, "reshapes to a shape that is not known")
    k, width = x.axis, len(x.elems)
    if len(resolved) < k + 1 or resolved[:k] != dims[:k]:
        return walk.reject(node, tracked, "reshapes the dimensions before the channel axis")
    tail = dims[k + 1:]
    if resolved[k] == width:
        # Channels stay on axis k: only the dimensions after it are rearranged.
        elems = x.elems
    elif len(resolved) == k + 1 and all(isinstance(d, int) for d in tail) and resolved[k] == width * math.prod(tail):
        # Flatten into features: channel c owns positions [c*P, (c+1)*P), P = prod(tail).
        elems = np.repeat(x.elems, math.prod(tail))
    else:
        return walk.reject(node, tracked, "reshapes the channel axis")
    if entries[k] not in (0, -1):
        # The width is spelled out (e.g. view(-1, C*H*W)): it is rewritten with the channels.
        if constant_array(node.inputs[1]) is None:
            return walk.reject(node, tracked, "has the channel count in a computed shape")
        walk.counts.append(("shape entry", node, 1, k, elems))
    walk.pass_on(node, x, rank=len(resolved), elems=elems)
    return {0}

def on_shape(walk: Walk, node: ir.Node, tracked: dict[int, Layout]) -> set[int]:
    """Shape of a carrier: fine as long as nobody reads its channel entry."""
    x = _only_input(node, tracked)
    if x.rank is None:
        return walk.reject(node, tracked, "reads the shape of a tensor of unknown rank")
    start, end = int_attr(node, "start", 0), int_attr(node, "end", x.rank)
    start = max(start + x.rank if start < 0 else start, 0)
    end = min(end + x.rank if end < 0 else end, x.rank)
    entry, length = x.axis - start, end - start
    if not 0 <= entry < length:
        return {0}          # the channel count is not in this Shape's output
    for reader in {id(u.node): u.node for u in node.outputs[0].uses()}.values():
        if reader.op_type == "Gather" and int_attr(reader, "axis", 0) == 0:
            indices = const_ints(required_input(reader, 1))
            if indices is not None and entry not in indices and entry - length not in indices:
                continue
        return walk.reject(node, tracked, f"has its channel count read by {reader.op_type} '{label(reader)}'")
    if node.outputs[0].is_graph_output():
        return walk.reject(node, tracked, "has its channel count as a graph output")
    return {0}


# --------------------------------------------------------------------------- the table

# Producers run even when no input carries channels: they create channels.
PRODUCER_OPS = frozenset({"Conv", "Gemm", "MatMul"})

# Ops that map every channel to itself, elementwise, on input 0 (other inputs
# must be untracked scalars/settings, e.g. Clip bounds).
_UNARY = ("Relu", "LeakyRelu", "Elu", "Selu", "Celu", "Gelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh",
          "Softplus", "Softsign", "Mish", "Swish", "Clip", "Erf", "Exp", "Log", "Abs", "Neg", "Sqrt", "Reciprocal",
          "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "ThresholdedRelu", "Not", "IsNaN", "IsInf", "Identity",
          "Cast", "Dropout")
# Elementwise ops with broadcasting between all inputs: channel carriers among
# them are coupled; per-channel constants are pruned with them.
_ELEMENTWISE = ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where", "PRelu",
                "Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "And", "Or", "Xor", "Mod")
_POOLS = ("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")
_REDUCES = ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
            "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")

RULES: dict[str, RuleFn] = {
    **dict.fromkeys(_UNARY, on_unary),
    **dict.fromkeys(_ELEMENTWISE, on_elementwise),
    **dict.fromkeys(_POOLS, on_pool),
    **dict.fromkeys(_REDUCES, on_reduce),
    "Conv": on_conv,
    "Gemm": on_gemm,
    "MatMul": on_matmul,
    "BatchNormalization": on_norm,
    "InstanceNormalization": on_norm,
    "LayerNormalization": on_layernorm,
    "LpNormalization": on_lpnorm,
    "Softmax": on_softmax,
    "LogSoftmax": on_softmax,
    "Hardmax": on_softmax,
    "Concat": on_concat,
    "Split": on_split,
    "Slice": on_slice,
    "Gather": on_gather,
    "Transpose": on_transpose,
    "Squeeze": on_squeeze,
    "Unsqueeze": on_unsqueeze,
    "Pad": on_pad,
    "Resize": on_resize,
    "Upsample": on_resize,
    "Flatten": on_flatten,
    "Reshape": on_reshape,
    "Shape": on_shape,
}
