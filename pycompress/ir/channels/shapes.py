"""Static shape reasoning: a value's dims, Reshape's resolved target, and an evaluator of 1-D shape
tensors (constants, or computed by Shape / Gather / Concat / Unsqueeze ...) into entries.

Used by the channel walk (Reshape targets) and on its own (``ir.heads`` reads attention
Reshapes with it); it needs no channel state.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import onnx_ir as ir

from pycompress.ir.channels.nodes import int_attr, is_default_domain, required_input
from pycompress.ir.graph import constant_array


def dims_of(value: ir.Value | None) -> list[int | str | None] | None:
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


def resolve_reshape(dims: list, entries: list, allow_zero: int) -> list | None:
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


def const_ints(value: ir.Value | None) -> list[int] | None:
    array = constant_array(value)
    return None if array is None else [int(v) for v in np.asarray(array).reshape(-1)]


class ShapeEvaluator:
    """Evaluates 1-D shape tensors into entries, memoised per value (and safe on cycles)."""

    def __init__(self) -> None:
        self._cache: dict[int, list[int | str | None] | None] = {}

    def shape_entries(self, value: ir.Value | None) -> list[int | str | None] | None:
        """Evaluate a 1-D shape tensor into entries: ints, symbolic dim names, or None (unknown)."""
        if value is None:
            return None
        key = id(value)
        if key in self._cache:
            return self._cache[key]
        self._cache[key] = None            # guards cycles
        result = self._evaluate(value)
        self._cache[key] = result
        return result

    def _evaluate(self, value: ir.Value) -> list | None:
        const = constant_array(value)
        if const is not None:
            return [int(v) for v in np.asarray(const).reshape(-1)]
        node = value.producer()
        if node is None or not is_default_domain(node):
            return None
        op = node.op_type
        if op == "Shape":
            dims = dims_of(required_input(node, 0))
            if dims is None:
                return None
            n = len(dims)
            start, end = int_attr(node, "start", 0), int_attr(node, "end", n)
            return dims[slice(start, end)]
        inner = self.shape_entries(required_input(node, 0))
        if inner is None:
            return None
        if op in ("Cast", "Identity", "Squeeze", "Unsqueeze"):
            return inner if op != "Unsqueeze" or len(inner) == 1 else None
        if op == "Gather" and int_attr(node, "axis", 0) == 0:
            idx = const_ints(required_input(node, 1))
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


def shape_entries(model: ir.Model, value: ir.Value | None) -> list[int | str | None] | None:
    """A 1-D shape tensor's entries: ints, symbolic dim names, or None (a constant, or computed by
    Shape/Gather/Concat/Unsqueeze...); None when it cannot be evaluated."""
    del model   # kept in the signature: callers pass the model the value belongs to
    return ShapeEvaluator().shape_entries(value)
