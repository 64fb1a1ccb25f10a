"""The one registry of rewrites, and applying a Plan to a model.

Add a rewrite by writing ``rewrites/<name>.py`` that defines ``REWRITE`` and
listing the module in ``_MODULES``.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

import onnx_ir as ir

from pycompress.errors import PycompressError
from pycompress.ir import check_model, infer_model_shapes
from pycompress.plan import LayerDecision, Plan
from pycompress.rewrites.base import ActivationSource, ApplyContext, Rewrite, Site

_MODULES: list[str] = ["prune_channels", "qk_rank", "svd", "conv_lowrank", "weight_sharing", "quantize"]

REGISTRY: dict[str, Rewrite] = {}
for _name in _MODULES:
    _rewrite = importlib.import_module(f"pycompress.rewrites.{_name}").REWRITE
    REGISTRY[_rewrite.action] = _rewrite


def get_rewrite(action: str) -> Rewrite:
    try:
        return REGISTRY[action]
    except KeyError:
        raise PycompressError(f"unknown action '{action}'; known: {', '.join(sorted(REGISTRY)) or 'none'}") from None


def validate_plan(model: ir.Model, plan: Plan) -> None:
    """Check every decision against the model before anything is changed."""
    for decision in plan.decisions:
        rewrite = get_rewrite(decision.action)
        site = rewrite.site(model, decision.site)
        if not site.ok:
            raise PycompressError(f"site '{decision.site}': cannot apply '{decision.action}': {site.reason}")
        rewrite.check_params(site, decision.params)


def apply_plan(model: ir.Model, plan: Plan, ctx: ApplyContext | None = None, *, check: bool = True,
               progress: Callable[[str], None] | None = None) -> Plan:
    """Apply all decisions in place (in rewrite order) and return the plan with results.

    The whole plan is validated first, so a bad plan leaves the model untouched.
    ``progress`` gets a line before each decision (data-aware rewrites can take minutes).
    """
    ctx = ctx or ApplyContext()
    validate_plan(model, plan)
    applied = []
    ordered = sorted(enumerate(plan.decisions), key=lambda item: (get_rewrite(item[1].action).order, item[0]))
    finished: dict[str, Any] = {}
    for position, (_, decision) in enumerate(ordered):
        if position and get_rewrite(decision.action).reads_shapes and ordered[position - 1][1].action != decision.action:
            infer_model_shapes(model, where="rewritten model")   # what the earlier actions changed
        if progress:
            progress(f"[{position + 1}/{len(ordered)}] {decision.action} {decision.site}")
        result = get_rewrite(decision.action).apply(model, decision, ctx)
        applied.append(LayerDecision(decision.site, decision.action, dict(decision.params), decision.note, result))
        if position + 1 == len(ordered) or ordered[position + 1][1].action != decision.action:
            done = get_rewrite(decision.action).finish(model, ctx)   # the action's last decision
            if done:
                finished[decision.action] = done
    infer_model_shapes(model, where="rewritten model")
    if check:
        check_model(model)
    by_key = {(d.site, d.action): d for d in applied}
    meta = {**plan.meta, **({"finished": finished} if finished else {})}
    return Plan([by_key[(d.site, d.action)] for d in plan.decisions], plan.model, meta, plan.version)


def all_sites(model: ir.Model, actions: list[str]) -> dict[str, list[Site]]:
    return {action: get_rewrite(action).sites(model) for action in actions}


__all__ = ["REGISTRY", "ActivationSource", "ApplyContext", "Rewrite", "Site", "all_sites", "apply_plan",
           "get_rewrite", "validate_plan"]
