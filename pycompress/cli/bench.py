"""`pycompress bench A.onnx [B.onnx ...]`: latency, throughput, size, cost and fidelity on a target runtime."""

from __future__ import annotations

import sys

from pycompress.bench import bench_models
from pycompress.bench.report import markdown, plot, table_rows
from pycompress.cli.common import (AT_LEAST_ONE, NON_NEGATIVE, Range, check_numbers, data_inputs, emit_json,
                                   model_inputs, output_policy, print_table)
from pycompress.errors import PycompressError


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="latency p50/p90/p99, throughput, size, params, MACs and (with --data) "
                                     "fidelity against the first model")
    p.add_argument("models", nargs="+", help=".onnx or .ort files; the first is the reference for fidelity")
    p.add_argument("--provider", default="cpu",
                   help="execution provider: cpu, cuda, tensorrt, rocm, openvino, dml, coreml, ... (default cpu)")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (default: onnxruntime's choice)")
    p.add_argument("--batch", type=int, default=1, help="batch size of the timed runs (default 1)")
    p.add_argument("--warmup", type=int, default=10, help="untimed runs first (default 10)")
    p.add_argument("--iters", type=int, default=100, help="timed runs per model (default 100)")
    p.add_argument("--rounds", type=int, default=10,
                   help="the timed runs are made in this many rounds over all models, interleaved (default 10)")
    p.add_argument("--data", help="inputs (.npz/.npy/builtin:NAME): timed batch and fidelity against the first model")
    p.add_argument("--samples", type=int, default=0, metavar="N", help="use only the first N samples of --data")
    p.add_argument("--markdown", metavar="PATH", help="also write the table as Markdown")
    p.add_argument("--plot", metavar="PATH", help="also write a PNG: size vs latency and size vs fidelity")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--device", metavar="HOST:PORT",
                   help="run on the device where `pycompress agent` listens (token in $PYCOMPRESS_AGENT_TOKEN; "
                        "docs/devices.md) instead of this machine")
    p.set_defaults(func=run)


def run(args) -> int:
    check_numbers(args, threads=Range(0, 1024), batch=AT_LEAST_ONE, warmup=NON_NEGATIVE, iters=AT_LEAST_ONE,
                  samples=NON_NEGATIVE)
    inputs = data_inputs("--data", args.data)
    for i, model in enumerate(args.models):
        inputs.update(model_inputs(f"model {model}" if i else "model", model))
    with output_policy({"--markdown": args.markdown, "--plot": args.plot}, inputs,
                       lock=[p for p in (args.markdown, args.plot) if p]):
        return _run(args)


def _run(args) -> int:
    from pathlib import Path

    from tqdm import tqdm

    from pycompress.ir import load_model

    # Every model validated up front: a damaged file is one clear error naming it, not a failure mid-table.
    for model in args.models:
        path = Path(model)
        if path.suffix == ".onnx" or not path.is_file():
            load_model(path, simplify=False)

    data = None
    if args.data:
        from pycompress.data import load_data
        from pycompress.ir import load_model

        if not args.models[0].endswith(".onnx"):
            raise PycompressError(f"{args.models[0]}: --data needs the first model to be an .onnx file")
        calibration = load_data(args.data, load_model(args.models[0], simplify=False))
        data = {k: v[:args.samples] if args.samples > 0 else v for k, v in calibration.inputs.items()}
    bar = tqdm(total=len(args.models), desc="bench", unit="model", file=sys.stderr, disable=None)
    device = None
    try:
        if args.device:
            from pycompress.bench.remote import bench_models_on_device

            results, device = bench_models_on_device(
                args.models, args.device, provider=args.provider, threads=args.threads, batch=args.batch,
                warmup=args.warmup, iters=args.iters, data=data, progress=lambda _: bar.update(1))
        else:
            results = bench_models(args.models, provider=args.provider, threads=args.threads, batch=args.batch,
                                   warmup=args.warmup, iters=args.iters, data=data,
                                   progress=lambda _: bar.update(1), rounds=args.rounds)
    finally:
        bar.close()
    if args.markdown:
        from pycompress.ir import atomic_write_text

        atomic_write_text(args.markdown, markdown(results))
    if args.plot:
        plot(results, args.plot)
    if args.json:
        emit_json({"provider": results[0].provider, "threads": results[0].threads, "batch": args.batch,
                   "warmup": args.warmup, "iters": args.iters, "rounds": None if device else args.rounds,
                   "data": args.data, **({"device": {"address": args.device, **device}} if device else {}),
                   "models": [r.to_dict() for r in results]})
        return 0 if any(r.latency_ms for r in results) else 2
    headers, rows = table_rows(results)
    print_table(headers, rows)
    threads = f"{results[0].threads} intra-op threads" + ("" if args.threads else " (onnxruntime's default)")
    if device:
        threads = f"{args.threads} intra-op threads" if args.threads else "the device's default intra-op threads"
        print(f"\nprovider {results[0].provider}, {threads}, batch {args.batch}, {args.iters} timed runs per model "
              f"after {args.warmup} warm-up, one model after the other on the device")
        print(f"device {args.device}: {device['cpu']}, {device['cores']} cores, {device['system']}, "
              f"onnxruntime {device['onnxruntime']}")
    else:
        print(f"\nprovider {results[0].provider}, {threads}, batch {args.batch}, {args.iters} timed runs per model "
              f"after {args.warmup} warm-up, interleaved in {args.rounds} rounds over all models "
              "(p50 spread: lowest-highest per-round median)")
    for r in results:
        if r.error:
            print(f"not measured: {r.error}")
    for path in (args.markdown, args.plot):
        if path:
            print(f"wrote {path}")
    return 0 if any(r.latency_ms for r in results) else 2
