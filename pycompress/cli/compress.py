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
from pathlib import Path
from typing import Any

import numpy as np

from pycompress.cli.common import (AT_LEAST_ONE, FRACTION, NON_NEGATIVE, POSITIVE, PROBABILITY, Range, check_numbers,
                                   data_inputs, emit_json, human, model_inputs, output_policy, print_table)
from pycompress.cli.run_folder import check_state_file, output_paths, read_run_config
from pycompress.errors import PycompressError

CONFIG_NAME = "compress.json"


def __getattr__(name: str):
    """The search constants moved to ``pycompress.pipeline.planners`` (imported lazily: the help stays light)."""
    if name in ("NOISE_TARGET", "TARGET_BAND"):
        from pycompress.pipeline import planners

        return getattr(planners, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    p.add_argument("--search-recovery", type=int, default=None, metavar="N",
                   help="refit each candidate of the search on N calibration samples (closed form, as the "
                        "recovery does) before scoring it on the others, so the search compares what recovery "
                        "makes of each candidate (default 0: score candidates as applied; docs/pipeline.md)")
    p.add_argument("--finetune", action="store_true",
                   help="after recovery, fine-tune the compressed ONNX graph's weights against the original "
                        "(MSE to its outputs + cross-entropy with labels when the data has them); kept only if "
                        "it lowers the held-out loss (docs/finetune.md)")
    p.add_argument("--finetune-epochs", type=int, default=3, help="fine-tuning epochs (default 3)")
    p.add_argument("--finetune-lr", type=float, default=None,
                   help="fine-tuning learning rate (default: the best of 1e-3, 1e-4, 1e-5 for rmsprop/adam, "
                        "1e-2 .. 1e-4 for sgd, each tried for a quarter epoch)")
    p.add_argument("--finetune-batch", type=int, default=64, help="fine-tuning batch size (default 64)")
    p.add_argument("--finetune-optimizer", choices=("rmsprop", "adam", "sgd"), default="rmsprop",
                   help="fine-tuning optimizer (default rmsprop, as CramNet)")
    p.add_argument("--finetune-data", default=None, metavar="DATA",
                   help="fine-tune on this data instead of --data (implies --finetune): more unlabeled samples "
                        "of the same kind, e.g. builtin:skimage:2048 (more crops of the calibration photos); "
                        "must not be the --heldout data")
    p.add_argument("--finetune-hidden", action="store_true",
                   help="fine-tuning also matches the original's hidden states (the outputs of its "
                        "LayerNormalization nodes, per token) besides the output: for transformer encoders, "
                        "more to learn from few sentences (implies --finetune; docs/transformers.md)")
    p.add_argument("--finetune-augment", type=int, default=0, metavar="N",
                   help="token models: fine-tune each epoch also on N new sequences per calibration sentence, "
                        "made from spans of the sentences' own tokens and labelled by the original "
                        "(implies --finetune; default 0)")
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
                      help="choose gamma so that the result keeps about this fraction of what --objective "
                           "counts (parameters, bytes, MACs); the search keeps within 0.04 of it, so for a "
                           "ceiling use --target-max (default 0.25 when --gamma is not given)")
    size.add_argument("--target-max", type=float, default=None, metavar="FRACTION",
                      help="a ceiling: the result keeps at most this fraction of what --objective counts "
                           "(parameters, bytes, MACs; not latency, which is timed); the search aims 0.04 "
                           "below it and keeps within [FRACTION - 0.08, FRACTION]")
    size.add_argument("--gamma", type=float, default=None, help="weight of the quality term in J (paper Eq. 2)")
    p.add_argument("--labels", nargs="?", const="", default=None, metavar="FILE.npy",
                   help="use labels (from the data, or FILE.npy): fidelity = top-1 error, Q = accuracy")
    p.add_argument("--loss", choices=LOSSES, default=None,
                   help="fidelity loss (default: norm, i.e. ||f~(x) - f*(x)||^2; error with --labels)")
    p.add_argument("--outputs", default=None, help="comma-separated model outputs compared (default: all)")
    p.add_argument("--samples", type=int, default=50, help="fresh subsample size per evaluation (default 50)")
    p.add_argument("--delta", type=float, default=0.05,
                   help="tolerated gap to the optimum of J, in units of its heavier term: of Q when gamma > 1 "
                   "(without labels 0.05 is a 5%% difference in output error), else of 1/R (default 0.05)")
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


# What each --objective counts, as the errors name it.
OBJECTIVE_WORDS = {"size": "parameters", "bytes": "bytes", "macs": "MACs", "latency": "latency"}


def _words(objectives, conjunction: str) -> str:
    words = [OBJECTIVE_WORDS[o] for o in objectives]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} {conjunction} {words[-1]}"


def _target_size(args) -> float | None:
    """The search's target: --target-size, or the middle of the band under --target-max (None with --gamma)."""
    if args.gamma is not None:
        return None
    if args.target_max is None:
        return args.target_size if args.target_size is not None else 0.25
    from pycompress.pipeline.planners import TARGET_BAND

    if args.objective == "latency":
        raise PycompressError("--target-max is a ceiling on what --objective counts; latency is timed, not "
                              "counted, so no search can promise it: use --target-size with --objective latency")
    if args.target_max <= 2 * TARGET_BAND:
        raise PycompressError(f"--target-max {args.target_max:g}: must be more than {2 * TARGET_BAND:g} (the search "
                              f"keeps within [FRACTION - {2 * TARGET_BAND:g}, FRACTION])")
    return args.target_max - TARGET_BAND


def _config_from_args(args) -> dict[str, Any]:
    use_labels = args.labels is not None
    from pycompress.pipeline.planners import PLANNERS
    from pycompress.rewrites import REGISTRY

    if args.method not in PLANNERS and not args.method.endswith(".json"):
        raise PycompressError(f"--method {args.method!r}: choose {', '.join(PLANNERS)} or a PLAN.json file")
    if args.method.endswith(".json") and not Path(args.method).exists():
        raise PycompressError(f"--method {args.method}: no such plan file")
    if args.method.endswith(".json") and not Path(args.method).is_file():
        raise PycompressError(f"--method {args.method}: not a regular file; a plan is a .json file")
    from pycompress.decisions.pfa import ACTION as PFA_ACTION

    if args.init == "pfa" and PFA_ACTION not in args.actions.split(","):
        raise PycompressError("--init pfa seeds pruning decisions: add prune to --actions")
    searching = args.method in PLANNERS and PLANNERS[args.method].searches
    if args.search_recovery and not searching:
        raise PycompressError(f"--search-recovery refits the candidates of a search; --method {args.method} "
                              "does not search")
    # Each searched rewrite says what it reduces (``Rewrite.reduces``); in rewrite order.
    known = sorted((REGISTRY[a] for a in {a.strip() for a in args.actions.split(",")} if a in REGISTRY),
                   key=lambda r: r.order)
    for rewrite in known:
        action = rewrite.action
        if searching and args.objective not in rewrite.reduces:
            raise PycompressError(f"--actions {action} reduces {_words(rewrite.reduces, 'and')}, not "
                                  f"{_words([o for o in OBJECTIVE_WORDS if o not in rewrite.reduces], 'or')}: use "
                                  + " or ".join(f"--objective {o}" for o in rewrite.reduces))
    return {
        "method": args.method, "actions": [a.strip() for a in args.actions.split(",") if a.strip()],
        "granularity": args.granularity, "objective": args.objective, "max_prune": args.max_prune,
        "align": args.align,
        "gamma": args.gamma, "target_size": _target_size(args), "target_max": args.target_max,
        "loss": args.loss or ("error" if use_labels else "norm"), "use_labels": use_labels,
        "labels": args.labels or None, "outputs": [o for o in (args.outputs or "").split(",") if o] or None,
        "samples": args.samples, "delta": args.delta, "relative_delta": args.relative_delta,
        "epsilon": args.epsilon, "seed": args.seed, "initial": args.initial,
        "seed_plans": [str(Path(p).resolve()) for p in args.seed_plan], "data": args.data,
        "init": args.init, "energy": args.energy, "points_per_fit": args.points_per_fit,
        "max_evals": args.max_evals if args.max_evals is not None else 100, "time_limit": args.time_limit,
        "recover_samples": args.recover_samples if args.recover_samples is not None else 512,
        "no_recover": bool(args.no_recover),
        "search_recovery": args.search_recovery or 0,
    }


def _settings(args):
    """How to run (``pipeline.stages.Settings``): the flags not saved in the run folder's config."""
    from pycompress.pipeline.stages import Settings

    return Settings(resume=args.resume, threads=args.threads, executor=args.executor, device=args.device,
                    latency_runs=args.latency_runs, points_per_fit=args.points_per_fit, max_evals=args.max_evals,
                    time_limit=args.time_limit, energy=args.energy,
                    # PFA's footprint target is already a ceiling ("keeps at most").
                    target_size=args.target_max if args.target_max is not None else args.target_size,
                    recover_samples=args.recover_samples, no_recover=bool(args.no_recover),
                    finetune=bool(args.finetune or args.finetune_data or args.finetune_hidden
                                  or args.finetune_augment),
                    finetune_epochs=args.finetune_epochs,
                    finetune_lr=args.finetune_lr, finetune_batch=args.finetune_batch,
                    finetune_optimizer=args.finetune_optimizer,
                    finetune_data=args.finetune_data, finetune_hidden=bool(args.finetune_hidden),
                    finetune_augment=args.finetune_augment, heldout=args.heldout, quiet=args.quiet)


def run(args) -> int:
    # Every check before any work: numbers, then the output-path policy (see pycompress.files).
    check_numbers(args, energy=FRACTION, recover_samples=AT_LEAST_ONE, finetune_epochs=AT_LEAST_ONE,
                  finetune_batch=AT_LEAST_ONE, finetune_augment=Range(0),
                  finetune_lr=POSITIVE, latency_runs=AT_LEAST_ONE, search_recovery=Range(0),
                  max_prune=FRACTION, align=AT_LEAST_ONE,
                  target_size=FRACTION, target_max=FRACTION, gamma=POSITIVE, samples=AT_LEAST_ONE, delta=NON_NEGATIVE,
                  epsilon=PROBABILITY, max_evals=AT_LEAST_ONE, time_limit=POSITIVE, initial=Range(0),
                  seed=NON_NEGATIVE, threads=Range(0, 1024))
    paths = output_paths(args)
    if args.finetune_data:
        from pycompress.data import default_heldout

        held = args.heldout if args.heldout is not None else default_heldout(args.data)
        if held and _source(args.finetune_data) == _source(held):
            raise PycompressError(f"--finetune-data {args.finetune_data}: the same source as the held-out data "
                                  f"({held}); the held-out figures would not be held out")
    inputs = {**model_inputs("model", args.model), **data_inputs("--data", args.data),
              **data_inputs("--finetune-data", args.finetune_data),
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


def _source(spec: str) -> str:
    """A data spec without its sample count (``builtin:skimage:256`` -> ``builtin:skimage``)."""
    head, _, count = str(spec).rpartition(":")
    return head if head.startswith("builtin:") and count.isdigit() else str(spec)


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
        if args.search_recovery is not None and args.search_recovery != config.get("search_recovery", 0):
            raise PycompressError(f"--search-recovery {args.search_recovery}: the run in {run_dir} scores "
                                  f"candidates with --search-recovery {config.get('search_recovery', 0)}; "
                                  "a resumed search keeps it")
    else:
        run_dir = Path(args.run_dir) if args.run_dir else output.with_name(output.stem + ".run")
        if (run_dir / "state.json").exists():
            raise PycompressError(f"{run_dir}: already holds a search; continue it with --resume {run_dir} "
                                  "or choose another --run-dir")
        config = {**_config_from_args(args), "model": str(model_path.resolve()), "model_sha256": model_hash}
    from pycompress.pipeline.planners import planner_for

    searching = planner_for(config["method"]).searches
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
    from pycompress.ir import SEQUENCE_LENGTH, has_sequence_axis, model_cost
    from pycompress.pipeline.stages import compress
    from pycompress.report import write_report

    load_stage = {"name": "load + data", "seconds": time.monotonic() - started}
    run = compress(model, data, config, estimator=estimator, settings=_settings(args), run_dir=run_dir, log=log,
                   save_config=save_config)
    stages = [load_stage, *run.stages]
    compressed, plan, summary, trace = run.compressed, run.plan, run.summary, run.trace
    recovery, finetuned, final, heldout = run.recovery, run.finetuned, run.final, run.heldout
    cost_sites = None if run.objective is None else run.objective.cost_sites
    # Token models: MACs per sequence of SEQUENCE_LENGTH tokens (attention grows with it), as `info` counts.
    sequence_length = SEQUENCE_LENGTH if has_sequence_axis(model) else None
    cost_before, cost_after = model_cost(model, sequence_length), model_cost(compressed, sequence_length)
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
        "actions": run.planner.actions(config),
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
                ["MACs" + (f" (sequence of {sequence_length})" if sequence_length else ""),
                 human(cost_before.macs), human(cost_after.macs),
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
            print(f"held-out ({heldout['source']}, {heldout['samples']} samples): {_heldout_figures(heldout)}")
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


def _heldout_figures(heldout: dict) -> str:
    """The held-out comparison in the units a user reads: agreement for classifiers, cosine for
    embeddings (``fidelity.compare``), else the relative error of the outputs."""
    if heldout.get("top1_agreement") is not None:
        return (f"top-1 agreement {heldout['top1_agreement']:.4f}, top-5 containment "
                f"{heldout['top5_containment']:.4f}, KL {heldout['kl_divergence']:.4g}")
    if heldout.get("cosine") is not None:
        return f"mean cosine {heldout['cosine']:.4f}, relative error {heldout['relative_error']:.4g}"
    return f"relative error {heldout['relative_error']:.4g}"
