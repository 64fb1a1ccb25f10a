"""Non-uniform pruning widths across layers from one global ranking (FLAP's adaptive structure).

A uniform width (every FFN at 1152 of 1536, every attention block at 8 of 12
heads) spends the budget where it hurts most: layers differ a lot in what
their channels contribute. Here every prunable unit of every site (an FFN
channel, an attention head, a CNN channel group's channel) is scored by its
data-aware importance (``fluctuation_scores`` / ``head_scores``: the variance
its removal adds to its consumers' outputs, the part bias compensation cannot
restore) divided by the MACs it costs, and the units are removed globally,
cheapest-per-MAC first, until the model's MACs reach the target ratio. The
widths that come out differ per layer (all-MiniLM-L6-v2 at 0.70x MACs keeps 3
heads in the first attention block and all 12 in the last).

Why the raw, unnormalised score (FLAP normalises per layer): the fluctuation
is already in the units of what the consumer adds to the residual stream, so
it compares across layers; measured on all-MiniLM-L6-v2 (docs/transformers.md)
the raw score beat the per-module-share and the residual-relative variants,
and an OBS (ZipLM-style) ordering was no better after recovery.

Used to seed a search (``allocation_plan`` at a few ratios) and by the
transformer benchmark; it decides counts (``keep``), the prune rewrite then
picks the channels by the same score.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from pycompress.errors import PycompressError
from pycompress.ir import SEQUENCE_LENGTH, model_cost
from pycompress.ir.accounting import has_sequence_axis
from pycompress.ir.channels import channel_groups
from pycompress.ir.heads import attention_heads
from pycompress.plan import LayerDecision, Plan
from pycompress.rewrites.prune_channels import (
    FeatureStatistics,
    fluctuation_scores,
    head_scores,
)

MIN_KEEP_FRACTION = 1 / 16      # no site is cut below this share of its width (at least one unit)


@dataclass
class SiteUnits:
    """One prune site seen by the allocation: its units' scores and the MACs one unit costs."""

    site: str
    scores: np.ndarray          # per unit (head or channel), larger = more important
    unit_macs: float            # MACs removed with one unit (the site's MACs / width)
    min_keep: int

    @property
    def width(self) -> int:
        return len(self.scores)


def site_units(model: ir.Model, stats: dict[str, FeatureStatistics]) -> list[SiteUnits]:
    """Every prunable site with data-aware scores (sites without statistics are left out)."""
    per_node = model_cost(model, SEQUENCE_LENGTH if has_sequence_axis(model) else None).by_name()
    units = []
    # A head also costs its share of the attention products (q k^T, softmax(.) v).
    sites = [(h.id, [n.name for n in h.nodes_between + h.projections],
              head_scores(h, stats) if stats.get(h.output.inputs[0].name) else None) for h in attention_heads(model)]
    sites += [(g.id, g.nodes, fluctuation_scores(g, stats)) for g in channel_groups(model) if g.prunable]
    for name, nodes, scores in sites:
        if scores is None or len(scores) < 2:
            continue
        macs = sum(per_node[n].macs for n in dict.fromkeys(nodes) if n in per_node)
        if macs <= 0:
            continue
        width = len(scores)
        units.append(SiteUnits(name, np.asarray(scores, dtype=np.float64), macs / width,
                               max(1, math.ceil(MIN_KEEP_FRACTION * width))))
    return units


def allocate(units: list[SiteUnits], remove_macs: float, align: int = 1) -> dict[str, int]:
    """Kept count per site after removing at least ``remove_macs`` MACs, units of least
    score per MAC first (within a site in increasing score order, so a site's kept units
    are always its best ones). A site is never cut below its ``min_keep``. With ``align``
    > 1, channel groups keep multiples of ``align`` (their width, or a multiple, when cut):
    they lose chunks of ``align`` channels, each ranked by its mean score per MAC
    (onnxruntime pads other widths and can run slower: EfficientNet-Lite0 pruned to
    0.97x MACs at free widths ran 2.5x slower, docs/pruning.md). Heads are units already."""
    steps = []
    for i, u in enumerate(units):
        step = 1 if align <= 1 or u.site.startswith("heads:") else align
        floor = min(u.width, step * math.ceil(u.min_keep / step))
        ordered = np.sort(u.scores)[:u.width - floor]
        # Chunks from the front so the kept count stays a multiple of ``step``; the first takes the remainder.
        cuts = [0, *range((u.width - floor) % step or step, len(ordered) + 1, step)] if ordered.size else [0]
        chunks = [(float(ordered[a:b].mean()), b - a) for a, b in zip(cuts, cuts[1:]) if b > a]
        # A running maximum keeps each site's steps in order in the global sort.
        level = -math.inf
        for mean, size in chunks:
            level = max(level, mean)
            steps.append((level / u.unit_macs, i, size))
    steps.sort(key=lambda s: s[0])
    keep = {u.site: u.width for u in units}
    removed = 0.0
    for _, i, size in steps:
        if removed >= remove_macs:
            break
        keep[units[i].site] -= size
        removed += size * units[i].unit_macs
    return keep


def allocation_plan(model: ir.Model, stats: dict[str, FeatureStatistics], ratio: float, align: int = 1) -> Plan:
    """Prune decisions (``keep`` per site) that bring the model's MACs to ``ratio`` of the
    original (per sequence of ``SEQUENCE_LENGTH`` tokens for a token model) by the
    global ranking; channel counts in multiples of ``align`` (``allocate``); sites left
    whole get no decision."""
    if not 0 < ratio <= 1:
        raise PycompressError(f"allocation ratio {ratio}: must be in (0, 1]")
    units = site_units(model, stats)
    if not units:
        raise PycompressError("no prunable site has calibration statistics to rank its channels")
    total = model_cost(model, SEQUENCE_LENGTH if has_sequence_axis(model) else None).macs
    keep = allocate(units, (1.0 - ratio) * total, align)
    decisions = [LayerDecision(u.site, "prune", {"keep": keep[u.site]},
                               note=f"keep {keep[u.site]}/{u.width} (global fluctuation per MAC, "
                                    f"MACs {ratio:g}x)")
                 for u in units if keep[u.site] < u.width]
    removed = sum((u.width - keep[u.site]) * u.unit_macs for u in units)
    return Plan(decisions, meta={"macs_ratio": 1.0 - removed / total})


SEED_RATIOS = (0.9, 0.8, 0.7)     # MACs ratios of the seeds when the search has no target


def search_seeds(model: ir.Model, stats: dict[str, FeatureStatistics] | None,
                 target: float | None = None) -> list[Plan]:
    """Allocation plans a search over a token model evaluates first (its initial design is
    otherwise a Sobol sequence, which in 24 dimensions starts far too compressed for an
    encoder: docs/transformers.md): at the target MACs ratio, else at ``SEED_RATIOS``.
    Empty for other models (measured on transformer encoders only) or without statistics."""
    if not stats or not has_sequence_axis(model):
        return []
    ratios = [target] if target is not None and 0 < target < 1 else list(SEED_RATIOS)
    try:
        return [allocation_plan(model, stats, r) for r in ratios]
    except PycompressError:
        return []      # nothing rankable: the search runs from its own design


QK_SEED_FRACTIONS = (1 / 2, 3 / 8)   # query/key ranks of the combined seeds, as fractions of the head width


def qk_seeds(model: ir.Model, options: dict, target: float | None, sites: list[str]) -> list[Plan]:
    """Seeds for a search over pruning *and* ``qk_rank`` of a token model: every attention block's
    query/key rank at a fraction of its head width, plus the global allocation at the MACs ratio
    that, with the query/key MACs the ranks save on the heads kept, lands on the target (a few
    fixed-point steps). Measured on all-MiniLM-L6-v2 (docs/transformers.md): at 0.70x MACs,
    allocation 0.78 + rank 12 of 32 beats the allocation at 0.70 alone after recovery. Empty
    without pruning statistics."""
    stats = options.get("channel_statistics")
    if not stats or not sites or not has_sequence_axis(model):
        return []
    blocks = {f"qk:{h.output.name}": h for h in attention_heads(model)}
    blocks = {s: blocks[s] for s in sites if s in blocks}
    cost = model_cost(model, SEQUENCE_LENGTH)
    per_node = cost.by_name()
    # What a rank saves: the Q and K products and the q k^T scores, in proportion.
    qk_share = {s: sum(per_node[n.name].macs for n in [*b.projections[:2], b.scores] if n.name in per_node)
                / cost.macs for s, b in blocks.items()}
    ratios = [target] if target is not None and 0 < target < 1 else list(SEED_RATIOS[1:])
    seeds = []
    for fraction in QK_SEED_FRACTIONS:
        ranks = [LayerDecision(s, "qk_rank", {"rank": max(1, round(b.head_dim * fraction))},
                               note=f"query/key rank {fraction:g} of the head width (seed)")
                 for s, b in blocks.items()]
        for ratio in ratios:
            prune_ratio, best = ratio, None
            try:
                for _ in range(4):
                    pruned = allocation_plan(model, stats, min(1.0, prune_ratio))
                    kept = {d.site: d.params["keep"] for d in pruned.decisions}
                    saved = sum(qk_share[s] * (1 - fraction) * kept.get(f"heads:{b.output.name}", b.heads) / b.heads
                                for s, b in blocks.items())
                    predicted = pruned.meta["macs_ratio"] - saved
                    if best is None or abs(predicted - ratio) < best[0]:
                        best = (abs(predicted - ratio), pruned)
                    prune_ratio += ratio - predicted
            except PycompressError:
                return []
            seeds.append(Plan(best[1].decisions + ranks))
    return seeds
