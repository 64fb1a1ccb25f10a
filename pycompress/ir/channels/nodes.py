"""Reading an ONNX node's inputs and attributes for the channel analysis, failing clearly on a malformed one.

The op rules and the shape evaluator read nodes only through these helpers
(or with their own explicit checks), so a node that breaks the ONNX spec
(a missing required input, an attribute of the wrong type, lists of
mismatched lengths) raises ``MalformedNode``, which the walk turns into
"could not be analysed (...)" for the channels it touches. Any other
exception is a bug in a rule and is left to propagate.
"""

from __future__ import annotations

import onnx_ir as ir

from pycompress.errors import PycompressError
from pycompress.ir.graph import attr_int, attr_ints


class MalformedNode(PycompressError):
    """A node that does not follow the ONNX spec for its op (the message says how)."""


def is_default_domain(node: ir.Node) -> bool:
    return node.domain in ("", "ai.onnx")


def required_input(node: ir.Node, index: int) -> ir.Value | None:
    """Input ``index`` of ``node`` (None for an omitted optional one); MalformedNode when the
    node has fewer inputs."""
    if index >= len(node.inputs):
        raise MalformedNode(f"has no input {index}")
    return node.inputs[index]


def int_attr(node: ir.Node, name: str, default: int) -> int:
    try:
        return attr_int(node, name, default)
    except (TypeError, ValueError) as exc:    # e.g. a list or a string where an int belongs
        raise MalformedNode(f"has a malformed attribute '{name}'") from exc


def ints_attr(node: ir.Node, name: str, default: list[int] | None) -> list[int] | None:
    try:
        return attr_ints(node, name, default)
    except (TypeError, ValueError) as exc:
        raise MalformedNode(f"has a malformed attribute '{name}'") from exc
