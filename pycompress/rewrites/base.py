"""What every rewrite is: find sites, say why a site cannot take the action,
apply a decision in place.

Modelled on onnxscript's rewrite rules: a rewrite is small, its check returns
*why* it does not apply, and each rewrite module exports one ``REWRITE``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Sequence

import numpy as np
import onnx_ir as ir

from pycompress.errors import PycompressError
from pycompress.plan import LayerDecision

# Batches of intermediate values of the model being rewritten, on calibration
# data: given value names, yields {name: array} per batch. Supplied by the
# pipeline / CLI (which own onnxruntime); rewrites never run a model.
ActivationSource = Callable[[Sequence[str]], Iterable[dict[str, np.ndarray]]]


@dataclass
class Site:
    """A place in the model where an action can (or cannot) be applied."""

    name: str                      # decision site id: a node name or a group id
    action: str
    nodes: list[str]               # the nodes the action would touch
    ok: bool = True
    reason: str = ""               # why not, when not ok
    info: dict[str, Any] = field(default_factory=dict)  # r_max, full_rank, width, params, macs ...


# Batches of values of a given model on calibration data: for rewrites that
# read the graph they are rewriting after changing it (quantization), when the
# caller rewrites copies (searches) and ``activations`` cannot know which.
ModelActivationSource = Callable[[ir.Model, Sequence[str]], Iterable[dict[str, np.ndarray]]]


@dataclass
class ApplyContext:
    activations: ActivationSource | None = None
    options: dict[str, Any] = field(default_factory=dict)
    model_activations: ModelActivationSource | None = None
    # The same calibration batches through the model as it was before the plan (names unchanged by
    # weight rewrites): for corrections toward the original's values, not only the layer's own error.
    reference_activations: ActivationSource | None = None


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list",
               object: "any value"}


@dataclass(frozen=True)
class ParamSpec:
    """One parameter a rewrite's decisions take: what ``check_params``, ``plan --explain``,
    the CLI help and the search space read.

    ``low``/``high`` bound numbers (inclusive; ``high_open`` excludes ``high``);
    ``high`` may name a ``site.info`` key when the bound is the site's (e.g. the
    group's ``width``). ``checked_by_rewrite``: the rewrite's ``check_params``
    override checks the value, not the base class: its range depends on the
    site and other params in a way a bound cannot say (rank vs this structure's
    full rank), or its error wording predates the specs and tests match it.
    ``searchable``: the parameter a search space varies for this action.
    """

    name: str
    type: type
    help: str
    default: Any = None            # None: no default (required, or decided by the apply context)
    low: float | None = None
    high: float | str | None = None
    high_open: bool = False
    choices: tuple[Any, ...] = ()
    required: bool = False
    nullable: bool = False         # None means "absent" (follow the default / the apply context)
    searchable: bool = False
    checked_by_rewrite: bool = False
    expect: str = ""               # wording after "must be" in errors, when the derived one would mislead

    def bounds(self, site: Site | None = None) -> tuple[Any, Any]:
        high = self.high
        if isinstance(high, str):
            high = int(site.info[high]) if site is not None and high in site.info else None
        return self.low, high

    def describe(self, site: Site | None = None) -> str:
        """What a value must be, e.g. "an integer in [1, 32]" (the site's bound when given)."""
        if self.expect:
            return self.expect
        if self.choices:
            return f"one of {list(self.choices)}"
        text = _TYPE_WORDS[self.type]
        low, high = self.bounds(site)
        if high is None and isinstance(self.high, str):
            high = f"the site's {self.high}"
        if low is not None or high is not None:
            close = ")" if self.high_open else "]"
            low_text = "-inf" if low is None else f"{low:g}"
            high_text = "inf" if high is None else (high if isinstance(high, str) else f"{high:g}")
            text += f" in [{low_text}, {high_text}{close}"
        return text

    def line(self) -> str:
        """One line for `plan --explain` and `pycompress plan --help`: name, what it takes, default, help."""
        facts = [self.describe()]
        if self.required:
            facts.append("required")
        elif self.default is not None:
            default = str(self.default).lower() if self.type is bool else repr(self.default)  # as JSON writes it
            facts.append(f"default {default}")
        if self.searchable:
            facts.append("searched by `compress`")
        return f"{self.name} ({'; '.join(facts)}): {self.help}"

    def check(self, site: Site, value: Any) -> None:
        """Raise PycompressError naming the site and the parameter when ``value`` is not allowed."""
        if value is None and self.nullable:
            return
        problem = f"site '{site.name}': '{self.name}' must be {self.describe(site)}, got {value!r}"
        if self.type is float:
            ok_type = isinstance(value, (int, float, np.integer, np.floating))
        elif self.type is int:
            ok_type = isinstance(value, (int, np.integer))
        else:
            ok_type = isinstance(value, self.type)
        if isinstance(value, (bool, np.bool_)) and self.type not in (bool, object):
            ok_type = False   # JSON true is not the number 1
        if not ok_type or (self.choices and value not in self.choices):
            raise PycompressError(problem)
        low, high = self.bounds(site)
        if (low is not None and value < low) or (high is not None
                                                 and (value >= high if self.high_open else value > high)):
            raise PycompressError(problem)


def param_specs(*specs: ParamSpec) -> dict[str, ParamSpec]:
    """``Rewrite.params``: the specs by name, in declaration order."""
    return {spec.name: spec for spec in specs}


@dataclass(frozen=True)
class SearchSettings:
    """What a search asks of every searched site (the compress settings of the same names).

    ``max_prune``: the largest fraction of a channel count the search may
    remove; ``align``: channel counts are searched in multiples of it.
    """

    max_prune: float = 1.0
    align: int = 1


# The encodings of a searched parameter (pycompress.decisions.bo.encoding.Dimension's kinds).
SEARCH_KINDS = ("rank", "keep")


@dataclass(frozen=True)
class SearchRange:
    """The values a search tries for one site's searchable parameter: what
    ``Rewrite.search_dimension`` declares and the pipeline turns into one
    coordinate of the search space.

    ``kind`` "rank": values ``1..high``, one lattice step each (a factorization's
    rank; ``positions``, when given, returns the coordinate of each rank, or
    None for even spacing; it is only called for a site searched on its own).
    ``kind`` "keep": values ``low..high`` in multiples of ``align`` plus ``high``
    (channel counts, bit widths). ``untouched_from``: values at or above it
    leave the layer as it is.
    """

    param: str
    kind: str
    high: int
    low: int = 1
    untouched_from: int | None = None
    align: int = 1
    positions: Callable[[], tuple[float, ...] | None] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in SEARCH_KINDS:
            raise PycompressError(f"search range of '{self.param}': unknown kind '{self.kind}' "
                                  f"(one of {', '.join(SEARCH_KINDS)})")


@dataclass
class RefitSpec:
    """What closed-form recovery reads from one applied decision (``Rewrite.refit_spec``).

    ``layers``: ``{"output": tensor, "rank": r}`` for each rewritten layer to refit,
    found by the tensor it produces (never by node name); ``rank`` for a factored
    pair, absent for a single layer. ``teacher_channels``: tensors of the compressed
    model that hold only these channels of the teacher's tensor of the same name
    (pruned producers). ``notes``: what recovery will not refit, and why.
    """

    layers: list[dict[str, Any]] = field(default_factory=list)
    teacher_channels: dict[str, list[int]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class Rewrite(ABC):
    action: ClassVar[str]
    summary: ClassVar[str]
    # The parameters a decision takes, by name (see ParamSpec): check_params,
    # `plan --explain`, the CLI help and the search space all read them.
    params: ClassVar[dict[str, ParamSpec]]
    # Application order when several actions meet: pruning first (it changes
    # shapes), then factorizations, then weight sharing, then quantization.
    order: ClassVar[int] = 50
    # What this rewrite does to a site's layer, for exclusions between actions:
    # "shape" (widths change, the layers stay: pruning), "replace" (the layer
    # becomes new nodes: factorizations), "weights" (the weight constant becomes
    # computed values: sharing), "precision" (quantization).
    changes: ClassVar[str] = ""
    # The changes (above) of an earlier action on the same site that rule this
    # rewrite out there, each with the reason ("{action}": the earlier action).
    # The search space skips such sites; check_plan_composes refuses such plans.
    excluded_by: ClassVar[dict[str, str]] = {}
    # Applied after closed-form recovery (which refits float layers) rather than
    # with the rest of the plan: quantization must see the recovered weights.
    after_recovery: ClassVar[bool] = False
    # The search objectives whose cost this rewrite reduces ("size": parameters, "bytes":
    # packed bytes, "macs", "latency"); searching it under another objective is refused.
    reduces: ClassVar[tuple[str, ...]] = ("size", "bytes", "macs", "latency")
    # The encoding of the searched parameter for the default search_dimension.
    search_kind: ClassVar[str] = "keep"
    # Fragments of the names apply gives the nodes and values it creates. Only for
    # checking that nothing outside the rewrite matches them: the pipeline reads what
    # apply returned instead (tests/test_import_contracts.py scans it for these).
    created_names: ClassVar[tuple[str, ...]] = ()
    # Finds its sites through inferred shapes (a Reshape's computed shape): apply_plan re-infers
    # them before this action when an earlier action of the plan changed the graph.
    reads_shapes: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        params = cls.__dict__.get("params")
        if isinstance(params, dict) and any(isinstance(v, str) for v in params.values()):
            # Older rewrites (test doubles among them) describe params as name -> help:
            # untyped specs, searchable the one named rank / keep / bits as the search
            # space guessed before the specs.
            searched = next((n for n in ("rank", "keep", "bits") if n in params), None)
            # The search bounds the guess implied: a rank up to the site's r_max, a
            # channel count up to its width (checked by the rewrite, as before).
            bounds = {"rank": (1, "r_max"), "keep": (1, "width")}.get(searched or "", (None, None))
            cls.params = param_specs(*(ParamSpec(name, object, text, searchable=name == searched,
                                                 **({"low": bounds[0], "high": bounds[1], "checked_by_rewrite": True}
                                                    if name == searched else {}))
                                       for name, text in params.items()))
            if searched == "rank" and "search_kind" not in cls.__dict__:
                cls.search_kind = "rank"

    @abstractmethod
    def sites(self, model: ir.Model) -> list[Site]:
        """Every candidate site, applicable or not (with the reason)."""

    def site(self, model: ir.Model, name: str) -> Site:
        for site in self.sites(model):
            if site.name == name:
                return site
        raise PycompressError(f"site '{name}': not found in the model for action '{self.action}'")

    def check_params(self, site: Site, params: dict[str, Any]) -> None:
        """Raise PycompressError naming the site if params are wrong for it."""
        unknown = set(params) - set(self.params)
        if unknown:
            raise PycompressError(
                f"site '{site.name}': unknown parameter(s) {sorted(unknown)} for '{self.action}'; "
                f"allowed: {sorted(self.params)}")
        for spec in self.params.values():
            if spec.checked_by_rewrite:
                continue
            if spec.name not in params:
                if spec.required:
                    raise PycompressError(f"site '{site.name}': '{self.action}' needs a '{spec.name}' parameter")
            else:
                spec.check(site, params[spec.name])

    @classmethod
    def searchable_param(cls) -> ParamSpec | None:
        """The parameter a search space varies for this action (None: not searchable)."""
        return next((spec for spec in cls.params.values() if spec.searchable), None)

    def search_dimension(self, model: ir.Model, site: Site, settings: SearchSettings) -> SearchRange | str:
        """The values a search tries at ``site`` (an applicable one), or why it searches nothing there.

        Default, from the searchable ParamSpec: its bounds at the site (``high``
        may name a ``site.info`` key), encoded as ``search_kind``; "keep" leaves
        the site untouched at ``high``. Override for ranges a bound cannot say.
        """
        spec = self.searchable_param()
        if spec is None:
            raise PycompressError(f"action '{self.action}' has no searchable parameter")
        low, high = spec.bounds(site)
        low, high = int(low if low is not None else 1), int(high or 0)
        if self.search_kind == "rank":
            return SearchRange(spec.name, "rank", high) if high >= 1 else "nothing to reduce"
        if high <= low:
            return "nothing to reduce"
        return SearchRange(spec.name, "keep", high, low, untouched_from=high)

    def excluded_after(self, earlier: Rewrite) -> str | None:
        """Why this rewrite cannot take a site ``earlier`` already took (None: they compose)."""
        reason = self.excluded_by.get(earlier.changes) if earlier.changes else None
        return None if reason is None else reason.format(action=earlier.action)

    def predicted_cost(self, objective: str) -> float | None:
        """For rewrites too slow to apply once per site while the search measures
        costs (quantization calibrates the whole graph): the cost a site's layers
        count under ``objective`` ("size", "bytes", "macs", "latency") at the
        searched parameter's low end, relative to the high end (the layer as it
        is). None (default): the pipeline applies the rewrite at two values and
        measures the rewritten graph.
        """
        return None

    def cost_owner(self, site: Site) -> str | None:
        """The node that owns the cost of nodes ``apply`` adds while keeping the
        site's layers (sharing's codebook lookup belongs to the layer it feeds);
        None (default): added nodes replace the removed ones, at their cost."""
        return None

    def prepare(self, model: ir.Model, decisions: list[LayerDecision] | None, activations: ActivationSource,
                log: Callable[[str], None]) -> dict[str, Any]:
        """``ApplyContext`` options computed once per run on the original ``model`` (its values
        through ``activations``; nothing runs until called), for a plan's ``decisions`` of this
        action, or for a search over it (``decisions`` None); ``log`` takes a progress line.
        E.g. pruning's channel statistics. Default: nothing."""
        return {}

    def search_seeds(self, model: ir.Model, options: dict[str, Any], target_macs: float | None) -> list:
        """Plans a search over this action evaluates before its own initial design (what ``prepare``
        computed is in ``options``; ``target_macs`` is the MACs target, if the objective is MACs).
        E.g. pruning's global allocation of attention heads and FFN widths on a token model.
        Default: none."""
        return []

    def describe(self, decisions: list[LayerDecision]) -> str:
        """A progress line for applying ``decisions`` of this action at once (after recovery)."""
        return f"{self.action}: {len(decisions)} decision(s)"

    def refit_spec(self, site: str, result: dict[str, Any]) -> RefitSpec:
        """What recovery refits after this rewrite applied a decision at ``site``
        with ``result`` (what ``apply`` returned). Default: ``result["refit"]``."""
        return RefitSpec(layers=list(result.get("refit", [])))

    def checked_site(self, model: ir.Model, decision: LayerDecision) -> Site:
        """The decision's site, refused (naming it) when the rewrite cannot apply there or its params are wrong."""
        site = self.site(model, decision.site)
        if not site.ok:
            raise PycompressError(f"site '{site.name}': cannot apply '{self.action}': {site.reason}")
        self.check_params(site, decision.params)
        return site

    @abstractmethod
    def apply(self, model: ir.Model, decision: LayerDecision, ctx: ApplyContext) -> dict[str, Any]:
        """Apply in place; return what changed (params/MACs before and after...)."""

    def finish(self, model: ir.Model, ctx: ApplyContext) -> dict[str, Any]:
        """Called once after the plan's last decision of this action (in place); what it did.

        For rewrites that act on the whole graph at once (quantization
        calibrates every activation range in one pass); others do nothing.
        """
        return {}

    def starting_decision(self, model: ir.Model, site: Site, **options: Any) -> LayerDecision | None:
        """A sensible default decision for ``pycompress plan`` (None: leave as is)."""
        return None
