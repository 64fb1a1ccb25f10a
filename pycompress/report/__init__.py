"""Reports: JSON + Markdown + HTML with plots (BO trace, Pareto front, per-layer decisions)."""

from pycompress.report.render import pareto_front, render_markdown, summary_rows, write_report

__all__ = ["pareto_front", "render_markdown", "summary_rows", "write_report"]
