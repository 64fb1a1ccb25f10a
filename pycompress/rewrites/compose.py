"""A plan checked as a whole, before any work: decisions that compose.

``apply_plan`` validates each decision against the model as loaded, then
applies them in rewrite order (pruning, factorizations, sharing), each on the
model the earlier ones left. So a decision valid alone can still fail late:
an svd rank above the rank of the layer once pruned, or a share of a layer an
svd already replaced. ``check_plan_composes`` finds those before anything is
fitted (``apply`` used to report them after minutes of data-aware fitting):

- two actions on one site compose only where the later rewrite allows it
  (``Rewrite.excluded_by``: a layer is factored once; a factored layer is not
  shared; a shared layer is not quantized; a factored layer may be quantized,
  the quantization covers the layers it became);
- each order level (``Rewrite.order``) is checked against the model as the
  earlier levels leave it, applying those levels weight-only on a copy (no
  data, no fitting: the shapes are what matters). The last level is only
  checked, never applied, so a plan of one action costs one validation.
"""

from __future__ import annotations

from itertools import groupby

import onnx_ir as ir

from pycompress.errors import PycompressError
from pycompress.ir import infer_model_shapes
from pycompress.plan import LayerDecision, Plan
from pycompress.rewrites import ApplyContext, get_rewrite, validate_plan


def _weight_only(decision: LayerDecision) -> LayerDecision:
    params = {k: v for k, v in decision.params.items() if k != "data_aware"}
    return LayerDecision(decision.site, decision.action, params, decision.note)


def _excluded(first: str, second: str) -> bool:
    """Whether two actions cannot share a site, as the rewrites declare it (``Rewrite.excluded_by``)."""
    a, b = sorted((get_rewrite(first), get_rewrite(second)), key=lambda r: r.order)
    return bool(b.excluded_after(a) or (a.order == b.order and a.excluded_after(b)))


def check_plan_composes(model: ir.Model, plan: Plan, *, where: str = "plan") -> None:
    """Raise PycompressError naming the plan and site when the plan as a whole would not apply."""
    try:
        validate_plan(model, plan)
    except PycompressError as exc:
        raise PycompressError(f"{where}: {exc}") from None
    by_site: dict[str, list[str]] = {}
    for d in plan.decisions:
        for other in by_site.get(d.site, []):
            if other != d.action and _excluded(other, d.action):
                raise PycompressError(f"{where}: site '{d.site}' has both '{other}' and '{d.action}': two "
                                      "actions cannot rewrite one layer (the second would not find the layer the "
                                      "first replaced); keep one")
        by_site.setdefault(d.site, []).append(d.action)
    ordered = sorted(plan.decisions, key=lambda d: get_rewrite(d.action).order)
    levels = [list(g) for _, g in groupby(ordered, key=lambda d: get_rewrite(d.action).order)]
    if len(levels) < 2:
        return
    working = model.clone()
    context = ApplyContext(options={"data_aware": False})
    for i, level in enumerate(levels):
        if i:
            earlier = ", ".join(sorted({d.action for lv in levels[:i] for d in lv}))
            for decision in level:
                rewrite = get_rewrite(decision.action)
                try:
                    site = rewrite.site(working, decision.site)
                except PycompressError as exc:
                    raise PycompressError(f"{where}: {exc} once the plan's {earlier} is applied") from None
                if not site.ok:
                    raise PycompressError(f"{where}: site '{decision.site}': cannot apply '{decision.action}' "
                                          f"after the plan's {earlier}: {site.reason}")
                try:
                    rewrite.check_params(site, decision.params)
                except PycompressError as exc:
                    raise PycompressError(f"{where}: {exc} (once the plan's {earlier} is applied)") from None
        if i < len(levels) - 1:
            for decision in level:
                get_rewrite(decision.action).apply(working, _weight_only(decision), context)
            if any(get_rewrite(d.action).reads_shapes for later in levels[i + 1:] for d in later):
                infer_model_shapes(working, where=where)    # as apply_plan does
