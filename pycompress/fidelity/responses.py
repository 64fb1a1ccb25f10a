"""Layer responses for PFA: one streaming pass, one covariance per tensor.

The response of a layer to an input (ALGORITHMS.md 3.3): a convolution's
output ``N x C x H x W`` max-pooled over space to ``N x C``; a
fully-connected output ``N x C`` as is (a MatMul output ``N x T x C`` gives
``N*T`` rows: every token is a sample). The pooling runs inside
onnxruntime (a ``GlobalMaxPool`` added to a copy of the model), so only
``N x C`` leaves the session and the full feature maps are freed as usual;
each batch goes straight into a float64 ``CovarianceAccumulator``. Memory is
``O(C^2)`` per tensor plus one batch, whatever the number of samples.

Which tensor is a producer's response (``after``):

* ``"producer"`` (default): the Conv/Gemm/MatMul output itself. This is
  what the PFA paper analyses, it exists for every producer (a projection
  conv before a residual Add has no activation), and exported models fold
  BatchNormalization into the conv, so it is usually the BN output too.
  It also avoids a bias of max-pooling after a saturating activation:
  behind ReLU6 / Clip the pooled maximum of a strongly firing filter sits
  at the ceiling for every image, its variance collapses and PFA would call
  a useful filter inactive.
* ``"activation"``: the tensor after the producer's chain of
  BatchNormalization and one activation (Relu, Clip, LeakyRelu, Sigmoid,
  HardSwish, swish ``x * sigmoid(x)``, ...), when it is the only reader;
  what the next layer actually sees (a ReLU that never fires shows up as
  an inactive unit). Producers without such a chain use their own output.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from pycompress.errors import PycompressError
from pycompress.fidelity.session import collect_activations
from pycompress.ir import unique_name
from pycompress.kernels import CovarianceAccumulator

RESPONSE_MODES = ("producer", "activation")
# Rows gathered per tensor before one accumulator update. An update costs a
# SYRK over the rows plus an O(C^2) merge: with 32-row batches the merge
# dominates (C = 1152: 12x slower than with 1024-row blocks, measured), so
# batches are buffered; memory stays bounded (1024 x C floats per tensor).
UPDATE_ROWS = 1024

# Ops that apply a per-channel or elementwise map after a producer.
_CHANNEL_AFFINE = {"BatchNormalization"}
_ACTIVATIONS = {"Relu", "Clip", "LeakyRelu", "PRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh",
                "Elu", "Selu", "Celu", "Gelu", "Softplus", "Mish", "ThresholdedRelu"}


@dataclass
class ResponseStats:
    """Per-tensor covariance accumulators after one pass, and where the time went."""

    accumulators: dict[str, CovarianceAccumulator]
    inputs: int = 0                                  # calibration samples run through the model
    data_seconds: float = 0.0                        # making the batches (decoding, resizing images)
    inference_seconds: float = 0.0                   # inside onnxruntime
    accumulate_seconds: dict[str, float] = field(default_factory=dict)  # per tensor: reshape + update

    @property
    def analysis_seconds(self) -> float:
        return sum(self.accumulate_seconds.values())


def _value(model: ir.Model, name: str) -> ir.Value:
    for node in model.graph:
        for value in node.outputs:
            if value.name == name:
                return value
    raise PycompressError(f"tensor '{name}' is not produced by any node of the model")


def _sole_reader(value: ir.Value) -> ir.Node | None:
    readers = {id(use.node): use.node for use in value.uses()}
    return next(iter(readers.values())) if len(readers) == 1 and not value.is_graph_output() else None


def response_tensor(model: ir.Model, producer_output: str, after: str = "producer") -> str:
    """The tensor whose responses stand for ``producer_output`` (see the module docstring)."""
    if after not in RESPONSE_MODES:
        raise PycompressError(f"--after {after!r}: expected one of {', '.join(RESPONSE_MODES)}")
    value = _value(model, producer_output)
    if after == "producer":
        return value.name
    reader = _sole_reader(value)
    if reader is not None and reader.op_type in _CHANNEL_AFFINE and reader.inputs[0] is value:
        value = reader.outputs[0]
    if value.is_graph_output():
        return value.name
    readers = {id(use.node): use.node for use in value.uses()}
    nodes = list(readers.values())
    if len(nodes) == 1 and nodes[0].op_type in _ACTIVATIONS and nodes[0].inputs[0] is value:
        return nodes[0].outputs[0].name
    if len(nodes) == 2:  # swish: Mul(x, Sigmoid(x))
        sig = next((n for n in nodes if n.op_type == "Sigmoid"), None)
        mul = next((n for n in nodes if n.op_type == "Mul"), None)
        if sig is not None and mul is not None and {id(v) for v in mul.inputs} == {id(value), id(sig.outputs[0])}:
            return mul.outputs[0].name
    return value.name


def _add_spatial_max(model: ir.Model, value: ir.Value) -> str:
    """Append GlobalMaxPool(value) to ``model``; return the pooled tensor's name."""
    name = unique_name(model, f"{value.name}__pfa_spatial_max")
    pooled = ir.Value(name=name)
    pooled.dtype = value.dtype
    node = ir.Node("", "GlobalMaxPool", [value], outputs=[pooled], name=unique_name(model, name))
    # Right after the producer, so that onnxruntime can free the full feature
    # map as usual (appended at the end, every map stayed alive until the
    # last node: 3.5x the peak memory on EfficientNet-Lite0, measured).
    producer = value.producer()
    if producer is not None and producer.graph is model.graph:
        model.graph.insert_after(producer, node)
    else:
        model.graph.insert_before(next(iter(model.graph)), node)
    return name


def collect_responses(model: ir.Model, names: Sequence[str], batches: Iterable[Mapping[str, np.ndarray]], *,
                      total: int | None = None, progress: bool = True, threads: int | None = None,
                      desc: str = "responses") -> ResponseStats:
    """Stream ``batches`` through the model once; accumulate each tensor's ``(rows, C)`` responses.

    Tensors of rank >= 3 are spatially max-pooled (``N x C x ...`` -> ``N x C``);
    rank-2 tensors are used as they are; other ranks are refused. ``total``
    (number of samples) sizes the progress bar (tqdm, stderr).
    """
    names = list(dict.fromkeys(names))
    if not names:
        raise PycompressError("no response tensors to collect")
    probe = model.clone()
    fetch: dict[str, str] = {}
    for name in names:
        value = _value(probe, name)
        if value.shape is None:
            raise PycompressError(f"tensor '{name}': rank unknown after shape inference; cannot take its responses")
        rank = len(value.shape)
        if rank >= 4 or (rank == 3 and value.producer() is not None and value.producer().op_type == "Conv"):
            fetch[name] = _add_spatial_max(probe, value)
        elif rank in (2, 3):
            fetch[name] = name
        else:
            raise PycompressError(f"tensor '{name}' has rank {rank}; responses need (N, C) or (N, C, spatial...)")
    pooled = {name for name in names if fetch[name] != name}

    from tqdm import tqdm

    stats = ResponseStats({})

    def timed(source):  # time spent producing the batches, kept apart from onnxruntime's
        iterator = iter(source)
        while True:
            start = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            finally:
                stats.data_seconds += time.perf_counter() - start
            yield batch

    pending: dict[str, list[np.ndarray]] = {name: [] for name in names}
    pending_rows = dict.fromkeys(names, 0)

    def flush(name: str) -> None:
        if not pending_rows[name]:
            return
        start = time.perf_counter()
        block = np.concatenate(pending[name]) if len(pending[name]) > 1 else pending[name][0]
        acc = stats.accumulators.get(name)
        if acc is None:
            acc = stats.accumulators[name] = CovarianceAccumulator(block.shape[1])
        acc.update(np.ascontiguousarray(block))
        pending[name], pending_rows[name] = [], 0
        stats.accumulate_seconds[name] = stats.accumulate_seconds.get(name, 0.0) + time.perf_counter() - start

    bar = tqdm(total=total, unit="sample", desc=desc, file=sys.stderr, disable=not progress, dynamic_ncols=True)
    # With many pooled outputs, onnxruntime's memory pattern keeps about every
    # feature map of the batch: EfficientNet-Lite0, batch 32: 2.0 GB peak RSS
    # with it, 1.1 GB without (plain inference 0.6 GB), and no slower (measured).
    stream = collect_activations(probe, list(fetch.values()), timed(batches), threads=threads,
                                 session_options={"enable_mem_pattern": False})
    try:
        while True:
            start = time.perf_counter()
            try:
                outputs = next(stream)
            except StopIteration:
                break
            stats.inference_seconds += time.perf_counter() - start
            n = 0
            for name in names:
                array = outputs[fetch[name]]
                n = array.shape[0]
                if name in pooled:
                    rows = array.reshape(array.shape[0], array.shape[1])
                elif array.ndim == 2:
                    rows = array
                else:  # (N, T, C): every token is a sample
                    rows = array.reshape(-1, array.shape[-1])
                pending[name].append(rows)
                pending_rows[name] += rows.shape[0]
                if pending_rows[name] >= UPDATE_ROWS:
                    flush(name)
            stats.inputs += n
            bar.update(n)
        for name in names:
            flush(name)
    finally:
        bar.close()
    stats.inference_seconds -= stats.data_seconds
    if stats.inputs == 0:
        raise PycompressError("no calibration samples: the data source is empty")
    return stats
