"""Principal Filter Analysis (PFA): response spectra -> filters to keep -> a Plan.

ALGORITHMS.md section 3.3 (the paper's formulas, checked against the
authors' code). Everything here is numpy + ``pycompress.kernels``: the
responses arrive as covariance matrices (``pycompress.fidelity.responses``
collects them), and a footprint target is met through an injected cost
model, so every recipe is testable on synthetic spectra.

Per decision site (a layer, or a group of coupled layers) of width ``C``:

* spectrum ``lambda``: eigenvalues of the ``C x C`` response covariance,
  clipped at 0, sorted descending, normalized to sum 1;
* PFA-En(tau): the smallest ``k`` with ``sum_{i<=k} lambda_i >= tau``, then
  ``k = max(k, min_keep)``;
* PFA-KL (parameter-free): ``p = lambda + eps``,
  ``KL = sum_i p_i log(p_i C)`` (divergence from the uniform spectrum, at
  most ``log C``), ``k = ceil(C (1 - KL / log C))``;
* footprint target: one ``tau`` for all sites, the largest whose PFA-En
  recipe costs at most the target (bisection over the spectra's breakpoints);
* selection: inactive units (variance ``< 1e-8 * max``) go first, then the
  "L1 max" rule on the absolute correlation matrix
  (``pycompress.kernels.l1max_removal_order``).

Inactive units carry no energy, so a site never keeps more than its active
units (unless ``min_keep`` asks for more): this is how "removed first" turns
into counts, as in the authors' code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

import numpy as np

from pycompress.errors import PycompressError
from pycompress.kernels import l1max_removal_order
from pycompress.plan import LayerDecision, Plan

INACTIVE_RTOL = 1e-8          # variance < INACTIVE_RTOL * max variance: inactive unit
CORRELATION_FLOOR = 1e-8      # cov_ij / max(sqrt(var_i var_j), floor)
KL_EPS = float(np.finfo(np.float64).eps)  # the authors' code adds machine epsilon
DEFAULT_TAUS = (0.9, 0.95, 0.98, 0.99)

# keep: site id -> filters kept (sites absent keep all) -> the model's cost
# (parameters or MACs) with those widths, counting consumers' lost inputs.
CostModel = Callable[[Mapping[str, int]], float]

# The rewrite action of PFA's decisions (channels kept per group, ``keep_indices``).
ACTION = "prune"


class Scatter(Protocol):
    """What ``pooled_covariance`` needs from a ``CovarianceAccumulator``."""

    @property
    def count(self) -> int: ...
    @property
    def scatter(self) -> np.ndarray: ...


# --------------------------------------------------------------------------
# Spectra and recipes on one site

def spectrum(cov: np.ndarray) -> np.ndarray:
    """Normalized eigen-spectrum of a ``(C, C)`` covariance: ``(C,)``, descending, sums to 1.

    Eigenvalues from ``eigh``, clipped at 0 (round-off makes tiny negative
    ones). A zero covariance (a dead layer) gives all zeros.
    """
    cov = np.asarray(cov, dtype=np.float64)
    if cov.ndim != 2 or cov.shape[0] != cov.shape[1] or cov.shape[0] == 0:
        raise ValueError(f"covariance must be a non-empty square matrix, got shape {cov.shape}")
    eig = np.clip(np.linalg.eigvalsh(cov), 0.0, None)[::-1]
    total = eig.sum()
    return eig / total if total > 0 else np.zeros_like(eig)


def spectral_entropy(spec: np.ndarray) -> float:
    """``H(lambda) = -sum_i lambda_i log lambda_i`` in nats (``log C`` for a flat spectrum)."""
    p = np.asarray(spec, dtype=np.float64)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def kl_divergence(spec: np.ndarray) -> float:
    """``KL(lambda + eps || uniform) = sum_i p_i log(p_i C)``; 0 for a flat spectrum, ``~log C`` for a Dirac."""
    p = np.asarray(spec, dtype=np.float64) + KL_EPS
    return float((p * np.log(p * len(p))).sum())


def _check_tau(tau: float) -> float:
    if not isinstance(tau, (int, float)) or math.isnan(tau) or not 0.0 <= tau <= 1.0:
        raise PycompressError(f"PFA-En energy tau must be in [0, 1], got {tau!r}")
    return float(tau)


def energy_keep(spec: np.ndarray, tau: float, *, min_keep: int = 1) -> int:
    """PFA-En: smallest ``k`` with ``cumsum(lambda)[k-1] >= tau``, then ``max(k, min_keep)``, at most ``C``."""
    tau = _check_tau(tau)
    spec = np.asarray(spec, dtype=np.float64)
    c = len(spec)
    # searchsorted finds the first prefix reaching tau; tau = 1 can miss by
    # round-off (cumsum ends at 0.9999999999999998): then keep everything.
    k = int(np.searchsorted(np.cumsum(spec), tau, side="left")) + 1
    return min(max(k, int(min_keep)), c)


def kl_keep(spec: np.ndarray) -> int:
    """PFA-KL: ``ceil(C (1 - KL / log C))`` in ``[1, C]``; ``C = 1`` keeps 1."""
    c = len(spec)
    if c <= 1:
        return 1
    ratio = 1.0 - kl_divergence(spec) / math.log(c)
    return min(max(int(math.ceil(c * ratio)), 1), c)


def inactive_units(cov: np.ndarray, rtol: float = INACTIVE_RTOL) -> np.ndarray:
    """Indices of units whose variance is below ``rtol * max variance`` (all of them if the max is 0)."""
    var = np.abs(np.diag(np.asarray(cov, dtype=np.float64)))
    return np.flatnonzero(var < rtol * var.max()) if var.max() > 0 else np.arange(len(var))


def correlation(cov: np.ndarray, floor: float = CORRELATION_FLOOR) -> np.ndarray:
    """Pearson correlation ``cov_ij / max(sqrt(var_i var_j), floor)``."""
    cov = np.asarray(cov, dtype=np.float64)
    sd = np.sqrt(np.abs(np.diag(cov)))
    return cov / np.maximum(np.outer(sd, sd), floor)


def removal_order(cov: np.ndarray, n_remove: int) -> np.ndarray:
    """The ``n_remove`` units PFA removes first: inactive ones (lowest variance first), then L1 max.

    Selection among the active units runs on their correlation submatrix,
    which is what removing the inactive units' rows from the running L1
    norms would leave.
    """
    cov = np.asarray(cov, dtype=np.float64)
    c = cov.shape[0]
    if not 0 <= n_remove <= c:
        raise ValueError(f"n_remove must be in [0, {c}], got {n_remove}")
    dead = inactive_units(cov)
    dead = dead[np.argsort(np.diag(cov)[dead], kind="stable")]
    if n_remove <= len(dead):
        return dead[:n_remove].astype(np.int64)
    active = np.setdiff1d(np.arange(c), dead)
    sub = correlation(cov)[np.ix_(active, active)]
    chosen = l1max_removal_order(np.ascontiguousarray(sub), n_remove - len(dead))
    return np.concatenate([dead, active[chosen]]).astype(np.int64)


def select_filters(cov: np.ndarray, keep: int) -> list[int]:
    """Indices (ascending) of the ``keep`` filters PFA keeps in a layer with covariance ``cov``."""
    c = np.asarray(cov).shape[0]
    if not 1 <= keep <= c:
        raise ValueError(f"keep must be in [1, {c}], got {keep}")
    removed = set(removal_order(cov, c - keep).tolist())
    return [i for i in range(c) if i not in removed]


def pooled_covariance(members: Sequence[Scatter]) -> tuple[np.ndarray, int]:
    """One covariance for a coupled group from its members' accumulators: ``(C x C, samples)``.

    The pooled within-member covariance ``sum_m M2_m / (sum_m n_m - m)``:
    each member's responses are centred on their own mean and then treated
    as further samples of the group's channels. Why: the group keeps one
    set of channel indices for all members, so a channel is redundant only
    if it is redundant across the members' responses; pooling counts every
    member's evidence, and centring per member keeps differences between the
    members' means (a rank-one artefact of the coupling, not a correlation
    between channels) out of the spectrum. One member: its covariance.
    """
    if not members:
        raise ValueError("a group needs at least one member")
    total = sum(int(m.count) for m in members)
    dof = total - len(members)
    if dof < 1:
        raise ValueError(f"{total} samples over {len(members)} member(s): not enough for a covariance")
    scatter = sum(np.asarray(m.scatter, dtype=np.float64) for m in members)
    return scatter / dof, total


# --------------------------------------------------------------------------
# A site's analysis

@dataclass
class LayerSpectrum:
    """PFA's view of one decision site: covariance, spectrum, inactive units."""

    site: str
    width: int
    samples: int
    cov: np.ndarray = field(repr=False)
    spectrum: np.ndarray = field(repr=False)
    inactive: np.ndarray = field(repr=False)
    info: dict[str, Any] = field(default_factory=dict)  # e.g. op, response tensors

    @classmethod
    def from_covariance(cls, site: str, cov: np.ndarray, samples: int, **info: Any) -> "LayerSpectrum":
        cov = np.asarray(cov, dtype=np.float64)
        return cls(site, cov.shape[0], int(samples), cov, spectrum(cov), inactive_units(cov), dict(info))

    @property
    def active(self) -> int:
        return self.width - len(self.inactive)

    @property
    def entropy(self) -> float:
        return spectral_entropy(self.spectrum)

    @property
    def normalized_entropy(self) -> float:
        """``H / log C`` in [0, 1] (1: uncorrelated responses); 1 for ``C = 1``."""
        return self.entropy / math.log(self.width) if self.width > 1 else 1.0

    @property
    def kl(self) -> float:
        return kl_divergence(self.spectrum)

    @property
    def cumulative_energy(self) -> np.ndarray:
        return np.cumsum(self.spectrum)

    def _bounded(self, k: int, min_keep: int) -> int:
        # Inactive units carry no energy and are removed first: never keep
        # them, unless min_keep insists (a dead layer still keeps min_keep).
        return max(min(k, self.active), min(int(min_keep), self.width), 1)

    def keep_energy(self, tau: float, *, min_keep: int = 1) -> int:
        return self._bounded(energy_keep(self.spectrum, tau, min_keep=min_keep), min_keep)

    def keep_kl(self, *, min_keep: int = 1) -> int:
        return self._bounded(kl_keep(self.spectrum), min_keep)

    def keep_indices(self, keep: int) -> list[int]:
        return select_filters(self.cov, keep)

    def summary(self, taus: Iterable[float] = DEFAULT_TAUS, *, min_keep: int = 1) -> dict[str, Any]:
        """JSON-ready numbers for reports (no matrices)."""
        return {
            "site": self.site, "width": self.width, "samples": self.samples,
            "inactive": len(self.inactive), "entropy": self.entropy,
            "normalized_entropy": self.normalized_entropy, "kl": self.kl,
            "keep_kl": self.keep_kl(min_keep=min_keep),
            "keep_energy": {f"{t:g}": self.keep_energy(t, min_keep=min_keep) for t in taus},
            **self.info,
        }


# --------------------------------------------------------------------------
# Recipes over all sites

@dataclass
class Recipe:
    """How many filters each analysed site keeps, and how that was decided."""

    method: str                    # "energy" | "kl" | "target"
    keep: dict[str, int]
    tau: float | None = None       # the energy threshold (energy / target)
    cost: float | None = None      # the cost model's value for ``keep`` (target)
    target: float | None = None    # the requested cost (target)

    def describe(self) -> str:
        if self.method == "kl":
            return "PFA-KL"
        if self.method == "energy":
            return f"PFA-En tau={self.tau:.4g}"
        return f"PFA-En tau={self.tau:.6g} (target {self.target:.6g}, reached {self.cost:.6g})"


def recipe_energy(layers: Sequence[LayerSpectrum], tau: float, *, min_keep: int = 1) -> Recipe:
    tau = _check_tau(tau)
    return Recipe("energy", {l.site: l.keep_energy(tau, min_keep=min_keep) for l in layers}, tau=tau)


def recipe_kl(layers: Sequence[LayerSpectrum], *, min_keep: int = 1) -> Recipe:
    return Recipe("kl", {l.site: l.keep_kl(min_keep=min_keep) for l in layers})


def recipe_for_target(layers: Sequence[LayerSpectrum], cost: CostModel, target: float, *,
                      min_keep: int = 1) -> Recipe:
    """PFA-En with the largest common ``tau`` whose recipe costs at most ``target``.

    ``keep(tau)`` only changes where ``tau`` crosses a value of some site's
    cumulative energy, so the bisection runs over those breakpoints (plus 0)
    and is exact: the result meets the target, and the next breakpoint, which
    adds one filter to some site, would not.
    """
    if not layers:
        raise PycompressError("footprint target: no analysed layer to prune")
    breakpoints = np.unique(np.clip(np.concatenate([[0.0]] + [l.cumulative_energy for l in layers]), 0.0, 1.0))

    def recipe(i: int) -> tuple[dict[str, int], float]:
        keep = {l.site: l.keep_energy(float(breakpoints[i]), min_keep=min_keep) for l in layers}
        return keep, float(cost(keep))

    best = recipe(0)
    if best[1] > target:
        raise PycompressError(
            f"footprint target {target:.6g} is out of reach: keeping {min_keep} filter(s) in every analysed "
            f"layer still costs {best[1]:.6g} (the layers PFA cannot prune stay whole)")
    # Invariant: breakpoint lo meets the target, hi does not (len: not tried).
    lo, hi = 0, len(breakpoints)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        candidate = recipe(mid)
        if candidate[1] <= target:
            lo, best = mid, candidate
        else:
            hi = mid
    return Recipe("target", best[0], tau=float(breakpoints[lo]), cost=best[1], target=float(target))


def pfa_recipe(layers: Sequence[LayerSpectrum], *, energy: float | None = None, target: float | None = None,
               cost: CostModel | None = None, min_keep: int = 1) -> Recipe:
    """PFA-KL by default; PFA-En with ``energy``; a footprint ``target`` (absolute, in ``cost``'s units)."""
    if energy is not None and target is not None:
        raise PycompressError("choose one of an energy threshold and a footprint target, not both")
    if target is not None:
        if cost is None:
            raise PycompressError("a footprint target needs a cost model")
        return recipe_for_target(layers, cost, target, min_keep=min_keep)
    if energy is not None:
        return recipe_energy(layers, energy, min_keep=min_keep)
    return recipe_kl(layers, min_keep=min_keep)


def build_plan(layers: Sequence[LayerSpectrum], recipe: Recipe, *, model: str = "",
               meta: Mapping[str, Any] | None = None) -> Plan:
    """A Plan of ``prune`` decisions with explicit ``keep_indices`` (sites kept whole are left out)."""
    plan = Plan(model=model, meta={"method": "pfa", "recipe": recipe.method, "tau": recipe.tau,
                                   "cost": recipe.cost, "target": recipe.target, **(meta or {})})
    for layer in layers:
        keep = recipe.keep.get(layer.site, layer.width)
        if keep >= layer.width:
            continue
        indices = layer.keep_indices(keep)
        note = (f"{recipe.describe()}: keep {keep}/{layer.width} "
                f"(spectral entropy {layer.normalized_entropy:.3f} of max, {len(layer.inactive)} inactive)")
        plan.add(LayerDecision(layer.site, ACTION, {"keep_indices": indices}, note=note))
    return plan
