"""`pycompress apply MODEL.onnx PLAN.json -o OUT.onnx [--data SPEC]`: apply a plan,
report params / MACs / size before and after and the output difference.

The whole plan is validated before anything changes, and nothing is written
unless every decision applied and the result passed the checker. Next to
``OUT.onnx`` goes ``OUT.plan.json``: the plan with what each decision changed.
With ``--data`` the calibration inputs feed data-aware decisions (the
rewrites read intermediate activations of the model being rewritten) and the
output difference is measured on them; without it, on random inputs.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from pycompress.cli.common import (AT_LEAST_ONE, NON_NEGATIVE, check_numbers, data_inputs, emit_json, human, model_inputs,
                                   output_policy, print_table)
from pycompress.data import Calibration, load_data
from pycompress.data.synthetic import synthetic_inputs
from pycompress.errors import PycompressError
from pycompress.fidelity import run_model
from pycompress.fidelity.compare import cosine_similarities, is_embedding
from pycompress.fidelity.session import activation_source, upstream_of  # noqa: F401  (tools import upstream_of here)
from pycompress.ir import SEQUENCE_LENGTH, has_sequence_axis, load_model, model_cost, save_model, token_mask_input
from pycompress.plan import Plan
from pycompress.rewrites import ApplyContext, apply_plan
from pycompress.rewrites.compose import check_plan_composes


def add_parser(sub) -> None:
    p = sub.add_parser("apply", help="apply a plan to a model and report what it changed")
    p.add_argument("model", help="path to the .onnx model the plan was made for")
    p.add_argument("plan", help="the plan .json (from `pycompress plan`, possibly edited)")
    p.add_argument("-o", "--output", required=True, help="the .onnx file to write (the plan with results goes "
                   "next to it as <name>.plan.json)")
    p.add_argument("--data", metavar="SPEC",
                   help="calibration inputs (.npz, .npy or builtin:NAME): fit data-aware decisions and measure "
                        "the output difference on them")
    p.add_argument("--weight-only", action="store_true",
                   help="with --data: use the data only to measure, unless a decision says data_aware: true")
    p.add_argument("--eval-data", metavar="SPEC",
                   help="inputs to measure the output difference on (default: --data, which the data-aware "
                        "fit has seen, or random inputs)")
    p.add_argument("--samples", type=int, default=16,
                   help="inputs used to measure the output difference (default 16)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size for onnxruntime runs (default 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def results_path(output: str | Path) -> Path:
    """``OUT.onnx`` -> ``OUT.plan.json`` (beside the model)."""
    output = Path(output)
    stem = output.name[:-5] if output.name.endswith(".onnx") else output.name
    return output.with_name(stem + ".plan.json")


def _file_bytes(path: Path, model: ir.Model | None = None) -> int:
    """The .onnx file plus its external data (as recorded at load, or the ``<name>.data`` we write)."""
    if model is not None and "pycompress.external_bytes" in model.meta:
        return path.stat().st_size + int(model.meta["pycompress.external_bytes"])
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def _sizes(model: ir.Model) -> dict[str, int]:
    # A token model: MACs per sequence of SEQUENCE_LENGTH tokens (ir.accounting).
    cost = model_cost(model, SEQUENCE_LENGTH if has_sequence_axis(model) else None)
    return {"params": cost.params, "macs": cost.macs, "weight_bytes": cost.bytes}


def _activation_source(model: ir.Model, calibration: Calibration, batch_size: int):
    """Streams intermediate values of ``model`` as it is being rewritten (later sites see earlier changes)."""
    return activation_source(model, calibration.inputs, batch_size)


def output_difference(reference: ir.Model, model: ir.Model, inputs: dict[str, np.ndarray],
                      batch_size: int) -> list[dict[str, Any]]:
    """Per graph output: max |diff|, relative L2 ``||y - y'|| / ||y||``, top-1 agreement for 2-D scores,
    mean cosine for embeddings (``fidelity.compare.is_embedding``)."""
    expected = run_model(reference, inputs, batch_size=batch_size)
    got = run_model(model, inputs, batch_size=batch_size)
    rows = []
    for value, y, y2 in zip(reference.graph.outputs, expected, got):
        y, y2 = y.astype(np.float64), y2.astype(np.float64)
        norm = float(np.linalg.norm(y))
        row = {"output": value.name, "max_abs_diff": float(np.max(np.abs(y - y2))) if y.size else 0.0,
               "relative_l2": float(np.linalg.norm(y - y2) / norm) if norm > 0 else float(np.linalg.norm(y2)),
               "top1_agreement": None, "cosine": None}
        if is_embedding(y):
            row["cosine"] = float(np.mean(cosine_similarities(y, y2)))
        elif y.ndim == 2 and y.shape[1] > 1:
            row["top1_agreement"] = float(np.mean(np.argmax(y, 1) == np.argmax(y2, 1)))
        rows.append(row)
    return rows


def run(args) -> int:
    check_numbers(args, samples=AT_LEAST_ONE, batch_size=AT_LEAST_ONE, seed=NON_NEGATIVE)
    output = Path(args.output)
    if results_path(output).resolve() == Path(args.plan).resolve():
        raise PycompressError(f"{args.plan}: the results would overwrite the input plan "
                              f"({results_path(output).name} is written next to -o); choose another output name")
    inputs = {**model_inputs("model", args.model), "plan": args.plan, **data_inputs("--data", args.data),
              **data_inputs("--eval-data", args.eval_data)}
    with output_policy({"-o": output, "plan results": results_path(output)}, inputs, lock=[output]):
        return _run(args)


def _run(args) -> int:
    model_path, output = Path(args.model), Path(args.output)
    model = load_model(model_path)
    plan = Plan.load(args.plan)
    if not plan.decisions:
        raise PycompressError(f"{args.plan}: the plan has no decisions")
    # The whole plan, before the data is read or anything is fitted.
    check_plan_composes(model, plan, where=str(args.plan))
    if args.data is None:
        for decision in plan.decisions:
            if decision.params.get("data_aware") is True:
                raise PycompressError(f"site '{decision.site}': data_aware needs calibration data; pass --data")
    reference = model.clone()
    calibration = load_data(args.data, model) if args.data else None
    evaluation = load_data(args.eval_data, model) if args.eval_data else calibration
    ctx = ApplyContext()
    if calibration is not None:
        ctx = ApplyContext(_activation_source(model, calibration, args.batch_size),
                           {"data_aware": not args.weight_only, "token_mask": token_mask_input(model)},
                           reference_activations=_activation_source(reference, calibration, args.batch_size))
    before = {**_sizes(model), "file_bytes": _file_bytes(model_path, model)}
    # With data, rewrites stream activations: say what is being done (it can take minutes).
    log = (lambda line: print(f"apply {line}", file=sys.stderr, flush=True)) if calibration is not None else None
    applied = apply_plan(model, plan, ctx, progress=log)  # validates everything first; raises before any write
    after = _sizes(model)
    if evaluation is not None:
        inputs = evaluation.subset(np.arange(min(args.samples, len(evaluation)))).inputs
        measured_on = f"first {min(args.samples, len(evaluation))} samples of {evaluation.source}"
    else:
        inputs = synthetic_inputs(reference, args.samples, args.seed)
        measured_on = f"{args.samples} synthetic inputs (seed {args.seed}: normal floats, token ids in the vocabulary)"
    difference = output_difference(reference, model, inputs, args.batch_size)
    save_model(model, output)
    after["file_bytes"] = _file_bytes(output)
    applied.meta = {**applied.meta, "applied": {"output": str(output), "before": before, "after": after,
                                                "output_difference": difference, "measured_on": measured_on}}
    plan_out = applied.save(results_path(output))
    payload = {"model": str(model_path), "plan": str(args.plan), "output": str(output), "plan_output": str(plan_out),
               "before": before, "after": after, "measured_on": measured_on, "output_difference": difference,
               "decisions": [d.to_dict() for d in applied.decisions]}
    if args.json:
        emit_json(payload)
        return 0
    rows = []
    for d in applied.decisions:
        r = d.result or {}
        rows.append([d.site, d.action, ", ".join(f"{k}={v}" for k, v in d.params.items()),
                     _pair(r.get("params_before"), r.get("params_after")), _pair(r.get("macs_before"),
                                                                                 r.get("macs_after"))])
    print_table(["site", "action", "params", "layer params", "layer MACs"], rows, align="lllrr")
    print()
    print_table(["", "before", "after", "after/before"],
                [[key, human(before[key]), human(after[key]), _ratio(after[key], before[key])]
                 for key in ("params", "macs", "weight_bytes", "file_bytes")])
    print()
    print(f"output difference on {measured_on}:")
    for row in difference:
        agree = "" if row["top1_agreement"] is None else f", top-1 agreement {row['top1_agreement']:.1%}"
        if row["cosine"] is not None:
            agree = f", mean cosine {row['cosine']:.4f} (embedding)"
        print(f"  {row['output']}: max |diff| {row['max_abs_diff']:.4g}, relative L2 {row['relative_l2']:.4g}{agree}")
    print(f"wrote {output} and {plan_out}")
    return 0


def _pair(a: Any, b: Any) -> str:
    if a is None or b is None:
        return "-"
    return f"{human(a)} -> {human(b)}"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}" if b else "-"
