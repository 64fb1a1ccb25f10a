"""Helpers for rewrite tests (onnxscript's recipe): build a model from ONNX text,
apply a plan, compare with onnxruntime, run the checker."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
import onnxruntime as ort

from pycompress.fidelity import collect_activations
from pycompress.ir import load_model
from pycompress.plan import LayerDecision, Plan
from pycompress.rewrites import ApplyContext, apply_plan


def model_from_text(text: str, path: Path, **initializers: np.ndarray) -> ir.Model:
    """Parse ONNX text, attach numpy initializers, write it, and load it the way the CLI does."""
    proto = onnx.parser.parse_model(text)
    for name, array in initializers.items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(array), name))
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))
    return load_model(path)


def run(model: ir.Model, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> list[np.ndarray]:
    """Run an in-memory model with onnxruntime (optionally exposing intermediate values)."""
    proto = ir.to_proto(model)
    for name in outputs or []:
        if name not in {o.name for o in proto.graph.output}:
            proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(outputs, feeds)


def check(model: ir.Model) -> None:
    onnx.checker.check_model(ir.to_proto(model), full_check=True)


def plan_of(*decisions: tuple) -> Plan:
    """plan_of(("fc", "svd", {"rank": 3}), ...)"""
    return Plan([LayerDecision(site, action, dict(params)) for site, action, params in decisions])


def apply(model: ir.Model, *decisions: tuple, data: dict[str, np.ndarray] | None = None,
          batch: int = 64, **options) -> Plan:
    """Apply decisions in place; with ``data``, data-aware decisions stream activations of ``model``."""
    ctx = ApplyContext()
    if data is not None:
        n = len(next(iter(data.values())))

        def activations(names):
            batches = ({k: v[i:i + batch] for k, v in data.items()} for i in range(0, n, batch))
            return collect_activations(model, names, batches)

        ctx = ApplyContext(activations, options)
    return apply_plan(model, plan_of(*decisions), ctx)


def relative_error(expected: np.ndarray, got: np.ndarray) -> float:
    expected, got = expected.astype(np.float64), got.astype(np.float64)
    return float(np.linalg.norm(expected - got) / np.linalg.norm(expected))


def op_types(model: ir.Model) -> list[str]:
    return [node.op_type for node in model.graph]


def assert_exact_on_a_copy(model: ir.Model, decision: tuple, feeds: dict[str, np.ndarray],
                           original: np.ndarray) -> ir.Model:
    """Apply ``decision`` (one that must not change the function, e.g. a full rank) to a copy of
    ``model``: the checker passes and onnxruntime reproduces ``original``. Returns the copy."""
    copy = model.clone()
    apply(copy, decision)
    check(copy)
    np.testing.assert_allclose(run(copy, feeds)[0], original, rtol=1e-5, atol=1e-5)
    return copy
