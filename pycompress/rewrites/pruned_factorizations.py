"""Layers a search both prunes and factors: their exact cost, and when the factorization is skipped.

A search with ``--actions prune,lowrank_conv`` (or ``prune,svd``) may cut the
input or output channels of a layer and factor the same layer. Pruning is
applied first; the factorization then works on the narrower layer:

- its rank ``K`` costs ``K (a Ci' + b Co') + c Co'`` (Tai's pair of convs:
  parameters ``K (Ci' kh + Co' kw)``; a matrix: ``K (in' + out')``; MACs
  weigh each side by its spatial size), not the product of the pruning's and
  the factorization's separate factors;
- a rank above the narrower layer's ``r_max`` no longer shrinks it and the
  search leaves the layer unfactored (``skip_rank_beyond_r_max``).

The pipeline's ``CompressionObjective.predicted_ratio`` (it hands over its
``decisions.bo.SearchSpace``; rewrites do not import the planners) used the product of the factors and
ignored the skip, so on the digits residual CNN the predicted ratio of a
point was off by 0.03 on average, 0.085 at worst: the target band (0.04) was
enforced on a number that missed it, and every rank above the pruned
``r_max`` was a different point of the search for the same model. Here the
cost is exact and ``canonical`` maps a skipped rank to the coordinate of the
untouched layer, so the GP sees one point per model.

The shape formulas are the rewrites' (``conv_lowrank.factored_cost``,
``svd``); their scale (bytes per parameter, the bias) comes from the site
costs the objective measured by applying each rewrite, so any counted cost
(parameters, packed bytes, MACs) follows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from pycompress.rewrites import get_rewrite

FACTORIZATIONS = ("lowrank_conv", "svd")


@dataclass
class PrunedFactorization:
    """One factored layer whose channels a searched pruning also cuts."""

    rank_dim: int               # index of the rank dimension in the space's dimensions
    node: str
    dim_in: int | None          # the keep dimension cutting its input channels
    dim_out: int | None         # ... its output channels
    ci: int
    co: int
    rows_per_in: int            # r_max(Ci' * rows_per_in, Co' * rows_per_out): kh, kw (Tai) or 1, 1 (matrix)
    rows_per_out: int
    a: float                    # cost per rank and kept input channel
    b: float                    # ... and kept output channel
    c: float                    # cost per kept output channel independent of the rank (the bias)
    base: float                 # the layer's cost before any change

    def widths(self, decoded: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        ci = decoded[self.dim_in][0] if self.dim_in is not None else np.full(len(decoded[0][0]), self.ci)
        co = decoded[self.dim_out][0] if self.dim_out is not None else np.full(len(decoded[0][0]), self.co)
        return ci.astype(np.int64), co.astype(np.int64)

    def skipped(self, decoded: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        """Points whose rank is above the pruned layer's r_max (the layer stays unfactored)."""
        rank, untouched = decoded[self.rank_dim]
        ci, co = self.widths(decoded)
        rows, cols = ci * self.rows_per_in, co * self.rows_per_out
        r_max = (rows * cols) // np.maximum(rows + cols, 1)
        return ~untouched & (rank > r_max)

    def factored_ratio(self, decoded: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        """Cost after / before of the layer, factored at its rank with the pruned widths."""
        rank = decoded[self.rank_dim][0].astype(np.float64)
        ci, co = self.widths(decoded)
        return (rank * (self.a * ci + self.b * co) + self.c * co) / self.base


class PrunedFactorizations:
    """The layers of a search that are both pruned and factored (see module docstring)."""

    def __init__(self, model: ir.Model, space, costs: dict, node_costs: dict[str, float],
                 counted: str):
        dims = space.dimensions
        cut_in: dict[str, int] = {}
        cut_out: dict[str, int] = {}
        for j, dim in enumerate(dims):
            if dim.action != "prune" or dim.kind != "keep":
                continue
            info = get_rewrite("prune").site(model, dim.site).info
            for name in info.get("consumers", []):
                cut_in[name] = j
            for name in info.get("producers", []):
                cut_out[name] = j
        self.layers: list[PrunedFactorization] = []
        for j, dim in enumerate(dims):
            if dim.action not in FACTORIZATIONS or dim.kind != "rank":
                continue
            node = dim.site
            if node not in cut_in and node not in cut_out:
                continue
            layer = self._layer(model, j, dim, costs[(dim.site, dim.action)], node_costs.get(node, 0.0), counted,
                                cut_in.get(node), cut_out.get(node))
            if layer is not None:
                self.layers.append(layer)
        # Ungrouped rank dimensions can be moved to "untouched" alone (a group's coordinate is shared).
        self._own_coordinate = {int(space.coordinate_of[j]) for j, idx in enumerate(dims)
                                if len(space.members[space.coordinate_of[j]]) == 1}
        self.space = space

    @staticmethod
    def _layer(model, j, dim, cost, base, counted, dim_in, dim_out) -> PrunedFactorization | None:
        info = get_rewrite(dim.action).site(model, dim.site).info
        if dim.action == "svd":
            ci, co, rows_in, rows_out = int(info["in"]), int(info["out"]), 1, 1
            weight_in = 1.0                       # K (in + out), MACs times the rows
        else:
            from pycompress.ir import node_by_name
            from pycompress.rewrites.conv_lowrank import conv_layer

            ci, co = int(info["in_channels"]), int(info["out_channels"])
            rows_in, rows_out = (int(k) for k in info["kernel"])
            weight_in = rows_in / rows_out        # parameters: K (Ci kh + Co kw)
            if counted == "macs":
                # Tai's vertical conv runs at the input's width, the horizontal at the output's.
                conv = conv_layer(node_by_name(model, dim.site))
                if isinstance(conv, str) or conv.in_hw is None or conv.out_hw is None or \
                        conv.in_hw[1] is None or not conv.out_hw[1]:
                    return None
                weight_in *= conv.in_hw[1] / conv.out_hw[1]
        replaced = cost.replaced
        if not cost.replaced_nodes or base <= 0 or replaced.slope <= 0:
            return None
        # The measured slope per rank is b (weight_in Ci + Co); the intercept is the bias, c Co.
        b = replaced.slope / (weight_in * ci + co)
        return PrunedFactorization(j, dim.site, dim_in, dim_out, ci, co, rows_in, rows_out, weight_in * b, b,
                                   replaced.intercept / co, float(base))

    def decode(self, thetas: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per dimension (values, untouched) at points (M, d), skipped factorizations marked untouched."""
        u = self.space.expand(np.atleast_2d(thetas))
        decoded = [dim.decode_many(u[:, j]) for j, dim in enumerate(self.space.dimensions)]
        for layer in self.layers:
            values, untouched = decoded[layer.rank_dim]
            decoded[layer.rank_dim] = (values, untouched | layer.skipped(decoded))
        return decoded

    def exact_factors(self, decoded: Sequence[tuple[np.ndarray, np.ndarray]]) -> dict[str, tuple[np.ndarray,
                                                                                                  np.ndarray]]:
        """Node -> (factored, cost after / before) for the layers factored at their pruned widths."""
        out = {}
        for layer in self.layers:
            factored = ~decoded[layer.rank_dim][1]
            out[layer.node] = (factored, layer.factored_ratio(decoded))
        return out

    def canonical(self, thetas: np.ndarray) -> np.ndarray:
        """Points (M, d) with each skipped rank moved to the untouched coordinate 1 (the same model)."""
        thetas = np.array(np.atleast_2d(thetas), np.float64)
        if not self.layers:
            return thetas
        u = self.space.expand(thetas)
        decoded = [dim.decode_many(u[:, j]) for j, dim in enumerate(self.space.dimensions)]
        for layer in self.layers:
            coordinate = int(self.space.coordinate_of[layer.rank_dim])
            if coordinate in self._own_coordinate:
                thetas[layer.skipped(decoded), coordinate] = 1.0
        return thetas

