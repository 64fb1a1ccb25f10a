"""``svd``: factor a fully-connected layer to rank K (ALGORITHMS.md 1.1, 1.3).

A site is a layer that is a matrix product with a constant weight:

- ``Gemm``: ``Y = alpha * op(A) @ op(B) + beta * C`` (any transA/transB,
  with or without C); the weight is ``W = alpha * op(B)`` (``in x out``);
- ``MatMul`` with a constant 2-D operand on either side: ``X @ W`` (``X`` is
  ``[..., in]``, e.g. ``[batch, seq, hidden]``) or ``W' @ X`` (``W = W'^T``,
  ``X`` is ``[..., in, n]``);
- a 1x1 ``Conv`` with ``group = 1``: ``W[c, n] = weight[n, c, 0, 0]``. 1x1
  convolutions live here, not in ``lowrank_conv``: they are matrices, so
  ALGORITHMS.md 1.1 applies as is (two 1x1 convs; the first keeps the
  strides and pads, the second carries the bias).

Weight-only: ``W ~= A @ B`` with ``A = U_K sqrt(S_K)`` (``in x K``) and
``B = sqrt(S_K) V_K^T`` (``K x out``); parameters ``in*out -> K*(in+out)``,
``r_max = floor(in*out / (in+out))``. Emitted as two nodes named
``<orig>/svd_a`` (input -> K) and ``<orig>/svd_b`` (K -> out, with the bias).

Data-aware (``data_aware: true``, or the context asks for it and has
calibration data): ``A = W U_K``, ``B = U_K^T`` with ``U_K`` the top-K
eigenvectors of ``cov(Y)`` of the layer's outputs, bias
``b' = b P + mean(Y) (I - P)``, ``P = U_K U_K^T`` (reduced-rank regression;
never a larger output error on the calibration data than weight-only SVD).
Layers without a bias use the uncentred second moment instead, so no bias
is added and the structure stays that of the weight-only SVD.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from pycompress.errors import PycompressError
from pycompress.ir import (as_matrix, attr_float, attr_int, constant_array, matmul_weight_input, node_by_name,
                           node_display_name, opset_version, shape_of)
from pycompress.plan import LayerDecision
from pycompress.rewrites import factorization as fz
from pycompress.rewrites.base import ApplyContext, ParamSpec, Rewrite, SearchRange, SearchSettings, Site, param_specs

_OPS = ("Gemm", "MatMul", "Conv")


@dataclass
class MatrixLayer:
    """A layer seen as ``Y = X W + b`` with ``W`` ``in x out`` (see module docstring)."""

    node: ir.Node
    kind: str                  # "gemm" | "matmul" (X @ W) | "matmul_left" (W' @ X) | "conv1x1"
    matrix: np.ndarray         # W, in x out, float64, alpha folded in
    bias: np.ndarray | None    # the additive term as it broadcasts onto Y (beta folded in), float64
    dtype: np.dtype            # the weight's dtype (the factors are stored in it)
    feature_axis: int          # axis of Y holding the `out` features
    rows: int | None           # output rows per inference (symbolic dims count 1), None if unknown

    @property
    def shape(self) -> tuple[int, int]:
        return self.matrix.shape

    @property
    def full_rank(self) -> int:
        return min(self.shape)

    @property
    def bias_params(self) -> int:
        return 0 if self.bias is None or self.bias.ndim == 0 else int(self.bias.size)


def _rows(value: ir.Value, drop: tuple[int, ...]) -> int | None:
    shape = shape_of(value)
    if shape is None:
        return None
    keep = [d for i, d in enumerate(shape) if i not in {a % len(shape) for a in drop}]
    return math.prod(1 if d is None else d for d in keep)


def _float_weight(array: np.ndarray | None) -> bool:
    return array is not None and array.dtype.kind == "f"


def _kernel_shape(node: ir.Node) -> list[int] | None:
    attr = node.attributes.get("kernel_shape")
    if attr is not None:
        return [int(v) for v in attr.value]
    shape = shape_of(node.inputs[1]) if len(node.inputs) > 1 else None
    return None if shape is None or None in shape else list(shape[2:])


def is_pointwise_conv(node: ir.Node) -> bool:
    """A Conv whose kernel is all ones (any spatial rank): a matrix for ``svd``."""
    kernel = _kernel_shape(node)
    return node.op_type == "Conv" and kernel is not None and len(kernel) > 0 and all(k == 1 for k in kernel)


def matrix_layer(node: ir.Node) -> MatrixLayer | str:
    """The node's matrix view, or why it has none."""
    out = node.outputs[0]
    if node.op_type == "Gemm":
        b = constant_array(node.inputs[1])
        if not _float_weight(b):
            return "weight B is not a constant float tensor"
        if b.ndim != 2:
            return f"weight B is {b.ndim}-D"
        c_value = node.inputs[2] if len(node.inputs) > 2 else None
        c = constant_array(c_value)
        if c_value is not None and c is None:
            return "bias C is not a constant"
        w = as_matrix(node, b.astype(np.float64)) * attr_float(node, "alpha", 1.0)
        bias = None if c is None else c.astype(np.float64) * attr_float(node, "beta", 1.0)
        return MatrixLayer(node, "gemm", w, bias, b.dtype, 1, _rows(out, (1,)))
    if node.op_type == "MatMul":
        index = matmul_weight_input(node)
        if index is not None:
            w = constant_array(node.inputs[index])
            if index == 1:
                return MatrixLayer(node, "matmul", as_matrix(node, w.astype(np.float64), index), None, w.dtype, -1,
                                   _rows(out, (-1,)))
            return MatrixLayer(node, "matmul_left", as_matrix(node, w.astype(np.float64), index), None, w.dtype, -2,
                               _rows(out, (-2,)))
        right, left = constant_array(node.inputs[1]), constant_array(node.inputs[0])
        const = right if right is not None else left
        if const is None:
            return "both operands are activations (no constant weight)"
        if not _float_weight(const):
            return f"constant operand has dtype {const.dtype} (not float)"
        return f"constant operand is {const.ndim}-D (needs a 2-D weight)"
    if node.op_type == "Conv":
        if attr_int(node, "group", 1) != 1:
            return f"grouped conv (group={attr_int(node, 'group', 1)}): not a single matrix"
        w = constant_array(node.inputs[1])
        if not _float_weight(w):
            return "conv weight is not a constant float tensor"
        c = constant_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        if len(node.inputs) > 2 and node.inputs[2] is not None and c is None:
            return "conv bias is not a constant"
        matrix = as_matrix(node, w.astype(np.float64))
        bias = None if c is None else c.astype(np.float64)
        return MatrixLayer(node, "conv1x1", matrix, bias, w.dtype, 1, _rows(out, (1,)))
    return f"{node.op_type} is not a matrix product"


def _site_for(node: ir.Node) -> Site:
    name = node_display_name(node)
    layer = matrix_layer(node)
    if isinstance(layer, str):
        return Site(name, "svd", [name], ok=False, reason=layer, info={"op": node.op_type})
    n_in, n_out = layer.shape
    info = {
        "op": node.op_type, "kind": layer.kind, "in": n_in, "out": n_out,
        "full_rank": layer.full_rank, "r_max": fz.r_max(n_in, n_out),
        "params": n_in * n_out + layer.bias_params,
        "macs": None if layer.rows is None else layer.rows * n_in * n_out,
    }
    if not node.name:
        return Site(name, "svd", [name], ok=False, reason="node has no name (a plan addresses nodes by name)",
                    info=info)
    return Site(name, "svd", [name], info=info)


class SVD(Rewrite):
    action = "svd"
    summary = "factor a Gemm / MatMul with a constant weight / 1x1 Conv into two rank-K layers"
    params = param_specs(
        ParamSpec("rank", int, "K, the number of kept components (1 .. min(in, out)); below "
                  "r_max = floor(in*out/(in+out)) the layer shrinks",
                  low=1, high="full_rank", required=True, searchable=True, checked_by_rewrite=True),
        ParamSpec("data_aware", bool, "true: project the layer's outputs on their top-K principal directions "
                  "(needs --data); false: weight-only SVD; absent: follow the apply context", nullable=True),
    )
    # Factorizations run after pruning (which changes shapes), before sharing / quantization.
    order = 50
    changes = fz.CHANGES
    excluded_by = fz.EXCLUDED_BY
    created_names = ("/svd_a", "/svd_b")

    def sites(self, model: ir.Model) -> list[Site]:
        return [_site_for(node) for node in model.graph
                if node.op_type in ("Gemm", "MatMul") or (node.op_type == "Conv" and is_pointwise_conv(node))]

    def search_dimension(self, model: ir.Model, site: Site, settings: SearchSettings) -> SearchRange | str:
        """Ranks ``1..r_max``, placed on the coordinate by the weight energy they discard (``rank_positions``)."""
        found = fz.rank_range(site)
        if isinstance(found, str):
            return found
        return SearchRange(found.param, found.kind, found.high, positions=lambda: rank_positions(model, site.name,
                                                                                                   found.high))

    def site(self, model: ir.Model, name: str) -> Site:
        try:
            node = node_by_name(model, name)
        except PycompressError:
            raise PycompressError(f"site '{name}': no node of that name in the model") from None
        if node.op_type not in _OPS or (node.op_type == "Conv" and not is_pointwise_conv(node)):
            hint = " (use 'lowrank_conv' for k x k convs)" if node.op_type == "Conv" else ""
            raise PycompressError(f"site '{name}': 'svd' applies to Gemm, MatMul or 1x1 Conv, not to "
                                  f"{node.op_type}{hint}")
        return _site_for(node)

    def check_params(self, site: Site, params: dict[str, Any]) -> None:
        super().check_params(site, params)
        # The rank's bound is this layer's: its messages predate the specs (tests match them).
        fz.check_rank(site, params, site.info["full_rank"])

    def apply(self, model: ir.Model, decision: LayerDecision, ctx: ApplyContext) -> dict[str, Any]:
        site, skipped = fz.prepare(self, model, decision, ctx)
        if skipped:
            return skipped
        layer = matrix_layer(node_by_name(model, decision.site))
        assert not isinstance(layer, str)
        rank = int(decision.params["rank"])
        w, n_out = layer.matrix, layer.shape[1]
        result: dict[str, Any] = {"rank": rank, "r_max": site.info["r_max"], "full_rank": layer.full_rank}
        bias = None if layer.bias is None else _bias_over_features(layer.bias, n_out)
        a, b, new_bias, facts = fz.factor_weight(w, rank, site=site, ctx=ctx, params=decision.params,
                                                 output=layer.node.outputs[0].name, features=n_out,
                                                 axis=layer.feature_axis, bias=bias)
        result.update(facts)
        nodes = _emit(model, layer, site.name, a, b, new_bias)
        output = layer.node.outputs[0].name
        fz.replace_node(model, layer.node, nodes)
        n_in, n_out = layer.shape
        bias_after = layer.bias_params if new_bias is None else int(new_bias.size)
        result.update(
            params_before=site.info["params"], params_after=rank * (n_in + n_out) + bias_after,
            macs_before=site.info["macs"],
            macs_after=None if layer.rows is None else layer.rows * rank * (n_in + n_out),
            nodes=[n.name for n in nodes], refit=[fz.refit_spec(output, rank)])
        return result

    def starting_decision(self, model: ir.Model, site: Site, **options: Any) -> LayerDecision | None:
        """Rank keeping ``energy`` (default 0.9) of the weight's spectral energy, if below r_max."""
        if not site.ok:
            return None
        energy = float(options.get("energy") or 0.9)
        layer = matrix_layer(node_by_name(model, site.name))
        assert not isinstance(layer, str)
        s = fz.singular_values(layer.matrix)
        rank = fz.energy_rank(s, energy)
        n_in, n_out = layer.shape
        if rank >= site.info["r_max"]:
            site.info["plan_note"] = (f"{energy:.0%} of the spectral energy needs rank {rank} >= r_max "
                                      f"{site.info['r_max']}: factoring would not shrink the layer")
            return None
        params: dict[str, Any] = {"rank": rank}
        if options.get("data_aware"):
            params["data_aware"] = True
        after = rank * (n_in + n_out) + layer.bias_params
        note = (f"keeps {fz.energy_kept(s, rank):.1%} of the weight spectral energy; "
                f"params {site.info['params']} -> {after}")
        return LayerDecision(site.name, self.action, params, note)


def _bias_over_features(bias: np.ndarray, features: int) -> np.ndarray:
    """The bias with its last axis spanning the output features (scalar / ``[M, 1]`` C broadcast)."""
    if bias.ndim == 0:
        return np.full(features, float(bias))
    return bias if bias.shape[-1] == features else np.broadcast_to(bias, bias.shape[:-1] + (features,))


def _emit(model: ir.Model, layer: MatrixLayer, name: str, a: np.ndarray, b: np.ndarray,
          new_bias: np.ndarray | None) -> list[ir.Node]:
    """The two nodes computing ``(X A) B + bias`` in the original layer's layout."""
    node, dtype = layer.node, layer.dtype
    ir_dtype = node.outputs[0].dtype
    x = node.inputs[0] if layer.kind != "matmul_left" else node.inputs[1]
    if layer.kind == "gemm":
        wa = fz.weight(model, f"{name}/svd_a/weight", a, dtype)
        if attr_int(node, "transA", 0):
            inputs = [x, wa]
            if opset_version(model) < 11:  # C became optional in opset 11
                inputs.append(fz.weight(model, f"{name}/svd_a/zero", np.zeros((), dtype), dtype))
            first = fz.new_node(model, f"{name}/svd_a", "Gemm", inputs, [ir.AttrInt64("transA", 1)], ir_dtype)
        else:
            first = fz.new_node(model, f"{name}/svd_a", "MatMul", [x, wa], dtype=ir_dtype)
        wb = fz.weight(model, f"{name}/svd_b/weight", b, dtype)
        h = first.outputs[0]
        if layer.bias is None:
            second = fz.new_node(model, f"{name}/svd_b", "MatMul", [h, wb], dtype=ir_dtype)
        elif new_bias is None:  # the original C and beta, untouched
            attrs = [ir.AttrFloat32("beta", attr_float(node, "beta", 1.0))]
            second = fz.new_node(model, f"{name}/svd_b", "Gemm", [h, wb, node.inputs[2]], attrs, ir_dtype)
        else:
            c = fz.weight(model, f"{name}/svd_b/bias", new_bias, dtype)
            second = fz.new_node(model, f"{name}/svd_b", "Gemm", [h, wb, c], dtype=ir_dtype)
        return [first, second]
    if layer.kind == "matmul":
        wa = fz.weight(model, f"{name}/svd_a/weight", a, dtype)
        first = fz.new_node(model, f"{name}/svd_a", "MatMul", [x, wa], dtype=ir_dtype)
        wb = fz.weight(model, f"{name}/svd_b/weight", b, dtype)
        return [first, fz.new_node(model, f"{name}/svd_b", "MatMul", [first.outputs[0], wb], dtype=ir_dtype)]
    if layer.kind == "matmul_left":
        # Y = W' X with W' = W^T ~= B^T A^T: apply A^T (K x in) first, then B^T (out x K).
        wa = fz.weight(model, f"{name}/svd_a/weight", a.T, dtype)
        first = fz.new_node(model, f"{name}/svd_a", "MatMul", [wa, x], dtype=ir_dtype)
        wb = fz.weight(model, f"{name}/svd_b/weight", b.T, dtype)
        return [first, fz.new_node(model, f"{name}/svd_b", "MatMul", [wb, first.outputs[0]], dtype=ir_dtype)]
    # 1x1 conv: the first conv keeps strides / pads / auto_pad (its output is the
    # original's spatial grid); the second is a plain 1x1 conv with the bias.
    ones = [1] * (constant_array(node.inputs[1]).ndim - 2)
    kept = [attr for key, attr in node.attributes.items() if key not in ("kernel_shape", "group")]
    wa = fz.weight(model, f"{name}/svd_a/weight", a.T.reshape(a.shape[1], a.shape[0], *ones), dtype)
    first = fz.new_node(model, f"{name}/svd_a", "Conv", [x, wa], [*kept, ir.AttrInt64s("kernel_shape", ones)],
                        ir_dtype)
    wb = fz.weight(model, f"{name}/svd_b/weight", b.T.reshape(b.shape[1], b.shape[0], *ones), dtype)
    inputs = [first.outputs[0], wb]
    if layer.bias is not None:
        inputs.append(node.inputs[2] if new_bias is None else fz.weight(model, f"{name}/svd_b/bias", new_bias, dtype))
    second = fz.new_node(model, f"{name}/svd_b", "Conv", inputs, [ir.AttrInt64s("kernel_shape", ones)], ir_dtype)
    return [first, second]


def rank_positions(model: ir.Model, name: str, high: int) -> tuple[float, ...] | None:
    """Coordinates of layer ``name``'s ranks ``1..high`` (``high = r_max``): 3/4 by ``log`` of the
    weight energy the rank discards (scaled to [0, 1]), 1/4 evenly spaced (so every rank keeps a
    step); None (even spacing) when that says nothing. Why: ``decisions.bo.encoding`` module doc."""
    if high < 3:
        return None
    layer = matrix_layer(node_by_name(model, name))
    if isinstance(layer, str):
        return None
    # truncated_svd's decomposition is the one every evaluation reuses (cached): computed once here.
    values = fz.truncated_svd(layer.matrix, 1)[2]
    power = values.astype(np.float64) ** 2
    total = float(power.sum())
    if total <= 0:
        return None
    discarded = np.maximum(1.0 - np.cumsum(power)[:high] / total, 1e-12)
    even = np.arange(high) / (high - 1)
    span = math.log(discarded[0] / discarded[-1])
    warped = np.log(discarded[0] / discarded) / span if span > 1e-9 else even
    positions = 0.75 * warped + 0.25 * even
    positions[0], positions[-1] = 0.0, 1.0
    return tuple(float(v) for v in positions)


REWRITE = SVD()
