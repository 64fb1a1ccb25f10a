"""`pycompress unpack MODEL.pcz -o MODEL.onnx`: restore the exact ONNX file from the packed container."""

from __future__ import annotations

from pycompress.cli.common import emit_json, output_policy
from pycompress.export.packed import unpack_file


def add_parser(sub) -> None:
    p = sub.add_parser("unpack", help="restore the byte-identical ONNX model from a .pcz container")
    p.add_argument("packed", help="a .pcz file written by `pycompress export --to packed`")
    p.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    with output_policy({"-o": args.output}, {"packed": args.packed}, lock=[args.output]):
        path, size = unpack_file(args.packed, args.output)
    if args.json:
        emit_json({"packed": str(args.packed), "output": str(path), "bytes": size, "sha256_verified": True})
    else:
        print(f"wrote {path}: {size:,} bytes (SHA-256 verified against the original)")
    return 0
