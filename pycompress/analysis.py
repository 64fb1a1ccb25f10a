"""PFA on a model with data (``pycompress analyze``): kept as the name the CLI,
tools and tests import; the wiring lives in ``pycompress.pipeline.pfa``, next to
the other planners."""

from pycompress.pipeline.pfa import (COST_MEASURES, AxisShrink, PfaAnalysis, PfaSite, SkippedSite, analyze,
                                     find_sites, node_label, pfa_plan, plan_from_analysis, site_cost_model,
                                     sites_from_groups)

__all__ = ["COST_MEASURES", "AxisShrink", "PfaAnalysis", "PfaSite", "SkippedSite", "analyze", "find_sites",
           "node_label", "pfa_plan", "plan_from_analysis", "site_cost_model", "sites_from_groups"]
