"""Integer quantization as a rewrite (ALGORITHMS.md 1.6): per layer, fp32 or
int8 QDQ with per-channel int8 weights and uint8 activations calibrated on data
(U8S8, the fast combination in onnxruntime's CPU kernels).

A decision ``{"bits": 8}`` marks a Conv / Gemm / MatMul layer int8;
``{"bits": 32}`` (any value above 8, or no decision) keeps it float. (The
search encodes the choice as bits 8 or 9, 9 = "leave the layer as it is".) The quantizer itself is
onnxruntime's (``onnxruntime.quantization.quantize_static``, QDQ format,
MinMax ranges), not hand-rolled. Because it calibrates all activation ranges in
one pass over the whole graph, the per-layer decisions are collected first and
the model is quantized once, in ``finish`` (after the plan's last ``quant``
decision): the layers kept float are the quantizer's ``nodes_to_exclude``;
the other ops (Clip, Add, pooling) are quantized around the int8 layers, so
onnxruntime fuses ``DQ -> Conv -> Q`` into its integer kernels.

Before quantizing, on the float graph (Nagel et al., "Data-Free Quantization
Through Weight Equalization and Bias Correction", ICCV 2019):

- **Cross-layer equalization** of consecutive int8 layers ``W1 -> act -> W2``
  whose activation is positively homogeneous (none, Relu) and whose middle
  tensor feeds only ``W2``: ``s_i = sqrt(r1_i r2_i) / r2_i``, ``W1[i] /= s_i``,
  ``b1[i] /= s_i``, ``W2[:, i] *= s_i``; exact in float. ReLU6 (Clip) is not
  homogeneous: those pairs are left alone (EfficientNet-Lite0 has ReLU6 after
  every expand and depthwise conv, so only its project -> expand pairs
  without a residual qualify).
- **Bias correction**: the int8 rounding of the weights (symmetric per
  channel, ``scale = max|W_c| / 127`` as onnxruntime does) shifts each output
  channel's mean by ``(W_q - W) E[x]``; it is subtracted from the bias, with
  ``E[x]`` the per-channel mean of the layer input over calibration data
  (``ctx.activations``, one pass for all layers, at most ``MEAN_SAMPLES``).

Calibration data: the model inputs read through ``ctx.model_activations`` or
``ctx.activations`` (at most ``CALIBRATION_SAMPLES``, or the context's
``calibration_samples``: searches calibrate each candidate on fewer);
without data the rewrite refuses int8 with a clear error (static activation
ranges need data).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir

from pycompress.errors import PycompressError
from pycompress.ir import (
    add_initializer,
    attr_int,
    constant_array,
    consumers,
    node_by_name,
    output_channel_axis,
)
from pycompress.plan import LayerDecision, Plan
from pycompress.rewrites.base import (
    ApplyContext,
    ParamSpec,
    Rewrite,
    SearchRange,
    SearchSettings,
    Site,
    param_specs,
)
from pycompress.rewrites.weight_sharing import correct_bias, output_shift

_LAYERS = ("Conv", "Gemm", "MatMul")
INT8_BITS, FLOAT_BITS = 8, 32     # bits above 8 keep the layer float
CALIBRATION_SAMPLES = 256         # model inputs the activation ranges are calibrated on
# A search's coordinate: 8 = int8, 9 = the layer stays float (the "untouched" end).
SEARCH_BITS = (8, 9)
# Time of an int8 MAC relative to a float one in onnxruntime's CPU kernels (VNNI):
# EfficientNet-Lite0 all int8 ran 2.6 ms against 8.6 ms fp32 (docs/quantization.md).
INT8_MAC_COST = 0.35
MEAN_SAMPLES = 64                 # samples behind each layer's input mean (bias correction)
_PENDING = "pycompress.quant.int8"     # model.meta: the layers marked int8, until finish()
_KEPT = "pycompress.quant.float"       # model.meta: the layers decided float


def _weight(node: ir.Node) -> np.ndarray | None:
    return constant_array(node.inputs[1]) if len(node.inputs) > 1 else None


def _is_quantized(model: ir.Model) -> bool:
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul")
               for n in model.graph)


class Quantize(Rewrite):
    action = "quant"
    summary = ("int8 QDQ via onnxruntime.quantization (per-channel int8 weights, uint8 activations calibrated "
               "on data), after cross-layer equalization and bias correction; or keep the layer float")
    params = param_specs(
        ParamSpec("bits", int, "8: int8 weights and activations (QDQ); 32 (any value above 8): keep the layer float",
                  low=INT8_BITS, high=FLOAT_BITS, required=True, searchable=True,
                  expect=f"{INT8_BITS} (int8) or 9..{FLOAT_BITS} (float)"),
    )
    # Last: quantization sees the final float weights (after pruning, factorization, sharing).
    order = 90
    changes = "precision"
    created_names = ("_equalized",)
    excluded_by: ClassVar[dict[str, str]] = {"weights": "weights shared (no constant left to quantize)"}
    # Closed-form recovery refits float layers: quantize the recovered weights.
    after_recovery = True
    reduces = ("bytes", "latency")     # int8 weights are a quarter of the bytes; MACs and parameters stay

    def describe(self, decisions: list[LayerDecision]) -> str:
        return (f"quantizing: {sum(d.params.get('bits') == INT8_BITS for d in decisions)} layer(s) (or factored "
                "layers) int8, the rest float (cross-layer equalization, bias correction, onnxruntime QDQ)")

    def search_dimension(self, model: ir.Model, site: Site, settings: SearchSettings) -> SearchRange | str:
        """One int8-or-float coordinate per layer: ``SEARCH_BITS`` (8 = int8, 9 = the layer stays float,
        the untouched end). A factored layer's coordinate covers the layers it becomes (``site``)."""
        return SearchRange("bits", "keep", SEARCH_BITS[1], SEARCH_BITS[0], untouched_from=SEARCH_BITS[1])

    def predicted_cost(self, objective: str) -> float | None:
        """int8 stores a byte per weight, MACs stay: not measured by applying it (quantizing
        calibrates the whole graph, per site too slow). For "latency" (predicted from MACs
        before timing) an int8 MAC counts ``INT8_MAC_COST`` of a float one, else the gamma
        choice would see no gain."""
        return {"bytes": 0.25, "latency": INT8_MAC_COST}.get(objective, 1.0)

    def sites(self, model: ir.Model) -> list[Site]:
        out = []
        quantized = _is_quantized(model)
        for node in model.graph:
            if node.op_type not in _LAYERS or node.domain not in ("", "ai.onnx"):
                continue
            site = Site(node.name, self.action, [node.name], info={"op": node.op_type})
            out.append(site)
            weight = _weight(node)
            if not node.name:
                site.ok, site.reason = False, "node has no name (a plan cannot refer to it)"
            elif quantized:
                site.ok, site.reason = False, "the model is already quantized"
            elif weight is None:
                site.ok, site.reason = False, "weight is not a constant (shared or computed)"
            elif weight.dtype.kind != "f":
                site.ok, site.reason = False, f"weight has dtype {weight.dtype} (int8 needs float weights)"
            elif node.op_type == "Gemm" and attr_int(node, "transA", 0):
                site.ok, site.reason = False, "Gemm with transA"
            else:
                site.info.update(params=int(weight.size), width=int(weight.shape[0]))
        return out

    def site(self, model: ir.Model, name: str) -> Site:
        """The layer ``name``; once a factorization replaced it, the layers it became (``name/...``).

        A plan decides quantization per original layer, and the factorizations
        (applied first) name their new nodes ``<layer>/lowrank_a`` etc.
        """
        sites = self.sites(model)
        for site in sites:
            if site.name == name:
                return site
        parts = [s for s in sites if s.name.startswith(f"{name}/")]
        if not parts:
            return super().site(model, name)
        bad = next((s for s in parts if not s.ok), None)
        return Site(name, self.action, [n for s in parts for n in s.nodes], ok=bad is None,
                    reason=bad.reason if bad else "",
                    info={"op": parts[0].info["op"], "params": sum(s.info.get("params", 0) for s in parts)})

    def apply(self, model: ir.Model, decision: LayerDecision, ctx: ApplyContext) -> dict[str, Any]:
        site = self.checked_site(model, decision)
        int8 = int(decision.params["bits"]) == INT8_BITS
        if int8 and ctx.activations is None and ctx.model_activations is None:
            raise PycompressError(f"site '{site.name}': int8 needs calibration data for the activation ranges; "
                                  "pass --data")
        key = _PENDING if int8 else _KEPT
        names = [n for n in model.meta.get(key, "").split("\n") if n] + site.nodes
        model.meta[key] = "\n".join(names)
        return {"bits": INT8_BITS if int8 else FLOAT_BITS, "params": site.info["params"],
                "bytes_before": 4 * site.info["params"],
                "bytes_after": (1 if int8 else 4) * site.info["params"]}

    def finish(self, model: ir.Model, ctx: ApplyContext) -> dict[str, Any]:
        """Equalize, correct the biases and quantize the layers marked int8 (see the module docstring)."""
        int8 = [n for n in model.meta.pop(_PENDING, "").split("\n") if n]
        model.meta.pop(_KEPT, None)
        if not int8:
            return {}
        equalized = equalize_pairs(model, set(int8))
        corrected = correct_biases(model, [node_by_name(model, n) for n in int8], ctx)
        count = quantize_in_place(model, int8, ctx)
        return {"int8_layers": len(int8), "equalized_pairs": equalized, "bias_corrected": corrected,
                "calibration_samples": count}

    def search_seeds(self, model: ir.Model, options: dict[str, Any], target_macs: float | None) -> list[Plan]:
        """Every layer int8 and nothing else, evaluated before the initial design: on
        EfficientNet-Lite0 that point alone is 0.30x fp32 latency at 0.956 held-out agreement,
        while a Sobol design over structure + quantization starts among heavy factorizations and
        never reaches it (docs/quantization.md). The structure coordinates stay untouched."""
        decisions = [d for site in self.sites(model) if (d := self.starting_decision(model, site)) is not None]
        return [Plan(decisions)] if decisions else []

    def starting_decision(self, model: ir.Model, site: Site, **_: Any) -> LayerDecision | None:
        """int8 everywhere it applies (``pycompress plan --actions quant``); edit to 32 to keep a layer float."""
        if not site.ok:
            return None
        return LayerDecision(site.name, self.action, {"bits": 8},
                             note=f"{4 * site.info['params']:,} -> {site.info['params']:,} weight bytes (int8)")


# -- cross-layer equalization -------------------------------------------------

def _input_axis(node: ir.Node, weight: np.ndarray) -> int | None:
    """Axis of ``node``'s weight that reads input channel i (None: not equalizable)."""
    if node.op_type == "Conv":
        group = attr_int(node, "group", 1)
        if group == 1:
            return 1
        return 0 if group == weight.shape[0] and weight.shape[1] == 1 else None   # depthwise
    if node.op_type == "Gemm":
        return 1 if attr_int(node, "transB", 0) else 0
    return 0 if weight.ndim == 2 else None                                      # MatMul x @ W


def _output_axis(node: ir.Node, weight: np.ndarray) -> int | None:
    """Output-channel axis of ``node``'s weight (input 1); MatMul: 2-D weights only."""
    if node.op_type == "MatMul" and weight.ndim != 2:
        return None
    return output_channel_axis(node, 1, weight.ndim)


def _next_layer(model: ir.Model, node: ir.Node) -> ir.Node | None:
    """The single layer reading ``node``'s output through nothing or a Relu (and nothing else)."""
    value = node.outputs[0]
    for _ in range(2):
        if value.is_graph_output():
            return None
        readers = consumers(value)
        if len(readers) != 1:
            return None
        reader = readers[0]
        if reader.op_type in _LAYERS and reader.inputs[0] is value:
            return reader
        if reader.op_type != "Relu":
            return None
        value = reader.outputs[0]
    return None


def _ranges(weight: np.ndarray, axis: int) -> np.ndarray:
    return np.abs(np.moveaxis(weight, axis, 0)).reshape(weight.shape[axis], -1).max(axis=1)


def equalize_pairs(model: ir.Model, layers: set[str]) -> int:
    """Cross-layer equalization of the consecutive pairs among ``layers``; returns how many pairs."""
    count = 0
    for first in list(model.graph):
        if first.name not in layers or first.op_type not in _LAYERS:
            continue
        second = _next_layer(model, first)
        if second is None or second.name not in layers:
            continue
        w1, w2 = _weight(first), _weight(second)
        if w1 is None or w2 is None:
            continue
        out_axis, in_axis = _output_axis(first, w1), _input_axis(second, w2)
        if out_axis is None or in_axis is None or w1.shape[out_axis] != w2.shape[in_axis]:
            continue
        r1, r2 = _ranges(w1, out_axis).astype(np.float64), _ranges(w2, in_axis).astype(np.float64)
        if np.any(r1 <= 0) or np.any(r2 <= 0):
            continue
        s = np.sqrt(r1 * r2) / r2
        shape1 = [1] * w1.ndim
        shape1[out_axis] = -1
        shape2 = [1] * w2.ndim
        shape2[in_axis] = -1
        _replace_constant(model, first, 1, (w1 / s.reshape(shape1)).astype(w1.dtype))
        bias = constant_array(first.inputs[2]) if len(first.inputs) > 2 and first.inputs[2] is not None else None
        if bias is not None:
            if bias.size != s.size:
                continue
            _replace_constant(model, first, 2, (bias / s.reshape(bias.shape)).astype(bias.dtype))
        _replace_constant(model, second, 1, (w2 * s.reshape(shape2)).astype(w2.dtype))
        count += 1
    return count


def _replace_constant(model: ir.Model, node: ir.Node, index: int, array: np.ndarray) -> None:
    old = node.inputs[index]
    node.replace_input_with(index, add_initializer(model, f"{old.name}_equalized", array))
    if not old.uses() and not old.is_graph_output() and model.graph.initializers.get(old.name) is old:
        del model.graph.initializers[old.name]


# -- bias correction ----------------------------------------------------------

def int8_rounded(weight: np.ndarray, axis: int) -> np.ndarray:
    """``weight`` after onnxruntime's symmetric per-channel int8 rounding (scale = max|W_c| / 127)."""
    scale = _ranges(weight, axis).astype(np.float64) / 127.0
    scale[scale == 0] = 1.0
    shape = [1] * weight.ndim
    shape[axis] = -1
    scale = scale.reshape(shape)
    return np.clip(np.rint(weight / scale), -127, 127) * scale


def _reader(model: ir.Model, ctx: ApplyContext):
    """Values of ``model`` itself (as rewritten so far) on calibration data: ``names -> batches``."""
    if ctx.model_activations is not None:
        return lambda names: ctx.model_activations(model, names)
    return ctx.activations      # apply: bound to the model being rewritten


def correct_biases(model: ir.Model, nodes: list[ir.Node], ctx: ApplyContext) -> int:
    """Subtract ``(W_q - W) E[x]`` from each Conv / Gemm bias; returns the number of layers corrected."""
    nodes = [n for n in nodes if n.op_type in ("Conv", "Gemm") and _weight(n) is not None]
    read = _reader(model, ctx)
    if not nodes or read is None:
        return 0
    names = list(dict.fromkeys(n.inputs[0].name for n in nodes))
    totals: dict[str, np.ndarray] = {}
    counts = dict.fromkeys(names, 0)
    seen = 0
    for batch in read(names):
        for name in names:
            x = np.asarray(batch[name], np.float64)
            x = np.moveaxis(x, 1, -1).reshape(-1, x.shape[1]) if x.ndim > 2 else x
            totals[name] = totals[name] + x.sum(axis=0) if name in totals else x.sum(axis=0)
            counts[name] += x.shape[0]
        seen += len(next(iter(batch.values())))
        if seen >= MEAN_SAMPLES:
            break
    corrected = 0
    for node in nodes:
        name = node.inputs[0].name
        if not counts.get(name):
            continue
        weight = _weight(node)
        axis = _output_axis(node, weight)
        delta = int8_rounded(weight.astype(np.float64), axis) - weight
        correct_bias(model, node, output_shift(node, delta, totals[name] / counts[name]))
        corrected += 1
    return corrected


# -- onnxruntime's quantizer --------------------------------------------------

def _calibration_batches(model: ir.Model, ctx: ApplyContext) -> tuple[list[dict[str, np.ndarray]], int]:
    """Model-input batches for the calibrator, split to the model's fixed batch size when it has one."""
    inputs = [v for v in model.graph.inputs if not v.is_initializer()]
    names = [v.name for v in inputs]
    fixed = {v.shape[0] for v in inputs if v.shape is not None and len(v.shape) and isinstance(v.shape[0], int)}
    size = fixed.pop() if len(fixed) == 1 else 16
    batches, seen = [], 0
    limit = int(ctx.options.get("calibration_samples", CALIBRATION_SAMPLES))
    for batch in _reader(model, ctx)(names):
        n = len(batch[names[0]])
        for start in range(0, n - n % size, size):
            batches.append({k: np.ascontiguousarray(batch[k][start:start + size]) for k in names})
            seen += size
            if seen >= limit:
                return batches, seen
    if not batches:
        raise PycompressError(f"int8 calibration needs at least {size} samples (the model's batch size)")
    return batches, seen


def quantize_in_place(model: ir.Model, int8: list[str], ctx: ApplyContext) -> int:
    """Replace ``model``'s graph by onnxruntime's QDQ quantization of it; returns the calibration samples."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    batches, count = _calibration_batches(model, ctx)
    chosen = set(int8)
    kept_float = [n.name for n in model.graph if n.op_type in _LAYERS and n.name not in chosen]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._batches = iter(batches)

        def get_next(self):
            return next(self._batches, None)

    previous = logging.root.manager.disable
    # onnxruntime's quantizer logs a pre-processing hint on every call; our graphs are already simplified.
    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="pycompress-quant-") as tmp:
        output = Path(tmp) / "int8.onnx"
        try:
            quantize_static(ir.to_proto(model), str(output), Reader(), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            nodes_to_exclude=kept_float, extra_options={"WeightSymmetric": True})
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PycompressError(f"onnxruntime static quantization failed: {first}") from exc
        finally:
            logging.disable(previous)
        quantized = ir.from_proto(onnx.load(str(output)))
    model.graph = quantized.graph
    model.ir_version = quantized.ir_version
    return count


REWRITE = Quantize()
