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
from pycompress.ir import SEQUENCE_LENGTH, embedding_vocabulary

DEFAULT_SEQUENCE_LENGTH = SEQUENCE_LENGTH
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
