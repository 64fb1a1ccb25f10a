"""Weight sharing (Deep Compression; ALGORITHMS.md 1.5): a layer's weights take
one of ``2^b`` values (times a per-channel scale).

Per layer, 1-D k-means with ``K = 2^b`` clusters (linear initialization
between min and max, Lloyd to convergence, empty clusters re-seeded;
``kernels.kmeans1d``) gives a codebook ``c[K]`` and an index per weight. The
layer's weight input becomes::

    W~ = Gather(codebook[K], Cast(indices[shape of W] uint8, to=INT32), axis=0) * scale

with ``scale`` of shape ``[C, 1, ..]`` (broadcast along the output-channel axis).

Deviations from ALGORITHMS.md, measured on EfficientNet-Lite0
(docs/sharing-export-bench.md):

- ONNX Gather only takes int32/int64 indices (the checker and onnxruntime
  refuse uint8), so a Cast sits between the stored uint8 indices and Gather.
- ``per_channel`` (default on): before clustering, each output channel is
  divided by its RMS ``s_c = sqrt(mean(W_c^2))``; the one codebook is shared by
  all channels in those units and ``W~ = c[idx] * s_c``. Exporters fold
  BatchNorm into the convolutions, which multiplies each output channel by its
  own ``gamma / sigma``: one plain codebook then snaps whole small-scale (even
  dead) channels to a few values. EfficientNet-Lite0, no data, top-1
  agreement plain -> per-channel: 5 bits 10% -> 43%, 6 bits 56% -> 70%, 8 bits
  93% -> 95%. ``per_channel: false`` is Deep Compression's plain per-layer
  codebook. Cost: C floats per layer.

- ``bias_correction`` (default: on when calibration data is given, i.e.
  ``ctx.activations``, unless the context says ``data_aware: false``, e.g.
  ``apply --weight-only``): the shared weight's error shifts each output
  channel's mean by ``dW . E[x]`` (the layer's inputs, post-ReLU6, are far
  from zero-mean), so the bias becomes ``b' = b - dW . E[x]`` with ``E[x]``
  the per-channel mean of the layer's input over the calibration batches, read
  from the model being rewritten (a Conv's zero padding and window borders are
  ignored, so for Conv the shift shrinks but does not vanish). For Conv and Gemm (a bias is added if
  missing); MatMul has no bias to correct. This is the mean-only case of the
  layer-wise refit of ALGORITHMS.md 4 and keeps the codebook. Measured on
  EfficientNet-Lite0 at 8 bits: top-1 agreement 94.5% -> 99.2%.

- ``error_compensation`` (default off; needs calibration data): the indices
  are chosen column by column with GPTQ's error feedback through
  ``E[p p^T]`` instead of nearest-centroid (``compensated_indices``;
  codebook and scales stay k-means'): ``p`` is the input vector of Gemm and
  1x1 Conv, the input patch of one group for other Convs (3x3, depthwise;
  ``conv_patches``). Measured on EfficientNet-Lite0 with per-layer bits
  (rewrites/share_allocation.py): held-out top-1 agreement at ~0.19x packed
  bytes 0.944 -> 0.969 (Gemm and 1x1 only); with the 3x3 and depthwise convs
  too, the stem's output error at 6 bits falls 7x and the depthwise convs'
  2-3x (docs/sharing-export-bench.md).

- ``activation_weighting`` (default off; needs calibration data): the
  k-means is weighted, each weight by the variance (``E[x_i^2]`` without
  bias correction) of the input channel it multiplies (Conv and Gemm; shrunk
  halfway to uniform), so the centroids go where the layer's *output* error
  is, not where the weights are dense (``weighted_lloyd``, started from the
  unweighted k-means). ALGORITHMS.md 1.5 clusters the weights alone. Measured
  on EfficientNet-Lite0 it did not help (docs/sharing-export-bench.md).

- ``drift_correction`` (default off; with bias correction and the original
  model's activations, ``ctx.reference_activations``): the bias also absorbs
  the output-mean shift that earlier rewritten layers left in this layer's
  input, ``W (E[x] - E[x_orig])`` (DFQ's empirical bias correction). On
  digits it lowers the held-out output error; on EfficientNet-Lite0 it helped
  the calibration photos only (docs/sharing-export-bench.md).

- ``levels="uniform"`` (default ``kmeans``): evenly spaced values with the
  k-means error instead of the ``2^bits`` k-means values (``uniform_levels``):
  fewer bits once the packed container Huffman-codes the indices (used where
  the coded indices plus the longer codebook come out smaller).

The file stores one byte per weight plus the codebook and scales; onnxruntime
folds Cast + Gather + Mul into the float weight once when the session is
created, so inference runs at the float model's speed. The index streams are
what ``pycompress export --to packed`` Huffman-codes.

With ``prune_fraction = p``, the ``round(p n)`` weights of smallest magnitude
are set to exactly 0 first (Deep Compression's pruning, without retraining),
index 0 is reserved for 0.0 and the other weights are clustered into
``K - 1`` values. This only makes the file smaller (long runs of index 0 code
well in the packed container); onnxruntime still runs dense float weights,
so it does not speed inference up.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir

from pycompress import kernels
from pycompress.errors import PycompressError
from pycompress.ir import (add_initializer, as_matrix, attr_float, attr_int, attr_ints, attr_str, constant_array,
                           consumers, is_codebook_lookup, node_by_name, node_macs, output_channel_axis,
                           remove_if_unused, unique_name)
from pycompress.plan import LayerDecision
from pycompress.rewrites.base import ApplyContext, ParamSpec, Rewrite, SearchRange, SearchSettings, Site, param_specs

# Weight input of each supported op (MatMul: whichever input is constant, B first).
_WEIGHT_INPUTS = {"Conv": (1,), "Gemm": (1,), "MatMul": (1, 0)}
_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE)
MAX_BITS = 8
# Index bits a search tries: below 2 bits even large FC layers collapse.
SEARCH_BITS = (2, 8)
MEAN_SAMPLES = 64   # calibration samples (at least; whole batches) behind each layer's input mean
# error_compensation's E[x x^T] reads on until it has this many input vectors per input channel
# (a Gemm gets one per sample, a Conv one per position), up to COMPENSATION_SAMPLES samples.
COMPENSATION_ROWS_PER_INPUT = 4
COMPENSATION_SAMPLES = 256


def _const_tensor(value: ir.Value | None):
    """The constant tensor behind ``value`` (initializer or Constant node), without converting it."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value
    node = value.producer()
    if node is not None and node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
        attr = node.attributes.get("value")
        if attr is not None:
            return attr.as_tensor()
    return None


def channel_scales(weights: np.ndarray, axis: int) -> np.ndarray:
    """RMS of each slice along ``axis``, shaped to broadcast against ``weights`` (float64)."""
    axes = tuple(i for i in range(weights.ndim) if i != axis % weights.ndim)
    return np.sqrt(np.mean(np.square(weights, dtype=np.float64), axis=axes, keepdims=True))


def share_weights(weights: np.ndarray, bits: int, prune_fraction: float = 0.0, channel_axis: int | None = None,
                  importance: np.ndarray | None = None, levels: str = "kmeans"):
    """k-means weight sharing of one array: ``(codebook[2^bits], indices uint8 like weights, scale | None, info)``.

    ``W~ = codebook[indices] * scale`` (``scale`` = per-channel RMS along
    ``channel_axis``, None without it). Without pruning ``codebook, indices =
    kmeans1d(W / scale, 2^bits)``. With pruning, the smallest ``round(p n)``
    magnitudes of W map to index 0 (``codebook[0] = 0``) and the rest are
    clustered into ``2^bits - 1`` values at indices 1.. .
    ``importance`` (non-negative, broadcastable to ``weights``): the k-means
    minimizes ``sum importance * (W~ - W)^2 / scale^2`` instead
    (``weighted_lloyd`` from the unweighted result).
    ``levels="uniform"`` (no pruning): the codebook becomes ``uniform_levels``
    of the same (weighted) error as the k-means result, up to 256 values,
    where that makes the Huffman-coded indices plus codebook smaller
    (``coded_bytes``; small layers pay more for the longer codebook than the
    entropy saves); ``codebook`` may then have another length than ``2^bits``.
    """
    clusters = 2 ** bits
    scale = None
    values = np.asarray(weights, np.float64)
    if channel_axis is not None:
        scale = channel_scales(values, channel_axis)
        # A dead channel (all zero) keeps scale 0 and normalized values 0.
        values = np.divide(values, scale, out=np.zeros_like(values), where=scale > 0)
    flat = np.ascontiguousarray(values, dtype=np.float32).ravel()
    magnitude = np.abs(np.asarray(weights, np.float64)).ravel()
    pruned = int(round(prune_fraction * flat.size)) if prune_fraction > 0 else 0
    info: dict[str, Any] = {"pruned": pruned}
    if pruned == 0:
        codebook, indices, iterations, converged = kernels.kmeans1d(flat, clusters)
        weight = (None if importance is None else
                  np.ascontiguousarray(np.broadcast_to(importance, np.shape(weights)), np.float64).ravel())
        if weight is not None:
            codebook, indices, more, converged = weighted_lloyd(flat, weight, codebook)
            iterations += more
        if levels == "uniform":
            error = codebook[indices].astype(np.float64) - flat
            target = float(np.average(np.square(error), weights=weight))
            uniform = uniform_levels(flat, target, weight)
            if uniform is not None and coded_bytes(*uniform) < coded_bytes(codebook, indices):
                codebook, indices = uniform
    else:
        drop = np.argpartition(magnitude, pruned - 1)[:pruned] if pruned < flat.size else np.arange(flat.size)
        keep = np.ones(flat.size, bool)
        keep[drop] = False
        codebook = np.zeros(clusters, np.float32)
        indices = np.zeros(flat.size, np.uint8)
        iterations, converged = 0, True
        if keep.any():
            sub_codebook, sub_indices, iterations, converged = kernels.kmeans1d(flat[keep], clusters - 1)
            codebook[1:] = sub_codebook
            indices[keep] = sub_indices + 1
    info.update(iterations=int(iterations), converged=bool(converged))
    return codebook, indices.reshape(np.shape(weights)), scale, info


def coded_bytes(codebook: np.ndarray, indices: np.ndarray) -> float:
    """Bytes of the indices at their empirical entropy plus the float32 codebook (what Huffman coding approaches)."""
    counts = np.bincount(np.asarray(indices).ravel(), minlength=1).astype(np.float64)
    p = counts[counts > 0] / max(np.asarray(indices).size, 1)
    return float(-(p * np.log2(p)).sum()) * np.asarray(indices).size / 8 + 4.0 * np.asarray(codebook).size


def uniform_levels(values: np.ndarray, target: float, weight: np.ndarray | None = None,
                   max_levels: int = 256) -> tuple[np.ndarray, np.ndarray] | None:
    """The coarsest uniform grid whose (weighted) mean squared error stays within ``target``: ``(codebook, indices)``.

    Values round to multiples of a step ``d``; each used level's value is its
    members' (weighted) mean, which only lowers the error; unused levels
    inside the range keep their grid value. The step is found by bisection
    (the error grows with the step). None when no grid of at most
    ``max_levels`` values is that accurate (heavy tails at 8 bits).

    Why: the packed container Huffman-codes the indices, so what a layer
    costs is their entropy, not ``log2`` of the codebook size. For a given
    error, a uniform grid coded by entropy needs fewer bits than Lloyd's
    optimal levels (Gish and Pierce, entropy-coded quantization);
    EfficientNet-Lite0's large layers at the k-means error of 16-128 values:
    0.15-0.23 bit per weight less.
    """
    x = np.asarray(values, np.float64).ravel()
    w = np.ones_like(x) if weight is None else np.asarray(weight, np.float64).ravel()
    span = float(x.max() - x.min()) if x.size else 0.0
    if span <= 0 or target <= 0 or w.sum() <= 0:
        return None

    def grid(step: float):
        q = np.round(x / step)
        low = q.min()
        index = (q - low).astype(np.int64)
        count = int(index.max()) + 1
        if count > max_levels:
            return None
        mass = np.bincount(index, weights=w, minlength=count)
        total = np.bincount(index, weights=w * x, minlength=count)
        codebook = np.where(mass > 0, total / np.where(mass > 0, mass, 1.0), (np.arange(count) + low) * step)
        error = float(np.average(np.square(codebook[index] - x), weights=w))
        return codebook, index, error

    fine = span / (max_levels - 1) * 1.0001            # the finest grid that fits max_levels
    best = grid(fine)
    if best is None or best[2] > target:
        return None
    coarse = span                                      # one or two levels: surely too coarse (else take it)
    for _ in range(40):
        if coarse / fine < 1.001:
            break
        step = float(np.sqrt(fine * coarse))
        trial = grid(step)
        if trial is not None and trial[2] <= target:
            fine, best = step, trial
        else:
            coarse = step
    codebook, index, _ = best
    return codebook.astype(np.float32), index.astype(np.uint8)


def weighted_lloyd(values: np.ndarray, weight: np.ndarray, codebook: np.ndarray, max_iter: int = 1000):
    """Weighted 1-D Lloyd from ``codebook``: ``(codebook float32 sorted, indices uint8, iterations, converged)``.

    Minimizes ``sum_j weight_j (values_j - c[idx_j])^2``: each value joins its
    nearest centroid (the partition of the sorted values into runs by the
    midpoints), each centroid moves to its run's weighted mean (from prefix
    sums, as ``kernels.kmeans1d``); a run without weight keeps its centroid.
    Every step lowers the weighted error, so starting from the unweighted
    k-means it can only improve on it for this objective. ``converged``: the
    partition stopped changing within ``max_iter`` steps.
    """
    x = np.asarray(values, np.float64).ravel()
    w = np.asarray(weight, np.float64).ravel()
    order = np.argsort(x, kind="stable")
    s, ws = x[order], w[order]
    weight_prefix = np.concatenate([[0.0], np.cumsum(ws)])
    moment_prefix = np.concatenate([[0.0], np.cumsum(ws * s)])
    c = np.sort(np.asarray(codebook, np.float64))
    previous, converged, iterations = None, False, 0
    for iterations in range(1, max_iter + 1):
        bounds = np.concatenate([[0], np.searchsorted(s, (c[:-1] + c[1:]) / 2, side="right"), [s.size]])
        if previous is not None and np.array_equal(bounds, previous):
            converged = True
            break
        total = weight_prefix[bounds[1:]] - weight_prefix[bounds[:-1]]
        moment = moment_prefix[bounds[1:]] - moment_prefix[bounds[:-1]]
        c = np.sort(np.where(total > 0, moment / np.where(total > 0, total, 1.0), c))
        previous = bounds
    out = c.astype(np.float32)
    return out, _nearest(np.asarray(values, np.float32).ravel().astype(np.float64), out.astype(np.float64)), \
        iterations, converged


# activation_weighting: each input channel's E[x_i^2] (over its mean) is blended halfway with 1, so
# that inputs silent on the calibration photos still count (other photos may switch them on; the
# same reason E[x x^T] is shrunk for error compensation).
ACTIVATION_WEIGHT_SHRINKAGE = 0.5


def activation_importance(node: ir.Node, weights: np.ndarray, input_square: np.ndarray) -> np.ndarray | None:
    """Per-weight importance from the input channels' second moments ``E[x_i^2]`` (Conv / Gemm weight; else None).

    Shaped to broadcast against ``weights``: a Conv weight ``[Co, Ci/g, k..]``
    reads input channel ``g(o) * Ci/g + i``; a Gemm weight its input
    dimension (rows, or columns with ``transB``). Normalized to mean 1 and
    shrunk by ``ACTIVATION_WEIGHT_SHRINKAGE`` toward 1.
    """
    h = np.asarray(input_square, np.float64)
    if h.size == 0 or not np.all(np.isfinite(h)) or float(h.mean()) <= 0:
        return None
    h = (1.0 - ACTIVATION_WEIGHT_SHRINKAGE) * h / float(h.mean()) + ACTIVATION_WEIGHT_SHRINKAGE
    if node.op_type == "Conv":
        groups = attr_int(node, "group", 1)
        out_channels, in_per_group = weights.shape[0], weights.shape[1]
        if groups < 1 or out_channels % groups or h.size != groups * in_per_group:
            return None
        group_of = np.arange(out_channels) // (out_channels // groups)
        per = h[group_of[:, None] * in_per_group + np.arange(in_per_group)[None, :]]      # [Co, Ci/g]
        return per.reshape(per.shape + (1,) * (weights.ndim - 2))
    if node.op_type == "Gemm" and weights.ndim == 2 and not attr_int(node, "transA", 0):
        if attr_int(node, "transB", 0):
            return h[None, :] if h.size == weights.shape[1] else None
        return h[:, None] if h.size == weights.shape[0] else None
    return None


def input_moment(mean: np.ndarray, square: np.ndarray, centered: bool) -> np.ndarray:
    """Each input channel's ``E[x^2]``, or its variance when bias correction removes the mean error."""
    # With the bias corrected, the mean part dW . E[x] of the output error is gone; what stays
    # is dW^T Cov(x) dW, whose diagonal is the variance (post-ReLU6 inputs have large means).
    return np.maximum(square - np.square(mean), 0.0) if centered else square


def layer_importance(node: ir.Node, weights: np.ndarray, ctx: ApplyContext, centered: bool = True) -> np.ndarray | None:
    """``activation_importance`` of the node's weight on the calibration data of ``ctx`` (None without data).

    ``centered``: weight by the inputs' variance (bias correction on) rather than ``E[x^2]``.
    """
    if ctx.activations is None or node.op_type not in ("Conv", "Gemm"):
        return None
    mean, _, square, _ = _input_statistics(node, ctx)
    return None if square is None else activation_importance(node, weights, input_moment(mean, square, centered))


class WeightSharing(Rewrite):
    action = "share"
    summary = ("k-means weight sharing: the weight becomes Gather(codebook[2^bits], uint8 indices); "
               "1 byte per weight in ONNX, Huffman-coded by `export --to packed`")
    params = param_specs(
        ParamSpec("bits", int, "index bits b: the layer keeps 2^b distinct weight values",
                  low=1, high=MAX_BITS, required=True, searchable=True, checked_by_rewrite=True,
                  expect=f"an integer in 1..{MAX_BITS}"),
        ParamSpec("prune_fraction", float, "fraction of smallest-magnitude weights set to 0 before sharing "
                  "(file size only: onnxruntime still runs dense weights)", default=0.0, low=0.0, high=1.0,
                  high_open=True),
        ParamSpec("per_channel", bool, "scale each output channel by its RMS before clustering (needed for "
                  "BN-folded convs); false = Deep Compression's plain per-layer codebook", default=True,
                  nullable=True),
        ParamSpec("bias_correction", bool, "subtract the mean output shift dW . E[x] on calibration data from "
                  "the bias (Conv, Gemm); absent: on when apply has --data (not --weight-only)", nullable=True),
        ParamSpec("error_compensation", bool, "choose the indices column by column, pushing each column's "
                  "rounding error onto the columns not yet rounded through E[x x^T] of the layer's input "
                  "(GPTQ with the k-means codebook; Gemm and 1x1 Conv, needs --data)", default=False),
        ParamSpec("drift_correction", bool, "with bias correction: also remove the shift of the output mean "
                  "that earlier rewritten layers caused (W . (E[x] - E[x_original]), the original model's "
                  "input mean on the same calibration batches)", default=False),
        ParamSpec("levels", str, "kmeans: 2^bits k-means values; uniform: an evenly spaced grid (up to 256 "
                  "values) with the same weight error as those, fewer bits once Huffman-coded (packed file)",
                  default="kmeans", choices=("kmeans", "uniform")),
        ParamSpec("activation_weighting", bool, "weight the k-means by the second moment E[x_i^2] of the input "
                  "each weight multiplies, so centroids go where the output error is (Conv, Gemm; needs --data)",
                  default=False),
    )
    # After pruning (which changes shapes) and factorizations, before quantization.
    order = 70
    changes = "weights"
    reduces = ("bytes",)       # the layer keeps its parameters and MACs; its indices take fewer bits
    created_names = ("_codebook", "_indices", "_shared", "_channel_scale", "_weight_scale", "_corrected")
    excluded_by: ClassVar[dict[str, str]] = {"replace": "factored by {action}; not shared"}

    def search_dimension(self, model: ir.Model, site: Site, settings: SearchSettings) -> SearchRange | str:
        """Index bits ``SEARCH_BITS`` (a shared layer is never left as it is)."""
        return SearchRange("bits", "keep", SEARCH_BITS[1], SEARCH_BITS[0])

    def cost_owner(self, site: Site) -> str | None:
        """The codebook lookup (Gather, Cast) is the layer's weight: its cost is the layer's."""
        return site.nodes[0]

    def check_params(self, site: Site, params: dict[str, Any]) -> None:
        super().check_params(site, params)
        # A missing 'bits' reads as None: one wording for absent and wrong (tests match it).
        self.params["bits"].check(site, params.get("bits"))

    def _weight_input(self, node: ir.Node) -> int | None:
        for index in _WEIGHT_INPUTS[node.op_type]:
            if index < len(node.inputs) and _const_tensor(node.inputs[index]) is not None:
                return index
        return None

    def sites(self, model: ir.Model) -> list[Site]:
        out = []
        for node in model.graph:
            if node.op_type not in _WEIGHT_INPUTS or node.domain not in ("", "ai.onnx"):
                continue
            site = Site(name=node.name, action=self.action, nodes=[node.name], info={"op": node.op_type})
            out.append(site)
            index = self._weight_input(node)
            if not node.name:
                site.ok, site.reason = False, "node has no name (a plan cannot refer to it)"
                continue
            if index is None:
                weight = node.inputs[1] if len(node.inputs) > 1 else None
                producer = weight.producer() if weight is not None else None
                if producer is not None and producer.op_type == "Mul" and producer.inputs[0] is not None:
                    producer = producer.inputs[0].producer()  # the per-channel scale
                if producer is not None and is_codebook_lookup(producer):
                    site.ok, site.reason = False, "weight is already shared"
                else:
                    site.ok, site.reason = False, "weight is not a constant"
                continue
            value = node.inputs[index]
            tensor = _const_tensor(value)
            axis = output_channel_axis(node, index, len(tensor.shape))
            site.info.update(input=index, weight=value.name, shape=list(tensor.shape),
                             params=int(np.prod(tensor.shape, dtype=np.int64)),
                             channels=int(tensor.shape[axis]) if axis is not None else 0, macs=node_macs(node))
            if tensor.dtype not in _FLOAT_TYPES:
                site.ok, site.reason = False, f"weight has dtype {tensor.dtype.name} (sharing needs float weights)"
            elif site.info["params"] == 0:
                site.ok, site.reason = False, "weight is empty"
            elif value.is_graph_output() or len(consumers(value)) > 1:
                site.ok, site.reason = False, "weight is also used by other nodes or is a graph output"
        return out

    def apply(self, model: ir.Model, decision: LayerDecision, ctx: ApplyContext) -> dict[str, Any]:
        site = self.checked_site(model, decision)
        bits = int(decision.params["bits"])
        fraction = float(decision.params.get("prune_fraction", 0.0))
        node = node_by_name(model, decision.site)
        index = site.info["input"]
        value = node.inputs[index]
        weights = constant_array(value)
        input_mean = second_moment = None
        compensate = bool(decision.params.get("error_compensation", False)) and compensable(node, index, weights)
        if compensate and ctx.activations is None:
            raise PycompressError(f"site '{site.name}': error_compensation needs calibration data; pass --data")
        weighted = bool(decision.params.get("activation_weighting", False))
        if weighted and ctx.activations is None:
            raise PycompressError(f"site '{site.name}': activation_weighting needs calibration data; pass --data")
        weighted = weighted and node.op_type in ("Conv", "Gemm") and index == 1
        correct = wants_bias_correction(site, decision.params, ctx) and node.op_type in ("Conv", "Gemm") and index == 1
        importance = None
        if correct or compensate or weighted:
            input_mean, second_moment, input_square, samples = _input_statistics(node, ctx, second=compensate)
            if weighted and input_square is not None:
                importance = activation_importance(node, weights, input_moment(input_mean, input_square, correct))
            input_mean = input_mean if correct else None
        axis = (output_channel_axis(node, index, weights.ndim)
                if decision.params.get("per_channel", True) else None)
        codebook, indices, scale, info = share_weights(weights, bits, fraction, axis, importance,
                                                       decision.params.get("levels", "kmeans"))
        if compensate and second_moment is not None and fraction == 0:
            indices = compensated_indices(node, weights, codebook, scale, second_moment)
        codebook = codebook.astype(weights.dtype)

        codebook_value = add_initializer(model, f"{value.name}_codebook", codebook)
        indices_value = add_initializer(model, f"{value.name}_indices", indices)
        cast = ir.node("Cast", [indices_value], attributes={"to": ir.DataType.INT32},
                       name=unique_name(model, f"{node.name}_indices_cast"))
        cast.outputs[0].name = unique_name(model, f"{value.name}_indices_int32")
        cast.outputs[0].dtype, cast.outputs[0].shape = ir.DataType.INT32, ir.Shape(indices.shape)
        gather = ir.node("Gather", [codebook_value, cast.outputs[0]], attributes={"axis": 0},
                         name=unique_name(model, f"{node.name}_shared_weight"))
        new_nodes, shared = [cast, gather], gather.outputs[0]
        if scale is not None:
            scale = scale.astype(weights.dtype)
            scale_value = add_initializer(model, f"{value.name}_channel_scale", scale)
            mul = ir.node("Mul", [shared, scale_value], name=unique_name(model, f"{node.name}_weight_scale"))
            shared.name = unique_name(model, f"{value.name}_shared_unscaled")
            shared.dtype, shared.shape = value.dtype, ir.Shape(weights.shape)
            new_nodes.append(mul)
            shared = mul.outputs[0]
        shared.name = unique_name(model, f"{value.name}_shared")
        shared.dtype, shared.shape = value.dtype, ir.Shape(weights.shape)
        model.graph.insert_before(node, new_nodes)
        node.replace_input_with(index, shared)
        remove_if_unused(model.graph, value)

        reconstructed = codebook[indices] * scale if scale is not None else codebook[indices]
        drift = None
        if input_mean is not None and decision.params.get("drift_correction", False):
            if ctx.reference_activations is None:
                raise PycompressError(f"site '{site.name}': drift_correction needs the original model's "
                                      "activations (apply with --data)")
            drift = input_mean - _reference_mean(node, ctx, samples)
        if input_mean is not None:
            shift = output_shift(node, reconstructed.astype(np.float64) - weights, input_mean)
            if drift is not None:
                # W~ mu - W mu_original = dW mu + W (mu - mu_original): the layer's own error and the
                # drift the layers before it left in its input mean (DFQ's empirical bias correction).
                shift = shift + output_shift(node, np.asarray(weights, np.float64), drift)
            correct_bias(model, node, shift)

        reconstructed = reconstructed.astype(np.float64)
        original = weights.astype(np.float64)
        norm = float(np.linalg.norm(original))
        return {
            "bits": bits,
            "prune_fraction": fraction,
            "per_channel": scale is not None,
            "bias_corrected": input_mean is not None,
            "drift_corrected": drift is not None,
            "error_compensated": bool(compensate and second_moment is not None and fraction == 0),
            "activation_weighted": importance is not None and fraction == 0,
            "codebook_values": int(codebook.size),
            "pruned": info["pruned"],
            "values_used": int(np.unique(indices).size),
            "kmeans_iterations": info["iterations"],
            "converged": info["converged"],
            "params": int(weights.size),
            "bytes_before": int(weights.nbytes),
            "bytes_after": int(indices.nbytes + codebook.nbytes + (scale.nbytes if scale is not None else 0)),
            "relative_weight_error": float(np.linalg.norm(reconstructed - original) / norm) if norm else 0.0,
        }

    def starting_decision(self, model: ir.Model, site: Site, bits: int = 8, **_: Any) -> LayerDecision | None:
        """``bits`` per layer (default 8); None where the codebook would outweigh the saving.

        Shared: n bytes of indices + 4 * 2^bits of codebook (+ channel scales), against 4 n bytes.
        """
        if not site.ok:
            return None
        if not 1 <= bits <= MAX_BITS:
            site.info["plan_note"] = f"share takes 1..{MAX_BITS} bits, not {bits}"
            return None
        if site.info.get("params", 0) <= 2 * 2 ** bits:
            site.info["plan_note"] = (f"{site.info.get('params', 0)} weights: a {2 ** bits}-entry codebook "
                                      "would outweigh the saving")
            return None
        n = site.info["params"]
        after = n + 4 * (2 ** bits + site.info.get("channels", 0))
        return LayerDecision(site.name, self.action, {"bits": int(bits)},
                             note=f"{4 * n:,} -> {after:,} bytes in the ONNX file (uint8 indices)")


def output_shift(node: ir.Node, delta: np.ndarray, input_mean: np.ndarray) -> np.ndarray:
    """Mean change of each output channel, ``dW . E[x]``, for a Conv or Gemm weight change ``delta``.

    Conv: ``shift[o] = sum_{i, k} dW[o, i, k] mu[g(o) * C_in/group + i]``;
    Gemm: ``alpha * dW mu`` (``dW`` as ``[N, K]``).
    """
    if node.op_type == "Conv":
        groups = attr_int(node, "group", 1)
        out_channels, in_per_group = delta.shape[0], delta.shape[1]
        per_input = delta.reshape(out_channels, in_per_group, -1).sum(axis=2)   # [Co, Ci/g]
        group_of = np.arange(out_channels) // (out_channels // groups)
        means = input_mean[group_of[:, None] * in_per_group + np.arange(in_per_group)[None, :]]
        return (per_input * means).sum(axis=1)
    matrix = as_matrix(node, delta).T                                           # [N, K]
    return attr_float(node, "alpha", 1.0) * (matrix @ input_mean)


def _input_statistics(node: ir.Node, ctx: ApplyContext, second: bool = False):
    """``(E[x], (H, rows) or None, E[x^2], samples read)`` of the node's data input per channel.

    Read from the model as it is being rewritten (``ctx.activations``), so a
    layer sees the inputs that the already shared (and corrected) layers
    before it produce. A Conv's channels are averaged over all positions too.
    ``H`` (with ``second``) is ``E[p p^T]`` per group, ``[groups, D, D]``, of
    the vectors ``p`` one output row of the weight multiplies: the input
    channels for Gemm and 1x1 Conv (one group), the ``Ci/g * kh * kw`` patch
    of a group for other Convs (``conv_patches``); ``rows`` vectors per group.
    """
    name = node.inputs[0].name
    patches = second and node.op_type == "Conv" and not _pointwise(node)
    total, gram, square, count, samples, rows = None, None, None, 0, 0, 0
    for batch in ctx.activations([name]):
        raw = np.asarray(batch[name], np.float64)
        x, in_batch = _channel_rows(node, raw)
        samples += in_batch
        total = x.sum(axis=0) if total is None else total + x.sum(axis=0)
        square = np.square(x).sum(axis=0) if square is None else square + np.square(x).sum(axis=0)
        if patches:
            p = conv_patches(node, raw)                                            # [rows, groups, D]
            if p is None:
                patches = second = False
            else:
                part = np.einsum("rgd,rge->gde", p, p)
                gram = part if gram is None else gram + part
                rows += p.shape[0]
        elif second:
            gram = x.T @ x if gram is None else gram + x.T @ x
            rows = count + x.shape[0]
        count += x.shape[0]
        width = gram.shape[-1] if gram is not None else x.shape[1]
        if samples >= MEAN_SAMPLES and (not second or rows >= COMPENSATION_ROWS_PER_INPUT * width
                                        or samples >= COMPENSATION_SAMPLES):
            # Each layer needs its own pass through the model rewritten so far
            # (later layers see the earlier ones shared); over all of 256
            # EfficientNet-Lite0 crops that was 48 passes of 256 samples, 358 s.
            # A per-channel mean over 64 samples (x H x W positions for a Conv)
            # is already far more precise than the shift it corrects.
            break
    if not count:
        return None, None, None, 0
    if second and gram is not None:
        moment = (gram if gram.ndim == 3 else gram[None]) / rows, rows
    else:
        moment = None
    return total / count, moment, square / count, samples


def _channel_rows(node: ir.Node, raw: np.ndarray) -> tuple[np.ndarray, int]:
    """A batch of the node's data input as rows of its channels ``[rows, C]`` (a Conv's positions are rows
    too; Gemm's ``transA`` undone), and how many samples the batch holds."""
    trans_a = node.op_type != "Conv" and attr_int(node, "transA", 0)
    if node.op_type == "Conv":
        return np.moveaxis(raw, 1, -1).reshape(-1, raw.shape[1]), raw.shape[0]
    return (raw.T, raw.shape[1]) if trans_a else (raw, raw.shape[0])


def _reference_mean(node: ir.Node, ctx: ApplyContext, samples: int) -> np.ndarray:
    """Per-channel mean of the node's data input in the original model over the first ``samples`` samples.

    The same batches ``_input_statistics`` read: the drift is a difference of two means, and
    over different samples it would be mostly their sampling noise.
    """
    name = node.inputs[0].name
    total, count, read = None, 0, 0
    for batch in ctx.reference_activations([name]):
        x, in_batch = _channel_rows(node, np.asarray(batch[name], np.float64))
        read += in_batch
        total = x.sum(axis=0) if total is None else total + x.sum(axis=0)
        count += x.shape[0]
        if read >= samples:
            break
    return total / count


def _pointwise(node: ir.Node) -> bool:
    """A 1x1 Conv of one group: its weight is a plain matrix on the input channels."""
    weight = _const_tensor(node.inputs[1]) if len(node.inputs) > 1 else None
    return (weight is not None and attr_int(node, "group", 1) == 1
            and all(int(k) == 1 for k in weight.shape[2:]))


PATCH_ROWS_PER_BATCH = 16384   # output positions per batch whose patches enter E[p p^T] (memory bound)


def conv_patches(node: ir.Node, x: np.ndarray) -> np.ndarray | None:
    """The input patches of a 2-D Conv, ``[rows, groups, Ci/g * kh * kw]`` (None where not supported).

    Row order ``(sample, y, x)``; each patch ordered like the weight's
    ``[Ci/g, kh, kw]``, so ``W[o].ravel() . patch`` is output ``o`` at that
    position. Explicit ``pads`` / ``VALID`` only (``SAME_*`` padding: None).
    At most about ``PATCH_ROWS_PER_BATCH`` positions of the batch enter,
    every ``step``-th of each sample (offsets varying between samples).
    """
    weight = _const_tensor(node.inputs[1])
    if weight is None or len(weight.shape) != 4 or x.ndim != 4:
        return None
    if attr_str(node, "auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return None
    groups = attr_int(node, "group", 1)
    _, in_per_group, kh, kw = (int(d) for d in weight.shape)
    if groups < 1 or x.shape[1] != groups * in_per_group:
        return None
    sh, sw = attr_ints(node, "strides", None) or [1, 1]
    dh, dw = attr_ints(node, "dilations", None) or [1, 1]
    top, left, bottom, right = (attr_ints(node, "pads", None) or [0, 0, 0, 0]
                                if attr_str(node, "auto_pad", "NOTSET") == "NOTSET" else [0, 0, 0, 0])
    height = (x.shape[2] + top + bottom - dh * (kh - 1) - 1) // sh + 1
    width = (x.shape[3] + left + right - dw * (kw - 1) - 1) // sw + 1
    if height < 1 or width < 1:
        return None
    step = -(-x.shape[0] * height * width // PATCH_ROWS_PER_BATCH)   # every step-th position of each sample
    out = []
    for sample in x:   # one sample at a time: all taps of a whole batch can take gigabytes
        padded = np.pad(sample, ((0, 0), (top, bottom), (left, right)))
        taps = [padded[:, a * dh:a * dh + (height - 1) * sh + 1:sh, b * dw:b * dw + (width - 1) * sw + 1:sw]
                for a in range(kh) for b in range(kw)]
        p = np.stack(taps, axis=1).reshape(groups, in_per_group * kh * kw, height * width)   # [g, D, positions]
        out.append(np.moveaxis(p[:, :, len(out) % step::step], 2, 0))
    return np.ascontiguousarray(np.concatenate(out))


def compensable(node: ir.Node, index: int, weights: np.ndarray) -> bool:
    """Error compensation applies to Gemm and to Conv (1x1 on the channels; 2-D kernels, grouped too, on patches)."""
    if index != 1 or (node.op_type == "Gemm" and attr_int(node, "transA", 0)):
        return False
    if node.op_type == "Gemm":
        return weights.ndim == 2
    return node.op_type == "Conv" and (_pointwise(node) or weights.ndim == 4)


# E[x x^T] shrunk halfway to its diagonal: the calibration photos' input correlations carry only in
# part to other photos (Lite0's conv head at 5 bits, held-out output error: plain 0.049, full H 0.056, half 0.049).
COMPENSATION_SHRINKAGE = 0.5
COMPENSATION_DAMPING = 0.01   # fraction of mean(diag H) added to the diagonal (GPTQ's default) ...
# ... at least inputs / rows: H from fewer rows than inputs is singular and the feedback then fits the
# calibration samples, not the layer (EfficientNet-Lite0's classifier, 1280 inputs, 64 crops: output
# error 45x lower on the calibration crops, held-out KL 17x higher). The shrinkage fades to GPTQ's
# 1% as the rows grow and keeps only the diagonal when they are few.


def compensated_indices(node: ir.Node, weights: np.ndarray, codebook: np.ndarray, scale: np.ndarray | None,
                        second_moment: tuple[np.ndarray, int]) -> np.ndarray:
    """Indices into ``codebook`` (times ``scale``) chosen with GPTQ's error feedback.

    Minimizes ``E||(W~ - W) p||^2`` greedily: the input columns are rounded
    one at a time (each row to its nearest codebook value times the row's
    scale) and each column's error is spread over the columns not yet
    rounded, weighted by the Cholesky factor of ``H^-1``, ``H = E[p p^T]``
    over ``rows`` input vectors (``second_moment = (H[groups, D, D], rows)``;
    Frantar et al., GPTQ). ``p`` is the input vector of Gemm / 1x1 Conv, or
    the ``Ci/g x kh x kw`` patch of a Conv group (depthwise: one channel's
    window), each group with its own ``H`` and its own output rows. The
    codebook and scales stay k-means'; only the assignment changes.
    ALGORITHMS.md 1.5 assigns each weight to its nearest centroid; this
    lowers the layer's output error at the same bits.
    """
    transposed = node.op_type == "Gemm" and not attr_int(node, "transB", 0)
    matrix = np.asarray(weights, np.float64).reshape(weights.shape[0], -1)
    matrix = matrix.T if transposed else matrix                                 # [out, D * 1 group]
    row_scale = (np.ones(matrix.shape[0]) if scale is None else
                 np.asarray(scale, np.float64).reshape(-1))
    row_scale = np.where(row_scale > 0, row_scale, 1.0)
    h, rows = np.array(second_moment[0], np.float64), second_moment[1]
    groups, width = h.shape[0], h.shape[-1]
    if matrix.shape[1] != width or matrix.shape[0] % groups:
        return _nearest(matrix / row_scale[:, None], np.asarray(codebook, np.float64)).reshape(weights.shape)
    diagonal = np.arange(width)
    dead = h[:, diagonal, diagonal] <= 0
    h[:, diagonal, diagonal] = np.where(dead, 1.0, h[:, diagonal, diagonal])
    h = ((1.0 - COMPENSATION_SHRINKAGE) * h
         + COMPENSATION_SHRINKAGE * (np.eye(width) * h[:, diagonal, diagonal][:, None, :]))
    h[:, diagonal, diagonal] += (max(COMPENSATION_DAMPING, width / rows)
                                 * h[:, diagonal, diagonal].mean(axis=1))[:, None]
    try:
        upper = np.swapaxes(np.linalg.cholesky(np.linalg.inv(h)), 1, 2)          # H^-1 = U^T U, per group
    except np.linalg.LinAlgError:
        upper = None   # not positive definite even damped: plain nearest-centroid assignment
    # Inputs never active on the calibration data keep their weights (rounded to the nearest value):
    # GPTQ zeroes them, but other inputs can switch them on (EfficientNet-Lite0's last project conv:
    # held-out output error 0.06 -> 0.32 with them zeroed).
    work = matrix.reshape(groups, -1, width).copy()                              # [g, out/g, D]
    row_scale = row_scale.reshape(groups, -1)
    values = np.asarray(codebook, np.float64)
    out = np.empty(work.shape, np.uint8)
    for i in range(width):
        index = _nearest(work[:, :, i] / row_scale, values)
        out[:, :, i] = index
        if upper is not None:
            error = (work[:, :, i] - values[index] * row_scale) / upper[:, i, i][:, None]
            work[:, :, i + 1:] -= error[:, :, None] * upper[:, None, i, i + 1:]
    out = out.reshape(matrix.shape)
    if transposed:
        out = out.T
    return np.ascontiguousarray(out).reshape(weights.shape)


def _nearest(values: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """Index of the nearest entry of a sorted codebook for each value (uint8)."""
    mid = (codebook[:-1] + codebook[1:]) / 2
    return np.searchsorted(mid, values).astype(np.uint8)


def wants_bias_correction(site: Site, params: dict[str, Any], ctx: ApplyContext) -> bool:
    """The decision's ``bias_correction`` if given, else on when calibration data is there (and not weight-only)."""
    flag = params.get("bias_correction")
    if flag is True and ctx.activations is None:
        raise PycompressError(f"site '{site.name}': bias_correction needs calibration data; pass --data")
    if flag is not None:
        return flag
    return ctx.activations is not None and bool(ctx.options.get("data_aware", True))


def correct_bias(model: ir.Model, node: ir.Node, shift: np.ndarray) -> None:
    """Subtract ``shift`` from the node's bias (a new initializer; a bias is added if missing)."""
    position = 2
    bias_value = node.inputs[position] if len(node.inputs) > position else None
    scale = attr_float(node, "beta", 1.0) if node.op_type == "Gemm" else 1.0
    dtype = node.outputs[0].dtype.numpy() if node.outputs[0].dtype is not None else np.float32
    old = constant_array(bias_value) if bias_value is not None else np.zeros(shift.shape, dtype)
    if old is None or scale == 0.0 or old.size not in (1, shift.size):
        return  # a computed or oddly shaped bias: leave it alone
    new = (np.broadcast_to(old, shift.shape).astype(np.float64) - shift / scale).astype(old.dtype)
    base = bias_value.name if bias_value is not None else f"{node.name}_bias"
    corrected = add_initializer(model, f"{base}_corrected", new)
    if bias_value is None:
        node.resize_inputs(position + 1)
    node.replace_input_with(position, corrected)
    if bias_value is not None:
        remove_if_unused(model.graph, bias_value)


REWRITE = WeightSharing()
