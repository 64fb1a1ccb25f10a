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


class Rewrite(ABC):
    action: ClassVar[str]
    summary: ClassVar[str]
    # The parameters a decision takes, by name (see ParamSpec): check_params,
    # `plan --explain`, the CLI help and the search space all read them.
    params: ClassVar[dict[str, ParamSpec]]
    # Application order when several actions meet: pruning first (it changes
    # shapes), then factorizations, then weight sharing, then quantization.
    order: ClassVar[int] = 50

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        params = cls.__dict__.get("params")
        if isinstance(params, dict) and any(isinstance(v, str) for v in params.values()):
            # Older rewrites (test doubles among them) describe params as name -> help:
            # untyped specs, searchable the one named rank / keep / bits as the search
            # space guessed before the specs.
            searched = next((n for n in ("rank", "keep", "bits") if n in params), None)
            cls.params = param_specs(*(ParamSpec(name, object, text, searchable=name == searched)
                                       for name, text in params.items()))

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
