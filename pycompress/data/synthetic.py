"""Valid inputs for a model when the user gives no data (``apply`` measuring the output
difference, ``compress`` without ``--data``).

Float inputs get N(0, 1) values. Integer inputs of a token model get what the
model can read: token ids uniform in the vocabulary of the embedding table
they index (the constant ``Gather`` table the input reaches through
Cast/Unsqueeze/Reshape...), masks (``*mask*``) all ones, token types
(``*type*``) zeros. Symbolic dimensions besides the batch take
``sequence_length`` (every symbolic name the same value, so inputs that share
a dimension agree); a float input with one is refused (an image size cannot
be guessed).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from pycompress.errors import PycompressError
from pycompress.ir import SEQUENCE_LENGTH, constant_array

DEFAULT_SEQUENCE_LENGTH = SEQUENCE_LENGTH
# Ops an index tensor passes through unchanged in value on its way to an embedding Gather.
_INDEX_PASS = frozenset({"Cast", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Identity", "Expand"})


def embedding_vocabulary(value: ir.Value, depth: int = 6) -> int | None:
    """Rows of the constant embedding table that ``value`` indexes (through value-preserving ops), or None."""
    frontier, seen = [value], set()
    for _ in range(depth):
        following = []
        for v in frontier:
            for use in v.uses():
                node = use.node
                if id(node) in seen:
                    continue
                seen.add(id(node))
                if node.op_type == "Gather" and use.idx == 1:
                    table = constant_array(node.inputs[0])
                    axis = node.attributes["axis"].value if "axis" in node.attributes else 0
                    if table is not None and table.ndim >= 1:
                        return int(table.shape[axis])
                if node.op_type in _INDEX_PASS and use.idx == 0:
                    following.extend(o for o in node.outputs if o is not None)
        frontier = following
        if not frontier:
            break
    return None


def synthetic_inputs(model: ir.Model, samples: int, seed: int = 0,
                     sequence_length: int = DEFAULT_SEQUENCE_LENGTH) -> dict[str, np.ndarray]:
    """``samples`` valid inputs per graph input (see module docstring)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in model.graph.inputs:
        if value.is_initializer():
            continue
        dims = list(value.shape or [])
        dtype = np.dtype(value.dtype.numpy() if value.dtype is not None else np.float32)
        symbolic = [i for i, d in enumerate(dims[1:], 1) if not isinstance(d, int)]
        if symbolic and dtype.kind == "f":
            raise PycompressError(f"input '{value.name}' has a symbolic dimension besides the batch; "
                                  "pass --data to measure the output difference")
        shape = [samples] + [d if isinstance(d, int) else sequence_length for d in dims[1:]] if dims else []
        name = value.name.lower()
        if dtype.kind == "f":
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            feeds[value.name] = np.ones(shape, dtype)
        elif "mask" in name:
            feeds[value.name] = np.ones(shape, dtype)
        elif "type" in name:
            feeds[value.name] = np.zeros(shape, dtype)
        else:
            vocab = embedding_vocabulary(value)
            feeds[value.name] = (rng.integers(0, vocab, size=shape) if vocab else np.zeros(shape)).astype(dtype)
    return feeds
