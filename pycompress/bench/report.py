"""Bench results as a Markdown table and a PNG (size vs latency vs fidelity)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from pycompress.bench.measure import ModelBench


def _human(n: float | None, unit: str = "") -> str:
    if n is None:
        return "-"
    for suffix, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{suffix}{unit}"
    return f"{n:.4g}{unit}"


def table_rows(results: Sequence[ModelBench]) -> tuple[list[str], list[list[str]]]:
    """Headers and cells shared by the terminal table and the Markdown table."""
    with_fidelity = any(r.fidelity for r in results)
    headers = ["model", "size", "size ratio", "params", "MACs", "p50 ms", "p50 spread", "p90 ms", "p99 ms",
               "samples/s"]
    if with_fidelity:
        cosine = any(r.fidelity and r.fidelity.get("cosine") is not None for r in results)
        headers += ["output error (± se)", "mean cosine" if cosine else "top-1 agreement"]
    first = results[0].file_bytes if results else 1
    rows = []
    for r in results:
        lat = r.latency_ms or {}
        row = [r.name, _human(r.file_bytes, "B"), f"{r.file_bytes / first:.3f}", _human(r.params), _human(r.macs),
               f"{lat['p50']:.2f}" if "p50" in lat else "-",
               f"{lat['round_p50_min']:.2f}-{lat['round_p50_max']:.2f}" if "round_p50_min" in lat else "-",
               *(f"{lat[k]:.2f}" if k in lat else "-" for k in ("p90", "p99")),
               f"{r.throughput:.1f}" if r.throughput else "-"]
        if with_fidelity:
            f = r.fidelity
            if f is None:
                row += ["-", "-"]
            else:
                row.append(f"{f['mean_sq_error']:.3g} ± {f['sq_error_se']:.2g}")
                if f.get("cosine") is not None:
                    row.append(f"{f['cosine']:.4f} ± {f['cosine_se']:.2g}")
                else:
                    row.append("-" if f["top1_agreement"] is None else
                               f"{100 * f['top1_agreement']:.1f}% ± {100 * f['top1_agreement_se']:.1f}")
        rows.append(row)
    return headers, rows


def markdown(results: Sequence[ModelBench]) -> str:
    headers, rows = table_rows(results)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    meta = results[0] if results else None
    if meta is not None:
        lines.append("")
        lines.append(f"Provider {meta.provider}, {meta.threads} intra-op threads, batch {meta.batch}; models timed "
                     "interleaved (rounds over all models); p50 spread: lowest-highest per-round median. "
                     "Output error: mean squared L2 distance of the outputs to the first model's, per sample.")
    errors = [f"- {r.name}: {r.error}" for r in results if r.error]
    if errors:
        lines += ["", "Not measured:"] + errors
    return "\n".join(lines) + "\n"


def plot(results: Sequence[ModelBench], path: str | Path) -> Path:
    """Left: file size vs p50 latency (bar to p90). Right (with data): file size vs top-1 agreement / output error.

    One colour per model in both panels, named in a shared legend (labels
    next to points overlap when two models have the same size).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_fidelity = any(r.fidelity for r in results)
    panels = 2 if with_fidelity else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.8), squeeze=False)
    latency_ax = axes[0][0]
    fidelity_ax = axes[0][1] if with_fidelity else None
    use_top1 = all(r.fidelity["top1_agreement"] is not None for r in results if r.fidelity)
    markers = "osD^v<>p*h"
    for i, r in enumerate(results):
        style = {"color": f"C{i % 10}", "marker": markers[i % len(markers)], "markersize": 8, "linestyle": "none"}
        size = r.file_bytes / 1e6
        label = r.name if r.latency_ms else f"{r.name} (not measured)"
        if r.latency_ms:
            lat = r.latency_ms
            latency_ax.errorbar(size, lat["p50"], yerr=[[0.0], [lat["p90"] - lat["p50"]]], capsize=3, label=label,
                                **style)
        else:
            latency_ax.plot([], [], label=label, **style)
        if fidelity_ax is not None and r.fidelity:
            f = r.fidelity
            if use_top1:
                y, err = 100 * f["top1_agreement"], 100 * (f["top1_agreement_se"] or 0.0)
            else:
                y, err = f["mean_sq_error"], f["sq_error_se"] or 0.0
            fidelity_ax.errorbar(size, y, yerr=err, capsize=3, **style)
    latency_ax.set_xlabel("file size (MB)")
    latency_ax.set_ylabel("latency p50 (ms), bar to p90")
    provider = results[0].provider if results else "?"
    latency_ax.set_title(f"latency: {provider}, batch {results[0].batch if results else 1}")
    latency_ax.grid(alpha=0.3)
    latency_ax.set_xlim(left=0)
    latency_ax.set_ylim(bottom=0)
    if fidelity_ax is not None:
        fidelity_ax.set_xlabel("file size (MB)")
        fidelity_ax.set_ylabel("top-1 agreement with the first model (%)" if use_top1
                               else "output error vs the first model")
        fidelity_ax.set_title(f"fidelity vs size ({next(r.fidelity['samples'] for r in results if r.fidelity)} "
                              "samples, ± 1 se)")
        fidelity_ax.grid(alpha=0.3)
        fidelity_ax.set_xlim(left=0)
    fig.legend(loc="lower center", ncol=min(len(results), 4), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 * ((len(results) + 3) // 4), 1, 1))
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
