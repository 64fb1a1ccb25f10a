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


class Rewrite(ABC):
    action: ClassVar[str]
    summary: ClassVar[str]
    # Parameter name -> description (also feeds docs and --explain).
    params: ClassVar[dict[str, str]]
    # Application order when several actions meet: pruning first (it changes
    # shapes), then factorizations, then weight sharing, then quantization.
    order: ClassVar[int] = 50

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
