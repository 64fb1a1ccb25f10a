"""Turn a compression report (a JSON-able dict) into report.json, report.md,
report.html and PNG plots a person would look at.

The report dict is produced by the pipeline; keys used here (all optional
except ``before``/``after``):
    model, output, method, actions, seconds, stages [{name, seconds}],
    before / after {params, macs, bytes, file_bytes, latency_ms_p50, latency_ms_p90},
    fidelity {function_norm, function_norm_se, top1_agreement, accuracy_before, accuracy_after},
    search {gamma, certificate, probability, delta, delta_scale, epsilon, stop_reason,
            trace [{eval, ratio, fidelity_mean, fidelity_se, J, z_max}]},
    layers [{site, action, params, params_before, params_after}],
    recovery {layers [{nodes, error_before, error_after, kept}]}.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import numpy as np

from pycompress.ir.io import atomic_write_text


def pareto_front(ratios: list[float], errors: list[float]) -> list[int]:
    """Indices of points not dominated in (ratio, error), both to minimize, by increasing ratio."""
    order = sorted(range(len(ratios)), key=lambda i: (ratios[i], errors[i]))
    front, best = [], float("inf")
    for i in order:
        if errors[i] < best:
            front.append(i)
            best = errors[i]
    return front


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return "-" if value is None else str(value)


def summary_rows(report: dict) -> list[tuple[str, str, str, str]]:
    """(measure, before, after, after/before) rows for the before/after table."""
    before, after = report.get("before", {}), report.get("after", {})
    rows = []
    for key, label in (("params", "parameters"), ("macs", "MACs"), ("bytes", "weight bytes"),
                       ("file_bytes", "file bytes"), ("latency_ms_p50", "latency p50 (ms)"),
                       ("latency_ms_p90", "latency p90 (ms)")):
        if key in before or key in after:
            b, a = before.get(key), after.get(key)
            ratio = f"{a / b:.3f}" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else "-"
            rows.append((label, _fmt(b), _fmt(a), ratio))
    return rows


def _plots(report: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    trace = (report.get("search") or {}).get("trace") or []
    if trace:
        evals = [t.get("eval", i + 1) for i, t in enumerate(trace)]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        js = [t.get("J") for t in trace]
        ax1.plot(evals, js, "o", ms=3, label="J of each evaluation")
        ax1.plot(evals, np.maximum.accumulate([j if j is not None else -np.inf for j in js]), "-",
                 label="best J so far")
        ax1.set_xlabel("evaluation")
        ax1.set_ylabel("J = gamma Q + 1/R")
        ax1.legend()
        z = [t.get("z_max") for t in trace]
        if any(v is not None for v in z):
            ax2.plot(evals, [np.nan if v is None else v for v in z], "-o", ms=3, label="z_max")
            eps = (report.get("search") or {}).get("epsilon")
            if eps:
                from scipy.stats import norm
                ax2.axhline(norm.ppf(eps), color="r", ls="--", label=f"certificate: z_max <= Phi^-1({eps})")
            ax2.set_xlabel("evaluation")
            ax2.set_ylabel("z_max (PAC acquisition)")
            ax2.legend()
        fig.suptitle("PAC-BO trace")
        fig.tight_layout()
        fig.savefig(out / "bo_trace.png", dpi=110)
        plt.close(fig)
        made.append("bo_trace.png")

        ratios = [t.get("ratio") for t in trace]
        errs = [t.get("fidelity_mean") for t in trace]
        ok = [i for i in range(len(trace)) if ratios[i] is not None and errs[i] is not None]
        if ok:
            r = [ratios[i] for i in ok]
            e = [errs[i] for i in ok]
            se = [trace[i].get("fidelity_se") or 0.0 for i in ok]
            fig, ax = plt.subplots(figsize=(6, 4.5))
            ax.errorbar(r, e, yerr=se, fmt="o", ms=4, alpha=0.6, label="evaluated (mean +- s.e.)")
            front = pareto_front(r, e)
            ax.plot([r[i] for i in front], [e[i] for i in front], "r-", label="Pareto front")
            chosen = report.get("after", {}).get("ratio_of_compressed_layers")
            if chosen is not None:
                ax.axvline(chosen, color="g", ls=":", label="chosen")
            ax.set_xlabel("size ratio R (compressed / original layers)")
            ax.set_ylabel("fidelity loss (lower is better)")
            ax.legend()
            fig.tight_layout()
            fig.savefig(out / "pareto.png", dpi=110)
            plt.close(fig)
            made.append("pareto.png")

    layers = report.get("layers") or []
    kept = [(l["site"], l.get("params_after"), l.get("params_before")) for l in layers
            if l.get("params_before")]
    if kept:
        fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(kept)), 4))
        ax.bar(range(len(kept)), [a / b for _, a, b in kept])
        ax.set_xticks(range(len(kept)))
        ax.set_xticklabels([s for s, _, _ in kept], rotation=90, fontsize=7)
        ax.set_ylabel("params after / before")
        ax.set_ylim(0, 1.05)
        ax.set_title("per-layer compression")
        fig.tight_layout()
        fig.savefig(out / "layers.png", dpi=110)
        plt.close(fig)
        made.append("layers.png")
    return made


def render_markdown(report: dict, plots: list[str]) -> str:
    lines = [f"# pycompress report: {report.get('model', '')}", ""]
    lines.append(f"- output: `{report.get('output', '')}`")
    lines.append(f"- method: {report.get('method', '-')}, actions: {', '.join(report.get('actions', []))}")
    search = report.get("search") or {}
    if search:
        scale = search.get("delta_scale") or 1.0
        unit = (f" (delta {_fmt(search['delta'] / scale)} in units of Q)"
                if scale > 1 and search.get("delta") is not None else "")
        cert = ("certified: P(J(t*) - J(t^) < {delta}){unit} >= {p}".format(
            delta=_fmt(search.get("delta")), unit=unit, p=_fmt(1 - search.get("epsilon", 0)))
            if search.get("certificate") else f"no certificate ({search.get('stop_reason', 'budget')})")
        lines.append(f"- search: {len(search.get('trace', []))} evaluations, gamma {_fmt(search.get('gamma'))}, {cert}")
    if report.get("seconds") is not None:
        lines.append(f"- total time: {report['seconds']:.1f} s")
    lines += ["", "| measure | before | after | after/before |", "|---|---:|---:|---:|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in summary_rows(report)]
    fid = report.get("fidelity") or {}
    if fid:
        lines += ["", "## Fidelity (on the calibration pool)", ""]
        for key, value in fid.items():
            lines.append(f"- {key}: {_fmt(value)}")
    stages = report.get("stages") or []
    if stages:
        lines += ["", "## Stages", "", "| stage | seconds |", "|---|---:|"]
        lines += [f"| {s['name']} | {s['seconds']:.2f} |" for s in stages]
    layers = report.get("layers") or []
    if layers:
        lines += ["", "## Decisions", "", "| site | action | params | params before | params after |",
                  "|---|---|---|---:|---:|"]
        lines += [f"| {l['site']} | {l['action']} | {json.dumps(l.get('params', {}), sort_keys=True)} | "
                  f"{_fmt(l.get('params_before'))} | {_fmt(l.get('params_after'))} |" for l in layers]
    rec = (report.get("recovery") or {}).get("layers") or []
    if rec:
        lines += ["", "## Recovery (closed form)", "", "| layer | error before | error after | kept |",
                  "|---|---:|---:|---|"]
        lines += [f"| {'/'.join(r['nodes'])} | {_fmt(r['error_before'])} | {_fmt(r['error_after'])} | "
                  f"{'yes' if r['kept'] else 'no'} |" for r in rec]
    tuned = report.get("finetune") or {}
    if tuned.get("epochs"):
        kept = f"kept epoch {tuned.get('best_epoch')}" if tuned.get("kept") else "not kept"
        lines += ["", f"## Fine-tuning ({kept})",
                  "", "| epoch | train loss | held-out loss | held-out MSE | agreement | seconds |",
                  "|---:|---:|---:|---:|---:|---:|"]
        start = tuned.get("before") or {}
        if start:
            lines.append(f"| 0 | - | {_fmt(start.get('loss'))} | {_fmt(start.get('mse'))} | "
                         f"{_fmt(start.get('agreement'))} | - |")
        lines += [f"| {e['epoch']} | {_fmt(e['train_loss'])} | {_fmt(e['heldout'].get('loss'))} | "
                  f"{_fmt(e['heldout'].get('mse'))} | {_fmt(e['heldout'].get('agreement'))} | {e['seconds']:.1f} |"
                  for e in tuned["epochs"]]
    held = report.get("heldout") or {}
    if held:
        lines += ["", "## Held-out data (never seen by the search or the recovery)", ""]
        lines += [f"- {key}: {_fmt(value)}" for key, value in held.items()]
    bench = [row for row in report.get("bench") or [] if row.get("latency_ms")]
    if bench:
        base = bench[0]["latency_ms"]["p50"]
        lines += ["", f"## Latency ({bench[0].get('provider', '')}, batch {bench[0].get('batch', 1)})", "",
                  "| model | p50 ms | p90 ms | p50 / original |", "|---|---:|---:|---:|"]
        lines += [f"| {row['name']} | {row['latency_ms']['p50']:.3f} | {row['latency_ms']['p90']:.3f} | "
                  f"{row['latency_ms']['p50'] / base:.3f} |" for row in bench]
    for plot in plots:
        lines += ["", f"![{plot}]({plot})"]
    return "\n".join(lines) + "\n"


def render_html(markdown: str, title: str) -> str:
    """A dependency-free HTML page: tables and images from the Markdown above."""
    body, in_table = [], False
    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if all(set(c) <= set("-:") for c in cells):
                continue
            if not in_table:
                body.append("<table>")
                in_table = True
                body.append("<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cells) + "</tr>")
            else:
                body.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
            continue
        if in_table:
            body.append("</table>")
            in_table = False
        if line.startswith("!["):
            src = line[line.index("(") + 1:-1]
            body.append(f'<p><img src="{html.escape(src)}" style="max-width:100%"></p>')
        elif line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("- "):
            body.append(f"<li>{html.escape(line[2:])}</li>")
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
    if in_table:
        body.append("</table>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child{text-align:left}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_report(report: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write report.json, report.md, report.html and the plots into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = _plots(report, out)
    markdown = render_markdown(report, plots)
    paths = {
        "json": atomic_write_text(out / "report.json", json.dumps(report, indent=2, default=_jsonable) + "\n"),
        "md": atomic_write_text(out / "report.md", markdown),
        "html": atomic_write_text(out / "report.html", render_html(markdown, f"pycompress: {report.get('model', '')}")),
    }
    paths.update({p: out / p for p in plots})
    return paths


def _jsonable(obj: Any):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")
