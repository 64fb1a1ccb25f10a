"""`pycompress export MODEL.onnx --to packed|int8|int4|fp16|ort -o OUT`: deployment formats, each verified."""

from __future__ import annotations

import sys

from pycompress.cli.common import (AT_LEAST_ONE, check_numbers, data_inputs, emit_json, human, model_inputs,
                                   output_policy, print_table)
from pycompress.errors import PycompressError
from pycompress.export import FORMATS, export_model


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write a deployment format (packed, int8, int4, fp16, ort); the result is "
                                      "loaded back and compared with the input model")
    p.add_argument("model", help="the .onnx model to export")
    p.add_argument("--to", required=True, choices=list(FORMATS),
                   help="; ".join(f"{k}: {v}" for k, v in FORMATS.items()))
    p.add_argument("-o", "--output", required=True, help="file to write (.pcz, .onnx or .ort)")
    p.add_argument("--data", help="inputs (.npz/.npy/builtin:NAME): int8 calibration and the check run")
    p.add_argument("--dynamic", action="store_true", help="--to int8: dynamic quantization (needs no data)")
    p.add_argument("--embedding-bits", type=int, choices=[4], default=None,
                   help="--to int8/int4: store embedding tables (token lookups of 1024+ rows) as 4-bit codes, "
                        "dequantized per gathered row at run time (default: as the quantizer leaves them)")
    p.add_argument("--embedding-group", type=int, default=64, metavar="N",
                   help="--embedding-bits: columns per scale/offset pair (default 64; 0: one per row)")
    p.add_argument("--calibration-samples", type=int, default=64, metavar="N",
                   help="int8 static: calibrate on the first N samples of --data (default 64)")
    p.add_argument("--samples", type=int, default=8, metavar="N",
                   help="samples for the check run: the last N of --data, else N random inputs (default 8)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    check_numbers(args, samples=AT_LEAST_ONE, calibration_samples=AT_LEAST_ONE)
    if args.dynamic and args.to != "int8":
        raise PycompressError("--dynamic applies to --to int8 only")
    outputs = {"-o": args.output}
    if args.to == "ort":  # the operator config written beside the .ort
        from pathlib import Path

        from pycompress.export.ort_format import config_path

        outputs["operator config"] = config_path(Path(args.output))
    with output_policy(outputs, {**model_inputs("model", args.model), **data_inputs("--data", args.data)},
                       lock=[args.output]):
        return _run(args)


def _run(args) -> int:
    calibration = check_inputs = None
    if args.data:
        from pycompress.data import load_data
        from pycompress.ir import load_model

        data = load_data(args.data, load_model(args.model, simplify=False))
        n = len(data)
        calibration = {k: v[:min(args.calibration_samples, n)] for k, v in data.inputs.items()}
        check_inputs = {k: v[max(0, n - args.samples):] for k, v in data.inputs.items()}
    if not args.json:
        print(f"exporting {args.model} to {args.to} ...", file=sys.stderr)
    report = export_model(args.model, args.to, args.output, calibration=calibration, dynamic=args.dynamic,
                          sample_inputs=check_inputs, samples=args.samples, embedding_bits=args.embedding_bits,
                          embedding_group=args.embedding_group)
    if args.json:
        emit_json(report.to_dict())
        return 0
    extra = f" (+ {', '.join(report.files)})" if report.files else ""
    print(f"wrote {report.output}{extra}: {report.output_bytes:,} bytes, {report.ratio:.3f}x of "
          f"{report.input_bytes:,} bytes")
    if args.to == "packed":
        print_stream_table(report.details)
    else:
        print("  " + ", ".join(f"{k}: {v}" for k, v in report.details.items()))
    print_verification(report.verification, "exported model")
    return 0


def print_stream_table(details: dict) -> None:
    streams = details["streams"]
    if not streams:
        print("  no 8-bit streams to code (share weights first: `pycompress plan --actions share`); stored as is")
        return
    rows = [[s["tensor"], s["kind"], human(s["count"]), s["coding"], f"{s['bits_per_weight']:.3f}",
             f"{s['entropy_bits']:.3f}"] for s in streams]
    print()
    print_table(["stream", "kind", "weights", "coding", "bits/weight", "entropy bits"], rows)
    print(f"\nall streams: {details['index_bits_per_weight']:.3f} bits/weight "
          f"(empirical entropy {details['index_entropy_bits']:.3f}; bits/weight include the code tables)")


def print_verification(verification: dict, what: str) -> None:
    source = "random inputs" if verification["inputs"] == "random" else "--data samples"
    for out in verification["outputs"]:
        agreement = (f", top-1 agreement {100 * out['top1_agreement']:.1f}%"
                     if out["top1_agreement"] is not None else "")
        if out.get("cosine") is not None:
            agreement = f", mean cosine {out['cosine']:.4f} (embedding)"
        print(f"check ({what} vs input, {verification['samples']} {source}): output '{out['name']}' max |diff| "
              f"{out['max_abs_diff']:.3g}, relative error {out['relative_error']:.3g}{agreement}")
