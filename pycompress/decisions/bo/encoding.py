"""Compression decisions <-> points of the unit cube (ALGORITHMS.md 3.1).

Each decision ``i`` has a known integer range: a rank in ``[1, r_max_i]``
(decoded ``r_i = max(1, round(theta_i * r_max_i))``, paper Sec. 3.3) or a
number of channels kept in ``[min_keep_i, C_i]`` (decoded
``round(min_keep_i + theta_i (C_i - min_keep_i))``). A value that would not
reduce the layer (``>= untouched_from``) leaves it untouched: no decision.
The optimizer works on ``theta in [0, 1]^d``; ``snap`` maps a point to the
lattice point that is actually evaluated, so that the GP sees what was run.

A rank dimension may carry ``positions``: the coordinate of each rank
``1..r_max`` (increasing from 0 to 1) instead of the even spacing ``r /
r_max``; decoding takes the nearest position. The search spaces built by
``pipeline`` place an SVD layer's ranks by the log of the weight energy they
discard, so that the fidelity, which changes by orders of magnitude over a
few ranks near the top of a narrow layer and hardly at all over hundreds of
ranks of a wide one, changes about evenly along every coordinate: what a
stationary GP can model (a deviation from the paper's linear encoding).

Grouped decisions (``--granularity block|stage``): dimensions that share a
``group`` share one coordinate, i.e. one *fraction* ``u`` of their ranges
(``r_i = round(u * r_max_i)`` for every member), so that a real network keeps
``d`` small (the paper searched ResNet18 with 9 parameters). The coordinate is
snapped on the lattice of its finest member, on which every member's value is
a function of ``u``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Iterable, Sequence

import numpy as np

from pycompress.errors import PycompressError
from pycompress.plan import LayerDecision, Plan

KINDS = ("rank", "keep")


@dataclass(frozen=True)
class Dimension:
    """One coordinate: parameter ``param`` of ``action`` at ``site``.

    kind "rank": values ``1..high`` (``high = r_max``), ``low`` is ignored.
    kind "keep": values ``low..high`` (``min_keep..C``), multiples of ``align`` (and ``high``).
    ``untouched_from``: values at or above it leave the layer as it is.
    ``group``: dimensions with the same group share one coordinate (None: own).
    """

    site: str
    action: str
    param: str
    kind: str
    high: int
    low: int = 1
    untouched_from: int | None = None
    group: str | None = None
    align: int = 1
    positions: tuple[float, ...] | None = None   # rank kind: coordinate of ranks 1..high (see module doc)

    @cached_property
    def levels(self) -> np.ndarray:
        """kind "keep": the channel counts searched, multiples of ``align`` in ``[low, high]`` plus ``high``
        (onnxruntime's blocked convolutions pad other widths: they cost time without saving any)."""
        first = -(-self.low // self.align) * self.align
        return np.unique(np.append(np.arange(first, self.high + 1, self.align), self.high))

    @property
    def steps(self) -> int:
        """Number of lattice steps of the coordinate."""
        return self.high if self.kind == "rank" else len(self.levels) - 1

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise PycompressError(f"site '{self.site}': unknown dimension kind '{self.kind}'")
        if self.high < 1 or (self.kind == "keep" and not 1 <= self.low <= self.high):
            raise PycompressError(f"site '{self.site}': empty range [{self.low}, {self.high}] for '{self.param}'")
        if self.align < 1:
            raise PycompressError(f"site '{self.site}': align must be >= 1, got {self.align}")
        if self.positions is not None:
            p = np.asarray(self.positions)
            if self.kind != "rank" or p.size != self.high or p[0] != 0.0 or p[-1] != 1.0 or \
                    (p.size > 1 and not np.all(np.diff(p) > 0)):
                raise PycompressError(f"site '{self.site}': rank positions must rise from 0 to 1, one per rank")

    def rank_index(self, u: np.ndarray) -> np.ndarray:
        """Ranks (1-based) nearest to coordinates ``u`` on the positions."""
        p = np.asarray(self.positions)
        return np.searchsorted((p[:-1] + p[1:]) / 2, np.clip(u, 0.0, 1.0)) + 1

    def value(self, u: float) -> int:
        """The integer parameter at coordinate ``u`` in [0, 1] (before the untouched rule)."""
        u = float(min(max(u, 0.0), 1.0))
        if self.kind == "rank":
            if self.positions is not None:
                return int(self.rank_index(np.asarray([u]))[0])
            return max(1, int(round(u * self.high)))
        levels = self.levels
        return int(levels[int(round(u * (len(levels) - 1)))])

    def decode_many(self, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(values, untouched)`` at many coordinates at once (values at ``high`` where untouched)."""
        u = np.clip(np.asarray(u, np.float64), 0.0, 1.0)
        if self.kind == "rank":
            values = self.rank_index(u) if self.positions is not None else np.maximum(1, np.rint(u * self.high))
        else:
            levels = self.levels
            values = levels[np.rint(u * (len(levels) - 1)).astype(np.intp)]
        values = np.asarray(values, np.int64)
        untouched = values >= self.untouched_from if self.untouched_from is not None else np.zeros(u.shape, bool)
        return np.where(untouched, self.high, values), untouched

    def decode(self, u: float) -> int | None:
        """The parameter at ``u``, or None when it would leave the layer untouched."""
        v = self.value(u)
        return None if self.untouched_from is not None and v >= self.untouched_from else v

    def encode(self, value: int | None) -> float:
        """The coordinate of a parameter value (None: untouched -> 1)."""
        if value is None:
            return 1.0
        if self.kind == "rank":
            if self.positions is not None:
                return float(self.positions[min(max(value, 1), self.high) - 1])
            return float(min(max(value, 1), self.high)) / self.high
        levels = self.levels
        if len(levels) == 1:
            return 1.0
        return float(np.argmin(np.abs(levels - value))) / (len(levels) - 1)


class SearchSpace:
    """The ordered dimensions of a search; decodes points to Plans and back.

    ``d`` counts coordinates: one per ungrouped dimension plus one per group,
    in order of first appearance.
    """

    def __init__(self, dimensions: Sequence[Dimension]):
        if not dimensions:
            raise PycompressError("nothing to search: no applicable decision sites")
        keys = [(d.site, d.action) for d in dimensions]
        if len(set(keys)) != len(keys):
            raise PycompressError("a site/action pair appears twice in the search space")
        self.dimensions = list(dimensions)
        slots: dict[object, int] = {}
        self.members: list[list[int]] = []          # coordinate -> its dimensions
        for i, dim in enumerate(self.dimensions):
            key = ("group", dim.group) if dim.group is not None else ("dim", i)
            if key not in slots:
                slots[key] = len(self.members)
                self.members.append([])
            self.members[slots[key]].append(i)
        self.coordinate_of = np.empty(len(self.dimensions), dtype=np.intp)
        for j, idx in enumerate(self.members):
            self.coordinate_of[idx] = j
        # The finest member's lattice carries the snapping of a coordinate.
        self._leaders = [max(idx, key=lambda i: self.dimensions[i].steps) for idx in self.members]
        # Points (M, d) -> the same points with every coordinate that does not change the applied model
        # moved to one representative (set by the objective, which knows how decisions interact, e.g. a
        # rank skipped because pruning narrowed its layer): the GP then sees one point per model.
        self.canonical: Callable[[np.ndarray], np.ndarray] | None = None

    @property
    def d(self) -> int:
        return len(self.members)

    @property
    def grouped(self) -> bool:
        return self.d < len(self.dimensions)

    def coordinate_names(self) -> list[str]:
        """A label per coordinate: the group, or ``site (action)``."""
        names = []
        for idx in self.members:
            dim = self.dimensions[idx[0]]
            names.append(dim.group if dim.group is not None else f"{dim.site} ({dim.action})")
        return names

    def expand(self, theta: np.ndarray) -> np.ndarray:
        """Per-dimension coordinates (..., n_dimensions) of points (..., d)."""
        theta = np.asarray(theta, np.float64)
        return theta[..., self.coordinate_of]

    def values(self, theta: Sequence[float]) -> list[int | None]:
        u = self.expand(self._check(theta))
        return [dim.decode(x) for dim, x in zip(self.dimensions, u)]

    def decisions(self, theta: Sequence[float]) -> list[LayerDecision]:
        return [LayerDecision(dim.site, dim.action, {dim.param: v})
                for dim, v in zip(self.dimensions, self.values(theta)) if v is not None]

    def to_plan(self, theta: Sequence[float], *, model: str = "", meta: dict | None = None) -> Plan:
        return Plan(self.decisions(theta), model, dict(meta or {}))

    def encode(self, plan: Plan | Iterable[LayerDecision], *, strict: bool = True) -> np.ndarray:
        """A plan's point: sites it does not mention are untouched (coordinate 1).
        ``strict=False`` ignores decisions on sites outside the search.

        A group's coordinate is the mean of its members' coordinates (a plan
        from PFA keeps a different fraction per layer; the group gets their
        average).
        """
        decisions = plan.decisions if isinstance(plan, Plan) else list(plan)
        by_key = {(d.site, d.action): d for d in decisions}
        known = {(dim.site, dim.action) for dim in self.dimensions}
        for key in list(by_key):
            if key not in known:
                if strict:
                    raise PycompressError(f"site '{key[0]}': action '{key[1]}' is not part of this search")
                del by_key[key]     # a seed plan may decide sites the search leaves out
        per_dim = np.ones(len(self.dimensions))
        for i, dim in enumerate(self.dimensions):
            decision = by_key.get((dim.site, dim.action))
            if decision is not None:
                params = decision.params
                if dim.param == "keep" and "keep" not in params and isinstance(params.get("keep_indices"), list):
                    # A PFA plan names the channels; as a point of the search only their count matters.
                    params = {"keep": len(params["keep_indices"])}
                if dim.param not in params:
                    raise PycompressError(f"site '{dim.site}': seed plan has no '{dim.param}' for '{dim.action}'")
                per_dim[i] = dim.encode(int(params[dim.param]))
        return np.array([per_dim[idx].mean() for idx in self.members])

    def snap(self, theta: np.ndarray) -> np.ndarray:
        """Map points (d,) or (M, d) to the lattice points that decode to the same plan."""
        theta = np.asarray(theta, np.float64)
        flat = np.atleast_2d(theta)
        out = np.empty_like(flat)
        for j, leader in enumerate(self._leaders):
            dim = self.dimensions[leader]
            col = np.clip(flat[:, j], 0.0, 1.0)
            if dim.kind == "rank" and dim.positions is not None:
                values = dim.rank_index(col)
                snapped = np.asarray(dim.positions)[values - 1]
            elif dim.kind == "rank":
                values = np.maximum(1, np.rint(col * dim.high))
                snapped = values / dim.high
            else:
                levels = dim.levels
                span = len(levels) - 1
                index = np.rint(col * span).astype(np.intp)
                values = levels[index]
                snapped = index / span if span else np.ones_like(col)
            if dim.untouched_from is not None and len(self.members[j]) == 1:
                # Every untouched value is the same plan: one point for it. (In a
                # group the other members still change below the leader's cut.)
                snapped = np.where(values >= dim.untouched_from, 1.0, snapped)
            out[:, j] = snapped
        if self.canonical is not None:
            out = self.canonical(out)
        return out.reshape(theta.shape)

    def _check(self, theta: Sequence[float]) -> np.ndarray:
        theta = np.asarray(theta, np.float64).ravel()
        if theta.size != self.d:
            raise PycompressError(f"a point of this search has {self.d} coordinates, got {theta.size}")
        return theta
