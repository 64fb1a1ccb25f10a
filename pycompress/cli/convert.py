"""`pycompress convert SOURCE -o MODEL.onnx`: PyTorch -> ONNX, verified by onnxruntime."""

from __future__ import annotations

from dataclasses import asdict

from pycompress.cli.common import emit_json, output_policy
from pycompress.convert import (
    export_to_onnx,
    load_module_source,
    parse_shape,
    user_code,
)
from pycompress.errors import PycompressError


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="export a PyTorch module (file.py:factory) or .pt2 to ONNX and verify it")
    p.add_argument("source", help="path/to/file.py:callable returning a torch.nn.Module, or a torch.export .pt2")
    p.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    p.add_argument("--input-shape", action="append", default=[], metavar="1,3,224,224",
                   help="shape of each input (repeat for several inputs)")
    p.add_argument("--exporter", choices=["legacy", "dynamo"], default="legacy",
                   help="torch.onnx exporter (legacy is ~10x faster; .pt2 always uses dynamo)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset to emit (default 17)")
    p.add_argument("--static-batch", action="store_true", help="keep the batch dimension fixed")
    p.add_argument("--tolerance", type=float, default=1e-3,
                   help="max |torch - onnxruntime| / max(1, max|torch|) accepted (default 1e-3)")
    p.add_argument("--json", action="store_true", help="print the verification report as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    shapes = [parse_shape(s) for s in args.input_shape]
    # Checked before the user's code runs (importing it may take long or fail).
    import math

    if not math.isfinite(args.tolerance) or args.tolerance < 0:
        raise PycompressError(f"--tolerance {args.tolerance}: must be a finite number >= 0")
    if not 7 <= args.opset <= 25:
        raise PycompressError(f"--opset {args.opset}: must be in 7..25")
    source_file = args.source if args.source.endswith(".pt2") or ":" not in args.source \
        else args.source.rpartition(":")[0]
    with output_policy({"-o": args.output}, {"source": source_file}, lock=[args.output]):
        with user_code(args.source):
            model, kind = load_module_source(args.source)
        try:
            with user_code(args.source):
                report = export_to_onnx(model, shapes, args.output, exporter=args.exporter, opset=args.opset,
                                        dynamic_batch=not args.static_batch, tolerance=args.tolerance)
        except PycompressError as exc:  # name the source the failing module came from
            raise PycompressError(f"{args.source}: {exc}") from None
    if args.json:
        emit_json({**asdict(report), "source": args.source, "kind": kind})
    else:
        print(f"wrote {report.output} ({report.exporter} exporter, {report.seconds:.1f}s); "
              f"torch vs onnxruntime max |diff| = {report.max_abs_diff:.3g} (tolerance {report.tolerance:g})")
    return 0
