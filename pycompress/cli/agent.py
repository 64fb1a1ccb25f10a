"""`pycompress agent --port N`: the measuring agent for a target device (see pycompress.agent)."""

from __future__ import annotations


def add_parser(sub) -> None:
    from pycompress.agent.command import add_arguments, run

    p = sub.add_parser("agent", help="serve latency measurements on this device to a pycompress host "
                                     "(bench/compress --device HOST:PORT)",
                       description="Time ONNX models on this device for a pycompress host. Needs only numpy "
                                   "and onnxruntime; see docs/devices.md for installing and securing it.")
    add_arguments(p)
    p.set_defaults(func=run)
