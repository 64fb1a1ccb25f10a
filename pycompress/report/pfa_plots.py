"""PNG plots of a PFA analysis: per-layer spectra, cost vs tau, filters kept per layer.

Plain data in (``LayerSpectrum``, keep counts, cost curves), files out,
written atomically. matplotlib's Agg backend: no display needed.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from pycompress.decisions.pfa import LayerSpectrum
from pycompress.ir import atomic_write_bytes

LAYERS_PER_PAGE = 12


def _figure(*args, **kwargs):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt, plt.figure(*args, **kwargs)


def _save(plt, fig, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buffer.getvalue())


def short_name(site: str, limit: int = 38) -> str:
    """'group:/_blocks.3/_expand_conv/Conv' -> '_blocks.3/_expand_conv' (readable titles)."""
    name = site.removeprefix("group:").strip("/")
    for suffix in ("/Conv", "/Gemm", "/MatMul"):
        if name.endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
    return name if len(name) <= limit else "..." + name[-(limit - 3):]


def plot_spectra(layers: Sequence[LayerSpectrum], folder: Path, *, energy_tau: float = 0.95,
                 chosen: Mapping[str, int] | None = None, chosen_label: str = "plan") -> list[Path]:
    """``spectra_NN.png``: per layer, the eigen-spectrum (log) and the cumulative energy, with the cuts.

    Vertical lines: filters kept by PFA-KL, by PFA-En at ``energy_tau``, and
    by the chosen recipe; the counts are in each panel's title.
    """
    from matplotlib.lines import Line2D

    paths = []
    pages = max(1, math.ceil(len(layers) / LAYERS_PER_PAGE))
    styles = {"kl": dict(color="tab:red", ls="--", lw=1.3), "en": dict(color="tab:green", ls=":", lw=1.8),
              "plan": dict(color="black", ls="-.", lw=1.2)}
    for page in range(pages):
        chunk = layers[page * LAYERS_PER_PAGE:(page + 1) * LAYERS_PER_PAGE]
        cols = min(3, len(chunk))
        rows = math.ceil(len(chunk) / cols)
        plt, fig = _figure(figsize=(5.0 * cols, 3.3 * rows + 0.8))
        for i, layer in enumerate(chunk):
            ax = fig.add_subplot(rows, cols, i + 1)
            x = np.arange(1, layer.width + 1)
            positive = layer.spectrum[layer.spectrum > 0]
            floor = max(1e-12, positive.min() / 2) if len(positive) else 1e-12
            ax.semilogy(x, np.maximum(layer.spectrum, floor), color="tab:blue", lw=1.4,
                        marker="o" if layer.width <= 48 else None, ms=3)
            ax.set_ylim(floor, 1.5)
            ax.set_xlabel("component", fontsize=8)
            ax.set_ylabel("eigenvalue share", color="tab:blue", fontsize=8)
            ax2 = ax.twinx()
            ax2.plot(x, layer.cumulative_energy, color="tab:orange", lw=1.6)
            ax2.set_ylim(0, 1.02)
            ax2.set_ylabel("cumulative energy", color="tab:orange", fontsize=8)
            k_kl, k_en = layer.keep_kl(), layer.keep_energy(energy_tau)
            ax.axvline(k_kl, **styles["kl"])
            ax.axvline(k_en, **styles["en"])
            keeps = f"keep: KL {k_kl}, En {k_en}"
            if chosen is not None and layer.site in chosen:
                ax.axvline(chosen[layer.site], **styles["plan"])
                keeps += f", {chosen_label} {chosen[layer.site]}"
            dead = f", {len(layer.inactive)} inactive" if len(layer.inactive) else ""
            ax.set_title(f"{short_name(layer.site)}  (C={layer.width}, H/log C={layer.normalized_entropy:.2f}{dead})"
                         f"\n{keeps}", fontsize=8.5)
            ax.tick_params(labelsize=7)
            ax2.tick_params(labelsize=7)
            ax.grid(True, which="major", alpha=0.3)
        handles = [Line2D([], [], color="tab:blue", lw=1.4, label="eigenvalue share (log, left axis)"),
                   Line2D([], [], color="tab:orange", lw=1.6, label="cumulative energy (right axis)"),
                   Line2D([], [], **styles["kl"], label="PFA-KL cut"),
                   Line2D([], [], **styles["en"], label=f"PFA-En cut at tau = {energy_tau:g}")]
        if chosen is not None:
            handles.append(Line2D([], [], **styles["plan"], label=f"{chosen_label} cut"))
        fig.legend(handles=handles, loc="upper center", ncol=min(len(handles), 2 * cols + 1), fontsize=8,
                   frameon=False, bbox_to_anchor=(0.5, 1.0))
        fig.suptitle(f"PFA response spectra, page {page + 1}/{pages}", fontsize=11, y=1.04)
        fig.tight_layout(rect=(0, 0, 1, 0.97))
        paths.append(_save(plt, fig, folder / f"spectra_{page + 1:02d}.png"))
    return paths


def plot_cost_vs_tau(taus: np.ndarray, fractions: Mapping[str, np.ndarray], folder: Path, *,
                     kl_fractions: Mapping[str, float] | None = None, target: tuple[str, float] | None = None,
                     chosen_tau: float | None = None) -> Path:
    """``cost_vs_tau.png``: the model's parameters / MACs (fraction of the original) kept by PFA-En(tau).

    The x axis is the energy each layer may discard, ``1 - tau``, on a log
    scale (the interesting range is tau = 0.9 ... 0.9999), with tau growing
    to the right.
    """
    plt, fig = _figure(figsize=(7.5, 4.6))
    ax = fig.add_subplot(1, 1, 1)
    colors = {"params": "tab:blue", "macs": "tab:purple"}
    taus = np.asarray(taus, dtype=np.float64)
    keep = taus < 1.0
    lost = 1.0 - taus[keep]
    for name, values in fractions.items():
        ax.plot(lost, np.asarray(values)[keep], color=colors.get(name), lw=1.8, drawstyle="steps-mid",
                label=f"{name} (PFA-En)")
        if kl_fractions and name in kl_fractions:
            ax.axhline(kl_fractions[name], color=colors.get(name), ls="--", lw=1,
                       label=f"{name} with PFA-KL: {kl_fractions[name]:.3f}")
    if target is not None:
        ax.axhline(target[1], color="tab:red", ls=":", lw=1.5, label=f"target: {target[0]} {target[1]:g}")
    if chosen_tau is not None and chosen_tau < 1.0:
        ax.axvline(1.0 - chosen_tau, color="black", ls="-.", lw=1, label=f"chosen tau = {chosen_tau:.5g}")
    ax.set_xscale("log")
    ax.invert_xaxis()
    ticks = [t for t in (0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 1e-3, 1e-4, 1e-5, 1e-6) if lost.min() <= t <= lost.max()]
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{1 - t:.6g}" for t in ticks], fontsize=8)
    ax.set_xlabel("energy kept per layer, tau (log scale in 1 - tau)")
    ax.set_ylabel("fraction of the original model")
    ax.set_ylim(0, 1.05)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title("Model size vs PFA-En energy threshold\n(analysed layers and their consumers; the rest unchanged)",
                 fontsize=10)
    fig.tight_layout()
    return _save(plt, fig, folder / "cost_vs_tau.png")


def plot_kept(layers: Sequence[LayerSpectrum], keeps: Mapping[str, Mapping[str, int]], folder: Path) -> Path:
    """``kept_per_layer.png``: width of every analysed layer and the filters each recipe keeps."""
    n = len(layers)
    plt, fig = _figure(figsize=(max(7.0, 0.32 * n + 2.5), 4.8))
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(n)
    ax.bar(x, [l.width for l in layers], color="lightgray", label="width", width=0.8)
    step = 0.8 / max(1, len(keeps))
    for j, (label, keep) in enumerate(keeps.items()):
        ax.bar(x - 0.4 + step * (j + 0.5), [keep.get(l.site, l.width) for l in layers], width=step, label=label)
    ax.set_xticks(x)
    ax.set_xticklabels([short_name(l.site, 28) for l in layers], rotation=75, ha="right", fontsize=7)
    ax.set_ylabel("filters")
    ax.set_yscale("log" if max(l.width for l in layers) > 20 * min(l.width for l in layers) else "linear")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_title("Filters kept per layer")
    fig.tight_layout()
    return _save(plt, fig, folder / "kept_per_layer.png")
