"""`pycompress analyze MODEL.onnx --data DATA -o DIR`: Principal Filter Analysis.

One pass over the data; per layer: width, filters kept by PFA-En at
several energies and by PFA-KL, spectral entropy. Writes DIR/plan.json (a
``prune`` plan for ``pycompress apply``), DIR/analysis.json and PNG plots.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np

from pycompress.analysis import COST_MEASURES, analyze, plan_from_analysis, site_cost_model
from pycompress.cli.common import (AT_LEAST_ONE, Range, check_numbers, data_inputs, emit_json, human, model_inputs,
                                   output_policy, print_table)
from pycompress.data import load_data
from pycompress.decisions.pfa import DEFAULT_TAUS, recipe_energy, recipe_kl
from pycompress.errors import PycompressError
from pycompress.fidelity.responses import RESPONSE_MODES
from pycompress.ir import atomic_write_text, load_model


def _taus(text: str) -> list[float]:
    try:
        taus = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise PycompressError(f"--taus {text!r}: expected comma-separated numbers in [0, 1]") from None
    if not taus or any(not 0.0 <= t <= 1.0 for t in taus):
        raise PycompressError(f"--taus {text!r}: expected comma-separated numbers in [0, 1]")
    return taus


def add_parser(sub) -> None:
    p = sub.add_parser("analyze", help="Principal Filter Analysis: response spectra, PFA recipes, a prune plan",
                       description=__doc__.split("\n\n", 1)[1])
    p.add_argument("model", help="path to a .onnx file")
    p.add_argument("--data", required=True,
                   help="calibration data: file.npz / file.npy, a folder of images, builtin:digits, "
                        "builtin:skimage[:COUNT]")
    p.add_argument("--preprocess", default=None, metavar="SPEC",
                   help="for image folders / builtin:skimage: size=224,mean=imagenet,std=imagenet,layout=nchw,"
                        "resize=crop|stretch (unset: from the model input; ImageNet mean/std for RGB)")
    recipe = p.add_mutually_exclusive_group()
    recipe.add_argument("--kl", action="store_true", help="PFA-KL, parameter-free (the default)")
    recipe.add_argument("--energy", type=float, metavar="TAU", help="PFA-En: keep this share of each layer's "
                                                                  "response energy (0..1, e.g. 0.95)")
    recipe.add_argument("--target-size", type=float, metavar="FRACTION",
                        help="footprint target: fraction of the model's --measure to keep (e.g. 0.5); "
                             "a common tau is found by bisection")
    p.add_argument("--measure", choices=COST_MEASURES, default="params",
                   help="what --target-size counts (default params)")
    p.add_argument("--after", choices=RESPONSE_MODES, default="producer",
                   help="response tensor: the Conv/Gemm output (default, as in the PFA paper) or after its "
                        "BatchNorm/activation")
    p.add_argument("--min-keep", type=int, default=1, help="filters every layer keeps at least (default 1)")
    p.add_argument("--taus", default=",".join(f"{t:g}" for t in DEFAULT_TAUS),
                   help="energies shown in the table (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="samples per onnxruntime run (default 32)")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    p.add_argument("-o", "--output", default="analysis", help="folder for plan.json, analysis.json and plots "
                                                              "(default ./analysis)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print analysis.json to stdout instead of the table")
    p.set_defaults(func=run)


def run(args) -> int:
    check_numbers(args, energy=Range(0, 1), target_size=Range(0, 1, low_open=True), min_keep=AT_LEAST_ONE,
                  batch_size=AT_LEAST_ONE, threads=Range(0, 1024))
    inputs = {**model_inputs("model", args.model), **data_inputs("--data", args.data)}
    with output_policy({}, inputs, folders={"-o": args.output}, lock=[args.output]):
        return _run(args)


def _run(args) -> int:
    taus = _taus(args.taus)
    if args.energy is not None and not 0.0 <= args.energy <= 1.0:
        raise PycompressError(f"--energy must be in [0, 1], got {args.energy}")
    if args.target_size is not None and not 0.0 < args.target_size <= 1.0:
        raise PycompressError(f"--target-size must be in (0, 1] (a fraction of the model's {args.measure}), "
                              f"got {args.target_size}")
    if args.min_keep < 1:
        raise PycompressError(f"--min-keep must be at least 1, got {args.min_keep}")
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise PycompressError(f"-o {out}: exists and is not a folder")
    model = load_model(args.model)
    calibration = load_data(args.data, model, preprocess=args.preprocess)
    analysis = analyze(model, calibration, after=args.after, batch_size=args.batch_size,
                       progress=not args.no_progress and not args.json, threads=args.threads)
    plan, recipe = plan_from_analysis(model, analysis, energy=args.energy, target_size=args.target_size,
                                      measure=args.measure, min_keep=args.min_keep)
    out.mkdir(parents=True, exist_ok=True)

    # Costs of the recipes, from the same model as the footprint target.
    analysed = {layer.site for layer in analysis.layers}
    sites = [s for s in analysis.sites if s.id in analysed]
    costs = {m: site_cost_model(model, sites, m) for m in COST_MEASURES}
    kl = recipe_kl(analysis.layers, min_keep=args.min_keep)

    def fractions(keep):
        return {m: fn(keep) / full if full else 1.0 for m, (fn, full) in costs.items()}

    grid = np.unique(np.concatenate([1.0 - np.logspace(-6, np.log10(0.5), 241), [1.0],
                                     [recipe.tau] if recipe.tau is not None else []]))
    curve = {m: [] for m in COST_MEASURES}
    for tau in grid:
        for m, value in fractions(recipe_energy(analysis.layers, float(tau), min_keep=args.min_keep).keep).items():
            curve[m].append(value)

    summary = analysis.summary(taus, min_keep=args.min_keep)
    by_site = {layer.site: layer for layer in analysis.layers}
    for row in summary["layers"]:
        row["keep_plan"] = recipe.keep.get(row["site"], row["width"])
        row["spectrum"] = by_site[row["site"]].spectrum
    payload = {
        "model": str(args.model), "data": args.data, "recipe": recipe.method, "describe": recipe.describe(),
        "tau": recipe.tau, "min_keep": args.min_keep,
        "cost": {m: {"original": full, "plan": costs[m][0](recipe.keep), "kl": costs[m][0](kl.keep)}
                 for m, (fn, full) in costs.items()},
        "cost_vs_tau": {"tau": grid, **{m: np.array(v) for m, v in curve.items()}},
        "note": "costs count the analysed layers and their consumers; other layers unchanged",
        **summary,
        "plan": str(out / "plan.json"),
    }
    plan.save(out / "plan.json")
    plots: list[Path] = []
    if not args.no_plots:
        from pycompress.report.pfa_plots import plot_cost_vs_tau, plot_kept, plot_spectra

        plots += plot_spectra(analysis.layers, out, energy_tau=0.95 if args.energy is None else args.energy,
                              chosen=recipe.keep, chosen_label="plan")
        kl_frac = fractions(kl.keep)
        target = (args.measure, args.target_size) if args.target_size is not None else None
        plots.append(plot_cost_vs_tau(grid, {m: np.array(v) for m, v in curve.items()}, out,
                                      kl_fractions=kl_frac, target=target, chosen_tau=recipe.tau))
        keeps = {"PFA-KL": kl.keep}
        if recipe.method != "kl":
            keeps[recipe.describe().split(" (")[0]] = recipe.keep
        plots.append(plot_kept(analysis.layers, keeps, out))
    payload["plots"] = [str(p) for p in plots]
    text = io.StringIO()
    emit_json(payload, text)
    atomic_write_text(out / "analysis.json", text.getvalue())

    if args.json:
        emit_json(payload)
        return 0
    headers = ["layer", "op", "width", "samples", "inactive"] + [f"En {t:g}" for t in taus] + \
              ["KL", "H/logC", "plan"]
    rows = []
    for row in summary["layers"]:
        rows.append([row["site"], row.get("op", ""), row["width"], row["samples"], row["inactive"]]
                    + [row["keep_energy"][f"{t:g}"] for t in taus]
                    + [row["keep_kl"], f"{row['normalized_entropy']:.3f}", row["keep_plan"]])
    print_table(headers, rows)
    if analysis.skipped:
        print(f"\nnot analysed ({len(analysis.skipped)}):")
        for s in analysis.skipped:
            print(f"  {s.id}{f' (width {s.width})' if s.width else ''}: {s.reason}")
    print()
    for m in COST_MEASURES:
        c = payload["cost"][m]
        print(f"{m}: {human(c['original'])} -> {human(c['plan'])} with the plan "
              f"({c['plan'] / c['original']:.3f}); PFA-KL: {c['kl'] / c['original']:.3f}"
              if c["original"] else f"{m}: 0")
    print(f"recipe: {recipe.describe()}; {len(plan.decisions)} prune decision(s); "
          f"{analysis.samples} samples; data {analysis.data_seconds:.1f}s, inference {analysis.inference_seconds:.1f}s, "
          f"analysis {analysis.analysis_seconds:.1f}s")
    print(f"wrote {out / 'plan.json'}, {out / 'analysis.json'}"
          + (f" and {len(plots)} plot(s) in {out}" if plots else ""), file=sys.stdout)
    return 0
