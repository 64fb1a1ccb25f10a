"""Per-layer bit widths for `share` under a packed-bytes budget (sensitivity-guided allocation).

One bit width for every layer wastes bytes: on EfficientNet-Lite0 the
1.28M-weight classifier changes the output at 8 bits as much as a 5.7K-weight
1x1 conv (docs/sharing-export-bench.md). So per layer ``l`` and bit width
``b`` we estimate

- ``bytes[l][b]``: what the layer costs in the packed container, from the
  entropy of its k-means indices (the container Huffman-codes every 8-bit
  stream of >= 512 bytes; code table 256 bytes) plus codebook and channel
  scales (float32);
- ``error[l][b]``: the model's output error when only that layer is shared at
  ``b`` bits. It is measured once per layer at a probe width (the layer shared
  through the real ``share`` rewrite, bias correction included when the
  context has data, the model run by the injected ``measure``), and carried to
  the other widths by the ratio of the layer's squared weight errors
  (``||W~_b - W||^2 / ||W~_probe - W||^2``; k-means error falls by ~4x per
  bit, the layer's gain to the output stays). One model run per layer
  instead of one per layer and width.

Errors of different layers are taken as additive (independent small
perturbations), so the allocation is a multiple-choice knapsack; it is solved
greedily: start every layer at the widest width and repeatedly take the
one-bit step down with the least error added per byte saved, until the
budget is met. ALGORITHMS.md leaves per-layer bits to the PAC-BO search; this
is the cheap deterministic allocation the search (or a user) can start from,
and it needs no search evaluations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from pycompress.ir import constant_array, node_by_name, output_channel_axis
from pycompress.plan import LayerDecision, Plan
from pycompress.rewrites import apply_plan
from pycompress.rewrites.base import ApplyContext
from pycompress.rewrites.weight_sharing import REWRITE as SHARE
from pycompress.rewrites.weight_sharing import layer_importance, share_weights

PACKED_MIN_STREAM = 512     # export/packed.py codes uint8 streams of at least this many bytes
HUFFMAN_TABLE_BYTES = 256   # one code length per symbol


@dataclass
class LayerCost:
    """Predicted packed bytes and output error of one shared layer at each bit width."""

    site: str
    params: int
    bytes: dict[int, float] = field(default_factory=dict)
    error: dict[int, float] = field(default_factory=dict)
    weight_error: dict[int, float] = field(default_factory=dict)   # ||W~ - W||^2 / ||W||^2
    probe_error: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"site": self.site, "params": self.params, "probe_error": self.probe_error,
                "bytes": {str(b): v for b, v in self.bytes.items()},
                "error": {str(b): v for b, v in self.error.items()},
                "weight_error": {str(b): v for b, v in self.weight_error.items()}}


def packed_layer_bytes(indices: np.ndarray, clusters: int, channels: int) -> float:
    """Bytes the packed container needs for one shared weight: coded indices + codebook + scales."""
    n = indices.size
    side = 4.0 * (clusters + channels)
    if n < PACKED_MIN_STREAM:
        return n + side
    counts = np.bincount(indices.ravel(), minlength=256).astype(np.float64)
    p = counts[counts > 0] / n
    entropy = float(-(p * np.log2(p)).sum())
    # Huffman is within one bit of the entropy; measured on Lite0 +0.05 bit/weight.
    return n * (entropy + 0.05) / 8 + HUFFMAN_TABLE_BYTES + side


def layer_costs(model: ir.Model, sites: list[str], measure: Callable[[ir.Model], float], *,
                bits: tuple[int, ...] = (3, 4, 5, 6, 7, 8), probe_bits: int | tuple[int, int] = 6,
                ctx: ApplyContext | None = None, params: dict[str, Any] | None = None,
                progress: Callable[[str], None] | None = None) -> list[LayerCost]:
    """Bytes and predicted output error of each site at each of ``bits``.

    ``measure(model)`` returns the output error of a candidate model against
    the original (e.g. mean squared logit difference on calibration samples);
    it is called once per site, on a copy of ``model`` with only that site
    shared at ``probe_bits`` (through ``apply`` with ``ctx``, so bias
    correction is part of the probe when ``ctx`` has data). ``params``: other
    `share` parameters of the probe and of the plan (e.g. ``error_compensation``).
    ``probe_bits`` may name two widths: each layer is then measured at both and
    the error at width ``b`` is ``e_1 (w_b / w_1)^a``, with ``w`` the weight
    errors and the exponent ``a`` fitted through the two measurements
    (clamped to [0.25, 4]) instead of 1: the output error does not follow the
    weight error one to one (bias correction and error compensation remove
    more of it at some widths than at others). Two model runs per layer.
    With ``activation_weighting`` in ``params`` the k-means of every width is
    weighted as the rewrite weights it (input second moments on ``ctx``'s
    data), and the weight errors that carry the probe to the other widths are
    weighted the same way.
    """
    ctx = ctx or ApplyContext()
    probes = (probe_bits,) if isinstance(probe_bits, int) else tuple(sorted(set(probe_bits)))
    costs = []
    for count, name in enumerate(sites, 1):
        node = node_by_name(model, name)
        site = next(s for s in SHARE.sites(model) if s.name == name)
        weights = constant_array(node.inputs[site.info["input"]])
        axis = output_channel_axis(node, site.info["input"], weights.ndim)
        cost = LayerCost(name, int(weights.size))
        importance = (layer_importance(node, weights, ctx) if (params or {}).get("activation_weighting")
                      and site.info["input"] == 1 else None)
        factor = 1.0 if importance is None else importance
        norm = float((factor * np.square(weights, dtype=np.float64)).sum()) or 1.0
        for b in sorted(set(bits) | set(probes)):
            codebook, indices, scale, _ = share_weights(weights, b, channel_axis=axis, importance=importance,
                                                        levels=(params or {}).get("levels", "kmeans"))
            shared = codebook[indices].astype(np.float64) * (scale if scale is not None else 1.0)
            cost.weight_error[b] = float((factor * np.square(shared - weights)).sum()) / norm
            cost.bytes[b] = packed_layer_bytes(indices, codebook.size, site.info.get("channels", 0))
        measured = {}
        for b in probes:
            probe = model.clone()
            apply_plan(probe, Plan([LayerDecision(name, SHARE.action, {**(params or {}), "bits": b})]), ctx)
            measured[b] = float(measure(probe))
        first = probes[0]
        cost.probe_error = measured[first]
        exponent = 1.0
        if len(probes) > 1:
            last = probes[-1]
            weight_ratio = cost.weight_error[last] / cost.weight_error[first] if cost.weight_error[first] > 0 else 0.0
            if measured[first] > 0 and measured[last] > 0 and 0 < weight_ratio < 1:
                exponent = float(np.clip(np.log(measured[last] / measured[first]) / np.log(weight_ratio), 0.25, 4.0))
        reference = cost.weight_error[first]
        for b in bits:
            ratio = cost.weight_error[b] / reference if reference > 0 else 0.0
            cost.error[b] = cost.probe_error * ratio ** exponent
        cost.bytes = {b: cost.bytes[b] for b in bits}
        cost.weight_error = {b: cost.weight_error[b] for b in bits}
        costs.append(cost)
        if progress is not None:
            progress(f"[{count}/{len(sites)}] {name}: {cost.params} weights, error at "
                     + ", ".join(f"{b} bits {e:.4g}" for b, e in measured.items()))
    return costs


def allocate_bits(costs: list[LayerCost], budget: float) -> dict[str, int]:
    """Bit width per site whose total bytes fit ``budget``, greedily least predicted error.

    Every site starts at its widest width; each step lowers by one bit the
    site whose step adds the least error per byte saved. If even the
    narrowest widths do not fit, every site gets its narrowest.
    """
    chosen = {c.site: max(c.bytes) for c in costs}
    by_site = {c.site: c for c in costs}
    total = sum(c.bytes[chosen[c.site]] for c in costs)
    while total > budget:
        best, best_rate = None, np.inf
        for c in costs:
            b = chosen[c.site]
            lower = max((w for w in c.bytes if w < b), default=None)
            if lower is None:
                continue
            saved = c.bytes[b] - c.bytes[lower]
            if saved <= 0:
                continue
            rate = (c.error[lower] - c.error[b]) / saved
            if rate < best_rate:
                best, best_rate = (c.site, lower), rate
        if best is None:
            break
        site, lower = best
        total -= by_site[site].bytes[chosen[site]] - by_site[site].bytes[lower]
        chosen[site] = lower
    return chosen


def allocation_plan(costs: list[LayerCost], budget: float, params: dict[str, Any] | None = None) -> Plan:
    """A `share` plan with the allocated bits (note: predicted bytes and error per layer)."""
    chosen = allocate_bits(costs, budget)
    decisions = [LayerDecision(c.site, SHARE.action, {**(params or {}), "bits": int(chosen[c.site])},
                               note=(f"~{c.bytes[chosen[c.site]]:,.0f} packed bytes, predicted output error "
                                     f"{c.error[chosen[c.site]]:.3g} (budget allocation)"))
                 for c in costs]
    return Plan(decisions)
