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

from pycompress.cli.common import emit_json, human, print_table
from pycompress.errors import PycompressError

# Settings that define a search: a resumed run takes them from its run folder.
_SEARCH_KEYS = ("method", "actions", "gamma", "target_size", "loss", "use_labels", "labels", "outputs", "samples",
                "delta", "relative_delta", "epsilon", "seed", "initial", "seed_plans", "data")
CONFIG_NAME = "compress.json"


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
    p.add_argument("--method", choices=["pacbo", "random"], default="pacbo", help="search method (default pacbo)")
    p.add_argument("--actions", default="svd", help="comma-separated rank actions to search (default svd)")
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
    p.add_argument("--max-evals", type=int, default=100, help="evaluation budget (default 100)")
    p.add_argument("--time-limit", type=float, default=None, help="wall-time budget in seconds")
    p.add_argument("--initial", type=int, default=None, help="Sobol points of the initial design")
    p.add_argument("--seed", type=int, default=0, help="seed of the search and the subsamples (default 0)")
    p.add_argument("--seed-plan", action="append", default=[], metavar="PLAN.json",
                   help="also evaluate this plan first (e.g. from PFA); repeatable")
    p.add_argument("--run-dir", default=None, help="folder for the resumable state (default OUT.run)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue the search saved in RUN_DIR")
    p.add_argument("--plan", default=None, help="where to write the plan (default OUT.plan.json)")
    p.add_argument("--trace", default=None, help="where to write the trace (default OUT.trace.json)")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime threads for evaluations")
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
    return {
        "method": args.method, "actions": [a.strip() for a in args.actions.split(",") if a.strip()],
        "gamma": args.gamma, "target_size": (None if args.gamma is not None else
                                             (args.target_size if args.target_size is not None else 0.25)),
        "loss": args.loss or ("error" if use_labels else "norm"), "use_labels": use_labels,
        "labels": args.labels or None, "outputs": [o for o in (args.outputs or "").split(",") if o] or None,
        "samples": args.samples, "delta": args.delta, "relative_delta": args.relative_delta,
        "epsilon": args.epsilon, "seed": args.seed, "initial": args.initial,
        "seed_plans": [str(Path(p).resolve()) for p in args.seed_plan], "data": args.data,
    }


def run(args) -> int:
    from pycompress.decisions.bo import PACBO, PACBOSettings, RandomSearch
    from pycompress.ir import atomic_write_text, load_model, save_model
    from pycompress.data import load_data
    from pycompress.fidelity import FidelityEstimator
    from pycompress.pipeline import CompressionObjective, build_search_space, describe_point, select_gamma
    from pycompress.plan import Plan

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
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if config.get("model_sha256") != model_hash:
            raise PycompressError(f"{model_path}: this is not the model the run in {run_dir} was searching")
    else:
        run_dir = Path(args.run_dir) if args.run_dir else output.with_name(output.stem + ".run")
        if (run_dir / "state.json").exists():
            raise PycompressError(f"{run_dir}: already holds a search; continue it with --resume {run_dir} "
                                  "or choose another --run-dir")
        if not args.data:
            raise PycompressError("--data is required (calibration inputs: file.npz / file.npy / builtin:NAME)")
        config = {**_config_from_args(args), "model": str(model_path.resolve()), "model_sha256": model_hash}
    run_dir.mkdir(parents=True, exist_ok=True)

    def save_config() -> None:
        atomic_write_text(run_dir / CONFIG_NAME, json.dumps(config, indent=2) + "\n")

    save_config()

    log = (lambda line: None) if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    model = load_model(model_path)
    data = load_data(config["data"], model, labels=config["labels"])
    if config["use_labels"] and data.labels is None:
        raise PycompressError(f"{config['data']}: --labels given but the data has no labels (pass FILE.npy)")
    estimator = FidelityEstimator(model, data.inputs, labels=data.labels if config["use_labels"] else None,
                                  loss=config["loss"], samples=config["samples"], outputs=config["outputs"],
                                  seed=config["seed"], threads=args.threads)
    space, skipped = build_search_space(model, config["actions"])
    for note in skipped:
        log(f"skip {note}")
    objective = CompressionObjective(model, space, estimator)
    space = objective.space
    log(f"searching {space.d} decisions: " + ", ".join(f"{d.site} ({d.action} {d.param} <= {d.high})"
                                                      for d in space.dimensions))

    settings = PACBOSettings(delta=config["delta"], relative_delta=config["relative_delta"],
                             epsilon=config["epsilon"], initial=config["initial"], max_evals=args.max_evals,
                             time_limit=args.time_limit, seed=config["seed"])
    seeds = [space.encode(Plan.load(p)) for p in config["seed_plans"]]

    def progress(step, obs) -> None:
        ratio = obs.extras.get("ratio", float("nan"))
        line = (f"eval {len(planner.observations):3d}  J={obs.value:.5g} +- {math.sqrt(obs.variance):.2g}  "
                f"ratio={ratio:.3f}  L={obs.extras.get('fidelity', float('nan')):.4g}")
        if step is not None:
            line += f"  | incumbent J={step.incumbent_value:.5g}"
            if math.isfinite(step.z_max):
                line += f"  z_max={step.z_max:.3f}  P={step.probability:.4f}"
        log(line)

    kind = PACBO if config["method"] == "pacbo" else RandomSearch
    planner = kind(space.d, objective, settings, run_dir=run_dir, seeds=seeds, snap=space.snap,
                   progress=progress)
    if args.resume:
        planner.load()
    if config["gamma"] is None:
        # Gamma for the target size, from the initial design (those evaluations are reused by the search).
        points = planner.initial_design()
        offset = len(planner.observations)
        log(f"choosing gamma for target size {config['target_size']:g} on {len(points)} initial points")
        measurements = [objective.measure(p, offset + i) for i, p in enumerate(points)]
        choice = select_gamma(objective, np.asarray(points), measurements, config["target_size"],
                              rng=np.random.default_rng([config["seed"], 1]))
        for note in choice.notes:
            log(f"note: {note}")
        config["gamma"] = choice.gamma
        config["gamma_predicted_ratio"] = choice.predicted_ratio
        log(f"gamma = {choice.gamma:.6g} (predicted ratio {choice.predicted_ratio:.3f})")
    objective.gamma = float(config["gamma"])
    save_config()

    try:
        result = planner.run()
    except KeyboardInterrupt:
        print(f"pycompress: search interrupted after {len(planner.observations)} evaluations; continue with "
              f"--resume {run_dir}", file=sys.stderr)
        raise
    log(result.summary())

    compressed, plan = objective.compress(result.theta)
    final = estimator.evaluate_on(compressed, np.arange(min(estimator.pool, 5000)))
    ratio = objective.ratio_of(compressed)
    summary = {
        "method": config["method"], "certified": result.certified,
        "probability": result.probability, "z_max": result.z_max, "stop_reason": result.stop_reason,
        "delta": result.history[-1].delta if result.history else config["delta"], "epsilon": config["epsilon"],
        "gamma": config["gamma"], "target_size": config["target_size"], "ratio": ratio,
        "J": result.value, "evaluations": result.evaluations, "search_seconds": result.seconds,
        "fidelity_loss": config["loss"], "fidelity": final.mean, "fidelity_std_error": final.std_error,
        "fidelity_samples": final.samples, **{f"final_{k}": v for k, v in final.extras.items()},
        "decisions": describe_point(space, result.theta),
    }
    plan.model = str(model_path)
    plan.meta = _finite({"planner": config["method"], **{k: v for k, v in summary.items() if k != "decisions"}})
    plan_path = Path(args.plan) if args.plan else output.with_name(output.stem + ".plan.json")
    trace_path = Path(args.trace) if args.trace else output.with_name(output.stem + ".trace.json")
    save_model(compressed, output)
    plan.save(plan_path)
    atomic_write_text(trace_path, json.dumps(_finite(_trace(config, space, result, summary)), indent=1) + "\n")

    if args.json:
        emit_json(_finite({**summary, "output": str(output), "plan": str(plan_path), "trace": str(trace_path),
                           "run_dir": str(run_dir), "seconds": time.monotonic() - started}))
    else:
        before = objective.params_sites
        rows = [["compressed layers", human(before), human(round(ratio * before)), f"{ratio:.3f}"]]
        print_table(["", "params before", "after", "ratio"], rows)
        cert = (f"certificate: P(J(t*) - J(t^) < {summary['delta']:.4g}) = {result.probability:.4f} "
                f">= {1 - config['epsilon']:g}" if result.certified else result.summary())
        print(f"{cert}\ngamma = {config['gamma']:.6g}; decisions: {summary['decisions']}")
        extra = "".join(f", {k.removeprefix('final_')} {v:.4f}" for k, v in summary.items()
                        if k in ("final_agreement", "final_accuracy"))
        print(f"fidelity ({config['loss']}) on {final.samples} samples: {final.mean:.4g} +- {final.std_error:.2g}"
              f"{extra}")
        print(f"wrote {output}, {plan_path}, {trace_path}")
    return 0


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
            "fidelity_se": obs.extras.get("fidelity_std_error"), "J": obs.value, "J_se": math.sqrt(obs.variance),
            "z": obs.z,                                   # acquisition value that chose it (None: design)
            "z_max": None if step is None else step.z_max,
            "probability": None if step is None else step.probability,
            "incumbent_J": None if step is None else step.incumbent_value,
            "seconds": obs.seconds,
            **{k: v for k, v in obs.extras.items() if k in ("agreement", "accuracy")},
        })
    search = {"method": config["method"], "gamma": config["gamma"], "target_size": config["target_size"],
              "certificate": result.certified, "probability": result.probability, "z_max": result.z_max,
              "delta": summary["delta"], "epsilon": config["epsilon"], "stop_reason": result.stop_reason,
              "evaluations": result.evaluations, "seconds": result.seconds, "trace": trace}
    return {"config": config,
            "dimensions": [{"site": d.site, "action": d.action, "r_max": d.high, "untouched_from": d.untouched_from}
                           for d in space.dimensions],
            "result": summary, "search": search}
