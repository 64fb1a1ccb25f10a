"""The search space: one coordinate per site, as each rewrite declares it (``Rewrite.search_dimension``)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import replace

import onnx_ir as ir

from pycompress.decisions.bo import Dimension, SearchSpace
from pycompress.errors import PycompressError
from pycompress.rewrites import get_rewrite
from pycompress.rewrites.base import Rewrite, SearchRange, SearchSettings

GRANULARITIES = ("layer", "block", "stage")


def build_search_space(model: ir.Model, actions: Sequence[str], granularity: str = "layer", *,
                       max_prune: float = 1.0, align: int = 1) -> tuple[SearchSpace, list[str]]:
    """One dimension per applicable site, as its rewrite declares it (``Rewrite.search_dimension``:
    e.g. a rank ``[1, r_max]``, a channel count, index bits). Actions are taken in their
    rewrite order (``Rewrite.order``); a site an earlier action searched is
    left out where the rewrite says it cannot follow that action (``Rewrite.excluded_by``:
    a layer is factored once, a factored layer is not shared). Returns the space and notes on
    the sites left out (with the reason).

    ``granularity`` "block" / "stage" makes the sites of one action inside one
    residual block / resolution stage (``pycompress.ir.blocks``) share one
    coordinate of the search (the same fraction of their ranges); "layer"
    searches every site on its own. ``max_prune``: the largest fraction of a
    channel group the search may remove (keeps ``>= ceil((1 - max_prune) C)``);
    ``align``: channel counts searched are multiples of it (or the full width).
    """
    if not 0 < max_prune <= 1:
        raise PycompressError(f"max_prune must be in (0, 1], got {max_prune}")
    if align < 1:
        raise PycompressError(f"align must be a positive integer, got {align}")
    if granularity not in GRANULARITIES:
        raise PycompressError(f"granularity {granularity!r}: choose one of {', '.join(GRANULARITIES)}")
    settings = SearchSettings(max_prune=max_prune, align=align)
    labels: dict[str, str] = {}
    if granularity != "layer":
        from pycompress.ir.blocks import block_labels, stage_labels

        labels = block_labels(model) if granularity == "block" else stage_labels(model)
    dims: list[Dimension] = []
    ranges: list[SearchRange] = []
    notes: list[str] = []
    taken: dict[str, list[Rewrite]] = {}    # site -> the rewrites that searched it so far

    def group_of(site, action: str) -> str | None:
        return f"{labels[site.nodes[0]]}:{action}" if site.nodes and site.nodes[0] in labels else None

    actions = sorted(actions, key=lambda a: get_rewrite(a).order)
    for action in actions:
        rewrite = get_rewrite(action)
        if rewrite.searchable_param() is None:
            raise PycompressError(f"action '{action}' has no searchable parameter")
        for site in rewrite.sites(model):
            if not site.ok:
                notes.append(f"{site.name} ({action}): {site.reason}")
                continue
            excluded = next((why for earlier in taken.get(site.name, [])
                             if (why := rewrite.excluded_after(earlier))), None)
            if excluded:
                notes.append(f"{site.name} ({action}): {excluded}")
                continue
            found = rewrite.search_dimension(model, site, settings)
            if isinstance(found, str):
                notes.append(f"{site.name} ({action}): {found}")
                continue
            dims.append(Dimension(site.name, action, found.param, found.kind, high=found.high, low=found.low,
                                  untouched_from=found.untouched_from, group=group_of(site, action),
                                  align=found.align))
            ranges.append(found)
            taken.setdefault(site.name, []).append(rewrite)
    if not dims:
        raise PycompressError(f"no site of the model can take {', '.join(actions)}"
                              + (f" ({notes[0]}{', ...' if len(notes) > 1 else ''})" if notes else ""))
    sizes = Counter(d.group for d in dims)
    dims = [replace(d, group=None) if sizes[d.group] == 1 else d for d in dims]   # a group of one is a layer
    # Warped coordinates only for a site searched on its own (a group shares one fraction).
    dims = [replace(d, positions=r.positions() if r.positions is not None and d.group is None else None)
            for d, r in zip(dims, ranges)]
    return SearchSpace(dims), notes


def describe_point(space: SearchSpace, theta: Sequence[float]) -> str:
    """``site=value, ...`` (``full`` for an untouched site)."""
    return ", ".join(f"{dim.site}={'full' if v is None else v}"
                     for dim, v in zip(space.dimensions, space.values(theta)))
