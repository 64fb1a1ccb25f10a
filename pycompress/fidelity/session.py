"""onnxruntime sessions on in-memory models, and intermediate activations.

The one place that turns an ``onnx_ir.Model`` into a runnable session. To read
intermediate tensors (layer responses for PFA, layer inputs for data-aware
low rank and recovery) a *copy* of the model exposes them as extra outputs;
the user's model is never changed.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from pycompress.errors import PycompressError
from pycompress.ir import intermediate_shapes_hidden, truncated


def make_session(model: ir.Model, *, providers: Sequence[str] | None = None, threads: int | None = None,
                 extra_outputs: Sequence[str] = (), session_options: Mapping[str, Any] | None = None):
    """An onnxruntime InferenceSession for ``model`` (plus ``extra_outputs`` exposed).

    ``session_options``: attributes of ``onnxruntime.SessionOptions`` to set
    (e.g. ``{"enable_mem_pattern": False}``).
    """
    import onnxruntime as ort

    with intermediate_shapes_hidden(model):     # as the saved file runs (pycompress.ir.io)
        proto = ir.to_proto(model)
    if extra_outputs:
        import onnx

        # Graph inputs need no exposing: run_tensors returns them from the feeds.
        known = {o.name for o in proto.graph.output} | {i.name for i in proto.graph.input}
        values = {v.name: v for v in model.graph.all_nodes() for v in v.outputs}
        for name in extra_outputs:
            if name in known:
                continue
            if name not in values:
                raise PycompressError(f"tensor '{name}' is not produced by any node of the model")
            # Type only (no shape): ORT accepts it and infers the rest.
            dtype = values[name].dtype or ir.DataType.FLOAT
            proto.graph.output.append(onnx.helper.make_tensor_value_info(name, int(dtype), None))
            known.add(name)
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3
    for key, value in (session_options or {}).items():
        if not hasattr(options, key):
            raise PycompressError(f"unknown onnxruntime session option '{key}'")
        setattr(options, key, value)
    try:
        return ort.InferenceSession(proto.SerializeToString(), options,
                                    providers=list(providers or ["CPUExecutionProvider"]))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PycompressError(f"onnxruntime cannot load the model: {first}") from exc


def iterate_batches(inputs: Mapping[str, np.ndarray], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Split arrays that share their first dimension into feed dicts."""
    n = len(next(iter(inputs.values())))
    for start in range(0, n, batch_size):
        yield {name: array[start:start + batch_size] for name, array in inputs.items()}


def run_tensors(session, names: Sequence[str], feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Values of ``names`` (graph outputs, exposed intermediates or graph inputs) for one batch."""
    input_names = {i.name for i in session.get_inputs()}
    feeds = {k: v for k, v in feeds.items() if k in input_names}
    computed = [n for n in dict.fromkeys(names) if n not in feeds]
    values = dict(zip(computed, session.run(computed, feeds))) if computed else {}
    return [feeds[n] if n in feeds else values[n] for n in names]


def collect_activations(model: ir.Model, names: Sequence[str], batches: Iterable[Mapping[str, np.ndarray]],
                        *, threads: int | None = None,
                        session_options: Mapping[str, Any] | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Yield {tensor name: array} for each input batch (a streaming pass)."""
    session = make_session(model, extra_outputs=names, threads=threads, session_options=session_options)
    output_names = list(dict.fromkeys(names))
    for feeds in batches:
        yield dict(zip(output_names, run_tensors(session, output_names, feeds)))


def upstream_of(model: ir.Model, names: Sequence[str]) -> ir.Model:
    """A copy of ``model`` whose outputs are ``names``, without the nodes they do not depend on.

    onnxruntime runs every node of a session whatever outputs are asked for,
    so reading an early layer through the whole model costs a full forward pass.
    """
    produced = {v.name for node in model.graph for v in node.outputs}
    if any(name not in produced for name in names):
        return model  # e.g. a graph input: let collect_activations handle it
    return truncated(model, list(dict.fromkeys(names)))


def activation_source(model: ir.Model, inputs: Mapping[str, Any], batch_size: int, *,
                      materialize_bytes: int = 2 << 30):
    """``names -> batches`` of ``model``'s values on ``inputs`` as the model is being rewritten in
    place (later sites see earlier changes): ``rewrites.ApplyContext.activations``.

    Lazy inputs (builtin:skimage, image folders) are made once, at the first call, not once per
    rewritten layer (every site reads the same samples again), unless they would not fit in
    memory comfortably (``materialize_bytes``).
    """
    import math
    import sys

    from tqdm import tqdm

    arrays: dict[str, Any] = {}

    def activations(names: Sequence[str]) -> Iterator[dict[str, np.ndarray]]:
        if not arrays:
            small = sum(v.dtype.itemsize * int(np.prod(v.shape)) for v in inputs.values()) < materialize_bytes
            arrays.update({k: np.asarray(v[:]) for k, v in inputs.items()} if small else inputs)
        n = len(next(iter(arrays.values())))
        batches = tqdm(({k: v[start:start + batch_size] for k, v in arrays.items()} for start in range(0, n, batch_size)),
                       total=math.ceil(n / batch_size), desc=f"calibrating {names[0]}", file=sys.stderr,
                       leave=False, disable=None)
        yield from collect_activations(upstream_of(model, names), names, batches)

    return activations


def run_model(model: ir.Model, inputs: Mapping[str, np.ndarray], *, batch_size: int = 256,
              threads: int | None = None) -> list[np.ndarray]:
    """All graph outputs on ``inputs`` (batched, concatenated)."""
    session = make_session(model, threads=threads)
    input_names = {i.name for i in session.get_inputs()}
    parts: list[list[np.ndarray]] = []
    for feeds in iterate_batches({k: v for k, v in inputs.items() if k in input_names}, batch_size):
        parts.append(session.run(None, feeds))
    return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]
