"""`pycompress compress MODEL.onnx --data DATA -o OUT.onnx`: search per-layer
compression parameters (PAC-BO with a certificate, or random search), apply
the best plan, write the model, the plan and a JSON trace of every evaluation.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from pycompress.cli.common import (AT_LEAST_ONE, FRACTION, NON_NEGATIVE, POSITIVE, PROBABILITY, Range, check_numbers,
                                   data_inputs, emit_json, human, model_inputs, output_policy, print_table)
from pycompress.cli.run_folder import check_state_file, output_paths, read_run_config
from pycompress.errors import PycompressError

# Settings that define a search: a resumed run takes them from its run folder.
_SEARCH_KEYS = ("method", "actions", "granularity", "objective", "max_prune", "align", "gamma", "target_size",
                "loss", "use_labels", "labels", "outputs", "samples", "delta", "relative_delta", "epsilon", "seed",
                "initial", "seed_plans", "data", "init", "energy", "points_per_fit")
CONFIG_NAME = "compress.json"
# Points the acquisition picks are evaluated until se(J) <= this * delta (docs/pacbo.md, "Noise").
NOISE_TARGET = 0.25
# --target-size is a constraint: the search (its initial design excepted), the incumbent and the
# certificate are restricted to points whose ratio is within this of the target (docs/pacbo.md).
TARGET_BAND = 0.04


def add_parser(sub) -> None:
    from pycompress.fidelity import LOSSES

    p = sub.add_parser("compress", help="search per-layer compression (PAC-BO or random search) and apply it",
                       description="Search the rank (or channels kept) of every applicable layer with PAC "
                                   "Bayesian optimization "
                                   "(stops with a certificate P(J(t*) - J(t^) < delta) >= 1 - epsilon) or random "
                                   "search, on the objective J = gamma * Q + 1/R (Q: fidelity, R: size ratio of "
                                   "the compressed layers), and write the compressed model, its plan and a trace.")
    p.add_argument("model", help="the .onnx model to compress")
    p.add_argument("--data", required=False, help="calibration data: file.npz / file.npy / builtin:NAME")
    p.add_argument("-o", "--output", required=True, help="the compressed .onnx to write")
    p.add_argument("--method", default="pacbo", metavar="pacbo|random|pfa|PLAN.json",
                   help="pacbo: PAC-BO search (default); random: random search baseline; pfa: one-shot "
                        "Principal Filter Analysis pruning plan (PFA-KL, or --energy / --target-size); "
                        "PLAN.json: apply a given plan")
    p.add_argument("--energy", type=float, default=None, help="pfa: PFA-En energy tau instead of PFA-KL")
    p.add_argument("--no-recover", action="store_true",
                   help="skip the closed-form, teacher-guided layer-wise recovery after compressing")
    p.add_argument("--recover-samples", type=int, default=None,
                   help="calibration samples used by the recovery (default 512; with --resume: the saved run's)")
    p.add_argument("--finetune", action="store_true",
                   help="after recovery, fine-tune the compressed ONNX graph's weights against the original "
                        "(MSE to its outputs + cross-entropy with labels when the data has them); kept only if "
                        "it lowers the held-out loss (docs/finetune.md)")
    p.add_argument("--finetune-epochs", type=int, default=3, help="fine-tuning epochs (default 3)")
    p.add_argument("--finetune-lr", type=float, default=None,
                   help="fine-tuning learning rate (default 1e-3 for rmsprop/adam, 1e-2 for sgd)")
    p.add_argument("--finetune-optimizer", choices=("rmsprop", "adam", "sgd"), default="rmsprop",
                   help="fine-tuning optimizer (default rmsprop, as CramNet)")
    p.add_argument("--report-dir", default=None,
                   help="folder for report.json / report.md / report.html and plots (default OUT.report)")
    p.add_argument("--actions", default="svd",
                   help="comma-separated actions to search: svd, lowrank_conv, prune, share, quant (default "
                        "svd); pruning comes first, then factorizations, then sharing (index bits 2..8) of the "
                        "layers left whole, then quant (each layer int8 or float; applied after the recovery)")
    p.add_argument("--objective", default="size", choices=("size", "bytes", "macs", "latency"),
                   help="what R in J = gamma * Q + 1/R measures: parameters (default), packed bytes (shared "
                        "weights at their index bits: needed by --actions share), MACs, or the onnxruntime "
                        "latency on this machine or on --device (timed per candidate; its noise enters the GP)")
    p.add_argument("--latency-runs", type=int, default=10,
                   help="--objective latency: timed runs per candidate at batch 1 (default 10)")
    p.add_argument("--max-prune", type=float, default=1.0,
                   help="prune: the largest fraction of any channel group the search may remove (default 1: "
                        "down to one channel); fragile compact networks want e.g. 0.25")
    p.add_argument("--align", type=int, default=1,
                   help="prune: search channel counts in multiples of this (e.g. 16 for onnxruntime's AVX-512 "
                        "blocked convolutions, 8 for AVX2; other widths are padded and can run slower)")
    p.add_argument("--granularity", default="layer", choices=("layer", "block", "stage"),
                   help="one search coordinate per layer (default), per residual block or per resolution "
                        "stage and action (keeps the search small on deep networks)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--target-size", type=float, default=None,
                      help="choose gamma so that the compressed layers keep about this fraction of their "
                           "parameters (default 0.25 when --gamma is not given)")
    size.add_argument("--gamma", type=float, default=None, help="weight of the quality term in J (paper Eq. 2)")
    p.add_argument("--labels", nargs="?", const="", default=None, metavar="FILE.npy",
                   help="use labels (from the data, or FILE.npy): fidelity = top-1 error, Q = accuracy")
    p.add_argument("--loss", choices=LOSSES, default=None,
                   help="fidelity loss (default: norm, i.e. ||f~(x) - f*(x)||^2; error with --labels)")
    p.add_argument("--outputs", default=None, help="comma-separated model outputs compared (default: all)")
    p.add_argument("--samples", type=int, default=50, help="fresh subsample size per evaluation (default 50)")
    p.add_argument("--delta", type=float, default=0.05, help="tolerated gap to the optimum of J (default 0.05)")
    p.add_argument("--relative-delta", action="store_true", help="delta is a fraction of |J(incumbent)|")
    p.add_argument("--epsilon", type=float, default=0.005, help="certificate failure probability (default 0.005)")
    p.add_argument("--max-evals", type=int, default=None,
                   help="evaluation budget (default 100; with --resume: the saved one, raise it to extend)")
    p.add_argument("--time-limit", type=float, default=None, help="wall-time budget in seconds")
    p.add_argument("--initial", type=int, default=None, help="Sobol points of the initial design")
    p.add_argument("--seed", type=int, default=0, help="seed of the search and the subsamples (default 0)")
    p.add_argument("--seed-plan", action="append", default=[], metavar="PLAN.json",
                   help="also evaluate this plan first (e.g. from PFA); repeatable")
    p.add_argument("--init", choices=("sobol", "pfa"), default="sobol",
                   help="pfa: also seed the search with a PFA pruning plan computed on --data (PFA-KL, or "
                        "PFA-En with --energy); the initial design stays a Sobol sequence (default: sobol only)")
    p.add_argument("--run-dir", default=None, help="folder for the resumable state (default OUT.run)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue the search saved in RUN_DIR")
    p.add_argument("--plan", default=None, help="where to write the plan (default OUT.plan.json)")
    p.add_argument("--trace", default=None, help="where to write the trace (default OUT.trace.json)")
    p.add_argument("--heldout", default=None, metavar="DATA",
                   help="held-out data the result is measured on, never seen by the search or the recovery "
                        "(default with --data builtin:skimage: builtin:skimage-heldout:160, crops of other "
                        "photos; 'none' to skip)")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime threads for evaluations")
    p.add_argument("--device", default=None, metavar="HOST:PORT[,HOST:PORT...]",
                   help="--objective latency: time candidates on these devices' agents (`pycompress agent`, token "
                        "in $PYCOMPRESS_AGENT_TOKEN; docs/devices.md); several devices share the evaluations")
    p.add_argument("--executor", default="local", metavar="local|ray[:ADDRESS]",
                   help="where evaluations run: local (default; one thread per --device) or Ray tasks on a "
                        "local Ray (ray) or a cluster (ray:ADDRESS); needs pycompress[ray]")
    p.add_argument("--points-per-fit", type=int, default=None, metavar="N",
                   help="points PAC-BO proposes per GP fit (default: the executor's workers; 1 locally). The "
                        "same value gives the same result on any executor")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _finite(value: Any) -> Any:
    """JSON-safe: non-finite floats become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, np.generic):
        return _finite(value.item())
    return value


def _config_from_args(args) -> dict[str, Any]:
    use_labels = args.labels is not None
    if args.method not in ("pacbo", "random", "pfa") and not args.method.endswith(".json"):
        raise PycompressError(f"--method {args.method!r}: choose pacbo, random, pfa or a PLAN.json file")
    if args.method.endswith(".json") and not Path(args.method).exists():
        raise PycompressError(f"--method {args.method}: no such plan file")
    if args.method.endswith(".json") and not Path(args.method).is_file():
        raise PycompressError(f"--method {args.method}: not a regular file; a plan is a .json file")
    if args.init == "pfa" and "prune" not in args.actions.split(","):
        raise PycompressError("--init pfa seeds pruning decisions: add prune to --actions")
    if "share" in args.actions.split(",") and args.objective != "bytes" and args.method in ("pacbo", "random"):
        raise PycompressError("--actions share reduces bytes, not parameters, MACs or latency: "
                              "use --objective bytes")
    if "quant" in args.actions.split(",") and args.objective not in ("bytes", "latency") \
            and args.method in ("pacbo", "random"):
        raise PycompressError("--actions quant reduces bytes and latency, not parameters or MACs: "
                              "use --objective bytes or --objective latency")
    return {
        "method": args.method, "actions": [a.strip() for a in args.actions.split(",") if a.strip()],
        "granularity": args.granularity, "objective": args.objective, "max_prune": args.max_prune,
        "align": args.align,
        "gamma": args.gamma, "target_size": (None if args.gamma is not None else
                                             (args.target_size if args.target_size is not None else 0.25)),
        "loss": args.loss or ("error" if use_labels else "norm"), "use_labels": use_labels,
        "labels": args.labels or None, "outputs": [o for o in (args.outputs or "").split(",") if o] or None,
        "samples": args.samples, "delta": args.delta, "relative_delta": args.relative_delta,
        "epsilon": args.epsilon, "seed": args.seed, "initial": args.initial,
        "seed_plans": [str(Path(p).resolve()) for p in args.seed_plan], "data": args.data,
        "init": args.init, "energy": args.energy, "points_per_fit": args.points_per_fit,
        "max_evals": args.max_evals if args.max_evals is not None else 100, "time_limit": args.time_limit,
        "recover_samples": args.recover_samples if args.recover_samples is not None else 512,
        "no_recover": bool(args.no_recover),
    }


def run(args) -> int:
    # Every check before any work: numbers, then the output-path policy (see pycompress.files).
    check_numbers(args, energy=FRACTION, recover_samples=AT_LEAST_ONE, finetune_epochs=AT_LEAST_ONE,
                  finetune_lr=POSITIVE, latency_runs=AT_LEAST_ONE, max_prune=FRACTION, align=AT_LEAST_ONE,
                  target_size=FRACTION, gamma=POSITIVE, samples=AT_LEAST_ONE, delta=NON_NEGATIVE,
                  epsilon=PROBABILITY, max_evals=AT_LEAST_ONE, time_limit=POSITIVE, initial=Range(0),
                  seed=NON_NEGATIVE, threads=Range(0, 1024))
    paths = output_paths(args)
    inputs = {**model_inputs("model", args.model), **data_inputs("--data", args.data),
              **({"--labels": args.labels} if args.labels else {}),
              **({"--method": args.method} if args.method.endswith(".json") else {}),
              **{"--seed-plan" + (f" ({i + 1})" if i else ""): p for i, p in enumerate(args.seed_plan)}}
    if args.resume:
        inputs[f"--resume {CONFIG_NAME}"] = paths["run"] / CONFIG_NAME
    outputs = {"-o": args.output, "--plan": paths["plan"], "--trace": paths["trace"]}
    folders = {"--report-dir": paths["report"]} | ({} if args.resume else {"--run-dir": paths["run"]})
    # A failed run leaves nothing behind, except a run folder whose search can be resumed.
    policy = output_policy(outputs, inputs, folders=folders, lock=[args.output, paths["run"]],
                           keep_on_failure=lambda path: (path / "state.json").is_file())
    with policy:
        return _run(args)


def _run(args) -> int:
    from pycompress.ir import atomic_write_text, load_model, save_model
    from pycompress.data import load_data
    from pycompress.fidelity import FidelityEstimator

    started = time.monotonic()
    model_path = Path(args.model)
    output = Path(args.output)
    if not model_path.is_file():
        raise PycompressError(f"{model_path}: no such model file")
    if output.resolve() == model_path.resolve():
        raise PycompressError(f"{output}: refusing to overwrite the input model; choose another output path")
    model_hash = _sha256(model_path)

    if args.resume:
        run_dir = Path(args.resume)
        config_path = run_dir / CONFIG_NAME
        if not config_path.is_file():
            raise PycompressError(f"{run_dir}: not a compress run folder ({CONFIG_NAME} is missing)")
        config = read_run_config(config_path)
        check_state_file(run_dir / "state.json")
        if config.get("model_sha256") != model_hash:
            raise PycompressError(f"{model_path}: this is not the model the run in {run_dir} was searching")
    else:
        run_dir = Path(args.run_dir) if args.run_dir else output.with_name(output.stem + ".run")
        if (run_dir / "state.json").exists():
            raise PycompressError(f"{run_dir}: already holds a search; continue it with --resume {run_dir} "
                                  "or choose another --run-dir")
        config = {**_config_from_args(args), "model": str(model_path.resolve()), "model_sha256": model_hash}
    searching = config["method"] in ("pacbo", "random")
    if searching:
        run_dir.mkdir(parents=True, exist_ok=True)

    def save_config() -> None:
        # Only a search has state to resume; one-shot methods leave no run folder.
        if searching:
            atomic_write_text(run_dir / CONFIG_NAME, json.dumps(config, indent=2) + "\n")

    if not args.resume:  # a resumed run keeps the config it read until there is something new to save
        save_config()

    log = (lambda line: None) if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    model = load_model(model_path)
    if config["data"] is None:
        data = _synthetic_token_data(model, config["seed"])
        log(f"no --data: {len(data)} synthetic token inputs (ids in the vocabulary, masks of ones); "
            "quality figures on them are only indicative")
    else:
        data = load_data(config["data"], model, labels=config["labels"])
    if config["use_labels"] and data.labels is None:
        raise PycompressError(f"{config['data']}: --labels given but the data has no labels (pass FILE.npy)")
    estimator = FidelityEstimator(model, data.inputs, labels=data.labels if config["use_labels"] else None,
                                  loss=config["loss"], samples=config["samples"], outputs=config["outputs"],
                                  seed=config["seed"], threads=args.threads)
    from pycompress.report import write_report
    from pycompress.ir import model_cost
    from pycompress.pipeline import recover

    stages: list[dict[str, Any]] = [{"name": "load + data", "seconds": time.monotonic() - started}]
    t_stage = time.monotonic()
    trace = None
    if config["method"] in ("pacbo", "random"):
        compressed, plan, summary, trace, objective = _search(args, config, model, data, estimator, log,
                                                              save_config, run_dir)
        cost_sites = objective.cost_sites
    else:
        compressed, plan, summary = _one_shot(args, config, model, data, log)
        cost_sites = None
    stages.append({"name": "decide + apply", "seconds": time.monotonic() - t_stage})

    def fidelity_on_pool(candidate):
        """The fidelity on the calibration pool (its first 5000 samples), by every stage alike."""
        return estimator.evaluate_on(candidate, np.arange(min(estimator.pool, 5000)))

    quant = [d for d in plan.decisions if d.action == "quant"]
    if quant:
        compressed, plan = _without_quant(model, plan)
    recovery = None
    # What happens after the search is part of the run too: a resumed run writes the same bytes.
    if args.recover_samples is not None or "recover_samples" not in config:
        config["recover_samples"] = args.recover_samples if args.recover_samples is not None else 512
    config["no_recover"] = bool(args.no_recover or config.get("no_recover", False))
    save_config()
    if not config["no_recover"]:
        t_stage = time.monotonic()
        log("recovery: closed-form layer-wise refit against the teacher")
        before_fid = fidelity_on_pool(compressed)
        recovery = recover(model, compressed, plan, data.inputs, samples=config["recover_samples"], seed=config["seed"],
                           progress=log)
        recovery["fidelity_before"] = before_fid.mean
        stages.append({"name": "recover", "seconds": time.monotonic() - t_stage})

    finetuned = None
    if args.finetune:
        from pycompress.recover.finetune import finetune

        t_stage = time.monotonic()
        log("finetune: gradient fine-tuning of the compressed graph against the teacher")
        before_ft = fidelity_on_pool(compressed)
        if recovery is not None:
            recovery["fidelity_after"] = before_ft.mean
        finetuned = finetune(model, compressed, data.inputs, data.labels, epochs=args.finetune_epochs,
                             lr=args.finetune_lr, optimizer=args.finetune_optimizer, seed=config["seed"],
                             progress=None if args.quiet else log, threads=args.threads).to_dict()
        finetuned["fidelity_before"] = before_ft.mean
        stages.append({"name": "finetune", "seconds": time.monotonic() - t_stage})

    if quant:
        t_stage = time.monotonic()
        log(f"quantizing: {sum(d.params.get('bits') == 8 for d in quant)} layer(s) (or factored layers) int8, "
            "the rest float (cross-layer equalization, bias correction, onnxruntime QDQ)")
        plan = _quantize_last(compressed, plan, quant, data, config["seed"])
        if cost_sites is not None:
            # The search measured its own (unrecovered, smaller-sample) int8 model: measure the result.
            summary["ratio"] = objective.ratio_of(compressed)
            if objective.latency is not None:
                summary["latency_ratio"], var = objective.latency.ratio(compressed)
                summary["latency_ratio_std_error"] = math.sqrt(var)
        stages.append({"name": "quantize", "seconds": time.monotonic() - t_stage})

    t_stage = time.monotonic()
    final = fidelity_on_pool(compressed)
    if recovery is not None and finetuned is None:
        recovery["fidelity_after"] = final.mean
    if finetuned is not None:
        finetuned["fidelity_after"] = final.mean
    cost_before, cost_after = model_cost(model), model_cost(compressed)
    summary.update({"fidelity_loss": config["loss"], "fidelity": final.mean, "fidelity_std_error": final.std_error,
                    "fidelity_samples": final.samples, **{f"final_{k}": v for k, v in final.extras.items()}})
    if cost_sites is None:
        summary["ratio"] = cost_after.params / max(cost_before.params, 1)
    heldout = _heldout_quality(args, config, model, compressed)
    stages.append({"name": "verify", "seconds": time.monotonic() - t_stage})
    plan.model = str(model_path)
    plan.meta = _finite({"planner": config["method"], **{k: v for k, v in summary.items() if k != "decisions"}})
    out_paths = output_paths(args)
    plan_path, trace_path, report_dir = out_paths["plan"], out_paths["trace"], out_paths["report"]
    save_model(compressed, output)
    plan.save(plan_path)
    if trace is not None:
        atomic_write_text(trace_path, json.dumps(_finite(trace), indent=1) + "\n")

    report = _finite({
        "model": str(model_path), "output": str(output), "method": config["method"],
        "actions": config["actions"] if config["method"] != "pfa" else ["prune"],
        "seconds": time.monotonic() - started, "stages": stages,
        "before": {"params": cost_before.params, "macs": cost_before.macs, "bytes": cost_before.bytes,
                   "file_bytes": model_path.stat().st_size},
        "after": {"params": cost_after.params, "macs": cost_after.macs, "bytes": cost_after.bytes,
                  "file_bytes": output.stat().st_size, "ratio_of_compressed_layers": summary.get("ratio")},
        "fidelity": {"loss": config["loss"], "mean": final.mean, "std_error": final.std_error,
                     "samples": final.samples, **final.extras},
        "heldout": heldout,
        "search": None if trace is None else trace["search"],
        "layers": [{"site": d.site, "action": d.action, "params": d.params,
                    "params_before": (d.result or {}).get("params_before"),
                    "params_after": (d.result or {}).get("params_after")} for d in plan.decisions],
        "recovery": recovery, "finetune": finetuned, "summary": summary,
        "files": {"model": str(output), "plan": str(plan_path), "trace": str(trace_path) if trace else None},
    })
    paths = write_report(report, report_dir)

    if args.json:
        emit_json(_finite({**summary, "heldout": heldout, "output": str(output), "plan": str(plan_path),
                           "trace": str(trace_path) if trace else None, "report": str(paths["json"]),
                           "run_dir": str(run_dir) if trace else None, "seconds": time.monotonic() - started}))
    else:
        rows = [["parameters", human(cost_before.params), human(cost_after.params),
                 f"{cost_after.params / max(cost_before.params, 1):.3f}"],
                ["MACs", human(cost_before.macs), human(cost_after.macs),
                 f"{cost_after.macs / max(cost_before.macs, 1):.3f}"]]
        if cost_sites is not None:
            ratio = summary["ratio"]
            counted = {"size": "parameters", "bytes": "packed bytes"}.get(config.get("objective", "size"), "MACs")
            rows.insert(0, [f"compressed layers ({counted})", human(cost_sites), human(round(ratio * cost_sites)),
                            f"{ratio:.3f}"])
        if "latency_ratio" in summary:
            ms, r = summary["latency_ms_before"], summary["latency_ratio"]
            rows.append(["latency (ms, batch 1)", f"{ms:.3f}", f"{ms * r:.3f}", f"{r:.3f}"])
        print_table(["", "before", "after", "ratio"], rows)
        if trace is not None:
            cert = (f"certificate: P(J(t*) - J(t^) < {summary['delta']:.4g}) = {summary['probability']:.4f} "
                    f">= {1 - config['epsilon']:g}" if summary["certified"] else
                    f"no certificate ({summary['stop_reason']})")
            print(f"{cert}\ngamma = {config['gamma']:.6g}; decisions: {summary['decisions']}")
        if recovery is not None:
            kept = sum(1 for r in recovery["layers"] if r["kept"])
            print(f"recovery: {kept}/{len(recovery['layers'])} layers refitted; fidelity "
                  f"{recovery['fidelity_before']:.4g} -> {recovery['fidelity_after']:.4g}")
        if finetuned is not None:
            print(f"finetune: {'kept epoch ' + str(finetuned['best_epoch']) if finetuned['kept'] else 'not kept'}; "
                  f"fidelity {finetuned['fidelity_before']:.4g} -> {finetuned['fidelity_after']:.4g}")
        extra = "".join(f", {k.removeprefix('final_')} {v:.4f}" for k, v in summary.items()
                        if k in ("final_agreement", "final_accuracy", "final_cosine"))
        print(f"fidelity ({config['loss']}) on {final.samples} samples: {final.mean:.4g} +- {final.std_error:.2g}"
              f"{extra}")
        if heldout is not None:
            print(f"held-out ({heldout['source']}, {heldout['samples']} samples): top-1 agreement "
                  f"{heldout['top1_agreement']:.4f}, top-5 containment {heldout['top5_containment']:.4f}, "
                  f"KL {heldout['kl_divergence']:.4g}" if heldout.get("top1_agreement") is not None else
                  f"held-out ({heldout['source']}, {heldout['samples']} samples): relative error "
                  f"{heldout['relative_error']:.4g}")
        print(f"wrote {output}, {plan_path}{', ' + str(trace_path) if trace else ''}; report: {paths['md']}")
    return 0


SYNTHETIC_SAMPLES = 256


def _synthetic_token_data(model, seed: int):
    """Calibration inputs for a token model without --data (pycompress.data.synthetic); other models need --data."""
    from pycompress.data import Calibration
    from pycompress.data.synthetic import embedding_vocabulary, synthetic_inputs

    if not any(embedding_vocabulary(v) for v in model.graph.inputs):
        raise PycompressError("--data is required (calibration inputs: file.npz / file.npy / builtin:NAME)")
    return Calibration(synthetic_inputs(model, SYNTHETIC_SAMPLES, seed), None, "synthetic token inputs")


QUANT_SEARCH_SAMPLES = 64     # calibration samples of each candidate's int8 ranges during a search
QUANT_FINAL_SAMPLES = 256     # ... and of the result's


def _model_activations(data, samples: int, seed: int):
    """``(model, names) -> batches`` of the model's values on a fixed calibration subset (made once)."""
    from pycompress.cli.apply import upstream_of
    from pycompress.fidelity import collect_activations

    n = len(data)
    index = np.sort(np.random.default_rng([seed, 7]).choice(n, min(n, samples), replace=False))
    subset = {k: np.asarray(v[index]) for k, v in data.inputs.items()}

    def activations(model, names):
        batches = ({k: v[i:i + 32] for k, v in subset.items()} for i in range(0, len(index), 32))
        yield from collect_activations(upstream_of(model, names), names, batches)

    return activations


def _without_quant(model, plan):
    """The plan's structure (prune, factorizations, sharing) applied alone to a copy of ``model``.

    The recovery refits float layers, so quantization comes last, on the
    recovered weights; a search's result holds it already and is rebuilt.
    """
    from pycompress.plan import Plan
    from pycompress.rewrites import ApplyContext, apply_plan

    rest = [d for d in plan.decisions if d.action != "quant"]
    compressed = model.clone()
    applied = apply_plan(compressed, Plan([type(d)(d.site, d.action, dict(d.params), d.note) for d in rest],
                                          plan.model, {k: v for k, v in plan.meta.items() if k != "finished"}),
                         ApplyContext(options={"skip_rank_beyond_r_max": True}))
    return compressed, applied


def _quantize_last(compressed, plan, quant, data, seed: int):
    """Apply the quant decisions to ``compressed`` in place; the plan with all decisions applied."""
    from pycompress.plan import Plan
    from pycompress.rewrites import ApplyContext, apply_plan

    ctx = ApplyContext(model_activations=_model_activations(data, QUANT_FINAL_SAMPLES, seed))
    done = apply_plan(compressed, Plan([type(d)(d.site, d.action, dict(d.params), d.note) for d in quant]), ctx)
    return Plan(plan.decisions + done.decisions, plan.model, {**plan.meta, **done.meta}, plan.version)


def _heldout_quality(args, config, model, compressed) -> dict | None:
    """The result against the original on held-out data (--heldout, or the source's own held-out split)."""
    from pycompress.data import default_heldout, load_data
    from pycompress.fidelity.compare import heldout_comparison

    spec = args.heldout if args.heldout is not None else default_heldout(config["data"])
    if not spec or spec == "none":
        return None
    data = load_data(spec, model)
    inputs = {k: np.asarray(v[:]) for k, v in data.inputs.items()}
    return {"source": spec, **heldout_comparison(model, compressed, inputs, threads=args.threads)}


def _search(args, config, model, data, estimator, log, save_config, run_dir):
    """PAC-BO or random search: (compressed model, applied plan, summary, trace, objective)."""
    from pycompress.decisions.bo import PACBO, PACBOSettings, RandomSearch
    from pycompress.pipeline import CompressionObjective, build_search_space, describe_point, objective_from_extras
    from pycompress.executor import parse_executor

    parse_executor(args.executor)
    if args.device and config.get("objective") != "latency":
        raise PycompressError("--device times candidates on a device: it needs --objective latency")
    if args.points_per_fit is not None and args.points_per_fit < 1:
        raise PycompressError(f"--points-per-fit must be at least 1, got {args.points_per_fit}")
    if args.resume and config.get("points_per_fit") is None:
        config["points_per_fit"] = 1           # runs saved before the option searched one point per fit
    if args.resume and args.points_per_fit not in (None, config["points_per_fit"]):
        raise PycompressError(f"--points-per-fit: the run in {args.resume} proposes {config.get('points_per_fit')} "
                              "points per fit; a resumed search keeps it")
    space, skipped = build_search_space(model, config["actions"], config.get("granularity", "layer"),
                                        max_prune=config.get("max_prune", 1.0), align=config.get("align", 1))
    _log_skipped(skipped, log)
    from pycompress.rewrites import ApplyContext

    # Pruning runs before factorizing: a rank chosen for the full layer may no
    # longer shrink the pruned one; then the layer stays unfactored.
    latency = None
    if config.get("objective") == "latency":
        from pycompress.fidelity.latency import LatencyProbe

        log("timing the original model (the latency baseline)")
        feeds = {k: v[:1] for k, v in data.inputs.items()}
        if args.device:
            from pycompress.bench.remote import RemoteLatencyProbe, parse_devices

            log(f"timing on {args.device}")
            latency = RemoteLatencyProbe(model, feeds, parse_devices(args.device), runs=args.latency_runs,
                                         threads=args.threads)
        else:
            latency = LatencyProbe(model, feeds, runs=args.latency_runs, threads=args.threads)
        log(f"original latency {latency.baseline.mean * 1e3:.3f} ms +- {latency.baseline.std_error * 1e3:.2g} "
            "(batch 1)")
    options: dict[str, Any] = {"skip_rank_beyond_r_max": True}
    activations = None
    if "prune" in config["actions"]:
        from pycompress.pipeline import teacher_channel_statistics

        # FLAP: channels kept by fluctuation (with bias compensation), from one pass on the original.
        log("pruning criterion: fluctuation statistics of the prunable groups' consumers (one pass)")
        options["channel_statistics"] = teacher_channel_statistics(model, data.inputs, seed=config["seed"])
    if "quant" in config["actions"]:
        # Each candidate's int8 ranges are calibrated on a small fixed sample (the result, after
        # recovery, on QUANT_FINAL_SAMPLES: _quantize_last).
        options["quant_calibration_samples"] = QUANT_SEARCH_SAMPLES
        activations = _model_activations(data, QUANT_SEARCH_SAMPLES, config["seed"])
    objective = CompressionObjective(model, space, estimator,
                                     context=ApplyContext(options=options, model_activations=activations),
                                     objective=config.get("objective", "size"), latency=latency)
    space = objective.space
    if space.grouped:
        log(f"searching {space.d} coordinates over {len(space.dimensions)} sites: "
            + "; ".join(f"{name}: {', '.join(space.dimensions[i].site for i in idx)}"
                        for name, idx in zip(space.coordinate_names(), space.members)))
    else:
        log(f"searching {space.d} decisions: " + ", ".join(f"{d.site} ({d.action} {d.param} <= {d.high})"
                                                          for d in space.dimensions))

    executor = _executor(args, config, model, data, objective, log)
    if config.get("points_per_fit") is None:
        config["points_per_fit"] = getattr(executor, "workers", 1)
    # The budget: a resumed run keeps the saved one unless raised (a finished search is not silently extended).
    config["max_evals"] = args.max_evals if args.max_evals is not None else config.get("max_evals") or 100
    config["time_limit"] = args.time_limit if args.time_limit is not None else config.get("time_limit")
    config.setdefault("noise_target", NOISE_TARGET)
    settings = PACBOSettings(delta=config["delta"], relative_delta=config["relative_delta"],
                             epsilon=config["epsilon"], initial=config["initial"], max_evals=config["max_evals"],
                             time_limit=config["time_limit"], seed=config["seed"], batch_size=config["points_per_fit"],
                             noise_target=config["noise_target"] if config["method"] == "pacbo" else None)

    def progress(step, obs) -> None:
        ratio = obs.extras.get("ratio", float("nan"))
        line = (f"eval {len(planner.observations):3d}  J={obs.value:.5g} +- {math.sqrt(obs.variance):.2g}  "
                f"ratio={ratio:.3f}  L={obs.extras.get('fidelity', float('nan')):.4g}  "
                f"m={obs.extras.get('samples', 0)}")
        if step is not None:
            line += f"  | incumbent J={step.incumbent_value:.5g}"
            if math.isfinite(step.z_max):
                line += f"  z_max={step.z_max:.3f}  P={step.probability:.4f}"
        log(line)

    target_mode = config["gamma"] is None or config.get("gamma_from_target", False)
    feasible = None
    if target_mode and objective.objective != "latency":
        feasible, why = _target_domain(objective, config["target_size"])
        if why:
            log(f"note: {why}")
    kind = PACBO if config["method"] == "pacbo" else RandomSearch
    # 1/R is counted from the plan (exact, no run): the GP models the rest of J (decisions/bo/known_part.py).
    known = None if objective.objective == "latency" else (lambda x: 1.0 / objective.predicted_ratio(x))
    planner = kind(space.d, objective, settings, run_dir=run_dir, snap=space.snap, progress=progress,
                   feasible=feasible, executor=executor, known=known)
    resumed = bool(args.resume) and planner.state_path.is_file()
    if resumed:
        planner.load()
    else:
        # A kill before the first state was saved resumes from scratch: same seed, same design.
        seeds = _seed_points(args, config, space, model, data, log)
        if feasible is not None:
            seeds.insert(0, _target_point(objective, config["target_size"]))
        planner.seeds = [planner._point(p) for p in seeds]
    if target_mode and "gamma" not in planner.meta:
        # Gamma for the target size, from the initial design: evaluated (and saved) by the planner like
        # any evaluation, so a kill here resumes without redoing it; the search reuses them.
        log(f"choosing gamma for target size {config['target_size']:g} on the initial design")
        stop = planner.evaluate_design()
        if len(planner.observations) < 2:
            raise PycompressError(f"the budget ({stop}) ran out before 2 points of the initial design were "
                                  "evaluated; raise --max-evals / --time-limit")
        planner.meta["gamma_choice"] = _choose_gamma(planner, config, log)
        planner.meta["gamma"] = planner.meta["gamma_choice"]["gamma"]
    gamma = float(planner.meta["gamma"] if target_mode else config["gamma"])
    objective.gamma = gamma
    # Every observation's J at this gamma, from its saved quality and ratio (the same arithmetic in an
    # uninterrupted and a resumed run); saved with the gamma choice in one write.
    planner.reweigh(lambda o: objective_from_extras(gamma, o.extras))

    try:
        result = planner.run()
    except KeyboardInterrupt:
        print(f"pycompress: search interrupted after {len(planner.observations)} evaluations; continue with "
              f"--resume {run_dir}", file=sys.stderr)
        raise
    finally:
        if hasattr(executor, "shutdown"):
            executor.shutdown()
    log(result.summary())
    if target_mode:
        config["gamma"] = gamma
        config["gamma_from_target"] = True
        config["gamma_predicted_ratio"] = planner.meta["gamma_choice"]["predicted_ratio"]
    save_config()

    compressed, plan = objective.compress(result.theta)
    summary = {
        "method": config["method"], "certified": result.certified,
        "probability": result.probability, "z_max": result.z_max, "stop_reason": result.stop_reason,
        "delta": result.history[-1].delta if result.history else config["delta"], "epsilon": config["epsilon"],
        "gamma": config["gamma"], "target_size": config["target_size"], "objective": objective.objective,
        "ratio": objective.ratio_of(compressed),
        "J": result.value, "evaluations": result.evaluations, "search_seconds": result.seconds,
        "decisions": describe_point(space, result.theta),
    }
    if target_mode:
        summary["target_band"] = None if feasible is None else TARGET_BAND
        note = _target_note(config, result, summary["ratio"], objective.counted.replace("_", " "))
        if note:
            summary["target_note"] = note
            log(f"note: {note}")
    if latency is not None:
        summary["latency_ratio"], var = latency.ratio(compressed)
        summary["latency_ratio_std_error"] = math.sqrt(var)
        summary["latency_ms_before"] = latency.baseline.mean * 1e3
    if space.grouped:
        summary["groups"] = {name: [space.dimensions[i].site for i in idx]
                             for name, idx in zip(space.coordinate_names(), space.members) if len(idx) > 1}
    return compressed, plan, summary, _trace(config, space, result, summary), objective


def _executor(args, config, model, data, objective, log):
    """The executor of ``--executor`` / ``--device`` (None: in process, one after the other)."""
    from pycompress.executor import ObjectiveRecipe, RayExecutor, ThreadExecutor, parse_executor

    kind, address = parse_executor(args.executor)
    if kind == "ray":
        import onnx_ir as ir

        recipe = ObjectiveRecipe(
            ir.to_proto(model).SerializeToString(), data.inputs, data.labels if config["use_labels"] else None,
            {"loss": config["loss"], "samples": config["samples"], "outputs": config["outputs"],
             "seed": config["seed"], "threads": args.threads},
            {"actions": config["actions"], "granularity": config.get("granularity", "layer"),
             "max_prune": config.get("max_prune", 1.0), "align": config.get("align", 1)},
            objective.objective, dict(objective.context.options), objective.latency)
        executor = RayExecutor(recipe, address)
        log(f"evaluations run as Ray tasks on {executor.workers} workers" + (f" ({address})" if address else ""))
        return executor
    devices = len(getattr(objective.latency, "devices", ()))
    return ThreadExecutor(devices) if devices > 1 else None


def _seed_points(args, config, space, model, data, log) -> list:
    """The seed points of the initial design: --seed-plan plans, then PFA's (--init pfa)."""
    from pycompress.plan import Plan

    # A seed plan (e.g. PFA's) may decide sites this search leaves out: those decisions are dropped.
    seeds = [space.encode(Plan.load(p), strict=False) for p in config["seed_plans"]]
    if config.get("init") == "pfa":
        from pycompress.analysis import pfa_plan

        log("PFA seed plan: " + (f"PFA-En tau={config['energy']}" if config.get("energy") is not None else "PFA-KL"))
        seeds.append(space.encode(pfa_plan(model, data, energy=config.get("energy"), progress=not args.quiet,
                                           threads=args.threads), strict=False))
    return seeds


def _choose_gamma(planner, config, log) -> dict[str, Any]:
    """Gamma for the target size from the evaluations so far (``gamma_from_observations``)."""
    from pycompress.pipeline import gamma_from_observations

    choice = gamma_from_observations([o.extras["quality"] for o in planner.observations],
                                     [o.extras["ratio"] for o in planner.observations], config["target_size"],
                                     [o.extras["quality_var"] for o in planner.observations])
    for note in choice.notes:
        log(f"note: {note}")
    log(f"gamma = {choice.gamma:.6g} (the measured trade-off's slope at the target, from "
        f"{len(planner.observations)} evaluations)")
    return {"gamma": choice.gamma, "predicted_ratio": choice.predicted_ratio, "reachable": choice.reachable,
            "notes": choice.notes}


def _target_point(objective, target: float) -> np.ndarray:
    """The point with every coordinate at one fraction u whose ratio is the target (bisection on u):
    a first point inside the target's band for the initial design."""
    d = objective.space.d
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if objective.predicted_ratio(objective.space.snap(np.full(d, mid)))[0] < target:
            lo = mid
        else:
            hi = mid
    return objective.space.snap(np.full(d, hi))


def _target_domain(objective, target: float):
    """(feasible, note): the points whose ratio is within TARGET_BAND of the target, or (None, why)
    when no point the search can reach is there."""
    space = objective.space
    low = objective.predicted_ratio(space.snap(np.zeros(space.d)))[0]
    high = objective.predicted_ratio(space.snap(np.ones(space.d)))[0]
    if target < low - TARGET_BAND:
        return None, (f"target {target:g} cannot be reached: the searched actions keep at least {low:.3f} "
                      f"of the {objective.counted.replace('_', ' ')} (every site at its smallest value)")
    if target > high + TARGET_BAND:
        return None, (f"target {target:g} cannot be reached: the searched sites keep at most {high:.3f} "
                      f"of the {objective.counted.replace('_', ' ')}")

    def feasible(points: np.ndarray) -> np.ndarray:
        return np.abs(objective.predicted_ratio(np.atleast_2d(points)) - target) <= TARGET_BAND

    return feasible, None


def _target_note(config, result, ratio: float, counted: str) -> str | None:
    """A plain sentence when the result misses --target-size by more than 0.05, saying why."""
    target = config.get("target_size")
    if target is None or abs(ratio - target) <= 0.05:
        return None
    why = ({"max_evals": "the evaluation budget ran out first (raise --max-evals)",
            "time_limit": "the time limit ran out first (raise --time-limit)"}.get(result.stop_reason)
           or "no gamma puts the optimum of J = gamma Q + 1/R there: the fidelity changes steeply around that "
              "ratio, so the best trade-off jumps past it (choose --gamma, or another target)")
    return f"target {target:g} not reached: the result keeps {ratio:.3f} of the {counted}; {why}"


def _log_skipped(notes: list[str], log, shown: int = 3) -> None:
    """Sites left out of the search: a few in full, the rest counted by reason (real networks have dozens)."""
    for note in notes[:shown]:
        log(f"skip {note}")
    if len(notes) > shown:
        reasons = Counter(note.split(": ", 1)[-1].split(" (group=")[0] for note in notes[shown:])
        log(f"skip {len(notes) - shown} more sites: " + "; ".join(f"{n} x {r}" for r, n in reasons.most_common()))


def _one_shot(args, config, model, data, log):
    """PFA or a given plan, applied once: (compressed model, applied plan, summary)."""
    from pycompress.plan import Plan
    from pycompress.rewrites import apply_plan

    if config["method"] == "pfa":
        from pycompress.analysis import pfa_plan

        target = args.target_size if args.energy is None else None
        log("PFA: responses of every prunable group, spectra, recipe "
            + (f"PFA-En tau={args.energy}" if args.energy is not None else
               f"footprint target {target}" if target is not None else "PFA-KL"))
        plan_in = pfa_plan(model, data, energy=args.energy, target_size=target, progress=not args.quiet,
                           threads=args.threads)
    else:
        plan_in = Plan.load(config["method"]).without_results()
        from pycompress.rewrites.compose import check_plan_composes

        check_plan_composes(model, plan_in, where=config["method"])
    compressed = model.clone()
    ctx = None
    if any(d.action == "prune" and "keep" in d.params for d in plan_in.decisions):
        from pycompress.pipeline import teacher_channel_statistics
        from pycompress.rewrites import ApplyContext

        log("pruning criterion: fluctuation statistics of the pruned groups' consumers (one pass)")
        ctx = ApplyContext(options={"channel_statistics": teacher_channel_statistics(model, data.inputs,
                                                                                     seed=config["seed"])})
    # Quantization comes after the recovery (run's _quantize_last): applied here without it.
    quant = [d for d in plan_in.decisions if d.action == "quant"]
    plan = apply_plan(compressed, Plan([d for d in plan_in.decisions if d.action != "quant"], plan_in.model,
                                       dict(plan_in.meta)), ctx)
    plan.decisions += quant
    summary = {"method": config["method"], "decisions": {d.site: d.params for d in plan.decisions},
               "plan_meta": plan_in.meta}
    return compressed, plan, summary


def _trace(config: dict[str, Any], space, result, summary: dict[str, Any]) -> dict[str, Any]:
    """The search as the report reads it (``search {gamma, certificate, ..., trace [...]}``)."""
    after = {step.evaluations: step for step in result.history}
    trace = []
    for i, obs in enumerate(result.observations):
        step = after.get(i + 1)      # the GP fit right after this evaluation
        trace.append({
            "eval": i + 1, "theta": list(obs.theta),
            "decisions": {d.site: v for d, v in zip(space.dimensions, space.values(obs.theta))},
            "ratio": obs.extras.get("ratio"), "fidelity_mean": obs.extras.get("fidelity"),
            "fidelity_se": obs.extras.get("fidelity_std_error"), "samples": obs.extras.get("samples"),
            "quality": obs.extras.get("quality"), "quality_scale": obs.extras.get("quality_scale"),
            "J": obs.value, "J_se": math.sqrt(obs.variance),
            "z": obs.z,                                   # acquisition value that chose it (None: design)
            "z_max": None if step is None else step.z_max,
            "probability": None if step is None else step.probability,
            "incumbent_J": None if step is None else step.incumbent_value,
            "seconds": obs.seconds,
            **{k: v for k, v in obs.extras.items() if k in ("agreement", "accuracy", "cosine")},
        })
    search = {"method": config["method"], "gamma": config["gamma"], "target_size": config["target_size"],
              "certificate": result.certified, "probability": result.probability, "z_max": result.z_max,
              "delta": summary["delta"], "epsilon": config["epsilon"], "stop_reason": result.stop_reason,
              "evaluations": result.evaluations, "seconds": result.seconds, "trace": trace}
    return {"config": config,
            "dimensions": [{"site": d.site, "action": d.action, "r_max": d.high, "untouched_from": d.untouched_from,
                            "group": d.group} for d in space.dimensions],
            "result": summary, "search": search}
