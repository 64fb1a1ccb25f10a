"""``lowrank_conv``: factor a k x k convolution to rank K (ALGORITHMS.md 1.2, 1.3).

Sites are 2-D ``Conv`` nodes with ``group = 1`` and a kernel larger than 1x1
(constant weight ``W``: ``Co x Ci x kh x kw``). 1x1 convs are matrices and
belong to ``svd``; grouped and depthwise convs are listed as not applicable
(there is no cross-channel matrix to factor).

Two structures (parameter ``structure``):

- ``tai`` (default; Tai et al.): ``M[(c, y), (n, x)] = W[n, c, y, x]``
  (``(Ci*kh) x (Co*kw)``), ``M ~= U_K S_K V_K^T``. Vertical conv ``Ci -> K``,
  kernel ``kh x 1``, ``V[k, c, y, 0] = U[(c, y), k] sqrt(s_k)``, strides
  ``(sh, 1)``, pads ``(ph, 0, ph', 0)``, dilations ``(dh, 1)``, no bias;
  horizontal conv ``K -> Co``, kernel ``1 x kw``,
  ``H[n, k, 0, x] = V^T[k, (n, x)] sqrt(s_k)``, strides ``(1, sw)``, pads
  ``(0, pw, 0, pw')``, dilations ``(1, dw)``, the original bias. ``auto_pad``
  SAME_* / VALID is kept on both convs: per axis it pads exactly as the
  original. Parameters ``K (Ci kh + Co kw)``, full rank
  ``min(Ci kh, Co kw)``, ``r_max = floor(Ci kh Co kw / (Ci kh + Co kw))``.
  Nodes ``<orig>/lowrank_v`` and ``<orig>/lowrank_h``.
- ``channel`` (Zhang et al.): a ``kh x kw`` conv ``Ci -> K`` (all original
  attributes) followed by a 1x1 conv ``K -> Co`` with the bias. Weight-only it
  is the SVD of ``W`` reshaped to ``Co x (Ci kh kw)``; data-aware
  (``data_aware: true``, which implies this structure) the first conv is
  ``U_K^T W`` and the second ``U_K`` with ``U_K`` the top-K eigenvectors of
  the covariance of the conv's output channels, bias
  ``b' = b P + mean (I - P)`` (uncentred second moment and no bias for a
  bias-free conv). Parameters ``K (Ci kh kw + Co)``, full rank
  ``min(Co, Ci kh kw)``. Nodes ``<orig>/lowrank_a`` and ``<orig>/lowrank_b``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from pycompress.errors import PycompressError
from pycompress.ir import attr_int, attr_ints, attr_str, constant_array, node_by_name, node_display_name, shape_of
from pycompress.plan import LayerDecision
from pycompress.rewrites import factorization as fz
from pycompress.rewrites.base import (ApplyContext, ParamSpec, RefitSpec, Rewrite, SearchRange, SearchSettings, Site,
                                      param_specs)

STRUCTURES = ("tai", "channel")


@dataclass
class ConvLayer:
    node: ir.Node
    weight: np.ndarray          # Co x Ci x kh x kw, float64
    bias: np.ndarray | None     # Co, float64
    dtype: np.dtype
    in_hw: tuple[int | None, int | None] | None   # input spatial size, if known
    out_hw: tuple[int | None, int | None] | None  # output spatial size, if known

    @property
    def co(self) -> int:
        return self.weight.shape[0]

    @property
    def ci(self) -> int:
        return self.weight.shape[1]

    @property
    def kernel(self) -> tuple[int, int]:
        return self.weight.shape[2], self.weight.shape[3]

    def tai_matrix(self) -> np.ndarray:
        """``M[(c, y), (n, x)] = W[n, c, y, x]``, ``(Ci kh) x (Co kw)``."""
        co, ci, kh, kw = self.weight.shape
        return self.weight.transpose(1, 2, 0, 3).reshape(ci * kh, co * kw)

    def channel_matrix(self) -> np.ndarray:
        """``W`` as ``(Ci kh kw) x Co`` (the layer's matrix on im2col rows)."""
        return self.weight.reshape(self.co, -1).T

    def matrix(self, structure: str) -> np.ndarray:
        return self.tai_matrix() if structure == "tai" else self.channel_matrix()


def _hw(value: ir.Value) -> tuple[int | None, int | None] | None:
    shape = shape_of(value)
    return None if shape is None or len(shape) != 4 else (shape[2], shape[3])


def conv_layer(node: ir.Node) -> ConvLayer | str:
    """The conv's factorable view, or why ``lowrank_conv`` does not apply."""
    group = attr_int(node, "group", 1)
    w = constant_array(node.inputs[1])
    if w is None:
        return "conv weight is not a constant"
    if w.dtype.kind != "f":
        return f"conv weight has dtype {w.dtype} (not float)"
    if w.ndim != 4:
        return f"{w.ndim - 2}-D convolution (the vertical/horizontal split is for 2-D)"
    if group != 1:
        kind = "depthwise" if group == w.shape[0] and w.shape[1] == 1 else "grouped"
        return f"{kind} conv (group={group}): no cross-channel matrix to factor"
    if w.shape[2] == 1 and w.shape[3] == 1:
        return "1x1 conv: a matrix, factored by action 'svd'"
    bias_value = node.inputs[2] if len(node.inputs) > 2 else None
    b = constant_array(bias_value)
    if bias_value is not None and b is None:
        return "conv bias is not a constant"
    return ConvLayer(node, w.astype(np.float64), None if b is None else b.astype(np.float64), w.dtype,
                     _hw(node.inputs[0]), _hw(node.outputs[0]))


def _known(*dims: int | None) -> bool:
    return all(d is not None for d in dims)


def _structure_info(layer: ConvLayer) -> dict[str, Any]:
    co, ci, (kh, kw) = layer.co, layer.ci, layer.kernel
    out_hw = layer.out_hw
    macs = None
    if out_hw is not None and _known(*out_hw):
        macs = out_hw[0] * out_hw[1] * co * ci * kh * kw
    return {
        "op": "Conv", "in_channels": ci, "out_channels": co, "kernel": [kh, kw],
        "full_rank": min(ci * kh, co * kw), "r_max": fz.r_max(ci * kh, co * kw),
        "channel_full_rank": min(co, ci * kh * kw), "channel_r_max": fz.r_max(ci * kh * kw, co),
        "params": co * ci * kh * kw + (0 if layer.bias is None else co), "macs": macs,
    }


def factored_cost(layer: ConvLayer, structure: str, rank: int) -> tuple[int, int | None]:
    """(params, MACs) of the factored conv: Tai ``K (Ci kh + Co kw)``, channel ``K (Ci kh kw + Co)``."""
    co, ci, (kh, kw) = layer.co, layer.ci, layer.kernel
    bias = 0 if layer.bias is None else co
    out_hw, in_hw = layer.out_hw, layer.in_hw
    if structure == "tai":
        params = rank * (ci * kh + co * kw) + bias
        # The vertical conv keeps the input width (no stride / pad along x).
        ok = out_hw is not None and in_hw is not None and _known(*out_hw, in_hw[1])
        macs = (out_hw[0] * in_hw[1] * rank * ci * kh + out_hw[0] * out_hw[1] * co * rank * kw) if ok else None
    else:
        params = rank * (ci * kh * kw + co) + bias
        ok = out_hw is not None and _known(*out_hw)
        macs = out_hw[0] * out_hw[1] * rank * (ci * kh * kw + co) if ok else None
    return params, macs


def _site_for(node: ir.Node) -> Site:
    name = node_display_name(node)
    layer = conv_layer(node)
    if isinstance(layer, str):
        return Site(name, "lowrank_conv", [name], ok=False, reason=layer, info={"op": "Conv"})
    info = _structure_info(layer)
    if not node.name:
        return Site(name, "lowrank_conv", [name], ok=False,
                    reason="node has no name (a plan addresses nodes by name)", info=info)
    return Site(name, "lowrank_conv", [name], info=info)


def _structure(params: dict[str, Any]) -> str:
    return params.get("structure") or ("channel" if params.get("data_aware") else "tai")


class LowRankConv(Rewrite):
    action = "lowrank_conv"
    summary = "factor a k x k Conv (group=1) into a rank-K pair (Tai's vertical+horizontal, or k x k + 1x1)"
    params = param_specs(
        ParamSpec("rank", int, "K, the number of intermediate channels (1 .. full rank of the structure)",
                  low=1, high="full_rank", required=True, searchable=True, checked_by_rewrite=True),
        ParamSpec("structure", str, "'tai' (kh x 1 then 1 x kw) or 'channel' (kh x kw to K channels then 1x1)",
                  default="tai", choices=STRUCTURES, nullable=True, checked_by_rewrite=True),
        ParamSpec("data_aware", bool, "true: fit the 'channel' structure to the conv's outputs on calibration "
                  "data (needs --data; implies structure 'channel'); absent: data-aware when the apply context "
                  "asks and the structure is 'channel'", nullable=True),
    )
    # Factorizations run after pruning (which changes shapes), before sharing / quantization.
    order = 50
    changes = fz.CHANGES
    excluded_by = fz.EXCLUDED_BY
    created_names = ("/lowrank_a", "/lowrank_b", "/lowrank_v", "/lowrank_h")

    def sites(self, model: ir.Model) -> list[Site]:
        return [_site_for(node) for node in model.graph if node.op_type == "Conv"]

    def search_dimension(self, model: ir.Model, site: Site, settings: SearchSettings) -> SearchRange | str:
        """Ranks ``1..r_max`` of the default structure (Tai's)."""
        return fz.rank_range(site)

    def refit_spec(self, site: str, result: dict[str, Any]) -> RefitSpec:
        spec = super().refit_spec(site, result)
        if result.get("structure") == "tai":
            spec.notes.append(f"{site}: Tai's vertical/horizontal pair is not refitted")
        return spec

    def site(self, model: ir.Model, name: str) -> Site:
        try:
            node = node_by_name(model, name)
        except PycompressError:
            raise PycompressError(f"site '{name}': no node of that name in the model") from None
        if node.op_type != "Conv":
            hint = " (use 'svd' for Gemm / MatMul)" if node.op_type in ("Gemm", "MatMul") else ""
            raise PycompressError(f"site '{name}': 'lowrank_conv' applies to Conv, not to {node.op_type}{hint}")
        return _site_for(node)

    def check_params(self, site: Site, params: dict[str, Any]) -> None:
        super().check_params(site, params)
        data_aware, structure = params.get("data_aware"), params.get("structure")
        if structure is not None and structure not in STRUCTURES:  # wording older than the specs (tests match it)
            raise PycompressError(f"site '{site.name}': structure must be one of {list(STRUCTURES)}, "
                                  f"got {structure!r}")
        # Which structure's full rank bounds the rank depends on the other params: checked here.
        if data_aware and structure == "tai":
            raise PycompressError(f"site '{site.name}': data_aware needs structure 'channel' "
                                  "(the output projection gives a k x k conv to K channels + a 1x1 conv)")
        if _structure(params) == "tai":
            fz.check_rank(site, params, site.info["full_rank"], "Tai: min(Ci*kh, Co*kw)")
        else:
            fz.check_rank(site, params, site.info["channel_full_rank"], "channel: min(Co, Ci*kh*kw)")

    def apply(self, model: ir.Model, decision: LayerDecision, ctx: ApplyContext) -> dict[str, Any]:
        site, skipped = fz.prepare(self, model, decision, ctx)
        if skipped:
            return skipped
        params = decision.params
        layer = conv_layer(node_by_name(model, decision.site))
        assert not isinstance(layer, str)
        rank, structure = int(params["rank"]), _structure(params)
        result: dict[str, Any] = {"rank": rank, "structure": structure}
        if structure == "tai":
            a, b, s = fz.truncated_svd(layer.tai_matrix(), rank)
            nodes = _emit_tai(model, layer, site.name, a, b)
            result.update(data_aware=False, weight_energy_kept=fz.energy_kept(s, rank))
            if params.get("data_aware") is None and fz.wants_data_aware(params, ctx):
                result["note"] = "weight-only: data-aware low rank needs structure 'channel'"
        else:
            w = layer.channel_matrix()  # (Ci kh kw) x Co
            a, b, new_bias, facts = fz.factor_weight(w, rank, site=site, ctx=ctx, params=params,
                                                     output=layer.node.outputs[0].name, features=layer.co,
                                                     axis=1, bias=layer.bias)
            result.update(facts)
            nodes = _emit_channel(model, layer, site.name, a, b, new_bias)
        output = layer.node.outputs[0].name
        fz.replace_node(model, layer.node, nodes)
        if structure != "tai":   # Tai's vertical/horizontal pair is not a product of two matrices on the same rows
            result["refit"] = [fz.refit_spec(output, rank)]
        params_after, macs_after = factored_cost(layer, structure, rank)
        full = site.info["full_rank"] if structure == "tai" else site.info["channel_full_rank"]
        limit = site.info["r_max"] if structure == "tai" else site.info["channel_r_max"]
        result.update(full_rank=full, r_max=limit, params_before=site.info["params"], params_after=params_after,
                      macs_before=site.info["macs"], macs_after=macs_after, nodes=[n.name for n in nodes])
        return result

    def starting_decision(self, model: ir.Model, site: Site, **options: Any) -> LayerDecision | None:
        """Rank keeping ``energy`` (default 0.9) of the structure's spectral energy, if below its r_max.

        Tai's structure, or the channel structure with ``data_aware=True``
        (the rank is then chosen on the weights, like the weight-only plan).
        """
        if not site.ok:
            return None
        energy = float(options.get("energy") or 0.9)
        structure = "channel" if options.get("data_aware") else "tai"
        layer = conv_layer(node_by_name(model, site.name))
        assert not isinstance(layer, str)
        s = fz.singular_values(layer.matrix(structure))
        rank = fz.energy_rank(s, energy)
        limit = site.info["r_max"] if structure == "tai" else site.info["channel_r_max"]
        if rank >= limit:
            site.info["plan_note"] = (f"{energy:.0%} of the spectral energy needs rank {rank} >= r_max {limit}: "
                                      f"factoring would not shrink the layer")
            return None
        params: dict[str, Any] = {"rank": rank}
        if structure == "channel":
            params.update(structure="channel", data_aware=True)
        after, _ = factored_cost(layer, structure, rank)
        note = (f"keeps {fz.energy_kept(s, rank):.1%} of the weight spectral energy ({structure}); "
                f"params {site.info['params']} -> {after}")
        return LayerDecision(site.name, self.action, params, note)


def _spatial(node: ir.Node) -> tuple[list[int], list[int], list[int] | None, str]:
    strides = attr_ints(node, "strides", None) or [1, 1]
    dilations = attr_ints(node, "dilations", None) or [1, 1]
    pads = attr_ints(node, "pads", None)
    auto_pad = attr_str(node, "auto_pad", "NOTSET")
    return strides, dilations, pads, auto_pad


def _padding_attrs(pads_hw: list[int], auto_pad: str) -> list[ir.Attr]:
    """``pads`` for NOTSET, else the same ``auto_pad`` (per axis it pads like the original)."""
    if auto_pad in ("", "NOTSET"):
        return [ir.AttrInt64s("pads", pads_hw)]
    return [ir.AttrString("auto_pad", auto_pad)]


def _emit_tai(model: ir.Model, layer: ConvLayer, name: str, a: np.ndarray, b: np.ndarray) -> list[ir.Node]:
    """Vertical ``kh x 1`` conv (Ci -> K) then horizontal ``1 x kw`` conv (K -> Co, bias)."""
    node, dtype = layer.node, layer.dtype
    ir_dtype = node.outputs[0].dtype
    co, ci, (kh, kw) = layer.co, layer.ci, layer.kernel
    rank = a.shape[1]
    strides, dilations, pads, auto_pad = _spatial(node)
    pads = pads or [0, 0, 0, 0]
    # V[k, c, y, 0] = U[(c, y), k] sqrt(s_k);  H[n, k, 0, x] = V^T[k, (n, x)] sqrt(s_k)
    vertical = a.T.reshape(rank, ci, kh, 1)
    horizontal = b.reshape(rank, co, kw).transpose(1, 0, 2).reshape(co, rank, 1, kw)
    wv = fz.weight(model, f"{name}/lowrank_v/weight", vertical, dtype)
    first = fz.new_node(model, f"{name}/lowrank_v", "Conv", [node.inputs[0], wv], [
        ir.AttrInt64s("kernel_shape", [kh, 1]), ir.AttrInt64s("strides", [strides[0], 1]),
        ir.AttrInt64s("dilations", [dilations[0], 1]), *_padding_attrs([pads[0], 0, pads[2], 0], auto_pad)],
        ir_dtype)
    wh = fz.weight(model, f"{name}/lowrank_h/weight", horizontal, dtype)
    inputs = [first.outputs[0], wh] + ([node.inputs[2]] if layer.bias is not None else [])
    second = fz.new_node(model, f"{name}/lowrank_h", "Conv", inputs, [
        ir.AttrInt64s("kernel_shape", [1, kw]), ir.AttrInt64s("strides", [1, strides[1]]),
        ir.AttrInt64s("dilations", [1, dilations[1]]), *_padding_attrs([0, pads[1], 0, pads[3]], auto_pad)],
        ir_dtype)
    return [first, second]


def _emit_channel(model: ir.Model, layer: ConvLayer, name: str, a: np.ndarray, b: np.ndarray,
                  new_bias: np.ndarray | None) -> list[ir.Node]:
    """``kh x kw`` conv (Ci -> K, original attributes) then 1x1 conv (K -> Co, bias)."""
    node, dtype = layer.node, layer.dtype
    ir_dtype = node.outputs[0].dtype
    co, ci, (kh, kw) = layer.co, layer.ci, layer.kernel
    rank = a.shape[1]
    kept = [attr for key, attr in node.attributes.items() if key != "group"]
    wa = fz.weight(model, f"{name}/lowrank_a/weight", a.T.reshape(rank, ci, kh, kw), dtype)
    first = fz.new_node(model, f"{name}/lowrank_a", "Conv", [node.inputs[0], wa], kept, ir_dtype)
    wb = fz.weight(model, f"{name}/lowrank_b/weight", b.T.reshape(co, rank, 1, 1), dtype)
    inputs = [first.outputs[0], wb]
    if layer.bias is not None:
        inputs.append(node.inputs[2] if new_bias is None else fz.weight(model, f"{name}/lowrank_b/bias", new_bias,
                                                                        dtype))
    second = fz.new_node(model, f"{name}/lowrank_b", "Conv", inputs, [ir.AttrInt64s("kernel_shape", [1, 1])],
                         ir_dtype)
    return [first, second]


__all__ = ["LowRankConv", "REWRITE", "conv_layer", "factored_cost"]

REWRITE = LowRankConv()
