"""`pycompress info MODEL.onnx`: parameters, MACs and bytes per layer."""

from __future__ import annotations

from pathlib import Path

from pycompress.cli.common import emit_json, human, print_table
from pycompress.errors import PycompressError
from pycompress.ir import SEQUENCE_LENGTH, has_sequence_axis, load_model, model_cost


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="parameters, MACs and bytes per layer of an ONNX model")
    p.add_argument("model", help="path to a .onnx file")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--sequence-length", type=int, default=SEQUENCE_LENGTH,
                   help=f"token models: count MACs per sequence of this many tokens (default {SEQUENCE_LENGTH})")
    p.set_defaults(func=run)


def run(args) -> int:
    model = load_model(args.model)
    if args.sequence_length < 1:
        raise PycompressError(f"--sequence-length {args.sequence_length}: must be a positive integer")
    per_sequence = has_sequence_axis(model)
    cost = model_cost(model, sequence_length=args.sequence_length if per_sequence else None)
    payload = {
        "model": str(args.model),
        "file_bytes": Path(args.model).stat().st_size,
        "ir_version": model.ir_version,
        "opsets": dict(model.opset_imports),
        "inputs": [{"name": v.name, "shape": [d if isinstance(d, int) else str(d) for d in (v.shape or [])],
                    "dtype": str(v.dtype)} for v in model.graph.inputs],
        "macs_per": f"sequence of {args.sequence_length} tokens" if per_sequence else "sample",
        **cost.to_dict(),
    }
    if args.json:
        emit_json(payload)
        return 0
    rows = [[l.name, l.op, "x".join(map(str, l.weight_shape or [])) or "-", l.params, l.macs, l.bytes]
            for l in cost.layers]
    print_table(["layer", "op", "weight", "params", "MACs", "bytes"], rows)
    print()
    print(f"total: {cost.params:,} params ({human(cost.params)}), {cost.macs:,} MACs ({human(cost.macs)}) "
          f"per {payload['macs_per']}, "
          f"{cost.bytes:,} weight bytes; file {payload['file_bytes']:,} bytes; "
          f"ir_version {model.ir_version}, opsets {payload['opsets']}")
    return 0
